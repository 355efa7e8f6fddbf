"""The pure parts of the device's MQTT link: backoff, schedule, inbound decoding, queue,
status messages."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from agent.mqtt._inbound import (
    AnnouncementReceived,
    BoundedQueue,
    DropReason,
    Rejected,
    decode_message,
    routes_for,
)
from agent.mqtt._policy import Backoff, Schedule, Task, reconnect_delay
from agent.mqtt._status import DeviceState, build_heartbeat, build_status, offline_copy
from protocol import topics
from protocol.messages import MAX_PAYLOAD_BYTES, BundleRef, Health, ReleaseAnnouncement, Slot

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_reconnect_delays_stay_in_a_doubling_window() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        cap = min(30.0, 1.0 * 2 ** (attempt + 1))
        for _ in range(50):
            assert 1.0 <= reconnect_delay(attempt, rng, min_s=1.0, max_s=30.0) <= cap


def test_devices_that_lost_the_broker_together_spread_out() -> None:
    firsts = {
        round(Backoff(random.Random(seed), min_s=1.0, max_s=60.0).failed(), 3)
        for seed in range(100)
    }
    assert len(firsts) > 90  # not in lockstep


def test_backoff_starts_over_after_a_success() -> None:
    b = Backoff(random.Random(3), min_s=1.0, max_s=1000.0)
    for _ in range(8):
        b.failed()
    assert b.attempt == 8
    b.succeeded()
    assert b.attempt == 0
    assert b.failed() <= 2.0


@pytest.mark.parametrize(("min_s", "max_s"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_backoff_refuses_bad_bounds(min_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="min_s"):
        Backoff(random.Random(0), min_s=min_s, max_s=max_s)


def test_schedule_status_then_heartbeats_only_while_connected() -> None:
    s = Schedule(10.0)
    s.on_held()
    assert s.take(0.0) == []  # disconnected: nothing, and no wait deadline
    assert s.wait_s(0.0) is None
    s.on_connect(100.0)
    assert s.take(100.0) == [Task.ONLINE, Task.HEARTBEAT]
    assert s.take(105.0) == []
    assert s.wait_s(105.0) == pytest.approx(5.0)
    assert s.take(110.0) == [Task.HEARTBEAT]
    s.on_changed()
    assert s.wait_s(111.0) == 0.0
    assert s.take(111.0) == [Task.ONLINE]
    assert s.take(500.0) == [Task.HEARTBEAT]  # missed beats are skipped, not burst
    assert s.take(500.0) == []
    s.on_disconnect()
    assert s.take(1000.0) == []


def _announcement(group: str, channel: str = "stable") -> bytes:
    return (
        ReleaseAnnouncement(
            group=group,
            channel=channel,
            repository_url="https://repo.example/fleet",
            timestamp_version=4,
            published_at=NOW,
        )
        .model_dump_json()
        .encode()
    )


ROUTES = routes_for(["lab"], ["stable", "beta"], rounds=True, device_id="dev-a")
LAB = topics.release_announcements("lab", "stable")
MINE = topics.device_releases("dev-a")


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (topics.release_announcements("other", "stable"), _announcement("other"), "unexpected"),
        (LAB, b"", DropReason.EMPTY),
        (LAB, b"x" * (MAX_PAYLOAD_BYTES + 1), DropReason.OVERSIZE),
        (LAB, b"{", DropReason.MALFORMED),
        (LAB, _announcement("lab")[:-1] + b',"extra":1}', DropReason.MALFORMED),
        (LAB, _announcement("lab", "beta"), DropReason.MISMATCHED),
        (LAB, _announcement("other"), DropReason.MISMATCHED),
        (topics.device_releases("dev-b"), _announcement("dev-b"), "unexpected"),
        (MINE, _announcement("lab"), DropReason.MISMATCHED),
        (MINE, _announcement("dev-b"), DropReason.MISMATCHED),
    ],
)
def test_bad_messages_become_a_named_rejection(topic: str, payload: bytes, reason: str) -> None:
    out = decode_message(ROUTES, topic, payload, retained=False, received_at=NOW)
    assert isinstance(out, Rejected)
    expected = DropReason.UNEXPECTED_TOPIC if reason == "unexpected" else reason
    assert out.reason is expected


@pytest.mark.parametrize("channel", ["stable", "canary"])
def test_a_wave_announcement_on_the_devices_own_topic_becomes_an_event(channel: str) -> None:
    """A rollout wave names the device id; the channel is checked by the OTA controller."""
    payload = _announcement("dev-a", channel)
    out = decode_message(ROUTES, MINE, payload, retained=False, received_at=NOW)
    assert isinstance(out, AnnouncementReceived)
    assert (out.announcement.group, out.announcement.channel) == ("dev-a", channel)


def test_a_good_announcement_becomes_an_event() -> None:
    out = decode_message(ROUTES, LAB, _announcement("lab"), retained=True, received_at=NOW)
    assert isinstance(out, AnnouncementReceived)
    assert out.retained
    assert out.announcement.group == "lab"


def test_the_queue_never_blocks_and_drops_the_oldest() -> None:
    q: BoundedQueue[int] = BoundedQueue(2)
    assert q.put(1)
    assert q.put(2)
    assert not q.put(3)
    assert q.dropped == 1
    assert q.drain() == [2, 3]
    assert q.get(timeout_s=0) is None


def _device_state(health: Health) -> DeviceState:
    return DeviceState(
        agent_version="0.1.0",
        health=health,
        base=BundleRef(name="tiny", version="1", sha256="ab" * 32),
        slot=Slot.A,
        uptime_s=1,
        load_1m=0.5,
        free_disk_bytes=10,
    )


def test_a_device_never_reports_itself_offline() -> None:
    with pytest.raises(ValueError, match="Last Will"):
        build_status(_device_state(Health.OFFLINE), NOW)
    with pytest.raises(ValueError, match="Last Will"):
        build_heartbeat(_device_state(Health.OFFLINE), NOW)


def test_the_will_is_the_last_status_marked_offline() -> None:
    status = build_status(_device_state(Health.HEALTHY), NOW)
    will = offline_copy(status)
    assert will.health is Health.OFFLINE
    assert will.reported_at == status.reported_at
    assert will.base == status.base
    beat = build_heartbeat(_device_state(Health.HEALTHY), NOW)
    assert beat.base_sha256 == "ab" * 32
