"""`nanofleet-agent generate`: run the model once from the terminal, streaming the answer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from protocol.exitcodes import ExitCode


def generate(
    prompt: Annotated[str, typer.Argument(help="The user's message.")],
    model: Annotated[Path, typer.Option("--model", help="Model directory (with manifest.json).")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, max=8192)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=100.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 0,
    seed: Annotated[int | None, typer.Option("--seed", min=0)] = None,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message (default: the template's).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
) -> None:
    """Answer PROMPT as a chat message, streaming the text to stdout."""
    from agent.errors import ContextLengthError, ModelError
    from agent.runtime import Engine, SamplingParams

    def fail(message: str, code: ExitCode) -> typer.Exit:
        typer.echo(f"error: {message}", err=True)
        return typer.Exit(code)

    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
    except ValueError as e:
        raise fail(str(e), ExitCode.USAGE) from None
    try:
        engine = Engine.load(model, threads=threads)
    except ModelError as e:
        raise fail(str(e), ExitCode.MODEL_INVALID) from None
    messages = ([("system", system)] if system else []) + [("user", prompt)]
    ids = engine.encode(engine.render_chat(messages))
    try:
        generation = engine.generate(ids, params)
    except ContextLengthError as e:
        raise fail(str(e), ExitCode.BAD_INPUT) from None
    for delta in generation:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    typer.echo(
        f"[{generation.prompt_tokens} prompt tokens, {generation.completion_tokens} generated, "
        f"finish: {generation.finish_reason}]",
        err=True,
    )
