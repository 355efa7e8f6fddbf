"""Tiny Llama models for tests: NumPy weights and a small tokenizer, written as a real GGUF.

A tiny model goes through exactly the code path of the real one: its weights are quantized
to the same GGUF block types (Q4_1 projections, Q8_0 tied embedding, F32 norms), the query
and key rows are permuted the way the GGUF converter permutes them, the tokenizer is stored
as GGUF metadata, and the GGUF is then built by :func:`coordinator.models.build.build_gguf`.
Building one takes well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from coordinator.models.build import BuildResult, build_gguf
from coordinator.models.gguf_source import LlamaConfig
from coordinator.models.graph import DEFAULT_OPTIONS, GraphOptions
from coordinator.models.tokenizer import TOKEN_CONTROL
from coordinator.models.weights import permute_rows

Array = np.ndarray[Any, Any]

TINY_CONFIG = LlamaConfig(
    vocab_size=0,  # set by the tokenizer
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=10000.0,
    rms_eps=1e-5,
    context_length=256,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "Give me three tips for staying healthy. Drink water, sleep well, and walk every day. "
    "The quick brown fox jumps over the lazy dog. Über café naïve — 東京 🙂 12345 "
    "the model, the fleet, the device; hello world, hello there."
)


@dataclass(frozen=True)
class TinyTokenizer:
    """A small byte-level BPE vocabulary in GGUF form (tokens by id, merges, types)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]


def train_tiny_tokenizer(vocab_size: int = 384, corpus: str = _CORPUS) -> TinyTokenizer:
    """Train a byte-level BPE of about ``vocab_size`` tokens (ids 0-2 are control tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges_raw = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges_raw]
    types = [TOKEN_CONTROL if t in SPECIAL_TOKENS else 1 for t in tokens]
    return TinyTokenizer(tokens=tokens, token_types=types, merges=merges)


def random_weights(config: LlamaConfig, seed: int = 0) -> dict[str, Array]:
    """Float32 weights keyed by GGUF tensor name, ``[out, in]``, query/key rows in
    "rotate half" order (as in a Hugging Face checkpoint). Scaled so that logits vary."""
    rng = np.random.default_rng(seed)
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_kv_heads * config.head_dim

    def mat(rows: int, cols: int) -> Array:
        out: Array = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        return out

    def norm() -> Array:
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    w: dict[str, Array] = {
        "token_embd.weight": (0.15 * rng.standard_normal((config.vocab_size, h))).astype(
            np.float32
        ),
        "output_norm.weight": norm(),
    }
    for i in range(config.num_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm()
        w[p + "ffn_norm.weight"] = norm()
        w[p + "attn_q.weight"] = mat(h, h) * 2.0
        w[p + "attn_k.weight"] = mat(kv, h) * 2.0
        w[p + "attn_v.weight"] = mat(kv, h)
        w[p + "attn_output.weight"] = mat(h, h)
        w[p + "ffn_gate.weight"] = mat(f, h)
        w[p + "ffn_up.weight"] = mat(f, h)
        w[p + "ffn_down.weight"] = mat(h, f)
    return w


def write_gguf(
    path: Path,
    config: LlamaConfig,
    weights: dict[str, Array],
    tokenizer: TinyTokenizer,
    chat_template: str = CHATML_TEMPLATE,
) -> None:
    """Write a Llama GGUF the way llama.cpp's converter lays out a Q4_1 model."""
    w = GGUFWriter(path, "llama")
    w.add_name("nanofleet tiny test model")
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_eps)
    w.add_rope_dimension_count(config.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokenizer.tokens)
    w.add_token_types(tokenizer.token_types)
    w.add_token_merges(tokenizer.merges)
    w.add_bos_token_id(tokenizer.tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokenizer.tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    for name, arr in weights.items():
        if arr.ndim == 1:
            w.add_tensor(name, arr.astype(np.float32))
            continue
        if name.endswith("attn_q.weight"):
            arr = permute_rows(arr, config.num_heads)
        elif name.endswith("attn_k.weight"):
            arr = permute_rows(arr, config.num_kv_heads)
        qtype = (
            GGMLQuantizationType.Q8_0 if name == "token_embd.weight" else GGMLQuantizationType.Q4_1
        )
        w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_tiny_model(
    work_dir: Path,
    *,
    seed: int = 0,
    options: GraphOptions = DEFAULT_OPTIONS,
    config: LlamaConfig = TINY_CONFIG,
) -> tuple[Path, BuildResult]:
    """Write ``work_dir/tiny.gguf`` and build it into ``work_dir/model``.

    Returns the GGUF path (the reference reads it) and the build result.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer()
    config = replace(config, vocab_size=len(tokenizer.tokens))
    gguf_path = work_dir / "tiny.gguf"
    write_gguf(gguf_path, config, random_weights(config, seed), tokenizer)
    result = build_gguf(gguf_path, work_dir / "model", name="tiny-llama", options=options)
    return gguf_path, result
