"""Processes below a process: found through Linux ``/proc``, stopped by PID.

A child stopped by PID may leave its own children running (Flower's SuperLink starts
``flower-superexec`` and ``flwr-serverapp``; a SuperNode starts ClientApp processes). Their
PIDs are read while the child still runs, then stopped after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["descendants", "is_running", "stop_pids"]

POLL_S: Final = 0.1


def descendants(pid: int) -> list[int]:
    """The PIDs of the processes below ``pid`` (Linux ``/proc``), parents before children."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            stack += kids
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_pids(pids: Sequence[int], grace_s: float = 5.0) -> None:
    """Stop the processes ``pids`` that still run: SIGTERM, then SIGKILL after ``grace_s``.

    For what a stopped child leaves behind (its own children), found with
    :func:`descendants` while the child still ran.
    """
    alive = [pid for pid in pids if is_running(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_S)
        alive = [pid for pid in alive if is_running(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
