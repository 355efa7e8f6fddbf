"""Federated personalization: utility, privacy, upload size and Flower overhead.

Three parts, one JSON line of every figure at the end:

1. **Utility and privacy (in process, the real Nano model).** Three devices of group
   ``alpha`` (each its own slice of the NumPy docs, with a held-out part) and the general
   held-out text (Python's language reference). The frozen model's hidden states are
   computed once per text (the ClientApp recomputes them every message; the arithmetic is
   the same), and so are the anchor texts the model writes itself (the same on every
   device), then K rounds of FedAvg over the LM-head adapter exactly as the ServerApp
   runs them: each device trains from the round's adapter with the NumPy trainer
   (:data:`UTILITY_CONFIG`, with the anchor term), its
   update is clipped to ``clip`` (L2), the server averages and adds Gaussian noise of std
   ``z * clip / cohort``, with ``z`` calibrated by the RDP accountant for epsilon = inf
   (clipping only), 8 and 2 at delta 1e-5. Figures: each device's held-out perplexity
   before/after, the general perplexity change, and the change on another group's domain
   (held-out SQLAlchemy docs of group ``beta``). Several seeds, medians.
2. **A large cohort (in process, a small model).** Client-level DP needs a crowd: the
   same protocol with many light clients (each a small slice of the domain, one local
   epoch), a sampled cohort per round (``q = cohort / population``), on the tiny model of
   the test suite (same builder, vocabulary ~380) so hundreds of clients fit in minutes.
3. **Flower overhead and upload (real processes, tiny model).** A SuperLink and 3
   SuperNodes on loopback (TLS, node auth): our app (FedAvg, clipping, no SecAgg) vs
   Flower's minimal NumPy app (a ClientApp that returns the arrays it got) for the same
   rounds; the ratio of round times after removing our on-device training compute. Then
   our app with SecAgg+ on, as production runs. The bytes each device uploaded per round
   are counted by a TLS-terminating proxy and split into bytes per adapter value (read from
   the arrays' headers) and a fixed part; the real model's upload is that fixed part plus
   its adapter's values at the measured bytes per value, compared with its bundle's size.
4. **Training yields to serving (real model).** First-token latency of a chat request
   with a training process stopped (SIGSTOP) vs running, alternating request by request so
   that other load on a shared machine hits both alike, each request ``gap_s`` after the
   previous one in both states, for each lever: pause checks every 128 rows (the
   minibatch) or 32, the idle scheduling class, both; the trainer always also checks
   between slices of the LM head product. The request sets the serving marker the
   ClientApp's checkpoint watches.

    .venv/bin/python benchmarks/federated.py [--rounds 5] [--seeds 1] [--epsilons inf 8 2]
        [--max-chars 150000] [--train-rows 20000] [--clip 25] [--skip cohort flower ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.federated.features import Features, extract_features  # noqa: E402
from agent.federated.lm_head import read_lm_head  # noqa: E402
from agent.federated.trainer import (  # noqa: E402
    Adapter,
    Directive,
    TrainConfig,
    evaluate,
    init_adapter,
    train,
)
from agent.runtime.engine import Engine  # noqa: E402
from coordinator.demo.domain_data import device_slices, general_heldout  # noqa: E402
from coordinator.federation.accountant import epsilon, noise_for_epsilon  # noqa: E402
from protocol.bundle import MANIFEST_NAME, BundleManifest  # noqa: E402

DELTA = 1e-5
Array = np.ndarray[Any, Any]


def features_of(engine: Engine, texts: list[str], max_rows: int, window: int = 128) -> Features:
    sep = engine.encode("\n\n")
    return extract_features(
        engine, [engine.encode(t) for t in texts], window=window, separator=sep, max_rows=max_rows
    )


def fedavg(
    devices: list[Features],
    w: Array,
    start: Adapter,
    *,
    rounds: int,
    cohort: int,
    clip: float,
    z: float,
    config: TrainConfig,
    seed: int,
    anchor: Array | None = None,
    log: list[dict[str, Any]] | None = None,
) -> Adapter:
    """The ServerApp's protocol in process: sample, train, clip, average, add noise."""
    rng = np.random.default_rng(seed)
    current = start
    for r in range(rounds):
        chosen = rng.choice(len(devices), size=cohort, replace=False)
        sum_a = np.zeros_like(current.a)
        sum_b = np.zeros_like(current.b)
        norms, compute = [], []
        for i in chosen:
            data = devices[i]
            local = config.model_copy(update={"seed": seed * 1000 + r * 100 + int(i)})
            result = train(data.h, data.y, w, current, local, anchor=anchor)
            delta = result.delta
            norm = math.sqrt(float(np.sum(delta.a**2) + np.sum(delta.b**2)))
            scale = min(1.0, clip / norm) if norm > 0 else 1.0
            sum_a += delta.a * scale
            sum_b += delta.b * scale
            norms.append(round(norm, 2))
            compute.append(round(result.compute_s, 1))
        std = z * clip / cohort
        noise_a = rng.normal(0.0, std, size=current.a.shape).astype(np.float32)
        noise_b = rng.normal(0.0, std, size=current.b.shape).astype(np.float32)
        current = Adapter(
            a=current.a + sum_a / cohort + noise_a, b=current.b + sum_b / cohort + noise_b
        )
        if log is not None:
            log.append({"round": r + 1, "update_norms": norms, "compute_s": compute})
    return current


#: What a device runs per round in the utility part: one pass of at most 60 minibatches of
#: 128 positions plus 64 anchor positions each, Adam at 0.003 (about 10 s of one core).
UTILITY_CONFIG = TrainConfig(
    epochs=1,
    batch_rows=128,
    max_steps=60,
    learning_rate=0.003,
    anchor_weight=100.0,
    anchor_rows=64,
)


def utility_part(
    model_dir: Path,
    *,
    rounds: int,
    seeds: int,
    rank: int,
    max_chars: int,
    train_rows: int,
    clip: float,
    epsilons: list[str],
    anchor_weight: float,
) -> dict[str, Any]:
    from agent.federated.local import AnchorConfig, LocalModel

    model = LocalModel(model_dir, threads=2)
    engine, w = model.engine, model.w
    slices = device_slices("alpha", devices=3, max_chars=max_chars)
    began = time.perf_counter()
    train_sets = [features_of(engine, s.train_texts(), train_rows) for s in slices]
    heldouts = [features_of(engine, s.heldout_texts(), 20_000) for s in slices]
    general = features_of(engine, general_heldout(max_chars=12_000), 3000)
    # Another group's domain (SQLAlchemy's docs): what alpha's adapter does to it.
    (beta,) = device_slices("beta", devices=1, max_chars=max_chars)
    other = features_of(engine, beta.heldout_texts(), 3000)
    features_s = time.perf_counter() - began
    config = UTILITY_CONFIG.model_copy(update={"anchor_weight": anchor_weight})
    began = time.perf_counter()
    anchor = model.anchor(AnchorConfig()) if anchor_weight > 0 else None
    anchor_s = time.perf_counter() - began
    base_dev = [evaluate(h.h, h.y, w).perplexity for h in heldouts]
    base_gen = evaluate(general.h, general.y, w).perplexity
    base_other = evaluate(other.h, other.y, w).perplexity
    table: dict[str, Any] = {}
    for label in epsilons:
        target = float(label)
        z = (
            0.0
            if math.isinf(target)
            else noise_for_epsilon(target, sampling_rate=1.0, rounds=rounds, delta=DELTA)
        )
        dev_ratios: list[list[float]] = []
        gen_ratios: list[float] = []
        other_ratios: list[float] = []
        log: list[dict[str, Any]] = []
        for seed in range(seeds):
            start = init_adapter(engine.hidden_size, engine.vocab_size, rank, seed=seed)
            final = fedavg(
                train_sets, w, start, rounds=rounds, cohort=3, clip=clip, z=z,
                config=config, seed=seed, anchor=anchor, log=log,
            )  # fmt: skip
            dev_ratios.append(
                [
                    evaluate(h.h, h.y, w, final).perplexity / b
                    for h, b in zip(heldouts, base_dev, strict=True)
                ]
            )
            gen_ratios.append(evaluate(general.h, general.y, w, final).perplexity / base_gen)
            other_ratios.append(evaluate(other.h, other.y, w, final).perplexity / base_other)
        per_device = [median(r[i] for r in dev_ratios) for i in range(3)]
        table[label] = {
            "noise_multiplier": z,
            "epsilon": None if math.isinf(target) else
            epsilon(noise_multiplier=z, sampling_rate=1.0, rounds=rounds, delta=DELTA),
            "heldout_ppl_change_pct": [round(100 * (r - 1), 2) for r in per_device],
            "general_ppl_change_pct": round(100 * (median(gen_ratios) - 1), 2),
            "other_group_ppl_change_pct": round(100 * (median(other_ratios) - 1), 2),
            "rounds_log": log,
        }  # fmt: skip
        print(f"real model, 3 devices, epsilon {label}: {table[label]}", flush=True)
    return {
        "model": str(model_dir),
        "rank": rank,
        "rounds": rounds,
        "seeds": seeds,
        "clip": clip,
        "max_chars": max_chars,
        "local_config": config.model_dump(),
        "train_rows": [int(t.y.shape[0]) for t in train_sets],
        "heldout_rows": [int(h.y.shape[0]) for h in heldouts],
        "anchor_rows": 0 if anchor is None else int(anchor.shape[0]),
        "base_heldout_ppl": [round(b, 2) for b in base_dev],
        "base_general_ppl": round(base_gen, 2),
        "base_other_group_ppl": round(base_other, 2),
        "features_s": round(features_s, 1),
        "anchor_s": round(anchor_s, 1),
        "table": table,
    }


def cohort_part(
    model_dir: Path, *, rounds: int, population: int, cohort: int, seeds: int, clip: float
) -> dict[str, Any]:
    engine = Engine.load(model_dir, threads=2)
    w = read_lm_head(model_dir)
    slices = device_slices("alpha", devices=population, heldout_fraction=0.2)
    # A client needs a few documents; slices of a large population may hold none.
    clients = [
        features_of(engine, s.train_texts(), 400, window=64)
        for s in slices
        if sum(map(len, s.train_texts())) >= 200
    ]
    heldout_texts = [t for s in slices[:20] for t in s.heldout_texts()]
    heldout = features_of(engine, heldout_texts, 4000, window=64)
    general = features_of(engine, general_heldout(max_chars=20_000), 4000, window=64)
    config = TrainConfig(epochs=1, batch_rows=64, learning_rate=0.05)
    population = len(clients)
    q = cohort / population
    base_h = evaluate(heldout.h, heldout.y, w).perplexity
    base_g = evaluate(general.h, general.y, w).perplexity
    table: dict[str, Any] = {}
    for label, target in (("inf", math.inf), ("8", 8.0), ("2", 2.0)):
        z = 0.0 if math.isinf(target) else noise_for_epsilon(
            target, sampling_rate=q, rounds=rounds, delta=DELTA
        )  # fmt: skip
        ratios, gens = [], []
        for seed in range(seeds):
            start = init_adapter(engine.hidden_size, engine.vocab_size, 8, seed=seed)
            final = fedavg(
                clients, w, start, rounds=rounds, cohort=cohort, clip=clip, z=z,
                config=config, seed=seed,
            )  # fmt: skip
            ratios.append(evaluate(heldout.h, heldout.y, w, final).perplexity / base_h)
            gens.append(evaluate(general.h, general.y, w, final).perplexity / base_g)
        table[label] = {
            "noise_multiplier": z,
            "heldout_ppl_change_pct": round(100 * (median(ratios) - 1), 2),
            "general_ppl_change_pct": round(100 * (median(gens) - 1), 2),
        }
        print(f"tiny model, {population} clients, epsilon {label}: {table[label]}", flush=True)
    return {
        "population": population,
        "cohort": cohort,
        "sampling_rate": q,
        "rounds": rounds,
        "table": table,
    }


def flower_part(
    tiny_dir: Path, real_dir: Path, *, rounds: int, runs: int, real_rank: int
) -> dict[str, Any]:
    """Round time of our app against Flower's minimal app, and what a device uploads.

    Two runs of our app per repetition: without SecAgg+ (timed, for the overhead ratio against
    the minimal app) and with it, as production runs (cohort 3, min nodes 3; upload only).
    The captured upload of each is searched for the ``.npy`` arrays of the adapter's shapes
    (Flower sends arrays as ``np.save`` bytes), whose headers give the bytes per adapter
    value on the wire; the rest of the per-device upload is the fixed part (HTTP, SecAgg+
    key exchange, array headers, the evaluate reply, polls). The real model's upload is that
    fixed part plus its adapter's values at the measured bytes per value.
    """
    import ast

    from coordinator.federation.rounds import RunSpec, run_personalization
    from coordinator.federation.superlink import write_app
    from tests.support.federation import Fleet

    def wire_arrays(data: bytes, shapes: set[tuple[int, ...]]) -> tuple[int, int]:
        """(data bytes, values) of the ``.npy`` arrays of ``shapes`` in captured upload bytes
        (their headers, ~128 bytes an array, count as the fixed part)."""
        size = values = 0
        at = data.find(b"\x93NUMPY")
        while at >= 0:
            try:
                wide = data[at + 6] >= 2
                head = at + (12 if wide else 10)
                length = int.from_bytes(data[at + 8 : head], "little")
                header = ast.literal_eval(data[head : head + length].decode("latin1"))
                shape = tuple(header["shape"])
                if shape in shapes:
                    n = math.prod(shape)
                    size += n * np.dtype(header["descr"]).itemsize
                    values += n
            except (ValueError, SyntaxError, KeyError, TypeError, IndexError):
                pass  # a header split between two connections' chunks
            at = data.find(b"\x93NUMPY", at + 1)
        return size, values

    base = BundleManifest.model_validate_json((tiny_dir / MANIFEST_NAME).read_bytes())
    assert base.model is not None
    rank = 4
    shapes: set[tuple[int, ...]] = {(base.model.hidden_size, rank), (rank, base.model.vocab_size)}
    ours_s, minimal_s, compute_s, upload = [], [], [], []
    steps_only_s: list[float] = []
    secagg_upload: list[float] = []
    plain_bpv: list[float] = []
    secagg_bpv: list[float] = []
    raw = 0
    for run in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            os.environ["FLWR_HOME"] = str(work / "flwr-home")
            os.environ["PYTHONPATH"] = str(REPO)
            with Fleet(work, tiny_dir) as fleet:
                for piece in device_slices("alpha", devices=3, max_chars=4000):
                    fleet.add_device(f"d{piece.index}", piece.train_texts() + piece.heldout_texts())
                spec = RunSpec(
                    round_id=f"bench-{run}", group="alpha", rounds=rounds, cohort_size=3,
                    min_nodes=3, nodes=fleet.node_ids(), secaggplus=False, clip_norm=5.0,
                    rank=rank, timeout_s=600,
                )  # fmt: skip
                before = len(fleet.proxy.uploaded())
                began = time.perf_counter()
                result = run_personalization(spec, base, fleet.cli, work / "ours")
                took = time.perf_counter() - began
                steps = sum(r.get("train_compute_s", 0.0) for r in result.rounds)
                # On-device compute: the optimizer steps, the frozen model's passes over
                # the texts and the anchor, and the held-out evaluation (slowest device of
                # each phase); what is left is the orchestration the minimal app also does.
                device = sum(
                    r.get("train_compute_s", 0.0)
                    + r.get("train_prep_s", 0.0)
                    + r.get("eval_compute_s", 0.0)
                    for r in result.rounds
                )
                ours_s.append(took - device)
                steps_only_s.append(took - steps)
                sent = fleet.proxy.uploaded()[before:]
                upload.append(len(sent) / (3 * rounds))
                size, values = wire_arrays(sent, shapes)
                plain_bpv.append(size / values)
                raw = int(result.lora_a.nbytes + result.lora_b.nbytes)
                compute_s.append(device)
                app = write_app(
                    work / "minimal",
                    {
                        "num-rounds": rounds,
                        "hidden": 128,
                        "vocab": base.model.vocab_size if base.model else 384,
                        "rank": 4,
                        "cohort-size": 3,
                    },
                )
                text = (app / "pyproject.toml").read_text()
                text = text.replace(
                    "coordinator.federation.server_app:app", "benchmarks.flower_minimal:server"
                ).replace("agent.federated.client_app:app", "benchmarks.flower_minimal:client")
                (app / "pyproject.toml").write_text(text)
                began = time.perf_counter()
                fleet.cli.run(app, {}, 600)
                minimal_s.append(time.perf_counter() - began)
                # As production runs: SecAgg+ on (2**16 modulus: 2-byte masked values).
                secure = RunSpec(
                    round_id=f"bench-{run}-secagg", group="alpha", rounds=rounds, cohort_size=3,
                    min_nodes=3, nodes=fleet.node_ids(), secaggplus=True, clip_norm=5.0,
                    rank=rank, timeout_s=600,
                )  # fmt: skip
                before = len(fleet.proxy.uploaded())
                run_personalization(secure, base, fleet.cli, work / "secagg")
                sent = fleet.proxy.uploaded()[before:]
                secagg_upload.append(len(sent) / (3 * rounds))
                size, values = wire_arrays(sent, shapes)
                secagg_bpv.append(size / values)
    real = BundleManifest.model_validate_json((real_dir / MANIFEST_NAME).read_bytes())
    bundle_bytes = sum(f.size for f in real.files)
    assert real.model is not None
    real_values = real_rank * (real.model.hidden_size + real.model.vocab_size)
    tiny_values = rank * (base.model.hidden_size + base.model.vocab_size)
    real_raw = real_values * 4  # float32
    factor = median(upload) / raw
    # What a device uploads per round = the adapter's bytes + a fixed part (HTTP requests,
    # the evaluate reply, polls); the real model's figure adds the measured fixed part to
    # its adapter's values at the measured bytes per value.
    fixed = median(upload) - tiny_values * median(plain_bpv)
    secagg_fixed = median(secagg_upload) - tiny_values * median(secagg_bpv)
    real_secagg = secagg_fixed + real_values * median(secagg_bpv)
    return {
        "rounds": rounds,
        "runs": runs,
        "ours_s": [round(x, 1) for x in ours_s],
        "minimal_s": [round(x, 1) for x in minimal_s],
        "overhead_ratio": round(median(ours_s) / median(minimal_s), 3),
        "device_compute_s": [round(x, 1) for x in compute_s],
        # The former figure: only the optimizer steps taken out.
        "overhead_ratio_steps_only": round(median(steps_only_s) / median(minimal_s), 3),
        "upload_bytes_per_device_round_tiny": round(median(upload)),
        "adapter_raw_bytes_tiny": raw,
        "upload_overhead_factor": round(factor, 3),
        "upload_bytes_per_value": round(median(plain_bpv), 3),
        "upload_fixed_bytes_per_round": round(fixed),
        "secagg_upload_bytes_per_device_round_tiny": round(median(secagg_upload)),
        "secagg_upload_bytes_per_value": round(median(secagg_bpv), 3),
        "secagg_upload_fixed_bytes_per_round": round(secagg_fixed),
        "real_rank": real_rank,
        "real_adapter_values": real_values,
        "real_upload_bytes_per_round": round(real_raw + fixed),
        "real_secagg_upload_bytes_per_round": round(real_secagg),
        "real_bundle_bytes": bundle_bytes,
        "real_upload_pct_of_bundle": round(100 * (real_raw + fixed) / bundle_bytes, 3),
        "real_secagg_upload_pct_of_bundle": round(100 * real_secagg / bundle_bytes, 3),
    }


def _train_forever(
    model_dir: str, marker: str, rows: int, batch_rows: int, check_rows: int, idle: bool, ready: Any
) -> None:
    """Child process: the on-device trainer on one core, pausing while ``marker`` exists.

    Set up as the ClientApp runs it: BLAS on one thread (the SuperNode's environment),
    optionally in the idle scheduling class (:func:`agent.federated.local.yield_cpu`)."""
    from agent.federated.local import serving_checkpoint, yield_cpu

    if idle:
        yield_cpu()
    w = read_lm_head(Path(model_dir))
    rng = np.random.default_rng(0)
    h = rng.standard_normal((rows, w.shape[1])).astype(np.float32)
    y = rng.integers(0, w.shape[0], size=rows)
    start = init_adapter(w.shape[1], w.shape[0], 4, seed=0)
    config = TrainConfig(
        epochs=100, batch_rows=batch_rows, check_rows=check_rows, max_compute_s=3600
    )
    pause = serving_checkpoint(Path(marker), poll_s=0.002)

    def checkpoint() -> Directive:
        ready.set()  # training is under way
        return pause()

    train(h, y, w, start, config, checkpoint=checkpoint)


#: (label, batch rows, rows between pause checks, idle scheduling class)
YIELD_VARIANTS = (
    ("every 128 rows (the minibatch)", 128, 128, False),
    ("every 32 rows", 128, 32, False),
    ("every 128 rows + idle class", 128, 128, True),
    ("every 32 rows + idle class (the device default)", 128, 32, True),
)


def yield_part(model_dir: Path, *, requests: int, gap_s: float = 0.15) -> dict[str, Any]:
    """First-token latency with the trainer stopped vs running, for each of
    ``YIELD_VARIANTS`` (the agent sets the serving marker when a request arrives; the
    trainer pauses at its next check).

    The machine may be shared, so the two states are paired: one training process per
    variant, stopped (SIGSTOP, by its PID) for the idle requests and running for the
    others, alternating request by request; each figure is a median over ``requests``.
    """
    import multiprocessing
    import signal

    from agent.runtime import SamplingParams

    engine = Engine.load(model_dir, threads=2)
    prompt = engine.encode(engine.render_chat([("user", "Name three uses of a hash map.")]))

    def first_token(marker: Path | None) -> float:
        began = time.perf_counter()
        if marker is not None:
            marker.touch()
        next(iter(engine.generate(prompt, SamplingParams(max_tokens=2))))
        took = time.perf_counter() - began
        if marker is not None:
            marker.unlink()
        return took

    def stopped(pid: int) -> bool:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"

    def paired(batch_rows: int, check_rows: int, idle: bool) -> tuple[list[float], list[float]]:
        quiet: list[float] = []
        busy: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            marker = Path(tmp) / "serving"
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Event()
            child = ctx.Process(
                target=_train_forever,
                args=(str(model_dir), str(marker), 4096, batch_rows, check_rows, idle, ready),
            )
            child.start()
            pid = child.pid
            if pid is None:
                raise RuntimeError("the training process did not start")
            try:
                if not ready.wait(120):
                    raise RuntimeError("the training process did not start")
                for i in range(2 * requests):
                    running = i % 2 == 1
                    # Both states wait the same time after the previous request, so only
                    # what the trainer did meanwhile differs (a request issued right after
                    # the last one finds the engine's threads and caches warmer).
                    if running:
                        os.kill(pid, signal.SIGCONT)
                        time.sleep(gap_s)  # the trainer is back in its minibatches
                        busy.append(first_token(marker))
                    else:
                        os.kill(pid, signal.SIGSTOP)
                        while not stopped(pid):
                            time.sleep(0.001)
                        time.sleep(gap_s)
                        quiet.append(first_token(None))
            finally:
                os.kill(pid, signal.SIGCONT)
                child.terminate()
                child.join(10)
        return quiet, busy

    os.environ["OMP_NUM_THREADS"] = "1"  # the children's BLAS, as the SuperNode sets it
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    for _ in range(5):
        first_token(None)  # warm up
    variants: dict[str, Any] = {}
    for label, batch_rows, check_rows, idle in YIELD_VARIANTS:
        quiet, busy = paired(batch_rows, check_rows, idle)
        variants[label] = {
            "idle_first_token_ms": round(1000 * median(quiet), 1),
            "training_first_token_ms": round(1000 * median(busy), 1),
            "ratio": round(median(busy) / median(quiet), 3),
        }
        print(f"training yields to serving, {label}: {variants[label]}", flush=True)
    return {"requests": requests, "gap_s": gap_s, "variants": variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the real-model part")
    parser.add_argument("--cohort-seeds", type=int, default=3)
    parser.add_argument("--population", type=int, default=300)
    parser.add_argument("--cohort", type=int, default=60)
    parser.add_argument("--max-chars", type=int, default=150_000, help="per device slice")
    parser.add_argument("--train-rows", type=int, default=20_000, help="positions per device")
    parser.add_argument("--clip", type=float, default=25.0, help="L2 clip of an update")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--anchor-weight", type=float, default=UTILITY_CONFIG.anchor_weight)
    parser.add_argument(
        "--epsilons", nargs="+", default=["inf", "8", "2"], help="rows of the DP table"
    )
    parser.add_argument("--flower-runs", type=int, default=1)
    parser.add_argument("--flower-rounds", type=int, default=2)
    parser.add_argument("--yield-requests", type=int, default=40, help="per state and lever")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["utility", "cohort", "flower", "yield"]
    )
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from coordinator.models.build import build_smollm2
    from coordinator.models.graph import GraphOptions
    from coordinator.models.tiny import build_tiny_model

    real_dir = build_smollm2().path
    tiny_dir = build_tiny_model(
        Path(tempfile.mkdtemp(prefix="nanofleet-bench-")), options=GraphOptions(accuracy_level=0)
    )[1].path
    figures: dict[str, Any] = {}
    if "utility" not in args.skip:
        figures["utility"] = utility_part(
            real_dir, rounds=args.rounds, seeds=args.seeds, rank=args.rank,
            max_chars=args.max_chars, train_rows=args.train_rows, clip=args.clip,
            epsilons=args.epsilons, anchor_weight=args.anchor_weight,
        )  # fmt: skip
    if "cohort" not in args.skip:
        figures["cohort"] = cohort_part(
            tiny_dir, rounds=args.rounds, population=args.population, cohort=args.cohort,
            seeds=args.cohort_seeds, clip=1.0,
        )  # fmt: skip
    if "flower" not in args.skip:
        figures["flower"] = flower_part(
            tiny_dir, real_dir, rounds=args.flower_rounds, runs=args.flower_runs,
            real_rank=args.rank,
        )  # fmt: skip
    if "yield" not in args.skip:
        figures["yield"] = yield_part(real_dir, requests=args.yield_requests)
        print(f"training yields to serving: {figures['yield']}", flush=True)
    print(json.dumps({"benchmark": "federated", **figures}, sort_keys=True))


if __name__ == "__main__":
    main()
