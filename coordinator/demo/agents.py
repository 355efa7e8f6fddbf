"""The demo's child processes and how it talks to an agent over its socket.

:class:`Child` is one process the demo started: its output goes to a log file, and it is
stopped by its PID only (SIGTERM, then SIGKILL after a grace period). The demo never
imports the agent: it drives it as an operator would, through ``nanofleet-agent`` and the
agent's Unix socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coordinator.errors import ConfigError, TransientError

#: After SIGTERM a child gets this long to drain before SIGKILL.
STOP_GRACE_S = 15.0
#: Between two checks of a readiness condition.
POLL_S = 0.1


@dataclass
class Child:
    """One process started by the demo, its log and how to stop it."""

    name: str
    argv: Sequence[str]
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The PID, once started."""
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start the process, its output appended to :attr:`log`."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                list(self.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,  # a Ctrl-C in the terminal is for the demo only
            )

    def tail(self, lines: int = 15) -> str:
        """The last lines of the log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_until(self, ready: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Return once ``ready()`` is true.

        Raises:
            TransientError: the process exited, or ``ready`` stayed false for ``timeout_s``;
                the message carries the tail of the log.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TransientError(
                    f"{self.name} exited with status {self.process.returncode}:\n{self.tail()}"
                )
            if ready():
                return
            if self.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(POLL_S)
        raise TransientError(f"{self.name}: no {what} after {timeout_s:.0f} s:\n{self.tail()}")

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to end by itself; return its exit status.

        Raises:
            TransientError: it did not end in ``timeout_s`` (it is then stopped).
        """
        if self.process is None:
            raise TransientError(f"{self.name} was never started")
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            self.stop()
            raise TransientError(f"{self.name} did not finish in {timeout_s:.0f} s") from e

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """Stop the process by its PID: SIGTERM, then SIGKILL after ``grace_s``."""
        proc = self.process
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


def command(name: str) -> str:
    """The path of the console script ``name`` (next to this Python, else on PATH).

    Raises:
        ConfigError: it is not installed.
    """
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed (run scripts/bootstrap.sh)")
    return found


def _client(sock: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent", timeout=120.0
    )


def agent_ready(sock: Path) -> Callable[[], bool]:
    """A condition: the agent at ``sock`` answers ``GET /readyz`` with 200."""

    def check() -> bool:
        if not sock.exists():
            return False
        with contextlib.suppress(httpx.HTTPError), _client(sock) as client:
            return client.get("/readyz").status_code == 200
        return False

    return check


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
    """What the agent at ``sock`` says it serves (the first entry of ``GET /v1/models``).

    Raises:
        TransientError: the agent did not answer.
    """
    try:
        with _client(sock) as client:
            data: dict[str, Any] = client.get("/v1/models").json()["data"][0]
            return data
    except httpx.HTTPError as e:
        raise TransientError(f"the agent at {sock} did not answer: {e}") from e


def wait_for_interrupt() -> None:
    """Block until Ctrl-C (or a SIGTERM turned into KeyboardInterrupt by the caller)."""
    stop = threading.Event()
    with contextlib.suppress(KeyboardInterrupt):
        while not stop.wait(0.5):
            pass
