"""Golden examples: every message model has one, and each parses and re-serializes to the
identical canonical JSON (so no field is lost, renamed, defaulted away or reformatted)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from protocol import MESSAGE_MODELS, BundleManifest, bundle_hash, canonical_json
from protocol.rounds import RoundManifest

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
FILES = sorted(GOLDEN.glob("*.json"))


def model_of(path: Path) -> type[BaseModel]:
    # BundleManifest.json and BundleManifest.adapter.json are both BundleManifest examples.
    return MESSAGE_MODELS[path.name.split(".")[0]]


def canonical_text(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def bundle_hash_of(model: BaseModel) -> str:
    return hashlib.sha256(canonical_json(model)).hexdigest()


def test_every_model_has_a_golden_file() -> None:
    assert {p.name.split(".")[0] for p in FILES} == set(MESSAGE_MODELS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_golden_round_trip_is_identical(path: Path) -> None:
    text = path.read_text("utf-8")
    parsed = model_of(path).model_validate_json(text)
    assert canonical_json(parsed) == canonical_text(json.loads(text))
    again = model_of(path).model_validate_json(canonical_json(parsed))
    assert again == parsed


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_golden_parses_from_python_objects_too(path: Path) -> None:
    # The inference server validates json.loads() output, not raw text: enums and
    # timestamps arrive as strings and must still validate under strict mode.
    data = json.loads(path.read_text("utf-8"))
    assert model_of(path).model_validate(data).model_dump(mode="json") == data


def test_canonical_json_is_sorted_compact_utf8() -> None:
    data = json.loads((GOLDEN / "BundleManifest.json").read_text("utf-8"))
    data["model"]["chat_template"] = "Grüße {{ messages }}"
    raw = canonical_json(BundleManifest.model_validate(data))
    assert raw.startswith(b'{"adapter":null,"files":[{"path":"model.onnx","sha256":"')
    assert b'"chat_template":"Gr\xc3\xbc\xc3\x9fe {{ messages }}"' in raw
    assert b": " not in raw
    assert b", " not in raw


def test_bundle_hash_is_pinned() -> None:
    # The hash is a contract between the builder, the repository and every device: a change
    # to canonical_json or to the manifest's fields must be deliberate.
    base = BundleManifest.model_validate_json((GOLDEN / "BundleManifest.json").read_bytes())
    assert bundle_hash(base) == "8e720870a397ad363a6d108b4fe3a00d2feb14373cafa70c798f27c8fe08236d"


def test_bundle_hash_ignores_formatting_of_the_file() -> None:
    text = (GOLDEN / "BundleManifest.json").read_text("utf-8")
    compact = json.dumps(json.loads(text), separators=(",", ":"))
    a = BundleManifest.model_validate_json(text)
    b = BundleManifest.model_validate_json(compact)
    assert bundle_hash(a) == bundle_hash(b)


def test_golden_adapter_binds_to_golden_base_and_round() -> None:
    base = BundleManifest.model_validate_json((GOLDEN / "BundleManifest.json").read_bytes())
    adapter = BundleManifest.model_validate_json(
        (GOLDEN / "BundleManifest.adapter.json").read_bytes()
    )
    run = RoundManifest.model_validate_json((GOLDEN / "RoundManifest.json").read_bytes())
    assert adapter.adapter is not None
    assert base.model is not None
    assert adapter.adapter.base_bundle_sha256 == bundle_hash(base)
    assert adapter.adapter.tokenizer_sha256 == base.model.tokenizer_sha256
    assert adapter.adapter.provenance is not None
    assert adapter.adapter.provenance.round_manifest_sha256 == bundle_hash_of(run)
    assert run.base_bundle_sha256 == bundle_hash(base)
