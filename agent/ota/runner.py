"""The thin runner that drives :mod:`agent.ota.lifecycle` against a :class:`Controller`.

The runner owns no decision: it persists records, executes actions in order, turns the
outcome of each work action into the next event, and hands progress to the controller.
Errors leave work actions as events: an :class:`~agent.errors.UpdateRefusedError` (or
another refusal) becomes a permanent failure with its code, a
:class:`~agent.errors.TransientError` or an ``OSError`` a transient one. Anything else is
a bug and propagates.

:class:`DeviceController` is the controller of a real device: the TUF client, the blob
store and the slots, plus an :class:`Activator` (the live server's side: load a slot, run
the health gate, go back) that the daemon provides.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from agent.errors import (
    AgentError,
    RefusedError,
    TransientError,
    UpdateRefusedError,
    UpdateStorageError,
    UpdateTransientError,
)
from agent.ota._fs import write_atomic
from agent.ota.client import Installed, RepositoryClient
from agent.ota.lifecycle import (
    WORK,
    Action,
    Activate,
    Activated,
    Announce,
    CheckRelease,
    Cleanup,
    Commit,
    Committed,
    Event,
    Failed,
    Fetch,
    Fetched,
    FetchProgressed,
    HealthCheck,
    HealthPassed,
    NothingNew,
    Persist,
    Policy,
    ReleaseFound,
    Report,
    RetryDue,
    Rollback,
    Stage,
    Staged,
    UpdateRecord,
    WaitRetry,
    progress_message,
    resume,
    step,
)
from agent.ota.plan import ReleasePlan
from agent.ota.slots import InstalledRelease, SlotManager
from agent.ota.store import BlobStore
from protocol.messages import ReleaseAnnouncement, Slot, UpdateProgress

log = logging.getLogger(__name__)


class Controller(Protocol):
    """The I/O the lifecycle needs. Work methods raise agent errors on failure."""

    def committed(self) -> InstalledRelease | None: ...
    def inactive_slot(self) -> Slot: ...
    def check(self, hint: ReleaseAnnouncement | None) -> ReleasePlan | None: ...
    def fetch(self, plan: ReleasePlan, progress: Callable[[int, int], None]) -> None: ...
    def stage(self, plan: ReleasePlan, slot: Slot) -> None: ...
    def activate(self, plan: ReleasePlan, slot: Slot) -> None: ...
    def health_check(self, plan: ReleasePlan, slot: Slot) -> None: ...
    def commit(self, plan: ReleasePlan, slot: Slot) -> None: ...
    def rollback(self, slot: Slot | None) -> None: ...
    def cleanup(self) -> None: ...
    def report(self, progress: UpdateProgress) -> None: ...


class Activator(Protocol):
    """The live server's side of an update (implemented by the daemon).

    ``activate`` loads the staged model (and adapter) and swaps it in while in-flight
    requests finish on the old one; ``health_check`` judges the live new model and raises
    :class:`~agent.errors.HealthCheckFailedError`; ``rollback`` swaps the committed slot's
    model back in (``base_dir`` None: there was none).
    """

    def activate(self, base_dir: Path, adapter_dir: Path | None, plan: ReleasePlan) -> None: ...
    def health_check(self, plan: ReleasePlan) -> None: ...
    def rollback(self, base_dir: Path | None, adapter_dir: Path | None) -> None: ...


class RecordStore:
    """The lifecycle record on durable storage (``record.json``, replaced atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> UpdateRecord:
        """Return the saved record, or a fresh idle one.

        Raises:
            UpdateStorageError: the file exists but cannot be read or parsed.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return UpdateRecord()
        except OSError as e:
            raise UpdateStorageError(f"{self.path}: {e}") from e
        try:
            return UpdateRecord.model_validate_json(data)
        except ValidationError as e:
            raise UpdateStorageError(f"{self.path} is corrupt: {e}") from e

    def save(self, record: UpdateRecord) -> None:
        """Replace the saved record (temp file, fsync, rename).

        Raises:
            OSError: the disk failed; the old record stays.
        """
        write_atomic(self.path, record.model_dump_json().encode(), mode=0o600)


def jittered_backoff(
    attempt: int, rng: random.Random, *, base_s: float = 2.0, cap_s: float = 300.0
) -> float:
    """Return a "full jitter" delay for retry ``attempt`` (1-based): uniform in [0, bound]."""
    bound = min(cap_s, base_s * 2 ** max(attempt - 1, 0))
    return rng.uniform(0.0, bound)


@dataclass(frozen=True)
class Outcome:
    """Where a run ended: the record, and the last error a work action raised (if any)."""

    record: UpdateRecord
    error: AgentError | None


def _failure(error: AgentError) -> Failed:
    if isinstance(error, UpdateRefusedError | UpdateTransientError):
        return Failed(error.code, str(error), isinstance(error, TransientError))
    if isinstance(error, RefusedError):
        return Failed(UpdateRefusedError.code, str(error), transient=False)
    return Failed(UpdateTransientError.code, str(error), transient=True)


class UpdateRunner:
    """Runs the lifecycle until it rests; one event at a time, from one thread."""

    def __init__(
        self,
        controller: Controller,
        records: RecordStore,
        *,
        policy: Policy | None = None,
        backoff: Callable[[int], float],
        wait: Callable[[float], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._controller = controller
        self._records = records
        self._policy = policy or Policy()
        self._backoff = backoff
        self._wait = wait
        self._clock = clock
        self.record = records.load()

    def resume(self) -> Outcome:
        """Continue an update the last process left unfinished (see ``lifecycle.resume``)."""
        record, actions = resume(self.record, self._controller.committed(), self._policy)
        self.record = record
        return self._run(actions)

    def handle(self, event: Announce) -> Outcome:
        """Feed an announcement (or a poll) and run until the lifecycle rests."""
        return self._run(self._step(event))

    def _step(self, event: Event) -> list[Action]:
        self.record, actions = step(self.record, event, self._policy)
        return actions

    def _run(self, actions: list[Action]) -> Outcome:
        error: AgentError | None = None
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if not isinstance(action, WORK):
                # Persist, Report, Rollback, Cleanup: a failure here is not the update's
                # fault; it propagates, and the restarted agent resumes from the record.
                self._execute(action)
                continue
            try:
                event = self._execute(action)
            except (AgentError, OSError) as e:
                if isinstance(e, OSError):
                    e = UpdateStorageError(f"{type(action).__name__}: {e}")
                log.warning("update step %s failed: %s", type(action).__name__, e)
                error = e
                event = _failure(e)
            if event is not None:
                pending.extend(self._step(event))
        return Outcome(self.record, error)

    def _execute(self, action: Action) -> Event | None:
        controller = self._controller
        match action:
            case Persist(record=record):
                self._records.save(record)
            case Report(record=record):
                message = progress_message(record, self._clock())
                if message is not None:
                    controller.report(message)
            case CheckRelease(hint=hint):
                plan = controller.check(hint)
                if plan is None:
                    return NothingNew()
                current = controller.committed()
                return ReleaseFound(
                    plan, current.slot if current else None, controller.inactive_slot()
                )
            case Fetch(plan=plan):
                controller.fetch(plan, self._on_progress)
                return Fetched()
            case Stage(plan=plan, slot=slot):
                controller.stage(plan, slot)
                return Staged()
            case Activate(plan=plan, slot=slot):
                controller.activate(plan, slot)
                return Activated()
            case HealthCheck(plan=plan, slot=slot):
                controller.health_check(plan, slot)
                return HealthPassed()
            case Commit(plan=plan, slot=slot):
                controller.commit(plan, slot)
                return Committed()
            case Rollback(slot=slot):
                controller.rollback(slot)
            case Cleanup():
                try:
                    controller.cleanup()
                except OSError as e:
                    log.warning("cleaning the blob store failed (harmless, retried later): %s", e)
            case WaitRetry(attempt=attempt):
                self._wait(self._backoff(attempt))
                return RetryDue()
        return None

    def _on_progress(self, done: int, total: int) -> None:
        for action in self._step(FetchProgressed(done, total)):
            self._execute(action)


class DeviceController:
    """The :class:`Controller` of a real device; see the module docstring."""

    def __init__(
        self,
        *,
        group: str,
        channel: str,
        client: RepositoryClient,
        store: BlobStore,
        slots: SlotManager,
        activator: Activator,
        reporter: Callable[[UpdateProgress], None],
        device_id: str | None = None,
    ) -> None:
        self.group = group
        self.channel = channel
        self.device_id = device_id
        self.client = client
        self.store = store
        self.slots = slots
        self.activator = activator
        self.reporter = reporter

    def committed(self) -> InstalledRelease | None:
        return self.slots.current()

    def inactive_slot(self) -> Slot:
        return self.slots.inactive()

    def check(self, hint: ReleaseAnnouncement | None) -> ReleasePlan | None:
        # A hint names the group's channel, or (on the device's own topic) this device's.
        if hint is not None and (
            hint.channel != self.channel or hint.group not in (self.group, self.device_id)
        ):
            log.info("ignoring an announcement for %s/%s", hint.group, hint.channel)
            return None
        current = self.slots.current()
        installed = (
            Installed(
                base_sha256=current.base.sha256,
                adapter_sha256=current.adapter.sha256 if current.adapter else None,
                release_counter=current.release_counter,
            )
            if current
            else None
        )
        return self.client.check(self.group, self.channel, installed, hint, self.device_id)

    def fetch(self, plan: ReleasePlan, progress: Callable[[int, int], None]) -> None:
        self.client.fetch(plan, self.store, progress)

    def stage(self, plan: ReleasePlan, slot: Slot) -> None:
        self.slots.stage(slot, plan, self.store)

    def activate(self, plan: ReleasePlan, slot: Slot) -> None:
        adapter = self.slots.adapter_dir(slot) if plan.adapter else None
        self.activator.activate(self.slots.base_dir(slot), adapter, plan)

    def health_check(self, plan: ReleasePlan, slot: Slot) -> None:
        self.activator.health_check(plan)

    def commit(self, plan: ReleasePlan, slot: Slot) -> None:
        self.slots.commit(slot, plan)

    def rollback(self, slot: Slot | None) -> None:
        if slot is None:
            self.activator.rollback(None, None)
            return
        staged = self.slots.staged(slot)
        adapter = self.slots.adapter_dir(slot) if staged and staged.adapter else None
        self.activator.rollback(self.slots.base_dir(slot), adapter)

    def cleanup(self) -> None:
        self.store.prune(self.slots.referenced_blobs())

    def report(self, progress: UpdateProgress) -> None:
        self.reporter(progress)
