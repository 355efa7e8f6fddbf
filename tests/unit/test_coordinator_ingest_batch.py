"""Heartbeats applied per batch (a few statements per batch, not three per message) give
the same results as one at a time, on SQLite and PostgreSQL: within a batch an older or
duplicate heartbeat is stale, the newest is stored, every one is counted, ``last_seen`` is
the latest receive time; batches larger than one multi-row statement work."""

from __future__ import annotations

from datetime import timedelta

from coordinator.registry import Ingest, Registry
from coordinator.registry.api import MAX_BATCH
from tests.contract._fleet import heartbeat, register, status
from tests.support.db_fixtures import ManualClock


def test_heartbeats_in_one_batch_are_judged_in_order(
    registry: Registry, clock: ManualClock
) -> None:
    register(registry, ["dev-1", "dev-2"])
    t0 = clock.now
    assert registry.ingest([("dev-1", heartbeat(t0 + timedelta(seconds=5)), t0)]) == [
        Ingest.APPLIED
    ]
    t1 = clock.advance(60)
    batch = [
        ("dev-1", heartbeat(t0 + timedelta(seconds=2), uptime_s=1), t1),  # older than stored
        ("dev-1", heartbeat(t0 + timedelta(seconds=30), uptime_s=30), t1),
        ("dev-2", status(t0), t1),
        ("dev-1", heartbeat(t0 + timedelta(seconds=20), uptime_s=20), t1),  # older than the last
        ("dev-1", heartbeat(t0 + timedelta(seconds=40), uptime_s=40), t1 + timedelta(seconds=1)),
        ("dev-1", heartbeat(t0 + timedelta(seconds=40), uptime_s=41), t1),  # a duplicate
        ("ghost", heartbeat(t0), t1),
        ("dev-2", heartbeat(t0), t1),
    ]
    assert registry.ingest(batch) == [
        Ingest.STALE,
        Ingest.APPLIED,
        Ingest.APPLIED,
        Ingest.STALE,
        Ingest.APPLIED,
        Ingest.STALE,
        Ingest.UNKNOWN_DEVICE,
        Ingest.APPLIED,
    ]
    dev1 = registry.get_device("dev-1")
    assert dev1.last_seen == t1 + timedelta(seconds=1)
    assert registry.get_device("dev-2").last_seen == t1
    assert registry.get_device("dev-2").agent_version == "0.1.0"
    counted = sum(n for _, n in registry.heartbeat_history("dev-1", since=t0))
    assert counted == 6
    # The stored heartbeat is the newest: a later one older than it is stale.
    late = [("dev-1", heartbeat(t0 + timedelta(seconds=35)), t1)]
    assert registry.ingest(late) == [Ingest.STALE]


def test_a_full_batch_of_heartbeats_is_written(registry: Registry, clock: ManualClock) -> None:
    devices = [f"d-{i:04d}" for i in range(1200)]
    register(registry, devices)
    t = clock.now
    batch = [(d, heartbeat(t + timedelta(seconds=k)), t) for k in range(2) for d in devices]
    batch += [(devices[0], heartbeat(t - timedelta(seconds=1)), t)] * (MAX_BATCH - len(batch))
    results = registry.ingest(batch)
    assert results.count(Ingest.APPLIED) == 2 * len(devices)
    assert results.count(Ingest.STALE) == MAX_BATCH - 2 * len(devices)
    assert all(registry.get_device(d).last_seen == t for d in (devices[0], devices[-1]))
    assert sum(n for _, n in registry.heartbeat_history(devices[0], since=t)) == (
        2 + MAX_BATCH - 2 * len(devices)
    )
    # Every multi-row statement was written: each device's stored heartbeat is its newest.
    late = [(d, heartbeat(t + timedelta(milliseconds=500)), t) for d in devices]
    assert set(registry.ingest(late)) == {Ingest.STALE}
