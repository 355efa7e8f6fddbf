"""One device's part of a federated round, without Flower: load, train, evaluate.

:mod:`agent.federated.client_app` (the only flwr importer of the agent) calls these with
the node config (where the local data and the model are) and the round's settings, and
sends back only what :func:`train_round` returns: the adapter (start plus a local delta)
and a few numbers. Texts and token ids stay inside this module's locals.

Invariants:

- The model directory is loaded with its files verified; the adapter a round starts from
  must fit it (``[hidden, r]``, ``[r, vocab]``, ``r <=`` the graph's adapter rank).
- Training is bounded by :class:`~agent.federated.trainer.TrainConfig` budgets and yields
  to serving in two ways: ``checkpoint`` (the ClientApp passes one that waits while the
  device's serving marker file exists, asked every ``check_rows`` rows), and
  :func:`yield_cpu`, which puts the training process in the kernel's idle scheduling
  class so the inference engine preempts it at once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.errors import TrainingInputError
from agent.federated.cache import FeatureCache, cache_key
from agent.federated.datastore import LocalTextStore, Split
from agent.federated.features import Features, extract_features, sample_anchor
from agent.federated.lm_head import read_lm_head
from agent.federated.trainer import (
    Adapter,
    Checkpoint,
    Directive,
    TrainConfig,
    evaluate,
    train,
)
from agent.runtime import SamplingParams
from agent.runtime.engine import Engine
from protocol.bundle import MANIFEST_NAME

__all__ = [
    "AnchorConfig",
    "FeatureConfig",
    "LocalModel",
    "RoundReport",
    "evaluate_round",
    "serving_checkpoint",
    "train_round",
    "yield_cpu",
]

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class FeatureConfig:
    """How local texts become training positions."""

    window: int = 128  # tokens per forward pass
    max_rows: int = 20_000  # positions per split


@dataclass(frozen=True)
class AnchorConfig:
    """The anchor texts the base model writes for the trainer's anchor term."""

    samples: int = 48  # texts, about 5700 positions (fewer held general text less well)
    tokens: int = 128  # tokens per text, at most
    seed: int = 0  # the same texts on every device and in every round


@dataclass(frozen=True)
class RoundReport:
    """What a device sends back for a round: the adapter and numbers, never data."""

    adapter: Adapter
    num_examples: int
    metrics: dict[str, float]


class LocalModel:
    """The frozen model of a device as the trainer sees it (engine + LM head)."""

    def __init__(self, model_dir: Path, *, threads: int = 1) -> None:
        self.engine = Engine.load(model_dir, threads=threads)
        #: What cached arrays of this model are keyed by: its manifest names every file's hash.
        self.identity = hashlib.sha256((model_dir / MANIFEST_NAME).read_bytes()).hexdigest()
        self.w = read_lm_head(model_dir)
        self.separator = self.engine.encode("\n\n")

    def features(self, texts: list[str], config: FeatureConfig) -> Features:
        """Hidden states and next-token targets of ``texts``.

        Raises:
            TrainingInputError: the texts hold fewer than two tokens.
        """
        token_lists = [self.engine.encode(t) for t in texts]
        return extract_features(
            self.engine,
            token_lists,
            window=config.window,
            separator=self.separator,
            max_rows=config.max_rows,
        )

    def sample(self, prompt: Sequence[int], *, max_tokens: int, seed: int) -> list[int]:
        """Token ids the base model samples after ``prompt`` at temperature 1."""
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)
        generation = self.engine.generate(prompt, params)
        for _ in generation:
            pass
        return list(generation.token_ids)

    def anchor(self, config: AnchorConfig) -> Array:
        """Hidden states of the anchor texts, started from the model's BOS token (or its
        end-of-text token when it has none)."""
        info = self.engine.info
        start = info.bos_token_id if info.bos_token_id is not None else info.eos_token_ids[0]
        return sample_anchor(
            self.engine,
            self,
            start=[start],
            samples=config.samples,
            tokens=config.tokens,
            seed=config.seed,
        )

    def check_adapter(self, adapter: Adapter) -> None:
        """Raises TrainingInputError when ``adapter`` does not fit this model."""
        rank = adapter.a.shape[1] if adapter.a.ndim == 2 else 0
        if (
            adapter.a.shape != (self.engine.hidden_size, rank)
            or adapter.b.shape != (rank, self.engine.vocab_size)
            or not 1 <= rank <= self.engine.adapter_rank
        ):
            raise TrainingInputError(
                f"the round's adapter {adapter.a.shape}/{adapter.b.shape} does not fit this "
                f"model (hidden {self.engine.hidden_size}, vocab {self.engine.vocab_size}, "
                f"rank <= {self.engine.adapter_rank})"
            )


def local_texts(data_path: Path, split: Split) -> list[str]:
    """The texts of ``split`` in the device's store (read-only use)."""
    store = LocalTextStore.open(data_path)
    try:
        return store.texts(split)
    finally:
        store.close()


def serving_checkpoint(
    marker: Path | None,
    *,
    poll_s: float = 0.005,
    max_wait_s: float = 600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Checkpoint:
    """A checkpoint that pauses training while ``marker`` exists (the agent is serving).

    The agent creates the marker when a request arrives and removes it when it is idle
    again; the trainer then stops between two minibatches. A pause longer than
    ``max_wait_s`` gives up the round (ABORT).
    """

    def checkpoint() -> Directive:
        if marker is None:
            return Directive.CONTINUE
        began = clock()
        while os.path.exists(marker):
            if clock() - began > max_wait_s:
                return Directive.ABORT
            sleep(poll_s)
        return Directive.CONTINUE

    return checkpoint


CpuClass = Literal["idle", "nice", "unchanged"]


def yield_cpu(task_dir: Path = Path("/proc/self/task")) -> CpuClass:
    """Lower every thread of this process to the lowest CPU priority the kernel grants.

    Linux ``SCHED_IDLE`` first: such threads run only on cores no other thread wants, so
    an inference request takes the cores back at once, not after a timeslice. Where that
    is refused or unknown, nice 19. Threads started later inherit the class. An
    unprivileged process cannot raise its priority again: call this only in a process that
    does nothing but train and evaluate (the ClientApp's, one per Flower message).
    Returns what was applied; never raises.
    """
    try:
        threads = [int(t) for t in os.listdir(task_dir)]
    except (OSError, ValueError):
        threads = [0]
    if hasattr(os, "SCHED_IDLE") and _for_each(
        threads, lambda tid: os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    ):
        return "idle"
    if _for_each(threads, lambda tid: os.setpriority(os.PRIO_PROCESS, tid, 19)):
        return "nice"
    return "unchanged"


def _for_each(threads: list[int], apply: Callable[[int], None]) -> bool:
    """Apply to every thread; False when the kernel refuses (a thread that ended is fine)."""
    for tid in threads:
        try:
            apply(tid)
        except ProcessLookupError:
            continue
        except OSError:
            return False
    return True


def train_round(
    model: LocalModel,
    data_path: Path,
    start: Adapter,
    config: TrainConfig,
    features: FeatureConfig,
    *,
    checkpoint: Checkpoint | None = None,
    anchor: AnchorConfig = AnchorConfig(),
    cache: FeatureCache | None = None,
) -> RoundReport:
    """Train ``start`` on the device's train split; return start + delta and numbers.

    With a positive ``config.anchor_weight`` the model first writes the anchor texts.
    With a ``cache``, the hidden states of the texts and of the anchor come from it when
    an earlier message of the same model computed them from the same inputs.

    Raises:
        TrainingInputError: the adapter does not fit the model, or too little local data.
        LocalDataError: the store cannot be opened.
    """
    model.check_adapter(start)
    began = time.perf_counter()
    data = _features(model, data_path, Split.TRAIN, features, cache)
    anchor_h = _anchor(model, anchor, cache) if config.anchor_weight > 0 else None
    prep_s = time.perf_counter() - began
    result = train(data.h, data.y, model.w, start, config, checkpoint=checkpoint, anchor=anchor_h)
    adapter = Adapter(
        a=(start.a + result.delta.a).astype(np.float32),
        b=(start.b + result.delta.b).astype(np.float32),
    )
    metrics = {
        "train_loss": float(result.train_loss) if result.train_loss is not None else 0.0,
        "steps": float(result.steps),
        "compute_s": float(result.compute_s),
        # The frozen model's passes over the texts and the anchor (or reading them from the
        # cache): the rest of the device's training compute.
        "prep_s": float(prep_s),
    }
    return RoundReport(adapter=adapter, num_examples=result.num_examples, metrics=metrics)


def evaluate_round(
    model: LocalModel,
    data_path: Path,
    adapter: Adapter | None,
    features: FeatureConfig,
    *,
    cache: FeatureCache | None = None,
) -> tuple[float, int, dict[str, float]]:
    """Held-out NLL, positions and perplexities (base and with ``adapter``) on the device.

    Raises:
        TrainingInputError: the adapter does not fit the model, or too little held-out data.
    """
    if adapter is not None:
        model.check_adapter(adapter)
    began = time.perf_counter()
    data = _features(model, data_path, Split.HELDOUT, features, cache)
    base = evaluate(data.h, data.y, model.w)
    tuned = evaluate(data.h, data.y, model.w, adapter) if adapter is not None else base
    metrics = {
        "perplexity": tuned.perplexity,
        "base_perplexity": base.perplexity,
        "compute_s": time.perf_counter() - began,
    }
    return tuned.nll, int(data.y.shape[0]), metrics


def _features(
    model: LocalModel,
    data_path: Path,
    split: Split,
    config: FeatureConfig,
    cache: FeatureCache | None,
) -> Features:
    texts = local_texts(data_path, split)
    if cache is None:
        return model.features(texts, config)
    key = cache_key(model.identity, f"window={config.window} max_rows={config.max_rows}", texts)

    def compute() -> dict[str, Array]:
        data = model.features(texts, config)
        return {"h": data.h, "y": data.y}

    arrays = cache.get_or_compute(split.value, key, compute)
    return Features(h=arrays["h"], y=arrays["y"])


def _anchor(model: LocalModel, config: AnchorConfig, cache: FeatureCache | None) -> Array:
    if cache is None:
        return model.anchor(config)
    key = cache_key(
        model.identity, f"samples={config.samples} tokens={config.tokens} seed={config.seed}"
    )
    return cache.get_or_compute("anchor", key, lambda: {"h": model.anchor(config)})["h"]
