"""Behaviour that lives in the broker, checked against a real mosquitto.

To prove that something did *not* arrive, a test sends a marker after the forbidden message
on a path the receiver may use; the broker delivers one connection's messages in order,
so once the marker is in, the forbidden message would have been too.
"""

from __future__ import annotations

import socket
import ssl
import sys
from pathlib import Path

import pytest
from paho.mqtt.reasoncodes import ReasonCode

import tests.support.mosquitto as mosquitto_support
from coordinator import pki
from coordinator.broker_config import render_acl
from protocol import topics
from tests.support.mosquitto import (
    DEVICE_A,
    DEVICE_B,
    GROUP_A,
    GROUP_B,
    HOST,
    REPO,
    Broker,
    TlsBroker,
    client_context,
    mqtt_connack,
    plain_broker,
)
from tests.support.mqtt_client import RecordingClient
from tests.support.processes import ManagedProcess, free_port, log_contains

pytestmark = pytest.mark.mosquitto

NOT_AUTHORIZED = 0x87
COORDINATOR = pki.COORDINATOR_IDENTITY


def test_a_retained_message_reaches_a_client_that_subscribes_later(mosquitto: Broker) -> None:
    topic = topics.release_announcements("lab", "stable")
    with RecordingClient(mosquitto.host, mosquitto.port, "publisher") as pub:
        pub.publish(topic, b"release 7", retain=True)

    with RecordingClient(mosquitto.host, mosquitto.port, "late-subscriber") as sub:
        sub.subscribe(topic)
        got = sub.expect(topic, b"release 7")
    assert got.retain


def test_a_port_taken_after_it_was_picked_is_replaced_by_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as squatter:  # bound, not listening: probes are refused at once
        squatter.bind((HOST, 0))
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        monkeypatch.setattr(mosquitto_support, "free_port", lambda host: next(picks, free_port()))
        with plain_broker() as broker:
            assert broker.port != taken
            assert mqtt_connack(broker.host, broker.port) == 0


def test_a_client_killed_with_sigkill_triggers_its_last_will(mosquitto: Broker) -> None:
    will_topic = topics.device_status("dev-will")
    with RecordingClient(mosquitto.host, mosquitto.port, "watcher") as watcher:
        watcher.subscribe(will_topic)
        argv = [sys.executable, "-m", "tests.support.will_client", mosquitto.host]
        argv += [str(mosquitto.port), "dev-will", will_topic, "offline", "2"]
        with ManagedProcess(argv, cwd=REPO, name="will-client") as child:
            child.wait_ready(log_contains("CONNECTED"), timeout=10)
            assert watcher.messages == []  # alive: no will yet
            assert child.kill() == -9
            got = watcher.expect(will_topic, b"offline", timeout=10)
    assert got.topic == will_topic


def _accepted(code: ReasonCode | None) -> bool:
    return code is not None and not code.is_failure


def _client(broker: TlsBroker, username: str, client_id: str) -> RecordingClient:
    return RecordingClient(broker.host, broker.port, client_id, context=broker.context(username))


def test_a_device_cannot_read_another_devices_topics_even_with_its_client_id(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    status_b = topics.device_status(DEVICE_B)
    own_group = topics.release_announcements(GROUP_A, "stable")
    with (
        _client(b, COORDINATOR, "coordinator") as coord,
        _client(b, DEVICE_B, "dev-b-agent") as dev_b,
    ):
        coord.subscribe(topics.all_devices_filter(topics.DeviceChannel.STATUS))
        dev_b.publish(status_b, b"b retained", retain=True)
        coord.expect(status_b, b"b retained")
        # Device A's certificate, device B's client id: %c-keyed ACLs would let it in.
        with _client(b, DEVICE_A, DEVICE_B) as spy:
            spy.subscribe(f"{topics.PREFIX}/devices/{DEVICE_B}/#")
            spy.subscribe(f"{topics.PREFIX}/groups/{GROUP_A}/#")
            dev_b.publish(status_b, b"b live")
            coord.expect(status_b, b"b live")
            coord.publish(own_group, b"marker")
            spy.expect(own_group, b"marker")
            assert [m.topic for m in spy.messages] == [own_group]


def test_a_device_using_another_devices_client_id_does_not_take_over_its_session(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    with _client(b, DEVICE_B, DEVICE_B) as victim, _client(b, DEVICE_A, DEVICE_B):
        # A takeover would have closed the victim's connection before the intruder's
        # CONNACK; a PUBACK on an unbroken connection proves it is still the same one.
        assert _accepted(victim.publish(topics.device_heartbeat(DEVICE_B), b"still here"))
        assert victim.disconnects == []


def test_a_device_cannot_publish_on_another_devices_topics(mosquitto_tls: TlsBroker) -> None:
    b = mosquitto_tls
    with (
        _client(b, COORDINATOR, "coordinator") as coord,
        _client(b, DEVICE_A, DEVICE_B) as dev_a,
    ):
        for channel in topics.DeviceChannel:
            coord.subscribe(topics.all_devices_filter(channel))
        forged = [
            topics.device_status(DEVICE_B),
            topics.device_heartbeat(DEVICE_B),
            topics.update_progress(DEVICE_B),
        ]
        for topic in forged:
            code = dev_a.publish(topic, b"forged")
            assert code is not None
            assert code.value == NOT_AUTHORIZED, topic
        own = topics.device_status(DEVICE_A)
        assert _accepted(dev_a.publish(own, b"marker"))
        coord.expect(own, b"marker")
        assert [m.payload for m in coord.messages] == [b"marker"]


def test_a_device_reads_its_own_groups_announcements_and_no_other(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    mine = topics.release_announcements(GROUP_A, "stable")
    theirs = topics.release_announcements(GROUP_B, "stable")
    with _client(b, COORDINATOR, "coordinator") as coord:
        assert _accepted(coord.publish(theirs, b"beta release", retain=True))
        assert _accepted(coord.publish(mine, b"alpha release", retain=True))
        assert _accepted(coord.publish(topics.round_invitations(GROUP_A), b"alpha round"))
    with (
        _client(b, DEVICE_A, "dev-a-agent") as dev_a,
        _client(b, DEVICE_B, "dev-b-agent") as dev_b,
    ):
        dev_a.subscribe(f"{topics.PREFIX}/groups/+/releases/+")
        dev_b.subscribe(f"{topics.PREFIX}/groups/+/releases/+")
        dev_a.expect(mine, b"alpha release")
        dev_b.expect(theirs, b"beta release")
        with _client(b, COORDINATOR, "coordinator") as coord:
            coord.publish(mine, b"alpha release 2", retain=True)
        dev_a.expect(mine, b"alpha release 2")
        assert {m.topic for m in dev_a.messages} == {mine}


def test_a_device_cannot_publish_announcements_or_invitations(mosquitto_tls: TlsBroker) -> None:
    b = mosquitto_tls
    announcement = topics.release_announcements(GROUP_A, "stable")
    invitation = topics.round_invitations(GROUP_A)
    with (
        _client(b, DEVICE_A, "dev-a-agent") as dev_a,
        _client(b, DEVICE_B, "dev-b-agent") as dev_b,
    ):
        dev_a.subscribe(f"{topics.PREFIX}/groups/{GROUP_A}/#")
        for topic in (announcement, invitation):
            code = dev_b.publish(topic, b"forged", retain=True)
            assert code is not None
            assert code.value == NOT_AUTHORIZED
            code = dev_a.publish(topic, b"forged by a member", retain=True)
            assert code is not None
            assert code.value == NOT_AUTHORIZED
        with _client(b, COORDINATOR, "coordinator") as coord:
            coord.publish(announcement, b"marker")
        dev_a.expect(announcement, b"marker")
        assert [m.payload for m in dev_a.messages] == [b"marker"]


def _refused(broker: TlsBroker, context: ssl.SSLContext | None) -> None:
    """The broker must not accept an MQTT session over ``context`` (None: plain TCP)."""
    with pytest.raises((ssl.SSLError, ConnectionError)):  # an alert, a reset: no CONNACK
        mqtt_connack(broker.host, broker.port, context)


def test_a_client_without_a_certificate_is_refused(mosquitto_tls: TlsBroker) -> None:
    _refused(mosquitto_tls, mosquitto_tls.context(None))
    assert (
        mqtt_connack(mosquitto_tls.host, mosquitto_tls.port, mosquitto_tls.context(DEVICE_A)) == 0
    )


def test_a_certificate_from_a_foreign_ca_is_refused(
    mosquitto_tls: TlsBroker, tmp_path: Path
) -> None:
    foreign_ca = pki.create_ca("someone else's CA")
    files = pki.write_credential(pki.issue_device(foreign_ca, DEVICE_A), tmp_path, DEVICE_A)
    _refused(mosquitto_tls, client_context(mosquitto_tls.ca_file, files.certificate, files.key))


def test_plain_tcp_to_the_tls_port_is_refused(mosquitto_tls: TlsBroker) -> None:
    _refused(mosquitto_tls, None)


def test_the_broker_certificate_is_refused_as_a_client_certificate(
    mosquitto_tls: TlsBroker,
) -> None:
    server = mosquitto_tls.server
    context = client_context(mosquitto_tls.ca_file, server.certificate, server.key)
    _refused(mosquitto_tls, context)


def test_a_device_revoked_while_the_broker_runs_is_refused_after_a_reload(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    assert mqtt_connack(b.host, b.port, b.context(DEVICE_B)) == 0
    pki.write_crl(pki.issue_crl(b.ca, [b.identities[DEVICE_B].serial]), b.crl_file)
    b.reload()
    _refused(b, b.context(DEVICE_B))
    assert mqtt_connack(b.host, b.port, b.context(DEVICE_A)) == 0


def test_a_new_group_membership_applies_after_the_acl_is_rerendered_and_reloaded(
    mosquitto_tls: TlsBroker,
) -> None:
    b = mosquitto_tls
    theirs = topics.release_announcements(GROUP_B, "stable")
    with _client(b, COORDINATOR, "coordinator") as coord:
        assert _accepted(coord.publish(theirs, b"beta release", retain=True))
    joined = {**b.fleet, DEVICE_A: (GROUP_A, GROUP_B)}
    b.acl_file.write_text(render_acl(joined.items()))
    b.reload()
    with _client(b, DEVICE_A, "dev-a-agent") as dev_a:
        dev_a.subscribe(theirs)
        dev_a.expect(theirs, b"beta release")
