"""The registry's tables as SQLAlchemy 2 typed models.

The migrations in ``migrations/versions`` create exactly these tables (a test compares
them with Alembic's autogenerate). Change a model only together with a new migration.

Storage invariants:

- Every timestamp is an aware UTC instant (:class:`~coordinator.registry._columns.UTCDateTime`).
- Devices are never deleted; their id is the certificate identity (the MQTT username).
- Heartbeats are bounded: one ``heartbeats`` row per device holds the latest beat, and
  ``heartbeat_hours`` holds one counter row per device and hour, pruned after a retention
  period (``Registry.prune_heartbeat_history``). A 10,000-device fleet beating every 30 s
  writes 120 beats per device-hour into a single counter row, not 120 rows.
- A rollout's targets are resolved and frozen when it is created (``rollout_targets``, in
  seeded-shuffle order); waves and update records refer to them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from coordinator.registry._columns import EnumText, UTCDateTime
from coordinator.registry.liveness import Online
from coordinator.registry.views import RoundState
from coordinator.rollout.policy import RolloutState, SizeUnit, WaveState
from protocol.bundle import BundleKind
from protocol.messages import Health, Slot, UpdateState

ID_LENGTH = 64  # device ids, group and tag names: the protocol's topic-segment bound
ACTOR_LENGTH = 128
ERROR_MESSAGE_LENGTH = 1024


#: Constraint and index names; the migrations spell out the same names.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of the registry models."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Device(Base):
    """A device of the fleet and what it last said about itself."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    registered_at: Mapped[datetime]
    agent_version: Mapped[str | None] = mapped_column(String(64))
    health: Mapped[Health | None] = mapped_column(EnumText(Health))
    base_name: Mapped[str | None] = mapped_column(String(64))
    base_version: Mapped[str | None] = mapped_column(String(64))
    base_sha256: Mapped[str | None] = mapped_column(String(64))
    adapter_name: Mapped[str | None] = mapped_column(String(64))
    adapter_version: Mapped[str | None] = mapped_column(String(64))
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    slot: Mapped[Slot | None] = mapped_column(EnumText(Slot, 1))
    uptime_s: Mapped[int | None] = mapped_column(BigInteger)
    load_1m: Mapped[float | None] = mapped_column(Float)
    free_disk_bytes: Mapped[int | None] = mapped_column(BigInteger)
    status_at: Mapped[datetime | None]
    """``reported_at`` of the status applied last (device clock; orders statuses)."""
    last_seen: Mapped[datetime | None]
    """When the coordinator received the latest heartbeat (coordinator clock)."""
    will_at: Mapped[datetime | None]
    """When the coordinator last received the device's Last Will (an offline status)."""
    online: Mapped[Online] = mapped_column(EnumText(Online, 8), index=True)
    online_changed_at: Mapped[datetime | None]

    groups: Mapped[list[DeviceGroup]] = relationship(
        cascade="all, delete-orphan", order_by="DeviceGroup.name", lazy="selectin"
    )
    tags: Mapped[list[DeviceTag]] = relationship(
        cascade="all, delete-orphan", order_by="DeviceTag.name", lazy="selectin"
    )


class DeviceGroup(Base):
    """Membership of a device in a group (a device may be in several)."""

    __tablename__ = "device_groups"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, index=True)


class DeviceTag(Base):
    """A free label on a device."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, index=True)


class Heartbeat(Base):
    """The latest heartbeat of a device (one row per device)."""

    __tablename__ = "heartbeats"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    sent_at: Mapped[datetime]
    """The device's ``sent_at``: orders heartbeats; an older one never replaces a newer one."""
    received_at: Mapped[datetime]
    health: Mapped[Health] = mapped_column(EnumText(Health))
    base_sha256: Mapped[str | None] = mapped_column(String(64))
    uptime_s: Mapped[int] = mapped_column(BigInteger)
    load_1m: Mapped[float] = mapped_column(Float)
    free_disk_bytes: Mapped[int] = mapped_column(BigInteger)


class HeartbeatHour(Base):
    """How many heartbeats a device sent in one hour (the bounded history)."""

    __tablename__ = "heartbeat_hours"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    hour: Mapped[datetime] = mapped_column(primary_key=True, index=True)
    count: Mapped[int] = mapped_column(Integer)


class Release(Base):
    """A signed bundle that can be rolled out."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[BundleKind] = mapped_column(EnumText(BundleKind, 8))
    bundle_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    manifest: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(ACTOR_LENGTH))


class Rollout(Base):
    """A release on its way to a set of devices, wave by wave."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    selector: Mapped[dict[str, Any]]
    """``{"groups": [...], "tags": [...], "devices": [...]}`` as the operator gave it."""
    state: Mapped[RolloutState] = mapped_column(EnumText(RolloutState))
    max_failure_rate: Mapped[float] = mapped_column(Float)
    max_eval_regression: Mapped[float | None] = mapped_column(Float)
    wave_timeout_s: Mapped[int] = mapped_column(Integer)
    rollback_of: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id"))
    """The rollout this one reverts, when it was created by a rollback."""
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(ACTOR_LENGTH))
    finished_at: Mapped[datetime | None]

    release: Mapped[Release] = relationship(lazy="joined", innerjoin=True)
    waves: Mapped[list[Wave]] = relationship(order_by="Wave.position", lazy="selectin")


class RolloutTarget(Base):
    """A device targeted by a rollout, at its place in the seeded-shuffle order."""

    __tablename__ = "rollout_targets"
    __table_args__ = (UniqueConstraint("rollout_id", "position"),)

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)


class Wave(Base):
    """One wave of a rollout and its decision."""

    __tablename__ = "waves"
    __table_args__ = (UniqueConstraint("rollout_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    """0-based position in the rollout."""
    size_unit: Mapped[SizeUnit] = mapped_column(EnumText(SizeUnit, 8))
    size_value: Mapped[int] = mapped_column(Integer)
    device_count: Mapped[int] = mapped_column(Integer)
    soak_s: Mapped[int] = mapped_column(Integer)
    state: Mapped[WaveState] = mapped_column(EnumText(WaveState))
    started_at: Mapped[datetime | None]
    decided_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)


class UpdateRecord(Base):
    """One device's update within one rollout: created when its wave starts."""

    __tablename__ = "update_records"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id"),
        Index("ix_update_records_device_id_id", "device_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    wave_id: Mapped[int] = mapped_column(ForeignKey("waves.id", ondelete="CASCADE"), index=True)
    state: Mapped[UpdateState] = mapped_column(EnumText(UpdateState))
    bytes_done: Mapped[int] = mapped_column(BigInteger)
    bytes_total: Mapped[int] = mapped_column(BigInteger)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(ERROR_MESSAGE_LENGTH))
    baseline: Mapped[float | None] = mapped_column(Float)
    candidate: Mapped[float | None] = mapped_column(Float)
    announced_at: Mapped[datetime]
    reported_at: Mapped[datetime | None]
    """The ``at`` of the progress applied last (device clock; orders progress messages)."""
    changed_at: Mapped[datetime]
    """When the coordinator received the current state (coordinator clock)."""


class RolloutDecision(Base):
    """The decision log of a rollout: every automatic decision and operator command."""

    __tablename__ = "rollout_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))
    wave_index: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(ACTOR_LENGTH))
    reason: Mapped[str] = mapped_column(Text)


class Round(Base):
    """A federated training run (revision 0002)."""

    __tablename__ = "rounds"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    manifest: Mapped[dict[str, Any]]
    state: Mapped[RoundState] = mapped_column(EnumText(RoundState))
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class RoundMetric(Base):
    """The figures of one round of a run (revision 0002)."""

    __tablename__ = "round_metrics"

    round_id: Mapped[str] = mapped_column(
        ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True
    )
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float | None] = mapped_column(Float)
    perplexity: Mapped[float | None] = mapped_column(Float)
    participants: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime]


class FederationNode(Base):
    """The Flower SuperNode a device trains through (revision 0003): the node ID the
    SuperLink gave the device's public key at registration. A federated run of a group
    samples only its members' node IDs."""

    __tablename__ = "federation_nodes"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    # Decimal text: Flower's node IDs are unsigned 64-bit, beyond a signed BIGINT.
    node_id: Mapped[str] = mapped_column(String(20), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[datetime]


class AuditEntry(Base):
    """An operator action: who did what, when (revision 0002)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(ACTOR_LENGTH))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(ACTOR_LENGTH))
    details: Mapped[dict[str, Any]]
