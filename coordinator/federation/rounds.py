"""Round orchestration: run a personalization run on a SuperLink and package its result.

A run is described by a :class:`RunSpec`; :func:`run_personalization` submits the app
(:mod:`coordinator.federation.server_app`) to a running SuperLink, waits for it to end,
reads the per-round figures and the aggregate, accounts epsilon and returns a finished
:class:`protocol.rounds.RoundManifest`. :func:`package_adapter` turns the aggregate into
an adapter bundle bound to the base model's hash, with the manifest's hash as
provenance; :class:`coordinator.repository.Repository` ``add_bundle`` then signs it with
the adapters key.

Invariants:

- the aggregate must be finite float32 ``[hidden, r]`` and ``[r, vocab]`` of the base;
- the bundle is written into a fresh directory renamed into place when complete;
- epsilon is reported for every run with noise (``None`` only without DP noise, where
  the manifest's privacy section still records the clipping norm).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from coordinator.errors import RefusedError
from coordinator.federation.accountant import epsilon as dp_epsilon
from coordinator.federation.superlink import FlowerDriver, RunFailedError, write_app
from coordinator.models.adapter_bundle import write_adapter_bundle
from coordinator.repository import PublishedBundle, Repository
from protocol.bundle import (
    ADAPTER_NAME,
    BundleKind,
    BundleManifest,
    Provenance,
    bundle_hash,
    canonical_json,
)
from protocol.rounds import FedAvg, Privacy, RoundManifest, SecAggPlus

__all__ = [
    "ADAPTER_FILE",
    "METRICS_FILE",
    "ROUND_MANIFEST_FILE",
    "RunResult",
    "RunSpec",
    "package_adapter",
    "plan_manifest",
    "publish_adapter",
    "run_output_dir",
    "run_personalization",
    "secaggplus_ranges",
]

ADAPTER_FILE = ADAPTER_NAME
ROUND_MANIFEST_FILE = "round-manifest.json"
#: The ServerApp's per-round figures (one JSON line per round) in the run's output directory.
METRICS_FILE = "metrics.jsonl"

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class RunSpec:
    """How to run one personalization run."""

    round_id: str
    group: str
    rounds: int
    cohort_size: int
    min_nodes: int
    secaggplus: bool = True
    #: Measured update norms are 14-20 with the default device settings: 25 bounds each
    #: device's influence without shrinking a normal update (docs/federated.md).
    clip_norm: float = 25.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    #: Devices sampled per round / devices in the group (1.0: all take part every round).
    sampling_rate: float = 1.0
    rank: int = 8
    seed: int = 0
    #: Local training settings sent to devices (see server_app.DEVICE_KEYS): what the
    #: benchmark measured -15 to -17 % held-out perplexity with over 5 rounds (one pass of
    #: at most 60 minibatches of 128 positions, Adam at 0.003; devices add the anchor term).
    device: dict[str, float | int] = field(
        default_factory=lambda: {
            "epochs": 1,
            "learning-rate": 0.003,
            "batch-rows": 128,
            "l2": 0.0,
            "max-steps": 60,
            "max-compute-s": 60.0,
            "window": 128,
            "max-rows": 20000,
        }
    )
    timeout_s: float = 600.0
    #: The SuperNode IDs of the group's devices (``registry.federation_nodes``): the only
    #: nodes the run samples, whatever else the SuperLink serves. ``run_round`` fills it
    #: from the registry; at least ``cohort_size`` are needed.
    nodes: tuple[int, ...] = ()

    def epsilon(self) -> float | None:
        if self.noise_multiplier == 0:
            return None
        return dp_epsilon(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sampling_rate,
            rounds=self.rounds,
            delta=self.delta,
        )


@dataclass(frozen=True)
class RunResult:
    manifest: RoundManifest
    rounds: list[dict[str, Any]]  # per-round figures as the ServerApp wrote them
    lora_a: Array
    lora_b: Array
    log: str


def _base_info(base: BundleManifest) -> tuple[int, int, int]:
    if base.kind is not BundleKind.BASE or base.model is None:
        raise RefusedError(f"{base.name} {base.version} is not a base model bundle")
    return base.model.hidden_size, base.model.vocab_size, base.model.max_adapter_rank


def run_output_dir(work_dir: Path) -> Path:
    """Where the ServerApp of a run in ``work_dir`` writes ``metrics.jsonl`` and ``result.npz``."""
    return work_dir / "output"


#: SecAgg+ clips each adapter value to [-8, 8] before quantizing it.
SECAGG_CLIPPING_RANGE = 8.0
#: Fewest quantization levels per value a 2**16 modulus must leave (else 2**32).
_MIN_LEVELS_16 = 1 << 10


def secaggplus_ranges(cohort: int) -> tuple[int, int]:
    """SecAgg+'s ``(quantization_range, modulus_range)`` for a cohort of ``cohort`` devices.

    Devices send masked values mod ``modulus_range`` in the narrowest unsigned dtype it
    divides (:mod:`agent.federated.upload`), so a modulus of 2**16 is 2 bytes per adapter
    value. Each device contributes at most ``quantization_range`` per value (and as its
    weight factor, with one example per device and ``max_weight`` 1), so the cohort's sum
    stays below the modulus with ``quantization_range = (modulus_range - 1) // cohort``.
    2**16 is used while that leaves at least 2**10 levels (cohorts up to 63; 21845 levels,
    a step of 16/21845 = 7.3e-4, for 3 devices); larger cohorts use 2**32 (4 bytes a value).
    """
    if cohort < 1:
        raise ValueError(f"cohort must be positive, got {cohort}")
    modulus = 1 << 16 if ((1 << 16) - 1) // cohort >= _MIN_LEVELS_16 else 1 << 32
    return (modulus - 1) // cohort, modulus


def plan_manifest(spec: RunSpec, base: BundleManifest, started_at: datetime) -> RoundManifest:
    """The manifest of ``spec`` on ``base`` as it starts (no epsilon, result or end yet).

    Raises:
        RefusedError: the spec does not fit the base model or the round manifest rules.
    """
    _, _, max_rank = _base_info(base)
    if not 1 <= spec.rank <= max_rank:
        raise RefusedError(f"rank {spec.rank} is outside 1..{max_rank} of the base model")
    if spec.secaggplus and min(spec.cohort_size, spec.min_nodes) < 3:
        raise RefusedError(
            f"SecAgg+ needs at least 3 devices per round (cohort {spec.cohort_size}, min nodes "
            f"{spec.min_nodes}); run without it on fewer devices"
        )
    aggregation: FedAvg | SecAggPlus
    try:
        if spec.secaggplus:
            quantization_range, modulus_range = secaggplus_ranges(spec.cohort_size)
            aggregation = SecAggPlus(
                kind="secaggplus",
                num_shares=spec.cohort_size,
                # Any min_nodes survivors can unmask a round (the most dropouts the run
                # accepts anyway), and no fewer; below the number of shares, as SecAgg+ needs.
                reconstruction_threshold=max(2, min(spec.min_nodes, spec.cohort_size - 1)),
                clipping_range=SECAGG_CLIPPING_RANGE,
                quantization_range=quantization_range,
                modulus_range=modulus_range,
            )
        else:
            aggregation = FedAvg(kind="fedavg")
        return RoundManifest(
            round_id=spec.round_id,
            group=spec.group,
            rounds=spec.rounds,
            cohort_size=spec.cohort_size,
            min_nodes=spec.min_nodes,
            adapter_rank=spec.rank,
            aggregation=aggregation,
            privacy=Privacy(
                clip_norm=spec.clip_norm,
                noise_multiplier=spec.noise_multiplier,
                epsilon=None,
                delta=spec.delta,
            ),
            base_bundle_sha256=bundle_hash(base),
            started_at=started_at,
        )
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'run'}: {err['msg']}" for err in e.errors()
        )
        raise RefusedError(f"run {spec.round_id!r}: {problems}") from e


def run_personalization(
    spec: RunSpec,
    base: BundleManifest,
    cli: FlowerDriver,
    work_dir: Path,
    *,
    started_at: datetime | None = None,
) -> RunResult:
    """Run ``spec`` against the SuperLink ``cli`` talks to; return the finished run.

    ``started_at`` (default: now) is the manifest's start, so a caller that recorded the
    run's :func:`plan_manifest` first gets the same manifest back, finished.

    Raises:
        RefusedError: the spec does not fit the base model or the round manifest rules.
        RunFailedError: the run failed, timed out, or left no aggregate.
    """
    hidden, vocab, _ = _base_info(base)
    manifest = plan_manifest(spec, base, started_at or datetime.now(UTC))
    nodes = sorted(set(spec.nodes))
    if len(nodes) < spec.cohort_size:
        raise RefusedError(
            f"run {spec.round_id!r} names {len(nodes)} SuperNodes of group "
            f"{spec.group!r}, fewer than its cohort of {spec.cohort_size}"
        )
    aggregation = manifest.aggregation
    output = run_output_dir(work_dir)
    shutil.rmtree(output, ignore_errors=True)
    config: dict[str, Any] = {
        "num-rounds": spec.rounds,
        "cohort-size": spec.cohort_size,
        "min-nodes": spec.min_nodes,
        "secaggplus": spec.secaggplus,
        "clip-norm": spec.clip_norm,
        "noise-multiplier": spec.noise_multiplier,
        "seed": spec.seed,
        "rank": spec.rank,
        "hidden": hidden,
        "vocab": vocab,
        "output-dir": str(output),
        "nodes": ",".join(str(n) for n in nodes),
        **spec.device,
    }
    if isinstance(aggregation, SecAggPlus):
        config["num-shares"] = aggregation.num_shares
        config["reconstruction-threshold"] = aggregation.reconstruction_threshold
        config["clipping-range"] = aggregation.clipping_range
        config["quantization-range"] = aggregation.quantization_range
        config["modulus-range"] = aggregation.modulus_range
    app_dir = write_app(work_dir / "app", config)
    log = cli.run(app_dir, {}, spec.timeout_s)
    result_file = output / "result.npz"
    if not result_file.exists():
        raise RunFailedError(f"run {spec.round_id} left no aggregate:\n{log[-3000:]}")
    with np.load(result_file, allow_pickle=False) as npz:
        lora_a = np.asarray(npz["lora_a"], dtype=np.float32)
        lora_b = np.asarray(npz["lora_b"], dtype=np.float32)
    if (
        lora_a.shape != (hidden, spec.rank)
        or lora_b.shape != (spec.rank, vocab)
        or not (np.isfinite(lora_a).all() and np.isfinite(lora_b).all())
    ):
        raise RunFailedError(f"run {spec.round_id}: the aggregate is malformed or not finite")
    rounds = [
        json.loads(line)
        for line in (output / METRICS_FILE).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    eps = spec.epsilon()
    digest = hashlib.sha256(lora_a.tobytes() + lora_b.tobytes()).hexdigest()
    privacy = manifest.privacy
    assert privacy is not None
    finished = manifest.model_copy(
        update={
            "privacy": privacy.model_copy(
                update={"epsilon": eps if eps is not None and math.isfinite(eps) else None}
            ),
            "result_sha256": digest,
            "finished_at": datetime.now(UTC),
        }
    )
    finished = RoundManifest.model_validate(finished.model_dump())
    return RunResult(manifest=finished, rounds=rounds, lora_a=lora_a, lora_b=lora_b, log=log)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_adapter(
    result: RunResult, base: BundleManifest, out_dir: Path, *, name: str, version: str
) -> BundleManifest:
    """Write the run's aggregate as an adapter bundle directory ``out_dir``.

    The bundle holds ``adapter.npz`` and the run's ``round-manifest.json``; its manifest
    binds the base bundle's hash and tokenizer and names the run as provenance.

    Raises:
        RefusedError: the base is not a base bundle, or ``out_dir`` exists.
    """
    _, _, _ = _base_info(base)
    assert base.model is not None
    if out_dir.exists():
        raise RefusedError(f"{out_dir} exists; package into a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        round_bytes = canonical_json(result.manifest)
        manifest = write_adapter_bundle(
            tmp,
            base,
            result.lora_a,
            result.lora_b,
            name=name,
            version=version,
            extra_files={ROUND_MANIFEST_FILE: round_bytes},
            provenance=Provenance(
                round_id=result.manifest.round_id,
                rounds=result.manifest.rounds,
                cohort_size=result.manifest.cohort_size,
                round_manifest_sha256=hashlib.sha256(round_bytes).hexdigest(),
                # TUF's canonical JSON has no floats, and the manifest travels in signed
                # target metadata: epsilon and delta stay in the round manifest, whose
                # hash is signed here and whose bytes ship in the bundle.
                epsilon=None,
                delta=None,
            ),
        )
        os.chmod(tmp, 0o755)  # noqa: S103 - an adapter bundle is public, like a model
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def publish_adapter(
    repo: Repository, bundle_dir: Path, *, group: str, channel: str
) -> PublishedBundle:
    """Sign the adapter bundle with the adapters key and point ``group``'s ``channel`` at it.

    Needs only online keys (snapshot, timestamp), the adapters key and the channels key:
    the coordinator can ship a federated result without the key that signs base models.

    Raises:
        RefusedError: the bundle is not an adapter, is altered, or its base is not published.
        SigningKeyError: a needed key is missing or locked.
    """
    published = repo.add_bundle(bundle_dir)
    if published.manifest.kind is not BundleKind.ADAPTER:
        raise RefusedError(f"{bundle_dir} is not an adapter bundle")
    repo.point(group, channel, published.manifest.name, published.manifest.version)
    return published
