"""A device that dies mid-round does not stop the round: real SuperLink, real SuperNodes.

Four devices of group ``alpha`` (disjoint slices of the domain data, tiny model) run 2
rounds with SecAgg+ (4 shares, reconstruction threshold 3: the round manifest's choice,
any ``min_nodes`` survivors can unmask) and client-level DP noise;
the run wants a cohort of 4 and needs ``min_nodes`` 3. As soon as one device's ClientApp
has started its train message (it writes its feature cache ``<store>.cache/train-*.npz``
during that message), the device's SuperNode and everything below it are killed with
SIGKILL: a power cut, no goodbye to the SuperLink. The SuperLink itself notices, when the
node's heartbeats stop (Flower 1.42: a SuperNode declares a 30 s interval and sends a
heartbeat every 17.5-22.5 s; the SuperLink holds a node online for 2 x 30 s after its
last one, so the node is declared unavailable 37.5-60 s after the kill; neither the
interval nor the patience is a flag or setting), and answers the ServerApp's pending
message with a "Node Unavailable" error. The round then goes on with the three
survivors: SecAgg+ recovers the dead node's masks from the survivors' shares and
``_ClientLevelDP`` applies the round, since 3 >= ``min_nodes``; round 2 runs on the three
live devices.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.federated.cache import FeatureCache
from coordinator.demo.domain_data import device_slices
from coordinator.federation.rounds import RunResult, RunSpec, run_personalization
from coordinator.federation.superlink import FlowerCli
from coordinator.processes import descendants, is_running
from protocol.bundle import MANIFEST_NAME, BundleManifest
from tests.support.federation import Device, Fleet
from tests.support.ota_models import build_ota_model

pytestmark = pytest.mark.slow

SPEC = RunSpec(
    round_id="alpha-dropout",
    group="alpha",
    rounds=2,
    cohort_size=4,
    min_nodes=3,
    secaggplus=True,
    clip_norm=5.0,
    noise_multiplier=0.05,
    rank=4,
    seed=5,
    device={
        "epochs": 3,
        "learning-rate": 0.03,
        "batch-rows": 64,
        "l2": 0.0,
        "max-steps": 400,
        "max-compute-s": 30.0,
        "window": 64,
        "max-rows": 3000,
    },
    # The dead node costs up to 60 s of heartbeat patience, the rest of the run ~70 s on
    # 2 cores; the margin is for a busy machine.
    timeout_s=240.0,
)
#: How long the test waits for the doomed device to start training.
TRAIN_START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class DropoutRun:
    result: RunResult
    fleet: Fleet
    killed: Device
    killed_pids: list[int]
    killed_at: datetime
    #: What the SuperLink said of each node when the run had ended (``flwr supernode list``).
    nodes: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ota_model(tmp_path_factory.mktemp("dropout-model"), seed=11)


def _train_started(device: Device) -> bool:
    return any(FeatureCache.beside(device.data_path).root.glob("train-*.npz"))


def _kill(device: Device) -> list[int]:
    """SIGKILL the device's SuperNode and every process below it (its ClientApp)."""
    pid = device.node.pid
    assert pid is not None
    pids = [pid, *descendants(pid)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    device.node.stop()  # reaps the SuperNode, closes its log
    return pids


def _supernodes(cli: FlowerCli) -> dict[str, dict[str, Any]]:
    """``flwr supernode list`` (JSON) by node ID."""
    args = ["supernode", "list", FlowerCli.CONNECTION, "--format", "json"]
    listing = json.loads(cli._run(args, 30.0))
    return {str(node["node-id"]): node for node in listing["nodes"]}


def _node_id(device: Device) -> str:
    found = re.search(r"SuperNode ID: (\d+)", device.node.log_text())
    assert found is not None, f"{device.name}'s SuperNode never got an ID"
    return found.group(1)


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[DropoutRun]:
    work = tmp_path_factory.mktemp("federation-dropout")
    base = BundleManifest.model_validate_json((model_dir / MANIFEST_NAME).read_bytes())
    with pytest.MonkeyPatch.context() as mp, Fleet(work, model_dir) as fleet:
        mp.setenv("FLWR_HOME", str(work / "flwr-home"))
        for piece in device_slices("alpha", devices=4, max_chars=6000):
            fleet.add_device(f"kiosk-{piece.index}", piece.train_texts() + piece.heldout_texts())
        doomed = fleet.devices[-1]
        driver = fleet.cli
        with ThreadPoolExecutor(max_workers=1) as pool:
            started = time.monotonic()
            spec = replace(SPEC, nodes=fleet.node_ids())
            future = pool.submit(run_personalization, spec, base, driver, work / "run")
            deadline = started + TRAIN_START_TIMEOUT_S
            while not _train_started(doomed):
                assert not future.done(), f"the run ended before {doomed.name} trained"
                assert time.monotonic() < deadline, f"{doomed.name} never started training"
                time.sleep(0.02)
            killed_pids = _kill(doomed)
            killed_at = datetime.now(UTC)
            # Bounded: the CLI gives up at SPEC.timeout_s, and so does this wait.
            result = future.result(timeout=SPEC.timeout_s + 30)
        (work / "run.log").write_text(result.log, encoding="utf-8")
        nodes = _supernodes(fleet.cli)
        yield DropoutRun(result, fleet, doomed, killed_pids, killed_at, nodes)


def test_a_device_killed_mid_round_does_not_stop_the_round(dropout_run: DropoutRun) -> None:
    rounds = dropout_run.result.rounds
    assert [r["round"] for r in rounds] == [1, 2], dropout_run.result.log[-3000:]
    first, second = rounds
    # Round 1: the 3 survivors' updates, the dead device a failure (Flower's SecAgg+
    # workflow lists a node that died in the masked-vector stage twice), the round applied.
    assert first["fit_results"] == 3
    assert first["fit_failures"] >= 1
    assert first["aggregated"] is True
    # The noise stays calibrated to the cohort of 4 (fixed denominator), not to 3.
    assert first["noise_stddev"] == pytest.approx(0.05 * 5.0 / 4)
    # Round 2 ran on the three live devices: the SuperLink had unlisted the dead one, so it
    # was not even sampled (the client manager asks the SuperLink's node list at sampling).
    log = dropout_run.result.log
    assert "strategy sampled 4 clients (out of 4)" in log
    assert "strategy sampled 3 clients (out of 3)" in log
    assert second["fit_results"] == 3
    assert second["fit_failures"] == 0
    assert second["aggregated"] is True
    # The final evaluation covers the three live devices.
    assert second["eval_nodes"] == 3
    assert len(second["device_perplexity"]) == 3
    assert all(math.isfinite(p) for p in second["device_perplexity"])
    assert second["perplexity_ratio"] is not None
    assert math.isfinite(second["perplexity_ratio"])
    # The aggregate exists, has the adapter's shapes, and is finite.
    result = dropout_run.result
    assert result.lora_a.shape[1] == result.lora_b.shape[0] == SPEC.rank
    assert np.isfinite(result.lora_a).all()
    assert np.isfinite(result.lora_b).all()
    assert np.abs(result.lora_b).max() > 0  # B starts at zero: the rounds moved it
    assert result.manifest.finished_at is not None
    # What the manifest records is what ran: any 3 survivors of 4 shares could unmask.
    aggregation = result.manifest.aggregation
    assert aggregation.kind == "secaggplus"
    assert (aggregation.num_shares, aggregation.reconstruction_threshold) == (4, 3)


def test_the_device_died_mid_round_and_stayed_dead(dropout_run: DropoutRun) -> None:
    killed = dropout_run.killed
    log = killed.node.log_text()
    # It had the round's train message (its ClientApp wrote the feature cache) and never
    # answered it (3 fit results) ...
    assert "Start `flwr-clientapp` process" in log
    assert _train_started(killed)
    assert not killed.node.running()
    assert not any(is_running(pid) for pid in dropout_run.killed_pids)
    # ... and the others trained and evaluated through both rounds.
    for device in dropout_run.fleet.devices[:-1]:
        assert device.node.running()
        assert _train_started(device)


def test_the_superlink_found_the_dead_node_by_its_missing_heartbeats(
    dropout_run: DropoutRun,
) -> None:
    nodes = dropout_run.nodes
    dead = nodes[_node_id(dropout_run.killed)]
    assert dead["status"] == "offline"
    # Killed with SIGKILL, the SuperNode said no goodbye (a stopped one deactivates itself
    # at once): the SuperLink unlisted it 2 x 30 s after its last heartbeat, which came
    # 17.5-22.5 s apart, so 37.5-60 s after the kill (offline-at has whole seconds).
    offline_at = datetime.strptime(dead["offline-at"], "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=UTC)
    detected_s = (offline_at - dropout_run.killed_at).total_seconds()
    assert 30.0 <= detected_s <= 61.0, f"declared offline {detected_s:.1f} s after the kill"
    for device in dropout_run.fleet.devices[:-1]:
        assert nodes[_node_id(device)]["status"] == "online"
