"""What the demo started, and waiting on a condition while it all stays alive."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.demo.agents import Child
from coordinator.demo.relay import CountingRelay
from coordinator.errors import CoordinatorError
from coordinator.federation.superlink import SuperLink
from coordinator.local_broker import LocalBroker
from coordinator.processes import descendants, stop_pids

HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.2  # between two checks of a condition


@dataclass
class Fleet:
    """Everything the demo started, in the order it is stopped (the devices' SuperNodes and
    the SuperLink first, then the agents, the coordinator, the broker)."""

    agents: list[Child] = field(default_factory=list)
    coordinator: Child | None = None
    broker: LocalBroker | None = None
    #: ``nanofleet-agent supernode`` of each device (each stops its ``flower-supernode``).
    supernodes: list[Child] = field(default_factory=list)
    #: The ``flower-supernode`` PIDs the supervisors reported, by device.
    flower_pids: dict[str, int] = field(default_factory=dict)
    superlink: SuperLink | None = None
    relays: dict[str, CountingRelay] = field(default_factory=dict)
    #: Children this process had before the demo began: never the demo's to stop.
    before: frozenset[int] = field(default_factory=lambda: frozenset(descendants(os.getpid())))

    def processes(self) -> list[tuple[str, int]]:
        """(name, PID) of every process started (and the SuperNodes the devices started)."""
        out = [(c.name, c.pid) for c in self.supernodes if c.pid is not None]
        out += [(f"{name}-flower-supernode", pid) for name, pid in self.flower_pids.items()]
        if self.superlink is not None and self.superlink.pid is not None:
            out.append(("flower-superlink", self.superlink.pid))
        out += [(a.name, a.pid) for a in self.agents if a.pid is not None]
        if self.coordinator is not None and self.coordinator.pid is not None:
            out.append((self.coordinator.name, self.coordinator.pid))
        if self.broker is not None:
            out.append(("mosquitto", self.broker.pid))
        return out

    def stop(self) -> None:
        """Stop every process by its PID (the relays' threads too).

        The SuperNodes' and the SuperLink's own children (Flower's ClientApp, SuperExec and
        ServerApp processes) are noted first and stopped by PID after their parents, since
        an interrupted run can leave them behind.
        """
        flower = [p for node in self.supernodes if node.pid for p in descendants(node.pid)]
        if self.superlink is not None and self.superlink.pid is not None:
            flower += descendants(self.superlink.pid)
        for node in self.supernodes:
            node.stop()
        if self.superlink is not None:
            self.superlink.stop()
        stop_pids(flower)
        for relay in self.relays.values():
            relay.stop()
        for agent in self.agents:
            agent.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.broker is not None:
            self.broker.stop()
        # Last, anything the demo started that is still running (the `flwr run` client of a
        # round interrupted by Ctrl-C, for one), by PID.
        stop_pids([pid for pid in descendants(os.getpid()) if pid not in self.before])


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
        for child in (*fleet.agents, *fleet.supernodes, fleet.coordinator):
            if child is not None and child.process is not None and child.process.poll() is not None:
                raise CoordinatorError(
                    f"{child.name} exited while waiting for {what}:\n{child.tail()}"
                )
        if time.monotonic() > deadline:
            raise CoordinatorError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)
