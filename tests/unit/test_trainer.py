"""The NumPy LM-head LoRA trainer: its math, its budgets, its yielding."""

from __future__ import annotations

import itertools
import math
import re
import tracemalloc

import numpy as np
import pytest
from pydantic import ValidationError

from agent.errors import TrainingInputError
from agent.federated.trainer import (
    Adapter,
    Directive,
    StopReason,
    TrainConfig,
    evaluate,
    init_adapter,
    loss_and_gradients,
    train,
)


def _tiny(seed: int, n: int = 7, hidden: int = 5, vocab: int = 11, rank: int = 3):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, hidden))
    y = rng.integers(0, vocab, size=n)
    w = rng.normal(size=(vocab, hidden))
    adapter = Adapter(a=rng.normal(size=(hidden, rank)), b=rng.normal(size=(rank, vocab)))
    return h, y, w, adapter


def _numeric_gradient(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        saved = x[idx]
        x[idx] = saved + eps
        up = f()
        x[idx] = saved - eps
        down = f()
        x[idx] = saved
        grad[idx] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize(("l2", "batch_rows"), [(0.0, 256), (0.3, 256), (0.0, 2), (0.3, 3)])
def test_gradients_match_central_finite_differences(l2: float, batch_rows: int) -> None:
    h, y, w, adapter = _tiny(seed=1)

    def loss() -> float:
        return loss_and_gradients(h, y, w, adapter, l2=l2, batch_rows=batch_rows)[0]

    _, grad_a, grad_b = loss_and_gradients(h, y, w, adapter, l2=l2, batch_rows=batch_rows)
    num_a = _numeric_gradient(loss, adapter.a)
    num_b = _numeric_gradient(loss, adapter.b)
    assert np.abs(grad_a).max() > 1e-3
    assert np.abs(grad_b).max() > 1e-3
    np.testing.assert_allclose(grad_a, num_a, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grad_b, num_b, rtol=1e-6, atol=1e-9)


def test_loss_is_cross_entropy_plus_half_l2_norm() -> None:
    h, y, w, adapter = _tiny(seed=2)
    logits = h @ w.T + (h @ adapter.a) @ adapter.b
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(len(y)), y].mean()
    penalty = 0.5 * 0.2 * ((adapter.a**2).sum() + (adapter.b**2).sum())
    assert loss_and_gradients(h, y, w, adapter)[0] == pytest.approx(expected, rel=1e-12)
    assert loss_and_gradients(h, y, w, adapter, l2=0.2)[0] == pytest.approx(
        expected + penalty, rel=1e-12
    )
    result = evaluate(h, y, w, adapter, batch_rows=3)
    assert result.nll == pytest.approx(expected, rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-12)


def test_uniform_model_has_perplexity_of_the_vocabulary() -> None:
    h, y, _, _ = _tiny(seed=3, vocab=50)
    result = evaluate(h, y, np.zeros((50, h.shape[1])))
    assert result.perplexity == pytest.approx(50.0)


def test_fresh_adapter_is_the_base_model() -> None:
    adapter = init_adapter(hidden=5, vocab=11, rank=3, seed=4)
    assert adapter.a.shape == (5, 3)
    assert adapter.b.shape == (3, 11)
    assert adapter.a.dtype == np.float32
    assert not adapter.b.any()
    assert adapter.a.any()
    np.testing.assert_array_equal(adapter.a, init_adapter(5, 11, 3, seed=4).a)
    assert not np.array_equal(adapter.a, init_adapter(5, 11, 3, seed=5).a)
    h, y, w, _ = _tiny(seed=4)
    assert evaluate(h, y, w, adapter) == pytest.approx(evaluate(h, y, w, None))


def _teacher_problem(seed: int, n: int, hidden: int = 16, vocab: int = 40, rank: int = 2):
    """Targets sampled from a base model plus a hidden low-rank shift a student can learn."""
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.3, size=(vocab, hidden)).astype(np.float32)
    shift = rng.normal(size=(hidden, rank)) @ rng.normal(size=(rank, vocab))
    h = rng.normal(size=(n, hidden)).astype(np.float32)
    logits = h @ w.T + h @ shift
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(vocab, p=p) for p in probs])
    return h, y, w


def test_training_lowers_held_out_loss() -> None:
    h, y, w = _teacher_problem(seed=5, n=3000)
    train_rows, held_rows = slice(0, 2400), slice(2400, None)
    start = init_adapter(hidden=16, vocab=40, rank=4, seed=0)
    before = evaluate(h[held_rows], y[held_rows], w, start)
    config = TrainConfig(epochs=5, batch_rows=64, learning_rate=0.02)
    result = train(h[train_rows], y[train_rows], w, start, config)
    trained = Adapter(a=start.a + result.delta.a, b=start.b + result.delta.b)
    after = evaluate(h[held_rows], y[held_rows], w, trained)
    assert result.stopped is StopReason.COMPLETED
    assert result.steps == 5 * math.ceil(2400 / 64)
    assert result.num_examples == 2400
    assert result.train_loss is not None
    assert result.train_loss < before.nll
    assert after.perplexity < 0.8 * before.perplexity
    assert result.delta.a.dtype == np.float32
    assert result.delta.b.dtype == np.float32


def test_delta_is_relative_to_the_starting_adapter_which_stays_untouched() -> None:
    h, y, w = _teacher_problem(seed=6, n=400)
    rng = np.random.default_rng(0)
    start = Adapter(
        a=rng.normal(size=(16, 3)).astype(np.float32),
        b=rng.normal(scale=0.1, size=(3, 40)).astype(np.float32),
    )
    frozen = (start.a.copy(), start.b.copy(), w.copy())
    config = TrainConfig(epochs=1, batch_rows=400, learning_rate=0.01)
    result = train(h, y, w, start, config)
    # One full-batch Adam step moves every weight with a nonzero gradient by about lr.
    _, grad_a, grad_b = loss_and_gradients(h, y, w, start)
    expected_a = -0.01 * np.sign(grad_a)
    np.testing.assert_allclose(result.delta.a, expected_a, atol=1e-4)
    np.testing.assert_allclose(result.delta.b, -0.01 * np.sign(grad_b), atol=1e-4)
    for kept, original in zip((start.a, start.b, w), frozen, strict=True):
        np.testing.assert_array_equal(kept, original)


def test_l2_keeps_the_adapter_smaller() -> None:
    h, y, w = _teacher_problem(seed=7, n=600)
    start = init_adapter(16, 40, 4, seed=1)
    free = train(h, y, w, start, TrainConfig(epochs=4, batch_rows=64, learning_rate=0.02))
    held = train(h, y, w, start, TrainConfig(epochs=4, batch_rows=64, learning_rate=0.02, l2=0.5))
    assert np.linalg.norm(start.b + held.delta.b) < 0.5 * np.linalg.norm(start.b + free.delta.b)


def test_same_seed_same_update() -> None:
    h, y, w = _teacher_problem(seed=8, n=300)
    start = init_adapter(16, 40, 2, seed=3)
    config = TrainConfig(epochs=2, batch_rows=32, learning_rate=0.01, seed=9)
    one, two = train(h, y, w, start, config), train(h, y, w, start, config)
    np.testing.assert_array_equal(one.delta.b, two.delta.b)
    other = train(h, y, w, start, config.model_copy(update={"seed": 10}))
    assert not np.array_equal(one.delta.b, other.delta.b)


class _FakeClock:
    def __init__(self, tick_s: float) -> None:
        self.now = 0.0
        self.tick_s = tick_s

    def __call__(self) -> float:
        self.now += self.tick_s
        return self.now


def test_step_budget_stops_the_run() -> None:
    h, y, w = _teacher_problem(seed=9, n=200)
    config = TrainConfig(epochs=10, batch_rows=16, max_steps=7)
    result = train(h, y, w, init_adapter(16, 40, 2, 0), config)
    assert (result.stopped, result.steps) == (StopReason.MAX_STEPS, 7)
    assert result.train_loss is not None


def test_compute_budget_stops_the_run_by_the_injected_clock() -> None:
    h, y, w = _teacher_problem(seed=10, n=200)
    clock = _FakeClock(tick_s=0.5)  # each step reads the clock twice: 0.5 s of compute
    config = TrainConfig(epochs=10, batch_rows=16, max_compute_s=2.0)
    result = train(h, y, w, init_adapter(16, 40, 2, 0), config, clock=clock)
    assert (result.stopped, result.steps, result.compute_s) == (StopReason.MAX_COMPUTE, 4, 2.0)


def test_time_paused_in_the_checkpoint_is_not_compute() -> None:
    h, y, w = _teacher_problem(seed=11, n=64)
    clock = _FakeClock(tick_s=0.0)

    def pause_for_a_request() -> Directive:
        clock.now += 1000.0  # an inference request was served meanwhile
        return Directive.CONTINUE

    config = TrainConfig(epochs=2, batch_rows=16, max_compute_s=1.0)
    result = train(
        h, y, w, init_adapter(16, 40, 2, 0), config, clock=clock, checkpoint=pause_for_a_request
    )
    assert (result.stopped, result.steps, result.compute_s) == (StopReason.COMPLETED, 8, 0.0)


def test_checkpoint_is_asked_before_every_minibatch_and_abort_stops_at_once() -> None:
    h, y, w = _teacher_problem(seed=12, n=100)
    answers = itertools.chain([Directive.CONTINUE] * 3, itertools.repeat(Directive.ABORT))
    calls: list[int] = []

    def checkpoint() -> Directive:
        calls.append(1)
        return next(answers)

    start = init_adapter(16, 40, 2, 0)
    config = TrainConfig(epochs=5, batch_rows=10, learning_rate=0.01)
    result = train(h, y, w, start, config, checkpoint=checkpoint)
    assert (result.stopped, result.steps, len(calls)) == (StopReason.ABORTED, 3, 4)
    assert result.delta.b.any()
    assert result.train_loss is not None

    never = train(h, y, w, start, config, checkpoint=lambda: Directive.ABORT)
    assert (never.stopped, never.steps, never.train_loss) == (StopReason.ABORTED, 0, None)
    assert not never.delta.a.any()
    assert not never.delta.b.any()


def test_logits_never_materialize_for_all_rows_at_once() -> None:
    rng = np.random.default_rng(13)
    n, hidden, vocab = 4096, 8, 4000
    h = rng.normal(size=(n, hidden)).astype(np.float32)
    y = rng.integers(0, vocab, size=n)
    w = rng.normal(scale=0.1, size=(vocab, hidden)).astype(np.float32)
    start = init_adapter(hidden, vocab, 2, 0)
    all_logits_bytes = n * vocab * 4  # 65 MB
    tracemalloc.start()
    try:
        evaluate(h, y, w, start)
        loss_and_gradients(h, y, w, start)
        train(h, y, w, start, TrainConfig(epochs=1, batch_rows=128, max_steps=3))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < all_logits_bytes / 4


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("h_1d", "hidden states must be [N >= 1, hidden]"),
        ("h_nan", "NaN"),
        ("h_int", "floating point"),
        ("y_short", "targets must be [7]"),
        ("y_float", "integer token ids"),
        ("y_out_of_vocab", "target ids must lie in [0, 11), got values from 0 to 11"),
        ("w_wrong_hidden", "LM head must be [vocab, 5]"),
        ("a_wrong_hidden", "adapter A must be [5, rank]"),
        ("b_wrong_rank", "adapter B must be [3, 11]"),
    ],
)
def test_mismatched_inputs_are_refused_with_the_problem_named(case: str, message: str) -> None:
    h, y, w, adapter = _tiny(seed=14)
    if case == "h_1d":
        h = h[0]
    elif case == "h_nan":
        h = h.copy()
        h[2, 1] = np.nan
    elif case == "h_int":
        h = h.astype(np.int64)
    elif case == "y_short":
        y = y[:-1]
    elif case == "y_float":
        y = y.astype(np.float64)
    elif case == "y_out_of_vocab":
        y = y.copy()
        y[0], y[1] = 11, 0
    elif case == "w_wrong_hidden":
        w = w[:, :4]
    elif case == "a_wrong_hidden":
        adapter = Adapter(a=adapter.a[:4], b=adapter.b)
    elif case == "b_wrong_rank":
        adapter = Adapter(a=adapter.a, b=adapter.b[:2])
    with pytest.raises(TrainingInputError, match=re.escape(message)):
        train(h, y, w, adapter, TrainConfig())


def test_config_names_the_field_and_the_limit() -> None:
    with pytest.raises(ValidationError, match=r"batch_rows\n.*less than or equal to 4096"):
        TrainConfig(batch_rows=100_000)
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(TrainingInputError, match="rank must be >= 1, got 0"):
        init_adapter(5, 11, 0, seed=0)


def test_checkpoint_is_asked_inside_a_minibatch_every_check_rows_rows() -> None:
    h, y, w = _teacher_problem(seed=14, n=40)
    calls: list[int] = []

    def checkpoint() -> Directive:
        calls.append(1)
        return Directive.CONTINUE

    start = init_adapter(16, 40, 2, 0)
    config = TrainConfig(epochs=1, batch_rows=20, check_rows=8, learning_rate=0.01)
    chunked = train(h, y, w, start, config, checkpoint=checkpoint)
    assert (chunked.steps, len(calls)) == (2, 2 * 3)  # rows 0-7, 8-15, 16-19 per minibatch
    whole = train(h, y, w, start, config.model_copy(update={"check_rows": 20}))
    np.testing.assert_allclose(chunked.delta.a, whole.delta.a, atol=1e-6)
    np.testing.assert_allclose(chunked.delta.b, whole.delta.b, atol=1e-6)


def test_abort_inside_a_minibatch_drops_that_minibatch() -> None:
    h, y, w = _teacher_problem(seed=15, n=40)
    answers = iter([Directive.CONTINUE] * 4 + [Directive.ABORT])
    start = init_adapter(16, 40, 2, 0)
    config = TrainConfig(epochs=1, batch_rows=20, check_rows=8, learning_rate=0.01, seed=3)
    result = train(h, y, w, start, config, checkpoint=lambda: next(answers))
    one_step = train(h, y, w, start, config.model_copy(update={"max_steps": 1}))
    assert (result.stopped, result.steps) == (StopReason.ABORTED, 1)
    np.testing.assert_array_equal(result.delta.b, one_step.delta.b)


@pytest.mark.parametrize(("weight", "batch_rows"), [(0.7, 256), (2.0, 3)])
def test_anchor_gradients_match_central_finite_differences(weight: float, batch_rows: int) -> None:
    h, y, w, adapter = _tiny(seed=16)
    anchor = np.random.default_rng(17).normal(size=(5, h.shape[1]))

    def loss() -> float:
        return loss_and_gradients(
            h, y, w, adapter, 0.1, batch_rows, anchor=anchor, anchor_weight=weight
        )[0]

    _, grad_a, grad_b = loss_and_gradients(
        h, y, w, adapter, 0.1, batch_rows, anchor=anchor, anchor_weight=weight
    )
    np.testing.assert_allclose(grad_a, _numeric_gradient(loss, adapter.a), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_b, _numeric_gradient(loss, adapter.b), rtol=1e-5, atol=1e-7)


def test_anchor_term_is_the_mean_kl_from_the_base_model() -> None:
    h, y, w, adapter = _tiny(seed=18)
    anchor = np.random.default_rng(19).normal(size=(6, h.shape[1]))
    plain = loss_and_gradients(h, y, w, adapter)[0]
    anchored = loss_and_gradients(h, y, w, adapter, anchor=anchor, anchor_weight=3.0)[0]
    base = anchor @ w.T
    tuned = base + anchor @ adapter.a @ adapter.b
    log_p = base - np.log(np.exp(base).sum(axis=1, keepdims=True))
    log_q = tuned - np.log(np.exp(tuned).sum(axis=1, keepdims=True))
    kl = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1))
    assert anchored == pytest.approx(plain + 3.0 * kl, rel=1e-10)
    fresh = init_adapter(h.shape[1], w.shape[0], 2, seed=0)
    assert loss_and_gradients(h, y, w, fresh, anchor=anchor, anchor_weight=3.0)[0] == (
        pytest.approx(loss_and_gradients(h, y, w, fresh)[0], rel=1e-6)
    )


def test_the_anchor_keeps_the_model_on_other_text() -> None:
    h, y, w = _teacher_problem(seed=20, n=800)
    other = np.random.default_rng(21).normal(size=(400, h.shape[1])).astype(np.float32) + 1.5
    start = init_adapter(16, 40, 4, seed=0)
    config = TrainConfig(epochs=4, batch_rows=64, learning_rate=0.02)
    free = train(h, y, w, start, config).delta
    held = train(
        h, y, w, start, config.model_copy(update={"anchor_weight": 5.0}), anchor=other
    ).delta

    def drift(delta: Adapter) -> float:
        tuned = Adapter(a=start.a + delta.a, b=start.b + delta.b)
        return (
            loss_and_gradients(other, y[:400], w, tuned, anchor=other, anchor_weight=1.0)[0]
            - (loss_and_gradients(other, y[:400], w, tuned)[0])
        )

    assert drift(held) < 0.5 * drift(free)


def test_an_anchor_weight_without_anchor_states_is_refused() -> None:
    h, y, w = _teacher_problem(seed=22, n=20)
    config = TrainConfig(anchor_weight=1.0)
    with pytest.raises(TrainingInputError, match="needs anchor hidden states"):
        train(h, y, w, init_adapter(16, 40, 2, 0), config)
    with pytest.raises(TrainingInputError, match=r"anchor hidden states must be \[M >= 1, 16\]"):
        train(h, y, w, init_adapter(16, 40, 2, 0), config, anchor=np.zeros((3, 5)))


def test_checkpoint_is_asked_between_slices_of_the_lm_head_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The product with W is what takes the time (it streams the LM head from memory); the
    trainer asks between slices of W's vocabulary rows, and stops inside one."""
    import agent.federated.trainer as trainer

    h, y, w = _teacher_problem(seed=14, n=40)
    start = init_adapter(16, 40, 2, 0)
    anchor = np.random.default_rng(3).normal(size=(10, 16)).astype(h.dtype)
    config = TrainConfig(
        epochs=1, batch_rows=20, check_rows=8, learning_rate=0.01, anchor_weight=0.5,
        anchor_rows=6,
    )  # fmt: skip
    whole = train(h, y, w, start, config, anchor=anchor)
    monkeypatch.setattr(trainer, "W_SLICE_ROWS", 16)  # vocab 40: slices of 16, 16, 8
    calls: list[int] = []

    def checkpoint() -> Directive:
        calls.append(1)
        return Directive.CONTINUE

    sliced = train(h, y, w, start, config, checkpoint=checkpoint, anchor=anchor)
    # Per minibatch: 3 chunks of rows and 1 of anchor rows, each asked before its 3 slices.
    assert (sliced.steps, len(calls)) == (2, 2 * 4 * 3)
    np.testing.assert_allclose(sliced.delta.a, whole.delta.a, atol=1e-6)
    np.testing.assert_allclose(sliced.delta.b, whole.delta.b, atol=1e-6)
    answers = iter([Directive.CONTINUE] * 13 + [Directive.ABORT])  # the 2nd slice of step 2
    stopped = train(h, y, w, start, config, checkpoint=lambda: next(answers), anchor=anchor)
    assert (stopped.stopped, stopped.steps) == (StopReason.ABORTED, 1)
