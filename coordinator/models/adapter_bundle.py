"""Adapter bundles: an LM-head adapter's factors packed with a manifest bound to its base.

Used by the federated rounds (a round's aggregate) and the demo. Needs only NumPy and
:mod:`protocol` (none of the model builder's heavier packages), so a coordinator without
the build extra can package adapters.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from protocol.bundle import (
    ADAPTER_NAME,
    MANIFEST_NAME,
    AdapterInfo,
    BundleFile,
    BundleKind,
    BundleManifest,
    Provenance,
    bundle_hash,
    canonical_json,
)


def write_adapter_bundle(
    directory: Path,
    base: BundleManifest,
    lora_a: np.ndarray[Any, Any],
    lora_b: np.ndarray[Any, Any],
    *,
    name: str,
    version: str,
    extra_files: dict[str, bytes] | None = None,
    provenance: Provenance | None = None,
) -> BundleManifest:
    """Write an LM-head adapter bundle into the existing directory ``directory``: the
    factors as ``adapter.npz``, any ``extra_files``, and a manifest that binds the bundle to
    ``base`` (its bundle hash, tokenizer and the adapter's rank). Returns the manifest.

    Raises:
        ValueError: ``base`` is not a base bundle, or the factors' shapes do not fit it.
    """
    if base.model is None:
        raise ValueError(f"{base.name} {base.version} is not a base model bundle")
    hidden, vocab = base.model.hidden_size, base.model.vocab_size
    rank = int(lora_a.shape[1]) if lora_a.ndim == 2 else -1
    if lora_a.shape != (hidden, rank) or lora_b.shape != (rank, vocab):
        raise ValueError(
            f"adapter factors {lora_a.shape} and {lora_b.shape} do not fit the base "
            f"(hidden {hidden}, vocab {vocab})"
        )
    with open(directory / ADAPTER_NAME, "wb") as f:
        np.savez(f, lora_a=lora_a.astype(np.float32), lora_b=lora_b.astype(np.float32))
    for path, data in (extra_files or {}).items():
        (directory / path).write_bytes(data)
    names = [ADAPTER_NAME, *(extra_files or {})]
    manifest = BundleManifest(
        name=name,
        version=version,
        kind=BundleKind.ADAPTER,
        files=[
            BundleFile(
                path=p,
                sha256=hashlib.sha256((directory / p).read_bytes()).hexdigest(),
                size=(directory / p).stat().st_size,
            )
            for p in names
        ],
        adapter=AdapterInfo(
            target="lm_head",
            rank=rank,
            base_bundle_sha256=bundle_hash(base),
            tokenizer_sha256=base.model.tokenizer_sha256,
            provenance=provenance,
        ),
    )
    (directory / MANIFEST_NAME).write_bytes(canonical_json(manifest))
    return manifest
