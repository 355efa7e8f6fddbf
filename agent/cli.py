"""`nanofleet-agent`: the device-side command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent.data_cmd import data_app
from agent.enroll_cmd import enroll
from agent.generate_cmd import generate
from agent.supernode_cmd import supernode

app = typer.Typer(
    name="nanofleet-agent",
    help="The nanofleet device agent: run the model, serve local inference, take signed updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """The nanofleet device agent."""


@app.command("version")
def version() -> None:
    """Print the agent's version."""
    from agent import __version__

    typer.echo(__version__)


@app.command("run")
def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML settings file; NANOFLEET_* variables override it."),
    ] = None,
) -> None:
    """Serve the model on the local socket until SIGTERM (systemd Type=notify)."""
    from agent import daemon

    raise typer.Exit(int(daemon.run(config)))


app.command("generate")(generate)
app.command("enroll")(enroll)
app.command("supernode")(supernode)
app.add_typer(data_app, name="data")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
