"""Devices on both backends: registration, listing and filters, and idempotent, ordered
ingestion of status, heartbeat and Last Will messages."""

from __future__ import annotations

from datetime import timedelta

import pytest

from coordinator.errors import RefusedError
from coordinator.registry import (
    MAX_BATCH,
    DeviceFilter,
    Ingest,
    NotFoundError,
    Online,
    Registry,
)
from protocol.messages import Health
from tests.contract._fleet import SHA_A, heartbeat, register, status
from tests.support.db_fixtures import ManualClock


def test_register_get_and_update(registry: Registry, clock: ManualClock) -> None:
    created = registry.register_device("dev-1", groups=["edge", "eu"], tags=["canary"], actor="op")
    assert created.groups == ("edge", "eu")
    assert created.tags == ("canary",)
    assert created.registered_at == clock.now
    assert created.online is Online.UNKNOWN
    assert created.last_seen is None
    clock.advance(60)
    updated = registry.register_device("dev-1", groups=["eu"], actor="op2")
    assert updated.groups == ("eu",)
    assert updated.tags == ()
    assert updated.registered_at == created.registered_at
    assert registry.get_device("dev-1") == updated
    actions = [(a.actor, a.action, a.subject) for a in registry.list_audit()]
    assert actions == [("op2", "device.update", "dev-1"), ("op", "device.register", "dev-1")]


def test_unknown_device(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="unknown device 'ghost'"):
        registry.get_device("ghost")
    with pytest.raises(NotFoundError, match="unknown device 'ghost'"):
        registry.device_updates("ghost")


@pytest.mark.parametrize(
    ("device_id", "groups", "tags", "phrase"),
    [
        ("a/b", (), (), "device_id 'a/b' contains '/'"),
        ("", (), (), "device_id is empty"),
        ("x" * 65, (), (), "over the limit of 64"),
        ("dev-1", ("eu+",), (), "group 'eu\\+' contains '\\+'"),
        ("dev-1", (), ("#",), "tag '#' contains '#'"),
    ],
)
def test_bad_names_refused(
    registry: Registry, device_id: str, groups: tuple[str, ...], tags: tuple[str, ...], phrase: str
) -> None:
    with pytest.raises(RefusedError, match=phrase):
        registry.register_device(device_id, groups=groups, tags=tags, actor="op")


def test_list_filters_and_counts(registry: Registry, clock: ManualClock) -> None:
    register(registry, ["a1", "a2", "a3"], group="alpha")
    register(registry, ["b1", "b2"], group="beta")
    registry.register_device("b2", groups=["beta"], tags=["canary"], actor="op")
    now = clock.now
    registry.ingest(
        [
            ("a1", status(now, health=Health.DEGRADED), now),
            ("b1", status(now, sha="b" * 64), now),
        ]
    )

    def ids(**kw: object) -> list[str]:
        return [d.id for d in registry.list_devices(DeviceFilter(**kw))]  # type: ignore[arg-type]

    assert ids() == ["a1", "a2", "a3", "b1", "b2"]
    assert ids(group="beta") == ["b1", "b2"]
    assert ids(tag="canary") == ["b2"]
    assert ids(health=Health.DEGRADED) == ["a1"]
    assert ids(base_sha256="b" * 64) == ["b1"]
    assert ids(group="alpha", limit=2, offset=1) == ["a2", "a3"]
    assert ids(online=Online.ONLINE) == []
    assert registry.count_devices() == {Online.UNKNOWN: 5, Online.ONLINE: 0, Online.OFFLINE: 0}
    assert registry.count_devices(DeviceFilter(group="beta"))[Online.UNKNOWN] == 2
    for bad in (DeviceFilter(limit=0), DeviceFilter(limit=1001), DeviceFilter(offset=-1)):
        with pytest.raises(RefusedError, match=r"limit|offset"):
            registry.list_devices(bad)


def test_status_is_ordered_by_its_timestamp(registry: Registry, clock: ManualClock) -> None:
    register(registry, ["dev-1"])
    t = clock.now
    newer = status(t, version="2.0.0")
    older = status(t - timedelta(seconds=5), version="1.0.0")
    assert registry.ingest([("dev-1", newer, t)]) == [Ingest.APPLIED]
    assert registry.ingest([("dev-1", older, t)]) == [Ingest.STALE]
    assert registry.ingest([("dev-1", newer, t)]) == [Ingest.STALE]  # a duplicate changes nothing
    device = registry.get_device("dev-1")
    assert device.base is not None
    assert device.base.version == "2.0.0"
    assert device.base.sha256 == SHA_A
    assert device.health is Health.HEALTHY
    assert device.agent_version == "0.1.0"
    assert device.status_at == t


def test_future_device_clock_is_clamped(registry: Registry, clock: ManualClock) -> None:
    register(registry, ["dev-1"])
    t = clock.now
    ahead = status(t + timedelta(days=1), version="1.0.0")
    assert registry.ingest([("dev-1", ahead, t)]) == [Ingest.APPLIED]
    assert registry.get_device("dev-1").status_at == t + timedelta(minutes=5)
    later = clock.advance(6 * 60)  # the device's clock was fixed; its next status gets through
    assert registry.ingest([("dev-1", status(later, version="1.1.0"), later)]) == [Ingest.APPLIED]


def test_last_will_is_a_hint(registry: Registry, clock: ManualClock) -> None:
    register(registry, ["dev-1"])
    t = clock.now
    registry.ingest([("dev-1", status(t), t)])
    will = status(t - timedelta(hours=1), health=Health.OFFLINE)  # registered at connect time
    later = clock.advance(30)
    assert registry.ingest([("dev-1", will, later)]) == [Ingest.APPLIED]
    device = registry.get_device("dev-1")
    assert device.health is Health.HEALTHY  # the status itself is untouched
    assert device.status_at == t


def test_heartbeats_latest_wins_and_last_seen_moves_forward(
    registry: Registry, clock: ManualClock
) -> None:
    register(registry, ["dev-1"])
    t0 = clock.now
    assert registry.ingest([("dev-1", heartbeat(t0, uptime_s=10), t0)]) == [Ingest.APPLIED]
    t1 = clock.advance(30)
    late = heartbeat(t0 - timedelta(seconds=30), uptime_s=5)  # delayed in a queue
    assert registry.ingest([("dev-1", late, t1)]) == [Ingest.STALE]
    assert registry.get_device("dev-1").last_seen == t1  # it still proves the device is alive
    t2 = clock.advance(30)
    assert registry.ingest([("dev-1", heartbeat(t2, uptime_s=70), t0)]) == [Ingest.APPLIED]
    assert registry.get_device("dev-1").last_seen == t1  # an older receive time never goes back


def test_heartbeat_history_is_hourly_counters(registry: Registry, clock: ManualClock) -> None:
    register(registry, ["dev-1", "dev-2"])
    start = clock.now
    for i in range(240):  # two hours of beats every 30 s
        now = start + timedelta(seconds=30 * i)
        assert registry.ingest([("dev-1", heartbeat(now), now)]) == [Ingest.APPLIED]
    history = registry.heartbeat_history("dev-1", since=start)
    assert history == [(start, 120), (start + timedelta(hours=1), 120)]
    assert registry.heartbeat_history("dev-2", since=start) == []
    clock.advance(3 * 3600)
    assert registry.prune_heartbeat_history(keep=timedelta(hours=2)) == 1
    assert registry.heartbeat_history("dev-1", since=start) == [(start + timedelta(hours=1), 120)]


def test_unknown_devices_and_batches(registry: Registry, clock: ManualClock) -> None:
    register(registry, ["dev-1"])
    now = clock.now
    results = registry.ingest(
        [
            ("ghost", heartbeat(now), now),
            ("dev-1", heartbeat(now), now),
            ("ghost", status(now), now),
        ]
    )
    assert results == [Ingest.UNKNOWN_DEVICE, Ingest.APPLIED, Ingest.UNKNOWN_DEVICE]
    assert registry.ingest([]) == []
    with pytest.raises(RefusedError, match=f"over the limit of {MAX_BATCH}"):
        registry.ingest([("dev-1", heartbeat(now), now)] * (MAX_BATCH + 1))
