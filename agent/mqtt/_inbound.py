"""Incoming messages: which topics the device follows, and message -> typed event (pure).

Invariants:

- :func:`decode_message` never raises for anything a remote sends: every payload either
  becomes an event or a :class:`Rejected` naming a :class:`DropReason`. It runs in paho's
  network thread, so it does nothing but parse (size first, then the protocol's schema).
- A payload is taken only on a topic the device subscribed to, and only if it names the
  group (and channel) of that topic: a message is about the topic it came on.
- Events carry hints, never trust (see :mod:`protocol.messages`): an announcement makes the
  OTA runner refresh its signed metadata, nothing more.
- :class:`BoundedQueue` never blocks its producer: when full it drops the oldest item (a
  newer announcement supersedes an older one) and counts it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum
from typing import Generic, TypeVar

from pydantic import ValidationError

from protocol import topics
from protocol.messages import PayloadTooLargeError, ReleaseAnnouncement, decode_payload
from protocol.rounds import RoundInvitation


@dataclass(frozen=True, slots=True)
class AnnouncementReceived:
    """A release announcement for a followed group and channel (a hint to check the repo)."""

    announcement: ReleaseAnnouncement
    retained: bool
    """True when the broker sent its retained copy (on subscribing), False when live."""
    received_at: datetime


@dataclass(frozen=True, slots=True)
class InvitationReceived:
    """A round invitation for a followed group."""

    invitation: RoundInvitation
    retained: bool
    received_at: datetime


#: What the link hands to the daemon.
LinkEvent = AnnouncementReceived | InvitationReceived


class DropReason(StrEnum):
    """Why an incoming message became no event."""

    OVERSIZE = "oversize"
    """Over :data:`protocol.messages.MAX_PAYLOAD_BYTES`; not parsed."""
    MALFORMED = "malformed"
    """Not valid JSON for the topic's message (including a newer ``schema_version``)."""
    MISMATCHED = "mismatched"
    """Valid, but names another group or channel than the topic it came on."""
    EMPTY = "empty"
    """Zero bytes: the coordinator cleared a retained message."""
    UNEXPECTED_TOPIC = "unexpected_topic"
    """A topic the device did not subscribe to."""
    QUEUE_FULL = "queue_full"
    """Decoded, but the event queue was full: the oldest event made room for it."""
    INTERNAL = "internal"
    """Handling it raised an unexpected error (a bug; logged with its traceback)."""


class Kind(Enum):
    """Which message a followed topic carries."""

    ANNOUNCEMENT = "announcement"
    INVITATION = "invitation"


@dataclass(frozen=True, slots=True)
class Route:
    """A followed topic: what it carries and the group (and channel) it is about.

    A device's own release topic has the device id as ``group`` and no channel (any).
    """

    topic: str
    kind: Kind
    group: str
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that became no event, and why (``detail`` is for the log)."""

    reason: DropReason
    detail: str


def routes_for(
    groups: Iterable[str],
    channels: Iterable[str],
    *,
    rounds: bool,
    device_id: str | None = None,
) -> dict[str, Route]:
    """The topics a device follows, keyed by topic: each group's channels, its rounds, and
    (with ``device_id``) the device's own release topic, where a staged rollout's wave is
    announced. An announcement there must name the device id as its group, any channel.

    Raises:
        protocol.topics.TopicError: a group, channel or device id is not a valid segment.
    """
    wanted = list(channels)
    routes: dict[str, Route] = {}
    if device_id is not None:
        topic = topics.device_releases(device_id)
        routes[topic] = Route(topic, Kind.ANNOUNCEMENT, device_id)
    for group in groups:
        for channel in wanted:
            topic = topics.release_announcements(group, channel)
            routes[topic] = Route(topic, Kind.ANNOUNCEMENT, group, channel)
        if rounds:
            topic = topics.round_invitations(group)
            routes[topic] = Route(topic, Kind.INVITATION, group)
    return routes


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(payload)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def decode_message(
    routes: Mapping[str, Route],
    topic: str,
    payload: bytes,
    *,
    retained: bool,
    received_at: datetime,
) -> LinkEvent | Rejected:
    """Turn one received message into an event, or say why it is dropped. Never raises."""
    route = routes.get(topic)
    if route is None:
        return Rejected(DropReason.UNEXPECTED_TOPIC, f"not a followed topic: {topic[:200]!r}")
    if not payload:
        return Rejected(DropReason.EMPTY, f"{topic}: retained message cleared")
    try:
        if route.kind is Kind.ANNOUNCEMENT:
            announcement = decode_payload(ReleaseAnnouncement, payload)
            named = (announcement.group, announcement.channel)
            if named != (route.group, route.channel or announcement.channel):
                return Rejected(
                    DropReason.MISMATCHED,
                    f"{topic}: the announcement names group {named[0]!r} channel {named[1]!r}",
                )
            return AnnouncementReceived(announcement, retained, received_at)
        invitation = decode_payload(RoundInvitation, payload)
        if invitation.group != route.group:
            return Rejected(
                DropReason.MISMATCHED,
                f"{topic}: the invitation names group {invitation.group!r}",
            )
        return InvitationReceived(invitation, retained, received_at)
    except PayloadTooLargeError as e:
        return Rejected(DropReason.OVERSIZE, f"{topic}: {e}")
    except ValidationError as e:
        return Rejected(DropReason.MALFORMED, f"{topic}: {_first_error(e)}")


T = TypeVar("T")


class BoundedQueue(Generic[T]):
    """A thread-safe FIFO of at most ``maxlen`` items whose :meth:`put` never blocks.

    When full, :meth:`put` drops the oldest item to make room and counts it in
    :attr:`dropped`.
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be at least 1 (got {maxlen})")
        self.maxlen = maxlen
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._dropped = 0

    def put(self, item: T) -> bool:
        """Append ``item``; False when the oldest item was dropped to make room."""
        with self._cond:
            kept_all = len(self._items) < self.maxlen
            if not kept_all:
                self._items.popleft()
                self._dropped += 1
            self._items.append(item)
            self._cond.notify()
            return kept_all

    def get(self, timeout_s: float | None = 0.0) -> T | None:
        """The oldest item, waiting up to ``timeout_s`` (None: for ever); None if none came."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._items.popleft()

    def drain(self) -> list[T]:
        """Every item, oldest first, leaving the queue empty."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    @property
    def dropped(self) -> int:
        """How many items were dropped to make room so far."""
        with self._cond:
            return self._dropped

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
