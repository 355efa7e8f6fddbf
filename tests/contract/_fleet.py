"""Builders of device messages and small fleet scenarios for the contract suite."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from coordinator.registry import Ingest, Registry, ReleaseView
from coordinator.rollout.policy import decide
from protocol.messages import (
    BundleRef,
    DeviceStatus,
    Health,
    Heartbeat,
    Slot,
    UpdateProgress,
    UpdateState,
)

SHA_A = "a" * 64


def status(
    at: datetime,
    *,
    health: Health = Health.HEALTHY,
    version: str = "1.0.0",
    sha: str = SHA_A,
    agent: str = "0.1.0",
) -> DeviceStatus:
    return DeviceStatus(
        agent_version=agent,
        health=health,
        base=BundleRef(name="smollm2-135m", version=version, sha256=sha),
        slot=Slot.A,
        uptime_s=100,
        load_1m=0.5,
        free_disk_bytes=10**9,
        reported_at=at,
    )


def heartbeat(at: datetime, *, uptime_s: int = 100, health: Health = Health.HEALTHY) -> Heartbeat:
    return Heartbeat(
        health=health,
        base_sha256=SHA_A,
        uptime_s=uptime_s,
        load_1m=0.25,
        free_disk_bytes=10**9,
        sent_at=at,
    )


def progress(
    at: datetime,
    state: UpdateState,
    *,
    target: BundleRef | None = None,
    error: str | None = None,
) -> UpdateProgress:
    failed = state in (UpdateState.FAILED, UpdateState.ROLLED_BACK)
    return UpdateProgress(
        state=state,
        target=target,
        timestamp_version=None,
        bytes_done=0,
        bytes_total=0,
        error_code=(error or "health_check_failed") if failed else None,
        at=at,
    )


def register(registry: Registry, ids: Sequence[str], group: str = "edge") -> None:
    for device_id in ids:
        registry.register_device(device_id, groups=[group], actor="op")


def target_of(release: ReleaseView) -> BundleRef:
    return BundleRef(name=release.name, version=release.version, sha256=release.bundle_sha256)


def report_all(
    registry: Registry,
    devices: Sequence[str],
    state: UpdateState,
    now: datetime,
    release: ReleaseView,
) -> None:
    """Every device in ``devices`` reports ``state`` for ``release`` at ``now``."""
    target = target_of(release)
    results = registry.ingest([(d, progress(now, state, target=target), now) for d in devices])
    assert set(results) == {Ingest.APPLIED}, results


def run_to_completion(registry: Registry, rollout_id: int, now: datetime) -> None:
    """Drive a single-wave, no-soak rollout to completed: start, all commit, pass, complete."""
    decision, release = registry.step(rollout_id, decide)
    devices = getattr(decision, "devices", ())
    assert devices, decision
    report_all(registry, devices, UpdateState.COMMITTED, now, release)
    kinds = [type(registry.step(rollout_id, decide)[0]).__name__ for _ in range(2)]
    assert kinds == ["PassWave", "Complete"], kinds
