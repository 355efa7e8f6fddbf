"""Hidden states and targets from token streams, through the runtime's seams."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from agent.errors import TrainingInputError
from agent.federated.features import extract_features, load_lm_head, sample_anchor


class _EchoModel:
    """Hidden state of a position = (its token id, its position in the sequence, 1)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def forward_hidden(self, ids: Sequence[int]) -> np.ndarray[Any, Any]:
        self.calls.append(list(ids))
        col = np.asarray(ids, dtype=np.float32)
        return np.stack([col, np.arange(len(col), dtype=np.float32), np.ones_like(col)], axis=1)


def test_texts_are_packed_with_the_separator_and_every_next_token_is_a_target() -> None:
    model = _EchoModel()
    texts = [[10, 11, 12], [], [20, 21, 22, 23, 24]]
    features = extract_features(model, texts, window=4, separator=[99])
    stream = [10, 11, 12, 99, 20, 21, 22, 23, 24, 99]
    np.testing.assert_array_equal(features.y, stream[1:])
    np.testing.assert_array_equal(features.h[:, 0], stream[:-1])
    assert features.h.dtype == np.float32
    assert features.y.dtype == np.int64
    # Windows of 4 inputs, each a fresh sequence starting at position 0.
    assert model.calls == [[10, 11, 12, 99], [20, 21, 22, 23], [24]]
    np.testing.assert_array_equal(features.h[:, 1], [0, 1, 2, 3, 0, 1, 2, 3, 0])


def test_rows_are_capped() -> None:
    model = _EchoModel()
    features = extract_features(model, [list(range(1, 50))], window=8, max_rows=11)
    assert features.h.shape == (11, 3)
    np.testing.assert_array_equal(features.y, range(2, 13))
    assert [len(call) for call in model.calls] == [8, 3]


class _BrokenModel:
    def __init__(self, result: np.ndarray[Any, Any]) -> None:
        self.result = result

    def forward_hidden(self, ids: Sequence[int]) -> np.ndarray[Any, Any]:
        return self.result


@pytest.mark.parametrize(
    ("kwargs", "model", "message"),
    [
        ({"window": 0}, _EchoModel(), "window must be >= 1 token, got 0"),
        ({"window": 4, "max_rows": 0}, _EchoModel(), "max_rows must lie in [1, 1000000], got 0"),
        ({"window": 4, "texts": [[5]]}, _EchoModel(), "the texts hold 1 token(s)"),
        ({"window": 4}, _BrokenModel(np.zeros((2, 3))), "shape (2, 3) for 3 tokens"),
        ({"window": 4}, _BrokenModel(np.full((3, 3), np.nan)), "NaN or infinite hidden"),
    ],
)
def test_bad_requests_and_bad_model_outputs_are_refused(
    kwargs: dict[str, Any], model: Any, message: str
) -> None:
    texts = kwargs.pop("texts", [[1, 2, 3, 4]])
    with pytest.raises(TrainingInputError) as caught:
        extract_features(model, texts, **kwargs)
    assert message in str(caught.value)


class _Head:
    def __init__(self, w: np.ndarray[Any, Any]) -> None:
        self.w = w

    def lm_head(self) -> np.ndarray[Any, Any]:
        return self.w


def test_lm_head_is_checked_for_shape_and_values() -> None:
    w = load_lm_head(_Head(np.ones((7, 3), dtype=np.float64)), vocab=7, hidden=3)
    assert w.dtype == np.float32
    assert w.shape == (7, 3)
    with pytest.raises(TrainingInputError, match=r"shape \(3, 7\), expected \(7, 3\)"):
        load_lm_head(_Head(np.ones((3, 7))), vocab=7, hidden=3)
    with pytest.raises(TrainingInputError, match="NaN"):
        load_lm_head(_Head(np.full((7, 3), np.inf)), vocab=7, hidden=3)


class _CountingSampler:
    """Writes ``seed`` repeated, one token shorter each time (a text that ends early)."""

    def __init__(self) -> None:
        self.asked: list[tuple[list[int], int, int]] = []

    def sample(self, prompt: Sequence[int], *, max_tokens: int, seed: int) -> list[int]:
        self.asked.append((list(prompt), max_tokens, seed))
        return [seed] * (max_tokens - len(self.asked) + 1)


def test_anchor_rows_are_every_position_of_seeded_samples_after_the_start_token() -> None:
    model, sampler = _EchoModel(), _CountingSampler()
    h = sample_anchor(model, sampler, start=[7], samples=2, tokens=3, seed=40)
    assert sampler.asked == [([7], 3, 40), ([7], 3, 41)]
    assert model.calls == [[7, 40, 40, 40], [7, 41, 41]]
    np.testing.assert_array_equal(h[:, 0], [7, 40, 40, 40, 7, 41, 41])
    assert h.dtype == np.float32


@pytest.mark.parametrize(("samples", "tokens", "start"), [(0, 3, [7]), (2, 0, [7]), (2, 3, [])])
def test_bad_anchor_requests_are_refused(samples: int, tokens: int, start: list[int]) -> None:
    with pytest.raises(TrainingInputError, match="an anchor needs"):
        sample_anchor(
            _EchoModel(), _CountingSampler(), start=start, samples=samples, tokens=tokens, seed=0
        )
