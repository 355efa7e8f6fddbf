"""`nanofleet`: the operator and coordinator command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.demo import DEFAULT_PROMPT
from coordinator.device_cli import device_app
from coordinator.fleet_cli import devices_app, rollouts_app
from coordinator.models.cli import model_app
from coordinator.repository.cli import keys_app, release_app
from coordinator.round_cli import round_app
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


@app.command("serve")
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML settings file (NANOFLEET_ variables override)."),
    ] = None,
) -> None:
    """Run the coordinator: HTTP API, dashboard, repository, MQTT ingestion, rollouts."""
    from coordinator.serve import serve_command

    serve_command(config)


@app.command("demo")
def demo(
    agents: Annotated[int, typer.Option(min=1, max=8, help="Device agents to start.")] = 3,
    prompt: Annotated[str, typer.Option(help="What to ask the first agent.")] = DEFAULT_PROMPT,
    max_tokens: Annotated[int, typer.Option(min=1, max=1024, help="Answer length limit.")] = 96,
    exit_after: Annotated[
        bool, typer.Option("--exit", help="Stop the fleet after the script instead of waiting.")
    ] = False,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep the workspace (CA, keys, repository, registry, devices) here "
            "(default: a temporary directory, removed at the end)."
        ),
    ] = None,
) -> None:
    """Run a local fleet on embedded defaults: model, broker, coordinator, enrolled agents,
    a streamed answer, a signed adapter release rolled out to every device."""
    from rich.console import Console

    from coordinator.demo import run_demo

    raise typer.Exit(
        run_demo(
            agents=agents,
            prompt=prompt,
            max_tokens=max_tokens,
            keep_running=not exit_after,
            work_dir=work_dir,
            console=Console(),
        )
    )


app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
app.add_typer(release_app, name="release")
app.add_typer(devices_app, name="devices")
app.add_typer(rollouts_app, name="rollouts")
app.add_typer(device_app, name="device")
app.add_typer(round_app, name="round")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
