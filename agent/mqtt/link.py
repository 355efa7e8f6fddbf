"""The device's MQTT link (paho-mqtt 2, MQTT 5): the only module of the agent that imports paho.

Invariants:

- Identity: the client id is ``mqtt.device_id``. Under mTLS the broker takes the
  certificate's common name as the username its ACLs key on; the link refuses to start
  (:class:`~agent.errors.ConfigError`) unless that name is ``device_id``, so the topics it
  publishes on are the ones the broker lets it write.
- Session: ``clean_start`` false with a ``SessionExpiryInterval`` of
  ``mqtt.session_expiry_s``, so the broker keeps the subscriptions and queues QoS 1
  announcements while the device is away. When a CONNACK says the session is gone
  (``session_present`` false) the link subscribes again, and the broker then sends the
  retained announcements.
- Liveness: a retained status on every connect (and after every change the daemon
  signals), with its "offline" copy registered as the Last Will for the next connection;
  a heartbeat every ``mqtt.heartbeat_interval_s`` while connected; on a clean stop the link
  publishes the offline status itself (a DISCONNECT does not fire the will).
- Reconnects: paho's network thread (``connect_async`` + ``loop_start``) reconnects on its
  own, but its backoff has no jitter. Before each of its waits the link sets the wait to
  one drawn by :class:`~agent.mqtt._policy.Backoff` from a per-device random source, so a
  fleet that lost its broker together comes back spread out.
- Threads: paho's callbacks only decode (:func:`~agent.mqtt._inbound.decode_message`) and
  hand events to :attr:`DeviceLink.events`, a bounded queue that drops its oldest item when
  full; the daemon consumes it. Everything the link publishes goes out from its own worker
  thread, in order: status, heartbeats, and update progress from a bounded outbox that is
  held while the broker is away and flushed when it returns.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttSettings
from agent.errors import ConfigError
from agent.mqtt._inbound import BoundedQueue, LinkEvent, Rejected, decode_message, routes_for
from agent.mqtt._policy import Backoff, Schedule, Task
from agent.mqtt._status import StatusProvider, build_heartbeat, build_status, offline_copy
from protocol import topics
from protocol.messages import DeviceStatus, EvaluationReport, UpdateProgress

log = logging.getLogger("nanofleet.agent.mqtt")

#: Every message the link publishes or subscribes to is QoS 1.
_QOS: Final = 1


def _utc_now() -> datetime:
    return datetime.now(UTC)


def certificate_common_name(cert_file: Path) -> str:
    """The subject CN of the PEM certificate ``cert_file``.

    Raises:
        ConfigError: unreadable, not a PEM certificate, or without a CN (names
            ``mqtt.cert_file``).
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"mqtt.cert_file: cannot read the certificate {cert_file}: {e}") from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ConfigError(f"mqtt.cert_file: the certificate {cert_file} has no common name")
    value = names[0].value
    return value.decode() if isinstance(value, bytes) else value


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """The mTLS client context of ``settings``; checks the certificate names ``device_id``.

    Raises:
        ConfigError: a file cannot be loaded, or the certificate's CN is not ``device_id``.
    """
    if settings.ca_file is None or settings.cert_file is None or settings.key_file is None:
        raise ConfigError("mqtt: ca_file, cert_file and key_file are needed for mTLS")
    name = certificate_common_name(settings.cert_file)
    if name != settings.device_id:
        raise ConfigError(
            f"mqtt.cert_file: the certificate is for {name!r}, not for device_id "
            f"{settings.device_id!r}; the broker would file this device under {name!r}"
        )
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"mqtt: cannot load the TLS files (ca_file {settings.ca_file}, cert_file "
            f"{settings.cert_file}, key_file {settings.key_file}): {e}"
        ) from e
    return context


@dataclass(frozen=True)
class LinkStats:
    """Counters of the link since it started."""

    connected: bool
    connects: int
    connect_failures: int
    disconnects: int
    received: int
    rejected: int
    events_dropped: int
    progress_sent: int
    progress_dropped: int
    statuses_sent: int
    heartbeats_sent: int
    last_reconnect_delay_s: float | None


class DeviceLink:
    """One device's MQTT 5 connection; see the module docstring.

    Use :meth:`start` once, :meth:`stop` once. :meth:`publish_progress` and
    :meth:`status_changed` may be called from any thread and never block on the network.
    """

    def __init__(
        self,
        settings: MqttSettings,
        status: StatusProvider,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = _utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._status = status
        self._clock = clock
        self._monotonic = monotonic
        self._context = tls_context(settings) if settings.tls else None
        self.routes = routes_for(
            settings.groups,
            settings.channels,
            rounds=settings.follow_rounds,
            device_id=settings.device_id,
        )
        self.status_topic = topics.device_status(settings.device_id)
        self.heartbeat_topic = topics.device_heartbeat(settings.device_id)
        self.progress_topic = topics.update_progress(settings.device_id)
        self.evaluation_topic = topics.device_topic(
            settings.device_id, topics.DeviceChannel.EVALUATION
        )
        #: Announcements and invitations for the daemon (never handled in paho's thread).
        self.events: BoundedQueue[LinkEvent] = BoundedQueue(settings.event_queue_length_max)
        # Jitter, not secrets: a per-device source so that devices draw different waits.
        seed = os.urandom(16) + settings.device_id.encode()
        self._backoff = Backoff(
            rng or random.Random(seed),  # noqa: S311
            min_s=settings.reconnect_min_s,
            max_s=settings.reconnect_max_s,
        )
        self._cond = threading.Condition()
        self._schedule = Schedule(settings.heartbeat_interval_s)
        self._outbox: deque[UpdateProgress | EvaluationReport] = deque()
        self._last_status: DeviceStatus | None = None
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="nanofleet-mqtt", daemon=True)
        self._counts = dict.fromkeys(
            (
                "connects",
                "connect_failures",
                "disconnects",
                "received",
                "rejected",
                "progress_sent",
                "progress_dropped",
                "statuses_sent",
                "heartbeats_sent",
            ),
            0,
        )
        self._last_delay: float | None = None
        self._client = self._make_client()

    # -- setup ------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.settings.device_id,
            protocol=paho.MQTTv5,
        )
        client.enable_logger(logging.getLogger("nanofleet.agent.mqtt.paho"))
        client.connect_timeout = self.settings.connect_timeout_s
        if self._context is not None:
            client.tls_set_context(self._context)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _set_will(self, status: DeviceStatus) -> None:
        """Register the offline copy of ``status`` as the Last Will of the next connection."""
        self._client.will_set(
            self.status_topic,
            offline_copy(status).model_dump_json().encode(),
            qos=_QOS,
            retain=True,
        )

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (paho's thread) and start the worker.

        Raises:
            ValueError: the status provider gave a state the protocol refuses.
        """
        status = build_status(self._status(), self._clock())
        with self._cond:
            self._last_status = status
        self._set_will(status)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()
        self._worker.start()

    def stop(self) -> None:
        """Publish the offline status (waiting up to ``mqtt.stop_timeout_s`` for the broker
        to take it), disconnect, and stop both threads. The session stays on the broker."""
        timeout = self.settings.stop_timeout_s
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            connected = self._schedule.connected
            last = self._last_status
        self._worker.join(timeout)
        if connected and last is not None:
            info = self._client.publish(
                self.status_topic,
                offline_copy(last).model_dump_json().encode(),
                qos=_QOS,
                retain=True,
            )
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as e:
                log.warning("the offline status was not sent: %s", e)
        self._client.disconnect()
        self._client.loop_stop()
        # paho closes its wake-up socket pair only when the client is freed. Its callbacks
        # are bound methods of this link (a reference cycle): drop them, so the client goes
        # with the link by reference counting, not at some later cycle collection.
        client = self._client
        client.on_connect = client.on_connect_fail = client.on_disconnect = None
        client.on_message = None

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected; False if not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._schedule.connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stats(self) -> LinkStats:
        """A snapshot of the counters."""
        with self._cond:
            return LinkStats(
                connected=self._schedule.connected,
                events_dropped=self.events.dropped,
                last_reconnect_delay_s=self._last_delay,
                **self._counts,
            )

    # -- what the daemon sends --------------------------------------------------------

    def publish_progress(self, progress: UpdateProgress) -> None:
        """Queue an update progress message; sent in order, held while the broker is away.

        A full outbox (``mqtt.outbox_length_max``) drops its oldest message.
        """
        with self._cond:
            if len(self._outbox) >= self.settings.outbox_length_max:
                self._outbox.popleft()
                self._counts["progress_dropped"] += 1
            self._outbox.append(progress)
            self._schedule.on_held()
            self._cond.notify_all()

    def publish_evaluation(self, report: EvaluationReport) -> None:
        """Queue a held-out evaluation of an installed bundle (same outbox as progress)."""
        with self._cond:
            if len(self._outbox) >= self.settings.outbox_length_max:
                self._outbox.popleft()
                self._counts["progress_dropped"] += 1
            self._outbox.append(report)
            self._schedule.on_held()
            self._cond.notify_all()

    def status_changed(self) -> None:
        """The device's state changed: publish a fresh retained status soon."""
        with self._cond:
            self._schedule.on_changed()
            self._cond.notify_all()

    # -- the worker thread ------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                now = self._monotonic()
                tasks = self._schedule.take(now)
                if not tasks:
                    self._cond.wait(self._schedule.wait_s(now))
                    continue
            for task in tasks:
                try:
                    if task is Task.ONLINE:
                        self._publish_status()
                        self._flush()
                    else:
                        self._publish_heartbeat()
                except Exception:  # a bug: log it, keep the link alive
                    log.exception("the MQTT worker failed", extra={"event": "mqtt_bug"})

    def _publish_status(self) -> None:
        status = build_status(self._status(), self._clock())
        self._client.publish(
            self.status_topic, status.model_dump_json().encode(), qos=_QOS, retain=True
        )
        self._set_will(status)
        with self._cond:
            self._last_status = status
            self._counts["statuses_sent"] += 1

    def _publish_heartbeat(self) -> None:
        beat = build_heartbeat(self._status(), self._clock())
        self._client.publish(self.heartbeat_topic, beat.model_dump_json().encode(), qos=_QOS)
        with self._cond:
            self._counts["heartbeats_sent"] += 1

    def _flush(self) -> None:
        """Publish held progress in order while connected. paho keeps a QoS 1 message it
        could not deliver and resends it in the resumed session."""
        while True:
            with self._cond:
                if not self._outbox or not self._schedule.connected:
                    return
                message = self._outbox.popleft()
                self._counts["progress_sent"] += 1
            topic = (
                self.evaluation_topic
                if isinstance(message, EvaluationReport)
                else self.progress_topic
            )
            self._client.publish(topic, message.model_dump_json().encode(), qos=_QOS)

    # -- paho callbacks (paho's network thread: decode, count, hand on) ---------------

    def _apply_delay(self, delay: float) -> None:
        # paho waits exactly ``min_delay`` after this call resets its doubling; it annotates
        # the bounds as int but computes with floats, which sub-second jitter needs.
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        self._last_delay = delay

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
                extra={"event": "mqtt_refused", "device_id": self.settings.device_id},
            )
            return
        session_present = bool(getattr(flags, "session_present", False))
        if not session_present:
            options = SubscribeOptions(qos=_QOS)
            client.subscribe([(topic, options) for topic in self.routes])
        self._backoff.succeeded()
        with self._cond:
            self._counts["connects"] += 1
            self._schedule.on_connect(self._monotonic())
            self._cond.notify_all()
        log.info(
            "connected to the MQTT broker",
            extra={"event": "mqtt_connected", "session_present": session_present},
        )

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        delay = self._backoff.failed()
        self._apply_delay(delay)
        with self._cond:
            self._counts["connect_failures"] += 1
        log.warning(
            "cannot connect to the MQTT broker; retrying in %.1f s",
            delay,
            extra={"event": "mqtt_connect_failed"},
        )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            was_connected = self._schedule.connected
            self._schedule.on_disconnect()
            if was_connected:
                self._counts["disconnects"] += 1
            self._cond.notify_all()
        if self._stopping.is_set():
            return
        delay = self._backoff.failed()
        self._apply_delay(delay)
        log.warning(
            "MQTT connection lost (%s); reconnecting in %.1f s",
            reason_code,
            delay,
            extra={"event": "mqtt_disconnected"},
        )

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        event = decode_message(
            self.routes,
            msg.topic,
            bytes(msg.payload),
            retained=bool(msg.retain),
            received_at=self._clock(),
        )
        with self._cond:
            self._counts["received"] += 1
            if isinstance(event, Rejected):
                self._counts["rejected"] += 1
        if isinstance(event, Rejected):
            log.warning(
                "MQTT message dropped: %s",
                event.detail,
                extra={"event": "mqtt_rejected", "reason": event.reason.value},
            )
            return
        if not self.events.put(event):
            log.warning("MQTT event queue full: the oldest event was dropped")
