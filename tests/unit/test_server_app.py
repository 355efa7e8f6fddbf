"""The HTTP API in process, in front of a fake engine whose output the test controls."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from agent.config import LimitSettings
from agent.runtime.sampling import FinishReason, SamplingParams
from agent.server.app import ServerState, create_app
from agent.server.holder import ModelHolder
from agent.server.listeners import PEER_EXTENSION, Peer
from agent.server.runner import Scheduler
from agent.server.scheduling import SchedulerCore


class FakeGeneration:
    def __init__(
        self,
        engine: FakeEngine,
        ids: list[int],
        params: SamplingParams,
        cancel: threading.Event | None,
    ) -> None:
        self.engine = engine
        self.params = params
        self.cancel = cancel or threading.Event()
        self.prompt_tokens = len(ids)
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def __iter__(self) -> Iterator[str]:
        for word in self.engine.words[: self.params.max_tokens]:
            if self.engine.gate is not None:
                while not self.engine.gate.acquire(timeout=0.01):
                    if self.cancel.is_set():
                        break
            if self.cancel.is_set():
                self.finish_reason = FinishReason.CANCELLED
                return
            if word in self.params.stop:
                self.finish_reason = FinishReason.STOP
                return
            self.completion_tokens += 1
            yield word
        self.finish_reason = (
            FinishReason.LENGTH
            if self.params.max_tokens <= len(self.engine.words)
            else FinishReason.STOP
        )


class FakeEngine:
    """Each prompt character is a token; the output is ``words``, one token each."""

    def __init__(
        self,
        name: str = "fake-model",
        words: Sequence[str] = ("Hi", " there", "!"),
        context_length: int = 64,
        gate: threading.Semaphore | None = None,
    ) -> None:
        self.manifest = SimpleNamespace(name=name, version="1.0.0")
        self.bundle_hash = "ab" * 32
        self.context_length = context_length
        self.words = list(words)
        self.gate = gate
        self.calls: list[SamplingParams] = []

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        return "".join(f"<{role}>{text}" for role, text in messages) + "<assistant>"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
    ) -> FakeGeneration:
        self.calls.append(params)
        return FakeGeneration(self, prompt_ids, params, cancel)


def unix_peer(app: Any) -> Any:
    async def with_peer(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})[PEER_EXTENSION] = Peer("unix", pid=1, uid=0, gid=0)
        await app(scope, receive, send)

    return with_peer


def make_state(
    engine: FakeEngine,
    *,
    queue: int = 4,
    token: str | None = None,
    limits: LimitSettings | None = None,
) -> ServerState:
    return ServerState(
        holder=ModelHolder(engine),
        scheduler=Scheduler(
            SchedulerCore(concurrency=1, queue_length_max=queue, retry_after_s=2),
            deadline_s=30.0,
        ),
        limits=limits or LimitSettings(),
        tcp_token=token,
    )


def run(state: ServerState, body: Any, *, peer: bool = True) -> Any:
    async def main() -> Any:
        app = create_app(state)
        transport = httpx.ASGITransport(app=unix_peer(app) if peer else app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return await body(client)

    try:
        return asyncio.run(main())
    finally:
        state.scheduler.shutdown()


CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def test_chat_completion_returns_openai_shape_and_usage() -> None:
    engine = FakeEngine()

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10})

    r = run(make_state(engine), body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "fake-model"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Hi there!"}
    assert data["choices"][0]["finish_reason"] == "stop"
    prompt = len(engine.render_chat([("user", "hello")]))
    assert data["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 3,
        "total_tokens": prompt + 3,
    }


def test_sampling_parameters_reach_the_engine() -> None:
    engine = FakeEngine()

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            "/v1/chat/completions",
            json={
                **CHAT,
                "max_tokens": 2,
                "temperature": 0.5,
                "top_p": 0.9,
                "seed": 7,
                "stop": ["!"],
                "top_k": 40,
            },
        )

    r = run(make_state(engine), body)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert engine.calls == [
        SamplingParams(max_tokens=2, temperature=0.5, top_p=0.9, top_k=40, seed=7, stop=("!",))
    ]


def test_default_max_tokens_fits_the_context() -> None:
    engine = FakeEngine(context_length=40)

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/chat/completions", json=CHAT)

    run(make_state(engine), body)
    prompt = len(engine.render_chat([("user", "hello")]))
    assert engine.calls[0].max_tokens == 40 - prompt


def test_streamed_chat_is_sse_ending_in_done() -> None:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        )

    r = run(make_state(FakeEngine()), body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hi there!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_text_completion_plain_and_streamed() -> None:
    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        plain = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5})
        streamed = await client.post("/v1/completions", json={"prompt": "abc", "stream": True})
        return plain, streamed

    plain, streamed = run(make_state(FakeEngine()), body)
    assert plain.json()["choices"][0]["text"] == "Hi there!"
    assert plain.json()["usage"]["prompt_tokens"] == 3
    events = [e.removeprefix("data: ") for e in streamed.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "Hi there!"


def test_models_health_ready_metrics() -> None:
    state = make_state(FakeEngine())

    async def body(client: httpx.AsyncClient) -> dict[str, httpx.Response]:
        out = {"not_ready": await client.get("/readyz")}
        state.ready.set()
        await client.post("/v1/chat/completions", json=CHAT)
        for path in ("/v1/models", "/healthz", "/readyz", "/metrics"):
            out[path] = await client.get(path)
        return out

    r = run(state, body)
    assert r["not_ready"].status_code == 503
    assert r["not_ready"].json()["error"]["code"] == "not_ready"
    card = r["/v1/models"].json()["data"][0]
    assert card["id"] == "fake-model"
    assert card["object"] == "model"
    assert r["/healthz"].json() == {"status": "ok"}
    assert r["/readyz"].status_code == 200
    text = r["/metrics"].text
    assert 'nanofleet_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert "nanofleet_completion_tokens_total 3.0" in text
    assert "nanofleet_first_token_seconds_count 1.0" in text
    assert "nanofleet_token_seconds_count 2.0" in text
    assert "nanofleet_queue_depth 0.0" in text
    assert (
        f'nanofleet_model_info{{bundle_hash="{"ab" * 32}",name="fake-model",version="1.0.0"}} 1.0'
        in text
    )


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ],
)
def test_unknown_paths_and_methods_get_openai_errors(
    method: str, path: str, status: int, code: str
) -> None:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.request(method, path)

    r = run(make_state(FakeEngine()), body)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code


def test_configured_limits_are_enforced_with_the_limit_named() -> None:
    limits = LimitSettings(
        messages_max=2,
        max_tokens_max=8,
        stop_strings_max=1,
        stop_string_max_chars=3,
        body_max_bytes=2048,
    )
    cases = [
        ({"messages": [{"role": "user", "content": "a"}] * 3}, "messages", "limit of 2"),
        ({**CHAT, "max_tokens": 9}, "max_tokens", "limit of 8"),
        ({**CHAT, "max_completion_tokens": 9}, "max_completion_tokens", "limit of 8"),
        ({**CHAT, "stop": ["a", "b"]}, "stop", "limit of 1"),
        ({**CHAT, "stop": "abcd"}, "stop", "limit of 3"),
        ({**CHAT, "model": "other"}, "model", "fake-model"),
        ({"messages": [{"role": "user", "content": "x" * 70}]}, "messages", "context is 64"),
        (
            {**CHAT, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 40}]},
            "max_tokens",
            "at most",
        ),
    ]

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        out = [await client.post("/v1/chat/completions", json=c) for c, _, _ in cases]
        out.append(await client.post("/v1/chat/completions", content=b" " * 4096))
        return out

    responses = run(make_state(FakeEngine(), limits=limits), body)
    for (_, param, words), r in zip(cases, responses[:-1], strict=True):
        assert r.status_code == 400, (param, r.text)
        assert r.json()["error"]["param"] == param
        assert words in r.json()["error"]["message"]
    assert responses[-1].status_code == 413
    assert "2048 bytes" in responses[-1].json()["error"]["message"]


def test_requests_not_on_the_unix_socket_need_the_token() -> None:
    state = make_state(FakeEngine(), token="s3cret-token-" * 3)

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.get("/healthz"),
            await client.get("/healthz", headers={"Authorization": "Bearer wrong"}),
            await client.get("/healthz", headers={"Authorization": "Basic " + "s3cret-token-" * 3}),
            await client.get(
                "/healthz", headers={"Authorization": "Bearer " + "s3cret-token-" * 3}
            ),
        ]

    r = run(state, body, peer=False)
    assert [x.status_code for x in r] == [401, 401, 401, 200]
    assert r[0].headers["www-authenticate"] == "Bearer"
    assert r[0].json()["error"]["code"] == "invalid_api_key"


def test_no_token_configured_refuses_everything_off_the_socket() -> None:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/healthz", headers={"Authorization": "Bearer anything"})

    assert run(make_state(FakeEngine()), body, peer=False).status_code == 401


def test_full_queue_answers_429_with_retry_after() -> None:
    gate = threading.Semaphore(0)
    state = make_state(FakeEngine(gate=gate), queue=1)

    async def body(client: httpx.AsyncClient) -> tuple[list[int], httpx.Response]:
        running = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        while state.scheduler.running < 1:
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        while state.scheduler.queued < 1:
            await asyncio.sleep(0.005)
        refused = await client.post("/v1/chat/completions", json=CHAT)
        for _ in range(6):
            gate.release()
        done = await asyncio.gather(running, waiting)
        return [d.status_code for d in done], refused

    statuses, refused = run(state, body)
    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["code"] == "queue_full"


def test_swap_in_flight_requests_finish_on_the_old_engine() -> None:
    gate = threading.Semaphore(0)
    old = FakeEngine(name="old-model", words=["old"], gate=gate)
    new = FakeEngine(name="new-model", words=["new"])
    state = make_state(old)
    state = ServerState(
        holder=state.holder,
        scheduler=Scheduler(
            SchedulerCore(concurrency=2, queue_length_max=4, retry_after_s=1), deadline_s=30.0
        ),
        limits=state.limits,
    )

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        in_flight = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        while state.scheduler.running < 1:
            await asyncio.sleep(0.005)
        assert state.holder.swap(new) is old
        after = await client.post("/v1/chat/completions", json=CHAT)
        gate.release()
        return await in_flight, after

    before, after = run(state, body)
    assert before.json()["model"] == "old-model"
    assert before.json()["choices"][0]["message"]["content"] == "old"
    assert after.json()["model"] == "new-model"
    assert after.json()["choices"][0]["message"]["content"] == "new"
    assert len(old.calls) == 1
    assert len(new.calls) == 1
