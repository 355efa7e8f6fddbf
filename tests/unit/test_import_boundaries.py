"""The import-boundary check (import-linter, run by scripts/check.sh) fails on a forbidden import.

Each test copies the three packages and pyproject.toml (which holds the contracts) into a
temporary directory, optionally appends one forbidden import to a module, and runs
``lint-imports`` there with only that copy on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "coordinator", "protocol")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contract(kind: str) -> str:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    names = [c["name"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == kind]
    assert len(names) == 1, f"expected one {kind} contract in pyproject.toml, found {names}"
    return str(names[0])


PROTOCOL_IS_PURE = _contract("forbidden")
SIDES_INDEPENDENT = _contract("independence")


def _copy_tree(dest: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_clean_tree_keeps_every_contract(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    result = _lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{PROTOCOL_IS_PURE} KEPT" in result.stdout
    assert f"{SIDES_INDEPENDENT} KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "contract", "edge"),
    [
        ("agent/errors.py", "import coordinator", SIDES_INDEPENDENT, "agent.errors -> coordinator"),
        (
            "coordinator/errors.py",
            "from agent import errors as agent_errors",
            SIDES_INDEPENDENT,
            "coordinator.errors -> agent",
        ),
        ("protocol/exitcodes.py", "import agent", PROTOCOL_IS_PURE, "protocol.exitcodes -> agent"),
        (
            "protocol/exitcodes.py",
            "import coordinator.errors",
            PROTOCOL_IS_PURE,
            "protocol.exitcodes -> coordinator",
        ),
    ],
    ids=[
        "agent-imports-coordinator",
        "coordinator-imports-agent",
        "protocol-imports-agent",
        "protocol-imports-coordinator",
    ],
)
def test_a_forbidden_import_breaks_the_check(
    tmp_path: Path, module: str, statement: str, contract: str, edge: str
) -> None:
    _copy_tree(tmp_path)
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{statement}  # forbidden on purpose\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{contract} BROKEN" in result.stdout, result.stdout
    assert edge in result.stdout, result.stdout
