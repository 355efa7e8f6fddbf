"""What the link says about the device: pure builders of the status and heartbeat messages.

The daemon gives the link a :data:`StatusProvider`, a callable that returns the device's
current :class:`DeviceState`; the link calls it from its own worker thread (never from
paho's) for the status it publishes on every connect and for each heartbeat. It must be
cheap and thread-safe.

"offline" is never the device's own judgement: the broker publishes it as the Last Will
when the device vanishes, and the link publishes it on a clean stop. A state that claims it
is refused by :func:`build_status`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from protocol.messages import BundleRef, DeviceStatus, Health, Heartbeat, Slot


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The device as the daemon sees it now: the inputs of a status and of a heartbeat."""

    agent_version: str
    health: Health
    base: BundleRef | None
    """The active base bundle; None while none is installed."""
    slot: Slot | None
    """The slot ``base`` runs from; set exactly when ``base`` is."""
    uptime_s: int
    load_1m: float
    free_disk_bytes: int
    adapter: BundleRef | None = None


#: Returns the device's current state; called from the link's worker thread.
StatusProvider = Callable[[], DeviceState]


def build_status(state: DeviceState, now: datetime) -> DeviceStatus:
    """The retained status message for ``state`` at ``now``.

    Raises:
        ValueError: ``state.health`` is offline, or (``pydantic.ValidationError``) a field
            breaks the protocol's bounds (the error names it).
    """
    if state.health is Health.OFFLINE:
        raise ValueError("a device never reports itself offline: the broker's Last Will does")
    return DeviceStatus(
        agent_version=state.agent_version,
        health=state.health,
        base=state.base,
        adapter=state.adapter,
        slot=state.slot,
        uptime_s=state.uptime_s,
        load_1m=state.load_1m,
        free_disk_bytes=state.free_disk_bytes,
        reported_at=now,
    )


def build_heartbeat(state: DeviceState, now: datetime) -> Heartbeat:
    """The heartbeat for ``state`` at ``now``.

    Raises:
        ValueError: ``state.health`` is offline, or a field breaks the protocol's bounds.
    """
    if state.health is Health.OFFLINE:
        raise ValueError("a device never reports itself offline: the broker's Last Will does")
    return Heartbeat(
        health=state.health,
        base_sha256=state.base.sha256 if state.base is not None else None,
        uptime_s=state.uptime_s,
        load_1m=state.load_1m,
        free_disk_bytes=state.free_disk_bytes,
        sent_at=now,
    )


def offline_copy(status: DeviceStatus) -> DeviceStatus:
    """``status`` marked offline: the Last Will registered after publishing ``status``.

    It keeps ``reported_at``: the will says what the device last reported, not when it
    vanished (the coordinator takes that from when the will arrives).
    """
    return status.model_copy(update={"health": Health.OFFLINE})
