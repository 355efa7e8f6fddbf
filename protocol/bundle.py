"""The bundle manifest: what a model directory contains and what it fits.

A bundle is a directory with a ``manifest.json`` (a :class:`BundleManifest`) that lists
every other file of the directory with its size and SHA-256; the manifest never lists
itself. A ``base`` bundle carries a whole model (:class:`ModelInfo`); an ``adapter`` bundle
carries a LoRA adapter for one base (:class:`AdapterInfo`) and names that base by
:func:`bundle_hash`.

Invariants enforced on parse:

- 1..64 files, unique paths, each relative and inside the directory (see ``RelPath``);
- a base bundle has ``model`` and no ``adapter``, lists ``tokenizer.json`` and
  ``model.tokenizer_sha256`` is that file's hash; an adapter bundle has ``adapter`` and no
  ``model``;
- token ids lie inside the vocabulary.

The identity of a bundle is :func:`bundle_hash`: the SHA-256 of :func:`canonical_json` of
the parsed manifest, not of the file's bytes, so whitespace or key order in
``manifest.json`` do not change it.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, Strict, StringConstraints, model_validator

from protocol._types import (
    MAX_FILE_SIZE,
    Identifier,
    Message,
    RelPath,
    Sha256Hex,
    Slug,
    StrictModel,
)

#: File name of the manifest inside a bundle directory.
MANIFEST_NAME = "manifest.json"
#: File name of the tokenizer inside a base bundle.
TOKENIZER_NAME = "tokenizer.json"
#: File name of an LM-head adapter's factors inside an adapter bundle: an uncompressed .npz
#: of ``lora_a`` [hidden, rank] and ``lora_b`` [rank, vocab], both float32.
ADAPTER_NAME = "adapter.npz"

MAX_FILES = 64
MAX_VOCAB_SIZE = 1 << 20
MAX_CONTEXT_LENGTH = 131072  # tokens
MAX_ADAPTER_RANK = 64
MAX_CHAT_TEMPLATE = 16 * 1024  # characters


class BundleKind(StrEnum):
    """What a bundle carries."""

    BASE = "base"
    ADAPTER = "adapter"


class BundleFile(StrictModel):
    """One file of a bundle directory."""

    path: RelPath
    sha256: Sha256Hex
    size: int = Field(ge=0, le=MAX_FILE_SIZE, description="Size in bytes.")


class ModelInfo(StrictModel):
    """What the runtime needs to know about a base model; required when kind is ``base``."""

    architecture: Literal["llama"]
    quantization: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")]
    """How the weights are quantized, e.g. ``q4_1-exact``."""
    context_length: int = Field(ge=1, le=MAX_CONTEXT_LENGTH)
    vocab_size: int = Field(ge=1, le=MAX_VOCAB_SIZE)
    hidden_size: int = Field(ge=1, le=65536)
    num_layers: int = Field(ge=1, le=1024)
    tokenizer_sha256: Sha256Hex
    """SHA-256 of the bundle's ``tokenizer.json``."""
    chat_template: str = Field(min_length=1, max_length=MAX_CHAT_TEMPLATE)
    """The chat template (Jinja-like text) that turns messages into a prompt."""
    bos_token_id: int | None = Field(ge=0)
    eos_token_ids: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=8)
    max_adapter_rank: int = Field(ge=0, le=MAX_ADAPTER_RANK)
    """The LoRA rank the graph's adapter inputs accept; 0 means the graph has none."""

    @model_validator(mode="after")
    def _token_ids_in_vocab(self) -> Self:
        outside = [i for i in self.eos_token_ids if i >= self.vocab_size]
        if outside:
            raise ValueError(
                f"eos_token_ids {outside} are outside the vocabulary (vocab_size {self.vocab_size})"
            )
        if self.bos_token_id is not None and self.bos_token_id >= self.vocab_size:
            raise ValueError(
                f"bos_token_id {self.bos_token_id} is outside the vocabulary "
                f"(vocab_size {self.vocab_size})"
            )
        if len(set(self.eos_token_ids)) != len(self.eos_token_ids):
            raise ValueError("eos_token_ids has duplicates")
        return self


class Provenance(StrictModel):
    """Which federated run produced an adapter."""

    round_id: Identifier
    rounds: int = Field(ge=1, le=10000)
    """Number of federated rounds the run took."""
    cohort_size: int = Field(ge=1, le=1_000_000)
    round_manifest_sha256: Sha256Hex
    """:func:`canonical_json` hash of the run's ``RoundManifest``."""
    epsilon: float | None = Field(gt=0, le=1000)
    """Differential-privacy budget spent; ``None`` when the run had no DP accounting."""
    delta: float | None = Field(ge=0, lt=1)

    @model_validator(mode="after")
    def _epsilon_with_delta(self) -> Self:
        if (self.epsilon is None) != (self.delta is None):
            raise ValueError("epsilon and delta are given together or not at all")
        return self


class AdapterInfo(StrictModel):
    """What an adapter fits; required when kind is ``adapter``."""

    target: Literal["lm_head"]
    rank: int = Field(ge=1, le=MAX_ADAPTER_RANK)
    base_bundle_sha256: Sha256Hex
    """:func:`bundle_hash` of the base bundle this adapter was trained on."""
    tokenizer_sha256: Sha256Hex
    provenance: Provenance | None = None


class BundleManifest(Message):
    """The ``manifest.json`` of a bundle directory."""

    name: Slug
    version: Identifier
    """Release version, e.g. ``1.0.0`` or ``2026.12.03-1``."""
    kind: Annotated[BundleKind, Strict(False)]
    files: list[BundleFile] = Field(min_length=1, max_length=MAX_FILES)
    model: ModelInfo | None = None
    adapter: AdapterInfo | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        paths = [f.path for f in self.files]
        duplicates = sorted({p for p in paths if paths.count(p) > 1})
        if duplicates:
            raise ValueError(f"files lists these paths more than once: {duplicates}")
        if MANIFEST_NAME in paths:
            raise ValueError(f"files must not list {MANIFEST_NAME} (the manifest itself)")
        if self.kind is BundleKind.BASE:
            if self.model is None or self.adapter is not None:
                raise ValueError("a base bundle needs `model` and no `adapter`")
            tokenizer = next((f for f in self.files if f.path == TOKENIZER_NAME), None)
            if tokenizer is None:
                raise ValueError(f"a base bundle must list {TOKENIZER_NAME} in files")
            if tokenizer.sha256 != self.model.tokenizer_sha256:
                raise ValueError(
                    f"model.tokenizer_sha256 differs from the sha256 of {TOKENIZER_NAME} in files"
                )
        elif self.adapter is None or self.model is not None:
            raise ValueError("an adapter bundle needs `adapter` and no `model`")
        return self


def canonical_json(model: BaseModel) -> bytes:
    """Return the canonical bytes of ``model``: the bytes every protocol hash is taken over.

    JSON with sorted keys, no whitespace, UTF-8 (non-ASCII unescaped), every field present
    (defaults and nulls included). Floats use Python's shortest round-trip repr; an
    implementation in another language must reproduce that to recompute a hash.
    """
    return json.dumps(
        model.model_dump(mode="json"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def bundle_hash(manifest: BundleManifest) -> str:
    """Return the identity of a bundle: SHA-256 hex of :func:`canonical_json` of its manifest."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()
