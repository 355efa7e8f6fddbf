"""Build the ONNX graph of a Llama model from GGUF blocks (the exact port).

The graph is the contract with the device runtime (``agent/runtime``); keep these names:

- inputs: ``input_ids`` int64 ``[batch, seq]``; ``attention_mask`` int64
  ``[batch, total_seq]``; per layer ``L``, ``past_key_values.L.key`` / ``.value`` float32
  ``[batch, kv_heads, past_seq, head_dim]``; ``lora_a`` float32 ``[hidden, R]`` and
  ``lora_b`` float32 ``[R, vocab]``, graph inputs with zero defaults (initializers that are
  also inputs) so a run may override them.
- ``logits_start`` int64 ``[1]`` (default 0): logits are computed for positions from it on;
  a negative value counts from the end (a prefill asks for ``-1``: the last position only).
- outputs: ``logits`` ``[batch, logits_seq, vocab]`` = ``lm_head(h) + (h @ lora_a) @ lora_b``
  over the selected positions;
  ``hidden_states`` ``[batch, seq, hidden]`` (``h``: after the final RMSNorm, the LM head's
  input); ``present.L.key`` / ``.value``.

``GroupQueryAttention`` derives positions from the mask: ``seqlens_k`` is the mask's row
sum minus one and ``total_sequence_length`` its width. When a run binds the same buffer to
``past_key_values.L.*`` and ``present.L.*`` (length = the buffer's capacity), the operator
appends to it in place; the runtime relies on that.

Weights are written once to an external data file beside ``model.onnx``; the tied
embedding and the LM head reference the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from coordinator.models.gguf_source import LlamaSource
from coordinator.models.weights import (
    BLOCK,
    Packed4,
    concat4,
    pack_q4_1,
    pack_q8_0,
    rotary_caches,
    unpermute_rows,
)

Array = np.ndarray[Any, Any]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 21
MS_DOMAIN = "com.microsoft"
_ALIGN = 64  # bytes: external weights start on cache-line boundaries
_INLINE_LIMIT = 4096  # bytes: smaller initializers stay inside model.onnx
_INT64_MAX = 2**63 - 1
#: The hidden states the LM head reads: positions from the ``logits_start`` input on.
_SELECTED = "logits/hidden"


@dataclass(frozen=True)
class GraphOptions:
    """Knobs of the graph; the defaults are what ships.

    ``accuracy_level`` (4-bit projections) and ``lm_head_accuracy_level`` (the 8-bit LM
    head): 4 lets ``MatMulNBits`` quantize activations to int8 per 32-value block (the
    fast CPU path); 0 computes in float32 (exact, slower). ``None`` for the LM head means
    "same as the projections".

    ``exact``: projections whose name contains one of these strings compute in float32.
    ``rescore_top_k``: after the (int8-activation) LM head, recompute the ``k`` largest
    logits of the last position exactly in float32 (the dequantized embedding rows times
    the hidden state), so the next token is chosen at full precision for the cost of a
    top-k and ``k`` dot products; 0 turns it off.
    """

    accuracy_level: int = 4
    lm_head_accuracy_level: int | None = None
    adapter_rank: int = 8
    #: Measured on SmolLM2 (docs/model.md): float32 activations in these projections lift
    #: top-1 agreement with the float32 reference from 0.96 to 0.98; gate/up (the largest)
    #: and o keep the int8 path.
    exact: tuple[str, ...] = ("attn.qkv", "mlp.down")
    rescore_top_k: int = 8


DEFAULT_OPTIONS = GraphOptions()


class _Weights:
    """Appends initializers to the external data file and remembers where each went."""

    def __init__(self, out: BinaryIO, location: str) -> None:
        self._out = out
        self._location = location
        self._offset = 0
        self.initializers: list[TensorProto] = []

    def _write(self, data: bytes | memoryview) -> tuple[int, int]:
        pad = -self._offset % _ALIGN
        if pad:
            self._out.write(b"\0" * pad)
            self._offset += pad
        start = self._offset
        self._out.write(data)
        self._offset += len(data)
        return start, len(data)

    def _external(self, name: str, dtype: int, dims: list[int], where: tuple[int, int]) -> None:
        t = TensorProto()
        t.name = name
        t.data_type = dtype
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self._location),
            ("offset", str(where[0])),
            ("length", str(where[1])),
        ):
            entry = t.external_data.add()
            entry.key = key
            entry.value = value
        self.initializers.append(t)

    def add(self, name: str, array: Array) -> str:
        array = np.ascontiguousarray(array)
        dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
        if array.nbytes < _INLINE_LIMIT:
            self.initializers.append(
                helper.make_tensor(name, dtype, array.shape, array.tobytes(), raw=True)
            )
        else:
            self._external(name, dtype, list(array.shape), self._write(array.data.cast("B")))
        return name

    def add_views(self, array: Array, views: list[tuple[str, list[int]]]) -> None:
        """Write ``array`` once and declare one initializer per ``(name, shape)`` over it."""
        array = np.ascontiguousarray(array)
        dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
        where = self._write(array.data.cast("B"))
        for name, dims in views:
            if int(np.prod(dims)) != array.size:
                raise ValueError(f"view {name} {dims} does not cover {array.shape}")
            self._external(name, dtype, dims, where)


class _Graph:
    """Accumulates nodes with unique output names."""

    def __init__(self, weights: _Weights, options: GraphOptions) -> None:
        self.w = weights
        self.options = options
        self.nodes: list[onnx.NodeProto] = []
        self._consts: dict[tuple[str, bytes], str] = {}

    def node(
        self,
        op: str,
        inputs: list[str],
        outputs: list[str],
        *,
        name: str,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const_i64_scalar(self, value: int) -> str:
        arr = np.asarray(value, dtype=np.int64)
        key = ("i64s", arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.w.add(f"const_i64s_{len(self._consts)}", arr)
        return self._consts[key]

    def const_i64(self, values: list[int]) -> str:
        arr = np.asarray(values, dtype=np.int64)
        key = ("i64", arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.w.add(f"const_i64_{len(self._consts)}", arr)
        return self._consts[key]

    def matmul4(self, x: str, p: Packed4, k: int, name: str) -> str:
        """``x @ W.T`` for a Q4_1 weight: symmetric 4-bit product plus the offset term."""
        n = p.blob.shape[0]
        blob = self.w.add(f"{name}.qweight", p.blob)
        scales = self.w.add(f"{name}.scales", p.scales)
        offsets = self.w.add(f"{name}.offsets", p.offsets)
        (prod,) = self.node(
            "MatMulNBits",
            [x, blob, scales],
            [f"{name}/prod"],
            name=f"{name}/MatMulNBits",
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=BLOCK,
            accuracy_level=0
            if any(e in name for e in self.options.exact)
            else self.options.accuracy_level,
        )
        shape = self.const_i64([0, 0, k // BLOCK, BLOCK])
        (blocks,) = self.node("Reshape", [x, shape], [f"{name}/blocks"], name=f"{name}/Reshape")
        axes = self.const_i64([-1])
        (sums,) = self.node(
            "ReduceSum", [blocks, axes], [f"{name}/blocksum"], name=f"{name}/ReduceSum", keepdims=0
        )
        (offset,) = self.node("MatMul", [sums, offsets], [f"{name}/offset"], name=f"{name}/MatMul")
        (out,) = self.node("Add", [prod, offset], [f"{name}/out"], name=f"{name}/Add")
        return out


def _rescore_top_k(g: _Graph, approx: str, out: str, k: int) -> None:
    """``out`` = ``approx`` with the ``k`` largest logits of the last position recomputed
    exactly: the tied embedding's rows for those ids (dequantized, float32) times the last
    hidden state. Only the last position picks the next token; rescoring every position
    would cost a top-k over the whole prefill."""
    (last_logits,) = g.node(
        "Slice",
        [approx, g.const_i64([-1]), g.const_i64([_INT64_MAX]), g.const_i64([1])],
        ["rescore/last_logits"],
        name="rescore/SliceLogits",
    )
    (last_h,) = g.node(
        "Slice",
        [_SELECTED, g.const_i64([-1]), g.const_i64([_INT64_MAX]), g.const_i64([1])],
        ["rescore/last_h"],
        name="rescore/SliceHidden",
    )
    (_, ids) = g.node(
        "TopK",
        [last_logits, g.const_i64([k])],
        ["rescore/values", "rescore/ids"],
        name="rescore/TopK",
        axis=-1,
    )
    (rows,) = g.node(
        "GatherBlockQuantized",
        ["embed.qweight", ids, "embed.scales"],
        ["rescore/rows"],
        name="rescore/GatherBlockQuantized",
        domain=MS_DOMAIN,
        bits=8,
        block_size=BLOCK,
        gather_axis=0,
        quantize_axis=1,
    )
    (column,) = g.node(
        "Unsqueeze", [last_h, g.const_i64([-1])], ["rescore/h"], name="rescore/Unsqueeze"
    )
    (dots,) = g.node("MatMul", [rows, column], ["rescore/dots"], name="rescore/MatMul")
    (exact,) = g.node(
        "Squeeze", [dots, g.const_i64([-1])], ["rescore/exact"], name="rescore/Squeeze"
    )
    (fixed,) = g.node(
        "ScatterElements",
        [last_logits, ids, exact],
        ["rescore/fixed"],
        name="rescore/ScatterElements",
        axis=-1,
    )
    # Write the fixed row back at [b, seq - 1] for every batch row b (ScatterND).
    (shape,) = g.node("Shape", [approx], ["rescore/shape"], name="rescore/Shape")
    (batch,) = g.node(
        "Slice",
        [shape, g.const_i64([0]), g.const_i64([1]), g.const_i64([0])],
        ["rescore/batch"],
        name="rescore/SliceBatch",
    )
    (seq,) = g.node(
        "Slice",
        [shape, g.const_i64([1]), g.const_i64([2]), g.const_i64([0])],
        ["rescore/seq"],
        name="rescore/SliceSeq",
    )
    (last_pos,) = g.node("Sub", [seq, g.const_i64([1])], ["rescore/last_pos"], name="rescore/Sub")
    (rows_b,) = g.node(
        "Range",
        [
            g.const_i64_scalar(0),
            g.node("Squeeze", [batch], ["rescore/b"], name="rescore/B")[0],
            g.const_i64_scalar(1),
        ],
        ["rescore/range"],
        name="rescore/Range",
    )
    (col_b,) = g.node(
        "Unsqueeze", [rows_b, g.const_i64([-1])], ["rescore/col_b"], name="rescore/ColB"
    )
    (col_s,) = g.node(
        "Expand",
        [last_pos, g.node("Shape", [col_b], ["rescore/col_shape"], name="rescore/ColShape")[0]],
        ["rescore/col_s"],
        name="rescore/ColS",
    )
    (index,) = g.node("Concat", [col_b, col_s], ["rescore/index"], name="rescore/Index", axis=1)
    (update,) = g.node(
        "Squeeze", [fixed, g.const_i64([1])], ["rescore/update"], name="rescore/Update"
    )
    g.node("ScatterND", [approx, index, update], [out], name="rescore/ScatterND")


def _layer(g: _Graph, src: LlamaSource, i: int, x: str) -> tuple[str, str, str]:
    """One decoder layer from its normalized input ``x``; returns (ffn_out, present k, v)."""
    cfg = src.config
    h, f = cfg.hidden_size, cfg.intermediate_size
    t = src.tensors
    p = f"blk.{i}."

    def packed(name: str, heads: int = 0) -> Packed4:
        st = t[p + name]
        raw = unpermute_rows(st.data, heads) if heads else st.data
        return pack_q4_1(raw, st.rows, st.cols)

    qkv_w = concat4(
        [
            packed("attn_q.weight", cfg.num_heads),
            packed("attn_k.weight", cfg.num_kv_heads),
            packed("attn_v.weight"),
        ]
    )
    qkv = g.matmul4(x, qkv_w, h, f"layers.{i}.attn.qkv")
    attn, present_k, present_v = g.node(
        "GroupQueryAttention",
        [
            qkv,
            "",
            "",
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            "seqlens_k",
            "total_sequence_length",
            "cos_cache",
            "sin_cache",
        ],
        [f"layers.{i}.attn/out", f"present.{i}.key", f"present.{i}.value"],
        name=f"layers.{i}.attn/GroupQueryAttention",
        domain=MS_DOMAIN,
        num_heads=cfg.num_heads,
        kv_num_heads=cfg.num_kv_heads,
        scale=float(1.0 / np.sqrt(cfg.head_dim)),
        do_rotary=1,
        rotary_interleaved=0,
    )
    o = g.matmul4(attn, packed("attn_output.weight"), h, f"layers.{i}.attn.o_proj")
    ffn_norm = g.w.add(f"layers.{i}.ffn_norm", t[p + "ffn_norm.weight"].data)
    normed, _, _, resid = g.node(
        "SkipSimplifiedLayerNormalization",
        [o, f"layers.{i}/residual_in", ffn_norm],
        [f"layers.{i}.ffn_norm/out", "", "", f"layers.{i}/residual_mid"],
        name=f"layers.{i}.ffn_norm/SkipSimplifiedLayerNormalization",
        domain=MS_DOMAIN,
        epsilon=cfg.rms_eps,
    )
    gate_up = g.matmul4(
        normed,
        concat4([packed("ffn_gate.weight"), packed("ffn_up.weight")]),
        h,
        f"layers.{i}.mlp.gate_up",
    )
    split = g.const_i64([f, f])
    gate, up = g.node(
        "Split",
        [gate_up, split],
        [f"layers.{i}.mlp/gate", f"layers.{i}.mlp/up"],
        name=f"layers.{i}.mlp/Split",
        axis=-1,
    )
    (sig,) = g.node("Sigmoid", [gate], [f"layers.{i}.mlp/sigmoid"], name=f"layers.{i}.mlp/Sigmoid")
    (silu,) = g.node("Mul", [gate, sig], [f"layers.{i}.mlp/silu"], name=f"layers.{i}.mlp/SiLU")
    (act,) = g.node("Mul", [silu, up], [f"layers.{i}.mlp/act"], name=f"layers.{i}.mlp/Mul")
    down = g.matmul4(act, packed("ffn_down.weight"), f, f"layers.{i}.mlp.down")
    del present_k, present_v
    return down, resid, attn


def _io(cfg: Any, rank: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_shape = ["batch", cfg.num_kv_heads, "past_seq", cfg.head_dim]
    present_shape = ["batch", cfg.num_kv_heads, "present_seq", cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_seq"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f32, ["batch", "logits_seq", cfg.vocab_size]),
        helper.make_tensor_value_info("hidden_states", f32, ["batch", "seq", cfg.hidden_size]),
    ]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_shape)
            )
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present_shape))
    inputs.append(helper.make_tensor_value_info("logits_start", i64, [1]))
    inputs.append(helper.make_tensor_value_info("lora_a", f32, [cfg.hidden_size, rank]))
    inputs.append(helper.make_tensor_value_info("lora_b", f32, [rank, cfg.vocab_size]))
    return inputs, outputs


def build_graph(
    src: LlamaSource,
    out_dir: Path,
    options: GraphOptions = DEFAULT_OPTIONS,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``model.onnx`` and its external data file for ``src`` into ``out_dir``.

    ``progress(done, total)`` is called after each layer. Returns the model path. The
    directory must exist; existing files of the same names are overwritten.
    """
    cfg = src.config
    if options.adapter_rank < 1:
        raise ValueError(f"adapter_rank must be >= 1, got {options.adapter_rank}")
    total = cfg.num_layers + 2
    with open(out_dir / DATA_FILE, "wb") as data_file:
        w = _Weights(data_file, DATA_FILE)
        g = _Graph(w, options)

        # Attention bookkeeping shared by every layer.
        axis1 = g.const_i64([1])
        g.node(
            "ReduceSum", ["attention_mask", axis1], ["mask/sum"], name="mask/ReduceSum", keepdims=0
        )
        one = g.const_i64([1])
        g.node("Sub", ["mask/sum", one], ["mask/seqlens_i64"], name="mask/Sub")
        g.node(
            "Cast",
            ["mask/seqlens_i64"],
            ["seqlens_k"],
            name="mask/CastSeqlens",
            to=TensorProto.INT32,
        )
        g.node("Shape", ["attention_mask"], ["mask/shape"], name="mask/Shape")
        idx = w.add("const_scalar_1", np.asarray(1, dtype=np.int64))
        g.node("Gather", ["mask/shape", idx], ["mask/total_i64"], name="mask/Gather", axis=0)
        g.node(
            "Cast",
            ["mask/total_i64"],
            ["total_sequence_length"],
            name="mask/CastTotal",
            to=TensorProto.INT32,
        )
        cos, sin = rotary_caches(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        w.add("cos_cache", cos)
        w.add("sin_cache", sin)

        # Tied embedding: one copy of the Q8_0 bytes serves the lookup and the LM head.
        emb = src.tensors["token_embd.weight"]
        q8 = pack_q8_0(emb.data, emb.rows, emb.cols)
        nb = cfg.hidden_size // BLOCK
        w.add_views(
            q8.data,
            [
                ("embed.qweight", [cfg.vocab_size, cfg.hidden_size]),
                ("lm_head.qweight", [cfg.vocab_size, nb, BLOCK]),
            ],
        )
        w.add_views(
            q8.scales,
            [("embed.scales", [cfg.vocab_size, nb]), ("lm_head.scales", [cfg.vocab_size * nb])],
        )
        g.node(
            "GatherBlockQuantized",
            ["embed.qweight", "input_ids", "embed.scales"],
            ["layers.0/residual_in"],
            name="embed/GatherBlockQuantized",
            domain=MS_DOMAIN,
            bits=8,
            block_size=BLOCK,
            gather_axis=0,
            quantize_axis=1,
        )
        if progress:
            progress(1, total)

        norm0 = w.add("layers.0.attn_norm", src.tensors["blk.0.attn_norm.weight"].data)
        g.node(
            "SimplifiedLayerNormalization",
            ["layers.0/residual_in", norm0],
            ["layers.0.attn_norm/out"],
            name="layers.0.attn_norm/SimplifiedLayerNormalization",
            epsilon=cfg.rms_eps,
            axis=-1,
            stash_type=1,
        )
        x = "layers.0.attn_norm/out"
        for i in range(cfg.num_layers):
            down, resid, _ = _layer(g, src, i, x)
            last = i == cfg.num_layers - 1
            norm_name = "output_norm.weight" if last else f"blk.{i + 1}.attn_norm.weight"
            gamma = w.add(
                "final_norm" if last else f"layers.{i + 1}.attn_norm", src.tensors[norm_name].data
            )
            x = "hidden_states" if last else f"layers.{i + 1}.attn_norm/out"
            g.node(
                "SkipSimplifiedLayerNormalization",
                [down, resid, gamma],
                [x, "", "", "" if last else f"layers.{i + 1}/residual_in"],
                name=("final_norm" if last else f"layers.{i + 1}.attn_norm")
                + "/SkipSimplifiedLayerNormalization",
                domain=MS_DOMAIN,
                epsilon=cfg.rms_eps,
            )
            if progress:
                progress(i + 2, total)

        head = "lm_head/logits" if options.rescore_top_k == 0 else "lm_head/approx"
        # Logits only from position ``logits_start`` on (default 0: all of them); a prefill
        # asks for the last one alone and skips the LM head for the rest of the prompt.
        w.add("logits_start", np.zeros(1, dtype=np.int64))
        g.node(
            "Slice",
            ["hidden_states", "logits_start", g.const_i64([_INT64_MAX]), g.const_i64([1])],
            [_SELECTED],
            name="logits/Select",
        )
        g.node(
            "MatMulNBits",
            [_SELECTED, "lm_head.qweight", "lm_head.scales"],
            [head],
            name="lm_head/MatMulNBits",
            domain=MS_DOMAIN,
            K=cfg.hidden_size,
            N=cfg.vocab_size,
            bits=8,
            block_size=BLOCK,
            accuracy_level=options.accuracy_level
            if options.lm_head_accuracy_level is None
            else options.lm_head_accuracy_level,
        )
        if options.rescore_top_k:
            _rescore_top_k(g, head, "lm_head/logits", options.rescore_top_k)
        rank = options.adapter_rank
        w.add("lora_a", np.zeros((cfg.hidden_size, rank), dtype=np.float32))
        w.add("lora_b", np.zeros((rank, cfg.vocab_size), dtype=np.float32))
        g.node("MatMul", [_SELECTED, "lora_a"], ["lora/down"], name="lora/MatMulA")
        g.node("MatMul", ["lora/down", "lora_b"], ["lora/delta"], name="lora/MatMulB")
        g.node("Add", ["lm_head/logits", "lora/delta"], ["logits"], name="lora/Add")
        data_file.flush()
        os.fsync(data_file.fileno())

    inputs, outputs = _io(cfg, rank)
    graph = helper.make_graph(g.nodes, "llama", inputs, outputs, initializer=w.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="nanofleet",
    )
    model.ir_version = 10
    path = out_dir / MODEL_FILE
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    if progress:
        progress(total, total)
    return path
