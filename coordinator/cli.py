"""`nanofleet`: the operator and coordinator command line."""

from __future__ import annotations

import typer

from coordinator.models.cli import model_app
from coordinator.repository.cli import keys_app, release_app
from coordinator.schema_cmd import schema

app = typer.Typer(
    name="nanofleet",
    help="nanofleet operator tools: build models, manage releases and the fleet, run the demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """nanofleet operator tools."""


@app.command("version")
def version() -> None:
    """Print the coordinator's version."""
    from coordinator import __version__

    typer.echo(__version__)


app.command("schema")(schema)
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
app.add_typer(release_app, name="release")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
