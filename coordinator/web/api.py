"""The operator HTTP API (``/api/v1``), on the registry; every route needs the operator token.

Errors are JSON ``{"detail": {"error", "field", "message"}}``: ``field`` names the input
that was wrong (``selector.devices``, ``waves[2]``, ``release``, ``authorization``...).

- 401: missing or wrong token; 404: unknown device, release, rollout or round;
- 409: a command that does not apply (resuming a halted rollout), or a conflict;
- 422: refused input (a bad selector, a wave over 100 %, a threshold out of range), and
  request bodies or query parameters that do not parse (FastAPI's own ``loc`` list).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, Protocol, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from coordinator.errors import RefusedError
from coordinator.registry import (
    ConflictError,
    DeviceFilter,
    NotFoundError,
    Online,
    Registry,
    ReleaseView,
    RolloutSpec,
    Selector,
    SelectorError,
)
from coordinator.rollout.policy import (
    Command,
    PlanError,
    RolloutState,
    Thresholds,
    TransitionError,
    WaveSize,
    WaveSpec,
)
from coordinator.web.auth import TokenCheck
from coordinator.web.encode import jsonable, release_json, rollout_json, round_json
from protocol.bundle import BundleManifest
from protocol.messages import Health

__all__ = ["API_PREFIX", "ActionRequest", "RollbackRequest", "RolloutRequest", "api_router"]

API_PREFIX: Final = "/api/v1"
T = TypeVar("T")
_ACTOR_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_RELEASE_RE: Final = re.compile(r"(?P<name>[^:\s]+):(?P<version>[^:\s]+)")


class RolloutRequest(BaseModel):
    """Start a rollout of ``release`` (an id, or ``NAME:VERSION``) to the selected devices."""

    model_config = ConfigDict(extra="forbid")

    release: str = Field(min_length=1, max_length=200, examples=["nano:1.2.0", "7"])
    groups: list[str] = Field(default_factory=list, max_length=1000)
    tags: list[str] = Field(default_factory=list, max_length=1000)
    devices: list[str] = Field(default_factory=list, max_length=100_000)
    waves: list[str] = Field(
        default_factory=lambda: ["100%"], min_length=1, max_length=32, examples=[["10%", "100%"]]
    )
    """Each wave as a percentage of the targets (``"10%"``) or a device count (``"5"``)."""
    soak_s: int = Field(default=0, ge=0, le=7 * 24 * 3600)
    max_failure_rate: float = 0.1
    max_eval_regression: float | None = None
    wave_timeout_s: int = 3600
    actor: str = Field(default="operator", max_length=64)


class ActionRequest(BaseModel):
    """Pause, resume or abort with an optional reason."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, min_length=1, max_length=1024)
    actor: str = Field(default="operator", max_length=64)


class RollbackRequest(BaseModel):
    """Roll a group back to its previous completed release."""

    model_config = ConfigDict(extra="forbid")

    group: str = Field(min_length=1, max_length=64)
    waves: list[str] = Field(default_factory=lambda: ["100%"], min_length=1, max_length=32)
    soak_s: int = Field(default=0, ge=0, le=7 * 24 * 3600)
    max_failure_rate: float = 0.1
    actor: str = Field(default="operator", max_length=64)


def _error(code: int, field: str, message: str) -> HTTPException:
    return HTTPException(code, detail={"error": _KIND[code], "field": field, "message": message})


_KIND: Final = {
    status.HTTP_404_NOT_FOUND: "not_found",
    status.HTTP_409_CONFLICT: "conflict",
    status.HTTP_422_UNPROCESSABLE_CONTENT: "refused",
}


_PATH_FIELDS: Final = frozenset({"device_id", "rollout_id", "round_id", "action", "group"})


def _field_of(message: str, default: str) -> str:
    if default in _PATH_FIELDS:
        return default
    for key, field in (
        ("selector groups", "selector.groups"),
        ("selector tags", "selector.tags"),
        ("selector devices", "selector.devices"),
        ("unknown release", "release"),
        ("unknown device", "selector.devices"),
        ("group ", "selector.groups"),
        ("tag ", "selector.tags"),
        ("max_failure_rate", "max_failure_rate"),
        ("max_eval_regression", "max_eval_regression"),
        ("wave_timeout_s", "wave_timeout_s"),
        ("soak time", "soak_s"),
        ("actor", "actor"),
        ("reason", "reason"),
    ):
        if message.startswith(key) or f" {key}" in f" {message}":
            return field
    return default


def _call(fn: Callable[[], T], field: str) -> T:
    """Run a registry call, mapping its refusals to HTTP errors naming ``field``."""
    try:
        return fn()
    except NotFoundError as e:
        raise _error(status.HTTP_404_NOT_FOUND, _field_of(str(e), field), str(e)) from e
    except (TransitionError, ConflictError) as e:
        raise _error(status.HTTP_409_CONFLICT, field, str(e)) from e
    except SelectorError as e:
        raise _error(
            status.HTTP_422_UNPROCESSABLE_CONTENT, _field_of(str(e), "selector"), str(e)
        ) from e
    except RefusedError as e:
        raise _error(status.HTTP_422_UNPROCESSABLE_CONTENT, _field_of(str(e), field), str(e)) from e


def _actor(actor: str) -> str:
    if not _ACTOR_RE.fullmatch(actor):
        raise _error(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "actor",
            "actor must be 1..64 letters, digits, '.', '_', '@' or '-'",
        )
    return actor


def parse_waves(waves: list[str], soak_s: int) -> tuple[WaveSpec, ...]:
    """Read wave sizes like ``["10%", "50", "100%"]``.

    Raises:
        HTTPException: 422 naming ``waves[i]`` for a wave that is neither form or out of range.
    """
    specs = []
    for i, text in enumerate(waves):
        try:
            specs.append(WaveSpec(WaveSize.parse(text), soak_s))
        except PlanError as e:
            raise _error(status.HTTP_422_UNPROCESSABLE_CONTENT, f"waves[{i}]", str(e)) from e
    return tuple(specs)


def _thresholds(failure: float, regression: float | None, timeout_s: int) -> Thresholds:
    return _call(lambda: Thresholds(failure, regression, timeout_s), "thresholds")


class PublishedReleases(Protocol):
    """The signed releases devices can install (the served repository)."""

    def manifest(self, name: str, version: str) -> BundleManifest | None:
        """The signed manifest of ``name`` ``version``, or None if it is not published."""

    def check(self, release: ReleaseView) -> None:
        """Raise :class:`ConflictError` when devices could not install ``release``."""


def _release_id(
    registry: Registry, release: str, published: PublishedReleases | None, actor: str
) -> int:
    """The registry id of ``release``; a NAME:VERSION the registry does not know yet but the
    repository publishes is registered from its signed manifest."""
    if release.isdigit():
        return int(release)
    match = _RELEASE_RE.fullmatch(release)
    if match is None:
        raise _error(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "release",
            f"release {release!r} is neither an id nor NAME:VERSION",
        )
    name, version = match["name"], match["version"]
    try:
        return registry.find_release(name, version).id
    except NotFoundError:
        manifest = published.manifest(name, version) if published is not None else None
        if manifest is None:
            raise
    created = _call(lambda: registry.create_release(manifest, actor=actor), "release")
    return created.id


def api_router(
    registry: Registry,
    token: str,
    *,
    published: PublishedReleases | None = None,
) -> APIRouter:
    """The ``/api/v1`` routes over ``registry``, guarded by ``token``.

    With ``published`` (the served repository), a rollout's release must be published
    there, and one the registry does not know yet is registered from its signed manifest.
    """
    # HTTPBearer (not enforcing) only declares the scheme in the OpenAPI document.
    declared = HTTPBearer(auto_error=False, description="The operator token.")
    router = APIRouter(
        prefix=API_PREFIX, dependencies=[Depends(declared), Depends(TokenCheck(token))]
    )

    @router.get("/devices", tags=["devices"])
    def list_devices(
        group: str | None = None,
        tag: str | None = None,
        online: Online | None = None,
        health: Health | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """Devices matching every given filter, by id; ``counts`` by online state."""
        where = DeviceFilter(
            group=group, tag=tag, online=online, health=health, limit=limit, offset=offset
        )
        devices = _call(lambda: registry.list_devices(where), "query")
        counts = registry.count_devices(
            DeviceFilter(group=group, tag=tag, online=online, health=health)
        )
        return {"devices": jsonable(devices), "counts": jsonable(counts)}

    @router.get("/devices/{device_id}", tags=["devices"])
    def get_device(device_id: str) -> dict[str, Any]:
        """One device and its update history (newest first)."""
        device = _call(lambda: registry.get_device(device_id), "device_id")
        updates = registry.device_updates(device_id)
        return {"device": jsonable(device), "updates": jsonable(updates)}

    @router.get("/releases", tags=["releases"])
    def list_releases(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """Releases, newest first."""
        return {"releases": [release_json(r) for r in registry.list_releases(limit)]}

    @router.get("/rollouts", tags=["rollouts"])
    def list_rollouts(
        state: RolloutState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> dict[str, Any]:
        """Rollouts, newest first."""
        rollouts = registry.list_rollouts(state=state, limit=limit)
        return {"rollouts": [rollout_json(r) for r in rollouts]}

    @router.post("/rollouts", tags=["rollouts"], status_code=status.HTTP_201_CREATED)
    def start_rollout(body: RolloutRequest) -> dict[str, Any]:
        """Create a rollout; the runner starts its first wave at its next step."""
        actor = _actor(body.actor)
        try:
            selector = Selector(tuple(body.groups), tuple(body.tags), tuple(body.devices))
        except SelectorError as e:
            raise _error(
                status.HTTP_422_UNPROCESSABLE_CONTENT, _field_of(str(e), "selector"), str(e)
            ) from e
        release_id = _call(lambda: _release_id(registry, body.release, published, actor), "release")
        if published is not None:
            release = _call(lambda: registry.get_release(release_id), "release")
            _call(lambda: published.check(release), "release")
        spec = RolloutSpec(
            release_id=release_id,
            selector=selector,
            waves=parse_waves(body.waves, body.soak_s),
            thresholds=_thresholds(
                body.max_failure_rate, body.max_eval_regression, body.wave_timeout_s
            ),
        )
        rollout = _call(lambda: registry.create_rollout(spec, actor=actor), "waves")
        return rollout_json(rollout, registry.rollout_decisions(rollout.id))

    @router.get("/rollouts/{rollout_id}", tags=["rollouts"])
    def get_rollout(rollout_id: int) -> dict[str, Any]:
        """A rollout, its waves with their progress, and its decision log."""
        rollout = _call(lambda: registry.get_rollout(rollout_id), "rollout_id")
        return rollout_json(rollout, registry.rollout_decisions(rollout_id))

    @router.get("/rollouts/{rollout_id}/updates", tags=["rollouts"])
    def rollout_updates(rollout_id: int) -> dict[str, Any]:
        """Every targeted device's update in this rollout (devices of unstarted waves have none)."""
        updates = _call(lambda: registry.rollout_updates(rollout_id), "rollout_id")
        return {"updates": jsonable(updates)}

    @router.post("/rollouts/{rollout_id}/{action}", tags=["rollouts"])
    def act(
        rollout_id: int,
        action: Literal["pause", "resume", "abort"],
        body: ActionRequest | None = None,
    ) -> dict[str, Any]:
        """Pause, resume or abort a rollout."""
        body = body or ActionRequest()
        actor = _actor(body.actor)
        rollout = _call(
            lambda: registry.command(rollout_id, Command(action), actor=actor, reason=body.reason),
            "action",
        )
        return rollout_json(rollout, registry.rollout_decisions(rollout_id))

    @router.post("/rollbacks", tags=["rollouts"], status_code=status.HTTP_201_CREATED)
    def rollback(body: RollbackRequest) -> dict[str, Any]:
        """Roll a group back to its previous completed release (a new rollout)."""
        actor = _actor(body.actor)
        waves = parse_waves(body.waves, body.soak_s)
        thresholds = _thresholds(body.max_failure_rate, None, 3600)
        rollout = _call(
            lambda: registry.rollback_group(
                body.group, actor=actor, waves=waves, thresholds=thresholds
            ),
            "group",
        )
        return rollout_json(rollout, registry.rollout_decisions(rollout.id))

    @router.get("/rounds", tags=["rounds"])
    def list_rounds(
        group: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> dict[str, Any]:
        """Federated runs, newest first."""
        return {"rounds": [round_json(r) for r in registry.list_rounds(group=group, limit=limit)]}

    @router.get("/rounds/{round_id}", tags=["rounds"])
    def get_round(round_id: str) -> dict[str, Any]:
        """A federated run and its per-round metrics."""
        return round_json(_call(lambda: registry.get_round(round_id), "round_id"))

    return router
