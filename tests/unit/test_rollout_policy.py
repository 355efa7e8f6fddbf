"""The rollout policy as a pure state machine: tables of snapshots and their decisions,
plan validation, operator commands, rollback targets, and a property test."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.rollout.policy import (
    FINAL_STATES,
    Command,
    Complete,
    Decision,
    DeviceReport,
    GroupRollout,
    Halt,
    PassWave,
    Plan,
    PlanError,
    RolloutState,
    Snapshot,
    StartWave,
    Thresholds,
    TransitionError,
    Wait,
    WaveRecord,
    WaveSize,
    WaveSpec,
    WaveState,
    abort_waves,
    allocate,
    apply,
    command,
    decide,
    order_targets,
    previous_release,
)
from protocol.messages import UpdateState

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
S = UpdateState


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_plan(
    n: int = 10,
    sizes: tuple[str, ...] = ("20%", "100%"),
    *,
    soak_s: int = 60,
    max_failure_rate: float = 0.2,
    regression: float | None = None,
    timeout_s: int = 600,
    adapter: bool = False,
) -> Plan:
    devices = order_targets(1, [f"dev-{i:02d}" for i in range(n)])
    return Plan(
        rollout_id=1,
        adapter=adapter,
        targets=devices,
        waves=tuple(WaveSpec(WaveSize.parse(s), soak_s) for s in sizes),
        thresholds=Thresholds(max_failure_rate, regression, timeout_s),
    )


def first_wave_running(
    plan: Plan,
    states: list[UpdateState],
    *,
    now: float,
    changed: float = 10,
    evals: list[tuple[float, float] | None] | None = None,
    rollout: RolloutState = RolloutState.RUNNING,
) -> Snapshot:
    """Wave 0 started at T0; its devices are in ``states`` (changed at ``changed`` s)."""
    devices = plan.wave_devices[0]
    assert len(states) == len(devices)
    evals = evals or [None] * len(devices)
    reports = {
        d: DeviceReport(s, at(changed), *(e if e else (None, None)))
        for d, s, e in zip(devices, states, evals, strict=True)
    }
    waves = (WaveRecord(WaveState.RUNNING, T0), *(WaveRecord() for _ in plan.waves[1:]))
    return Snapshot(plan, rollout, waves, reports, at(now))


PLAN = make_plan()  # 10 devices: wave 0 has 2, wave 1 has 8
PLAN5 = make_plan(sizes=("50%", "100%"))  # wave 0 has 5
ADAPTER = make_plan(sizes=("50%", "100%"), adapter=True, regression=0.05)


def fresh(plan: Plan, state: RolloutState = RolloutState.RUNNING) -> Snapshot:
    return Snapshot(plan, state, tuple(WaveRecord() for _ in plan.waves), {}, T0)


DECIDE_CASES: list[tuple[str, Snapshot, type, tuple[str, ...]]] = [
    ("fresh rollout starts wave 1", fresh(PLAN), StartWave, ("wave 1 of 2", "2 of 10")),
    ("paused rollout starts nothing", fresh(PLAN, RolloutState.PAUSED), Wait, ("paused",)),
    (
        "devices still updating: wait for them",
        first_wave_running(PLAN, [S.FETCHING, S.COMMITTED], now=100),
        Wait,
        ("1 of 2 devices still updating",),
    ),
    (
        "half the wave failed: halt at once",
        first_wave_running(PLAN, [S.FAILED, S.FETCHING], now=20),
        Halt,
        ("1 of 2 devices failed", "50.0%", "failed 1", "threshold of 20.0%"),
    ),
    (
        "a rolled-back device counts as failed",
        first_wave_running(PLAN, [S.ROLLED_BACK, S.COMMITTED], now=20),
        Halt,
        ("rolled_back 1",),
    ),
    (
        "all committed but still soaking",
        first_wave_running(PLAN, [S.COMMITTED, S.COMMITTED], now=30),
        Wait,
        ("soaking for 60 s",),
    ),
    (
        "all committed and soaked: the wave passes",
        first_wave_running(PLAN, [S.COMMITTED, S.COMMITTED], now=71),
        PassWave,
        ("wave 1 of 2 passed", "0 of 2 failed"),
    ),
    (
        "failures exactly at the threshold pass",
        first_wave_running(PLAN5, [S.FAILED] + [S.COMMITTED] * 4, now=100),
        PassWave,
        ("1 of 5 failed (20.0%",),
    ),
    (
        "one straggler at the timeout is within the threshold",
        first_wave_running(PLAN5, [S.FETCHING] + [S.COMMITTED] * 4, now=600),
        Wait,
        ("soaking",),
    ),
    (
        "two stragglers at the timeout halt",
        first_wave_running(PLAN5, [S.FETCHING, S.STAGED] + [S.COMMITTED] * 3, now=600),
        Halt,
        ("2 of 5 devices failed or did not finish within 600 s", "2 unfinished"),
    ),
    (
        "a paused rollout still halts on failures",
        first_wave_running(PLAN, [S.FAILED, S.FAILED], now=20, rollout=RolloutState.PAUSED),
        Halt,
        ("2 of 2 devices failed",),
    ),
    (
        "a halted rollout does nothing",
        replace(fresh(PLAN), state=RolloutState.HALTED),
        Wait,
        ("halted",),
    ),
    (
        "every wave passed: complete",
        replace(fresh(PLAN), waves=(WaveRecord(WaveState.PASSED, T0),) * 2),
        Complete,
        ("all 2 waves passed", "10 devices"),
    ),
    (
        "adapter: median perplexity regression over the threshold halts",
        first_wave_running(
            ADAPTER,
            [S.COMMITTED] * 5,
            now=100,
            evals=[(10.0, 11.0), (10.0, 11.2), (10.0, 10.9), (10.0, 9.9), (10.0, 12.0)],
        ),
        Halt,
        ("regressed by a median of 10.0%", "over 5 devices", "threshold of 5.0%"),
    ),
    (
        "adapter: a small regression passes",
        first_wave_running(
            ADAPTER,
            [S.COMMITTED] * 5,
            now=100,
            evals=[(10.0, 10.2), (10.0, 9.8), (10.0, 10.1), (10.0, 10.0), (10.0, 10.3)],
        ),
        PassWave,
        ("median evaluation change +1.0% over 5 devices",),
    ),
    (
        "adapter: some evaluations missing, wait for the rest until the timeout",
        first_wave_running(
            ADAPTER,
            [S.COMMITTED] * 5,
            now=100,
            evals=[(10.0, 10.2), (10.0, 9.8), (10.0, 10.1), None, None],
        ),
        Wait,
        ("3 of 5 devices reported an evaluation",),
    ),
    (
        "adapter: at the timeout, judged on the evaluations that came",
        first_wave_running(
            ADAPTER,
            [S.COMMITTED] * 5,
            now=600,
            evals=[(10.0, 10.2), (10.0, 9.8), (10.0, 10.1), None, None],
        ),
        PassWave,
        ("median evaluation change +1.0% over 3 devices",),
    ),
    (
        "adapter: no evaluation yet, wait until the timeout",
        first_wave_running(ADAPTER, [S.COMMITTED] * 5, now=100),
        Wait,
        ("0 of 5 devices reported an evaluation",),
    ),
    (
        "adapter: no evaluation by the timeout halts",
        first_wave_running(ADAPTER, [S.COMMITTED] * 5, now=600),
        Halt,
        ("no device reported an evaluation within 600 s",),
    ),
    (
        "base release: evaluations are not required",
        first_wave_running(replace(ADAPTER, adapter=False), [S.COMMITTED] * 5, now=100),
        PassWave,
        ("0 of 5 failed",),
    ),
]


@pytest.mark.parametrize(
    ("snap", "kind", "phrases"),
    [pytest.param(s, k, p, id=name) for name, s, k, p in DECIDE_CASES],
)
def test_decide(snap: Snapshot, kind: type, phrases: tuple[str, ...]) -> None:
    decision = decide(snap)
    assert isinstance(decision, kind), decision
    for phrase in phrases:
        assert phrase in decision.reason, decision.reason


def test_wait_says_until_when() -> None:
    updating = decide(first_wave_running(PLAN, [S.FETCHING, S.COMMITTED], now=100))
    soaking = decide(first_wave_running(PLAN, [S.COMMITTED, S.COMMITTED], now=30, changed=25))
    assert isinstance(updating, Wait)
    assert updating.until == at(600)
    assert isinstance(soaking, Wait)
    assert soaking.until == at(85)


def test_start_wave_names_the_planned_devices_and_apply_records_them() -> None:
    snap = fresh(PLAN)
    first = decide(snap)
    assert isinstance(first, StartWave)
    assert first.devices == PLAN.wave_devices[0] == PLAN.targets[:2]
    after = apply(snap, first)
    assert after.waves[0] == WaveRecord(WaveState.RUNNING, T0)
    assert {d: r.state for d, r in after.reports.items()} == dict.fromkeys(
        first.devices, S.ANNOUNCED
    )


def test_halt_cancels_every_open_wave() -> None:
    snap = first_wave_running(make_plan(sizes=("20%", "30%", "100%")), [S.FAILED] * 2, now=5)
    halted = apply(snap, decide(snap))
    assert halted.state is RolloutState.HALTED
    assert [w.state for w in halted.waves] == [
        WaveState.FAILED,
        WaveState.CANCELLED,
        WaveState.CANCELLED,
    ]


@pytest.mark.parametrize(
    ("n", "sizes", "expected"),
    [
        (10, ("10%", "100%"), (1, 9)),
        (10, ("3", "3", "100%"), (3, 3, 4)),
        (3, ("50%", "50%"), (2, 1)),
        (1, ("10%",), (1,)),
        (7, ("1", "25%", "100%"), (1, 2, 4)),
        (24, ("10%", "25%", "100%"), (3, 6, 15)),
    ],
)
def test_allocate(n: int, sizes: tuple[str, ...], expected: tuple[int, ...]) -> None:
    assert allocate(n, [WaveSpec(WaveSize.parse(s)) for s in sizes]) == expected


@pytest.mark.parametrize(
    ("n", "sizes", "phrase"),
    [
        (3, ("50%", "50%", "50%"), "wave 3 (50%) would be empty"),
        (10, ("5",), "cover 5 of 10 targets"),
        (0, ("100%",), "1..100000 target devices, got 0"),
        (10, (), "1..32 waves, got 0"),
        (10, ("1",) * 33, "1..32 waves, got 33"),
    ],
)
def test_allocate_refuses(n: int, sizes: tuple[str, ...], phrase: str) -> None:
    with pytest.raises(PlanError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        allocate(n, [WaveSpec(WaveSize.parse(s)) for s in sizes])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10%", WaveSize(WaveSize.parse("10%").unit, 10)), (" 100% ", WaveSize.parse("100%"))],
)
def test_wave_size_parse(text: str, expected: WaveSize) -> None:
    assert WaveSize.parse(text) == expected
    assert str(WaveSize.parse("25")) == "25 devices"


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("150%", "150% is outside 1..100%"),
        ("0%", "0% is outside 1..100%"),
        ("0", "0 devices is outside"),
        ("-5", "neither a percentage"),
        ("ten", "neither a percentage"),
        ("%", "neither a percentage"),
        ("12345678", "neither a percentage"),
    ],
)
def test_wave_size_refuses(text: str, phrase: str) -> None:
    with pytest.raises(PlanError, match=phrase):
        WaveSize.parse(text)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"max_failure_rate": 1.5}, "max_failure_rate 1.5 is outside 0..1"),
        ({"max_failure_rate": float("nan")}, "max_failure_rate nan"),
        ({"max_eval_regression": -0.1}, "max_eval_regression -0.1 is outside"),
        ({"wave_timeout_s": 0}, "wave_timeout_s 0 is outside"),
    ],
)
def test_thresholds_refuse(kwargs: dict[str, float], phrase: str) -> None:
    with pytest.raises(PlanError, match=phrase):
        Thresholds(**kwargs)  # type: ignore[arg-type]


def test_soak_and_duplicate_targets_refused() -> None:
    with pytest.raises(PlanError, match="soak time -1 s"):
        WaveSpec(WaveSize.parse("10%"), -1)
    with pytest.raises(PlanError, match="more than once"):
        Plan(1, False, ("a", "a"), (WaveSpec(WaveSize.parse("100%")),))


def test_order_is_a_seeded_shuffle() -> None:
    devices = [f"dev-{i:02d}" for i in range(30)]
    order = order_targets(7, devices)
    assert order == order_targets(7, list(reversed(devices)))  # input order does not matter
    assert sorted(order) == devices
    assert order != tuple(devices)  # shuffled
    assert order != order_targets(8, devices)  # the seed is the rollout id


@pytest.mark.parametrize(
    ("state", "cmd", "expected"),
    [
        (RolloutState.RUNNING, Command.PAUSE, RolloutState.PAUSED),
        (RolloutState.PAUSED, Command.RESUME, RolloutState.RUNNING),
        (RolloutState.RUNNING, Command.ABORT, RolloutState.ABORTED),
        (RolloutState.PAUSED, Command.ABORT, RolloutState.ABORTED),
        (RolloutState.HALTED, Command.ABORT, RolloutState.ABORTED),
    ],
)
def test_command(state: RolloutState, cmd: Command, expected: RolloutState) -> None:
    assert command(state, cmd) is expected


@pytest.mark.parametrize(
    ("state", "cmd", "phrase"),
    [
        (RolloutState.HALTED, Command.RESUME, "cannot resume a rollout that is halted"),
        (RolloutState.RUNNING, Command.RESUME, "cannot resume a rollout that is running"),
        (RolloutState.COMPLETED, Command.PAUSE, "cannot pause a rollout that is completed"),
        (RolloutState.ABORTED, Command.ABORT, "allowed when: halted, paused, running"),
    ],
)
def test_command_refused(state: RolloutState, cmd: Command, phrase: str) -> None:
    with pytest.raises(TransitionError, match=phrase):
        command(state, cmd)


def test_abort_cancels_open_waves() -> None:
    waves = (WaveRecord(WaveState.PASSED, T0), WaveRecord(WaveState.RUNNING, T0), WaveRecord())
    assert [w.state for w in abort_waves(waves)] == [
        WaveState.PASSED,
        WaveState.CANCELLED,
        WaveState.CANCELLED,
    ]


DONE, HALTED, RUNNING = RolloutState.COMPLETED, RolloutState.HALTED, RolloutState.RUNNING


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([GroupRollout(1, 10, DONE), GroupRollout(2, 11, DONE)], 10),
        ([GroupRollout(1, 10, DONE), GroupRollout(2, 11, HALTED)], 10),
        ([GroupRollout(1, 10, DONE), GroupRollout(2, 11, RUNNING)], 10),
        (
            [GroupRollout(1, 9, DONE), GroupRollout(2, 10, HALTED), GroupRollout(3, 11, DONE)],
            9,
        ),
        (
            [
                GroupRollout(1, 9, DONE),
                GroupRollout(2, 10, DONE),
                GroupRollout(3, 11, DONE, reverted=True),
                GroupRollout(4, 10, DONE),
            ],
            9,
        ),
    ],
)
def test_previous_release(history: list[GroupRollout], expected: int) -> None:
    assert previous_release("edge", history) == expected


@pytest.mark.parametrize(
    ("history", "phrase"),
    [
        ([], "never had a rollout"),
        ([GroupRollout(1, 10, DONE)], "no earlier completed release"),
        ([GroupRollout(1, 10, HALTED), GroupRollout(2, 11, DONE)], "no earlier completed"),
    ],
)
def test_previous_release_refused(history: list[GroupRollout], phrase: str) -> None:
    with pytest.raises(TransitionError, match=phrase):
        previous_release("edge", history)


# -- property: waves never overlap, never exceed the targets, a halt is final --------------

_size = st.one_of(st.integers(1, 100).map(lambda p: f"{p}%"), st.integers(1, 30).map(str))
_states = st.sampled_from(list(UpdateState))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    sizes=st.lists(_size, min_size=1, max_size=5),
    rate=st.floats(0, 1),
    adapter=st.booleans(),
    regression=st.one_of(st.none(), st.floats(0, 0.5)),
    rollout_id=st.integers(1, 10_000),
    data=st.data(),
)
def test_waves_never_overlap_and_halt_is_final(
    n: int,
    sizes: list[str],
    rate: float,
    adapter: bool,
    regression: float | None,
    rollout_id: int,
    data: st.DataObject,
) -> None:
    sizes = [*sizes, "100%"]  # so the plan covers every target
    try:
        plan = Plan(
            rollout_id,
            adapter,
            order_targets(rollout_id, [f"d{i}" for i in range(n)]),
            tuple(WaveSpec(WaveSize.parse(s), soak_s=30) for s in sizes),
            Thresholds(rate, regression, wave_timeout_s=300),
        )
    except PlanError:
        return  # a wave would be empty: refused at creation, nothing to run
    snap = fresh(plan)
    started: list[tuple[str, ...]] = []
    stopped = False
    for _ in range(data.draw(st.integers(1, 80))):
        action = data.draw(st.sampled_from(["decide", "decide", "report", "tick", "command"]))
        if action == "decide":
            decision: Decision = decide(snap)
            if isinstance(decision, StartWave):
                assert not stopped, "a halted or aborted rollout started a wave"
                assert snap.state is RolloutState.RUNNING
                assert decision.index == len(started), "waves start in order"
                assert all(snap.waves[i].state is WaveState.PASSED for i in range(decision.index))
                started.append(decision.devices)
            if isinstance(decision, Halt):
                stopped = True
            assert decision.reason
            snap = apply(snap, decision)
        elif action == "report" and snap.reports:
            device = data.draw(st.sampled_from(sorted(snap.reports)))
            value = data.draw(st.one_of(st.none(), st.tuples(st.floats(1, 20), st.floats(1, 20))))
            report = DeviceReport(data.draw(_states), snap.now, *(value or (None, None)))
            snap = replace(snap, reports={**snap.reports, device: report})
        elif action == "tick":
            snap = replace(snap, now=snap.now + timedelta(seconds=data.draw(st.integers(0, 400))))
        elif action == "command":
            cmd = data.draw(st.sampled_from(list(Command)))
            try:
                new_state = command(snap.state, cmd)
            except TransitionError:
                continue
            waves = abort_waves(snap.waves) if cmd is Command.ABORT else snap.waves
            stopped = stopped or new_state is RolloutState.ABORTED
            snap = replace(snap, state=new_state, waves=waves)
        seen = [d for wave in started for d in wave]
        assert len(seen) == len(set(seen)), "waves overlap"
        assert set(seen) <= set(plan.targets), "a wave went beyond the targets"
        if stopped:
            assert snap.state in FINAL_STATES
