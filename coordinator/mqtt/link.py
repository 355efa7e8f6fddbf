"""The coordinator's one MQTT connection (paho-mqtt 2, MQTT 5): the only paho importer.

Invariants:

- One connection per process and identity. The broker binds the client id to the
  certificate identity (``use_username_as_clientid``), so two connections with one
  certificate would take each other's session over; ingestion and announcements share
  this link.
- The session is persistent: ``clean_start`` false with a ``SessionExpiryInterval``, so the
  broker queues QoS 1 messages for the coordinator while it is away. Every CONNACK
  (re)subscribes with retain handling "send retained only for a new subscription", which
  restores a lost session without replaying every retained status into a live one.
- The network loop is a thread of this module. It reconnects with exponential backoff and
  per-process jitter (:func:`reconnect_delay`), so a fleet of coordinators never
  reconnects in lockstep. Callbacks only hand messages on (:class:`Receiver`); a receiver
  that raises is logged and counted, never allowed to stop the loop.
- Liveness of the link itself: every ``probe_interval_s`` the link publishes a probe on
  its own identity's heartbeat topic (:func:`probe_topic`) and hears it back through the
  broker, so "connected and hearing" is a fact about the round trip, not a socket flag.
- Only the network thread reads or writes the socket: :meth:`MqttLink.publish` from any
  other thread queues the packet and wakes the loop (a TLS connection cannot take a write
  from one thread while another reads).
- :meth:`MqttLink.publish` waits for the broker's PUBACK and raises
  :class:`~coordinator.errors.RefusedError` on a refusal (MQTT 5 reason codes, e.g. 0x87
  not authorized) and :class:`~coordinator.errors.TransientError` when the link is down or
  the PUBACK does not come in time.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Final, Protocol

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from coordinator.errors import ConfigError, RefusedError, TransientError
from coordinator.pki import SERVICE_PREFIX
from protocol import topics

__all__ = [
    "BrokerOptions",
    "LinkStats",
    "MqttLink",
    "Receiver",
    "TlsFiles",
    "certificate_identity",
    "is_service_topic",
    "probe_topic",
    "reconnect_delay",
]

log = logging.getLogger("nanofleet.coordinator.mqtt")

#: How long the loop thread blocks in one network poll (seconds); bounds the stop latency.
_POLL_S: Final = 0.25
#: PUBACKs nobody waited for are forgotten after this long (seconds).
_ACK_TTL_S: Final = 60.0
#: On stop, how long the loop keeps running to send the DISCONNECT (seconds).
_DISCONNECT_FLUSH_S: Final = 2.0
_PROBE_PREFIX: Final = b"probe:"


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TlsFiles:
    """The fleet CA and this client's certificate and key (PEM files)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to hold a session with it.

    Without ``tls`` the link is plain TCP, allowed only to a loopback address (the embedded
    default); the identity is then ``identity``. With ``tls`` the identity is the
    certificate's subject CN, which the broker also uses as the client id.
    """

    host: str
    port: int
    tls: TlsFiles | None = None
    identity: str = SERVICE_PREFIX + "coordinator"
    keepalive_s: int = 30
    #: How long the broker keeps the session (subscriptions, queued messages) while away.
    session_expiry_s: int = 7 * 24 * 3600
    #: False: a persistent session. True: a throwaway session (the release CLI).
    clean_start: bool = False
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"mqtt port {self.port} is outside 1..65535")
        if self.tls is None and not _is_loopback(self.host):
            raise ConfigError(
                f"mqtt host {self.host!r} is not a loopback address: plain MQTT is only for "
                "the embedded broker; set ca_file, cert_file and key_file for mTLS"
            )
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("need 0 < reconnect_min_s <= reconnect_max_s")

    def client_identity(self) -> str:
        """The identity this link connects as (the certificate CN under mTLS).

        Raises:
            ConfigError: the certificate cannot be read or has no CN.
        """
        return certificate_identity(self.tls.cert_file) if self.tls else self.identity


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def certificate_identity(cert_file: Path) -> str:
    """Return the subject CN of the PEM certificate at ``cert_file`` (the MQTT username).

    Raises:
        ConfigError: unreadable, not a PEM certificate, or without a CN.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the certificate {cert_file}: {e}") from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ConfigError(f"the certificate {cert_file} has no common name")
    value = names[0].value
    return value.decode() if isinstance(value, bytes) else value


def probe_topic(identity: str) -> str:
    """The topic a coordinator identity probes its own link on: its own heartbeat topic.

    Spelled like :func:`coordinator.broker_config.device_own_write_patterns` (the ACL's
    ``%u`` pattern grants every identity its own device channels); not through
    :func:`protocol.topics.device_heartbeat`, which rightly refuses the ``:`` of a service
    identity as a device id.
    """
    return f"{topics.PREFIX}/devices/{identity}/{topics.DeviceChannel.HEARTBEAT.value}"


def is_service_topic(topic: str) -> bool:
    """True for a topic under a service identity's device prefix (a probe, never a device)."""
    return topic.startswith(f"{topics.PREFIX}/devices/{SERVICE_PREFIX}")


def _queued_write(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho's write (un)registration: nothing to do, the network loop selects for writes."""


def reconnect_delay(attempt: int, rng: random.Random, *, min_s: float, max_s: float) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): exponential, capped, jittered.

    The result lies in ``[cap / 2, cap]`` with ``cap = min(max_s, min_s * 2**attempt)``.
    """
    cap = min(max_s, min_s * 2.0 ** min(attempt, 32))
    return cap / 2 + rng.uniform(0, cap / 2)


class Receiver(Protocol):
    """Gets every message the link receives, in paho's network thread: must not block long."""

    def message(self, topic: str, payload: bytes, retain: bool, received_at: datetime) -> None:
        """Take one message (parse it and queue it; no business logic here)."""


@dataclass(frozen=True)
class LinkStats:
    """Counters of one link since it started."""

    connected: bool
    connects: int
    disconnects: int
    received: int
    receiver_errors: int
    probes_sent: int
    subscribe_failures: int


class MqttLink:
    """One MQTT 5 connection; see the module docstring. Start with :meth:`start`."""

    def __init__(
        self,
        options: BrokerOptions,
        *,
        subscriptions: Sequence[str] = (),
        receiver: Receiver | None = None,
        probe_interval_s: float | None = None,
        clock: Callable[[], datetime] = _utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self.identity = options.client_identity()
        self.probe_topic = probe_topic(self.identity)
        self._subscriptions = list(dict.fromkeys(subscriptions))
        if receiver is not None and probe_interval_s is not None:
            self._subscriptions.append(self.probe_topic)
        self._receiver = receiver
        self._probe_interval_s = probe_interval_s
        self._clock = clock
        self._rng = rng or random.Random(os.urandom(16))  # noqa: S311 (jitter, not secrets)
        self._cond = threading.Condition()
        self._acks: dict[int, tuple[ReasonCode, float]] = {}
        self._connected_since: datetime | None = None
        self._connects = self._disconnects = self._received = 0
        self._receiver_errors = self._probes_sent = self._subscribe_failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.identity,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        client.enable_logger(logging.getLogger("nanofleet.coordinator.mqtt.paho"))
        client.connect_timeout = self.options.connect_timeout_s
        if self.options.tls is not None:
            client.tls_set_context(_tls_context(self.options.tls))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        # Only the network thread touches the socket. Without a write callback, paho writes
        # a publish from the calling thread at once, concurrently with the network thread's
        # reads on the same TLS connection, which corrupts TLS records and drops the link.
        # With one, publish() only queues the packet and wakes the loop, which writes it.
        client.on_socket_register_write = _queued_write
        client.on_socket_unregister_write = _queued_write
        return client

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the network thread; it connects (and keeps reconnecting) on its own."""
        if self._thread is not None:
            raise RuntimeError("the MQTT link was already started")
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (the session stays on the broker) and stop the thread."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the link is connected; False if it is not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._connected_since is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return False
                self._cond.wait(remaining)
        return True

    @property
    def connected_since(self) -> datetime | None:
        """When the current connection's CONNACK arrived; None while down."""
        with self._cond:
            return self._connected_since

    def stats(self) -> LinkStats:
        """A snapshot of the counters."""
        with self._cond:
            return LinkStats(
                connected=self._connected_since is not None,
                connects=self._connects,
                disconnects=self._disconnects,
                received=self._received,
                receiver_errors=self._receiver_errors,
                probes_sent=self._probes_sent,
                subscribe_failures=self._subscribe_failures,
            )

    # -- publishing -----------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK (see :meth:`publish_many`).

        Raises:
            TransientError: the link is not connected within ``timeout_s``, or no PUBACK
                came in time (the message may still be delivered later).
            RefusedError: the broker refused the message (e.g. not authorized).
        """
        self.publish_many([(topic, payload)], retain=retain, timeout_s=timeout_s)

    def publish_many(
        self,
        messages: Sequence[tuple[str, bytes]],
        *,
        retain: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        """Publish each ``(topic, payload)`` at QoS 1 without waiting in between, then wait
        for every PUBACK (paho keeps its in-flight window). At most 10,000 messages, so
        message ids cannot wrap around within one call.

        Raises:
            TransientError: not connected within ``timeout_s``, or PUBACKs missing then.
            RefusedError: the broker refused at least one message (the first is named).
        """
        if len(messages) > 10_000:
            raise ValueError(f"{len(messages)} messages in one call; at most 10,000")
        deadline = time.monotonic() + timeout_s
        if not self.wait_connected(timeout_s):
            raise TransientError(
                f"not connected to the MQTT broker {self.options.host}:{self.options.port} "
                f"within {timeout_s:g} s"
            )
        started = time.monotonic()
        pending: dict[int, str] = {}
        for topic, payload in messages:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                raise TransientError(f"publish on {topic} failed: {paho.error_string(info.rc)}")
            pending[info.mid] = topic
        refused: list[tuple[str, ReasonCode]] = []
        with self._cond:
            while True:
                for mid in [
                    m for m, (_, at) in self._acks.items() if m in pending and at >= started
                ]:
                    code, _ = self._acks.pop(mid)
                    topic = pending.pop(mid)
                    if code.is_failure:
                        refused.append((topic, code))
                if not pending:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransientError(
                        f"no PUBACK for {len(pending)} of {len(messages)} messages within "
                        f"{timeout_s:g} s"
                    )
                self._cond.wait(remaining)
        if refused:
            topic, code = refused[0]
            raise RefusedError(
                f"the broker refused {len(refused)} message(s), first on {topic}: {code} "
                f"(0x{code.value:02x}); is {self.identity!r} allowed to publish there?"
            )

    def probe(self) -> bytes:
        """Publish a probe on :attr:`probe_topic` now, without waiting; return its payload."""
        token = _PROBE_PREFIX + os.urandom(8).hex().encode()
        self._client.publish(self.probe_topic, token, qos=1, retain=False)
        with self._cond:
            self._probes_sent += 1
        return token

    # -- the network thread -----------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        opts = self.options
        while not self._stop.is_set():
            try:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = 0 if opts.clean_start else opts.session_expiry_s
                self._client.connect(
                    opts.host,
                    opts.port,
                    keepalive=opts.keepalive_s,
                    clean_start=opts.clean_start,
                    properties=properties,
                )
            except (OSError, ValueError) as e:
                attempt = self._back_off(
                    attempt,
                    "mqtt_connect_failed",
                    "cannot connect to the MQTT broker: %s; retrying in %.1f s",
                    e,
                )
                continue
            if self._serve_connection():
                attempt = 0
            if self._stop.is_set():
                break
            attempt = self._back_off(
                attempt, "mqtt_disconnected", "MQTT connection lost; reconnecting in %.1f s"
            )

    def _back_off(self, attempt: int, event: str, message: str, *args: object) -> int:
        """Log ``message`` (its last ``%`` is the delay), wait a jittered delay; next attempt."""
        opts = self.options
        delay = reconnect_delay(
            attempt, self._rng, min_s=opts.reconnect_min_s, max_s=opts.reconnect_max_s
        )
        log.warning(
            message, *args, delay, extra={"event": event, "broker": f"{opts.host}:{opts.port}"}
        )
        self._stop.wait(delay)
        return attempt + 1

    def _serve_connection(self) -> bool:
        """Run the network loop until the connection ends; True if it was ever accepted."""
        accepted = False
        next_probe = time.monotonic()
        while True:
            if self._stop.is_set():
                self._client.disconnect()
                flush_until = time.monotonic() + _DISCONNECT_FLUSH_S
                while time.monotonic() < flush_until:
                    if self._client.loop(_POLL_S) != paho.MQTT_ERR_SUCCESS:
                        break
                self._mark_down()
                return accepted
            rc = self._client.loop(_POLL_S)
            if rc != paho.MQTT_ERR_SUCCESS:
                self._mark_down()
                return accepted
            if self.connected_since is not None:
                accepted = True
                if self._probe_interval_s is not None and time.monotonic() >= next_probe:
                    self.probe()
                    next_probe = time.monotonic() + self._probe_interval_s

    def _mark_down(self) -> None:
        with self._cond:
            if self._connected_since is not None:
                self._disconnects += 1
            self._connected_since = None
            self._cond.notify_all()

    # -- paho callbacks (network thread) ----------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error(
                "the MQTT broker refused the connection: %s",
                reason_code,
                extra={"event": "mqtt_refused", "identity": self.identity},
            )
            return
        session_present = bool(getattr(flags, "session_present", False))
        if self._subscriptions:
            options = SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            client.subscribe([(f, options) for f in self._subscriptions])
        with self._cond:
            self._connected_since = self._clock()
            self._connects += 1
            self._cond.notify_all()
        log.info(
            "connected to the MQTT broker",
            extra={
                "event": "mqtt_connected",
                "identity": self.identity,
                "session_present": session_present,
            },
        )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._mark_down()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(c) for c in reason_codes if c.is_failure]
        if failed:
            with self._cond:
                self._subscribe_failures += len(failed)
            log.error(
                "the MQTT broker refused subscriptions: %s",
                ", ".join(failed),
                extra={"event": "mqtt_subscribe_refused"},
            )

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        now = time.monotonic()
        with self._cond:
            self._acks[mid] = (reason_code, now)
            if len(self._acks) > 256:
                for old in [m for m, (_, at) in self._acks.items() if now - at > _ACK_TTL_S]:
                    del self._acks[old]
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        received_at = self._clock()
        with self._cond:
            self._received += 1
        if self._receiver is None:
            return
        try:
            self._receiver.message(msg.topic, bytes(msg.payload), bool(msg.retain), received_at)
        except Exception:
            with self._cond:
                self._receiver_errors += 1
            log.exception("the MQTT receiver failed", extra={"event": "mqtt_receiver_error"})


def _tls_context(files: TlsFiles) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(files.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(files.cert_file), str(files.key_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load the MQTT TLS files (ca {files.ca_file}, cert {files.cert_file}, "
            f"key {files.key_file}): {e}"
        ) from e
    return context
