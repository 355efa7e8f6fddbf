"""The frozen LM head of a model directory, dequantized for the trainer.

The trainer needs ``W`` [vocab, hidden] float32, the matrix the graph's ``lm_head``
``MatMulNBits`` multiplies by. The builder stores it as the tied Q8_0 embedding in the
external data file: ``lm_head.qweight`` uint8 ``[vocab, hidden/32, 32]`` (signed values
shifted by 128) and ``lm_head.scales`` float32 ``[vocab * hidden/32]``, so
``W[v, 32*b + i] = (qweight[v, b, i] - 128) * scales[v*nb + b]``.

The device has no ``onnx`` package (only onnxruntime, which does not hand out
initializers), so the few fields needed are read from ``model.onnx`` with a minimal
protobuf wire-format reader: ModelProto.graph (7) -> GraphProto.initializer (5) ->
TensorProto name (8), dims (1), data_type (2), external_data (13: key 1, value 2).

Invariants: reads are bounded by the model file's size; offsets and lengths are checked
against the data file before it is read; the result is finite and ``[vocab, hidden]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError

__all__ = ["read_lm_head"]

Array = np.ndarray[Any, Any]

_QWEIGHT = "lm_head.qweight"
_SCALES = "lm_head.scales"
_UINT8 = 2  # TensorProto.DataType
_FLOAT = 1
_BLOCK = 32
_MAX_MODEL_PROTO = 64 << 20  # bytes of model.onnx (weights live in the data file)


@dataclass
class _Tensor:
    name: str = ""
    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    external: dict[str, str] = field(default_factory=dict)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ModelError("model.onnx: truncated or malformed protobuf varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of one message: ints for varints, bytes otherwise."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ModelError("model.onnx: a protobuf field runs past the end")
            out.append((number, buf[pos : pos + length]))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ModelError(f"model.onnx: unsupported protobuf wire type {wire}")
    return out


def _tensor(buf: bytes) -> _Tensor:
    t = _Tensor()
    for number, value in _fields(buf):
        if number == 8 and isinstance(value, bytes):
            t.name = value.decode("utf-8", errors="replace")
        elif number == 1:
            if isinstance(value, int):
                t.dims.append(value)
            else:  # packed dims
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    t.dims.append(dim)
        elif number == 2 and isinstance(value, int):
            t.data_type = value
        elif number == 13 and isinstance(value, bytes):
            entry = {n: v for n, v in _fields(value) if isinstance(v, bytes)}
            t.external[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    return t


def _initializers(model_file: Path, names: set[str]) -> dict[str, _Tensor]:
    size = model_file.stat().st_size
    if size > _MAX_MODEL_PROTO:
        raise ModelError(f"{model_file}: {size} bytes (limit {_MAX_MODEL_PROTO})")
    found: dict[str, _Tensor] = {}
    for number, graph in _fields(model_file.read_bytes()):
        if number != 7 or not isinstance(graph, bytes):
            continue
        for g_number, value in _fields(graph):
            if g_number == 5 and isinstance(value, bytes):
                t = _tensor(value)
                if t.name in names:
                    found[t.name] = t
    return found


def _external_bytes(model_dir: Path, t: _Tensor, expected: int) -> bytes:
    location = t.external.get("location", "")
    if not location or "/" in location or location.startswith("."):
        raise ModelError(f"{t.name}: external data location {location!r} is not a plain name")
    try:
        offset = int(t.external.get("offset", "0"))
        length = int(t.external.get("length", "-1"))
    except ValueError as e:
        raise ModelError(f"{t.name}: bad external data offset or length") from e
    data_file = model_dir / location
    if length != expected or offset < 0 or offset + length > data_file.stat().st_size:
        raise ModelError(f"{t.name}: external data ({offset}, {length}) does not fit {data_file}")
    with open(data_file, "rb") as f:
        f.seek(offset)
        return f.read(length)


def read_lm_head(model_dir: Path, model_file: str = "model.onnx") -> Array:
    """The dequantized LM head ``W`` float32 [vocab, hidden] of a built model directory.

    Raises:
        ModelError: the graph lacks the LM head initializers, they are not where or what
            the builder writes, or the result is not finite.
    """
    try:
        found = _initializers(model_dir / model_file, {_QWEIGHT, _SCALES})
        if set(found) != {_QWEIGHT, _SCALES}:
            raise ModelError(f"{model_dir}: the graph has no {_QWEIGHT}/{_SCALES} initializers")
        q, s = found[_QWEIGHT], found[_SCALES]
        if q.data_type != _UINT8 or len(q.dims) != 3 or q.dims[2] != _BLOCK:
            raise ModelError(f"{_QWEIGHT}: expected uint8 [vocab, blocks, 32], got {q.dims}")
        vocab, nb = q.dims[0], q.dims[1]
        if s.data_type != _FLOAT or s.dims != [vocab * nb]:
            raise ModelError(f"{_SCALES}: expected float32 [{vocab * nb}], got {s.dims}")
        qbytes = _external_bytes(model_dir, q, vocab * nb * _BLOCK)
        sbytes = _external_bytes(model_dir, s, vocab * nb * 4)
    except OSError as e:
        raise ModelError(f"{model_dir}: cannot read the LM head: {e}") from e
    qw = np.frombuffer(qbytes, dtype=np.uint8).reshape(vocab, nb, _BLOCK)
    scales = np.frombuffer(sbytes, dtype="<f4").reshape(vocab, nb, 1)
    w: Array = ((qw.astype(np.float32) - 128.0) * scales).reshape(vocab, nb * _BLOCK)
    if not np.isfinite(w).all():
        raise ModelError(f"{model_dir}: the LM head has non-finite values")
    return w
