"""LM-head low-rank adapters: ``logits = lm_head(h) + (h @ lora_a) @ lora_b``.

File format (``adapter.npz``): a NumPy ``.npz`` archive with exactly two arrays,
``lora_a`` float32 ``[hidden, r]`` and ``lora_b`` float32 ``[r, vocab]``, ``1 <= r <=`` the
model's ``max_adapter_rank``, every value finite. It is read with ``allow_pickle=False``
and a size limit. An adapter of rank ``r`` smaller than the graph's rank ``R`` is applied
zero-padded to ``R``, which computes exactly the same logits.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError
from protocol.bundle import ADAPTER_NAME

ADAPTER_FILE = ADAPTER_NAME
MAX_ADAPTER_BYTES = 64 * 1024 * 1024

Array = np.ndarray[Any, Any]


@dataclass(frozen=True, eq=False)
class Adapter:
    """A validated adapter; build it with :func:`make_adapter` or :func:`load_adapter`."""

    lora_a: Array  # float32 [hidden, r]
    lora_b: Array  # float32 [r, vocab]
    _padded: dict[int, tuple[Array, Array]] = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])

    def padded(self, rank: int) -> tuple[Array, Array]:
        """The two matrices zero-padded to ``rank`` (cached; read-only arrays)."""
        cached = self._padded.get(rank)
        if cached is None:
            a = np.zeros((self.lora_a.shape[0], rank), dtype=np.float32)
            b = np.zeros((rank, self.lora_b.shape[1]), dtype=np.float32)
            a[:, : self.rank] = self.lora_a
            b[: self.rank] = self.lora_b
            a.flags.writeable = False
            b.flags.writeable = False
            cached = self._padded.setdefault(rank, (a, b))
        return cached


def make_adapter(
    lora_a: Array, lora_b: Array, *, hidden: int, vocab: int, max_rank: int
) -> Adapter:
    """Validate two matrices and return an :class:`Adapter` holding float32 copies.

    Raises:
        ModelError: a wrong dtype, shape or rank, or a non-finite value; the message names it.
    """
    for name, arr in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 2:
            raise ModelError(f"adapter: {name} must be a 2-D float32 array")
    rank = lora_a.shape[1]
    if not 1 <= rank <= max_rank:
        raise ModelError(f"adapter: rank {rank} is outside 1..{max_rank}")
    if lora_a.shape != (hidden, rank):
        raise ModelError(f"adapter: lora_a has shape {lora_a.shape}, expected ({hidden}, {rank})")
    if lora_b.shape != (rank, vocab):
        raise ModelError(f"adapter: lora_b has shape {lora_b.shape}, expected ({rank}, {vocab})")
    for name, arr in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not np.isfinite(arr).all():
            raise ModelError(f"adapter: {name} has non-finite values")
    a, b = np.array(lora_a, dtype=np.float32), np.array(lora_b, dtype=np.float32)
    a.flags.writeable = False
    b.flags.writeable = False
    return Adapter(lora_a=a, lora_b=b)


def load_adapter(path: Path, *, hidden: int, vocab: int, max_rank: int) -> Adapter:
    """Read and validate an ``adapter.npz``.

    Raises:
        ModelError: the file is missing, too large (packed or unpacked), not an ``.npz``
            of exactly ``lora_a`` and ``lora_b``, or fails :func:`make_adapter`'s checks.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelError(f"adapter {path}: cannot read ({e.strerror})") from e
    if size > MAX_ADAPTER_BYTES:
        raise ModelError(f"adapter {path}: {size} bytes (limit {MAX_ADAPTER_BYTES})")
    try:
        with zipfile.ZipFile(path) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
        if unpacked > MAX_ADAPTER_BYTES:
            raise ModelError(
                f"adapter {path}: unpacks to {unpacked} bytes (limit {MAX_ADAPTER_BYTES})"
            )
        with np.load(path, allow_pickle=False) as npz:
            names = sorted(npz.files)
            if names != ["lora_a", "lora_b"]:
                raise ModelError(f"adapter {path}: holds {names}, expected ['lora_a', 'lora_b']")
            lora_a, lora_b = npz["lora_a"], npz["lora_b"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ModelError(f"adapter {path}: not a valid .npz file ({e})") from e
    return make_adapter(lora_a, lora_b, hidden=hidden, vocab=vocab, max_rank=max_rank)


def save_adapter(path: Path, adapter: Adapter) -> None:
    """Write ``adapter`` as an ``adapter.npz`` (uncompressed)."""
    with open(path, "wb") as f:
        np.savez(f, lora_a=adapter.lora_a, lora_b=adapter.lora_b)
