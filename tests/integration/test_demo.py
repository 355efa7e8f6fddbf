"""The README's main job, ``nanofleet demo``, run to its end in its short mode (``--exit``).

Marked ``slow``: it uses the real Nano model (built once into the cache) and starts real
agents. The test checks the demo streamed an answer, listed every agent, and stopped every
process it started (their PIDs are gone afterwards).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.demo import agent_config

pytestmark = pytest.mark.slow


def test_demo_runs_to_its_summary_and_stops_what_it_started(
    real_model_dir: Path, tmp_path: Path
) -> None:
    exe = Path(sys.executable).with_name("nanofleet")
    result = subprocess.run(
        [str(exe), "demo", "--exit", "--agents", "2", "--max-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "device-1: ready" in out
    assert "device-2: ready" in out
    answer = out.split("assistant:", 1)[1].split("\n   (", 1)[0]
    assert len(answer.split()) >= 5, answer
    pids = [int(p) for p in re.findall(r"│ device-\d .*?│ (\d+) +│", out)]
    assert len(pids) == 2, out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "every process the demo started has stopped" in out


def test_agent_config_is_valid_toml_naming_the_model_and_socket(tmp_path: Path) -> None:
    import tomllib

    text = agent_config(tmp_path / "model dir", tmp_path / 'sock"et', 2)
    data = tomllib.loads(text)
    assert data == {
        "model": {"dir": str(tmp_path / "model dir"), "threads": 2},
        "server": {"socket_path": str(tmp_path / 'sock"et')},
    }
