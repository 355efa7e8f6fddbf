"""The link's timing and sending decisions (pure; time and randomness come in as arguments).

- Reconnect backoff with per-device jitter (:func:`reconnect_delay`, :class:`Backoff`): a
  fleet whose broker restarts must not come back in lockstep. paho's own backoff doubles
  a fixed delay without jitter; the link replaces each of its waits with one from here.
- The outbox policy (:func:`outbox_verdict`): what to do with an outgoing message given
  the connection. A status or a heartbeat made while the broker is away is stale by the
  time it returns (the link publishes a fresh status on every connect); update progress
  is history the coordinator needs, so it is held, bounded, and sent in order.
- The worker schedule (:class:`Schedule`): the status right after each connect, then a
  heartbeat every interval while connected, nothing while disconnected.
"""

from __future__ import annotations

import random
from enum import Enum

#: Doubling stops after this many attempts (the delay is long capped by then).
_MAX_DOUBLINGS = 32


def _check_bounds(min_s: float, max_s: float) -> None:
    if not 0 < min_s <= max_s:
        raise ValueError(f"need 0 < min_s <= max_s (got {min_s:g}, {max_s:g})")


def reconnect_delay(attempt: int, rng: random.Random, *, min_s: float, max_s: float) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based, counted since the last success).

    Uniform in ``[min_s, min(max_s, min_s * 2**(attempt + 1))]``: never below ``min_s`` (no
    hot loop), a window that doubles per attempt up to ``[min_s, max_s]``, so devices that
    lost the broker together spread out. Raises ``ValueError`` for ``attempt < 0`` or
    ``not 0 < min_s <= max_s``.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0 (got {attempt})")
    _check_bounds(min_s, max_s)
    cap = min(max_s, min_s * 2 ** (min(attempt, _MAX_DOUBLINGS) + 1))
    return rng.uniform(min_s, cap)


class Backoff:
    """Counts failed attempts since the last accepted connection and picks each wait."""

    def __init__(self, rng: random.Random, *, min_s: float, max_s: float) -> None:
        _check_bounds(min_s, max_s)
        self._rng = rng
        self.min_s, self.max_s = min_s, max_s
        self.attempt = 0

    def failed(self) -> float:
        """A connection failed or was lost: the wait before the next attempt (seconds)."""
        delay = reconnect_delay(self.attempt, self._rng, min_s=self.min_s, max_s=self.max_s)
        self.attempt += 1
        return delay

    def succeeded(self) -> None:
        """The broker accepted a connection: start over from the shortest wait."""
        self.attempt = 0


class Outgoing(Enum):
    """What the link publishes."""

    STATUS = "status"
    HEARTBEAT = "heartbeat"
    PROGRESS = "progress"


class Verdict(Enum):
    """What to do with one outgoing message now."""

    SEND = "send"
    HOLD = "hold"
    """Keep it in the outbox; it is sent, in order, once connected."""
    DROP = "drop"


def outbox_verdict(kind: Outgoing, *, connected: bool, held: int) -> Verdict:
    """Decide for a message of ``kind`` with ``held`` messages already in the outbox.

    Progress is held while disconnected, and also while older progress waits to be
    flushed (so it never overtakes it); status and heartbeats are sent when connected and
    dropped otherwise.
    """
    if kind is Outgoing.PROGRESS:
        return Verdict.SEND if connected and held == 0 else Verdict.HOLD
    return Verdict.SEND if connected else Verdict.DROP


class Task(Enum):
    """Work the link's worker thread does."""

    ONLINE = "online"
    """Publish the retained status (and register its offline copy as the will), then
    flush the outbox."""
    HEARTBEAT = "heartbeat"


class Schedule:
    """When the worker acts; ``now`` values are monotonic seconds."""

    def __init__(self, heartbeat_interval_s: float) -> None:
        if heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0 (got {heartbeat_interval_s})")
        self.interval_s = heartbeat_interval_s
        self._online_due = False
        self._flush_due = False
        self._next_beat: float | None = None

    @property
    def connected(self) -> bool:
        """True between :meth:`on_connect` and :meth:`on_disconnect`."""
        return self._next_beat is not None

    def on_connect(self, now: float) -> None:
        """A connection was accepted: the status is due, and a heartbeat right after it."""
        self._online_due = True
        self._next_beat = now

    def on_disconnect(self) -> None:
        """The connection is gone: nothing is due until the next one."""
        self._online_due = self._flush_due = False
        self._next_beat = None

    def on_held(self) -> None:
        """A message went to the outbox: flush it as soon as connected."""
        self._flush_due = True

    def take(self, now: float) -> list[Task]:
        """The tasks due at ``now``, in order; each is handed out once."""
        if self._next_beat is None:
            return []
        tasks: list[Task] = []
        if self._online_due or self._flush_due:
            tasks.append(Task.ONLINE)
            self._online_due = self._flush_due = False
        if now >= self._next_beat:
            tasks.append(Task.HEARTBEAT)
            # A worker that fell behind skips the missed beats instead of bursting them.
            self._next_beat = max(self._next_beat + self.interval_s, now)
            if self._next_beat == now:
                self._next_beat = now + self.interval_s
        return tasks

    def wait_s(self, now: float) -> float | None:
        """How long the worker may sleep before something is due; None: until woken."""
        if self._next_beat is None:
            return None
        if self._online_due or self._flush_due:
            return 0.0
        return max(0.0, self._next_beat - now)
