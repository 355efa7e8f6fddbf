"""Offline detection: a pure function of timestamps, debounced against broker restarts.

A device is judged by the age of its last heartbeat, as received by the coordinator (its
own clock; device clocks are not trusted for this). Invariants:

- A device is ``offline`` only after ``missed`` heartbeat intervals of silence. One late or
  lost heartbeat never flips it.
- Silence counts only while the coordinator's MQTT link is up. A device not heard from
  since the link (re)connected (``link.connected_since``) keeps its stored state for
  ``missed`` intervals (its grace to reconnect), then is ``offline``. So a broker restart
  flaps nobody: online devices stay online while they reconnect, offline ones stay offline
  until they beat again. While the link is down, or has heard nothing for a whole interval
  (``link.last_message_at``, which the link keeps fresh with its own probe), there is no
  verdict at all: the stored state stands.
- The Last Will is a hint, not proof: if the device's will arrived after its last
  heartbeat, and that heartbeat came over the current link, ``missed_after_will`` intervals
  suffice. A retained will re-delivered on resubscribe predates the link's heartbeats, so
  it never shortens the wait.
- A device registered but never heard from keeps its state (``unknown`` when new) for
  ``missed`` intervals after its registration or the link's start, whichever is later,
  then is ``offline``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

__all__ = ["LinkState", "LivenessRule", "Online", "judge"]


class Online(StrEnum):
    """What the coordinator believes about a device's connection."""

    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class LivenessRule:
    """The heartbeat interval (seconds) and how many may be missed before ``offline``."""

    interval_s: float = 30.0
    missed: int = 3
    missed_after_will: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.interval_s <= 86400:
            raise ValueError(f"interval_s {self.interval_s} is outside (0, 86400] seconds")
        if not 1 <= self.missed_after_will <= self.missed <= 1000:
            raise ValueError(
                f"need 1 <= missed_after_will ({self.missed_after_will}) <= missed "
                f"({self.missed}) <= 1000"
            )


@dataclass(frozen=True)
class LinkState:
    """The coordinator's MQTT link: connected since when (``None``: down), last heard when."""

    connected_since: datetime | None
    last_message_at: datetime | None


def judge(
    *,
    last_seen: datetime | None,
    will_at: datetime | None,
    registered_at: datetime,
    link: LinkState,
    rule: LivenessRule,
    now: datetime,
) -> Online | None:
    """Return the device's state, or ``None`` when the link cannot tell (keep the old one)."""
    interval = timedelta(seconds=rule.interval_s)
    since = link.connected_since
    heard = link.last_message_at
    if since is None or heard is None or now - heard > interval:
        return None
    if last_seen is not None and last_seen >= since:
        will_hint = will_at is not None and will_at >= last_seen
        missed = rule.missed_after_will if will_hint else rule.missed
        return Online.OFFLINE if now - last_seen > missed * interval else Online.ONLINE
    if now - max(since, registered_at) <= rule.missed * interval:
        return None
    return Online.OFFLINE
