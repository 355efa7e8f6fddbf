"""The committed ``docs/openapi.json`` is exactly what the server serves at ``/openapi.json``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from agent.config import LimitSettings
from agent.server.app import ServerState, create_app
from agent.server.holder import ModelHolder
from agent.server.listeners import PEER_EXTENSION, Peer
from agent.server.openapi_cmd import REGENERATE, main, openapi_document, render
from agent.server.runner import Scheduler
from agent.server.scheduling import SchedulerCore

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
STALE = f"docs/openapi.json is not what the server serves; regenerate it: .venv/bin/{REGENERATE}"


class _Engine:
    manifest = SimpleNamespace(name="some-model", version="2.0.0")
    bundle_hash = "cd" * 32
    context_length = 128


def served() -> dict[str, Any]:
    """GET /openapi.json from an app with a model loaded, over a Unix-socket peer."""
    scheduler = Scheduler(
        SchedulerCore(concurrency=2, queue_length_max=3, retry_after_s=5), deadline_s=9.0
    )
    state = ServerState(
        holder=ModelHolder[Any](_Engine()), scheduler=scheduler, limits=LimitSettings()
    )
    app = create_app(state)

    async def with_peer(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})[PEER_EXTENSION] = Peer("unix", pid=1, uid=0, gid=0)
        await app(scope, receive, send)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=with_peer)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return await client.get("/openapi.json")

    try:
        response = asyncio.run(get())
    finally:
        scheduler.shutdown()
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def test_the_committed_document_is_what_the_server_serves() -> None:
    assert DOC.exists(), STALE
    assert json.loads(DOC.read_text("utf-8")) == served(), STALE


def test_the_committed_document_is_in_its_generated_form() -> None:
    assert DOC.read_text("utf-8") == render(openapi_document()), STALE


def test_the_generator_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "openapi.json"
    assert main(["--out", str(out)]) == 0
    assert json.loads(out.read_text("utf-8")) == served()


def test_the_document_names_every_route_and_error_shape() -> None:
    doc = openapi_document()
    assert set(doc["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert set(chat["responses"]) >= {"200", "400", "401", "413", "429", "503"}
    assert "text/event-stream" in chat["responses"]["200"]["content"]
