"""The link's timing and sending decisions (pure; time and randomness come in as arguments).

- Reconnect backoff with per-device jitter (:func:`reconnect_delay`, :class:`Backoff`): a
  fleet whose broker restarts must not come back in lockstep. paho's own backoff doubles
  a fixed delay without jitter; the link replaces each of its waits with one from here.
- The worker schedule (:class:`Schedule`): the status right after each connect (and after
  each change the daemon signals), then a heartbeat every interval while connected,
  nothing while disconnected. A status or a heartbeat is never queued while the broker is
  away: it would be stale by the time it returns, and a fresh status goes on every connect.
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

    def on_changed(self) -> None:
        """The device's state changed: publish a fresh status as soon as connected."""
        self._online_due = True

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
