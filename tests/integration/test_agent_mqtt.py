"""The device's MQTT link against real mosquitto under mTLS with the fleet's ACLs.

The link runs in this process with a device certificate of the broker's fleet; a
coordinator client (its own certificate) watches the device topics and publishes
announcements. Nothing sleeps: every wait is on a condition with a deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttSettings
from agent.errors import ConfigError
from agent.mqtt import AnnouncementReceived, DeviceLink, DeviceState
from agent.mqtt._policy import reconnect_delay
from coordinator import pki
from protocol import topics
from protocol.messages import (
    BundleRef,
    DeviceStatus,
    Health,
    Heartbeat,
    ReleaseAnnouncement,
    Slot,
    UpdateProgress,
    UpdateState,
)
from tests.support.mosquitto import DEVICE_A, DEVICE_B, GROUP_A, GROUP_B, TlsBroker
from tests.support.mqtt_client import RecordingClient
from tests.support.processes import free_port

BASE = BundleRef(name="tiny-llama", version="1", sha256="ab" * 32)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _state() -> DeviceState:
    return DeviceState(
        agent_version="0.1.0",
        health=Health.HEALTHY,
        base=BASE,
        slot=Slot.A,
        uptime_s=5,
        load_1m=0.1,
        free_disk_bytes=1 << 30,
    )


def _settings(broker: TlsBroker, device: str = DEVICE_A, **overrides: object) -> MqttSettings:
    ident = broker.identities[device]
    values: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "device_id": device,
        "groups": [GROUP_A if device == DEVICE_A else GROUP_B],
        "ca_file": broker.ca_file,
        "cert_file": ident.cert_file,
        "key_file": ident.key_file,
        "heartbeat_interval_s": 0.2,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
    }
    values.update(overrides)
    return MqttSettings.model_validate(values)


def _announcement(group: str, version: int) -> bytes:
    return (
        ReleaseAnnouncement(
            group=group,
            channel="stable",
            repository_url="http://127.0.0.1:1/repo",
            timestamp_version=version,
            published_at=NOW,
        )
        .model_dump_json()
        .encode()
    )


def _progress(state: UpdateState, done: int) -> UpdateProgress:
    return UpdateProgress(
        state=state,
        target=BASE,
        timestamp_version=3,
        bytes_done=done,
        bytes_total=100,
        at=NOW,
    )


def _accepted(code: ReasonCode | None) -> None:
    """A PUBACK that is not a refusal ("no matching subscribers" is not one)."""
    assert code is not None
    assert not code.is_failure, code


def _wait(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def coordinator(mosquitto_tls: TlsBroker) -> Iterator[RecordingClient]:
    b = mosquitto_tls
    with RecordingClient(
        b.host, b.port, pki.COORDINATOR_IDENTITY, context=b.context(pki.COORDINATOR_IDENTITY)
    ) as client:
        for f in topics.COORDINATOR_FILTERS:
            client.subscribe(f)
        yield client


def _statuses(client: RecordingClient, device: str) -> list[DeviceStatus]:
    topic = topics.device_status(device)
    return [
        DeviceStatus.model_validate_json(m.payload) for m in client.messages if m.topic == topic
    ]


def test_status_heartbeats_and_a_clean_stop_that_says_offline(
    mosquitto_tls: TlsBroker, coordinator: RecordingClient
) -> None:
    link = DeviceLink(_settings(mosquitto_tls), _state)
    link.start()
    try:
        assert link.wait_connected(10)
        status = DeviceStatus.model_validate_json(
            coordinator.expect(topics.device_status(DEVICE_A)).payload
        )
        assert status.health is Health.HEALTHY
        assert status.base == BASE
        assert status.slot is Slot.A
        beats = topics.device_heartbeat(DEVICE_A)
        _wait(lambda: sum(m.topic == beats for m in coordinator.messages) >= 3, "3 heartbeats")
        beat = next(m for m in coordinator.messages if m.topic == beats)
        assert Heartbeat.model_validate_json(beat.payload).base_sha256 == BASE.sha256
    finally:
        link.stop()
    _wait(
        lambda: any(s.health is Health.OFFLINE for s in _statuses(coordinator, DEVICE_A)),
        "the offline status",
    )
    # It is retained: a client that comes later reads the device as offline.
    b = mosquitto_tls
    with RecordingClient(
        b.host, b.port, pki.COORDINATOR_IDENTITY, context=b.context(pki.COORDINATOR_IDENTITY)
    ) as late:
        late.subscribe(topics.device_status(DEVICE_A))
        retained = late.expect(topics.device_status(DEVICE_A))
        assert retained.retain
        assert DeviceStatus.model_validate_json(retained.payload).health is Health.OFFLINE


def test_the_last_will_marks_a_vanished_device_offline(
    mosquitto_tls: TlsBroker, coordinator: RecordingClient
) -> None:
    link = DeviceLink(_settings(mosquitto_tls, keepalive_s=5), _state)
    link.start()
    try:
        assert link.wait_connected(10)
        coordinator.expect(topics.device_status(DEVICE_A))
        # Cut the TCP connection under paho, as a power cut would: no DISCONNECT is sent.
        sock = link._client.socket()
        assert sock is not None
        sock.shutdown(2)
        _wait(
            lambda: any(s.health is Health.OFFLINE for s in _statuses(coordinator, DEVICE_A)),
            "the Last Will",
        )
        # And the link comes back on its own with a fresh, healthy status.
        _wait(lambda: link.stats().connects >= 2, "the reconnect")
        _wait(
            lambda: _statuses(coordinator, DEVICE_A)[-1].health is Health.HEALTHY,
            "a healthy status after the reconnect",
        )
    finally:
        link.stop()


def test_announcements_of_its_groups_reach_the_queue_and_nothing_else(
    mosquitto_tls: TlsBroker, coordinator: RecordingClient
) -> None:
    retained = topics.release_announcements(GROUP_A, "stable")
    _accepted(coordinator.publish(retained, _announcement(GROUP_A, 7), retain=True))
    # Another group's announcement, and a message naming another group on this topic.
    other = topics.release_announcements(GROUP_B, "stable")
    _accepted(coordinator.publish(other, _announcement(GROUP_B, 8), retain=True))
    link = DeviceLink(_settings(mosquitto_tls), _state)
    link.start()
    try:
        first = link.events.get(timeout_s=10)
        assert isinstance(first, AnnouncementReceived)
        assert first.retained
        assert first.announcement.timestamp_version == 7
        _accepted(coordinator.publish(retained, _announcement(GROUP_B, 9)))  # mismatched
        _accepted(coordinator.publish(retained, b"{not json"))
        _accepted(coordinator.publish(retained, _announcement(GROUP_A, 10)))
        live = link.events.get(timeout_s=10)
        assert isinstance(live, AnnouncementReceived)
        assert not live.retained
        assert live.announcement.timestamp_version == 10
        assert link.stats().rejected == 2
        assert link.events.get(timeout_s=0) is None
    finally:
        link.stop()


def test_progress_made_while_away_is_held_and_sent_in_order(
    mosquitto_tls: TlsBroker, coordinator: RecordingClient
) -> None:
    link = DeviceLink(_settings(mosquitto_tls, outbox_length_max=3), _state)
    for i, state in enumerate(
        [UpdateState.FETCHING, UpdateState.FETCHING, UpdateState.VERIFIED, UpdateState.STAGED]
    ):
        link.publish_progress(_progress(state, 25 * (i + 1)))
    assert link.stats().progress_dropped == 1  # the oldest went to make room
    link.start()
    try:
        topic = topics.update_progress(DEVICE_A)
        _wait(lambda: sum(m.topic == topic for m in coordinator.messages) >= 3, "3 progress")
        link.publish_progress(_progress(UpdateState.ACTIVATING, 100))
        _wait(lambda: sum(m.topic == topic for m in coordinator.messages) >= 4, "4 progress")
        got = [
            UpdateProgress.model_validate_json(m.payload)
            for m in coordinator.messages
            if m.topic == topic
        ]
        assert [(p.state, p.bytes_done) for p in got] == [
            (UpdateState.FETCHING, 50),
            (UpdateState.VERIFIED, 75),
            (UpdateState.STAGED, 100),
            (UpdateState.ACTIVATING, 100),
        ]
    finally:
        link.stop()


def test_the_session_outlives_the_link(
    mosquitto_tls: TlsBroker, coordinator: RecordingClient
) -> None:
    """With the session kept, an announcement made while the device is away is queued by
    the broker and delivered when it returns, as a live (not retained) message."""
    link = DeviceLink(_settings(mosquitto_tls), _state)
    link.start()
    assert link.wait_connected(10)
    coordinator.expect(topics.device_status(DEVICE_A))
    link.stop()
    topic = topics.release_announcements(GROUP_A, "stable")
    _accepted(coordinator.publish(topic, _announcement(GROUP_A, 11)))  # not retained
    again = DeviceLink(_settings(mosquitto_tls), _state)
    again.start()
    try:
        event = again.events.get(timeout_s=10)
        assert isinstance(event, AnnouncementReceived)
        assert event.announcement.timestamp_version == 11
        assert not event.retained
    finally:
        again.stop()


def test_a_device_link_cannot_speak_for_another_device(mosquitto_tls: TlsBroker) -> None:
    b_ident = mosquitto_tls.identities[DEVICE_B]
    with pytest.raises(ConfigError, match="not for device_id"):
        DeviceLink(
            _settings(mosquitto_tls, cert_file=b_ident.cert_file, key_file=b_ident.key_file),
            _state,
        )


def test_reconnect_waits_are_drawn_from_the_devices_jitter(mosquitto_tls: TlsBroker) -> None:
    """Nothing listens on the port: every attempt fails, and paho waits exactly the delay
    the link drew from its random source before each retry."""
    settings = _settings(mosquitto_tls, port=free_port(), reconnect_min_s=0.05)
    link = DeviceLink(settings, _state, rng=random.Random(42))
    link.start()
    try:
        _wait(lambda: link.stats().connect_failures >= 3, "three failed attempts")
    finally:
        link.stop()
    expected = random.Random(42)
    draws = [
        reconnect_delay(n, expected, min_s=0.05, max_s=settings.reconnect_max_s)
        for n in range(link.stats().connect_failures)
    ]
    assert link.stats().last_reconnect_delay_s == draws[-1]
    assert link.stats().connects == 0
