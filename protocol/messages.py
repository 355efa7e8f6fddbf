"""MQTT payloads between devices and the coordinator (topics: :mod:`protocol.topics`).

Invariants:

- payloads are UTF-8 JSON of at most :data:`MAX_PAYLOAD_BYTES`; :func:`decode_payload`
  checks the size before parsing;
- no payload names the device that sent it: the topic does, and the broker's ACLs tie that
  topic to the device's certificate identity;
- MQTT carries hints, never trust. A :class:`ReleaseAnnouncement` only tells a device to
  refresh its signed (TUF) metadata; what it installs is decided by that metadata alone.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Final, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, Strict, StringConstraints, model_validator

from protocol._types import (
    Identifier,
    Message,
    Sha256Hex,
    Slug,
    StrictModel,
    Timestamp,
    TopicSegment,
)

#: Largest MQTT payload either side accepts (bytes).
MAX_PAYLOAD_BYTES: Final = 64 * 1024
#: Largest byte count an update may report: 64 files of 8 GiB.
MAX_UPDATE_BYTES: Final = 64 * 8 * 1024**3
_MAX_SAFE_INT: Final = 2**53 - 1  # the largest integer every JSON reader keeps exact

M = TypeVar("M", bound=StrictModel)


class PayloadTooLargeError(ValueError):
    """A payload is over :data:`MAX_PAYLOAD_BYTES`; it was not parsed."""


def decode_payload(model: type[M], payload: bytes) -> M:
    """Parse an MQTT payload as ``model``.

    Raises:
        PayloadTooLargeError: the payload is over :data:`MAX_PAYLOAD_BYTES`.
        pydantic.ValidationError: the payload is not valid JSON for ``model``; the error
            names the field.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(
            f"{model.__name__} payload is {len(payload)} bytes, over the limit of "
            f"{MAX_PAYLOAD_BYTES}"
        )
    return model.model_validate_json(payload)


def _check_repository_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL scheme must be http or https, got {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("URL must not have a query or a fragment")
    return value


RepositoryUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(_check_repository_url),
    Field(description="Base http(s) URL of a TUF repository, without credentials or query."),
]


class ReleaseAnnouncement(Message):
    """A hint that a group's release channel (or one device's) has moved on. No trust.

    On a group's topic ``group`` names that group; on a device's own topic
    (:func:`protocol.topics.device_releases`, what a staged rollout sends to one wave's
    devices) it names the device id.

    A device that reads it refreshes its TUF metadata from its configured repository (the
    URL here is advisory and must match a repository the device already trusts) and
    installs only what the signed metadata names. A forged, replayed or stale announcement
    costs one metadata refresh, nothing more.
    """

    group: TopicSegment
    channel: TopicSegment
    repository_url: RepositoryUrl
    timestamp_version: int = Field(ge=1, le=_MAX_SAFE_INT)
    """The newest TUF timestamp version the coordinator knows."""
    published_at: Timestamp


class Health(StrEnum):
    """How a device judges itself."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    OFFLINE = "offline"
    """Published by the broker as the device's Last Will."""


class Slot(StrEnum):
    """The two model slots of a device (A/B updates)."""

    A = "a"
    B = "b"


class BundleRef(StrictModel):
    """Which bundle: name, version and :func:`protocol.bundle.bundle_hash`."""

    name: Slug
    version: Identifier
    sha256: Sha256Hex


class DeviceStatus(Message):
    """A device's full state: retained, sent on connect and on every change.

    The device registers an ``offline`` copy as its Last Will, so the retained status turns
    to offline when the device drops without saying goodbye.
    """

    agent_version: Identifier
    health: Annotated[Health, Strict(False)]
    base: BundleRef | None
    """The active base model; ``None`` while none is installed."""
    adapter: BundleRef | None = None
    """The active adapter on top of ``base``, if any."""
    slot: Annotated[Slot, Strict(False)] | None
    """The slot ``base`` runs from; set exactly when ``base`` is."""
    uptime_s: int = Field(ge=0, le=_MAX_SAFE_INT)
    load_1m: float = Field(ge=0, le=10000)
    """One-minute load average."""
    free_disk_bytes: int = Field(ge=0, le=_MAX_SAFE_INT)
    reported_at: Timestamp

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.base is None) != (self.slot is None):
            raise ValueError("slot is set exactly when base is set")
        if self.adapter is not None and self.base is None:
            raise ValueError("adapter needs a base")
        return self


class Heartbeat(Message):
    """A periodic liveness beat, not retained; small on purpose."""

    health: Annotated[Health, Strict(False)]
    base_sha256: Sha256Hex | None
    """Hash of the active base bundle, so the coordinator notices drift between statuses."""
    uptime_s: int = Field(ge=0, le=_MAX_SAFE_INT)
    load_1m: float = Field(ge=0, le=10000)
    free_disk_bytes: int = Field(ge=0, le=_MAX_SAFE_INT)
    sent_at: Timestamp


class UpdateState(StrEnum):
    """The phases of an update, in order; ``rolled_back`` and ``failed`` end it early."""

    ANNOUNCED = "announced"
    FETCHING = "fetching"
    VERIFIED = "verified"
    STAGED = "staged"
    ACTIVATING = "activating"
    HEALTH_CHECK = "health_check"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


_ENDINGS: Final = frozenset({UpdateState.ROLLED_BACK, UpdateState.FAILED})
_NEED_TARGET: Final = frozenset(
    {UpdateState.STAGED, UpdateState.ACTIVATING, UpdateState.HEALTH_CHECK, UpdateState.COMMITTED}
)


class UpdateProgress(Message):
    """One step of an update on a device.

    Rules: ``bytes_done <= bytes_total``; ``failed`` carries an ``error_code``; only
    ``failed`` and ``rolled_back`` may carry an error; from ``staged`` on, ``target`` is known.
    """

    state: Annotated[UpdateState, Strict(False)]
    target: BundleRef | None
    """The bundle being installed, once the signed metadata has named it."""
    timestamp_version: int | None = Field(ge=1, le=_MAX_SAFE_INT)
    """The TUF timestamp version this update acts on, once known."""
    bytes_done: int = Field(ge=0, le=MAX_UPDATE_BYTES)
    bytes_total: int = Field(ge=0, le=MAX_UPDATE_BYTES)
    error_code: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")] | None = None
    """A stable machine-readable reason, e.g. ``hash_mismatch``."""
    error_message: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None
    at: Timestamp

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.bytes_done > self.bytes_total:
            raise ValueError(
                f"bytes_done ({self.bytes_done}) exceeds bytes_total ({self.bytes_total})"
            )
        if self.state is UpdateState.FAILED and self.error_code is None:
            raise ValueError("state failed needs an error_code")
        if self.error_message is not None and self.error_code is None:
            raise ValueError("error_message needs an error_code")
        if self.error_code is not None and self.state not in _ENDINGS:
            raise ValueError(
                f"error_code is only allowed when state is failed or rolled_back, "
                f"not {self.state.value}"
            )
        if self.state in _NEED_TARGET and self.target is None:
            raise ValueError(f"state {self.state.value} needs a target")
        return self


#: Largest metric value an evaluation report may carry (a perplexity past this is broken).
MAX_METRIC: Final = 1e9


class EvaluationReport(Message):
    """A device's held-out metric for a bundle it installed; lower is better.

    The device measures its local held-out data (text that never leaves it) with its
    previous model (``baseline``) and with ``bundle`` (``candidate``), e.g. perplexity
    with and without a new adapter. Only the two numbers and the token count are sent.
    The coordinator's rollout policy halts an adapter rollout whose wave regresses.
    """

    bundle: BundleRef
    """The bundle the candidate ran (an adapter, or a base)."""
    metric: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = (
        "heldout_perplexity"
    )
    baseline: float = Field(gt=0, le=MAX_METRIC, allow_inf_nan=False)
    candidate: float = Field(gt=0, le=MAX_METRIC, allow_inf_nan=False)
    tokens: int = Field(ge=1, le=_MAX_SAFE_INT)
    """How many held-out tokens were scored."""
    at: Timestamp


#: What a device publishes under its own topics (see :class:`protocol.topics.DeviceChannel`).
DeviceMessage = DeviceStatus | Heartbeat | UpdateProgress | EvaluationReport
