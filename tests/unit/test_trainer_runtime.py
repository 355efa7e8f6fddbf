"""The trainer against the real runtime on the tiny model: same logits, same adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.federated.features import extract_features
from agent.federated.trainer import Adapter, TrainConfig, evaluate, init_adapter, train
from agent.runtime.engine import Engine
from coordinator.models.reference import ReferenceModel

TEXTS = [
    "Drink water, sleep well, and walk every day.",
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello there. the model, the fleet, the device.",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir, threads=1)


@pytest.fixture(scope="module")
def lm_head(tiny_reference: ReferenceModel) -> np.ndarray:
    # The graph's LM head is the tied Q8_0 embedding; the reference dequantizes the same blocks.
    return tiny_reference.w["token_embd.weight"]


def test_the_trainers_logits_are_the_engines(engine: Engine, lm_head: np.ndarray) -> None:
    token_lists = [engine.encode(t) for t in TEXTS]
    features = extract_features(engine, token_lists, window=16)
    stream = [i for ids in token_lists for i in ids]
    assert features.y.tolist() == stream[1:]
    first_window = stream[:16]
    engine_logits = engine.forward(first_window).logits
    np.testing.assert_allclose(features.h[:16] @ lm_head.T, engine_logits, atol=2e-4, rtol=1e-4)


def test_a_trained_adapter_means_the_same_to_the_runtime(
    engine: Engine, lm_head: np.ndarray
) -> None:
    token_lists = [engine.encode(t) for t in TEXTS]
    features = extract_features(engine, token_lists, window=32)
    start = init_adapter(engine.hidden_size, engine.vocab_size, engine.adapter_rank, seed=0)
    config = TrainConfig(epochs=30, batch_rows=32, learning_rate=0.02)
    result = train(features.h, features.y, lm_head, start, config)
    trained = Adapter(a=start.a + result.delta.a, b=start.b + result.delta.b)
    before = evaluate(features.h, features.y, lm_head)
    after = evaluate(features.h, features.y, lm_head, trained)
    assert after.perplexity < 0.5 * before.perplexity

    ids = token_lists[0]
    runtime_adapter = engine.make_adapter(trained.a, trained.b)
    with_adapter = engine.forward(ids, adapter=runtime_adapter).logits
    h = engine.forward_hidden(ids)
    expected = h @ lm_head.T + (h @ trained.a) @ trained.b
    np.testing.assert_allclose(with_adapter, expected, atol=5e-4, rtol=1e-4)
