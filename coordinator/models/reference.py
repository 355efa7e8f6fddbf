"""A NumPy Llama forward pass straight from a GGUF file: the oracle the tests trust.

It shares no weight code with the builder on purpose: weights are dequantized by the
``gguf`` package's own dequantizer, kept in the GGUF's row order, and the rotary embedding
rotates adjacent pairs as llama.cpp does for that order. If the builder's repacking,
un-permutation or graph wiring were wrong, the two would disagree.

Computation is float32 with float64 accumulations where it is cheap (norms, softmax).
Memory: the dequantized weights (about 4 bytes per parameter, ~0.6 GB for SmolLM2-135M).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from coordinator.models.gguf_source import LlamaConfig, read_gguf

Array = np.ndarray[Any, Any]


@dataclass
class KVCache:
    """Keys and values per layer, ``[kv_heads, seq, head_dim]`` (grown by each call)."""

    keys: list[Array] = field(default_factory=list)
    values: list[Array] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[1])


@dataclass(frozen=True)
class RefOutput:
    logits: Array  # float32 [seq, vocab]
    hidden_states: Array  # float32 [seq, hidden]


class ReferenceModel:
    """The Llama forward pass over dequantized GGUF weights."""

    def __init__(self, gguf_path: Path) -> None:
        src = read_gguf(gguf_path)  # validates shapes and types
        self.config: LlamaConfig = src.config
        reader = GGUFReader(gguf_path, "r")
        self.w: dict[str, Array] = {}
        for t in reader.tensors:
            data = dequantize(t.data, t.tensor_type).astype(np.float32)
            rows = int(t.shape[1]) if len(t.shape) > 1 else 1
            self.w[t.name] = data.reshape(rows, -1) if rows > 1 else data.reshape(-1)
        hd = self.config.head_dim
        self._inv_freq = 1.0 / (
            self.config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        )

    def _norm(self, x: Array, weight: Array) -> Array:
        x64 = x.astype(np.float64)
        scale = 1.0 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + self.config.rms_eps)
        out: Array = (x64 * scale * weight).astype(np.float32)
        return out

    def _rope(self, x: Array, positions: Array) -> Array:
        """Rotate adjacent pairs (x[2i], x[2i+1]) of ``x`` ``[heads, seq, head_dim]``."""
        angles = positions[:, None].astype(np.float64) * self._inv_freq[None, :]
        cos, sin = np.cos(angles), np.sin(angles)
        even, odd = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
        out = np.empty(x.shape, dtype=np.float64)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out.astype(np.float32)

    def forward(
        self,
        ids: list[int] | Array,
        cache: KVCache | None = None,
        lora: tuple[Array, Array] | None = None,
    ) -> RefOutput:
        """Logits and final hidden states for ``ids`` after what ``cache`` holds.

        ``cache`` (if given) is extended in place. ``lora`` is ``(lora_a, lora_b)``:
        ``logits += (h @ lora_a) @ lora_b``.
        """
        cfg = self.config
        ids = np.asarray(ids, dtype=np.int64)
        cache = cache if cache is not None else KVCache()
        past = cache.length
        seq = ids.size
        positions = np.arange(past, past + seq)
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = self.w["token_embd.weight"][ids]
        causal = np.triu(np.full((seq, past + seq), -np.inf), k=past + 1)
        for i in range(cfg.num_layers):
            p = f"blk.{i}."
            h = self._norm(x, self.w[p + "attn_norm.weight"])
            q = (h @ self.w[p + "attn_q.weight"].T).reshape(seq, nh, hd).transpose(1, 0, 2)
            k = (h @ self.w[p + "attn_k.weight"].T).reshape(seq, nkv, hd).transpose(1, 0, 2)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(seq, nkv, hd).transpose(1, 0, 2)
            q, k = self._rope(q, positions), self._rope(k, positions)
            if len(cache.keys) > i:
                cache.keys[i] = np.concatenate([cache.keys[i], k], axis=1)
                cache.values[i] = np.concatenate([cache.values[i], v], axis=1)
            else:
                cache.keys.append(k)
                cache.values.append(v)
            keys = np.repeat(cache.keys[i], nh // nkv, axis=0)
            values = np.repeat(cache.values[i], nh // nkv, axis=0)
            scores = (q.astype(np.float64) @ keys.transpose(0, 2, 1)) / np.sqrt(hd) + causal
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            attn = (probs @ values).astype(np.float32).transpose(1, 0, 2).reshape(seq, nh * hd)
            x = x + attn @ self.w[p + "attn_output.weight"].T
            h = self._norm(x, self.w[p + "ffn_norm.weight"])
            gate = h @ self.w[p + "ffn_gate.weight"].T
            up = h @ self.w[p + "ffn_up.weight"].T
            act = gate * (0.5 * (1.0 + np.tanh(0.5 * gate))) * up
            x = x + act @ self.w[p + "ffn_down.weight"].T
        hidden = self._norm(x, self.w["output_norm.weight"])
        logits = hidden @ self.w["token_embd.weight"].T
        if lora is not None:
            logits = logits + (hidden @ lora[0]) @ lora[1]
        return RefOutput(logits=logits.astype(np.float32), hidden_states=hidden)

    def greedy(self, ids: list[int], n: int, eos: set[int] | None = None) -> list[int]:
        """``n`` greedy tokens after ``ids`` (fewer if an ``eos`` id comes first)."""
        cache = KVCache()
        out = self.forward(ids, cache)
        tokens: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(out.logits[-1]))
            tokens.append(tok)
            if eos and tok in eos:
                break
            out = self.forward([tok], cache)
        return tokens
