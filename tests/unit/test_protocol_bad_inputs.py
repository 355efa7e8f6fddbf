"""Bad inputs, one per row: each golden example with one thing broken must be refused with a
``ValidationError`` whose error names the field at fault (in its location or its message)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from protocol import MESSAGE_MODELS

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
DELETE = object()
H = "ab" * 32  # a well-formed sha256


def golden(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text("utf-8"))
    return data


def mutate(data: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """Return a copy of ``data`` with the dotted ``path`` set to ``value`` (or deleted)."""
    out = copy.deepcopy(data)
    node: Any = out
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


def many(data: dict[str, Any], *changes: tuple[str, object]) -> dict[str, Any]:
    for path, value in changes:
        data = mutate(data, path, value)
    return data


BASE = golden("BundleManifest")
ADAPTER = golden("BundleManifest.adapter")
FILE0 = BASE["files"][0]
CHAT = golden("ChatCompletionRequest")
COMPLETION = golden("CompletionRequest")

# (id, model, input, field that the error must name)
CASES: list[tuple[str, str, dict[str, Any], str]] = [
    # bundle manifest: hashes, sizes, paths
    ("sha256-too-short", "BundleManifest", mutate(BASE, "files.0.sha256", "a" * 63), "sha256"),
    ("sha256-too-long", "BundleManifest", mutate(BASE, "files.0.sha256", "a" * 65), "sha256"),
    ("sha256-uppercase", "BundleManifest", mutate(BASE, "files.0.sha256", "A" * 64), "sha256"),
    ("sha256-not-hex", "BundleManifest", mutate(BASE, "files.0.sha256", "g" * 64), "sha256"),
    ("sha256-number", "BundleManifest", mutate(BASE, "files.0.sha256", 12), "sha256"),
    ("size-negative", "BundleManifest", mutate(BASE, "files.0.size", -1), "size"),
    ("size-over-8gib", "BundleManifest", mutate(BASE, "files.0.size", 8 * 1024**3 + 1), "size"),
    ("size-as-string", "BundleManifest", mutate(BASE, "files.0.size", "100"), "size"),
    ("size-float", "BundleManifest", mutate(BASE, "files.0.size", 1.5), "size"),
    ("path-dotdot", "BundleManifest", mutate(BASE, "files.0.path", "../etc/passwd"), "path"),
    ("path-inner-dotdot", "BundleManifest", mutate(BASE, "files.0.path", "a/../../b"), "path"),
    ("path-absolute", "BundleManifest", mutate(BASE, "files.0.path", "/etc/passwd"), "path"),
    ("path-backslash", "BundleManifest", mutate(BASE, "files.0.path", "a\\model.onnx"), "path"),
    ("path-empty-part", "BundleManifest", mutate(BASE, "files.0.path", "a//b"), "path"),
    ("path-dot-part", "BundleManifest", mutate(BASE, "files.0.path", "./model.onnx"), "path"),
    ("path-empty", "BundleManifest", mutate(BASE, "files.0.path", ""), "path"),
    ("path-nul", "BundleManifest", mutate(BASE, "files.0.path", "model\x00.onnx"), "path"),
    ("path-oversize", "BundleManifest", mutate(BASE, "files.0.path", "a" * 256), "path"),
    (
        "path-lists-manifest",
        "BundleManifest",
        mutate(BASE, "files.0.path", "manifest.json"),
        "files",
    ),
    ("path-duplicate", "BundleManifest", mutate(BASE, "files.1", FILE0), "files"),
    ("files-empty", "BundleManifest", mutate(BASE, "files", []), "files"),
    ("files-too-many", "BundleManifest", mutate(BASE, "files", [FILE0] * 65), "files"),
    # bundle manifest: names, kinds, versions, consistency
    ("kind-unknown", "BundleManifest", mutate(BASE, "kind", "delta"), "kind"),
    ("extra-field", "BundleManifest", mutate(BASE, "signature", "x"), "signature"),
    ("nested-extra-field", "BundleManifest", mutate(BASE, "files.0.mode", 420), "mode"),
    (
        "schema-version-future",
        "BundleManifest",
        mutate(BASE, "schema_version", 2),
        "schema_version",
    ),
    (
        "schema-version-string",
        "BundleManifest",
        mutate(BASE, "schema_version", "1"),
        "schema_version",
    ),
    ("schema-version-zero", "BundleManifest", mutate(BASE, "schema_version", 0), "schema_version"),
    ("name-uppercase", "BundleManifest", mutate(BASE, "name", "SmolLM2"), "name"),
    ("name-oversize", "BundleManifest", mutate(BASE, "name", "a" * 65), "name"),
    ("name-missing", "BundleManifest", mutate(BASE, "name", DELETE), "name"),
    ("version-with-space", "BundleManifest", mutate(BASE, "version", "1.0 beta"), "version"),
    ("adapter-without-adapter-info", "BundleManifest", mutate(ADAPTER, "adapter", None), "adapter"),
    ("base-without-model", "BundleManifest", mutate(BASE, "model", None), "model"),
    ("base-with-adapter", "BundleManifest", mutate(BASE, "adapter", ADAPTER["adapter"]), "adapter"),
    ("adapter-with-model", "BundleManifest", mutate(ADAPTER, "model", BASE["model"]), "model"),
    (
        "tokenizer-hash-mismatch",
        "BundleManifest",
        mutate(BASE, "model.tokenizer_sha256", H),
        "tokenizer_sha256",
    ),
    (
        "base-without-tokenizer",
        "BundleManifest",
        mutate(BASE, "files", BASE["files"][:2]),
        "tokenizer.json",
    ),
    (
        "architecture-unknown",
        "BundleManifest",
        mutate(BASE, "model.architecture", "gpt2"),
        "architecture",
    ),
    (
        "context-length-zero",
        "BundleManifest",
        mutate(BASE, "model.context_length", 0),
        "context_length",
    ),
    (
        "context-length-huge",
        "BundleManifest",
        mutate(BASE, "model.context_length", 131073),
        "context_length",
    ),
    (
        "chat-template-oversize",
        "BundleManifest",
        mutate(BASE, "model.chat_template", "x" * 16385),
        "chat_template",
    ),
    ("eos-empty", "BundleManifest", mutate(BASE, "model.eos_token_ids", []), "eos_token_ids"),
    (
        "eos-outside-vocab",
        "BundleManifest",
        mutate(BASE, "model.eos_token_ids", [49152]),
        "eos_token_ids",
    ),
    ("bos-negative", "BundleManifest", mutate(BASE, "model.bos_token_id", -1), "bos_token_id"),
    ("adapter-rank-too-big", "BundleManifest", mutate(ADAPTER, "adapter.rank", 65), "rank"),
    (
        "adapter-target-unknown",
        "BundleManifest",
        mutate(ADAPTER, "adapter.target", "embed"),
        "target",
    ),
    (
        "adapter-base-hash-short",
        "BundleManifest",
        mutate(ADAPTER, "adapter.base_bundle_sha256", "ab"),
        "base_bundle_sha256",
    ),
    (
        "provenance-epsilon-without-delta",
        "BundleManifest",
        mutate(ADAPTER, "adapter.provenance.delta", None),
        "delta",
    ),
    # release announcements
    (
        "url-ftp",
        "ReleaseAnnouncement",
        mutate(golden("ReleaseAnnouncement"), "repository_url", "ftp://example.com/repo"),
        "repository_url",
    ),
    (
        "url-credentials",
        "ReleaseAnnouncement",
        mutate(golden("ReleaseAnnouncement"), "repository_url", "https://u:p@example.com/repo"),
        "repository_url",
    ),
    (
        "url-oversize",
        "ReleaseAnnouncement",
        mutate(golden("ReleaseAnnouncement"), "repository_url", "https://e.com/" + "a" * 2048),
        "repository_url",
    ),
    (
        "group-with-slash",
        "ReleaseAnnouncement",
        mutate(golden("ReleaseAnnouncement"), "group", "a/b"),
        "group",
    ),
    (
        "channel-wildcard",
        "ReleaseAnnouncement",
        mutate(golden("ReleaseAnnouncement"), "channel", "+"),
        "channel",
    ),
    (
        "timestamp-version-zero",
        "ReleaseAnnouncement",
        mutate(golden("ReleaseAnnouncement"), "timestamp_version", 0),
        "timestamp_version",
    ),
    (
        "published-at-naive",
        "ReleaseAnnouncement",
        mutate(golden("ReleaseAnnouncement"), "published_at", "2026-12-03T20:15:00"),
        "published_at",
    ),
    (
        "published-at-number",
        "ReleaseAnnouncement",
        mutate(golden("ReleaseAnnouncement"), "published_at", 1796328900),
        "published_at",
    ),
    # device status, heartbeat, update progress
    (
        "health-unknown",
        "DeviceStatus",
        mutate(golden("DeviceStatus"), "health", "sleepy"),
        "health",
    ),
    ("slot-unknown", "DeviceStatus", mutate(golden("DeviceStatus"), "slot", "c"), "slot"),
    (
        "slot-without-base",
        "DeviceStatus",
        many(golden("DeviceStatus"), ("adapter", None), ("base", None)),
        "slot",
    ),
    (
        "load-nan",
        "DeviceStatus",
        mutate(golden("DeviceStatus"), "load_1m", float("nan")),
        "load_1m",
    ),
    ("uptime-bool", "DeviceStatus", mutate(golden("DeviceStatus"), "uptime_s", True), "uptime_s"),
    (
        "free-disk-negative",
        "DeviceStatus",
        mutate(golden("DeviceStatus"), "free_disk_bytes", -5),
        "free_disk_bytes",
    ),
    (
        "heartbeat-hash-wrong-length",
        "Heartbeat",
        mutate(golden("Heartbeat"), "base_sha256", "ab" * 31),
        "base_sha256",
    ),
    (
        "heartbeat-device-id-in-payload",
        "Heartbeat",
        mutate(golden("Heartbeat"), "device_id", "dev-1"),
        "device_id",
    ),
    (
        "evaluation-baseline-zero",
        "EvaluationReport",
        mutate(golden("EvaluationReport"), "baseline", 0.0),
        "baseline",
    ),
    (
        "evaluation-candidate-over-limit",
        "EvaluationReport",
        mutate(golden("EvaluationReport"), "candidate", 2e9),
        "candidate",
    ),
    (
        "evaluation-no-tokens",
        "EvaluationReport",
        mutate(golden("EvaluationReport"), "tokens", 0),
        "tokens",
    ),
    (
        "evaluation-metric-uppercase",
        "EvaluationReport",
        mutate(golden("EvaluationReport"), "metric", "Perplexity"),
        "metric",
    ),
    (
        "progress-done-over-total",
        "UpdateProgress",
        mutate(golden("UpdateProgress"), "bytes_done", 117_533_879),
        "bytes_done",
    ),
    (
        "progress-state-unknown",
        "UpdateProgress",
        mutate(golden("UpdateProgress"), "state", "downloading"),
        "state",
    ),
    (
        "progress-failed-without-code",
        "UpdateProgress",
        mutate(golden("UpdateProgress"), "state", "failed"),
        "error_code",
    ),
    (
        "progress-error-message-oversize",
        "UpdateProgress",
        many(
            golden("UpdateProgress"),
            ("state", "failed"),
            ("error_code", "hash_mismatch"),
            ("error_message", "x" * 1025),
        ),
        "error_message",
    ),
    (
        "progress-future-version",
        "UpdateProgress",
        mutate(golden("UpdateProgress"), "schema_version", 99),
        "schema_version",
    ),
    (
        "progress-committed-without-target",
        "UpdateProgress",
        many(golden("UpdateProgress"), ("state", "committed"), ("target", None)),
        "target",
    ),
    # federated runs
    (
        "round-min-nodes-over-cohort",
        "RoundManifest",
        mutate(golden("RoundManifest"), "min_nodes", 21),
        "min_nodes",
    ),
    (
        "round-threshold-over-shares",
        "RoundManifest",
        mutate(golden("RoundManifest"), "aggregation.reconstruction_threshold", 8),
        "reconstruction_threshold",
    ),
    (
        "round-aggregation-unknown",
        "RoundManifest",
        mutate(golden("RoundManifest"), "aggregation.kind", "median"),
        "aggregation",
    ),
    (
        "round-delta-one",
        "RoundManifest",
        mutate(golden("RoundManifest"), "privacy.delta", 1.0),
        "delta",
    ),
    (
        "round-finished-before-start",
        "RoundManifest",
        mutate(golden("RoundManifest"), "finished_at", "2026-12-10T01:00:00Z"),
        "finished_at",
    ),
    (
        "invitation-closes-before-opens",
        "RoundInvitation",
        mutate(golden("RoundInvitation"), "closes_at", "2026-12-10T01:00:00Z"),
        "closes_at",
    ),
    (
        "invitation-superlink-url",
        "RoundInvitation",
        mutate(golden("RoundInvitation"), "superlink", "http://x:9092"),
        "superlink",
    ),
    # inference requests
    ("chat-n-2", "ChatCompletionRequest", mutate(CHAT, "n", 2), "n"),
    ("chat-tools", "ChatCompletionRequest", mutate(CHAT, "tools", [{"type": "function"}]), "tools"),
    (
        "chat-presence-penalty",
        "ChatCompletionRequest",
        mutate(CHAT, "presence_penalty", 0.5),
        "presence_penalty",
    ),
    (
        "chat-response-format",
        "ChatCompletionRequest",
        mutate(CHAT, "response_format", {"type": "json_object"}),
        "response_format",
    ),
    ("chat-logprobs", "ChatCompletionRequest", mutate(CHAT, "logprobs", True), "logprobs"),
    (
        "chat-temperature-high",
        "ChatCompletionRequest",
        mutate(CHAT, "temperature", 2.5),
        "temperature",
    ),
    ("chat-top-p-zero", "ChatCompletionRequest", mutate(CHAT, "top_p", 0), "top_p"),
    ("chat-max-tokens-zero", "ChatCompletionRequest", mutate(CHAT, "max_tokens", 0), "max_tokens"),
    (
        "chat-max-tokens-string",
        "ChatCompletionRequest",
        mutate(CHAT, "max_tokens", "64"),
        "max_tokens",
    ),
    (
        "chat-tokens-disagree",
        "ChatCompletionRequest",
        mutate(CHAT, "max_completion_tokens", 65),
        "max_completion_tokens",
    ),
    ("chat-messages-empty", "ChatCompletionRequest", mutate(CHAT, "messages", []), "messages"),
    (
        "chat-messages-too-many",
        "ChatCompletionRequest",
        mutate(CHAT, "messages", CHAT["messages"][:1] * 257),
        "messages",
    ),
    ("chat-role-tool", "ChatCompletionRequest", mutate(CHAT, "messages.1.role", "tool"), "role"),
    (
        "chat-content-oversize",
        "ChatCompletionRequest",
        mutate(CHAT, "messages.1.content", "x" * 32769),
        "content",
    ),
    (
        "chat-prompt-oversize",
        "ChatCompletionRequest",
        mutate(CHAT, "messages", [{"role": "user", "content": "x" * 32768}] * 5),
        "messages",
    ),
    (
        "chat-stop-five",
        "ChatCompletionRequest",
        mutate(CHAT, "stop", ["a", "b", "c", "d", "e"]),
        "stop",
    ),
    ("chat-stop-oversize", "ChatCompletionRequest", mutate(CHAT, "stop", "x" * 257), "stop"),
    ("chat-stream-string", "ChatCompletionRequest", mutate(CHAT, "stream", "yes"), "stream"),
    (
        "chat-stream-options-without-stream",
        "ChatCompletionRequest",
        mutate(CHAT, "stream", False),
        "stream_options",
    ),
    ("chat-unknown-field", "ChatCompletionRequest", mutate(CHAT, "foo", 1), "foo"),
    (
        "completion-prompt-list",
        "CompletionRequest",
        mutate(COMPLETION, "prompt", ["a", "b"]),
        "prompt",
    ),
    ("completion-echo", "CompletionRequest", mutate(COMPLETION, "echo", True), "echo"),
    ("completion-best-of", "CompletionRequest", mutate(COMPLETION, "best_of", 3), "best_of"),
    # inference responses and errors
    (
        "usage-total-wrong",
        "ChatCompletionResponse",
        mutate(golden("ChatCompletionResponse"), "usage.total_tokens", 49),
        "total_tokens",
    ),
    (
        "finish-reason-unknown",
        "ChatCompletionResponse",
        mutate(golden("ChatCompletionResponse"), "choices.0.finish_reason", "tool_calls"),
        "finish_reason",
    ),
    (
        "error-body-without-message",
        "ErrorBody",
        mutate(golden("ErrorBody"), "error.message", DELETE),
        "message",
    ),
]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("model", "data", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_naming_the_field(
    model: str, data: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        MESSAGE_MODELS[model].model_validate(data)
    errors = caught.value.errors()
    named = [e for e in errors if field in (str(p) for p in e["loc"]) or field in e["msg"]]
    assert named, f"no error names {field!r}: {caught.value}"
    assert field in str(caught.value)


def _json_text(data: dict[str, Any]) -> str | None:
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:
        return None


# The same rows as JSON text, as MQTT payloads and files arrive (NaN has no JSON form).
JSON_CASES = [(c[0], c[1], text, c[3]) for c in CASES if (text := _json_text(c[2])) is not None]


@pytest.mark.parametrize(
    ("model", "text", "field"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES]
)
def test_bad_json_is_refused_naming_the_field(model: str, text: str, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        MESSAGE_MODELS[model].model_validate_json(text)
    errors = caught.value.errors()
    assert any(field in (str(p) for p in e["loc"]) or field in e["msg"] for e in errors), str(
        caught.value
    )
