"""The OpenAPI document of the inference API, as kept in the repository (``docs/openapi.json``).

The document depends on the routes and the :mod:`protocol.inference` models only, never on
a model or the settings, so it is built from an app with nothing loaded. Regenerate the
committed copy after changing either::

    .venv/bin/python -m agent.server.openapi_cmd --out docs/openapi.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.config import LimitSettings
from agent.server.app import ServerState, create_app
from agent.server.holder import ModelHolder
from agent.server.runner import Scheduler
from agent.server.scheduling import SchedulerCore

#: The command that rewrites the committed document.
REGENERATE = "python -m agent.server.openapi_cmd --out docs/openapi.json"


class _Unloaded:
    """Stands in for the engine: building the document asks the model nothing."""

    manifest = SimpleNamespace(name="unloaded", version="0")
    bundle_hash = ""
    context_length = 0


def openapi_document() -> dict[str, Any]:
    """The document ``/openapi.json`` serves."""
    scheduler = Scheduler(
        SchedulerCore(concurrency=1, queue_length_max=0, retry_after_s=1), deadline_s=1.0
    )
    try:
        state = ServerState(
            holder=ModelHolder[Any](_Unloaded()), scheduler=scheduler, limits=LimitSettings()
        )
        return create_app(state).openapi()
    finally:
        scheduler.shutdown()


def render(document: dict[str, Any]) -> str:
    """The committed form: indented JSON with a final newline, keys in the served order."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.server.openapi_cmd",
        description="Write the OpenAPI document of the agent's inference API.",
    )
    parser.add_argument(
        "--out", type=Path, help="file to write (default: standard output)", default=None
    )
    args = parser.parse_args(argv)
    text = render(openapi_document())
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
