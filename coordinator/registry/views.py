"""What the registry returns and takes: frozen, detached values, never ORM objects.

Callers (the HTTP API, the CLI, the dashboard, the rollout runner) get plain data that
stays valid after the database session is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from coordinator.registry.errors import SelectorError
from coordinator.registry.liveness import Online
from coordinator.rollout.policy import (
    RolloutState,
    Thresholds,
    WaveSize,
    WaveSpec,
    WaveState,
)
from protocol.bundle import BundleKind, BundleManifest
from protocol.messages import Health, Slot, UpdateState
from protocol.topics import TopicError, check_segment

__all__ = [
    "AuditView",
    "BundleView",
    "DecisionView",
    "DeviceFilter",
    "DeviceView",
    "Ingest",
    "ReleaseView",
    "RolloutSpec",
    "RolloutView",
    "RoundMetricView",
    "RoundState",
    "RoundView",
    "Selector",
    "Transition",
    "UpdateView",
    "WaveView",
]

MAX_SELECTOR_NAMES: Final = 1000  # groups or tags in one selector
MAX_SELECTOR_DEVICES: Final = 100_000


class RoundState(StrEnum):
    """Where a federated run stands."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class Ingest(StrEnum):
    """What became of one incoming device message."""

    APPLIED = "applied"
    STALE = "stale"
    """Older than (or the same as) what is stored; dropped, nothing changed."""
    UNKNOWN_DEVICE = "unknown_device"
    """The device is not registered; dropped."""
    UNMATCHED = "unmatched"
    """Progress or an evaluation that belongs to no update of this device; dropped."""


@dataclass(frozen=True)
class BundleView:
    """A bundle a device runs."""

    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class DeviceView:
    """A device and what it last reported."""

    id: str
    groups: tuple[str, ...]
    tags: tuple[str, ...]
    registered_at: datetime
    online: Online
    online_changed_at: datetime | None
    last_seen: datetime | None
    agent_version: str | None
    health: Health | None
    base: BundleView | None
    adapter: BundleView | None
    slot: Slot | None
    uptime_s: int | None
    load_1m: float | None
    free_disk_bytes: int | None
    status_at: datetime | None


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices to list; every given field must match. ``limit`` is 1..1000."""

    group: str | None = None
    tag: str | None = None
    online: Online | None = None
    health: Health | None = None
    base_sha256: str | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class Transition:
    """A device whose online state changed in a liveness sweep."""

    device_id: str
    before: Online
    after: Online


@dataclass(frozen=True)
class ReleaseView:
    """A release: a bundle that can be rolled out."""

    id: int
    name: str
    version: str
    kind: BundleKind
    bundle_sha256: str
    manifest: BundleManifest
    created_at: datetime
    created_by: str


def _check_names(what: str, names: tuple[str, ...], limit: int) -> None:
    if len(names) > limit:
        raise SelectorError(f"selector {what} has {len(names)} entries, over the limit of {limit}")
    for name in names:
        try:
            check_segment(name, f"selector {what} entry")
        except TopicError as e:
            raise SelectorError(str(e)) from e
    if len(set(names)) != len(names):
        raise SelectorError(f"selector {what} lists an entry more than once")


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets: members of any of ``groups``, carriers of any of
    ``tags``, and every device in ``devices`` (the union).

    Raises:
        SelectorError: all three empty, a malformed name, a duplicate, or too many entries.
    """

    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.groups or self.tags or self.devices):
            raise SelectorError("the selector is empty: give groups, tags or devices")
        _check_names("groups", self.groups, MAX_SELECTOR_NAMES)
        _check_names("tags", self.tags, MAX_SELECTOR_NAMES)
        _check_names("devices", self.devices, MAX_SELECTOR_DEVICES)

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {"groups": list(self.groups), "tags": list(self.tags), "devices": list(self.devices)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Selector:
        """Read the stored form back."""
        return cls(
            groups=tuple(data.get("groups", ())),
            tags=tuple(data.get("tags", ())),
            devices=tuple(data.get("devices", ())),
        )


@dataclass(frozen=True)
class RolloutSpec:
    """What an operator asks for: a release, its targets, waves and thresholds."""

    release_id: int
    selector: Selector
    waves: tuple[WaveSpec, ...] = (WaveSpec(WaveSize.parse("100%")),)
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class WaveView:
    """A wave, its decision, and how its devices are doing (update state -> count)."""

    position: int
    size: WaveSize
    device_count: int
    soak_s: int
    state: WaveState
    started_at: datetime | None
    decided_at: datetime | None
    reason: str | None
    progress: Mapping[UpdateState, int]


@dataclass(frozen=True)
class RolloutView:
    """A rollout with its waves."""

    id: int
    release: ReleaseView
    selector: Selector
    state: RolloutState
    thresholds: Thresholds
    target_count: int
    rollback_of: int | None
    created_at: datetime
    created_by: str
    finished_at: datetime | None
    waves: tuple[WaveView, ...]

    @property
    def halted_wave(self) -> WaveView | None:
        """The first wave whose decision was to halt (state ``failed``), if any."""
        return next((w for w in self.waves if w.state is WaveState.FAILED), None)


@dataclass(frozen=True)
class UpdateView:
    """One device's update within a rollout."""

    device_id: str
    rollout_id: int
    wave: int
    release: BundleView
    state: UpdateState
    bytes_done: int
    bytes_total: int
    error_code: str | None
    error_message: str | None
    baseline: float | None
    candidate: float | None
    announced_at: datetime
    reported_at: datetime | None
    changed_at: datetime


@dataclass(frozen=True)
class DecisionView:
    """An entry of a rollout's decision log."""

    at: datetime
    kind: str
    wave: int | None
    actor: str
    reason: str


@dataclass(frozen=True)
class RoundMetricView:
    """The figures of one round of a federated run."""

    number: int
    loss: float | None
    perplexity: float | None
    participants: int
    recorded_at: datetime


@dataclass(frozen=True)
class RoundView:
    """A federated run and its per-round metrics (in round order)."""

    id: str
    group: str
    state: RoundState
    manifest: Mapping[str, Any]
    created_at: datetime
    finished_at: datetime | None
    metrics: tuple[RoundMetricView, ...]


@dataclass(frozen=True)
class FederationNodeView:
    """The SuperNode a device trains through: its node ID and the key it was given for."""

    device_id: str
    node_id: int
    key_sha256: str
    registered_at: datetime


@dataclass(frozen=True)
class AuditView:
    """An audit log entry."""

    id: int
    at: datetime
    actor: str
    action: str
    subject: str | None
    details: Mapping[str, Any]
