"""MQTT payload rules beyond single fields: size limit, versions, update progress states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from protocol import MESSAGE_MODELS, SCHEMA_VERSION, decode_payload
from protocol._types import Message
from protocol.messages import MAX_PAYLOAD_BYTES, PayloadTooLargeError, UpdateProgress, UpdateState

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
VERSIONED = [m for m in MESSAGE_MODELS.values() if issubclass(m, Message)]


def golden(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text("utf-8"))
    return data


def test_every_non_openai_message_is_versioned() -> None:
    from protocol import inference

    for name, model in MESSAGE_MODELS.items():
        if model.__module__ != inference.__name__:
            assert issubclass(model, Message), name


@pytest.mark.parametrize("model", VERSIONED, ids=lambda m: m.__name__)
def test_future_schema_version_is_refused_as_newer(model: type[BaseModel]) -> None:
    data = golden(model.__name__)
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValidationError, match="newer than supported"):
        model.model_validate_json(json.dumps(data))


@pytest.mark.parametrize("model", VERSIONED, ids=lambda m: m.__name__)
def test_missing_schema_version_means_the_current_one(model: type[BaseModel]) -> None:
    data = golden(model.__name__)
    del data["schema_version"]
    assert model.model_validate(data).model_dump()["schema_version"] == SCHEMA_VERSION


def test_decode_payload_parses_bytes() -> None:
    payload = (GOLDEN / "UpdateProgress.json").read_bytes()
    assert decode_payload(UpdateProgress, payload).state is UpdateState.FETCHING


def test_decode_payload_refuses_oversize_before_parsing() -> None:
    payload = b" " * (MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(PayloadTooLargeError, match=f"over the limit of {MAX_PAYLOAD_BYTES}"):
        decode_payload(UpdateProgress, payload)


def test_decode_payload_refuses_invalid_json() -> None:
    with pytest.raises(ValidationError, match=r"json_invalid|Invalid JSON"):
        decode_payload(UpdateProgress, b"{not json")


def test_messages_are_immutable() -> None:
    progress = UpdateProgress.model_validate(golden("UpdateProgress"))
    with pytest.raises(ValidationError, match="frozen"):
        progress.bytes_done = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"state": "failed", "error_code": "hash_mismatch", "error_message": "model.onnx differs"},
        {"state": "rolled_back", "error_code": "health_check_failed"},
        {"state": "rolled_back"},
        {"state": "announced", "target": None, "timestamp_version": None},
        {"bytes_done": 117_533_878},
    ],
)
def test_valid_progress_variants(changes: dict[str, Any]) -> None:
    UpdateProgress.model_validate({**golden("UpdateProgress"), **changes})


def test_error_only_when_update_ended() -> None:
    data = {**golden("UpdateProgress"), "error_code": "hash_mismatch"}
    with pytest.raises(ValidationError, match="error_code is only allowed"):
        UpdateProgress.model_validate(data)


def test_announcement_url_without_host_is_refused() -> None:
    data = {**golden("ReleaseAnnouncement"), "repository_url": "https:///repo"}
    with pytest.raises(ValidationError, match="repository_url"):
        MESSAGE_MODELS["ReleaseAnnouncement"].model_validate(data)
