"""The demo's helpers: the byte-counting relay, the clean-up of processes Flower leaves behind,
and the check of the devices' figures against the round's."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.demo.relay import CountingRelay
from coordinator.processes import descendants, stop_pids


@pytest.fixture
def echo() -> Iterator[int]:
    """A loopback server that answers every chunk with the chunk twice."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data * 2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()
    thread.join(2)


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while len(got) < 2 * len(payload):
            got += s.recv(65536)
        return got


def test_the_relay_forwards_unchanged_and_counts_each_direction(echo: int) -> None:
    relay = CountingRelay(("127.0.0.1", echo)).start()
    try:
        assert _exchange(relay.port, b"x" * 1000) == b"x" * 2000
        assert _exchange(relay.port, b"yz" * 50) == b"yz" * 100
        deadline = time.monotonic() + 5
        while relay.received < 2200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (relay.sent, relay.received) == (1100, 2200)
    finally:
        relay.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=1).close()


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def test_stop_pids_ends_what_a_stopped_parent_left_behind() -> None:
    parent = subprocess.Popen(["bash", "-c", "sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 5
        while not descendants(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        (child,) = descendants(parent.pid)
        parent.kill()
        parent.wait()
        assert _alive(child)  # orphaned, still running
        stop_pids([child], grace_s=2)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_the_demo_says_whether_the_devices_figures_are_the_rounds() -> None:
    from coordinator.demo.federation import DeviceRound, _agreement

    devices = {n: DeviceRound(n, perplexity=p) for n, p in (("a", 36.4), ("b", 69.7), ("c", 57.3))}
    same = _agreement(devices, [{"device_perplexity": [36.4, 57.3, 69.7]}])
    assert same.startswith("each device's held-out perplexity with the adapter is the one")
    differs = _agreement(devices, [{"device_perplexity": [36.5, 57.3, 69.7]}])
    assert "measured 36.400, 57.300, 69.700; the round's evaluate step reported 36.500" in differs
    assert "evaluate step reported [/yellow]" in _agreement(devices, [])
