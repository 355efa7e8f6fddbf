"""`nanofleet schema --out DIR`: one valid JSON Schema per message, and every golden example
is valid against its schema (so the schemas describe what the models really accept)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema_rs
import pytest

from protocol import MESSAGE_MODELS

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
ROOT = GOLDEN.parent.parent


def nanofleet(*args: str) -> subprocess.CompletedProcess[str]:
    # A subprocess, as an operator runs it (and importing typer in-process trips a click
    # deprecation warning that pytest turns into an error).
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schemas") / "nested"
    result = nanofleet("schema", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in MESSAGE_MODELS:
        assert f"wrote {out / f'{name}.schema.json'}" in result.stdout
    return out


def test_one_schema_file_per_message(schema_dir: Path) -> None:
    assert sorted(p.name for p in schema_dir.iterdir()) == sorted(
        f"{name}.schema.json" for name in MESSAGE_MODELS
    )


@pytest.mark.parametrize("name", sorted(MESSAGE_MODELS))
def test_schema_is_valid_draft_2020_12(schema_dir: Path, name: str) -> None:
    schema = json.loads((schema_dir / f"{name}.schema.json").read_text("utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema_rs.meta.validate(schema)
    assert schema["title"] == name


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.name)
def test_golden_example_is_valid_against_its_schema(schema_dir: Path, golden: Path) -> None:
    name = golden.name.split(".")[0]
    schema = json.loads((schema_dir / f"{name}.schema.json").read_text("utf-8"))
    validator = jsonschema_rs.Draft202012Validator(schema)
    validator.validate(json.loads(golden.read_text("utf-8")))


def test_schema_refuses_what_the_model_refuses(schema_dir: Path) -> None:
    schema = json.loads((schema_dir / "BundleManifest.schema.json").read_text("utf-8"))
    data = json.loads((GOLDEN / "BundleManifest.json").read_text("utf-8"))
    validator = jsonschema_rs.Draft202012Validator(schema)
    for bad in ({**data, "extra": 1}, {**data, "kind": "delta"}, {**data, "files": []}):
        assert not validator.is_valid(bad)


def test_out_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = nanofleet("schema", "--out", str(target))
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
