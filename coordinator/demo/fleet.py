"""What the demo started, and waiting on a condition while it all stays alive."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.demo.agents import Child
from coordinator.errors import CoordinatorError
from coordinator.local_broker import LocalBroker

HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.2  # between two checks of a condition


@dataclass
class Fleet:
    """Everything the demo started, in the order it is stopped (agents first)."""

    agents: list[Child] = field(default_factory=list)
    coordinator: Child | None = None
    broker: LocalBroker | None = None

    def processes(self) -> list[tuple[str, int]]:
        """(name, PID) of every process started."""
        out = [(a.name, a.pid) for a in self.agents if a.pid is not None]
        if self.coordinator is not None and self.coordinator.pid is not None:
            out.append((self.coordinator.name, self.coordinator.pid))
        if self.broker is not None:
            out.append(("mosquitto", self.broker.pid))
        return out

    def stop(self) -> None:
        """Stop every process by its PID."""
        for agent in self.agents:
            agent.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.broker is not None:
            self.broker.stop()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def poll(cond: Callable[[], bool], what: str, timeout_s: float, fleet: Fleet) -> None:
    """Wait until ``cond()`` while every started process stays alive."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        for child in (*fleet.agents, fleet.coordinator):
            if child is not None and child.process is not None and child.process.poll() is not None:
                raise CoordinatorError(
                    f"{child.name} exited while waiting for {what}:\n{child.tail()}"
                )
        if time.monotonic() > deadline:
            raise CoordinatorError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)
