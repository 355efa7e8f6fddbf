"""The rollout policy: a pure state machine over a snapshot of one rollout.

:func:`decide` reads a :class:`Snapshot` (the plan, the rollout's state, its waves, what
the devices reported, the time) and returns one :class:`Decision`; :func:`apply` returns
the snapshot that decision leads to. Nothing here reads a clock, a database or a network:
the runner (:mod:`coordinator.rollout.runner`) loads snapshots and carries decisions out.

Invariants:

- Device order is a seeded shuffle: targets are sorted by SHA-256 of the rollout id and the
  device id (:func:`order_targets`), so the same rollout always cuts the same waves,
  whatever order the targets were listed in.
- Waves are consecutive, disjoint slices of that order (:func:`allocate`); together they
  cover every target exactly once. A plan that would leave a target out, or a wave empty,
  is refused when the rollout is created.
- Waves start one at a time, in order; a wave starts only when the previous one passed and
  the rollout is ``running``. A ``halted``, ``aborted`` or ``completed`` rollout never
  starts another wave: those states are final.
- A wave halts the rollout as soon as its failed devices (``failed`` or ``rolled_back``)
  are more than ``max_failure_rate`` of the wave, even while paused or soaking. Devices
  still updating when the wave times out count as failed.
- A wave passes once every device ended (or the wave timed out) and it soaked for its
  soak time after the last one ended; for an adapter release with an evaluation threshold
  it must also show the median relative change of the devices' metric (lower is better,
  e.g. held-out perplexity) against their own baseline to be at most
  ``max_eval_regression``, judged once every device that installed it has reported (or at
  the wave timeout, on those that did). No evaluation by the wave timeout halts the
  rollout: no evidence is not good evidence.
- Every decision carries a reason sentence meant for the operator.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from coordinator.errors import RefusedError
from protocol.messages import UpdateState

__all__ = [
    "FAILED_STATES",
    "FINAL_STATES",
    "Command",
    "Complete",
    "Decision",
    "DeviceReport",
    "GroupRollout",
    "Halt",
    "PassWave",
    "Plan",
    "PlanError",
    "RolloutState",
    "SizeUnit",
    "Snapshot",
    "StartWave",
    "Thresholds",
    "TransitionError",
    "Wait",
    "WaveRecord",
    "WaveSize",
    "WaveSpec",
    "WaveState",
    "abort_waves",
    "allocate",
    "apply",
    "command",
    "decide",
    "order_targets",
    "previous_release",
]

MAX_TARGETS: Final = 100_000  # devices in one rollout
MAX_WAVES: Final = 32
MAX_SOAK_S: Final = 7 * 24 * 3600  # seconds
MAX_WAVE_TIMEOUT_S: Final = 7 * 24 * 3600  # seconds
MAX_EVAL_REGRESSION: Final = 10.0  # relative change, i.e. +1000 %

#: Update states that count as a failed device.
FAILED_STATES: Final = frozenset({UpdateState.FAILED, UpdateState.ROLLED_BACK})
_SUCCEEDED: Final = UpdateState.COMMITTED


class PlanError(RefusedError):
    """A rollout plan is invalid (wave sizes, thresholds, targets); the message says which."""


class TransitionError(RefusedError):
    """An operator command does not apply to the rollout's current state."""


class RolloutState(StrEnum):
    """Where a rollout stands. ``halted``, ``aborted`` and ``completed`` are final."""

    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    ABORTED = "aborted"
    COMPLETED = "completed"


FINAL_STATES: Final = frozenset({RolloutState.HALTED, RolloutState.ABORTED, RolloutState.COMPLETED})


class WaveState(StrEnum):
    """Where a wave stands. ``cancelled``: never decided, because the rollout stopped."""

    PENDING = "pending"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SizeUnit(StrEnum):
    """How a wave's size is given."""

    PERCENT = "percent"
    COUNT = "count"


class Command(StrEnum):
    """What an operator can do to a rollout."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaveSize:
    """A wave's size: a percentage of all targets (1..100) or a device count (>= 1)."""

    unit: SizeUnit
    value: int

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise PlanError(f"wave size must be an integer, got {self.value!r}")
        if self.unit is SizeUnit.PERCENT and not 1 <= self.value <= 100:
            raise PlanError(f"wave size {self.value}% is outside 1..100%")
        if self.unit is SizeUnit.COUNT and not 1 <= self.value <= MAX_TARGETS:
            raise PlanError(f"wave size {self.value} devices is outside 1..{MAX_TARGETS}")

    @classmethod
    def parse(cls, text: str) -> WaveSize:
        """Read ``"10%"`` (a percentage) or ``"25"`` (a count).

        Raises:
            PlanError: not of either form, or out of range (e.g. ``"150%"``).
        """
        raw = text.strip()
        unit = SizeUnit.PERCENT if raw.endswith("%") else SizeUnit.COUNT
        digits = raw[:-1].strip() if unit is SizeUnit.PERCENT else raw
        if not digits.isdigit() or len(digits) > 7:
            raise PlanError(f"wave size {text!r} is neither a percentage like '10%' nor a count")
        return cls(unit, int(digits))

    def __str__(self) -> str:
        return f"{self.value}%" if self.unit is SizeUnit.PERCENT else f"{self.value} devices"


@dataclass(frozen=True)
class WaveSpec:
    """One wave of a plan: its size and how long it soaks after its last device ended."""

    size: WaveSize
    soak_s: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.soak_s <= MAX_SOAK_S:
            raise PlanError(f"soak time {self.soak_s} s is outside 0..{MAX_SOAK_S} s")


@dataclass(frozen=True)
class Thresholds:
    """When a wave fails.

    ``max_failure_rate``: the largest share of failed devices (0..1) a wave may have.
    ``max_eval_regression``: for adapter releases, the largest median relative worsening of
    the devices' metric (0.05 = 5 % higher perplexity); ``None`` turns the check off.
    ``wave_timeout_s``: how long a wave's devices have to finish and report.
    """

    max_failure_rate: float = 0.1
    max_eval_regression: float | None = None
    wave_timeout_s: int = 3600

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_failure_rate) and 0 <= self.max_failure_rate <= 1):
            raise PlanError(f"max_failure_rate {self.max_failure_rate} is outside 0..1")
        regression = self.max_eval_regression
        if regression is not None and not (
            math.isfinite(regression) and 0 <= regression <= MAX_EVAL_REGRESSION
        ):
            raise PlanError(f"max_eval_regression {regression} is outside 0..{MAX_EVAL_REGRESSION}")
        if not 1 <= self.wave_timeout_s <= MAX_WAVE_TIMEOUT_S:
            raise PlanError(
                f"wave_timeout_s {self.wave_timeout_s} is outside 1..{MAX_WAVE_TIMEOUT_S}"
            )


def order_targets(rollout_id: int, device_ids: Iterable[str]) -> tuple[str, ...]:
    """Return ``device_ids`` in this rollout's seeded-shuffle order (see module docstring)."""

    def key(device_id: str) -> tuple[bytes, str]:
        digest = hashlib.sha256(f"nanofleet-rollout:{rollout_id}:{device_id}".encode()).digest()
        return digest, device_id

    return tuple(sorted(set(device_ids), key=key))


def allocate(n_targets: int, waves: Sequence[WaveSpec]) -> tuple[int, ...]:
    """Return each wave's device count for ``n_targets`` targets.

    Percentages are of all targets, rounded up; a wave never takes more than what is left.

    Raises:
        PlanError: no waves or more than :data:`MAX_WAVES`, no targets or more than
            :data:`MAX_TARGETS`, a wave that would be empty, or waves that leave targets out.
    """
    if not 1 <= n_targets <= MAX_TARGETS:
        raise PlanError(f"a rollout needs 1..{MAX_TARGETS} target devices, got {n_targets}")
    if not 1 <= len(waves) <= MAX_WAVES:
        raise PlanError(f"a rollout needs 1..{MAX_WAVES} waves, got {len(waves)}")
    left = n_targets
    counts: list[int] = []
    for number, wave in enumerate(waves, start=1):
        size = wave.size
        wanted = (
            math.ceil(n_targets * size.value / 100) if size.unit is SizeUnit.PERCENT else size.value
        )
        if left == 0:
            raise PlanError(
                f"wave {number} ({size}) would be empty: the waves before it already "
                f"cover all {n_targets} targets"
            )
        counts.append(min(wanted, left))
        left -= counts[-1]
    if left:
        raise PlanError(
            f"the waves cover {n_targets - left} of {n_targets} targets; make the last wave "
            f"100% or add waves so that every target is in one"
        )
    return tuple(counts)


@dataclass(frozen=True)
class Plan:
    """A rollout as the policy sees it; ``targets`` are already in :func:`order_targets` order.

    Raises:
        PlanError: duplicate targets, or waves that do not fit the targets (:func:`allocate`).
    """

    rollout_id: int
    adapter: bool
    targets: tuple[str, ...]
    waves: tuple[WaveSpec, ...]
    thresholds: Thresholds = field(default_factory=Thresholds)
    wave_devices: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.targets)) != len(self.targets):
            raise PlanError("the target list names a device more than once")
        counts = allocate(len(self.targets), self.waves)
        slices: list[tuple[str, ...]] = []
        start = 0
        for count in counts:
            slices.append(self.targets[start : start + count])
            start += count
        object.__setattr__(self, "wave_devices", tuple(slices))


# -- what happened so far ---------------------------------------------------------------


@dataclass(frozen=True)
class DeviceReport:
    """The latest update state of one wave device, and its evaluation if it sent one.

    ``changed_at`` is when the coordinator received the state (its own clock).
    ``baseline`` and ``candidate`` are the device's metric before and after the release.
    """

    state: UpdateState
    changed_at: datetime
    baseline: float | None = None
    candidate: float | None = None


@dataclass(frozen=True)
class WaveRecord:
    """A wave's state and when it started (``None`` while pending)."""

    state: WaveState = WaveState.PENDING
    started_at: datetime | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything :func:`decide` looks at.

    ``waves`` has one record per wave of the plan. ``reports`` has an entry for every device
    of a started wave (a device that has not reported yet is ``announced``).
    """

    plan: Plan
    state: RolloutState
    waves: tuple[WaveRecord, ...]
    reports: Mapping[str, DeviceReport]
    now: datetime

    def __post_init__(self) -> None:
        if len(self.waves) != len(self.plan.waves):
            raise ValueError(
                f"snapshot has {len(self.waves)} wave records for a plan of {len(self.plan.waves)}"
            )


# -- decisions ------------------------------------------------------------------------


@dataclass(frozen=True)
class StartWave:
    """Announce the release to ``devices`` (wave ``index``, 0-based)."""

    index: int
    devices: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class PassWave:
    """Wave ``index`` passed; the next decision may start the next wave."""

    index: int
    reason: str


@dataclass(frozen=True)
class Halt:
    """Stop the rollout for good: wave ``index`` failed; later waves are cancelled."""

    index: int
    reason: str


@dataclass(frozen=True)
class Complete:
    """Every wave passed; the rollout is done."""

    reason: str


@dataclass(frozen=True)
class Wait:
    """Nothing to do now; look again at ``until`` (``None``: only after a change)."""

    reason: str
    until: datetime | None = None


Decision = StartWave | PassWave | Halt | Complete | Wait


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _wave_name(index: int, plan: Plan) -> str:
    return f"wave {index + 1} of {len(plan.waves)}"


def decide(snap: Snapshot) -> Decision:
    """Return the next thing to do for the rollout in ``snap`` (see the module docstring)."""
    plan = snap.plan
    if snap.state in FINAL_STATES:
        return Wait(f"the rollout is {snap.state.value}; nothing more will happen")
    running = [i for i, w in enumerate(snap.waves) if w.state is WaveState.RUNNING]
    if running:
        return _judge_wave(snap, running[0])
    if snap.state is RolloutState.PAUSED:
        return Wait("the rollout is paused; resume it to start the next wave")
    pending = [i for i, w in enumerate(snap.waves) if w.state is WaveState.PENDING]
    if not pending:
        return Complete(
            f"all {len(plan.waves)} waves passed; {len(plan.targets)} devices received the release"
        )
    index = pending[0]
    devices = plan.wave_devices[index]
    return StartWave(
        index,
        devices,
        f"{_wave_name(index, plan)}: announcing to {len(devices)} of {len(plan.targets)} "
        f"targets ({plan.waves[index].size})",
    )


def _judge_wave(snap: Snapshot, index: int) -> Decision:
    plan, now = snap.plan, snap.now
    name = _wave_name(index, plan)
    started_at = snap.waves[index].started_at
    if started_at is None:
        raise ValueError(f"{name} is running but has no start time")
    devices = plan.wave_devices[index]
    size = len(devices)
    reports = [
        snap.reports.get(d, DeviceReport(UpdateState.ANNOUNCED, started_at)) for d in devices
    ]
    limit = plan.thresholds.max_failure_rate
    failed = Counter(r.state.value for r in reports if r.state in FAILED_STATES)
    n_failed = sum(failed.values())
    if n_failed / size > limit:
        detail = ", ".join(f"{state} {n}" for state, n in sorted(failed.items()))
        return Halt(
            index,
            f"{name}: {n_failed} of {size} devices failed ({_pct(n_failed / size)}; {detail}), "
            f"over the failure threshold of {_pct(limit)}",
        )
    timeout_at = started_at + timedelta(seconds=plan.thresholds.wave_timeout_s)
    unfinished = sum(
        1 for r in reports if r.state is not _SUCCEEDED and r.state not in FAILED_STATES
    )
    if unfinished:
        if now < timeout_at:
            return Wait(f"{name}: {unfinished} of {size} devices still updating", until=timeout_at)
        late = n_failed + unfinished
        if late / size > limit:
            return Halt(
                index,
                f"{name}: {late} of {size} devices failed or did not finish within "
                f"{plan.thresholds.wave_timeout_s} s ({_pct(late / size)}; {unfinished} "
                f"unfinished), over the failure threshold of {_pct(limit)}",
            )
        settled_at = timeout_at
    else:
        settled_at = max(r.changed_at for r in reports)
    soak_s = plan.waves[index].soak_s
    soak_end = settled_at + timedelta(seconds=soak_s)
    if now < soak_end:
        return Wait(f"{name}: soaking for {soak_s} s after its last device", until=soak_end)
    verdict = f"{n_failed} of {size} failed ({_pct(n_failed / size)}, threshold {_pct(limit)})"
    regression = plan.thresholds.max_eval_regression
    if plan.adapter and regression is not None:
        succeeded = [r for r in reports if r.state is _SUCCEEDED]
        changes = [
            r.candidate / r.baseline - 1
            for r in succeeded
            if r.baseline is not None and r.candidate is not None
        ]
        if len(changes) < len(succeeded) and now < timeout_at:
            return Wait(
                f"{name}: {len(changes)} of {len(succeeded)} devices reported an evaluation",
                until=timeout_at,
            )
        if not changes:
            return Halt(
                index,
                f"{name}: no device reported an evaluation within "
                f"{plan.thresholds.wave_timeout_s} s; the adapter's quality is unknown",
            )
        median = statistics.median(changes)
        if median > regression:
            return Halt(
                index,
                f"{name}: the evaluation metric regressed by a median of {_pct(median)} over "
                f"{len(changes)} devices, over the regression threshold of {_pct(regression)}",
            )
        verdict += f"; median evaluation change {median:+.1%} over {len(changes)} devices"
    return PassWave(index, f"{name} passed: {verdict}; soaked {soak_s} s")


def apply(snap: Snapshot, decision: Decision) -> Snapshot:
    """Return the snapshot after ``decision`` was carried out at ``snap.now``.

    Raises:
        ValueError: the decision does not fit the snapshot (e.g. starting a wave that is not
            pending); :func:`decide` never returns such a decision.
    """
    waves = list(snap.waves)
    match decision:
        case StartWave(index=index, devices=devices):
            if (
                waves[index].state is not WaveState.PENDING
                or snap.state is not RolloutState.RUNNING
            ):
                raise ValueError(f"wave {index} cannot start from {waves[index].state.value}")
            waves[index] = WaveRecord(WaveState.RUNNING, snap.now)
            reports = dict(snap.reports)
            for device in devices:
                reports[device] = DeviceReport(UpdateState.ANNOUNCED, snap.now)
            return replace(snap, waves=tuple(waves), reports=reports)
        case PassWave(index=index):
            waves[index] = replace(waves[index], state=WaveState.PASSED)
            return replace(snap, waves=tuple(waves))
        case Halt(index=index):
            waves[index] = replace(waves[index], state=WaveState.FAILED)
            return replace(snap, state=RolloutState.HALTED, waves=tuple(_cancel_open(waves)))
        case Complete():
            return replace(snap, state=RolloutState.COMPLETED)
        case Wait():
            return snap


def _cancel_open(waves: Sequence[WaveRecord]) -> list[WaveRecord]:
    open_states = (WaveState.PENDING, WaveState.RUNNING)
    return [replace(w, state=WaveState.CANCELLED) if w.state in open_states else w for w in waves]


_COMMANDS: Final[Mapping[Command, tuple[frozenset[RolloutState], RolloutState]]] = {
    Command.PAUSE: (frozenset({RolloutState.RUNNING}), RolloutState.PAUSED),
    Command.RESUME: (frozenset({RolloutState.PAUSED}), RolloutState.RUNNING),
    Command.ABORT: (
        frozenset({RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.HALTED}),
        RolloutState.ABORTED,
    ),
}


def command(state: RolloutState, cmd: Command) -> RolloutState:
    """Return the state an operator command leads to from ``state``.

    Aborting cancels every wave that has not been decided (the runner does that).

    Raises:
        TransitionError: the command does not apply (e.g. resuming a halted rollout).
    """
    allowed, target = _COMMANDS[cmd]
    if state not in allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        raise TransitionError(
            f"cannot {cmd.value} a rollout that is {state.value} (allowed when: {names})"
        )
    return target


def abort_waves(waves: Sequence[WaveRecord]) -> tuple[WaveRecord, ...]:
    """Return ``waves`` after an abort: every pending or running wave is cancelled."""
    return tuple(_cancel_open(waves))


# -- rollback -------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRollout:
    """One past rollout that targeted a group, for :func:`previous_release`.

    ``reverted``: a later rollback rolled this one back.
    """

    rollout_id: int
    release_id: int
    state: RolloutState
    reverted: bool = False


def previous_release(group: str, history: Sequence[GroupRollout]) -> int:
    """Return the release a group goes back to when it is rolled back.

    The group's current release is that of its latest rollout, whatever its state. The one
    to go back to is the release of the latest completed, not reverted rollout with a
    different release. Rolling back twice therefore goes back two releases.

    Raises:
        TransitionError: the group has no such earlier release.
    """
    if not history:
        raise TransitionError(f"group {group!r} has never had a rollout; nothing to roll back")
    ordered = sorted(history, key=lambda h: h.rollout_id)
    current = ordered[-1].release_id
    for past in reversed(ordered[:-1]):
        if (
            past.state is RolloutState.COMPLETED
            and not past.reverted
            and past.release_id != current
        ):
            return past.release_id
    raise TransitionError(
        f"group {group!r} has no earlier completed release to roll back to "
        f"(its latest rollout is {ordered[-1].rollout_id})"
    )
