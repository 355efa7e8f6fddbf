"""Registry views as JSON-ready data: the one mapping the API and the CLI's ``--json`` share."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel

from coordinator.registry.views import DecisionView, ReleaseView, RolloutView, RoundView

__all__ = ["jsonable", "release_json", "rollout_json", "round_json"]


def jsonable(value: Any) -> Any:
    """Return ``value`` (views, enums, datetimes, mappings, sequences) as plain JSON data."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return value


def release_json(release: ReleaseView) -> dict[str, Any]:
    """A release without its full manifest."""
    return {
        "id": release.id,
        "name": release.name,
        "version": release.version,
        "kind": release.kind.value,
        "bundle_sha256": release.bundle_sha256,
        "created_at": release.created_at.isoformat(),
        "created_by": release.created_by,
    }


def rollout_json(
    rollout: RolloutView, decisions: list[DecisionView] | None = None
) -> dict[str, Any]:
    """A rollout, its waves (with ``size`` as text like ``10%``) and its decision log."""
    data: dict[str, Any] = jsonable(rollout)
    data["release"] = release_json(rollout.release)
    for wave, view in zip(data["waves"], rollout.waves, strict=True):
        wave["size"] = str(view.size)
    halted = rollout.halted_wave
    data["halt_reason"] = halted.reason if halted is not None else None
    if decisions is not None:
        data["decisions"] = jsonable(decisions)
    return data


def round_json(run: RoundView) -> dict[str, Any]:
    """A federated run with its per-round metrics."""
    data: dict[str, Any] = jsonable(run)
    return data
