"""The daemon keeps serving and drains when its service manager stops reading notifications.

A datagram socket holds a handful of unread datagrams (``net.unix.max_dgram_qlen``, 10 by
default); a sender that blocks on a full queue would freeze the event loop, and with it
every request and the drain on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.processes import ManagedProcess, notified

AGENT = [os.fspath(Path(os.sys.executable).parent / "nanofleet-agent"), "run"]


def poll(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_unread_watchdog_pings_neither_block_requests_nor_the_drain(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "agent.sock"
    config = tmp_path / "agent.toml"
    config.write_text(f'[model]\ndir = "{tiny_model_dir}"\n[server]\nsocket_path = "{sock}"\n')
    proc = ManagedProcess(
        [*AGENT, "--config", config],
        notify=True,
        name="agent-notify",
        env={"WATCHDOG_USEC": "20000"},  # a ping every 10 ms
    )
    with proc:
        proc.wait_ready(notified("READY=1"), timeout=60)
        # From here on nobody reads the notify socket: its queue fills within ~0.1 s.
        poll(lambda: "watchdog_dropped" in proc.read_log(), "a dropped watchdog ping")
        transport = httpx.HTTPTransport(uds=os.fspath(sock))
        with httpx.Client(transport=transport, base_url="http://agent", timeout=10) as c:
            assert c.get("/healthz").status_code == 200
            r = c.post(
                "/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0}
            )
            assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait_exit(timeout=30) == 0
        log = proc.read_log()
    # Dropping is logged once per run of drops, not once per ping.
    assert log.count('"watchdog_dropped"') == 1, log[-3000:]
