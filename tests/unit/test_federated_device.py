"""The device side of a round without Flower processes: LM head, local training, the
ClientApp's handlers' inputs, the SuperNode's command line, and DP clipping on updates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ConfigError, ModelError, TrainingInputError
from agent.federated.client_app import DEVICE_DEFAULTS, feature_config_from, train_config_from
from agent.federated.datastore import LocalTextStore, Source
from agent.federated.lm_head import read_lm_head
from agent.federated.local import (
    AnchorConfig,
    FeatureConfig,
    LocalModel,
    evaluate_round,
    serving_checkpoint,
    train_round,
)
from agent.federated.supernode import SuperNode, SuperNodeConfig, ensure_node_key
from agent.federated.trainer import Adapter, Directive, TrainConfig, init_adapter
from coordinator.demo.domain_data import device_slices
from coordinator.models.reference import ReferenceModel


def test_the_lm_head_read_from_the_graph_is_the_dequantized_embedding(
    tiny_model_dir: Path, tiny_reference: ReferenceModel
) -> None:
    w = read_lm_head(tiny_model_dir)
    np.testing.assert_array_equal(w, tiny_reference.w["token_embd.weight"])


def test_a_graph_without_an_lm_head_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x3a\x00")  # an empty graph
    with pytest.raises(ModelError, match="no lm_head"):
        read_lm_head(tmp_path)


@pytest.fixture(scope="module")
def device_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("device") / "texts.sqlite3"
    piece = device_slices("beta", devices=3, max_chars=5000)[0]
    store = LocalTextStore.open(path)
    store.add_texts(piece.train_texts() + piece.heldout_texts(), Source.IMPORT)
    store.close()
    return path


def test_a_local_round_lowers_heldout_perplexity(tiny_model_dir: Path, device_store: Path) -> None:
    model = LocalModel(tiny_model_dir)
    start = init_adapter(model.engine.hidden_size, model.engine.vocab_size, 4, seed=1)
    features = FeatureConfig(window=64, max_rows=2000)
    config = TrainConfig(epochs=3, batch_rows=64, learning_rate=0.03)
    report = train_round(model, device_store, start, config, features)
    assert report.metrics["steps"] > 0
    assert report.num_examples > 0
    assert not np.array_equal(report.adapter.b, start.b)
    _, n, metrics = evaluate_round(model, device_store, report.adapter, features)
    assert n > 0
    assert metrics["perplexity"] < 0.9 * metrics["base_perplexity"]


def test_a_local_round_with_the_anchor_term_samples_the_anchor_from_the_model(
    tiny_model_dir: Path, device_store: Path
) -> None:
    model = LocalModel(tiny_model_dir)
    anchor = AnchorConfig(samples=3, tokens=12, seed=5)
    states = model.anchor(anchor)
    assert states.shape[1] == model.engine.hidden_size
    assert 3 <= states.shape[0] <= 3 * 13
    np.testing.assert_array_equal(states, model.anchor(anchor))  # seeded: every device agrees
    start = init_adapter(model.engine.hidden_size, model.engine.vocab_size, 4, seed=1)
    features = FeatureConfig(window=64, max_rows=2000)
    config = TrainConfig(epochs=3, batch_rows=64, learning_rate=0.03, anchor_weight=1.0)
    report = train_round(model, device_store, start, config, features, anchor=anchor)
    _, _, metrics = evaluate_round(model, device_store, report.adapter, features)
    assert metrics["perplexity"] < 0.9 * metrics["base_perplexity"]


def test_an_adapter_that_does_not_fit_the_model_is_refused(
    tiny_model_dir: Path, device_store: Path
) -> None:
    model = LocalModel(tiny_model_dir)
    bad = Adapter(a=np.zeros((3, 2), np.float32), b=np.zeros((2, 5), np.float32))
    with pytest.raises(TrainingInputError, match="does not fit this model"):
        train_round(model, device_store, bad, TrainConfig(), FeatureConfig())


def test_round_settings_from_the_server_are_validated() -> None:
    config = train_config_from({"epochs": 2, "learning-rate": 0.5, "clipping_norm": 1.0})
    assert config.epochs == 2
    assert config.learning_rate == 0.5
    assert config.anchor_weight == DEVICE_DEFAULTS["anchor_weight"]  # on unless the server says
    assert train_config_from({"anchor-weight": 0.0, "check-rows": 8}).anchor_weight == 0.0
    with pytest.raises(ValueError, match="epochs"):
        train_config_from({"epochs": 0})
    assert feature_config_from({"window": 32}) == FeatureConfig(window=32)


def test_training_pauses_while_the_agent_serves(tmp_path: Path) -> None:
    marker = tmp_path / "serving"
    marker.touch()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            marker.unlink()

    checkpoint = serving_checkpoint(marker, sleep=sleep)
    assert checkpoint() is Directive.CONTINUE
    assert len(waits) == 3
    now = iter([0.0, 0.0, 1000.0])
    marker.touch()
    give_up = serving_checkpoint(marker, sleep=lambda _: None, clock=lambda: next(now))
    assert give_up() is Directive.ABORT


_IDLE_CHILD = """
import os, threading
from agent.federated.local import yield_cpu
started = threading.Event()
done = threading.Event()
worker = threading.Thread(target=lambda: (started.set(), done.wait()))
worker.start()
started.wait()
applied = yield_cpu()
late = threading.Thread(target=lambda: print(os.sched_getscheduler(0)))
print(applied, os.sched_getscheduler(0), os.sched_getscheduler(worker.native_id))
late.start(); late.join(); done.set(); worker.join()
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
def test_training_processes_drop_every_thread_to_the_idle_class() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _IDLE_CHILD], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    idle = str(os.SCHED_IDLE)
    assert out == ["idle", idle, idle, idle]  # this thread, one already running, a later one


def test_the_supernode_command_line_is_tls_authenticated_and_points_at_local_data(
    tmp_path: Path,
) -> None:
    key = ensure_node_key(tmp_path / "keys")
    assert (key.private_key.stat().st_mode & 0o777) == 0o600
    assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert ensure_node_key(tmp_path / "keys") == key  # created once
    config = SuperNodeConfig(
        superlink="link.example:9092",
        root_certificates=tmp_path / "ca.crt",
        node_key=key.private_key,
        data_path=tmp_path / "texts.sqlite3",
        model_dir=tmp_path / "model",
        state_dir=tmp_path / "state",
    )
    node = SuperNode(config)
    argv = node.argv()
    assert "--insecure" not in argv
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(key.private_key)
    assert f'data-path="{tmp_path / "texts.sqlite3"}"' in argv[argv.index("--node-config") + 1]
    env = node.env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    sneaky = SuperNodeConfig(**{**config.__dict__, "data_path": Path('/x" model-dir="/evil')})
    with pytest.raises(ConfigError, match="data-path"):
        sneaky.node_config()


def test_a_wrecked_adapter_evaluates_to_infinite_perplexity_not_an_error() -> None:
    from agent.federated.trainer import evaluate

    h = np.ones((2, 4), np.float32)
    w = np.zeros((3, 4), np.float32)
    huge = Adapter(a=np.full((4, 1), 1e3, np.float32), b=np.array([[1e3, -1e3, 0.0]], np.float32))
    result = evaluate(h, np.array([1, 1]), w, huge)
    assert result.perplexity == float("inf")
