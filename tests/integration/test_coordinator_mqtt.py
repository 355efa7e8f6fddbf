"""The coordinator's MQTT side against a real mosquitto under mTLS with the fleet's ACLs.

Waits are conditions, never sleeps: :meth:`Ingestor.sync` sends a probe round through the
broker and the ingest queue, so once it returns, everything the broker routed to that
ingestor before has been written.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

from coordinator import pki
from coordinator.broker_config import (
    coordinator_read_filters,
    coordinator_write_filters,
    render_acl,
)
from coordinator.errors import RefusedError
from coordinator.mqtt import (
    Announcer,
    BrokerOptions,
    IngestOptions,
    Ingestor,
    Malformed,
    MqttLink,
    TlsFiles,
    decode_device_message,
    device_filters,
    reconnect_delay,
)
from coordinator.registry import Incoming, Ingest, Registry, RolloutSpec, Selector
from coordinator.rollout.policy import StartWave, decide
from protocol import topics
from protocol.bundle import bundle_hash
from protocol.messages import (
    MAX_PAYLOAD_BYTES,
    BundleRef,
    DeviceStatus,
    Health,
    Heartbeat,
    ReleaseAnnouncement,
    Slot,
    UpdateProgress,
    UpdateState,
    decode_payload,
)
from tests.support.db_fixtures import make_manifest
from tests.support.mosquitto import DEVICE_A, DEVICE_B, GROUP_A, Identity, TlsBroker
from tests.support.mqtt_client import RecordingClient

pytestmark = pytest.mark.mosquitto

COORDINATOR = pki.COORDINATOR_IDENTITY
REPO_URL = "https://updates.example.org/repo"
SHA = "ab" * 32


def _options(broker: TlsBroker, username: str, **kwargs: object) -> BrokerOptions:
    ident = broker.identities[username]
    return BrokerOptions(
        host=broker.host,
        port=broker.port,
        tls=TlsFiles(broker.ca_file, ident.cert_file, ident.key_file),
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        **kwargs,  # type: ignore[arg-type]
    )


@contextmanager
def _link(broker: TlsBroker, username: str) -> Iterator[MqttLink]:
    link = MqttLink(_options(broker, username, clean_start=True))
    link.start()
    try:
        assert link.wait_connected(10), f"{username} did not connect"
        yield link
    finally:
        link.stop()


@contextmanager
def _ingestor(
    broker: TlsBroker, username: str, sink: object, options: IngestOptions | None = None
) -> Iterator[Ingestor]:
    ingestor = Ingestor(_options(broker, username), sink, options)  # type: ignore[arg-type]
    ingestor.start()
    try:
        assert ingestor.link.wait_connected(10), f"{username} did not connect"
        yield ingestor
    finally:
        ingestor.stop()


def _device(broker: TlsBroker, device_id: str) -> RecordingClient:
    return RecordingClient(broker.host, broker.port, device_id, context=broker.context(device_id))


def _heartbeat(at: datetime) -> bytes:
    return (
        Heartbeat(
            health=Health.HEALTHY,
            base_sha256=SHA,
            uptime_s=5,
            load_1m=0.5,
            free_disk_bytes=1 << 30,
            sent_at=at,
        )
        .model_dump_json()
        .encode()
    )


# -- announcements -----------------------------------------------------------------------


def test_an_announcement_by_the_coordinator_reaches_a_device_that_subscribes_later(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    with _link(b, COORDINATOR) as link:
        sent = Announcer(link).announce(
            GROUP_A, "stable", repository_url=REPO_URL, timestamp_version=7
        )
    topic = topics.release_announcements(GROUP_A, "stable")
    with _device(b, DEVICE_A) as device:  # connects after the coordinator left
        device.subscribe(topic)
        got = device.expect(topic)
    assert got.retain
    assert got.qos == 1
    assert decode_payload(ReleaseAnnouncement, got.payload) == sent
    assert sent.timestamp_version == 7


def test_a_device_identity_cannot_announce_a_release(mosquitto_tls: TlsBroker) -> None:
    with (
        _link(mosquitto_tls, DEVICE_A) as link,
        pytest.raises(RefusedError, match="refused"),
    ):
        Announcer(link).announce(GROUP_A, "stable", repository_url=REPO_URL, timestamp_version=1)


def test_only_the_coordinator_may_hint_a_device_on_its_own_release_topic(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    topic = topics.device_releases(DEVICE_A)
    with _device(b, DEVICE_A) as device:
        device.subscribe(topic)
        with _link(b, COORDINATOR) as link:
            link.publish(topic, b"wave")  # PUBACK success: the ACL lets it write
        assert device.expect(topic).payload == b"wave"
    for sender in (DEVICE_A, DEVICE_B):  # not the device itself, not another device
        with _link(b, sender) as link, pytest.raises(RefusedError, match="refused"):
            link.publish(topic, b"forged")


def test_publish_many_waits_for_every_puback_and_names_a_refusal(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    topic = topics.device_releases(DEVICE_A)
    with _device(b, DEVICE_A) as device:
        device.subscribe(topic)
        with _link(b, COORDINATOR) as link:
            link.publish_many([(topic, f"wave {i}".encode()) for i in range(200)])
        device.expect(topic, b"wave 199")
        got = [m.payload for m in device.messages if m.topic == topic]
        assert got == [f"wave {i}".encode() for i in range(200)]  # every one, in order
    with _link(b, DEVICE_B) as link, pytest.raises(RefusedError, match="refused 2 message"):
        link.publish_many([(topic, b"forged"), (topics.device_releases(DEVICE_B), b"x")])


# -- ingestion ---------------------------------------------------------------------------


def _start_update(registry: Registry, device_id: str) -> BundleRef:
    """Register a release and start a one-wave rollout to ``device_id``; return its ref."""
    manifest = make_manifest("smollm2-135m", "2.0.0")
    release = registry.create_release(manifest, actor="op")
    rollout = registry.create_rollout(
        RolloutSpec(release.id, Selector(devices=(device_id,))), actor="op"
    )
    decision, _ = registry.step(rollout.id, decide)
    assert isinstance(decision, StartWave)
    return BundleRef(name=manifest.name, version=manifest.version, sha256=bundle_hash(manifest))


def test_device_reports_published_by_devices_land_in_the_registry(
    mosquitto_tls: TlsBroker, sqlite_registry: Registry
) -> None:
    b, registry = mosquitto_tls, sqlite_registry
    registry.register_device(DEVICE_A, groups=[GROUP_A], actor="op")
    target = _start_update(registry, DEVICE_A)
    now = datetime.now(UTC).replace(microsecond=0)
    status = DeviceStatus(
        agent_version="0.1.0",
        health=Health.HEALTHY,
        base=target,
        slot=Slot.A,
        uptime_s=12,
        load_1m=0.25,
        free_disk_bytes=5 << 30,
        reported_at=now,
    )
    progress = UpdateProgress(
        state=UpdateState.FETCHING,
        target=target,
        timestamp_version=3,
        bytes_done=100,
        bytes_total=400,
        at=now,
    )
    with _ingestor(b, COORDINATOR, registry.ingest) as ingestor, _device(b, DEVICE_A) as dev:
        dev.publish(topics.device_status(DEVICE_A), status.model_dump_json().encode(), retain=True)
        dev.publish(topics.device_heartbeat(DEVICE_A), _heartbeat(now))
        dev.publish(topics.update_progress(DEVICE_A), progress.model_dump_json().encode())
        ingestor.sync()
        state = ingestor.link_state()
        stats = ingestor.stats()

    device = registry.get_device(DEVICE_A)
    assert device.health is Health.HEALTHY
    assert device.base is not None
    assert device.base.sha256 == target.sha256
    assert device.slot is Slot.A
    assert device.status_at == now
    assert device.last_seen is not None
    update = registry.device_updates(DEVICE_A)[0]
    assert (update.state, update.bytes_done, update.bytes_total) == (UpdateState.FETCHING, 100, 400)
    assert stats.results[Ingest.APPLIED] == 3
    assert stats.malformed_total == 0
    # The probe came back through the writer: the liveness sweep may trust this link.
    assert state.connected_since is not None
    assert state.last_message_at is not None
    assert state.last_message_at >= state.connected_since


def test_a_malformed_payload_is_dropped_and_counted(
    mosquitto_tls: TlsBroker, sqlite_registry: Registry
) -> None:
    b, registry = mosquitto_tls, sqlite_registry
    registry.register_device(DEVICE_A, groups=[GROUP_A], actor="op")
    now = datetime.now(UTC).replace(microsecond=0)
    with _ingestor(b, COORDINATOR, registry.ingest) as ingestor, _device(b, DEVICE_A) as dev:
        dev.publish(topics.device_heartbeat(DEVICE_A), b"{not json")
        dev.publish(topics.device_heartbeat(DEVICE_A), _heartbeat(now).replace(b"}", b',"x":1}'))
        # The broker's max_packet_size keeps oversized payloads out (see the table below).
        dev.publish(topics.device_status(DEVICE_A), b'{"schema_version": 1, "health": "fine"}')
        dev.publish(topics.device_heartbeat(DEVICE_A), _heartbeat(now))  # after the bad ones
        ingestor.sync()
        stats = ingestor.stats()
    # QoS 1 is at least once: a PUBACK lost under load makes the broker send a copy again.
    assert stats.malformed["topic"] == stats.malformed["too_large"] == 0
    assert stats.malformed["invalid"] >= 3
    assert stats.results[Ingest.APPLIED] >= 1
    assert stats.dropped_batches == 0
    assert registry.get_device(DEVICE_A).last_seen is not None
    assert registry.get_device(DEVICE_A).status_at is None  # the bad status never landed


def test_reports_sent_while_the_coordinator_is_away_arrive_when_it_returns(
    mosquitto_tls: TlsBroker, sqlite_registry: Registry
) -> None:
    b, registry = mosquitto_tls, sqlite_registry
    registry.register_device(DEVICE_A, groups=[GROUP_A], actor="op")
    with _ingestor(b, COORDINATOR, registry.ingest) as first:
        first.sync()  # subscribed: the broker now keeps this session
    now = datetime.now(UTC).replace(microsecond=0)
    with _device(b, DEVICE_A) as dev:
        dev.publish(topics.device_heartbeat(DEVICE_A), _heartbeat(now))  # not retained
    assert registry.get_device(DEVICE_A).last_seen is None
    with _ingestor(b, COORDINATOR, registry.ingest) as second:
        second.sync()
        stats = second.stats()
    assert stats.results[Ingest.APPLIED] == 1
    assert registry.get_device(DEVICE_A).last_seen is not None


# -- shared subscriptions ------------------------------------------------------------------


def _add_coordinator_identity(broker: TlsBroker, name: str) -> str:
    """Issue a second coordinator identity and grant it the coordinator's ACL; reload."""
    username = pki.service_identity(name)
    cred = pki.issue_service(broker.ca, name)
    files = pki.write_credential(cred, broker.directory, name)
    broker.identities[username] = Identity(
        username, files.certificate, files.key, cred.certificate.serial_number
    )
    extra = [
        "",
        f"user {username}",
        *(f"topic read {t}" for t in coordinator_read_filters()),
        *(f"topic readwrite {t}" for t in coordinator_write_filters()),
    ]
    broker.acl_file.write_text(render_acl(broker.fleet.items()) + "\n".join(extra) + "\n")
    broker.reload()
    return username


class RecordingSink:
    """A sink that remembers every message it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, datetime]] = []

    def __call__(self, batch: Sequence[Incoming]) -> list[Ingest]:
        for device_id, message, _ in batch:
            assert isinstance(message, Heartbeat)
            self.seen.append((device_id, message.sent_at))
        return [Ingest.APPLIED] * len(batch)


def test_two_coordinators_on_a_shared_subscription_split_the_load(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    second = _add_coordinator_identity(b, "coordinator-2")
    shared = IngestOptions(shared_group="ingest", batch_wait_s=0.01)
    sinks = RecordingSink(), RecordingSink()
    start = datetime.now(UTC).replace(microsecond=0)
    sent = set()
    with (
        _ingestor(b, COORDINATOR, sinks[0], shared) as one,
        _ingestor(b, second, sinks[1], shared) as two,
        _device(b, DEVICE_A) as dev_a,
        _device(b, DEVICE_B) as dev_b,
    ):
        one.sync()
        two.sync()
        for i in range(20):
            at = start + timedelta(seconds=i)
            for device_id, client in ((DEVICE_A, dev_a), (DEVICE_B, dev_b)):
                client.publish(topics.device_heartbeat(device_id), _heartbeat(at))
                sent.add((device_id, at))
        one.sync()
        two.sync()
    first, other = sinks[0].seen, sinks[1].seen
    assert first, "the first coordinator got nothing: the load was not shared"
    assert other, "the second coordinator got nothing: the load was not shared"
    assert len(first) + len(other) == len(sent) == 40  # each message ingested once
    assert set(first) | set(other) == sent
    assert not set(first) & set(other)


# -- the pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (f"{topics.PREFIX}/devices/dev-a/unknown", b"{}", "topic"),
        (f"{topics.PREFIX}/devices/bad id/heartbeat", b"{}", "topic"),
        (topics.device_heartbeat("dev-a"), b"x" * (MAX_PAYLOAD_BYTES + 1), "too_large"),
        (topics.device_heartbeat("dev-a"), b"[]", "invalid"),
        (topics.device_status("dev-a"), b"", "invalid"),
    ],
)
def test_decode_refuses_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as caught:
        decode_device_message(topic, payload)
    assert caught.value.reason == reason


def test_shared_filters_wrap_every_coordinator_filter() -> None:
    assert device_filters(None) == list(topics.COORDINATOR_FILTERS)
    assert device_filters("ingest") == [f"$share/ingest/{f}" for f in topics.COORDINATOR_FILTERS]
    with pytest.raises(topics.TopicError):
        device_filters("a/b")


def test_reconnect_delays_grow_to_the_cap_and_differ_between_processes() -> None:
    one, two = random.Random(1), random.Random(2)
    delays = [reconnect_delay(n, one, min_s=1, max_s=60) for n in range(10)]
    assert 0.5 <= delays[0] <= 1
    assert all(30 <= d <= 60 for d in delays[6:])
    assert delays != [reconnect_delay(n, two, min_s=1, max_s=60) for n in range(10)]


def test_publishing_from_many_threads_while_receiving_keeps_the_tls_connection(
    mosquitto_tls: TlsBroker,
) -> None:
    """Announcements go out from other threads while the network thread reads device reports
    on the same TLS connection: no write may interleave with a read or another write on the
    socket (a corrupted TLS record dropped the connection before the fix)."""
    b = mosquitto_tls
    received: list[str] = []

    class Sink:
        def message(self, topic: str, payload: bytes, retain: bool, at: datetime) -> None:
            received.append(topic)

    link = MqttLink(
        _options(b, COORDINATOR, clean_start=True),
        subscriptions=topics.COORDINATOR_FILTERS,
        receiver=Sink(),
    )
    link.start()
    try:
        assert link.wait_connected(10)
        errors: list[BaseException] = []

        def announce(n: int) -> None:
            try:
                for i in range(150):
                    link.publish(topics.device_releases(DEVICE_A), f"{n}-{i}".encode())
            except BaseException as e:  # reported below
                errors.append(e)

        with _device(b, DEVICE_B) as device:
            threads = [threading.Thread(target=announce, args=(n,)) for n in range(3)]
            for t in threads:
                t.start()
            beat = topics.device_heartbeat(DEVICE_B)
            for _ in range(300):
                device.publish(beat, _heartbeat(datetime.now(UTC)))
            for t in threads:
                t.join(60)
        assert errors == []
        stats = link.stats()
        assert (stats.connects, stats.disconnects) == (1, 0), stats
    finally:
        link.stop()
