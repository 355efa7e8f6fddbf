"""Repack GGUF blocks into the layouts of ONNX Runtime's block-quantized operators. Pure.

Nothing here rounds a weight: every value the graph computes with is the value the GGUF
file stores.

- ``Q4_1`` stores ``w = d*q + m`` per 32-value block (``q`` in 0..15, ``d`` and ``m``
  float16). Written as ``w = d*(q - 8) + (8d + m)``, it is a symmetric 4-bit
  ``MatMulNBits`` weight (default zero point 8) plus a per-block offset ``8d + m`` that the
  graph applies as ``blocksum(x) @ offsets`` (``x`` summed over each 32-wide block).
- ``Q8_0`` stores ``w = d*q`` (``q`` int8). ``GatherBlockQuantized`` and an 8-bit
  ``MatMulNBits`` read unsigned bytes with zero point 128, so ``q + 128`` is stored.
- GGUF keeps the rows of the query and key projections permuted for llama.cpp's rotary
  embedding on adjacent pairs; :func:`unpermute_rows` restores the "rotate half" order
  that ``GroupQueryAttention`` (``rotary_interleaved=0``) expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK = 32

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Packed4:
    """A ``MatMulNBits`` (bits 4, block 32) weight plus the Q4_1 offset term."""

    blob: Array  # uint8 [N, K/32, 16]
    scales: Array  # float32 [N * K/32]
    offsets: Array  # float32 [K/32, N]: 8d + m, multiplied by the block sums of the input


@dataclass(frozen=True)
class Packed8:
    """A Q8_0 matrix as unsigned bytes (zero point 128) and one scale per block."""

    data: Array  # uint8 [N, K]
    scales: Array  # float32 [N, K/32]


def pack_q4_1(raw: Array, rows: int, cols: int) -> Packed4:
    """Repack raw Q4_1 rows (``uint8 [rows, cols/32*20]``) for ``MatMulNBits``."""
    nb = cols // BLOCK
    blocks = raw.reshape(rows, nb, 20)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    # GGUF: byte j holds value j (low nibble) and value j + 16 (high nibble).
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    # MatMulNBits: byte j holds value 2j (low nibble) and value 2j + 1 (high nibble).
    blob = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return Packed4(
        blob=np.ascontiguousarray(blob),
        scales=np.ascontiguousarray(d.reshape(-1)),
        offsets=np.ascontiguousarray((np.float32(8.0) * d + m).T),
    )


def pack_q8_0(raw: Array, rows: int, cols: int) -> Packed8:
    """Repack raw Q8_0 rows (``uint8 [rows, cols/32*34]``) as unsigned bytes and scales."""
    nb = cols // BLOCK
    blocks = raw.reshape(rows, nb, 34)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    data = (q.astype(np.int16) + 128).astype(np.uint8).reshape(rows, cols)
    return Packed8(data=data, scales=np.ascontiguousarray(d))


def concat4(parts: list[Packed4]) -> Packed4:
    """Stack several weights with the same input along the output dimension (fused QKV)."""
    return Packed4(
        blob=np.concatenate([p.blob for p in parts], axis=0),
        scales=np.concatenate([p.scales for p in parts], axis=0),
        offsets=np.concatenate([p.offsets for p in parts], axis=1),
    )


def unpermute_rows(raw: Array, n_heads: int) -> Array:
    """Undo the GGUF converter's per-head row permutation of a query or key projection."""
    rows = raw.shape[0]
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        raw.reshape(n_heads, half, 2, *raw.shape[1:]).swapaxes(1, 2).reshape(raw.shape)
    )


def permute_rows(w: Array, n_heads: int) -> Array:
    """The GGUF converter's permutation (inverse of :func:`unpermute_rows`), for tiny models."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def rotary_caches(head_dim: int, positions: int, theta: float) -> tuple[Array, Array]:
    """Cos and sin caches ``[positions, head_dim / 2]`` for "rotate half" rotary embedding."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
