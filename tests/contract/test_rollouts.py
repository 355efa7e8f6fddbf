"""Rollouts on both backends: targets, waves, policy steps, progress, commands, rollback."""

from __future__ import annotations

from datetime import timedelta

import pytest

from coordinator.registry import (
    Ingest,
    NotFoundError,
    Registry,
    RolloutSpec,
    Selector,
    SelectorError,
)
from coordinator.rollout.policy import (
    Command,
    Halt,
    PassWave,
    PlanError,
    RolloutState,
    StartWave,
    Thresholds,
    TransitionError,
    Wait,
    WaveSize,
    WaveSpec,
    WaveState,
    decide,
    order_targets,
)
from protocol.bundle import BundleKind, bundle_hash
from protocol.messages import BundleRef, EvaluationReport, UpdateState
from tests.contract._fleet import progress, register, report_all, run_to_completion
from tests.support.db_fixtures import ManualClock, make_manifest

U = UpdateState


def waves(*sizes: str, soak_s: int = 0) -> tuple[WaveSpec, ...]:
    return tuple(WaveSpec(WaveSize.parse(s), soak_s) for s in sizes)


@pytest.fixture
def release_id(registry: Registry) -> int:
    return registry.create_release(make_manifest("m", "1.0.0"), actor="op").id


def test_targets_are_the_union_of_the_selector(registry: Registry, release_id: int) -> None:
    register(registry, ["e1", "e2", "e3"], group="edge")
    register(registry, ["c1", "c2"], group="core")
    registry.register_device("t1", groups=["lab"], tags=["canary"], actor="op")
    register(registry, ["x1"], group="lab")
    selector = Selector(groups=("edge",), tags=("canary",), devices=("c1", "e1"))
    rollout = registry.create_rollout(
        RolloutSpec(release_id, selector, waves("1", "50%", "100%")), actor="alice"
    )
    assert rollout.target_count == 5
    assert rollout.state is RolloutState.RUNNING
    assert [w.device_count for w in rollout.waves] == [1, 3, 1]
    assert all(w.state is WaveState.PENDING for w in rollout.waves)
    assert rollout.selector == selector
    snapshot = registry.snapshot(rollout.id)
    assert snapshot.plan.targets == order_targets(rollout.id, ["c1", "e1", "e2", "e3", "t1"])
    (created,) = registry.rollout_decisions(rollout.id)
    assert created.kind == "create"
    assert created.actor == "alice"
    assert "5 targets in 3 waves (1, 3, 1 devices)" in created.reason
    assert registry.list_audit()[0].action == "rollout.create"
    assert registry.get_rollout(rollout.id) == rollout
    assert registry.list_rollouts() == [rollout]
    assert registry.list_rollouts(state=RolloutState.HALTED) == []
    assert registry.active_rollouts() == [rollout.id]


@pytest.mark.parametrize(
    ("selector", "plan", "error", "phrase"),
    [
        (Selector(groups=("nobody",)), ("100%",), SelectorError, "group 'nobody' has no devices"),
        (Selector(tags=("gold",)), ("100%",), SelectorError, "tag 'gold' is on no device"),
        (
            Selector(devices=("e1", "ghost")),
            ("100%",),
            NotFoundError,
            "unknown device 'ghost' in the selector",
        ),
        (Selector(groups=("edge",)), ("1",), PlanError, "the waves cover 1 of 2 targets"),
        (Selector(groups=("edge",)), ("2", "1"), PlanError, "wave 2 .1 devices. would be empty"),
    ],
)
def test_bad_rollouts_refused(
    registry: Registry,
    release_id: int,
    selector: Selector,
    plan: tuple[str, ...],
    error: type[Exception],
    phrase: str,
) -> None:
    register(registry, ["e1", "e2"], group="edge")
    with pytest.raises(error, match=phrase):
        registry.create_rollout(RolloutSpec(release_id, selector, waves(*plan)), actor="op")
    assert registry.list_rollouts() == []  # nothing half-created


@pytest.mark.parametrize(
    ("build", "phrase"),
    [
        (lambda: Selector(), "the selector is empty"),
        (lambda: Selector(groups=("a/b",)), "selector groups entry 'a/b' contains '/'"),
        (lambda: Selector(devices=("d1", "d1")), "lists an entry more than once"),
        (lambda: WaveSize.parse("120%"), "120% is outside 1..100%"),
    ],
)
def test_bad_specs_refused(build: object, phrase: str) -> None:
    with pytest.raises((SelectorError, PlanError), match=phrase):
        build()  # type: ignore[operator]


def test_unknown_release_and_rollout(registry: Registry) -> None:
    register(registry, ["e1"])
    with pytest.raises(NotFoundError, match="unknown release 99"):
        registry.create_rollout(RolloutSpec(99, Selector(groups=("edge",))), actor="op")
    for call in (registry.get_rollout, registry.rollout_updates, registry.rollout_decisions):
        with pytest.raises(NotFoundError, match="unknown rollout 7"):
            call(7)


def test_steps_progress_and_a_halt(registry: Registry, clock: ManualClock, release_id: int) -> None:
    devices = [f"d{i}" for i in range(10)]
    register(registry, devices)
    spec = RolloutSpec(
        release_id,
        Selector(groups=("edge",)),
        waves("20%", "30%", "100%", soak_s=60),
        Thresholds(max_failure_rate=0.3, wave_timeout_s=600),
    )
    rollout = registry.create_rollout(spec, actor="op")
    first, release = registry.step(rollout.id, decide)
    assert isinstance(first, StartWave)
    assert release.id == release_id
    assert len(first.devices) == 2
    updates = registry.rollout_updates(rollout.id)
    assert [(u.device_id, u.state, u.wave) for u in updates] == [
        (d, U.ANNOUNCED, 0) for d in sorted(first.devices)
    ]
    assert isinstance(registry.step(rollout.id, decide)[0], Wait)

    # progress: matched by the device's latest update; a foreign target is not ours
    d0, d1 = first.devices
    t = clock.advance(5)
    ours = BundleRef(name="m", version="1.0.0", sha256=release.bundle_sha256)
    theirs = BundleRef(name="other", version="2.0.0", sha256="f" * 64)
    assert registry.ingest(
        [
            (d0, progress(t, U.STAGED, target=ours), t),
            (d1, progress(t, U.STAGED, target=theirs), t),
            ("d9" if "d9" not in first.devices else "d8", progress(t, U.FETCHING), t),
            (d0, progress(t - timedelta(seconds=1), U.FETCHING), t),
        ]
    ) == [Ingest.APPLIED, Ingest.UNMATCHED, Ingest.UNMATCHED, Ingest.STALE]
    t = clock.advance(5)
    report_all(registry, first.devices, U.COMMITTED, t, release)
    assert registry.record_evaluation(d0, release.bundle_sha256, baseline=10.0, candidate=9.5) == (
        Ingest.APPLIED
    )
    assert registry.record_evaluation(d0, "0" * 64, baseline=1.0, candidate=1.0) is Ingest.UNMATCHED
    assert registry.record_evaluation("ghost", "0" * 64, baseline=1.0, candidate=1.0) is (
        Ingest.UNKNOWN_DEVICE
    )
    # The same over MQTT: a device's EvaluationReport goes through ingest.
    report = EvaluationReport(bundle=ours, baseline=10.0, candidate=9.0, tokens=512, at=t)
    assert registry.ingest(
        [(d1, report, t), (d1, report.model_copy(update={"bundle": theirs}), t)]
    ) == [Ingest.APPLIED, Ingest.UNMATCHED]
    evaluated = {
        u.device_id: (u.baseline, u.candidate) for u in registry.rollout_updates(rollout.id)
    }
    assert evaluated == {d0: (10.0, 9.5), d1: (10.0, 9.0)}
    clock.advance(61)
    passed, _ = registry.step(rollout.id, decide)
    assert isinstance(passed, PassWave)
    second, _ = registry.step(rollout.id, decide)
    assert isinstance(second, StartWave)
    assert len(second.devices) == 3
    assert not set(second.devices) & set(first.devices)

    # two of three fail: over 30 %: the rollout halts and the last wave never starts
    t = clock.advance(10)
    registry.ingest(
        [
            (second.devices[0], progress(t, U.FAILED, error="hash_mismatch"), t),
            (second.devices[1], progress(t, U.ROLLED_BACK, target=ours), t),
        ]
    )
    halt, _ = registry.step(rollout.id, decide)
    assert isinstance(halt, Halt)
    assert "2 of 3 devices failed (66.7%" in halt.reason
    view = registry.get_rollout(rollout.id)
    assert view.state is RolloutState.HALTED
    assert view.finished_at == clock.now
    assert [w.state for w in view.waves] == [
        WaveState.PASSED,
        WaveState.FAILED,
        WaveState.CANCELLED,
    ]
    assert view.waves[1].reason == halt.reason
    assert view.waves[1].progress == {U.FAILED: 1, U.ROLLED_BACK: 1, U.ANNOUNCED: 1}
    assert view.waves[2].progress == {}
    assert isinstance(registry.step(rollout.id, decide)[0], Wait)
    assert len(registry.rollout_updates(rollout.id)) == 5  # the last 5 were never announced
    kinds = [(d.kind, d.wave, d.actor) for d in registry.rollout_decisions(rollout.id)]
    assert kinds == [
        ("create", None, "op"),
        ("start_wave", 0, "policy"),
        ("pass_wave", 0, "policy"),
        ("start_wave", 1, "policy"),
        ("halt", 1, "policy"),
    ]
    history = registry.device_updates(second.devices[0])
    assert [(h.state, h.error_code, h.rollout_id) for h in history] == [
        (U.FAILED, "hash_mismatch", rollout.id)
    ]
    assert registry.active_rollouts() == []


def test_pause_resume_abort(registry: Registry, clock: ManualClock, release_id: int) -> None:
    register(registry, [f"d{i}" for i in range(4)])
    spec = RolloutSpec(release_id, Selector(groups=("edge",)), waves("50%", "100%"))
    rollout = registry.create_rollout(spec, actor="op")
    paused = registry.command(rollout.id, Command.PAUSE, actor="bob", reason="night freeze")
    assert paused.state is RolloutState.PAUSED
    assert isinstance(registry.step(rollout.id, decide)[0], Wait)
    assert registry.rollout_updates(rollout.id) == []
    with pytest.raises(TransitionError, match="cannot pause a rollout that is paused"):
        registry.command(rollout.id, Command.PAUSE, actor="bob")
    registry.command(rollout.id, Command.RESUME, actor="bob")
    assert isinstance(registry.step(rollout.id, decide)[0], StartWave)
    aborted = registry.command(rollout.id, Command.ABORT, actor="bob", reason="wrong build")
    assert aborted.state is RolloutState.ABORTED
    assert [w.state for w in aborted.waves] == [WaveState.CANCELLED, WaveState.CANCELLED]
    assert aborted.waves[0].reason == "cancelled: rollout aborted (wrong build)"
    with pytest.raises(TransitionError, match="cannot resume a rollout that is aborted"):
        registry.command(rollout.id, Command.RESUME, actor="bob")
    log = [(d.kind, d.actor, d.reason) for d in registry.rollout_decisions(rollout.id)]
    assert ("pause", "bob", "night freeze") in log
    assert ("abort", "bob", "wrong build") in log
    audit = [a.action for a in registry.list_audit(limit=4)]
    assert audit == ["rollout.abort", "rollout.resume", "rollout.pause", "rollout.create"]
    with pytest.raises(NotFoundError, match="unknown rollout 99"):
        registry.command(99, Command.PAUSE, actor="bob")


def test_rollback_returns_a_group_to_its_previous_release(
    registry: Registry, clock: ManualClock
) -> None:
    register(registry, ["e1", "e2", "e3"], group="edge")
    v1 = registry.create_release(make_manifest("m", "1.0.0"), actor="op")
    v2 = registry.create_release(make_manifest("m", "2.0.0"), actor="op")
    edge = Selector(groups=("edge",))
    with pytest.raises(TransitionError, match="group 'edge' has never had a rollout"):
        registry.rollback_group("edge", actor="op")
    first = registry.create_rollout(RolloutSpec(v1.id, edge), actor="op")
    run_to_completion(registry, first.id, clock.now)
    with pytest.raises(TransitionError, match="no earlier completed release"):
        registry.rollback_group("edge", actor="op")
    second = registry.create_rollout(RolloutSpec(v2.id, edge, waves("1", "100%")), actor="op")
    assert isinstance(registry.step(second.id, decide)[0], StartWave)

    back = registry.rollback_group("edge", actor="carol")
    assert back.release.id == v1.id
    assert back.rollback_of == second.id
    assert back.target_count == 3
    assert registry.get_rollout(second.id).state is RolloutState.ABORTED
    reasons = [d.reason for d in registry.rollout_decisions(second.id)]
    assert "superseded by a rollback of group 'edge'" in reasons
    assert registry.list_audit()[0].action == "rollout.rollback"
    run_to_completion(registry, back.id, clock.now)
    # v2 was reverted, v1 is current: there is nothing older to go back to
    with pytest.raises(TransitionError, match="no earlier completed release"):
        registry.rollback_group("edge", actor="carol")


def test_adapter_release_is_planned_as_an_adapter(registry: Registry) -> None:
    register(registry, ["e1", "e2"])
    base = make_manifest("m", "1.0.0")
    adapter = registry.create_release(
        make_manifest("lora", "0.1.0", BundleKind.ADAPTER, base_sha256=bundle_hash(base)),
        actor="op",
    )
    rollout = registry.create_rollout(
        RolloutSpec(
            adapter.id, Selector(groups=("edge",)), thresholds=Thresholds(max_eval_regression=0.05)
        ),
        actor="op",
    )
    snapshot = registry.snapshot(rollout.id)
    assert snapshot.plan.adapter
    assert snapshot.plan.thresholds.max_eval_regression == 0.05
