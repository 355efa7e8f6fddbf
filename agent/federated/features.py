"""From local texts to the trainer's inputs: hidden states H and next-token targets y.

The frozen model runs once over the local token streams; the trainer then only needs
``H`` [N, hidden], ``y`` [N] and the LM head ``W`` [vocab, hidden]. Both come from the
device's runtime through two one-method seams (:class:`HiddenStateModel`,
:class:`LmHeadSource`), so this module imports no inference engine and tests run with tiny
NumPy stand-ins.

Invariants:

- Texts are packed in the order given, each followed by ``separator`` (e.g. the tokens of
  ``"\\n\\n"``), into one stream that is cut into windows of ``window`` inputs; consecutive
  windows overlap by one token, so every token after the first is a target exactly once.
  Each window is a fresh sequence for the model (position 0, no cache).
- At most ``max_rows`` positions are produced; memory is ``max_rows x hidden`` float32.
- Deterministic: the same texts and model give the same arrays.

Anchor positions (:func:`sample_anchor`) are the hidden states of texts the frozen model
writes itself from its start token (temperature 1, seeded): text of the kind the model
produces when no domain is in play, which the trainer's anchor term keeps unchanged. They
need no data beyond the model, so every device of a group can make the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from agent.errors import TrainingInputError

__all__ = [
    "Features",
    "HiddenStateModel",
    "LmHeadSource",
    "extract_features",
    "load_lm_head",
    "sample_anchor",
]

Array = np.ndarray[Any, Any]

#: Upper bound of ``max_rows``: 1M positions x 576 hidden x 4 bytes = 2.3 GB.
MAX_ROWS_LIMIT = 1_000_000


class HiddenStateModel(Protocol):
    """The runtime's forward pass, seen from the trainer (``agent.runtime`` ``Engine``)."""

    def forward_hidden(self, ids: Sequence[int]) -> Array:
        """Final-norm hidden states, float32 ``[len(ids), hidden]``, of one sequence that
        starts at position 0 with no cache and no adapter."""
        ...


class TextSampler(Protocol):
    """The runtime's sampler, seen from the trainer (``LocalModel`` wraps the ``Engine``)."""

    def sample(self, prompt: Sequence[int], *, max_tokens: int, seed: int) -> list[int]:
        """Token ids the model samples after ``prompt`` (temperature 1), at most
        ``max_tokens``, fewer when it ends the text."""
        ...


class LmHeadSource(Protocol):
    """Where the frozen LM head comes from (the model the runtime loaded)."""

    def lm_head(self) -> Array:
        """The dequantized LM head, float32 ``[vocab, hidden]``."""
        ...


class Features(NamedTuple):
    """Hidden states ``h`` float32 [N, hidden] and next-token ids ``y`` int64 [N]."""

    h: Array
    y: Array


def extract_features(
    model: HiddenStateModel,
    token_lists: Sequence[Sequence[int]],
    *,
    window: int,
    separator: Sequence[int] = (),
    max_rows: int = 50_000,
) -> Features:
    """Run ``model`` over the packed token streams; return positions and their targets.

    Raises:
        TrainingInputError: ``window`` < 1, ``max_rows`` outside [1, 1000000], fewer than
            two tokens in all, or the model returned a wrongly shaped or non-finite array.
    """
    if window < 1:
        raise TrainingInputError(f"window must be >= 1 token, got {window}")
    if not 1 <= max_rows <= MAX_ROWS_LIMIT:
        raise TrainingInputError(f"max_rows must lie in [1, {MAX_ROWS_LIMIT}], got {max_rows}")
    stream = _pack(token_lists, separator)
    if len(stream) < 2:
        raise TrainingInputError(
            f"the texts hold {len(stream)} token(s); at least 2 are needed for one target"
        )
    hs: list[Array] = []
    ys: list[Array] = []
    for chunk in _windows(stream, window, max_rows):
        inputs, targets = chunk[:-1], chunk[1:]
        h = np.asarray(model.forward_hidden(inputs))
        if h.ndim != 2 or h.shape[0] != len(inputs) or (hs and h.shape[1] != hs[0].shape[1]):
            expected = hs[0].shape[1] if hs else "hidden"
            raise TrainingInputError(
                f"the model returned hidden states of shape {h.shape} for {len(inputs)} "
                f"tokens; expected [{len(inputs)}, {expected}]"
            )
        if not np.isfinite(h).all():
            raise TrainingInputError("the model returned NaN or infinite hidden states")
        hs.append(h.astype(np.float32, copy=False))
        ys.append(np.asarray(targets, dtype=np.int64))
    return Features(h=np.concatenate(hs), y=np.concatenate(ys))


def sample_anchor(
    model: HiddenStateModel,
    sampler: TextSampler,
    *,
    start: Sequence[int],
    samples: int,
    tokens: int,
    seed: int,
) -> Array:
    """Hidden states float32 ``[M, hidden]`` of ``samples`` texts the model writes after
    ``start``, each at most ``tokens`` long (sample ``i`` seeded ``seed + i``); every
    position of each text (its start included) is one row.

    Raises:
        TrainingInputError: ``samples`` or ``tokens`` < 1, an empty ``start``, or the model
            returned a wrongly shaped or non-finite array.
    """
    if samples < 1 or tokens < 1 or not start:
        raise TrainingInputError(
            f"an anchor needs samples >= 1, tokens >= 1 and a start token; got {samples}, "
            f"{tokens}, {list(start)}"
        )
    hs: list[Array] = []
    for i in range(samples):
        ids = [*start, *sampler.sample(start, max_tokens=tokens, seed=seed + i)]
        h = np.asarray(model.forward_hidden(ids))
        if h.ndim != 2 or h.shape[0] != len(ids) or (hs and h.shape[1] != hs[0].shape[1]):
            raise TrainingInputError(
                f"the model returned hidden states of shape {h.shape} for {len(ids)} tokens"
            )
        if not np.isfinite(h).all():
            raise TrainingInputError("the model returned NaN or infinite hidden states")
        hs.append(h.astype(np.float32, copy=False))
    return np.concatenate(hs)


def load_lm_head(source: LmHeadSource, *, vocab: int, hidden: int) -> Array:
    """The LM head from ``source``, checked to be float32 ``[vocab, hidden]`` and finite.

    Raises:
        TrainingInputError: the matrix has another shape or non-finite values.
    """
    w = np.asarray(source.lm_head(), dtype=np.float32)
    if w.shape != (vocab, hidden):
        raise TrainingInputError(f"LM head has shape {w.shape}, expected ({vocab}, {hidden})")
    if not np.isfinite(w).all():
        raise TrainingInputError("LM head contains NaN or infinite values")
    return w


def _pack(token_lists: Sequence[Sequence[int]], separator: Sequence[int]) -> list[int]:
    stream: list[int] = []
    for tokens in token_lists:
        if not tokens:
            continue
        stream.extend(tokens)
        stream.extend(separator)
    return stream


def _windows(stream: list[int], window: int, max_rows: int) -> Iterator[list[int]]:
    """Chunks of ``window + 1`` tokens overlapping by one, ``max_rows`` targets in all."""
    rows = 0
    for start in range(0, len(stream) - 1, window):
        take = min(window, max_rows - rows)
        chunk = stream[start : start + take + 1]
        if len(chunk) < 2:
            return
        yield chunk
        rows += len(chunk) - 1
        if rows >= max_rows:
            return
