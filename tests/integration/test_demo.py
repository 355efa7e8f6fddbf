"""The README's main job, ``nanofleet demo``, run to its end in its short mode (``--exit``).

The end-to-end test is marked ``slow``: it uses the real Nano model (built once into the
cache) and starts real processes: mosquitto under mTLS, ``nanofleet serve``, three enrolled
agents, a Flower SuperLink and each device's ``nanofleet-agent supernode``. It checks what
the demo printed against what it claims: the answer streamed, every device online in the
registry, each device eligible and its SuperNode started, the federated round(s) with
every device's update aggregated, the round's adapter release committed on every device with only
the adapter's bytes downloaded, its rollout's two waves (one device, then the rest) passed on
the devices' own evaluations, each device's
held-out perplexity before and after and its round traffic, the dashboard answering, and
every PID it listed gone afterwards.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from coordinator.demo import run_demo
from protocol.exitcodes import ExitCode

DEVICES = ("device-1", "device-2", "device-3")


@pytest.mark.slow
def test_demo_runs_to_its_summary_and_stops_what_it_started(real_model_dir: Path) -> None:
    # real_model_dir: the model is built (or found) before the demo's clock starts.
    exe = Path(sys.executable).with_name("nanofleet")
    result = subprocess.run(
        [str(exe), "demo", "--exit", "--agents", str(len(DEVICES)), "--max-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr

    answer = out.split("assistant:", 1)[1].split("\n   (", 1)[0]
    assert len(answer.split()) >= 5, answer
    assert f"registry: {len(DEVICES)}/{len(DEVICES)} devices online" in out
    # One rollout of the adapter in two waves: the canary device, then the rest; each wave
    # passed on the devices' own held-out evaluations.
    assert re.findall(r"rollout \d+ to the (\w+) group", out) == ["fleet"], out
    flat = " ".join(out.split())  # rich wraps long lines, even at 200 columns
    assert re.search(r"waves 1 devices?, 100%, halting if held-out perplexity worsens", flat), out
    assert len(re.findall(r"wave \d: passed \(", flat)) == 2, out
    assert len(re.findall(r"median evaluation change [+-][\d.]+% over \d devices", flat)) == 2, out
    assert len(re.findall(r"rollout \d+: completed", out)) == 1, out

    sizes = re.search(r"bundle sizes: adapter ([\d,]+) B, base model ([\d,]+) B", out)
    assert sizes is not None, out
    adapter_size, base_size = (int(n.replace(",", "")) for n in sizes.groups())
    assert adapter_size < base_size / 50
    adapter_sha = re.search(r"nano-federated 1 \(([0-9a-f]{12})\)", out)
    assert adapter_sha is not None, out
    assert f"{adapter_sha[1][:8]} = nano-federated 1" in out, out
    for device in DEVICES:
        row = re.search(
            rf"│ {device} +│ online/healthy +│ [0-9a-f]{{8}} +│ {adapter_sha[1][:8]} +│ "
            r"committed +│ ([\d,]+) B +│",
            out,
        )
        assert row is not None, out
        assert int(row[1].replace(",", "")) == adapter_size, row[0]  # the adapter's files, once

    # The federated round: every device eligible, its SuperNode started, both rounds with
    # every device's update; per device, perplexity before and after and its traffic.
    for device in DEVICES:
        assert re.search(rf"{device}: nanofleet-agent supernode pid \d+: eligible \(", out), out
    rounds = re.search(r"run demo-round-1: (\d+) round", out)
    assert rounds is not None, out
    total = int(rounds[1])
    for number in range(1, total + 1):
        assert f"round {number}/{total}: {len(DEVICES)} device updates aggregated" in out, out
    for device in DEVICES:
        row = re.search(
            rf"│ {device} +│ ([\d.]+) -> ([\d.]+) +│ [+-][\d.]+ % +│ ([\d,]+) B +│ "
            r"([\d,]+) B +│ ([\d,]+) B +│",
            out,
        )
        assert row is not None, out
        base_ppl, tuned_ppl = float(row[1]), float(row[2])
        assert 1 < base_ppl < 1000
        assert abs(tuned_ppl / base_ppl - 1) < 0.5
        sent, received, release = (int(n.replace(",", "")) for n in row.groups()[2:])
        # At least its update of each round, through TLS: SecAgg+ sends 2 bytes per value
        # (the bundle holds 4), plus a fixed part.
        assert sent > total * adapter_size // 2
        assert received > adapter_size  # the adapter it was sent
        assert release == adapter_size

    assert "the one it reported in the round's evaluate step" in flat, out
    assert "registry: run demo-round-1 finished" in flat, out
    assert (
        "/ui/ answered 200, /ui/rollouts answered 200, /ui/rounds/demo-round-1 answered 200" in flat
    ), out

    pids = {name: int(pid) for name, pid in re.findall(r"│ ([\w-]+) +│ (\d+) +│\n", out)}
    assert set(pids) == {
        *DEVICES,
        *(f"{d}-supernode" for d in DEVICES),
        *(f"{d}-flower-supernode" for d in DEVICES),
        "flower-superlink",
        "coordinator",
        "mosquitto",
    }, out
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "every process the demo started has stopped" in out


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: (p / "old").mkdir(), "must be an empty directory"),
        (lambda p: None, "too long for the agents' Unix sockets"),
    ],
    ids=["not-empty", "socket-path-too-long"],
)
def test_a_work_dir_the_demo_cannot_use_is_refused_before_anything_starts(
    tmp_path: Path, make: Callable[[Path], object], expected: str
) -> None:
    work = tmp_path / "work"
    if expected.startswith("too long"):
        work = tmp_path / ("w" * 100)
    work.mkdir()
    make(work)
    out = io.StringIO()
    code = run_demo(
        agents=3,
        prompt="hi",
        max_tokens=1,
        keep_running=False,
        work_dir=work,
        console=Console(file=out, width=400),
    )
    assert code == ExitCode.BAD_INPUT
    assert expected in out.getvalue()
    assert list(work.iterdir()) == ([work / "old"] if expected.startswith("must") else [])
