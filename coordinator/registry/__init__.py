"""The fleet registry: devices, releases, rollouts, rounds and the audit log, in SQLAlchemy.

Open one with :func:`open_registry` (a SQLite file by default, PostgreSQL by URL): it
builds the engine and brings the schema to the newest migration. See ``docs/registry.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from coordinator.registry.api import MAX_BATCH, Incoming, Registry, utc_now
from coordinator.registry.engine import default_url, make_engine
from coordinator.registry.errors import ConflictError, NotFoundError, SelectorError
from coordinator.registry.liveness import LinkState, LivenessRule, Online
from coordinator.registry.migrate import current_revision, head_revision, upgrade
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

__all__ = [
    "MAX_BATCH",
    "AuditView",
    "BundleView",
    "ConflictError",
    "DecisionView",
    "DeviceFilter",
    "DeviceView",
    "FederationNodeView",
    "Incoming",
    "Ingest",
    "LinkState",
    "LivenessRule",
    "NotFoundError",
    "Online",
    "Registry",
    "ReleaseView",
    "RolloutSpec",
    "RolloutView",
    "RoundMetricView",
    "RoundState",
    "RoundView",
    "Selector",
    "SelectorError",
    "Transition",
    "UpdateView",
    "WaveView",
    "current_revision",
    "default_url",
    "head_revision",
    "make_engine",
    "open_registry",
    "upgrade",
]


def open_registry(url: str, *, clock: Callable[[], datetime] = utc_now) -> Registry:
    """Open the registry at ``url`` and upgrade its schema to the newest revision.

    Raises:
        coordinator.errors.ConfigError: a malformed or unsupported URL.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    engine = make_engine(url)
    upgrade(engine)
    return Registry(engine, clock=clock)
