"""One flwr importer per side: the ClientApp on the device, the ServerApp on the coordinator."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _flwr_importers(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_bytes())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "flwr" or n.startswith("flwr.") for n in names):
                found.add(str(path.relative_to(ROOT)))
    return found


def test_only_the_client_app_imports_flwr_on_the_device() -> None:
    assert _flwr_importers("agent") == {"agent/federated/client_app.py"}


def test_only_the_server_app_imports_flwr_on_the_coordinator() -> None:
    assert _flwr_importers("coordinator") == {"coordinator/federation/server_app.py"}
