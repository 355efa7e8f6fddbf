"""The on-device trainer: a low-rank adapter on the frozen LM head, fitted with NumPy.

The model the trainer sees is the last step of the Nano model only::

    logits = H @ W.T + (H @ A) @ B

``H`` [N, hidden] are the final-norm hidden states the runtime produced for N positions,
``y`` [N] the next tokens, ``W`` [vocab, hidden] the frozen (dequantized) LM head, and the
adapter ``A`` [hidden, rank], ``B`` [rank, vocab] the only trainable weights. The loss is
the mean softmax cross-entropy over the N positions plus, optionally:

- ``anchor_weight x`` the mean KL divergence from the base model's next-token distribution
  to the adapted one over M *anchor* positions ``G`` [M, hidden]: hidden states of text of
  another kind than the local data (the ClientApp samples it from the base model itself).
  It keeps the adapter from changing the model where the local domain is not in play, the
  way a per-vocabulary shift learned from the domain alone would (general text got 10-40 %
  worse without it);
- ``l2 / 2 * (|A|^2 + |B|^2)`` (a pull toward the base model against overfitting a small
  local data set).

Invariants:

- Pure: no I/O and no global state. Randomness comes from a seeded ``numpy.random.Generator``,
  time from an injected clock, and permission to continue from an injected checkpoint.
- Bounded memory: logits exist for at most ``check_rows`` rows at once while training
  (``batch_rows`` in :func:`evaluate` and :func:`loss_and_gradients`), a few
  ``rows x vocab`` arrays, whatever N and M are.
- Bounded CPU: a run stops after ``max_steps`` minibatches or ``max_compute_s`` seconds of
  compute (time spent inside the checkpoint, e.g. paused for an inference request, is not
  compute and does not count).
- Prompt yielding: the checkpoint is asked before every ``check_rows`` rows of a minibatch,
  not only between minibatches, and within those rows before every :data:`W_SLICE_ROWS`
  vocabulary rows of the LM head product (the part that streams ``W``, 113 MB for
  SmolLM2, from memory), so a pause waits for about a millisecond of compute whatever
  ``check_rows`` is. A minibatch interrupted by ABORT is dropped whole (no partial step).
- ``W`` and the starting adapter are never modified; the result is the *delta* from the
  starting adapter, which is what a federated round averages.
- Arithmetic runs in the dtype of ``H`` (float32 on a device, float64 in the gradient
  check); losses are accumulated in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, NamedTuple

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.errors import TrainingInputError

__all__ = [
    "Adapter",
    "Checkpoint",
    "Directive",
    "Evaluation",
    "StopReason",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "init_adapter",
    "loss_and_gradients",
    "train",
]

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]

#: Rows of logits computed at once by :func:`evaluate` and :func:`loss_and_gradients`.
EVAL_BATCH_ROWS = 256

_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-8


class Adapter(NamedTuple):
    """A LoRA pair for the LM head: ``a`` [hidden, rank], ``b`` [rank, vocab]."""

    a: FloatArray
    b: FloatArray

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


class Directive(Enum):
    """What a checkpoint tells the trainer between two minibatches."""

    CONTINUE = "continue"
    ABORT = "abort"


#: Called between minibatches. To *pause* (an inference request is being served), block
#: until the device is idle again, then return CONTINUE; to give up the round, return ABORT.
Checkpoint = Callable[[], Directive]


class StopReason(Enum):
    """Why :func:`train` returned."""

    COMPLETED = "completed"  # every epoch ran
    MAX_STEPS = "max_steps"
    MAX_COMPUTE = "max_compute"
    ABORTED = "aborted"  # the checkpoint said ABORT


#: Vocabulary rows of ``W`` per product between two checkpoint calls: 2048 x 576 float32 is
#: 4.7 MB, 0.5-2 ms of compute for 8-64 rows on one core. The product of a chunk of rows
#: with all of ``W`` takes 10-50 ms whatever the number of rows (it is bound by reading
#: ``W``, 113 MB for SmolLM2), and a training process that keeps streaming it after a
#: request arrived slows the engine's first token even in the idle scheduling class (they
#: share the memory bus): 1.11x idle with a check every 8 rows, 1.03x with slices.
W_SLICE_ROWS = 2048


class TrainConfig(BaseModel):
    """Hyperparameters and budgets of one local training run (minibatch Adam)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: Annotated[int, Field(ge=1, le=100)] = 3
    #: Positions per minibatch (one Adam step).
    batch_rows: Annotated[int, Field(ge=1, le=4096)] = 128
    #: Rows computed between two checkpoint calls inside a minibatch; logits of this many
    #: rows x vocab exist at once. Smaller pauses sooner, at some BLAS efficiency.
    check_rows: Annotated[int, Field(ge=1, le=4096)] = 32
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 1e-3
    #: Weight of the L2 penalty on A and B (0 disables it).
    l2: Annotated[float, Field(ge=0, le=100.0)] = 0.0
    #: Weight of the anchor term, the mean KL(base || adapted) on anchor positions
    #: (0 disables it; a positive weight needs anchor hidden states).
    anchor_weight: Annotated[float, Field(ge=0, le=1000.0)] = 0.0
    #: Anchor positions drawn (without replacement) per minibatch.
    anchor_rows: Annotated[int, Field(ge=1, le=4096)] = 64
    #: Minibatch steps before the run stops, across all epochs.
    max_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    #: Seconds of compute (by the injected clock) before the run stops.
    max_compute_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    #: Seeds the minibatch shuffling.
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`.

    ``delta`` is the trained adapter minus the starting one; ``train_loss`` is the mean
    cross-entropy (without the L2 term) over the positions of the last epoch that ran, or
    None when no step ran.
    """

    delta: Adapter
    num_examples: int
    train_loss: float | None
    steps: int
    compute_s: float
    stopped: StopReason


class Evaluation(NamedTuple):
    """Mean negative log-likelihood per position (nats) and its perplexity."""

    nll: float
    perplexity: float


def init_adapter(hidden: int, vocab: int, rank: int, seed: int) -> Adapter:
    """The standard LoRA start: ``A`` small Gaussian (std ``1/sqrt(hidden)``), ``B`` zeros.

    With ``B`` zero the adapter starts as the identity (the base model's logits), and every
    party that uses the same seed gets the same ``A``: a federated round must start all
    devices from one adapter, so the coordinator picks the seed.

    Raises:
        TrainingInputError: a dimension is not positive.
    """
    for name, value in (("hidden", hidden), ("vocab", vocab), ("rank", rank)):
        if value < 1:
            raise TrainingInputError(f"{name} must be >= 1, got {value}")
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0 / math.sqrt(hidden), size=(hidden, rank)).astype(np.float32)
    return Adapter(a=a, b=np.zeros((rank, vocab), dtype=np.float32))


def loss_and_gradients(
    h: FloatArray,
    y: IntArray,
    w: FloatArray,
    adapter: Adapter,
    l2: float = 0.0,
    batch_rows: int = EVAL_BATCH_ROWS,
    *,
    anchor: FloatArray | None = None,
    anchor_weight: float = 0.0,
) -> tuple[float, FloatArray, FloatArray]:
    """The training objective at ``adapter`` and its gradients with respect to A and B.

    The loss is the mean cross-entropy over all rows of ``h`` plus ``anchor_weight x`` the
    mean KL(base || adapted) over all rows of ``anchor`` plus ``l2 / 2 * (|A|^2 + |B|^2)``.
    Rows are processed ``batch_rows`` at a time; gradients come back in the dtype of ``h``.

    Raises:
        TrainingInputError: shapes, dtypes or target ids do not fit together, or a positive
            ``anchor_weight`` without anchor hidden states.
    """
    _check_inputs(h, y, w, adapter)
    _check_anchor(anchor, anchor_weight, h)
    a, b = (np.asarray(m, dtype=h.dtype) for m in adapter)
    grad_a = np.zeros_like(a)
    grad_b = np.zeros_like(b)
    n = h.shape[0]
    total_nll = 0.0
    for start in range(0, n, batch_rows):
        rows = slice(start, start + batch_rows)
        base = _logits(h[rows], w, None)
        total_nll += _accumulate(h[rows], y[rows], base, a, b, 1.0 / n, grad_a, grad_b)
    loss = total_nll / n
    if anchor is not None and anchor_weight > 0:
        g = anchor.astype(h.dtype, copy=False)
        m = g.shape[0]
        total_kl = 0.0
        for start in range(0, m, batch_rows):
            rows = slice(start, start + batch_rows)
            base = _logits(g[rows], w, None)
            total_kl += _accumulate_kl(g[rows], base, a, b, anchor_weight / m, grad_a, grad_b)
        loss += anchor_weight * total_kl / m
    if l2 > 0:
        loss += 0.5 * l2 * (float(np.sum(a * a)) + float(np.sum(b * b)))
        grad_a += l2 * a
        grad_b += l2 * b
    return loss, grad_a, grad_b


def evaluate(
    h: FloatArray,
    y: IntArray,
    w: FloatArray,
    adapter: Adapter | None = None,
    batch_rows: int = EVAL_BATCH_ROWS,
) -> Evaluation:
    """Mean NLL and perplexity of the targets ``y`` under the base model plus ``adapter``.

    ``adapter=None`` evaluates the base model alone.

    Raises:
        TrainingInputError: shapes, dtypes or target ids do not fit together.
    """
    _check_inputs(h, y, w, adapter)
    total = 0.0
    for start in range(0, h.shape[0], batch_rows):
        rows = slice(start, start + batch_rows)
        logits = _logits(h[rows], w, adapter)
        total += float(np.sum(_nll_rows(logits, y[rows]), dtype=np.float64))
    nll = total / h.shape[0]
    # exp overflows past ~709 nats (a wrecked adapter, e.g. drowned in DP noise).
    return Evaluation(nll=nll, perplexity=math.exp(nll) if nll < 700 else math.inf)


def train(
    h: FloatArray,
    y: IntArray,
    w: FloatArray,
    start: Adapter,
    config: TrainConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    checkpoint: Checkpoint | None = None,
    anchor: FloatArray | None = None,
) -> TrainResult:
    """Fit the adapter to ``(h, y)`` from ``start`` with minibatch Adam; return the delta.

    Each epoch visits the rows in a fresh order drawn from ``config.seed``. Before every
    minibatch the budgets are checked; ``checkpoint`` is called before every
    ``config.check_rows`` rows of a minibatch (it may block to pause training, or return
    ABORT to stop at once, dropping the unfinished minibatch); whatever was learned until
    the stop is returned, with the reason in ``stopped``. With a positive
    ``config.anchor_weight``, each minibatch also draws ``config.anchor_rows`` rows of
    ``anchor`` for the anchor term.

    Raises:
        TrainingInputError: shapes, dtypes or target ids do not fit together, or a positive
            ``anchor_weight`` without anchor hidden states.
    """
    _check_inputs(h, y, w, start)
    _check_anchor(anchor, config.anchor_weight, h)
    dtype = h.dtype
    g = anchor.astype(dtype, copy=False) if anchor is not None else None
    a0 = np.asarray(start.a, dtype=dtype)
    b0 = np.asarray(start.b, dtype=dtype)
    params = [a0.copy(), b0.copy()]
    moments1 = [np.zeros_like(p) for p in params]
    moments2 = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng(config.seed)
    n = h.shape[0]
    steps = 0
    compute_s = 0.0
    stopped = StopReason.COMPLETED
    epoch_nll = 0.0
    epoch_rows = 0
    for _epoch in range(config.epochs):
        epoch_nll, epoch_rows = 0.0, 0
        order = rng.permutation(n)
        for first in range(0, n, config.batch_rows):
            if steps >= config.max_steps:
                stopped = StopReason.MAX_STEPS
            elif compute_s >= config.max_compute_s:
                stopped = StopReason.MAX_COMPUTE
            if stopped is not StopReason.COMPLETED:
                break
            began = clock()
            rows = order[first : first + config.batch_rows]
            anchored = None
            if g is not None and config.anchor_weight > 0:
                drawn = rng.choice(g.shape[0], min(config.anchor_rows, g.shape[0]), replace=False)
                anchored = g[drawn]
            step = _minibatch(h, y, rows, anchored, w, params, config, clock, checkpoint)
            if step.grads is None:
                compute_s += clock() - began - step.paused_s
                stopped = StopReason.ABORTED
                break
            steps += 1
            _adam_step(params, step.grads, moments1, moments2, steps, config.learning_rate)
            compute_s += clock() - began - step.paused_s
            epoch_nll += step.nll
            epoch_rows += len(rows)
        if stopped is not StopReason.COMPLETED:
            break
    delta = Adapter(a=params[0] - a0, b=params[1] - b0)
    return TrainResult(
        delta=delta,
        num_examples=n,
        train_loss=epoch_nll / epoch_rows if epoch_rows else None,
        steps=steps,
        compute_s=compute_s,
        stopped=stopped,
    )


class _Minibatch(NamedTuple):
    """Summed NLL of a minibatch's rows, the gradients of their mean loss (+ L2) or None
    when the checkpoint said ABORT, and the time spent inside the checkpoint."""

    nll: float
    grads: list[FloatArray] | None
    paused_s: float


def _minibatch(
    h: FloatArray,
    y: IntArray,
    rows: IntArray,
    anchor: FloatArray | None,
    w: FloatArray,
    params: list[FloatArray],
    config: TrainConfig,
    clock: Callable[[], float],
    checkpoint: Checkpoint | None,
) -> _Minibatch:
    """The rows' (and anchor rows') gradients, ``config.check_rows`` rows at a time,
    asking ``checkpoint`` before each chunk."""
    a, b = params
    grad_a = np.zeros_like(a)
    grad_b = np.zeros_like(b)
    scale = 1.0 / len(rows)
    nll = 0.0
    paused_s = 0.0

    def ask() -> Directive:
        nonlocal paused_s
        if checkpoint is None:
            return Directive.CONTINUE
        asked = clock()
        directive = checkpoint()
        paused_s += clock() - asked
        return directive

    chunks: list[tuple[IntArray, FloatArray | None]] = [
        (rows[first : first + config.check_rows], None)
        for first in range(0, len(rows), config.check_rows)
    ]
    kl_scale = 0.0
    if anchor is not None:
        kl_scale = config.anchor_weight / anchor.shape[0]
        chunks += [
            (rows[:0], anchor[first : first + config.check_rows])
            for first in range(0, anchor.shape[0], config.check_rows)
        ]
    for chunk, anchor_chunk in chunks:
        if ask() is Directive.ABORT:
            return _Minibatch(nll, None, paused_s)
        states = h[chunk] if anchor_chunk is None else anchor_chunk
        base = _head_logits(states, w, ask)
        if base is None:
            return _Minibatch(nll, None, paused_s)
        if anchor_chunk is None:
            nll += _accumulate(states, y[chunk], base, a, b, scale, grad_a, grad_b)
        else:
            _accumulate_kl(anchor_chunk, base, a, b, kl_scale, grad_a, grad_b)
    if config.l2 > 0:
        grad_a += config.l2 * a
        grad_b += config.l2 * b
    return _Minibatch(nll, [grad_a, grad_b], paused_s)


def _accumulate(
    h: FloatArray,
    y: IntArray,
    base: FloatArray,
    a: FloatArray,
    b: FloatArray,
    scale: float,
    grad_a: FloatArray,
    grad_b: FloatArray,
) -> float:
    """Add ``scale`` x the gradients of the rows' summed NLL; return that sum.

    ``base`` is ``h W^T`` (:func:`_head_logits`); it is overwritten.
    d(nll)/d(logits) = softmax(logits) - onehot(y); logits = h W^T + (h A) B, so
    dB = (h A)^T G and dA = h^T (G B^T).
    """
    ha = h @ a
    z = base
    z += ha @ b
    z -= z.max(axis=1, keepdims=True)
    rows = np.arange(h.shape[0])
    target = z[rows, y].copy()
    np.exp(z, out=z)
    sums = z.sum(axis=1)
    nll = float(np.sum(np.log(sums) - target, dtype=np.float64))
    z /= sums[:, None]
    z[rows, y] -= 1.0
    z *= scale
    grad_b += ha.T @ z
    grad_a += h.T @ (z @ b.T)
    return nll


def _accumulate_kl(
    g: FloatArray,
    base: FloatArray,
    a: FloatArray,
    b: FloatArray,
    scale: float,
    grad_a: FloatArray,
    grad_b: FloatArray,
) -> float:
    """Add ``scale`` x the gradients of the rows' summed KL(base || adapted); return that sum.

    ``base`` is ``g W^T`` (:func:`_head_logits`); it is overwritten.
    With p the base and q the adapted softmax, d(KL)/d(adapted logits) = q - p.
    """
    ga = g @ a
    z = base + ga @ b
    log_p = _log_softmax(base)
    log_q = _log_softmax(z)
    p = np.exp(log_p)
    kl = float(np.sum(p * (log_p - log_q), dtype=np.float64))
    q = np.exp(log_q, out=z)
    q -= p
    q *= scale
    grad_b += ga.T @ q
    grad_a += g.T @ (q @ b.T)
    return kl


def _head_logits(
    h: FloatArray, w: FloatArray, ask: Callable[[], Directive] | None = None
) -> FloatArray | None:
    """``h W^T`` in the dtype of ``h``, :data:`W_SLICE_ROWS` vocabulary rows at a time,
    calling ``ask`` before every slice after the first; None when it says ABORT."""
    z = np.empty((h.shape[0], w.shape[0]), dtype=h.dtype)
    for first in range(0, w.shape[0], W_SLICE_ROWS):
        if first and ask is not None and ask() is Directive.ABORT:
            return None
        last = min(first + W_SLICE_ROWS, w.shape[0])
        np.matmul(h, w[first:last].astype(h.dtype, copy=False).T, out=z[:, first:last])
    return z


def _log_softmax(z: FloatArray) -> FloatArray:
    """Row-wise log-softmax; overwrites ``z``."""
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def _logits(h: FloatArray, w: FloatArray, adapter: Adapter | None) -> FloatArray:
    z: FloatArray = h @ w.T.astype(h.dtype, copy=False)
    if adapter is not None:
        z += (h @ adapter.a.astype(h.dtype, copy=False)) @ adapter.b.astype(h.dtype, copy=False)
    return z


def _nll_rows(z: FloatArray, y: IntArray) -> FloatArray:
    """Per-row NLL of targets ``y``; overwrites ``z``."""
    rows = np.arange(z.shape[0])
    z -= z.max(axis=1, keepdims=True)
    target = z[rows, y].copy()
    np.exp(z, out=z)
    nll: FloatArray = np.log(z.sum(axis=1)) - target
    return nll


def _adam_step(
    params: list[FloatArray],
    grads: list[FloatArray],
    m: list[FloatArray],
    v: list[FloatArray],
    t: int,
    lr: float,
) -> None:
    correction1 = 1.0 - _ADAM_BETA1**t
    correction2 = 1.0 - _ADAM_BETA2**t
    for p, g, m_i, v_i in zip(params, grads, m, v, strict=True):
        m_i *= _ADAM_BETA1
        m_i += (1.0 - _ADAM_BETA1) * g
        v_i *= _ADAM_BETA2
        v_i += (1.0 - _ADAM_BETA2) * (g * g)
        p -= lr * (m_i / correction1) / (np.sqrt(v_i / correction2) + _ADAM_EPS)


def _check_anchor(anchor: FloatArray | None, weight: float, h: FloatArray) -> None:
    if anchor is None:
        if weight > 0:
            raise TrainingInputError("a positive anchor_weight needs anchor hidden states")
        return
    if anchor.ndim != 2 or anchor.shape[0] < 1 or anchor.shape[1] != h.shape[1]:
        raise TrainingInputError(
            f"anchor hidden states must be [M >= 1, {h.shape[1]}], got {anchor.shape}"
        )
    if not np.isfinite(anchor).all():
        raise TrainingInputError("anchor hidden states contain NaN or infinite values")


def _check_inputs(h: FloatArray, y: IntArray, w: FloatArray, adapter: Adapter | None) -> None:
    if h.ndim != 2 or h.shape[0] < 1:
        raise TrainingInputError(f"hidden states must be [N >= 1, hidden], got {h.shape}")
    if not np.issubdtype(h.dtype, np.floating):
        raise TrainingInputError(f"hidden states must be floating point, got {h.dtype}")
    if not np.isfinite(h).all():
        raise TrainingInputError("hidden states contain NaN or infinite values")
    n, hidden = h.shape
    if y.shape != (n,):
        raise TrainingInputError(f"targets must be [{n}] like the hidden states, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TrainingInputError(f"targets must be integer token ids, got {y.dtype}")
    if w.ndim != 2 or w.shape[1] != hidden:
        raise TrainingInputError(f"LM head must be [vocab, {hidden}], got {w.shape}")
    vocab = w.shape[0]
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= vocab:
        raise TrainingInputError(
            f"target ids must lie in [0, {vocab}), got values from {low} to {high}"
        )
    if adapter is None:
        return
    rank = adapter.a.shape[1] if adapter.a.ndim == 2 else -1
    if adapter.a.shape != (hidden, rank) or rank < 1:
        raise TrainingInputError(f"adapter A must be [{hidden}, rank], got {adapter.a.shape}")
    if adapter.b.shape != (rank, vocab):
        raise TrainingInputError(
            f"adapter B must be [{rank}, {vocab}] to match A and the LM head, got {adapter.b.shape}"
        )
