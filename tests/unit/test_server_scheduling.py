"""The scheduler's pure core and its runner, driven by the test (no model, no sockets)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from agent.errors import DeadlineExceededError, OverloadedError
from agent.server.runner import Scheduler
from agent.server.scheduling import SchedulerCore


def core(concurrency: int = 1, queue: int = 2) -> SchedulerCore[str]:
    return SchedulerCore(concurrency=concurrency, queue_length_max=queue, retry_after_s=3)


# -- the pure core -----------------------------------------------------------------------


def test_admits_up_to_concurrency_then_queues_then_refuses() -> None:
    c = core(concurrency=2, queue=1)
    assert c.submit("a", 10.0) is True
    assert c.submit("b", 10.0) is True
    assert c.submit("c", 10.0) is False
    with pytest.raises(OverloadedError, match="queue is full") as info:
        c.submit("d", 10.0)
    assert info.value.retry_after_s == 3
    assert (c.running, c.queued) == (2, 1)


def test_zero_length_queue_refuses_when_busy() -> None:
    c = core(concurrency=1, queue=0)
    assert c.submit("a", 1.0)
    with pytest.raises(OverloadedError):
        c.submit("b", 1.0)


def test_release_promotes_in_fifo_order() -> None:
    c = core(concurrency=1, queue=3)
    c.submit("a", 9.0)
    for key in "bcd":
        assert c.submit(key, 9.0) is False
    assert c.release("a") == ["b"]
    assert c.release("b") == ["c"]
    assert c.release("c") == ["d"]
    assert c.release("d") == []
    assert (c.running, c.queued) == (0, 0)


def test_a_newcomer_never_overtakes_the_queue() -> None:
    c = core(concurrency=2, queue=2)
    c.submit("a", 9.0)
    c.submit("b", 9.0)
    c.submit("c", 9.0)
    c.release("a")  # c starts
    assert c.submit("d", 9.0) is False  # one slot is taken by c, the other by b


def test_withdrawn_request_never_starts() -> None:
    c = core(concurrency=1, queue=2)
    c.submit("a", 9.0)
    c.submit("b", 9.0)
    c.submit("c", 9.0)
    assert c.withdraw("b") is True
    assert c.withdraw("b") is False
    assert c.release("a") == ["c"]


def test_expire_removes_queued_and_reports_running_once() -> None:
    c = core(concurrency=1, queue=2)
    c.submit("a", 5.0)
    c.submit("b", 4.0)
    c.submit("c", 50.0)
    assert c.next_deadline() == 4.0
    assert c.expire(3.9).queued == []
    gone = c.expire(5.0)
    assert (gone.queued, gone.running) == (["b"], ["a"])
    again = c.expire(6.0)
    assert (again.queued, again.running) == ([], [])
    assert c.next_deadline() == 50.0  # a is overdue already, c is next
    assert c.release("a") == ["c"]


def test_double_submit_and_foreign_release_are_refused() -> None:
    c = core()
    c.submit("a", 1.0)
    with pytest.raises(ValueError, match="already admitted"):
        c.submit("a", 1.0)
    with pytest.raises(ValueError, match="not running"):
        c.release("zzz")


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        SchedulerCore(concurrency=0, queue_length_max=1, retry_after_s=1)
    with pytest.raises(ValueError, match="queue_length_max"):
        SchedulerCore(concurrency=1, queue_length_max=-1, retry_after_s=1)


# -- the runner ----------------------------------------------------------------------------


class Steps:
    """A blocking job the test drives one item at a time; counts what it produced."""

    def __init__(self) -> None:
        self.go = threading.Semaphore(0)
        self.produced = 0
        self.stopped = threading.Event()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.go.release()

    def __call__(self, cancel: threading.Event) -> Iterator[int]:
        try:
            for i in range(1000):
                while not self.go.acquire(timeout=0.01):
                    if cancel.is_set():
                        return
                if cancel.is_set():
                    return
                self.produced += 1
                yield i
        finally:
            self.stopped.set()


async def wait_until(predicate: object, timeout_s: float = 5.0) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def make_scheduler(concurrency: int = 1, queue: int = 4, deadline_s: float = 30.0) -> Scheduler:
    return Scheduler(
        SchedulerCore(concurrency=concurrency, queue_length_max=queue, retry_after_s=1),
        deadline_s=deadline_s,
    )


async def consume(s: Scheduler, job: Steps, upto: int | None = None) -> list[int]:
    out: list[int] = []
    async with s.admit() as slot:
        async for item in slot.stream(job):
            out.append(item)
            if upto is not None and len(out) >= upto:
                break
    return out


def test_runner_runs_fifo_and_frees_the_slot_only_when_the_job_stops() -> None:
    async def main() -> None:
        s = make_scheduler(concurrency=1)
        first, second = Steps(), Steps()
        t1 = asyncio.create_task(consume(s, first, upto=2))
        await wait_until(lambda: s.running == 1)
        t2 = asyncio.create_task(consume(s, second, upto=1))
        await wait_until(lambda: s.queued == 1)
        first.release(2)
        assert await t1 == [0, 1]
        # The consumer left after two items; the job stops at its next step.
        await wait_until(first.stopped.is_set)
        assert first.produced == 2
        second.release(1)
        assert await t2 == [0]
        await wait_until(lambda: s.running == 0 and s.queued == 0)
        s.shutdown()

    asyncio.run(main())


def test_client_gone_while_streaming_cancels_within_one_item() -> None:
    async def main() -> None:
        s = make_scheduler()
        job = Steps()
        task = asyncio.create_task(consume(s, job))
        job.release(3)
        await wait_until(lambda: job.produced == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(job.stopped.is_set)
        job.release(10)
        assert job.produced <= 4
        await wait_until(lambda: s.running == 0)
        s.shutdown()

    asyncio.run(main())


def test_client_gone_while_queued_never_runs() -> None:
    async def main() -> None:
        s = make_scheduler()
        first, ghost = Steps(), Steps()
        t1 = asyncio.create_task(consume(s, first, upto=1))
        await wait_until(lambda: s.running == 1)
        t2 = asyncio.create_task(consume(s, ghost))
        await wait_until(lambda: s.queued == 1)
        t2.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t2
        assert s.queued == 0
        first.release()
        await t1
        await wait_until(lambda: s.running == 0)
        assert ghost.produced == 0
        s.shutdown()

    asyncio.run(main())


def test_full_queue_is_refused_with_retry_after() -> None:
    async def main() -> None:
        s = make_scheduler(queue=1)
        a, b = Steps(), Steps()
        ta = asyncio.create_task(consume(s, a, upto=1))
        await wait_until(lambda: s.running == 1)
        tb = asyncio.create_task(consume(s, b, upto=1))
        await wait_until(lambda: s.queued == 1)
        with pytest.raises(OverloadedError) as info:
            async with s.admit():
                pass
        assert info.value.retry_after_s == 1
        a.release()
        b.release()
        await asyncio.gather(ta, tb)
        s.shutdown()

    asyncio.run(main())


def test_deadline_while_queued_and_while_running() -> None:
    async def main() -> None:
        now = [0.0]
        s = Scheduler(
            SchedulerCore(concurrency=1, queue_length_max=2, retry_after_s=1),
            deadline_s=10.0,
            clock=lambda: now[0],
        )
        slow, waiting = Steps(), Steps()
        t1 = asyncio.create_task(consume(s, slow))
        await wait_until(lambda: s.running == 1)
        t2 = asyncio.create_task(consume(s, waiting))
        await wait_until(lambda: s.queued == 1)
        slow.release(1)
        await wait_until(lambda: slow.produced == 1)
        now[0] = 10.0
        s._rearm()  # the injected clock jumped; fire the timer now
        with pytest.raises(DeadlineExceededError, match="queue"):
            await t2
        with pytest.raises(DeadlineExceededError, match="deadline of 10 s"):
            await t1
        assert slow.produced == 1
        await wait_until(lambda: s.running == 0)
        assert waiting.produced == 0
        s.shutdown()

    asyncio.run(main())


def test_drain_waits_for_admitted_work_and_refuses_new() -> None:
    async def main() -> None:
        s = make_scheduler()
        job = Steps()
        task = asyncio.create_task(consume(s, job, upto=2))
        await wait_until(lambda: s.running == 1)
        s.close_admission()
        with pytest.raises(OverloadedError, match="shutting down"):
            async with s.admit():
                pass
        drained = asyncio.create_task(s.drain(30.0))
        job.release(2)
        assert await drained is True
        assert await task == [0, 1]
        s.shutdown()

    asyncio.run(main())


def test_drain_timeout_cancels_running_jobs() -> None:
    async def main() -> None:
        s = make_scheduler()
        job = Steps()
        task = asyncio.create_task(consume(s, job))
        await wait_until(lambda: s.running == 1)
        assert await s.drain(0.05) is False
        await wait_until(job.stopped.is_set)
        assert await task == []
        s.shutdown()

    asyncio.run(main())


def test_job_errors_reach_the_consumer_and_free_the_slot() -> None:
    def broken(cancel: threading.Event) -> Iterator[int]:
        yield 1
        raise RuntimeError("engine fell over")

    async def main() -> None:
        s = make_scheduler()
        got: list[int] = []

        async def run() -> None:
            async with s.admit() as slot:
                async for item in slot.stream(broken):
                    got.append(item)

        with pytest.raises(RuntimeError, match="fell over"):
            await run()
        assert got == [1]
        await wait_until(lambda: s.running == 0)
        s.shutdown()

    asyncio.run(main())


def test_stall_is_measured_from_the_last_progress_of_a_running_job() -> None:
    async def main() -> None:
        now = [100.0]
        s = Scheduler(
            SchedulerCore(concurrency=1, queue_length_max=1, retry_after_s=1),
            deadline_s=1000.0,
            clock=lambda: now[0],
        )
        assert s.stalled_s(500.0) == 0.0  # nothing runs
        job = Steps()
        task = asyncio.create_task(consume(s, job, upto=2))
        await wait_until(lambda: s.running == 1)
        now[0] = 130.0
        assert s.stalled_s(now[0]) == 30.0  # started at 100, nothing since
        job.release()
        await wait_until(lambda: job.produced == 1)
        await asyncio.sleep(0)
        await wait_until(lambda: s.stalled_s(now[0]) == 0.0)
        job.release()
        await task
        await wait_until(lambda: s.running == 0)
        assert s.stalled_s(1000.0) == 0.0
        s.shutdown()

    asyncio.run(main())
