"""The agent daemon as a real process, the tiny model, a real Unix socket.

The model here is the tiny test model built with a long context (8192 tokens) and an
end-of-sequence row of zeros in its tied embedding, so greedy decoding never stops on its own:
a request with a large ``max_tokens`` keeps the engine busy for a while, which makes queue
and disconnect behaviour observable by counting tokens instead of measuring time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.processes import ManagedProcess, notified

AGENT = [os.fspath(Path(os.sys.executable).parent / "nanofleet-agent"), "run"]
LONG = 6000  # tokens: keeps the engine busy for a good fraction of a second or more
TOKEN = "t0ken-for-the-loopback-listener-0123456789"


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coordinator.models.build import build_gguf
    from coordinator.models.tiny import (
        TINY_CONFIG,
        random_weights,
        train_tiny_tokenizer,
        write_gguf,
    )

    work = tmp_path_factory.mktemp("long-model")
    tokenizer = train_tiny_tokenizer()
    config = replace(TINY_CONFIG, vocab_size=len(tokenizer.tokens), context_length=8192)
    weights = random_weights(config, seed=3)
    weights["token_embd.weight"][tokenizer.tokens.index("<|im_end|>")] = 0.0
    gguf = work / "tiny.gguf"
    write_gguf(gguf, config, weights, tokenizer)
    return build_gguf(gguf, work / "model", name="tiny-long").path


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    # World-traversable, so that a process running as nobody reaches the socket file and
    # is stopped by the socket's own mode and group, not by a private parent directory.
    path = Path(tempfile.mkdtemp(prefix="nanofleet-srv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(path: Path, model_dir: Path, sock: Path, extra: str = "") -> Path:
    path.write_text(
        f'[model]\ndir = "{model_dir}"\n[server]\nsocket_path = "{sock}"\n{extra}'
        "\n[server.limits]\nmax_tokens_max = 8000\n",
        "utf-8",
    )
    return path


@pytest.fixture(scope="module")
def agent(long_model_dir: Path, run_dir: Path) -> Iterator[dict[str, Any]]:
    """One daemon for most tests: concurrency 1, queue of 8, loopback TCP with a token."""
    sock = run_dir / "agent.sock"
    token_file = run_dir / "token"
    token_file.write_text(TOKEN, "utf-8")
    token_file.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(
        run_dir / "agent.toml",
        long_model_dir,
        sock,
        f'socket_group = "users"\ntcp_host = "127.0.0.1"\ntcp_port = {port}\n'
        f'tcp_token_file = "{token_file}"\n'
        "[server.scheduler]\nconcurrency = 1\nqueue_length_max = 8\n",
    )
    with ManagedProcess([*AGENT, "--config", config], notify=True, name="agent") as proc:
        proc.wait_ready(notified("READY=1"), timeout=60)
        yield {"proc": proc, "sock": sock, "port": port}


def client(sock: Path, timeout: float = 60.0) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=os.fspath(sock)), base_url="http://agent", timeout=timeout
    )


def metric(sock: Path, name: str) -> float:
    with client(sock) as c:
        text = c.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


CHAT = {"messages": [{"role": "user", "content": "Say something."}], "temperature": 0}


# -- Must show 1: the official client and curl -------------------------------------------


def test_openai_client_unchanged_streaming_and_not(agent: dict[str, Any]) -> None:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=os.fspath(agent["sock"])))
    oa = openai.OpenAI(base_url="http://agent/v1", api_key="unused", http_client=http)
    models = oa.models.list()
    assert [m.id for m in models.data] == ["tiny-long"]
    reply = oa.chat.completions.create(
        model="tiny-long",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 12
    assert reply.choices[0].message.content
    stream = oa.chat.completions.create(
        model="tiny-long",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the same text both ways
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    legacy = oa.completions.create(model="tiny-long", prompt="Once", max_tokens=5)
    assert legacy.usage is not None
    assert legacy.usage.completion_tokens == 5
    http.close()


def test_curl_streams_sse_ending_in_done(agent: dict[str, Any]) -> None:
    body = json.dumps({**CHAT, "max_tokens": 8, "stream": True})
    out = subprocess.run(
        [
            "curl",
            "-sSN",
            "--unix-socket",
            os.fspath(agent["sock"]),
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            "http://agent/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = [e for e in out.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    assert len(events) >= 4


# -- Must show 2: concurrency, a full queue, disconnects -----------------------------------


def test_eight_concurrent_clients_all_succeed(agent: dict[str, Any]) -> None:
    results: list[int] = []

    def one(i: int) -> None:
        with client(agent["sock"]) as c:
            r = c.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": f"client {i}"}],
                    "max_tokens": 16,
                    "stream": i % 2 == 0,
                },
            )
            results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [200] * 8


def open_stream(sock: Path, max_tokens: int = LONG) -> tuple[socket.socket, bytes]:
    """Start a streamed chat on a raw socket and read until the first content chunk."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(os.fspath(sock))
    body = json.dumps({**CHAT, "max_tokens": max_tokens, "stream": True}).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: agent\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    seen = b""
    while seen.count(b"data: ") < 2:
        if seen.startswith(b"HTTP/1.1 ") and not seen.startswith(b"HTTP/1.1 200"):
            raise AssertionError(seen.decode(errors="replace"))
        chunk = s.recv(65536)
        assert chunk, "the server closed the stream early"
        seen += chunk
    return s, seen


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_disconnect_mid_stream_frees_the_engine(agent: dict[str, Any]) -> None:
    sock = agent["sock"]
    tokens_before = metric(sock, "nanofleet_completion_tokens_total")
    cancelled_before = metric(sock, 'nanofleet_generations_total{finish_reason="cancelled"}')
    s, _ = open_stream(sock)
    s.close()  # the client goes away after its first token
    with client(sock) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
    assert r.status_code == 200
    wait_for(
        lambda: (
            metric(sock, 'nanofleet_generations_total{finish_reason="cancelled"}')
            == cancelled_before + 1
        ),
        "the abandoned generation to end",
    )
    spent = metric(sock, "nanofleet_completion_tokens_total") - tokens_before - 4
    # The abandoned request asked for 6000 tokens; the engine stopped long before.
    assert 1 <= spent < LONG / 4, spent


def test_full_queue_answers_429_with_retry_after(long_model_dir: Path, run_dir: Path) -> None:
    sock = run_dir / "small-queue.sock"
    config = write_config(
        run_dir / "small-queue.toml",
        long_model_dir,
        sock,
        "[server.scheduler]\nconcurrency = 1\nqueue_length_max = 1\nretry_after_s = 7\n",
    )
    with ManagedProcess([*AGENT, "--config", config], notify=True, name="agent-q") as proc:
        proc.wait_ready(notified("READY=1"), timeout=60)
        busy, _ = open_stream(sock)  # holds the only slot while the engine generates

        def queued_request() -> None:
            with client(sock) as c:
                c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})

        waiting = threading.Thread(target=queued_request)
        waiting.start()
        wait_for(lambda: metric(sock, "nanofleet_queue_depth") == 1, "one queued request")
        with client(sock) as c:
            refused = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
        busy.close()
        waiting.join(timeout=60)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "7"
        assert refused.json()["error"]["code"] == "queue_full"
        assert proc.stop() == 0


# -- Must show 3: a table of bad requests ------------------------------------------------


def raw(
    body: bytes,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[str, str, bytes, dict[str, str]]:
    return method, path, body, headers or {"Content-Type": "application/json"}


def js(obj: Any, path: str = "/v1/chat/completions") -> tuple[str, str, bytes, dict[str, str]]:
    return raw(json.dumps(obj).encode(), path)


U = {"role": "user", "content": "hi"}

BAD_REQUESTS: list[tuple[str, tuple[str, str, bytes, dict[str, str]], int, str | None]] = [
    ("malformed json", raw(b'{"messages": [}'), 400, None),
    ("empty body", raw(b""), 400, None),
    ("json array body", js([U]), 400, None),
    ("messages missing", js({"max_tokens": 3}), 400, "messages"),
    ("messages empty", js({"messages": []}), 400, "messages"),
    ("messages not a list", js({"messages": "hi"}), 400, "messages"),
    (
        "unknown role",
        js({"messages": [{"role": "wizard", "content": "x"}]}),
        400,
        "messages[0].role",
    ),
    (
        "content wrong type",
        js({"messages": [{"role": "user", "content": 5}]}),
        400,
        "messages[0].content",
    ),
    ("content missing", js({"messages": [{"role": "user"}]}), 400, "messages[0].content"),
    ("max_tokens negative", js({"messages": [U], "max_tokens": -1}), 400, "max_tokens"),
    ("max_tokens string", js({"messages": [U], "max_tokens": "5"}), 400, "max_tokens"),
    ("max_tokens over limit", js({"messages": [U], "max_tokens": 9000}), 400, "max_tokens"),
    ("temperature too high", js({"messages": [U], "temperature": 9}), 400, "temperature"),
    ("top_p zero", js({"messages": [U], "top_p": 0}), 400, "top_p"),
    ("seed negative", js({"messages": [U], "seed": -3}), 400, "seed"),
    ("n above one", js({"messages": [U], "n": 2}), 400, "n"),
    ("tools", js({"messages": [U], "tools": [{"type": "function"}]}), 400, "tools"),
    ("logprobs", js({"messages": [U], "logprobs": True}), 400, "logprobs"),
    ("unknown field", js({"messages": [U], "frobnicate": 1}), 400, "frobnicate"),
    (
        "too many stop strings",
        js({"messages": [U], "stop": ["a", "b", "c", "d", "e"]}),
        400,
        "stop",
    ),
    ("stop string too long", js({"messages": [U], "stop": "x" * 65}), 400, "stop"),
    ("too many messages", js({"messages": [U] * 65}), 400, "messages"),
    (
        "prompt over context",
        js({"messages": [{"role": "user", "content": "word " * 6000}]}),
        400,
        "messages",
    ),
    (
        "prompt plus max_tokens over context",
        js({"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 3000}),
        400,
        "max_tokens",
    ),
    (
        "stream_options without stream",
        js({"messages": [U], "stream_options": {}}),
        400,
        "stream_options",
    ),
    ("unknown model", js({"messages": [U], "model": "gpt-9"}), 400, "model"),
    ("completion prompt missing", js({"max_tokens": 2}, "/v1/completions"), 400, "prompt"),
    ("completion prompt empty", js({"prompt": ""}, "/v1/completions"), 400, "prompt"),
    ("completion echo", js({"prompt": "a", "echo": True}, "/v1/completions"), 400, "echo"),
    ("completion prompt list", js({"prompt": ["a", "b"]}, "/v1/completions"), 400, "prompt"),
    ("oversize body", raw(b'{"messages": "' + b"x" * 300_000 + b'"}'), 413, None),
    ("unknown path", raw(b"", "/v1/embeddings"), 404, None),
    ("wrong method", raw(b"", "/v1/models", "DELETE"), 405, None),
]


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(
    agent: dict[str, Any],
) -> None:
    assert len(BAD_REQUESTS) >= 25
    failures = []
    with client(agent["sock"]) as c:
        for name, (method, path, body, headers), status, param in BAD_REQUESTS:
            r = c.request(method, path, content=body, headers=headers)
            got_status, err = r.status_code, r.json().get("error", {})
            # Union members may follow the field's name (messages[0].content.str).
            got_param = err.get("param")
            param_ok = got_param == param or (param and str(got_param).startswith(param + "."))
            if got_status != status or not param_ok or not err.get("message"):
                print(name, got_status, err)
                failures.append((name, got_status, err))
            elif param is not None and param.split("[")[0].split(".")[0] not in err["message"]:
                failures.append((name, "message does not name the field", err))
        assert failures == []
        ok = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200


def test_a_malformed_content_length_is_refused_and_the_server_keeps_serving(
    agent: dict[str, Any],
) -> None:
    # The HTTP parser refuses broken framing before the app sees the request: a plain 400.
    status, _ = raw_request(agent["sock"], b"{}", "abc")
    assert status == 400
    with client(agent["sock"]) as c:
        assert c.get("/healthz").status_code == 200


def raw_request(sock: Path, body: bytes, content_length: str) -> tuple[int, dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(os.fspath(sock))
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: agent\r\nContent-Length: "
            + content_length.encode()
            + b"\r\n\r\n"
            + body
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(payload).get("error", {})
    except json.JSONDecodeError:
        return status, {}


# -- Must show 5: who may connect ----------------------------------------------------------


def connect_as_nobody(sock: Path, groups: list[int]) -> subprocess.CompletedProcess[str]:
    code = (
        "import os, socket, sys\n"
        f"os.setgroups({groups!r}); os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({os.fspath(sock)!r})\n"
        "except PermissionError:\n"
        "    print('refused'); sys.exit(0)\n"
        "s.sendall(b'GET /healthz HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "print(s.recv(4096).split(b'\\r\\n')[0].decode())\n"
    )
    return subprocess.run(
        [os.sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )


def test_socket_mode_and_group_decide_who_connects(agent: dict[str, Any]) -> None:
    import grp
    import stat

    info = agent["sock"].stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    users = grp.getgrnam("users").gr_gid
    assert info.st_gid == users
    assert connect_as_nobody(agent["sock"], groups=[]).stdout.strip() == "refused"
    # The same unprivileged user, once in the socket's group, gets in.
    assert connect_as_nobody(agent["sock"], groups=[users]).stdout.strip() == "HTTP/1.1 200 OK"


def test_tcp_needs_the_bearer_token(agent: dict[str, Any]) -> None:
    base = f"http://127.0.0.1:{agent['port']}"
    assert httpx.get(base + "/v1/models").status_code == 401
    wrong = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


# -- the daemon's life: readiness, watchdog, drain, exit codes -----------------------------


def test_watchdog_and_graceful_drain_on_sigterm(long_model_dir: Path, run_dir: Path) -> None:
    sock = run_dir / "drain.sock"
    config = write_config(run_dir / "drain.toml", long_model_dir, sock)
    proc = ManagedProcess(
        [*AGENT, "--config", config],
        notify=True,
        name="agent-drain",
        env={"WATCHDOG_USEC": "100000"},
    )
    with proc:
        proc.wait_ready(notified("READY=1"), timeout=60)
        proc.wait_ready(notified("WATCHDOG=1"), timeout=10)
        s, seen = open_stream(sock, max_tokens=1500)
        proc.send_signal(signal.SIGTERM)
        proc.wait_ready(notified("STOPPING=1"), timeout=10)
        while b"data: [DONE]\n\n" not in seen:
            chunk = s.recv(65536)
            assert chunk, "the stream was cut during the drain"
            seen += chunk
        s.close()
        assert proc.wait_exit(timeout=30) == 0
        assert not sock.exists()
        notes = proc.notifications()
        log_text = proc.read_log()  # the log lives in the process's private directory
    assert notes.index("READY=1") < notes.index("STOPPING=1")
    log = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    requests = [e for e in log if e.get("event") == "request"]
    assert requests, log_text[-3000:]
    assert requests[-1]["peer_uid"] == os.getuid()
    assert requests[-1]["peer_pid"] > 0


@pytest.mark.parametrize(
    ("extra", "env", "code", "names"),
    [
        ("[server.scheduler]\nconcurrency = 0\n", {}, 78, "server.scheduler.concurrency"),
        (
            "",
            {"NANOFLEET_SERVER__LIMITS__BODY_MAX_BYTES": "lots"},
            78,
            "server.limits.body_max_bytes",
        ),
        (
            'tcp_host = "0.0.0.0"\ntcp_port = 8080\ntcp_token_file = "/etc/hostname"\n',
            {},
            78,
            "tcp_host",
        ),
        ("unknown_key = 1\n", {}, 78, "server.unknown_key"),
        ('socket_group = "no-such-group-here"\n', {}, 78, "server.socket_group"),
    ],
)
def test_bad_config_exits_with_the_config_code_naming_the_key(
    long_model_dir: Path, run_dir: Path, extra: str, env: dict[str, str], code: int, names: str
) -> None:
    config = write_config(run_dir / "bad.toml", long_model_dir, run_dir / "bad.sock", extra)
    out = subprocess.run(
        [*AGENT, "--config", os.fspath(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert out.returncode == code
    assert names in out.stderr


def test_bad_model_exits_with_model_invalid(run_dir: Path, long_model_dir: Path) -> None:
    broken = run_dir / "broken-model"
    shutil.copytree(long_model_dir, broken, dirs_exist_ok=True)
    target = next(p for p in broken.iterdir() if p.suffix == ".onnx")
    with target.open("r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    config = write_config(run_dir / "broken.toml", broken, run_dir / "broken.sock")
    out = subprocess.run(
        [*AGENT, "--config", os.fspath(config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 66, out.stderr
    assert "nanofleet-agent:" in out.stderr


# -- The README's device guide, run as written ------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
README_SOCKET = "/run/nanofleet/agent.sock"


def _device_guide() -> tuple[str, str]:
    """The device guide's curl command (continuations joined) and its Python block."""
    guide = README.read_text("utf-8").split("## Device guide", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```sh\n(.*?)```", guide, re.S)
    python = re.search(r"```python\n(.*?)```", guide, re.S)
    assert shell is not None, "the device guide has no sh block"
    assert python is not None, "the device guide has no python block"
    return shell[1].replace("\\\n", " "), python[1]


def test_the_readmes_device_guide_examples_work_as_written(agent: dict[str, Any]) -> None:
    curl, python = _device_guide()
    sock = os.fspath(agent["sock"])
    with client(agent["sock"]) as c:
        served = c.get("/v1/models").json()["data"][0]["id"]
    argv = [a.replace(README_SOCKET, sock) for a in shlex.split(curl)]
    assert argv[0] == "curl"
    out = subprocess.run(
        [argv[0], "-sS", *argv[1:]], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.rstrip().endswith("data: [DONE]"), out[-300:]

    # The Python block names the Nano model's bundle; here the daemon serves a test model.
    code = python.replace(README_SOCKET, sock).replace('"smollm2-135m-q4"', repr(served))
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md (device guide)", "exec"), scope)
    try:
        assert scope["reply"].choices[0].message.content
    finally:
        scope["http"].close()


# -- Serving wins over training: the serving marker ---------------------------------------------


def test_the_serving_marker_exists_exactly_while_a_request_is_served(
    long_model_dir: Path, run_dir: Path
) -> None:
    """On-device training pauses while ``federated.serving_marker`` exists; the daemon must
    create it when a request is admitted and remove it when the last one ends (a stale one,
    left by a crash, is removed at start)."""
    home = run_dir / "marker"
    home.mkdir()
    marker = home / "busy"
    marker.touch()  # left over by a crashed agent
    sock = home / "agent.sock"
    config = write_config(home / "agent.toml", long_model_dir, sock)
    config.write_text(
        config.read_text("utf-8")
        + f'\n[federated]\nsuperlink = "127.0.0.1:9092"\nca_file = "{home}/ca.crt"\n'
        f'node_key_file = "{home}/node.key"\ndata_path = "{home}/texts.sqlite3"\n'
        f'state_dir = "{home}/supernode"\nserving_marker = "{marker}"\n',
        "utf-8",
    )
    with ManagedProcess([*AGENT, "--config", config], notify=True, name="agent") as proc:
        proc.wait_ready(notified("READY=1"), timeout=60)
        # The stale marker is gone (the start-up smoke generation is served too, briefly).
        wait_for(lambda: not marker.exists(), "the stale marker to go")
        s, _ = open_stream(sock)
        try:
            assert marker.exists()
        finally:
            s.close()  # the client leaves: the engine stops within a token
        wait_for(lambda: not marker.exists(), "the marker to go once nothing is served")
        with client(sock) as c:
            c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}).raise_for_status()
        assert not marker.exists()
