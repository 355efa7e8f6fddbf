"""The registry's query and command API, over one SQLAlchemy engine.

Every public method is one transaction. Writes begin with the write lock on SQLite
(``BEGIN IMMEDIATE``) and lock the rollout row on PostgreSQL where a decision depends on
it, so several coordinator processes can share one database.

Invariants:

- Device messages are idempotent and ordered by the device's own timestamp: a status,
  heartbeat or progress message that is not newer than the stored one changes nothing
  (:attr:`Ingest.STALE`). A timestamp more than :data:`MAX_CLOCK_SKEW` ahead of the
  coordinator's clock is clamped to it, so a device whose clock once ran far ahead is not
  locked out once its clock is corrected.
- ``last_seen`` is the coordinator's receive time of the latest heartbeat (never a device
  clock) and only moves forward. The Last Will (a status with health ``offline``) only
  records ``will_at``; liveness (:mod:`.liveness`) decides what it means.
- Operator commands (registering devices, creating releases and rollouts, pause, resume,
  abort, rollback) write an audit entry in the same transaction. Every rollout decision,
  automatic or not, is appended to the rollout's decision log with its reason.
- Returned values are frozen views (:mod:`.views`), never ORM objects.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar, cast

from sqlalchemy import Engine, Table, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from coordinator.errors import RefusedError
from coordinator.registry.engine import writer
from coordinator.registry.errors import ConflictError, NotFoundError, SelectorError
from coordinator.registry.liveness import LinkState, LivenessRule, Online, judge
from coordinator.registry.models import (
    AuditEntry,
    Device,
    DeviceGroup,
    DeviceTag,
    FederationNode,
    Heartbeat,
    HeartbeatHour,
    Release,
    Rollout,
    RolloutDecision,
    RolloutTarget,
    Round,
    RoundMetric,
    UpdateRecord,
    Wave,
)
from coordinator.registry.views import (
    AuditView,
    BundleView,
    DecisionView,
    DeviceFilter,
    DeviceView,
    FederationNodeView,
    Ingest,
    ReleaseView,
    RolloutSpec,
    RolloutView,
    RoundMetricView,
    RoundState,
    RoundView,
    Selector,
    Transition,
    UpdateView,
    WaveView,
)
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
    RolloutState,
    Snapshot,
    StartWave,
    Thresholds,
    Wait,
    WaveRecord,
    WaveSize,
    WaveSpec,
    WaveState,
    allocate,
    order_targets,
    previous_release,
)
from coordinator.rollout.policy import command as apply_command
from protocol.bundle import BundleKind, BundleManifest, bundle_hash
from protocol.messages import (
    DeviceMessage,
    DeviceStatus,
    EvaluationReport,
    Health,
    UpdateProgress,
    UpdateState,
)
from protocol.messages import Heartbeat as HeartbeatMessage
from protocol.rounds import RoundManifest
from protocol.topics import TopicError, check_segment

__all__ = ["MAX_BATCH", "MAX_CLOCK_SKEW", "Incoming", "Registry", "utc_now"]

#: Largest number of messages :meth:`Registry.ingest` takes in one call.
MAX_BATCH: Final = 5000
#: How far ahead of the coordinator's clock a device timestamp may be before it is clamped.
MAX_CLOCK_SKEW: Final = timedelta(minutes=5)
MAX_LIST: Final = 1000  # rows one listing call returns
MAX_ACTOR: Final = 128  # characters
MAX_REASON: Final = 1024  # characters
MAX_AUDIT_DETAILS: Final = 16 * 1024  # bytes of JSON
_IN_CHUNK: Final = 500  # ids per IN (...) clause
_ROWS_PER_STATEMENT: Final = 500  # rows per multi-row INSERT (SQLite's bound-variable limit)
POLICY_ACTOR: Final = "policy"
_T = TypeVar("_T")

Incoming = tuple[str, DeviceMessage, datetime]
"""One device message: (device id from the topic, parsed payload, coordinator receive time)."""


def utc_now() -> datetime:
    """The coordinator's clock: aware UTC now."""
    return datetime.now(UTC)


def _check_actor(actor: str) -> str:
    if not actor or len(actor) > MAX_ACTOR or not actor.isprintable():
        raise RefusedError(f"actor must be 1..{MAX_ACTOR} printable characters, got {actor!r}")
    return actor


def _check_reason(reason: str) -> str:
    if not reason or len(reason) > MAX_REASON:
        raise RefusedError(f"reason must be 1..{MAX_REASON} characters (got {len(reason)})")
    return reason


def _check_name(value: str, what: str) -> str:
    try:
        return check_segment(value, what)
    except TopicError as e:
        raise RefusedError(str(e)) from e


def _check_limit(limit: int, offset: int = 0) -> None:
    if not 1 <= limit <= MAX_LIST:
        raise RefusedError(f"limit {limit} is outside 1..{MAX_LIST}")
    if offset < 0:
        raise RefusedError(f"offset {offset} is negative")


def _chunks(items: Sequence[_T], size: int = _IN_CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


class Registry:
    """The fleet registry. ``clock`` returns aware UTC time (injected for tests)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._engine = engine
        self._clock = clock
        self._reader = sessionmaker(engine, expire_on_commit=False)
        self._writer = sessionmaker(writer(engine), expire_on_commit=False)

    @property
    def engine(self) -> Engine:
        """The engine this registry uses."""
        return self._engine

    def now(self) -> datetime:
        """The registry's clock."""
        return self._clock()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reader.begin() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writer.begin() as session:
            yield session

    def _upsert(self, session: Session) -> Any:
        return (
            postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        )

    # -- devices ------------------------------------------------------------------------

    def register_device(
        self,
        device_id: str,
        *,
        groups: Sequence[str] = (),
        tags: Sequence[str] = (),
        actor: str,
    ) -> DeviceView:
        """Register a device, or replace the groups and tags of a registered one.

        Raises:
            RefusedError: a malformed device id, group or tag name, or actor.
        """
        _check_name(device_id, "device_id")
        for group in groups:
            _check_name(group, "group")
        for tag in tags:
            _check_name(tag, "tag")
        _check_actor(actor)
        now = self.now()
        with self._write() as s:
            device = s.get(Device, device_id)
            created = device is None
            if device is None:
                device = Device(id=device_id, registered_at=now, online=Online.UNKNOWN)
                s.add(device)
            device.groups = [DeviceGroup(device_id=device_id, name=g) for g in sorted(set(groups))]
            device.tags = [DeviceTag(device_id=device_id, name=t) for t in sorted(set(tags))]
            self._audit(
                s,
                actor,
                "device.register" if created else "device.update",
                device_id,
                {"groups": sorted(set(groups)), "tags": sorted(set(tags))},
            )
            s.flush()
            return _device_view(device)

    def get_device(self, device_id: str) -> DeviceView:
        """Return one device.

        Raises:
            NotFoundError: no such device.
        """
        with self._read() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise NotFoundError(f"unknown device {device_id!r}")
            return _device_view(device)

    def list_devices(self, where: DeviceFilter | None = None) -> list[DeviceView]:
        """Return devices matching ``where``, ordered by id.

        Raises:
            RefusedError: ``limit`` outside 1..1000 or a negative ``offset``.
        """
        where = where or DeviceFilter()
        _check_limit(where.limit, where.offset)
        with self._read() as s:
            query = self._filtered(select(Device), where)
            query = query.order_by(Device.id).limit(where.limit).offset(where.offset)
            return [_device_view(d) for d in s.scalars(query)]

    def count_devices(self, where: DeviceFilter | None = None) -> dict[Online, int]:
        """Return how many devices matching ``where`` are in each online state."""
        where = where or DeviceFilter()
        with self._read() as s:
            query = self._filtered(select(Device.online, func.count()), where)
            counts = {state: 0 for state in Online}
            for row in s.execute(query.group_by(Device.online)):
                counts[Online(row[0])] = int(row[1])
            return counts

    @staticmethod
    def _filtered(query: Any, where: DeviceFilter) -> Any:
        if where.group is not None:
            query = query.where(
                Device.id.in_(select(DeviceGroup.device_id).where(DeviceGroup.name == where.group))
            )
        if where.tag is not None:
            query = query.where(
                Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.name == where.tag))
            )
        if where.online is not None:
            query = query.where(Device.online == where.online)
        if where.health is not None:
            query = query.where(Device.health == where.health)
        if where.base_sha256 is not None:
            query = query.where(Device.base_sha256 == where.base_sha256)
        return query

    # -- device messages -----------------------------------------------------------------

    def ingest(self, batch: Sequence[Incoming]) -> list[Ingest]:
        """Apply a batch of device messages in one transaction; one result per message.

        Raises:
            RefusedError: more than :data:`MAX_BATCH` messages, or a naive receive time.
        """
        if len(batch) > MAX_BATCH:
            raise RefusedError(f"batch of {len(batch)} messages is over the limit of {MAX_BATCH}")
        if not batch:
            return []
        for _, _, received_at in batch:
            if received_at.tzinfo is None:
                raise RefusedError("received_at must be an aware datetime")
        ids = sorted({device_id for device_id, _, _ in batch})
        with self._write() as s:
            known: set[str] = set()
            for chunk in _chunks(ids):
                known.update(s.scalars(select(Device.id).where(Device.id.in_(chunk))))
            results: list[Ingest] = [Ingest.UNKNOWN_DEVICE] * len(batch)
            beats: list[tuple[int, str, HeartbeatMessage, datetime]] = []
            for index, (device_id, message, received_at) in enumerate(batch):
                if device_id not in known:
                    continue
                if isinstance(message, HeartbeatMessage):
                    beats.append((index, device_id, message, received_at))
                elif isinstance(message, DeviceStatus):
                    results[index] = self._status(s, device_id, message, received_at)
                elif isinstance(message, EvaluationReport):
                    results[index] = self._evaluation(
                        s, device_id, message.bundle.sha256, message.baseline, message.candidate
                    )
                else:
                    results[index] = self._progress(s, device_id, message, received_at)
            if beats:
                self._heartbeats(s, beats, results)
            return results

    def _status(self, s: Session, device_id: str, msg: DeviceStatus, received: datetime) -> Ingest:
        if msg.health is Health.OFFLINE:
            s.execute(
                update(Device)
                .where(
                    Device.id == device_id, or_(Device.will_at.is_(None), Device.will_at < received)
                )
                .values(will_at=received)
                .execution_options(synchronize_session=False)
            )
            return Ingest.APPLIED
        at = min(msg.reported_at, received + MAX_CLOCK_SKEW)
        base, adapter = msg.base, msg.adapter
        result = s.execute(
            update(Device)
            .where(Device.id == device_id, or_(Device.status_at.is_(None), Device.status_at < at))
            .values(
                agent_version=msg.agent_version,
                health=msg.health,
                base_name=base.name if base else None,
                base_version=base.version if base else None,
                base_sha256=base.sha256 if base else None,
                adapter_name=adapter.name if adapter else None,
                adapter_version=adapter.version if adapter else None,
                adapter_sha256=adapter.sha256 if adapter else None,
                slot=msg.slot,
                uptime_s=msg.uptime_s,
                load_1m=msg.load_1m,
                free_disk_bytes=msg.free_disk_bytes,
                status_at=at,
            )
            .execution_options(synchronize_session=False)
        )
        return Ingest.APPLIED if _rowcount(result) else Ingest.STALE

    def _heartbeats(
        self,
        s: Session,
        beats: Sequence[tuple[int, str, HeartbeatMessage, datetime]],
        results: list[Ingest],
    ) -> None:
        """Apply a batch's heartbeats with a few statements per batch, not per message.

        Heartbeats touch only their own table, the hourly counters and ``last_seen``, so
        applying them together after the batch's other messages changes nothing. Per
        device, the newest one is written; each is judged against the stored one and the
        ones before it in the batch, as if written one at a time.
        """
        newest: dict[str, datetime] = {}
        ids = sorted({device_id for _, device_id, _, _ in beats})
        for chunk in _chunks(ids):
            query = select(Heartbeat.device_id, Heartbeat.sent_at)
            for device_id, sent_at in s.execute(query.where(Heartbeat.device_id.in_(chunk))):
                newest[device_id] = sent_at
        rows: dict[str, dict[str, Any]] = {}
        hours: Counter[tuple[str, datetime]] = Counter()
        seen: dict[str, datetime] = {}
        for index, device_id, msg, received in beats:
            at = min(msg.sent_at, received + MAX_CLOCK_SKEW)
            before = newest.get(device_id)
            if before is None or before < at:
                newest[device_id] = at
                results[index] = Ingest.APPLIED
                rows[device_id] = {
                    "device_id": device_id,
                    "sent_at": at,
                    "received_at": received,
                    "health": msg.health,
                    "base_sha256": msg.base_sha256,
                    "uptime_s": msg.uptime_s,
                    "load_1m": msg.load_1m,
                    "free_disk_bytes": msg.free_disk_bytes,
                }
            else:
                results[index] = Ingest.STALE
            hours[(device_id, _hour(received))] += 1
            if device_id not in seen or seen[device_id] < received:
                seen[device_id] = received
        upsert = self._upsert(s)
        latest = list(rows.values())
        for part in _chunks(latest, _ROWS_PER_STATEMENT):
            stmt = upsert(Heartbeat).values(part)
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=[Heartbeat.device_id],
                    set_={k: stmt.excluded[k] for k in latest[0] if k != "device_id"},
                    where=Heartbeat.sent_at < stmt.excluded.sent_at,
                )
            )
        counts = [{"device_id": d, "hour": h, "count": n} for (d, h), n in hours.items()]
        for hour_rows in _chunks(counts, _ROWS_PER_STATEMENT):
            stmt = upsert(HeartbeatHour).values(hour_rows)
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=[HeartbeatHour.device_id, HeartbeatHour.hour],
                    set_={"count": HeartbeatHour.count + stmt.excluded["count"]},
                )
            )
        devices = cast(Table, Device.__table__)
        s.connection().execute(
            update(devices)
            .where(
                devices.c.id == bindparam("b_id"),
                or_(devices.c.last_seen.is_(None), devices.c.last_seen < bindparam("b_seen")),
            )
            .values(last_seen=bindparam("b_seen")),
            [{"b_id": d, "b_seen": t} for d, t in seen.items()],
        )

    def _progress(
        self, s: Session, device_id: str, msg: UpdateProgress, received: datetime
    ) -> Ingest:
        row = s.execute(
            select(UpdateRecord.id, UpdateRecord.state, Release.bundle_sha256)
            .join(Rollout, Rollout.id == UpdateRecord.rollout_id)
            .join(Release, Release.id == Rollout.release_id)
            .where(UpdateRecord.device_id == device_id)
            .order_by(UpdateRecord.id.desc())
            .limit(1)
        ).first()
        if row is None or (msg.target is not None and msg.target.sha256 != row.bundle_sha256):
            return Ingest.UNMATCHED
        at = min(msg.at, received + MAX_CLOCK_SKEW)
        result = s.execute(
            update(UpdateRecord)
            .where(
                UpdateRecord.id == row.id,
                or_(UpdateRecord.reported_at.is_(None), UpdateRecord.reported_at < at),
            )
            .values(
                state=msg.state,
                bytes_done=msg.bytes_done,
                bytes_total=msg.bytes_total,
                error_code=msg.error_code,
                error_message=msg.error_message,
                reported_at=at,
                changed_at=received if msg.state is not row.state else UpdateRecord.changed_at,
            )
            .execution_options(synchronize_session=False)
        )
        return Ingest.APPLIED if _rowcount(result) else Ingest.STALE

    def record_evaluation(
        self, device_id: str, bundle_sha256: str, *, baseline: float, candidate: float
    ) -> Ingest:
        """Record a device's metric (lower is better, e.g. held-out perplexity) before
        (``baseline``) and after (``candidate``) it installed the bundle ``bundle_sha256``.

        Raises:
            RefusedError: a metric that is not a finite positive number.
        """
        for name, value in (("baseline", baseline), ("candidate", candidate)):
            if not (math.isfinite(value) and value > 0):
                raise RefusedError(f"{name} must be a finite number > 0, got {value!r}")
        with self._write() as s:
            if s.get(Device, device_id) is None:
                return Ingest.UNKNOWN_DEVICE
            return self._evaluation(s, device_id, bundle_sha256, baseline, candidate)

    def _evaluation(
        self, s: Session, device_id: str, bundle_sha256: str, baseline: float, candidate: float
    ) -> Ingest:
        """Attach the metric to the device's latest update record for that bundle."""
        record_id = s.scalar(
            select(UpdateRecord.id)
            .join(Rollout, Rollout.id == UpdateRecord.rollout_id)
            .join(Release, Release.id == Rollout.release_id)
            .where(UpdateRecord.device_id == device_id, Release.bundle_sha256 == bundle_sha256)
            .order_by(UpdateRecord.id.desc())
            .limit(1)
        )
        if record_id is None:
            return Ingest.UNMATCHED
        s.execute(
            update(UpdateRecord)
            .where(UpdateRecord.id == record_id)
            .values(baseline=baseline, candidate=candidate)
            .execution_options(synchronize_session=False)
        )
        return Ingest.APPLIED

    def sweep_liveness(self, link: LinkState, rule: LivenessRule) -> list[Transition]:
        """Re-judge every device's online state (see :mod:`.liveness`); return the changes."""
        now = self.now()
        with self._write() as s:
            rows = s.execute(
                select(
                    Device.id, Device.last_seen, Device.will_at, Device.registered_at, Device.online
                )
            ).all()
            changes: list[Transition] = []
            for row in rows:
                verdict = judge(
                    last_seen=row.last_seen,
                    will_at=row.will_at,
                    registered_at=row.registered_at,
                    link=link,
                    rule=rule,
                    now=now,
                )
                if verdict is not None and verdict is not row.online:
                    changes.append(Transition(row.id, row.online, verdict))
            if changes:
                s.execute(
                    update(Device),
                    [
                        {"id": c.device_id, "online": c.after, "online_changed_at": now}
                        for c in changes
                    ],
                )
            return changes

    def heartbeat_history(self, device_id: str, since: datetime) -> list[tuple[datetime, int]]:
        """Return ``(hour, heartbeats received)`` for ``device_id`` from ``since`` on."""
        with self._read() as s:
            rows = s.execute(
                select(HeartbeatHour.hour, HeartbeatHour.count)
                .where(HeartbeatHour.device_id == device_id, HeartbeatHour.hour >= _hour(since))
                .order_by(HeartbeatHour.hour)
            )
            return [(hour, count) for hour, count in rows]

    def prune_heartbeat_history(self, keep: timedelta) -> int:
        """Delete heartbeat counters older than ``keep``; return how many rows went."""
        cutoff = _hour(self.now() - keep)
        with self._write() as s:
            result = s.execute(
                delete(HeartbeatHour)
                .where(HeartbeatHour.hour < cutoff)
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result)

    # -- releases ---------------------------------------------------------------------------

    def create_release(self, manifest: BundleManifest, *, actor: str) -> ReleaseView:
        """Record a release of ``manifest``. Recording the same manifest again returns the
        existing release.

        Raises:
            ConflictError: the name and version, or the bundle, is already recorded with
                different contents.
            RefusedError: a malformed actor.
        """
        _check_actor(actor)
        digest = bundle_hash(manifest)
        with self._write() as s:
            same = s.scalar(select(Release).where(Release.bundle_sha256 == digest))
            if same is not None:
                return _release_view(same)
            clash = s.scalar(
                select(Release).where(
                    Release.name == manifest.name, Release.version == manifest.version
                )
            )
            if clash is not None:
                raise ConflictError(
                    f"release {manifest.name} {manifest.version} already exists with bundle "
                    f"{clash.bundle_sha256[:12]}…, not {digest[:12]}…: give it a new version"
                )
            release = Release(
                name=manifest.name,
                version=manifest.version,
                kind=manifest.kind,
                bundle_sha256=digest,
                manifest=manifest.model_dump(mode="json"),
                created_at=self.now(),
                created_by=actor,
            )
            s.add(release)
            s.flush()
            self._audit(
                s,
                actor,
                "release.create",
                f"{manifest.name}/{manifest.version}",
                {"release_id": release.id, "bundle_sha256": digest, "kind": manifest.kind.value},
            )
            return _release_view(release)

    def get_release(self, release_id: int) -> ReleaseView:
        """Return one release. Raises NotFoundError."""
        with self._read() as s:
            release = s.get(Release, release_id)
            if release is None:
                raise NotFoundError(f"unknown release {release_id}")
            return _release_view(release)

    def find_release(self, name: str, version: str) -> ReleaseView:
        """Return the release ``name`` ``version``. Raises NotFoundError."""
        with self._read() as s:
            release = s.scalar(
                select(Release).where(Release.name == name, Release.version == version)
            )
            if release is None:
                raise NotFoundError(f"unknown release {name} {version}")
            return _release_view(release)

    def list_releases(self, limit: int = 100) -> list[ReleaseView]:
        """Return the newest releases first. Raises RefusedError for a bad ``limit``."""
        _check_limit(limit)
        with self._read() as s:
            query = select(Release).order_by(Release.id.desc()).limit(limit)
            return [_release_view(r) for r in s.scalars(query)]

    # -- rollouts ---------------------------------------------------------------------------

    def create_rollout(self, spec: RolloutSpec, *, actor: str) -> RolloutView:
        """Resolve the targets, freeze them in seeded-shuffle order, and create the waves.

        Raises:
            NotFoundError: unknown release, or a listed device that is not registered.
            SelectorError: a group or tag that has no devices.
            PlanError: waves that do not fit the number of targets.
            RefusedError: a malformed actor.
        """
        _check_actor(actor)
        with self._write() as s:
            rollout = self._create_rollout(s, spec, actor, rollback_of=None)
            return self._rollout_view(s, rollout)

    def _create_rollout(
        self, s: Session, spec: RolloutSpec, actor: str, *, rollback_of: int | None
    ) -> Rollout:
        release = s.get(Release, spec.release_id)
        if release is None:
            raise NotFoundError(f"unknown release {spec.release_id}")
        targets = self._resolve(s, spec.selector)
        counts = allocate(len(targets), spec.waves)
        now = self.now()
        rollout = Rollout(
            release_id=release.id,
            selector=spec.selector.to_json(),
            state=RolloutState.RUNNING,
            max_failure_rate=spec.thresholds.max_failure_rate,
            max_eval_regression=spec.thresholds.max_eval_regression,
            wave_timeout_s=spec.thresholds.wave_timeout_s,
            rollback_of=rollback_of,
            created_at=now,
            created_by=actor,
        )
        s.add(rollout)
        s.flush()
        ordered = order_targets(rollout.id, targets)
        s.execute(
            insert(RolloutTarget),
            [
                {"rollout_id": rollout.id, "device_id": d, "position": i}
                for i, d in enumerate(ordered)
            ],
        )
        for position, (wave, count) in enumerate(zip(spec.waves, counts, strict=True)):
            s.add(
                Wave(
                    rollout_id=rollout.id,
                    position=position,
                    size_unit=wave.size.unit,
                    size_value=wave.size.value,
                    device_count=count,
                    soak_s=wave.soak_s,
                    state=WaveState.PENDING,
                )
            )
        what = f"rollback to {release.name} {release.version}" if rollback_of else "created"
        self._decision(
            s,
            rollout.id,
            "create",
            None,
            actor,
            f"{what}: {len(ordered)} targets in {len(spec.waves)} waves "
            f"({', '.join(str(c) for c in counts)} devices)",
        )
        self._audit(
            s,
            actor,
            "rollout.rollback" if rollback_of else "rollout.create",
            f"rollout/{rollout.id}",
            {
                "release_id": release.id,
                "selector": spec.selector.to_json(),
                "targets": len(ordered),
                "waves": [str(w.size) for w in spec.waves],
                "rollback_of": rollback_of,
            },
        )
        s.flush()
        return rollout

    def _resolve(self, s: Session, selector: Selector) -> list[str]:
        chosen: set[str] = set()
        for group in selector.groups:
            members = set(s.scalars(select(DeviceGroup.device_id).where(DeviceGroup.name == group)))
            if not members:
                raise SelectorError(f"group {group!r} has no devices")
            chosen |= members
        for tag in selector.tags:
            members = set(s.scalars(select(DeviceTag.device_id).where(DeviceTag.name == tag)))
            if not members:
                raise SelectorError(f"tag {tag!r} is on no device")
            chosen |= members
        if selector.devices:
            listed = list(selector.devices)
            found: set[str] = set()
            for chunk in _chunks(listed):
                found.update(s.scalars(select(Device.id).where(Device.id.in_(chunk))))
            missing = [d for d in listed if d not in found]
            if missing:
                shown = ", ".join(repr(d) for d in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise NotFoundError(f"unknown device {shown}{more} in the selector")
            chosen |= found
        return sorted(chosen)

    def get_rollout(self, rollout_id: int) -> RolloutView:
        """Return a rollout with its waves and their progress. Raises NotFoundError."""
        with self._read() as s:
            return self._rollout_view(s, self._rollout(s, rollout_id))

    def list_rollouts(
        self, *, state: RolloutState | None = None, limit: int = 100
    ) -> list[RolloutView]:
        """Return rollouts, newest first. Raises RefusedError for a bad ``limit``."""
        _check_limit(limit)
        with self._read() as s:
            query = select(Rollout).order_by(Rollout.id.desc()).limit(limit)
            if state is not None:
                query = query.where(Rollout.state == state)
            return [self._rollout_view(s, r) for r in s.scalars(query)]

    def active_rollouts(self) -> list[int]:
        """Return the ids of rollouts that are running or paused, oldest first."""
        with self._read() as s:
            query = (
                select(Rollout.id)
                .where(Rollout.state.in_([RolloutState.RUNNING, RolloutState.PAUSED]))
                .order_by(Rollout.id)
            )
            return list(s.scalars(query))

    def rollout_updates(self, rollout_id: int) -> list[UpdateView]:
        """Return the update records of a rollout, by wave then device. Raises NotFoundError."""
        with self._read() as s:
            self._rollout(s, rollout_id)
            return self._updates(s, UpdateRecord.rollout_id == rollout_id)

    def device_updates(self, device_id: str, limit: int = 100) -> list[UpdateView]:
        """Return a device's update history, newest first. Raises NotFoundError."""
        _check_limit(limit)
        with self._read() as s:
            if s.get(Device, device_id) is None:
                raise NotFoundError(f"unknown device {device_id!r}")
            return self._updates(s, UpdateRecord.device_id == device_id, newest_first=True)[:limit]

    def _updates(self, s: Session, where: Any, *, newest_first: bool = False) -> list[UpdateView]:
        order = (
            (UpdateRecord.id.desc(),) if newest_first else (Wave.position, UpdateRecord.device_id)
        )
        rows = s.execute(
            select(
                UpdateRecord, Wave.position, Release.name, Release.version, Release.bundle_sha256
            )
            .join(Wave, Wave.id == UpdateRecord.wave_id)
            .join(Rollout, Rollout.id == UpdateRecord.rollout_id)
            .join(Release, Release.id == Rollout.release_id)
            .where(where)
            .order_by(*order)
        )
        return [
            UpdateView(
                device_id=u.device_id,
                rollout_id=u.rollout_id,
                wave=position,
                release=BundleView(name, version, sha),
                state=u.state,
                bytes_done=u.bytes_done,
                bytes_total=u.bytes_total,
                error_code=u.error_code,
                error_message=u.error_message,
                baseline=u.baseline,
                candidate=u.candidate,
                announced_at=u.announced_at,
                reported_at=u.reported_at,
                changed_at=u.changed_at,
            )
            for u, position, name, version, sha in rows
        ]

    def rollout_decisions(self, rollout_id: int) -> list[DecisionView]:
        """Return a rollout's decision log, oldest first. Raises NotFoundError."""
        with self._read() as s:
            self._rollout(s, rollout_id)
            rows = s.scalars(
                select(RolloutDecision)
                .where(RolloutDecision.rollout_id == rollout_id)
                .order_by(RolloutDecision.id)
            )
            return [DecisionView(d.at, d.kind, d.wave_index, d.actor, d.reason) for d in rows]

    def command(
        self, rollout_id: int, cmd: Command, *, actor: str, reason: str | None = None
    ) -> RolloutView:
        """Pause, resume or abort a rollout.

        Raises:
            NotFoundError: no such rollout.
            TransitionError: the command does not apply to the rollout's state.
            RefusedError: a malformed actor or reason.
        """
        _check_actor(actor)
        if reason is not None:
            _check_reason(reason)
        with self._write() as s:
            rollout = self._rollout(s, rollout_id, lock=True)
            self._command(s, rollout, cmd, actor, reason or f"{cmd.value} by {actor}")
            return self._rollout_view(s, rollout)

    def _command(self, s: Session, rollout: Rollout, cmd: Command, actor: str, reason: str) -> None:
        before = rollout.state
        rollout.state = apply_command(before, cmd)
        now = self.now()
        if rollout.state is RolloutState.ABORTED:
            rollout.finished_at = now
            self._cancel_open_waves(s, rollout.id, now, f"cancelled: rollout aborted ({reason})")
        self._decision(s, rollout.id, cmd.value, None, actor, reason)
        self._audit(
            s,
            actor,
            f"rollout.{cmd.value}",
            f"rollout/{rollout.id}",
            {"from": before.value, "to": rollout.state.value, "reason": reason},
        )

    def rollback_group(
        self,
        group: str,
        *,
        actor: str,
        waves: tuple[WaveSpec, ...] = (WaveSpec(WaveSize.parse("100%")),),
        thresholds: Thresholds | None = None,
    ) -> RolloutView:
        """Roll ``group`` back to its previous release (see
        :func:`coordinator.rollout.policy.previous_release`): abort the group's active
        rollouts and create a rollout of that release to the group.

        Raises:
            TransitionError: the group has no earlier completed release.
            SelectorError: the group has no devices (any more).
            RefusedError: a malformed group name or actor.
        """
        _check_name(group, "group")
        _check_actor(actor)
        with self._write() as s:
            rollouts = [
                r
                for r in s.scalars(select(Rollout).order_by(Rollout.id).with_for_update(of=Rollout))
                if group in r.selector.get("groups", ())
            ]
            reverted = {r.rollback_of for r in s.scalars(select(Rollout)) if r.rollback_of}
            history = [
                GroupRollout(r.id, r.release_id, r.state, reverted=r.id in reverted)
                for r in rollouts
            ]
            release_id = previous_release(group, history)
            for r in rollouts:
                if r.state not in FINAL_STATES:
                    self._command(
                        s, r, Command.ABORT, actor, f"superseded by a rollback of group {group!r}"
                    )
            spec = RolloutSpec(
                release_id=release_id,
                selector=Selector(groups=(group,)),
                waves=waves,
                thresholds=thresholds or Thresholds(),
            )
            rollout = self._create_rollout(s, spec, actor, rollback_of=rollouts[-1].id)
            return self._rollout_view(s, rollout)

    def step(
        self, rollout_id: int, decide: Callable[[Snapshot], Decision]
    ) -> tuple[Decision, ReleaseView]:
        """Take one policy step: build the rollout's snapshot, ask ``decide``, and record
        the decision, all in one transaction (the rollout row is locked, so two runners
        never both start a wave). Returns the decision and the release it is about.

        Raises:
            NotFoundError: no such rollout.
        """
        with self._write() as s:
            rollout = self._rollout(s, rollout_id, lock=True)
            snapshot = self._snapshot(s, rollout)
            decision = decide(snapshot)
            self._record(s, rollout, decision, snapshot.now)
            s.flush()
            return decision, _release_view(rollout.release)

    def snapshot(self, rollout_id: int) -> Snapshot:
        """Return the policy's view of a rollout now. Raises NotFoundError."""
        with self._read() as s:
            return self._snapshot(s, self._rollout(s, rollout_id))

    def _snapshot(self, s: Session, rollout: Rollout) -> Snapshot:
        targets = tuple(
            s.scalars(
                select(RolloutTarget.device_id)
                .where(RolloutTarget.rollout_id == rollout.id)
                .order_by(RolloutTarget.position)
            )
        )
        plan = Plan(
            rollout_id=rollout.id,
            adapter=rollout.release.kind is BundleKind.ADAPTER,
            targets=targets,
            waves=tuple(
                WaveSpec(WaveSize(w.size_unit, w.size_value), w.soak_s) for w in rollout.waves
            ),
            thresholds=_thresholds(rollout),
        )
        stored = tuple(w.device_count for w in rollout.waves)
        if tuple(len(d) for d in plan.wave_devices) != stored:
            raise RuntimeError(
                f"rollout {rollout.id}: stored wave sizes {stored} differ from the plan's"
            )
        reports = {
            u.device_id: DeviceReport(u.state, u.changed_at, u.baseline, u.candidate)
            for u in s.scalars(select(UpdateRecord).where(UpdateRecord.rollout_id == rollout.id))
        }
        return Snapshot(
            plan=plan,
            state=rollout.state,
            waves=tuple(WaveRecord(w.state, w.started_at) for w in rollout.waves),
            reports=reports,
            now=self.now(),
        )

    def _record(self, s: Session, rollout: Rollout, decision: Decision, now: datetime) -> None:
        waves = {w.position: w for w in rollout.waves}
        wave_index: int | None = None
        match decision:
            case Wait():
                return
            case StartWave(index=wave_index, devices=devices):
                wave = waves[wave_index]
                wave.state, wave.started_at, wave.reason = WaveState.RUNNING, now, decision.reason
                s.flush()
                if devices:
                    s.execute(
                        insert(UpdateRecord),
                        [
                            {
                                "device_id": d,
                                "rollout_id": rollout.id,
                                "wave_id": wave.id,
                                "state": UpdateState.ANNOUNCED,
                                "bytes_done": 0,
                                "bytes_total": 0,
                                "announced_at": now,
                                "changed_at": now,
                            }
                            for d in devices
                        ],
                    )
                kind = "start_wave"
            case PassWave(index=wave_index):
                wave = waves[wave_index]
                wave.state, wave.decided_at, wave.reason = WaveState.PASSED, now, decision.reason
                kind = "pass_wave"
            case Halt(index=wave_index):
                wave = waves[wave_index]
                wave.state, wave.decided_at, wave.reason = WaveState.FAILED, now, decision.reason
                rollout.state, rollout.finished_at = RolloutState.HALTED, now
                s.flush()
                self._cancel_open_waves(
                    s, rollout.id, now, f"cancelled: the rollout halted at wave {wave_index + 1}"
                )
                kind = "halt"
            case Complete():
                rollout.state, rollout.finished_at = RolloutState.COMPLETED, now
                kind = "complete"
        self._decision(s, rollout.id, kind, wave_index, POLICY_ACTOR, decision.reason)

    def _cancel_open_waves(self, s: Session, rollout_id: int, now: datetime, reason: str) -> None:
        s.execute(
            update(Wave)
            .where(
                Wave.rollout_id == rollout_id,
                Wave.state.in_([WaveState.PENDING, WaveState.RUNNING]),
            )
            .values(state=WaveState.CANCELLED, decided_at=now, reason=reason)
            .execution_options(synchronize_session="fetch")
        )

    def _rollout(self, s: Session, rollout_id: int, *, lock: bool = False) -> Rollout:
        query = select(Rollout).where(Rollout.id == rollout_id)
        if lock:
            query = query.with_for_update(of=Rollout)
        rollout = s.scalar(query)
        if rollout is None:
            raise NotFoundError(f"unknown rollout {rollout_id}")
        return rollout

    def _rollout_view(self, s: Session, rollout: Rollout) -> RolloutView:
        progress: dict[int, dict[UpdateState, int]] = defaultdict(dict)
        rows = s.execute(
            select(UpdateRecord.wave_id, UpdateRecord.state, func.count())
            .where(UpdateRecord.rollout_id == rollout.id)
            .group_by(UpdateRecord.wave_id, UpdateRecord.state)
        )
        for wave_id, state, n in rows:
            progress[wave_id][UpdateState(state)] = n
        return RolloutView(
            id=rollout.id,
            release=_release_view(rollout.release),
            selector=Selector.from_json(rollout.selector),
            state=rollout.state,
            thresholds=_thresholds(rollout),
            target_count=sum(w.device_count for w in rollout.waves),
            rollback_of=rollout.rollback_of,
            created_at=rollout.created_at,
            created_by=rollout.created_by,
            finished_at=rollout.finished_at,
            waves=tuple(
                WaveView(
                    position=w.position,
                    size=WaveSize(w.size_unit, w.size_value),
                    device_count=w.device_count,
                    soak_s=w.soak_s,
                    state=w.state,
                    started_at=w.started_at,
                    decided_at=w.decided_at,
                    reason=w.reason,
                    progress=dict(progress.get(w.id, {})),
                )
                for w in rollout.waves
            ),
        )

    def _decision(
        self, s: Session, rollout_id: int, kind: str, wave: int | None, actor: str, reason: str
    ) -> None:
        s.add(
            RolloutDecision(
                rollout_id=rollout_id,
                at=self.now(),
                kind=kind,
                wave_index=wave,
                actor=actor,
                reason=reason,
            )
        )

    # -- federated rounds --------------------------------------------------------------------

    def create_round(self, manifest: RoundManifest, *, actor: str) -> RoundView:
        """Record the start of a federated run.

        Raises:
            ConflictError: a run with this id exists.
            RefusedError: a malformed actor.
        """
        _check_actor(actor)
        with self._write() as s:
            if s.get(Round, manifest.round_id) is not None:
                raise ConflictError(f"round {manifest.round_id!r} already exists")
            s.add(
                Round(
                    id=manifest.round_id,
                    group_name=manifest.group,
                    manifest=manifest.model_dump(mode="json"),
                    state=RoundState.RUNNING,
                    created_at=self.now(),
                )
            )
            self._audit(
                s, actor, "round.create", f"round/{manifest.round_id}", {"group": manifest.group}
            )
            s.flush()
            return self._round_view(s, manifest.round_id)

    def record_round_metric(
        self,
        round_id: str,
        number: int,
        *,
        participants: int,
        loss: float | None = None,
        perplexity: float | None = None,
    ) -> RoundMetricView:
        """Record (or replace) the figures of round ``number`` of a run.

        Raises:
            NotFoundError: no such run.
            RefusedError: a round number below 1, negative participants, or a metric that
                is not finite and >= 0.
        """
        if number < 1:
            raise RefusedError(f"round number must be >= 1, got {number}")
        if participants < 0:
            raise RefusedError(f"participants must be >= 0, got {participants}")
        for name, value in (("loss", loss), ("perplexity", perplexity)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise RefusedError(f"{name} must be a finite number >= 0, got {value!r}")
        now = self.now()
        with self._write() as s:
            if s.get(Round, round_id) is None:
                raise NotFoundError(f"unknown round {round_id!r}")
            values = {
                "round_id": round_id,
                "number": number,
                "loss": loss,
                "perplexity": perplexity,
                "participants": participants,
                "recorded_at": now,
            }
            stmt = self._upsert(s)(RoundMetric).values(values)
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=[RoundMetric.round_id, RoundMetric.number],
                    set_={k: stmt.excluded[k] for k in values if k not in ("round_id", "number")},
                )
            )
            return RoundMetricView(number, loss, perplexity, participants, now)

    def finish_round(
        self, round_id: str, state: RoundState, *, manifest: RoundManifest | None = None
    ) -> RoundView:
        """Mark a run finished or failed, optionally storing its final manifest.

        Raises:
            NotFoundError: no such run.
            ConflictError: the run already ended, or the manifest is for another run.
            RefusedError: ``state`` is ``running``.
        """
        if state is RoundState.RUNNING:
            raise RefusedError("a run can only be finished as finished or failed")
        with self._write() as s:
            run = s.get(Round, round_id)
            if run is None:
                raise NotFoundError(f"unknown round {round_id!r}")
            if run.state is not RoundState.RUNNING:
                raise ConflictError(f"round {round_id!r} already ended ({run.state.value})")
            if manifest is not None:
                if manifest.round_id != round_id:
                    raise ConflictError(
                        f"manifest is for round {manifest.round_id!r}, not {round_id!r}"
                    )
                run.manifest = manifest.model_dump(mode="json")
            run.state, run.finished_at = state, self.now()
            s.flush()
            return self._round_view(s, round_id)

    def get_round(self, round_id: str) -> RoundView:
        """Return a run with its metrics. Raises NotFoundError."""
        with self._read() as s:
            return self._round_view(s, round_id)

    def list_rounds(self, *, group: str | None = None, limit: int = 100) -> list[RoundView]:
        """Return runs, newest first. Raises RefusedError for a bad ``limit``."""
        _check_limit(limit)
        with self._read() as s:
            query = select(Round.id).order_by(Round.created_at.desc(), Round.id).limit(limit)
            if group is not None:
                query = query.where(Round.group_name == group)
            return [self._round_view(s, rid) for rid in s.scalars(query)]

    def _round_view(self, s: Session, round_id: str) -> RoundView:
        run = s.get(Round, round_id)
        if run is None:
            raise NotFoundError(f"unknown round {round_id!r}")
        metrics = s.scalars(
            select(RoundMetric).where(RoundMetric.round_id == round_id).order_by(RoundMetric.number)
        )
        return RoundView(
            id=run.id,
            group=run.group_name,
            state=run.state,
            manifest=run.manifest,
            created_at=run.created_at,
            finished_at=run.finished_at,
            metrics=tuple(
                RoundMetricView(m.number, m.loss, m.perplexity, m.participants, m.recorded_at)
                for m in metrics
            ),
        )

    # -- federation nodes ----------------------------------------------------------------

    def bind_federation_node(
        self, device_id: str, node_id: int, *, key_sha256: str, actor: str
    ) -> FederationNodeView:
        """Record that ``device_id`` trains through SuperNode ``node_id`` (the ID the
        SuperLink returned when the device's public key was registered); a device
        registered again with a new key is bound to its new node.

        Raises:
            NotFoundError: no such device.
            ConflictError: the node ID is bound to another device.
            RefusedError: a node ID that is not an unsigned 64-bit integer, a key digest that
                is not 64 hex digits, or a malformed actor.
        """
        _check_actor(actor)
        if not 0 < node_id < 1 << 64:
            raise RefusedError(f"node_id must be an unsigned 64-bit integer > 0, got {node_id}")
        if len(key_sha256) != 64 or any(c not in "0123456789abcdef" for c in key_sha256):
            raise RefusedError("key_sha256 must be 64 lowercase hex digits")
        with self._write() as s:
            if s.get(Device, device_id) is None:
                raise NotFoundError(f"unknown device {device_id!r}")
            owner = s.scalar(
                select(FederationNode.device_id).where(FederationNode.node_id == str(node_id))
            )
            if owner is not None and owner != device_id:
                raise ConflictError(f"SuperNode {node_id} is bound to device {owner!r}")
            row = s.get(FederationNode, device_id)
            now = self.now()
            if row is None:
                row = FederationNode(device_id=device_id)
                s.add(row)
            row.node_id, row.key_sha256, row.registered_at = str(node_id), key_sha256, now
            self._audit(
                s,
                actor,
                "federation.bind",
                f"device/{device_id}",
                {"node_id": str(node_id), "key_sha256": key_sha256},
            )
            return FederationNodeView(device_id, node_id, key_sha256, now)

    def federation_nodes(self, group: str) -> list[FederationNodeView]:
        """The SuperNodes of ``group``'s devices, by device id (devices without one are
        left out)."""
        with self._read() as s:
            rows = s.scalars(
                select(FederationNode)
                .join(DeviceGroup, DeviceGroup.device_id == FederationNode.device_id)
                .where(DeviceGroup.name == group)
                .order_by(FederationNode.device_id)
            )
            return [
                FederationNodeView(r.device_id, int(r.node_id), r.key_sha256, r.registered_at)
                for r in rows
            ]

    # -- audit ---------------------------------------------------------------------------

    def audit(
        self, actor: str, action: str, *, subject: str | None = None, details: Mapping[str, Any]
    ) -> AuditView:
        """Append an audit entry for an operator action not covered by another method.

        Raises:
            RefusedError: a malformed actor or action, or details over 16 KiB of JSON.
        """
        _check_actor(actor)
        with self._write() as s:
            entry = self._audit(s, actor, action, subject, details)
            s.flush()
            return _audit_view(entry)

    def list_audit(self, *, limit: int = 100, before_id: int | None = None) -> list[AuditView]:
        """Return audit entries, newest first (``before_id`` pages further back)."""
        _check_limit(limit)
        with self._read() as s:
            query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            if before_id is not None:
                query = query.where(AuditEntry.id < before_id)
            return [_audit_view(a) for a in s.scalars(query)]

    def _audit(
        self,
        s: Session,
        actor: str,
        action: str,
        subject: str | None,
        details: Mapping[str, Any],
    ) -> AuditEntry:
        if not 1 <= len(action) <= 64:
            raise RefusedError(f"audit action must be 1..64 characters, got {len(action)}")
        if subject is not None and len(subject) > MAX_ACTOR:
            raise RefusedError(f"audit subject is over {MAX_ACTOR} characters")
        size = len(json.dumps(details, default=str))
        if size > MAX_AUDIT_DETAILS:
            raise RefusedError(
                f"audit details are {size} bytes of JSON, over the limit of {MAX_AUDIT_DETAILS}"
            )
        entry = AuditEntry(
            at=self.now(), actor=actor, action=action, subject=subject, details=dict(details)
        )
        s.add(entry)
        return entry


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count


def _thresholds(rollout: Rollout) -> Thresholds:
    return Thresholds(
        max_failure_rate=rollout.max_failure_rate,
        max_eval_regression=rollout.max_eval_regression,
        wave_timeout_s=rollout.wave_timeout_s,
    )


def _bundle(name: str | None, version: str | None, sha: str | None) -> BundleView | None:
    if name is None or version is None or sha is None:
        return None
    return BundleView(name, version, sha)


def _device_view(d: Device) -> DeviceView:
    return DeviceView(
        id=d.id,
        groups=tuple(g.name for g in d.groups),
        tags=tuple(t.name for t in d.tags),
        registered_at=d.registered_at,
        online=d.online,
        online_changed_at=d.online_changed_at,
        last_seen=d.last_seen,
        agent_version=d.agent_version,
        health=d.health,
        base=_bundle(d.base_name, d.base_version, d.base_sha256),
        adapter=_bundle(d.adapter_name, d.adapter_version, d.adapter_sha256),
        slot=d.slot,
        uptime_s=d.uptime_s,
        load_1m=d.load_1m,
        free_disk_bytes=d.free_disk_bytes,
        status_at=d.status_at,
    )


def _release_view(r: Release) -> ReleaseView:
    return ReleaseView(
        id=r.id,
        name=r.name,
        version=r.version,
        kind=r.kind,
        bundle_sha256=r.bundle_sha256,
        manifest=BundleManifest.model_validate_json(json.dumps(r.manifest)),
        created_at=r.created_at,
        created_by=r.created_by,
    )


def _audit_view(a: AuditEntry) -> AuditView:
    return AuditView(a.id, a.at, a.actor, a.action, a.subject, a.details)
