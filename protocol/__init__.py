"""The wire format shared by the agent and the coordinator. Pure: no I/O.

Every shape that crosses a process or machine boundary is defined here and nowhere else:
the bundle manifest (:mod:`protocol.bundle`), MQTT topics (:mod:`protocol.topics`) and
payloads (:mod:`protocol.messages`), federated runs (:mod:`protocol.rounds`) and the local
inference API (:mod:`protocol.inference`). :data:`MESSAGE_MODELS` lists every top-level
model by name; the schema command and the golden tests iterate over it.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel

from protocol._types import SCHEMA_VERSION
from protocol.bundle import BundleKind, BundleManifest, bundle_hash, canonical_json
from protocol.inference import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ModelList,
    validation_error_body,
)
from protocol.messages import (
    DeviceStatus,
    EvaluationReport,
    Health,
    Heartbeat,
    ReleaseAnnouncement,
    UpdateProgress,
    UpdateState,
    decode_payload,
)
from protocol.rounds import RoundInvitation, RoundManifest

#: Every top-level message model, by class name.
MESSAGE_MODELS: Final[dict[str, type[BaseModel]]] = {
    model.__name__: model
    for model in (
        BundleManifest,
        ReleaseAnnouncement,
        DeviceStatus,
        Heartbeat,
        UpdateProgress,
        EvaluationReport,
        RoundManifest,
        RoundInvitation,
        ChatCompletionRequest,
        ChatCompletionResponse,
        ChatCompletionChunk,
        CompletionRequest,
        CompletionResponse,
        CompletionChunk,
        ModelList,
        ErrorBody,
    )
}

__all__ = [
    "MESSAGE_MODELS",
    "SCHEMA_VERSION",
    "BundleKind",
    "BundleManifest",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "DeviceStatus",
    "ErrorBody",
    "EvaluationReport",
    "Health",
    "Heartbeat",
    "ModelList",
    "ReleaseAnnouncement",
    "RoundInvitation",
    "RoundManifest",
    "UpdateProgress",
    "UpdateState",
    "bundle_hash",
    "canonical_json",
    "decode_payload",
    "validation_error_body",
]
