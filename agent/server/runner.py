"""The scheduler's runner: drives :class:`SchedulerCore` from the event loop, runs the blocking
engine in worker threads.

Invariants:

- All scheduler state is touched on the event loop thread only; worker threads talk back
  through ``loop.call_soon_threadsafe``.
- A slot is released when its worker thread has returned, never earlier: a client that
  disconnects sets the cancel event, and the next request starts when the engine has
  actually stopped (within one token).
- A request whose deadline passes while queued fails with
  :class:`~agent.errors.DeadlineExceededError`; one that is generating is cancelled and its
  stream ends with the same error.
- Once :meth:`Scheduler.close_admission` was called, new requests are refused; admitted ones
  still run (graceful drain).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from agent.errors import DeadlineExceededError, OverloadedError
from agent.server.scheduling import SchedulerCore

T = TypeVar("T")

_ITEM, _END, _ERROR = range(3)


class Slot:
    """A request's turn at the engine: one blocking job, a cancel event, a deadline flag."""

    def __init__(self, scheduler: Scheduler, key: int) -> None:
        self._scheduler = scheduler
        self.key = key
        #: Set to make the engine stop (client gone, deadline passed, shutdown).
        self.cancel = threading.Event()
        #: True once the deadline passed while this slot was running.
        self.deadline_hit = False
        self._job: asyncio.Future[None] | None = None

    async def stream(self, work: Callable[[threading.Event], Iterator[T]]) -> AsyncIterator[T]:
        """Run ``work(cancel)`` in a worker thread and yield what its iterator produces.

        Leaving the iteration early (the consumer stops or is cancelled) sets the cancel event.

        Raises:
            RuntimeError: a job already ran in this slot.
            DeadlineExceededError: the deadline passed during the job.
            Exception: whatever ``work`` raised, unchanged.
        """
        if self._job is not None:
            raise RuntimeError("a slot runs one job")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def post(kind: int, value: object) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, (kind, value))
            except RuntimeError:
                return  # the loop is closed: nobody is listening any more

        def pump() -> None:
            try:
                for item in work(self.cancel):
                    post(_ITEM, item)
            except BaseException as e:
                post(_ERROR, e)
            else:
                post(_END, None)

        self._scheduler.mark_progress()
        self._job = loop.run_in_executor(self._scheduler.executor, pump)
        self._job.add_done_callback(lambda _: self._scheduler._release(self.key))
        try:
            while True:
                kind, value = await inbox.get()
                self._scheduler.mark_progress()
                if kind == _ITEM:
                    yield value
                elif kind == _ERROR:
                    raise value
                else:
                    break
        finally:
            self.cancel.set()
        if self.deadline_hit:
            raise DeadlineExceededError(
                f"the request did not finish within its deadline of "
                f"{self._scheduler.deadline_s:g} s"
            )

    @property
    def job_started(self) -> bool:
        return self._job is not None


class Scheduler:
    """Admits requests FIFO into a bounded number of engine slots."""

    def __init__(
        self,
        core: SchedulerCore[int],
        *,
        deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_busy: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_busy(True)`` is called when the first request is admitted after an idle
        spell, ``on_busy(False)`` when the last one is done (on the event loop: keep it
        short)."""
        self.core = core
        self._on_busy = on_busy
        self.deadline_s = deadline_s
        self._clock = clock
        self.executor = ThreadPoolExecutor(
            max_workers=core.concurrency, thread_name_prefix="nanofleet-generate"
        )
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._slots: dict[int, Slot] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._admitting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._progress_at = clock()

    @property
    def queued(self) -> int:
        return self.core.queued

    def stalled_s(self, now: float) -> float:
        """Seconds since a running job last made progress (0 when nothing runs)."""
        if self.core.running == 0:
            return 0.0
        return max(0.0, now - self._progress_at)

    @property
    def running(self) -> int:
        return self.core.running

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Slot]:
        """Wait for a slot (FIFO) and hold it for the ``async with`` body.

        Raises:
            OverloadedError: the queue is full, or the server is draining.
            DeadlineExceededError: the deadline passed while the request waited.
        """
        if not self._admitting:
            raise OverloadedError(
                "the agent is shutting down and accepts no new requests",
                retry_after_s=self.core.retry_after_s,
            )
        key = next(self._ids)
        slot = Slot(self, key)
        started = self.core.submit(key, self._clock() + self.deadline_s)
        self._slots[key] = slot
        if self._idle.is_set() and self._on_busy is not None:
            self._on_busy(True)
        self._idle.clear()
        if not started:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[key] = waiter
            self._rearm()
            try:
                await waiter
            except BaseException:
                self._waiters.pop(key, None)
                if self.core.withdraw(key):
                    self._forget(key)
                raise
        self._rearm()
        try:
            yield slot
        finally:
            if not slot.job_started:
                self._release(key)
            else:
                slot.cancel.set()

    def close_admission(self) -> None:
        """Refuse new requests from now on; admitted ones go on."""
        self._admitting = False

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every admitted request has finished; False if ``timeout_s`` passed first.

        On timeout the running jobs are cancelled (they stop within one token).
        """
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            for slot in self._slots.values():
                slot.cancel.set()
            return False
        return True

    def shutdown(self) -> None:
        """Cancel whatever still runs and stop the worker threads (waits for them).

        The one method that may run off the event loop (it blocks): it reads a snapshot of
        the slots, which the loop may be releasing meanwhile.
        """
        for slot in list(self._slots.values()):
            slot.cancel.set()
        self.executor.shutdown(wait=True)

    def mark_progress(self) -> None:
        """A job started or produced something (feeds :meth:`stalled_s`)."""
        self._progress_at = self._clock()

    def _release(self, key: int) -> None:
        self.mark_progress()
        for started in self.core.release(key):
            waiter = self._waiters.pop(started)
            if waiter.done():
                # Its client left between being promoted and hearing about it.
                self._release(started)
            else:
                waiter.set_result(None)
        self._forget(key)
        self._rearm()

    def _forget(self, key: int) -> None:
        self._slots.pop(key, None)
        if not self._slots and not self._idle.is_set():
            self._idle.set()
            if self._on_busy is not None:
                self._on_busy(False)

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.core.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        expired = self.core.expire(self._clock())
        for key in expired.queued:
            waiter = self._waiters.pop(key)
            self._forget(key)
            if not waiter.done():
                waiter.set_exception(
                    DeadlineExceededError(
                        f"the request waited in the queue past its deadline of "
                        f"{self.deadline_s:g} s"
                    )
                )
        for key in expired.running:
            slot = self._slots[key]
            slot.deadline_hit = True
            slot.cancel.set()
        self._rearm()
