"""The pure update lifecycle, its resume rules, and the runner driven by a fake controller."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.errors import (
    ActivationFailedError,
    DownloadFailedError,
    HealthCheckFailedError,
    TargetHashMismatchError,
)
from agent.ota import lifecycle as lc
from agent.ota.lifecycle import Phase, Policy, UpdateRecord, progress_message, resume, step
from agent.ota.plan import ReleasePlan
from agent.ota.runner import RecordStore, UpdateRunner, jittered_backoff
from agent.ota.slots import InstalledRelease
from protocol.messages import ReleaseAnnouncement, Slot, UpdateProgress, UpdateState
from tests.support.repo_simulator import plan_from_bundle, write_base_bundle

AT = datetime(2026, 12, 3, 20, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> ReleasePlan:
    directory = tmp_path_factory.mktemp("bundle")
    write_base_bundle(directory, version="2.0.0")
    return plan_from_bundle(directory, counter=2)


def installed(plan: ReleasePlan, slot: Slot) -> InstalledRelease:
    return InstalledRelease(
        slot=slot,
        release_id=plan.release_id,
        group=plan.group,
        channel=plan.channel,
        base=plan.base.ref,
        adapter=None,
        release_counter=2,
    )


def run_to(plan: ReleasePlan, phase: Phase) -> UpdateRecord:
    """Drive a fresh record to ``phase`` along the happy path."""
    events: list[lc.Event] = [
        lc.Announce(),
        lc.ReleaseFound(plan, Slot.A, Slot.B),
        lc.Fetched(),
        lc.Staged(),
        lc.Activated(),
    ]
    record = UpdateRecord()
    for event in events:
        if record.phase is phase:
            break
        record, _ = step(record, event)
    assert record.phase is phase
    return record


# ---- the pure machine -----------------------------------------------------------------------


def test_the_happy_path_persists_before_every_risky_step(plan: ReleasePlan) -> None:
    record = UpdateRecord()
    events: list[lc.Event] = [
        lc.Announce(),
        lc.ReleaseFound(plan, Slot.A, Slot.B),
        lc.FetchProgressed(10, 100),
        lc.Fetched(),
        lc.Staged(),
        lc.Activated(),
        lc.HealthPassed(),
        lc.Committed(),
    ]
    phases, works = [], []
    for event in events:
        record, actions = step(record, event)
        phases.append(record.phase)
        work = [a for a in actions if isinstance(a, lc.WORK)]
        assert len(work) <= 1
        if work:
            assert actions[-1] is work[0], "a work action ends its step"
            works.append(type(work[0]).__name__)
        for i, action in enumerate(actions):
            if isinstance(action, lc.Stage | lc.Activate):
                assert any(isinstance(a, lc.Persist) for a in actions[:i])
        persisted = [a.record for a in actions if isinstance(a, lc.Persist)]
        if isinstance(event, lc.Staged):
            assert [r.phase for r in persisted] == [Phase.STAGED, Phase.ACTIVATING]
    assert phases == [
        Phase.ANNOUNCED,
        Phase.FETCHING,
        Phase.FETCHING,
        Phase.VERIFIED,
        Phase.ACTIVATING,
        Phase.HEALTH_CHECK,
        Phase.HEALTH_CHECK,
        Phase.COMMITTED,
    ]
    assert works == ["CheckRelease", "Fetch", "Stage", "Activate", "HealthCheck", "Commit"]
    assert record.activations == 1


def test_nothing_new_returns_to_idle(plan: ReleasePlan) -> None:
    record, _ = step(UpdateRecord(), lc.Announce())
    record, actions = step(record, lc.NothingNew())
    assert record.phase is Phase.IDLE
    assert actions == [lc.Persist(record)]


def test_a_transient_failure_waits_then_retries_then_fails(plan: ReleasePlan) -> None:
    record = run_to(plan, Phase.FETCHING)
    policy = Policy(max_attempts=3)
    failure = lc.Failed("download_failed", "cut", transient=True)
    record, actions = step(record, failure, policy)
    assert (record.phase, record.attempts) == (Phase.FETCHING, 1)
    assert actions == [lc.Persist(record), lc.WaitRetry(1)]
    _, actions = step(record, lc.RetryDue(), policy)
    assert actions == [lc.Fetch(plan)]
    record, _ = step(record, failure, policy)
    record, actions = step(record, failure, policy)
    assert record.phase is Phase.FAILED
    assert record.error_code == "download_failed"
    assert isinstance(actions[-1], lc.Report)


def test_a_refusal_fails_at_once(plan: ReleasePlan) -> None:
    record = run_to(plan, Phase.FETCHING)
    record, _ = step(record, lc.Failed("hash_mismatch", "bad bytes", transient=False))
    assert record.phase is Phase.FAILED
    message = progress_message(record, AT)
    assert message is not None
    assert (message.state, message.error_code) == (UpdateState.FAILED, "hash_mismatch")


@pytest.mark.parametrize("phase", [Phase.ACTIVATING, Phase.HEALTH_CHECK])
def test_a_failure_with_the_new_model_live_rolls_back_and_is_remembered(
    plan: ReleasePlan, phase: Phase
) -> None:
    record = run_to(plan, phase)
    failure = lc.Failed("health_check_failed", "slow", transient=False)
    record, actions = step(record, failure)
    assert record.phase is Phase.ROLLED_BACK
    assert plan.release_id in record.rejected
    assert [type(a) for a in actions] == [lc.Persist, lc.Rollback, lc.Report]
    assert actions[1] == lc.Rollback(Slot.A)
    # The same release announced again is not installed again.
    record, _ = step(record, lc.Announce())
    record, actions = step(record, lc.ReleaseFound(plan, Slot.A, Slot.B))
    assert record.phase is Phase.IDLE
    assert not any(isinstance(a, lc.Fetch) for a in actions)


def test_rejected_releases_are_bounded(plan: ReleasePlan) -> None:
    record = run_to(plan, Phase.HEALTH_CHECK).model_copy(
        update={"rejected": tuple(f"{i:064x}" for i in range(3))}
    )
    record, _ = step(record, lc.Failed("x", "y", transient=False), Policy(remember_rejected=3))
    assert record.rejected == (f"{1:064x}", f"{2:064x}", plan.release_id)


def test_an_announcement_during_an_update_is_ignored(plan: ReleasePlan) -> None:
    record = run_to(plan, Phase.FETCHING)
    assert step(record, lc.Announce()) == (record, [])


def test_an_event_out_of_place_is_a_bug(plan: ReleasePlan) -> None:
    with pytest.raises(lc.LifecycleError, match="Fetched is not expected in phase idle"):
        step(UpdateRecord(), lc.Fetched())


@pytest.mark.parametrize(
    ("phase", "committed_new", "activations", "expected", "work"),
    [
        (Phase.IDLE, False, 0, Phase.IDLE, None),
        (Phase.COMMITTED, True, 1, Phase.COMMITTED, None),
        (Phase.ANNOUNCED, False, 0, Phase.ANNOUNCED, lc.CheckRelease),
        (Phase.FETCHING, False, 0, Phase.ANNOUNCED, lc.CheckRelease),
        (Phase.VERIFIED, False, 0, Phase.VERIFIED, lc.Stage),
        (Phase.STAGED, False, 0, Phase.ACTIVATING, lc.Activate),
        (Phase.ACTIVATING, False, 1, Phase.ACTIVATING, lc.Activate),
        (Phase.HEALTH_CHECK, False, 1, Phase.ACTIVATING, lc.Activate),
        (Phase.HEALTH_CHECK, True, 1, Phase.COMMITTED, None),
        (Phase.ACTIVATING, False, 2, Phase.ROLLED_BACK, None),
        (Phase.HEALTH_CHECK, False, 2, Phase.ROLLED_BACK, None),
    ],
)
def test_resume_after_a_crash(
    plan: ReleasePlan,
    phase: Phase,
    committed_new: bool,
    activations: int,
    expected: Phase,
    work: type | None,
) -> None:
    record = UpdateRecord(
        phase=phase,
        plan=None if phase in (Phase.IDLE, Phase.ANNOUNCED) else plan,
        from_slot=Slot.A,
        to_slot=Slot.B,
        activations=activations,
    )
    pointer = installed(plan, Slot.B) if committed_new else None
    after, actions = resume(record, pointer)
    assert after.phase is expected
    works = [a for a in actions if isinstance(a, lc.WORK)]
    assert [type(a) for a in works] == ([work] if work else [])
    if expected is Phase.ROLLED_BACK:
        assert after.error_code == lc.INTERRUPTED_CODE
        assert plan.release_id in after.rejected
        assert not any(isinstance(a, lc.Rollback) for a in actions)  # the restart did it


def test_progress_messages_follow_the_protocol(plan: ReleasePlan) -> None:
    assert progress_message(UpdateRecord(), AT) is None
    fetching, _ = step(run_to(plan, Phase.FETCHING), lc.FetchProgressed(30, 100))
    message = progress_message(fetching, AT)
    assert message is not None
    assert (message.bytes_done, message.bytes_total) == (30, 100)
    staged = run_to(plan, Phase.ACTIVATING)
    message = progress_message(staged, AT)
    assert message is not None
    assert message.target == plan.base.ref
    assert message.error_code is None


# ---- the runner with a fake controller ----------------------------------------------------------


class Crash(BaseException):
    """The process dies here (not an error the runner may catch)."""


class FakeController:
    """A device whose I/O succeeds unless ``faults`` says otherwise; it records every call."""

    def __init__(self, plan: ReleasePlan) -> None:
        self.plan = plan
        self.pointer: InstalledRelease | None = None
        self.live: str | None = None  # the release id in the server
        self.calls: list[str] = []
        self.reports: list[UpdateProgress] = []
        self.faults: dict[str, list[BaseException]] = {}

    def _call(self, name: str) -> None:
        self.calls.append(name)
        pending = self.faults.get(name)
        if pending:
            raise pending.pop(0)

    def restart(self) -> None:
        """What a process restart does: the server loads the committed slot."""
        self.live = self.pointer.release_id if self.pointer else None

    def committed(self) -> InstalledRelease | None:
        return self.pointer

    def inactive_slot(self) -> Slot:
        return Slot.B if self.pointer and self.pointer.slot is Slot.A else Slot.A

    def check(self, hint: ReleaseAnnouncement | None) -> ReleasePlan | None:
        self._call("check")
        if self.pointer and self.pointer.release_id == self.plan.release_id:
            return None
        return self.plan

    def fetch(self, plan: ReleasePlan, progress: Callable[[int, int], None]) -> None:
        self._call("fetch")
        progress(plan.total_bytes, plan.total_bytes)

    def stage(self, plan: ReleasePlan, slot: Slot) -> None:
        self._call("stage")

    def activate(self, plan: ReleasePlan, slot: Slot) -> None:
        self._call("activate")
        self.live = plan.release_id

    def health_check(self, plan: ReleasePlan, slot: Slot) -> None:
        self._call("health_check")

    def commit(self, plan: ReleasePlan, slot: Slot) -> None:
        self._call("commit")
        self.pointer = installed(plan, slot)

    def rollback(self, slot: Slot | None) -> None:
        self._call("rollback")
        self.live = self.pointer.release_id if self.pointer else None

    def cleanup(self) -> None:
        self._call("cleanup")

    def report(self, progress: UpdateProgress) -> None:
        self.reports.append(progress)


def make_runner(
    controller: FakeController, path: Path, policy: Policy | None = None
) -> tuple[UpdateRunner, list[float]]:
    waits: list[float] = []
    runner = UpdateRunner(
        controller,
        RecordStore(path),
        policy=policy,
        backoff=lambda attempt: float(attempt),
        wait=waits.append,
        clock=lambda: AT,
    )
    return runner, waits


def test_the_runner_drives_an_update_to_commit(plan: ReleasePlan, tmp_path: Path) -> None:
    controller = FakeController(plan)
    runner, _ = make_runner(controller, tmp_path / "record.json")
    outcome = runner.handle(lc.Announce())
    assert outcome.error is None
    assert outcome.record.phase is Phase.COMMITTED
    assert controller.calls == [
        "check",
        "fetch",
        "stage",
        "activate",
        "health_check",
        "commit",
        "cleanup",
    ]
    states = [r.state for r in controller.reports]
    assert states == [  # a periodic poll is not reported as an announcement
        UpdateState.FETCHING,
        UpdateState.FETCHING,
        UpdateState.VERIFIED,
        UpdateState.STAGED,
        UpdateState.ACTIVATING,
        UpdateState.HEALTH_CHECK,
        UpdateState.COMMITTED,
    ]
    assert RecordStore(tmp_path / "record.json").load() == outcome.record
    reported = len(controller.reports)
    assert runner.handle(lc.Announce()).record.phase is Phase.IDLE
    assert len(controller.reports) == reported  # a poll that finds nothing says nothing


def test_the_runner_retries_a_transient_failure_with_backoff(
    plan: ReleasePlan, tmp_path: Path
) -> None:
    controller = FakeController(plan)
    controller.faults["fetch"] = [DownloadFailedError("cut"), OSError("disk busy")]
    runner, waits = make_runner(controller, tmp_path / "r.json", Policy(max_attempts=3))
    outcome = runner.handle(lc.Announce())
    assert outcome.record.phase is Phase.COMMITTED
    assert waits == [1.0, 2.0]
    assert controller.calls.count("fetch") == 3


def test_the_runner_reports_a_refusal_with_its_code(plan: ReleasePlan, tmp_path: Path) -> None:
    controller = FakeController(plan)
    controller.faults["fetch"] = [TargetHashMismatchError("bad bytes")]
    runner, waits = make_runner(controller, tmp_path / "r.json")
    outcome = runner.handle(lc.Announce())
    assert isinstance(outcome.error, TargetHashMismatchError)
    assert outcome.record.phase is Phase.FAILED
    assert controller.reports[-1].error_code == "hash_mismatch"
    assert waits == []
    assert "activate" not in controller.calls


@pytest.mark.parametrize(
    ("method", "error"),
    [
        ("activate", ActivationFailedError("the model does not load")),
        ("health_check", HealthCheckFailedError("first token too slow")),
    ],
)
def test_the_runner_rolls_back_a_bad_model(
    plan: ReleasePlan, tmp_path: Path, method: str, error: Exception
) -> None:
    controller = FakeController(plan)
    controller.faults[method] = [error]
    runner, _ = make_runner(controller, tmp_path / "r.json")
    outcome = runner.handle(lc.Announce())
    assert outcome.record.phase is Phase.ROLLED_BACK
    assert controller.calls[-1] == "rollback"
    assert controller.pointer is None
    assert controller.live is None
    assert controller.reports[-1].state is UpdateState.ROLLED_BACK
    assert controller.reports[-1].error_code == error.code  # type: ignore[attr-defined]
    again = runner.handle(lc.Announce())
    assert again.record.phase is Phase.IDLE
    assert controller.calls.count("fetch") == 1


@pytest.mark.parametrize(
    "at", ["check", "fetch", "stage", "activate", "health_check", "commit", "cleanup"]
)
def test_a_crash_at_any_step_ends_committed_after_resume(
    plan: ReleasePlan, tmp_path: Path, at: str
) -> None:
    controller = FakeController(plan)
    controller.faults[at] = [Crash()]
    runner, _ = make_runner(controller, tmp_path / "r.json")
    with pytest.raises(Crash):
        runner.handle(lc.Announce())
    controller.restart()
    assert controller.live in (None, plan.release_id)
    runner, _ = make_runner(controller, tmp_path / "r.json")
    outcome = runner.resume()
    if outcome.record.phase is Phase.IDLE:  # crashed before anything was decided: poll again
        outcome = runner.handle(lc.Announce())
    assert outcome.record.phase is Phase.COMMITTED
    assert controller.pointer is not None
    assert controller.pointer.release_id == plan.release_id
    assert controller.live == plan.release_id


def test_a_release_that_keeps_killing_the_agent_is_rolled_back(
    plan: ReleasePlan, tmp_path: Path
) -> None:
    controller = FakeController(plan)
    controller.faults["health_check"] = [Crash(), Crash()]
    runner, _ = make_runner(controller, tmp_path / "r.json")
    with pytest.raises(Crash):
        runner.handle(lc.Announce())
    for _ in range(2):
        controller.restart()
        runner, _ = make_runner(controller, tmp_path / "r.json")
        try:
            outcome = runner.resume()
        except Crash:
            continue
    assert outcome.record.phase is Phase.ROLLED_BACK
    assert outcome.record.error_code == lc.INTERRUPTED_CODE
    assert controller.pointer is None
    assert controller.calls.count("activate") == 2


def test_backoff_has_per_device_jitter_within_bounds() -> None:
    a = [jittered_backoff(n, random.Random("device-a")) for n in range(1, 12)]
    b = [jittered_backoff(n, random.Random("device-b")) for n in range(1, 12)]
    assert a != b
    for n, delay in enumerate(a, start=1):
        assert 0 <= delay <= min(300.0, 2.0 * 2 ** (n - 1))


def test_download_progress_is_reported_in_twentieths_not_per_chunk(plan: ReleasePlan) -> None:
    record = run_to(plan, Phase.FETCHING)
    reports = 0
    for done in range(0, 100_001, 1_000):  # 100 chunks
        record, actions = step(record, lc.FetchProgressed(done, 100_000))
        reports += sum(isinstance(a, lc.Report) for a in actions)
    assert 20 <= reports <= 21
