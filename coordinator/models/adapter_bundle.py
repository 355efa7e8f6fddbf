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


def write_random_adapter_bundle(
    directory: Path,
    base_dir: Path,
    *,
    name: str,
    version: str,
    rank: int = 4,
    seed: int = 7,
    scale: float = 0.02,
    keep_zero: list[int] | None = None,
) -> Path:
    """Write a loadable adapter bundle with random factors (``scale`` times standard
    normal, seeded) bound to the base bundle in ``base_dir``, into ``directory``.

    ``keep_zero``: vocabulary ids whose logits the adapter leaves unchanged. Shows how an
    adapter ships (demo, tests), not what one learns.

    Raises:
        ValueError: ``base_dir`` is not a base model bundle.
    """
    base = BundleManifest.model_validate_json((base_dir / MANIFEST_NAME).read_bytes())
    if base.model is None:
        raise ValueError(f"{base_dir} is not a base model bundle")
    rng = np.random.default_rng(seed)
    lora_a = scale * rng.standard_normal((base.model.hidden_size, rank))
    lora_b = scale * rng.standard_normal((rank, base.model.vocab_size))
    if keep_zero:
        lora_b[:, keep_zero] = 0.0
    directory.mkdir(parents=True, exist_ok=True)
    write_adapter_bundle(directory, base, lora_a, lora_b, name=name, version=version)
    return directory
