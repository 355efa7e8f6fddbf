"""The scheduler's pure core: admission, a bounded FIFO queue, a concurrency limit, deadlines.

No threads, no clock, no I/O: the runner (:mod:`agent.server.runner`) passes the time in and
acts on what the core returns. Invariants:

- At most ``concurrency`` items run at once; a slot is freed only by :meth:`release`, which
  the runner calls when the engine has really stopped (not when the client went away).
- At most ``queue_length_max`` items wait; one more is refused with
  :class:`~agent.errors.OverloadedError`, never queued.
- Waiting items start in arrival order (FIFO); a withdrawn or expired item never starts.
- Each item is reported overdue at most once by :meth:`expire`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from agent.errors import OverloadedError

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Expired(Generic[K]):
    """What :meth:`SchedulerCore.expire` found past its deadline."""

    #: Items that were still waiting; they have left the queue and will never start.
    queued: list[K] = field(default_factory=list)
    #: Items that are running; the runner must cancel them (they keep their slot until released).
    running: list[K] = field(default_factory=list)


class SchedulerCore(Generic[K]):
    """Decides which request runs when. Keys identify requests; deadlines are clock values."""

    def __init__(self, *, concurrency: int, queue_length_max: int, retry_after_s: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if queue_length_max < 0:
            raise ValueError(f"queue_length_max must be >= 0, got {queue_length_max}")
        self.concurrency = concurrency
        self.queue_length_max = queue_length_max
        self.retry_after_s = retry_after_s
        self._running: dict[K, float] = {}
        self._queue: OrderedDict[K, float] = OrderedDict()
        self._overdue: set[K] = set()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, key: K, deadline: float) -> bool:
        """Admit ``key``: True if it may start now, False if it waits in the queue.

        Raises:
            OverloadedError: every slot is busy and the queue holds ``queue_length_max`` items.
            ValueError: ``key`` is already admitted.
        """
        if key in self._running or key in self._queue:
            raise ValueError(f"request {key!r} was already admitted")
        if len(self._running) < self.concurrency and not self._queue:
            self._running[key] = deadline
            return True
        if len(self._queue) >= self.queue_length_max:
            raise OverloadedError(
                f"the inference queue is full ({self.queue_length_max} waiting, "
                f"{self.concurrency} running); retry after {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        self._queue[key] = deadline
        return False

    def release(self, key: K) -> list[K]:
        """``key`` stopped running; return the queued keys that start now, in FIFO order.

        Raises:
            ValueError: ``key`` is not running.
        """
        if key not in self._running:
            raise ValueError(f"request {key!r} is not running")
        del self._running[key]
        self._overdue.discard(key)
        return self._promote()

    def withdraw(self, key: K) -> bool:
        """Remove a waiting ``key`` (its client left). False if it was not waiting."""
        return self._queue.pop(key, None) is not None

    def expire(self, now: float) -> Expired[K]:
        """Remove waiting keys whose deadline is ``<= now``; name running ones newly overdue."""
        gone = [key for key, deadline in self._queue.items() if deadline <= now]
        for key in gone:
            del self._queue[key]
        overdue = [
            key
            for key, deadline in self._running.items()
            if deadline <= now and key not in self._overdue
        ]
        self._overdue.update(overdue)
        return Expired(queued=gone, running=overdue)

    def next_deadline(self) -> float | None:
        """The earliest deadline :meth:`expire` has yet to act on, or None."""
        pending = [d for k, d in self._running.items() if k not in self._overdue]
        pending.extend(self._queue.values())
        return min(pending, default=None)

    def _promote(self) -> list[K]:
        started: list[K] = []
        while self._queue and len(self._running) < self.concurrency:
            key, deadline = self._queue.popitem(last=False)
            self._running[key] = deadline
            started.append(key)
        return started
