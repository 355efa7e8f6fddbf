"""Choosing the next token from logits. Pure NumPy.

``temperature == 0`` is greedy (argmax; ties go to the lowest id). Otherwise the logits are
divided by the temperature, cut to the ``top_k`` most likely tokens (0 = all), then to the
smallest set whose probability reaches ``top_p``, and one token is drawn with the
generation's own ``numpy.random.Generator`` (seeded by ``seed``: the same seed, prompt and
parameters give the same tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 256  # characters


class FinishReason(StrEnum):
    """Why a generation ended."""

    STOP = "stop"  # an end-of-sequence token or a stop sequence
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the caller cancelled or stopped iterating


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. Raises ``ValueError`` naming the field and its limit when invalid."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop has {len(self.stop)} sequences (limit {MAX_STOP_SEQUENCES})")
        for s in self.stop:
            if not 1 <= len(s) <= MAX_STOP_LENGTH:
                raise ValueError(f"each stop sequence must have 1..{MAX_STOP_LENGTH} characters")


class Sampler:
    """Picks tokens for one generation (owns its random generator)."""

    def __init__(self, params: SamplingParams) -> None:
        self._params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray[Any, Any]) -> int:
        """Return the next token id for ``logits`` (1-D float32, one entry per token)."""
        p = self._params
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < scaled.size:
            candidates = np.argpartition(scaled, -p.top_k)[-p.top_k :]
        else:
            candidates = np.arange(scaled.size)
        values = scaled[candidates]
        order = np.argsort(-values, kind="stable")
        candidates, values = candidates[order], values[order]
        probs = np.exp(values - values[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p, side="left")) + 1
            candidates, probs = candidates[:keep], probs[:keep]
            probs = probs / probs.sum()
        return int(candidates[self._rng.choice(probs.size, p=probs)])
