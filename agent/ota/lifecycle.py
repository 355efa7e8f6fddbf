"""The update lifecycle as a pure state machine: ``step(record, event) -> (record, actions)``.

No I/O happens here. A runner (:mod:`agent.ota.runner`) executes the actions in order and
feeds back what they produced as the next event. Phases follow
:class:`protocol.messages.UpdateState`, plus ``idle``::

    idle ─Announce→ announced ─ReleaseFound→ fetching ─Fetched→ verified ─Staged→ (staged)
      → activating ─Activated→ health_check ─HealthPassed→ [Commit] ─Committed→ committed
    any phase before activating ─Failed→ failed (transient failures retry first)
    activating / health_check ─Failed→ rolled_back (the live server goes back to the old slot)

Invariants:

- the record is persisted (a :class:`Persist` action) before every step that can harm the
  running model: before staging, before activation, and before rolling back; a work
  action (check, fetch, stage, activate, health check, commit) is always the last action
  of a step, so its outcome is the next event;
- the commit point is the slot pointer (``current.json``), switched by :class:`Commit`
  after the health gate passed. Until then a restart runs the old slot;
- a release that was rolled back is remembered (:attr:`UpdateRecord.rejected`) and not
  installed again, so a bad release cannot loop install → rollback; publishing a new
  version is the way to retry;
- after a crash, :func:`resume` decides from the persisted phase and the slot pointer:
  before ``staged`` the work is redone (the content-addressed store makes a re-fetch
  free); at ``staged`` activation starts; in ``activating`` / ``health_check`` the update
  commits if the pointer already names the new slot, retries activation while
  :attr:`Policy.max_activations` allows (a power cut is not the model's fault), else rolls
  back (a model that kills the process cannot loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.ota.plan import ReleasePlan
from agent.ota.slots import InstalledRelease
from protocol.messages import ReleaseAnnouncement, Slot, UpdateProgress, UpdateState


class Phase(StrEnum):
    """Where an update stands; ``idle`` when none is in progress or remembered."""

    IDLE = "idle"
    ANNOUNCED = UpdateState.ANNOUNCED.value
    FETCHING = UpdateState.FETCHING.value
    VERIFIED = UpdateState.VERIFIED.value
    STAGED = UpdateState.STAGED.value
    ACTIVATING = UpdateState.ACTIVATING.value
    HEALTH_CHECK = UpdateState.HEALTH_CHECK.value
    COMMITTED = UpdateState.COMMITTED.value
    ROLLED_BACK = UpdateState.ROLLED_BACK.value
    FAILED = UpdateState.FAILED.value


#: Phases in which no update is running: an announcement may start one.
RESTING: Final = frozenset({Phase.IDLE, Phase.COMMITTED, Phase.ROLLED_BACK, Phase.FAILED})
#: Phases in which a new model may be live in the server without being committed.
LIVE_TRIAL: Final = frozenset({Phase.ACTIVATING, Phase.HEALTH_CHECK})
#: Phases whose work is redone from the start after a transient failure.
_RETRYABLE: Final = frozenset({Phase.ANNOUNCED, Phase.FETCHING, Phase.VERIFIED})

INTERRUPTED_CODE: Final = "activation_interrupted"
MAX_ERROR_MESSAGE: Final = 1024  # characters, as UpdateProgress allows
#: A download is reported at most this many times (each time it crosses 1/N of its bytes).
PROGRESS_REPORTS: Final = 20


@dataclass(frozen=True)
class Policy:
    """Bounds of the lifecycle."""

    max_attempts: int = 5
    """Tries of a check, fetch or stage before a transient failure fails the update."""
    max_activations: int = 2
    """Activations of one release (restarts included) before it is rolled back for good."""
    remember_rejected: int = 16
    """How many rolled-back releases are remembered and refused."""


class UpdateRecord(BaseModel):
    """The persisted state of the lifecycle (``record.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    phase: Phase = Phase.IDLE
    hint: ReleaseAnnouncement | None = None
    """The announcement that started the update (None for a periodic poll)."""
    plan: ReleasePlan | None = None
    from_slot: Slot | None = None
    """The committed slot when the update began (None on a device without a model)."""
    to_slot: Slot | None = None
    attempts: int = Field(default=0, ge=0)
    """Transient failures so far in the current phase."""
    activations: int = Field(default=0, ge=0)
    bytes_done: int = Field(default=0, ge=0)
    bytes_total: int = Field(default=0, ge=0)
    error_code: str | None = None
    error_message: str | None = None
    rejected: tuple[str, ...] = ()
    """Release ids that were rolled back, oldest first."""


# ---- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Announce:
    """An announcement arrived, or a periodic poll is due (``hint`` None)."""

    hint: ReleaseAnnouncement | None = None


@dataclass(frozen=True)
class NothingNew:
    """The verified channel names what is installed, or nothing."""


@dataclass(frozen=True)
class ReleaseFound:
    """The verified channel names a release to install into ``to_slot``."""

    plan: ReleasePlan
    from_slot: Slot | None
    to_slot: Slot


@dataclass(frozen=True)
class FetchProgressed:
    done: int
    total: int


@dataclass(frozen=True)
class Fetched:
    """Every blob of the plan is in the store, verified."""


@dataclass(frozen=True)
class Staged:
    """The plan is completely staged in ``to_slot``."""


@dataclass(frozen=True)
class Activated:
    """The new slot is live in the server."""


@dataclass(frozen=True)
class HealthPassed:
    """The health gate accepted the live new slot."""


@dataclass(frozen=True)
class Committed:
    """The slot pointer names the new slot."""


@dataclass(frozen=True)
class Failed:
    """A work action failed; ``transient`` failures may be retried."""

    code: str
    message: str
    transient: bool


@dataclass(frozen=True)
class RetryDue:
    """The backoff after a transient failure is over."""


Event = (
    Announce
    | NothingNew
    | ReleaseFound
    | FetchProgressed
    | Fetched
    | Staged
    | Activated
    | HealthPassed
    | Committed
    | Failed
    | RetryDue
)

# ---- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Persist:
    """Save ``record`` atomically before going on."""

    record: UpdateRecord


@dataclass(frozen=True)
class Report:
    """Publish the progress of ``record`` (see :func:`progress_message`)."""

    record: UpdateRecord


@dataclass(frozen=True)
class CheckRelease:
    hint: ReleaseAnnouncement | None


@dataclass(frozen=True)
class Fetch:
    plan: ReleasePlan


@dataclass(frozen=True)
class Stage:
    plan: ReleasePlan
    slot: Slot


@dataclass(frozen=True)
class Activate:
    """Load ``slot`` into the running server (the old model keeps serving until the swap)."""

    plan: ReleasePlan
    slot: Slot


@dataclass(frozen=True)
class HealthCheck:
    plan: ReleasePlan
    slot: Slot


@dataclass(frozen=True)
class Commit:
    """Switch the slot pointer to ``slot``: the commit point."""

    plan: ReleasePlan
    slot: Slot


@dataclass(frozen=True)
class Rollback:
    """Put the committed ``slot`` back into the running server (None: no model to go back to)."""

    slot: Slot | None


@dataclass(frozen=True)
class Cleanup:
    """Drop blobs no slot references."""


@dataclass(frozen=True)
class WaitRetry:
    """Wait a backoff (with jitter) for the ``attempt``-th retry, then send :class:`RetryDue`."""

    attempt: int


Action = (
    Persist
    | Report
    | CheckRelease
    | Fetch
    | Stage
    | Activate
    | HealthCheck
    | Commit
    | Rollback
    | Cleanup
    | WaitRetry
)

#: Actions whose outcome is the next event.
WORK: Final = (CheckRelease, Fetch, Stage, Activate, HealthCheck, Commit, WaitRetry)


class LifecycleError(RuntimeError):
    """An event arrived that the current phase cannot take (a bug in the runner)."""


def _enter(record: UpdateRecord, phase: Phase, **changes: object) -> UpdateRecord:
    return record.model_copy(update={"phase": phase, "attempts": 0, **changes})


def _saved(record: UpdateRecord, *rest: Action) -> tuple[UpdateRecord, list[Action]]:
    return record, [Persist(record), Report(record), *rest]


def _need_plan(record: UpdateRecord) -> tuple[ReleasePlan, Slot]:
    if record.plan is None or record.to_slot is None:
        raise LifecycleError(f"phase {record.phase.value} without a plan and a target slot")
    return record.plan, record.to_slot


def _fail(record: UpdateRecord, event: Failed, policy: Policy) -> tuple[UpdateRecord, list[Action]]:
    message = event.message[:MAX_ERROR_MESSAGE] or event.code
    if record.phase in LIVE_TRIAL:
        plan, _ = _need_plan(record)
        rejected = (*record.rejected, plan.release_id)[-policy.remember_rejected :]
        done = _enter(
            record,
            Phase.ROLLED_BACK,
            error_code=event.code,
            error_message=message,
            rejected=rejected,
        )
        return done, [Persist(done), Rollback(record.from_slot), Report(done)]
    if event.transient and record.attempts + 1 < policy.max_attempts:
        waiting = record.model_copy(update={"attempts": record.attempts + 1})
        return waiting, [Persist(waiting), WaitRetry(waiting.attempts)]
    done = _enter(record, Phase.FAILED, error_code=event.code, error_message=message)
    return _saved(done)


def _redo(record: UpdateRecord) -> Action:
    """The work of a retryable phase, to do again."""
    if record.phase is Phase.ANNOUNCED:
        return CheckRelease(record.hint)
    plan, slot = _need_plan(record)
    return Fetch(plan) if record.phase is Phase.FETCHING else Stage(plan, slot)


def _activate(record: UpdateRecord) -> tuple[UpdateRecord, list[Action]]:
    plan, slot = _need_plan(record)
    activating = _enter(record, Phase.ACTIVATING, activations=record.activations + 1)
    return _saved(activating, Activate(plan, slot))


def step(
    record: UpdateRecord, event: Event, policy: Policy = Policy()
) -> tuple[UpdateRecord, list[Action]]:
    """Return the record after ``event`` and the actions to execute, in order.

    Raises:
        LifecycleError: ``event`` cannot happen in ``record.phase``.
    """
    phase = record.phase
    if isinstance(event, Announce):
        if phase not in RESTING:
            return record, []  # the running update re-reads the channel when it checks
        started = UpdateRecord(phase=Phase.ANNOUNCED, hint=event.hint, rejected=record.rejected)
        if event.hint is None:  # a periodic poll is no news: saved, not reported
            return started, [Persist(started), CheckRelease(None)]
        return _saved(started, CheckRelease(event.hint))
    if isinstance(event, Failed) and phase not in RESTING:
        return _fail(record, event, policy)
    if isinstance(event, RetryDue) and phase in _RETRYABLE:
        return record, [_redo(record)]
    match phase, event:
        case Phase.ANNOUNCED, NothingNew():
            idle = UpdateRecord(rejected=record.rejected)
            return idle, [Persist(idle)]
        case Phase.ANNOUNCED, ReleaseFound(plan=plan, from_slot=from_slot, to_slot=to_slot):
            if plan.release_id in record.rejected:
                idle = UpdateRecord(rejected=record.rejected)
                return idle, [Persist(idle)]
            fetching = _enter(
                record,
                Phase.FETCHING,
                plan=plan,
                from_slot=from_slot,
                to_slot=to_slot,
                activations=0,
                bytes_done=0,
                bytes_total=plan.total_bytes,
            )
            return _saved(fetching, Fetch(plan))
        case Phase.FETCHING, FetchProgressed(done=done, total=total):
            moved = record.model_copy(update={"bytes_done": done, "bytes_total": total})
            step_bytes = max(total // PROGRESS_REPORTS, 1)
            if done >= total or done // step_bytes != record.bytes_done // step_bytes:
                return moved, [Report(moved)]
            return moved, []  # between two reports: a 100 MB model is ~1,600 chunks
        case Phase.FETCHING, Fetched():
            plan, slot = _need_plan(record)
            verified = _enter(record, Phase.VERIFIED, bytes_done=record.bytes_total)
            return _saved(verified, Stage(plan, slot))
        case Phase.VERIFIED, Staged():
            staged = _enter(record, Phase.STAGED)
            activating, actions = _activate(staged)
            return activating, [Persist(staged), Report(staged), *actions]
        case Phase.ACTIVATING, Activated():
            plan, slot = _need_plan(record)
            return _saved(_enter(record, Phase.HEALTH_CHECK), HealthCheck(plan, slot))
        case Phase.HEALTH_CHECK, HealthPassed():
            plan, slot = _need_plan(record)
            return record, [Commit(plan, slot)]
        case Phase.HEALTH_CHECK, Committed():
            return _saved(_enter(record, Phase.COMMITTED), Cleanup())
    raise LifecycleError(f"{type(event).__name__} is not expected in phase {phase.value}")


def resume(
    record: UpdateRecord, committed: InstalledRelease | None, policy: Policy = Policy()
) -> tuple[UpdateRecord, list[Action]]:
    """Return how to continue after a restart found ``record`` persisted.

    ``committed`` is what the slot pointer names now; the server runs it after a restart.
    """
    phase = record.phase
    if phase in RESTING:
        return record, []
    if phase in (Phase.ANNOUNCED, Phase.FETCHING):
        announced = UpdateRecord(phase=Phase.ANNOUNCED, hint=record.hint, rejected=record.rejected)
        return _saved(announced, CheckRelease(record.hint))
    plan, slot = _need_plan(record)
    if phase is Phase.VERIFIED:
        return _saved(_enter(record, Phase.VERIFIED), Stage(plan, slot))
    if phase is Phase.STAGED:
        return _activate(record)
    # activating or health_check: the process died with the new model live (or loading).
    if committed is not None and committed.slot is slot and committed.release_id == plan.release_id:
        return _saved(_enter(record, Phase.COMMITTED), Cleanup())
    if record.activations < policy.max_activations:
        return _activate(record)
    rejected = (*record.rejected, plan.release_id)[-policy.remember_rejected :]
    rolled_back = _enter(
        record,
        Phase.ROLLED_BACK,
        error_code=INTERRUPTED_CODE,
        error_message=(
            f"the agent stopped {record.activations} times while activating this release"
        ),
        rejected=rejected,
    )
    return _saved(rolled_back)


def progress_message(record: UpdateRecord, at: datetime) -> UpdateProgress | None:
    """Return the progress message that reports ``record`` (None while idle)."""
    if record.phase is Phase.IDLE:
        return None
    plan = record.plan
    failed = record.phase in (Phase.FAILED, Phase.ROLLED_BACK)
    return UpdateProgress(
        state=UpdateState(record.phase.value),
        target=plan.target if plan else None,
        timestamp_version=plan.timestamp_version if plan else None,
        bytes_done=min(record.bytes_done, record.bytes_total),
        bytes_total=record.bytes_total,
        error_code=record.error_code if failed else None,
        error_message=record.error_message if failed else None,
        at=at,
    )
