"""`nanofleet schema`: write the JSON Schema of every protocol message.

The schemas are what a device written in another language implements. They describe what
a reader accepts (pydantic's validation mode), in JSON Schema draft 2020-12, one file per
model of :data:`protocol.MESSAGE_MODELS`, named ``<Model>.schema.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from protocol import MESSAGE_MODELS

DRAFT: str = "https://json-schema.org/draft/2020-12/schema"


def message_schemas() -> dict[str, dict[str, Any]]:
    """Return the JSON Schema of every message model, keyed by file name."""
    return {
        f"{name}.schema.json": {"$schema": DRAFT, **model.model_json_schema()}
        for name, model in MESSAGE_MODELS.items()
    }


def schema(
    out: Annotated[
        Path,
        typer.Option("--out", help="Directory to write <Model>.schema.json files into."),
    ],
) -> None:
    """Write the JSON Schema of every protocol message into a directory."""
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for filename, document in message_schemas().items():
            path = out / filename
            path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", "utf-8")
            typer.echo(f"wrote {path}")
    except OSError as e:
        typer.echo(f"cannot write schemas to {out}: {e}", err=True)
        raise typer.Exit(1) from e
