"""Ingestion of device reports: MQTT messages in, batches of registry writes out.

Data path: paho's network thread parses the topic and the payload
(:func:`decode_device_message`: :func:`protocol.topics.parse_device_topic` and
:func:`protocol.messages.decode_payload`) and puts the result on a bounded queue; one worker
thread takes up to ``batch_max`` messages (waiting at most ``batch_wait_s`` for a batch to
fill) and hands them to the sink, :meth:`coordinator.registry.Registry.ingest`, in one
transaction. No business logic runs in a network callback.

Invariants:

- Malformed messages (a topic that is not a device topic, an oversized or invalid payload)
  are dropped and counted by reason; they never reach the sink and never stop the loop.
- The queue is bounded (``queue_max``). When it is full, the network thread waits up to
  ``queue_full_wait_s`` (back-pressure on the broker, which queues for this persistent
  session), then drops the message and counts it.
- A batch that fails with a database connectivity error is retried with jittered backoff
  until it succeeds or the ingestor stops; any other failure drops the batch and counts it.
- Messages are acknowledged to the broker once queued, not once committed: a crash loses
  at most what was queued. Statuses are retained and heartbeats periodic, so that loss heals
  itself; a lost progress report makes its device look slow until the next one.
- :meth:`Ingestor.link_state` says what the liveness sweep may rely on: the link's
  connection time and the receive time of the newest message *written* to the registry.
  Link probes travel through the queue too, so a stalled writer or a backlog longer than
  the heartbeat interval suspends offline verdicts instead of producing false ones.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from coordinator.mqtt.link import BrokerOptions, MqttLink, is_service_topic, reconnect_delay
from coordinator.registry.api import Incoming
from coordinator.registry.liveness import LinkState
from coordinator.registry.views import Ingest
from protocol import topics
from protocol.messages import (
    DeviceMessage,
    DeviceStatus,
    EvaluationReport,
    Heartbeat,
    PayloadTooLargeError,
    UpdateProgress,
    decode_payload,
)

__all__ = [
    "IngestOptions",
    "IngestStats",
    "Ingestor",
    "Malformed",
    "Sink",
    "decode_device_message",
    "device_filters",
]

log = logging.getLogger("nanofleet.coordinator.ingest")

#: Writes a batch of device messages; returns one result per message.
Sink = Callable[[Sequence[Incoming]], Sequence[Ingest]]

#: Reasons a message is counted as malformed.
MALFORMED_REASONS: Final = ("topic", "too_large", "invalid")
_SHARE_PREFIX: Final = "$share"
#: How often an idle writer checks whether it should stop (seconds).
_STOP_POLL_S: Final = 0.2


class Malformed(ValueError):
    """A device message that cannot be ingested; ``reason`` is one of MALFORMED_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def decode_device_message(topic: str, payload: bytes) -> tuple[str, DeviceMessage]:
    """Return (device id, parsed message) for a message on a device topic.

    Raises:
        Malformed: the topic is not a device topic (reason ``topic``), the payload is over
            the size limit (``too_large``) or is not valid for the channel (``invalid``).
    """
    try:
        parsed = topics.parse_device_topic(topic)
    except topics.TopicError as e:
        raise Malformed("topic", str(e)) from e
    message: DeviceMessage
    try:
        match parsed.channel:
            case topics.DeviceChannel.STATUS:
                message = decode_payload(DeviceStatus, payload)
            case topics.DeviceChannel.HEARTBEAT:
                message = decode_payload(Heartbeat, payload)
            case topics.DeviceChannel.PROGRESS:
                message = decode_payload(UpdateProgress, payload)
            case topics.DeviceChannel.EVALUATION:
                message = decode_payload(EvaluationReport, payload)
    except PayloadTooLargeError as e:
        raise Malformed("too_large", str(e)) from e
    except ValidationError as e:
        raise Malformed("invalid", f"{topic}: {e.error_count()} error(s): {e}") from e
    return parsed.device_id, message


def device_filters(shared_group: str | None) -> list[str]:
    """The coordinator's subscriptions, as MQTT 5 shared subscriptions if ``shared_group``.

    Raises:
        topics.TopicError: ``shared_group`` is not a valid topic segment.
    """
    if shared_group is None:
        return list(topics.COORDINATOR_FILTERS)
    name = topics.check_segment(shared_group, "shared subscription group")
    return [f"{_SHARE_PREFIX}/{name}/{f}" for f in topics.COORDINATOR_FILTERS]


@dataclass(frozen=True)
class IngestOptions:
    """Bounds of the ingestion path."""

    queue_max: int = 10_000  # messages
    batch_max: int = 500  # messages per registry transaction (Registry allows up to 5000)
    batch_wait_s: float = 0.2  # how long a partial batch waits for more
    queue_full_wait_s: float = 5.0  # back-pressure before a message is dropped
    retry_min_s: float = 0.5
    retry_max_s: float = 30.0
    probe_interval_s: float = 5.0
    shared_group: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.queue_max <= 1_000_000:
            raise ValueError(f"queue_max {self.queue_max} is outside 1..1000000")
        if not 1 <= self.batch_max <= 5000:
            raise ValueError(f"batch_max {self.batch_max} is outside 1..5000")


@dataclass(frozen=True)
class IngestStats:
    """Counters of one ingestor since it started."""

    received: int
    malformed: dict[str, int]
    dropped_overflow: int
    results: dict[str, int]
    batches: int
    batch_errors: int
    dropped_batches: int
    queue_length: int

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


@dataclass(frozen=True)
class _Barrier:
    """A probe heard back: the writer passes it once everything queued before is written."""

    token: bytes
    received_at: datetime


_Item = tuple[str, DeviceMessage, datetime] | _Barrier


class Ingestor:
    """Subscribes to every device's reports and writes them to ``sink`` in batches.

    ``start`` connects (through its own :class:`MqttLink`, available as :attr:`link` for
    publishing on the same connection) and starts the writer; ``stop`` disconnects and
    writes what is queued.
    """

    def __init__(
        self,
        broker: BrokerOptions,
        sink: Sink,
        options: IngestOptions | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or IngestOptions()
        self._sink = sink
        self._rng = rng or random.Random(os.urandom(16))  # noqa: S311 (jitter, not secrets)
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=self.options.queue_max)
        self._lock = threading.Condition()
        self._malformed: Counter[str] = Counter({r: 0 for r in MALFORMED_REASONS})
        self._results: Counter[str] = Counter({r.value: 0 for r in Ingest})
        self._received = self._overflow = self._batches = 0
        self._batch_errors = self._dropped_batches = 0
        self._written_through: datetime | None = None
        self._passed: set[bytes] = set()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.link = MqttLink(
            broker,
            subscriptions=device_filters(self.options.shared_group),
            receiver=self,
            probe_interval_s=self.options.probe_interval_s,
            clock=clock,
            rng=self._rng,
        )

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread and the MQTT link."""
        self._worker = threading.Thread(target=self._work, name="ingest-writer", daemon=True)
        self._worker.start()
        self.link.start()

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Disconnect, then let the writer write what is queued (up to ``drain_timeout_s``)."""
        self.link.stop()
        self._stop.set()
        if self._worker is not None:
            self._worker.join(drain_timeout_s)

    def link_state(self) -> LinkState:
        """What the liveness sweep may rely on (see the module docstring)."""
        with self._lock:
            written = self._written_through
        return LinkState(connected_since=self.link.connected_since, last_message_at=written)

    def sync(self, timeout_s: float = 10.0) -> None:
        """Return once every message the broker routed here before this call is written.

        A probe goes round through the broker and the queue; the broker delivers one
        subscriber's messages in order, so when the writer passes the probe, everything
        routed here before it has been written.

        Raises:
            TimeoutError: the probe did not come back through the writer in time.
        """
        if not self.link.wait_connected(timeout_s):
            raise TimeoutError(f"the MQTT link is not connected within {timeout_s:g} s")
        token = self.link.probe()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while token not in self._passed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the link probe did not come back within {timeout_s:g} s")
                self._lock.wait(remaining)
            self._passed.discard(token)

    def stats(self) -> IngestStats:
        """A snapshot of the counters."""
        with self._lock:
            return IngestStats(
                received=self._received,
                malformed=dict(self._malformed),
                dropped_overflow=self._overflow,
                results=dict(self._results),
                batches=self._batches,
                batch_errors=self._batch_errors,
                dropped_batches=self._dropped_batches,
                queue_length=self._queue.qsize(),
            )

    # -- the network thread (Receiver) -------------------------------------------------

    def message(self, topic: str, payload: bytes, retain: bool, received_at: datetime) -> None:
        """Parse one message and queue it; malformed ones are counted and dropped."""
        item: _Item
        if is_service_topic(topic):
            if topic != self.link.probe_topic:
                return  # another coordinator's probe, routed here by a shared subscription
            item = _Barrier(payload, received_at)
        else:
            with self._lock:
                self._received += 1
            try:
                device_id, parsed = decode_device_message(topic, payload)
            except Malformed as e:
                with self._lock:
                    self._malformed[e.reason] += 1
                log.warning(
                    "dropped a malformed message: %s",
                    e,
                    extra={"event": "ingest_malformed", "reason": e.reason, "topic": topic[:200]},
                )
                return
            item = (device_id, parsed, received_at)
        try:
            self._queue.put(item, timeout=self.options.queue_full_wait_s)
        except queue.Full:
            with self._lock:
                self._overflow += 1
            log.error(
                "the ingest queue is full; dropped a message",
                extra={"event": "ingest_overflow", "queue_max": self.options.queue_max},
            )

    # -- the writer thread ----------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=_STOP_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch: list[Incoming] = []
            barriers: list[_Barrier] = []
            item: _Item | None = first
            deadline = time.monotonic() + self.options.batch_wait_s
            while item is not None:
                if isinstance(item, _Barrier):
                    barriers.append(item)
                    break  # write what came before, then let the barrier pass
                batch.append(item)
                if len(batch) >= self.options.batch_max:
                    break
                remaining = deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    item = None
            if batch:
                self._write(batch)
            with self._lock:
                for barrier in barriers:
                    self._advance(barrier.received_at)
                    self._passed.add(barrier.token)
                    if len(self._passed) > 1024:
                        self._passed.clear()
                self._lock.notify_all()

    def _write(self, batch: list[Incoming]) -> None:
        attempt = 0
        while True:
            try:
                results = self._sink(batch)
            except OperationalError as e:
                with self._lock:
                    self._batch_errors += 1
                if self._stop.is_set() and attempt >= 3:
                    self._drop(batch, e)
                    return
                delay = reconnect_delay(
                    attempt,
                    self._rng,
                    min_s=self.options.retry_min_s,
                    max_s=self.options.retry_max_s,
                )
                log.warning(
                    "the registry is unavailable (%s); retrying a batch of %d in %.1f s",
                    e.orig if e.orig is not None else e,
                    len(batch),
                    delay,
                    extra={"event": "ingest_retry"},
                )
                attempt += 1
                self._stop.wait(delay)
                continue
            except Exception as e:
                with self._lock:
                    self._batch_errors += 1
                self._drop(batch, e)
                return
            with self._lock:
                self._batches += 1
                self._results.update(r.value for r in results)
                self._advance(max(received for _, _, received in batch))
            return

    def _drop(self, batch: list[Incoming], error: Exception) -> None:
        with self._lock:
            self._dropped_batches += 1
        log.error(
            "dropped a batch of %d device messages: %s",
            len(batch),
            error,
            exc_info=error,
            extra={"event": "ingest_batch_dropped"},
        )

    def _advance(self, received_at: datetime) -> None:
        if self._written_through is None or received_at > self._written_through:
            self._written_through = received_at
