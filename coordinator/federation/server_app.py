"""The Flower ServerApp of a personalization run: the coordinator's only flwr importer
(:mod:`coordinator.federation.superlink` runs Flower's processes and CLI without importing it).

FedAvg over the LM-head adapter ``(A [hidden, r], B [r, vocab])`` in Flower's legacy
workflow API, because SecAgg+ exists only there:

- every run clips each device's update ``new - sent`` to ``clip-norm`` on the device
  (``fixedclipping_mod``), sums the updates of the devices that answered over the cohort
  and adds Gaussian noise of std ``noise-multiplier x clip-norm / cohort``
  (:class:`_ClientLevelDP`): client-level DP whose epsilon
  :mod:`coordinator.federation.accountant` reports. ``noise-multiplier`` 0 is clipping
  only (epsilon infinite). A round goes on when devices die mid-round as long as
  ``min-nodes`` answer;
- ``secaggplus = true`` runs the SecAgg+ workflow: the server only ever sees the sum.
  Devices report one example each, so the mean is unweighted (the DP sensitivity
  ``clip/cohort`` assumes equal weights) and SecAgg+'s ``max_weight`` is 1. The run config
  names ``quantization-range`` and ``modulus-range``
  (:func:`coordinator.federation.rounds.secaggplus_ranges`: 2**16 for cohorts up to 63,
  whose devices then send 2 bytes per masked value); the server sums whatever unsigned or
  int64 arrays arrive, which is exact mod a power-of-two modulus.

A run trains only its group's devices: the run config's ``nodes`` lists the SuperNode IDs
the coordinator bound to the group's devices when their keys were registered
(:class:`_GroupGrid`); every other node the SuperLink serves (another group's, or a
registered one not yet bound) is invisible to the run and never gets a message.

Each round's fit and evaluate figures are appended to ``<output-dir>/metrics.jsonl``; the
final aggregate is written to ``<output-dir>/result.npz`` (``lora_a``, ``lora_b``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.supercore.run import Run

__all__ = ["METRICS_FILE", "RESULT_FILE", "app", "initial_adapter", "parse_nodes"]

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.npz"
#: Keys of the run config that are handed to devices as their local training settings.
DEVICE_KEYS = (
    "epochs",
    "learning-rate",
    "batch-rows",
    "l2",
    "max-steps",
    "max-compute-s",
    "window",
    "max-rows",
    "anchor-weight",
    "anchor-rows",
    "check-rows",
)

Array = np.ndarray[Any, Any]


def initial_adapter(hidden: int, vocab: int, rank: int, seed: int) -> list[Array]:
    """The LoRA start every device gets: ``A`` Gaussian (std ``1/sqrt(hidden)``), ``B`` zero,
    so the first adapter leaves the base model's logits unchanged."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0 / math.sqrt(hidden), size=(hidden, rank)).astype(np.float32)
    return [a, np.zeros((rank, vocab), dtype=np.float32)]


class _Recorder(Strategy):
    """Delegates to ``inner``; keeps the latest aggregate and writes per-round figures."""

    def __init__(self, inner: Strategy, output_dir: Path, constants: dict[str, Any]) -> None:
        self.inner = inner
        self.output_dir = output_dir
        self.constants = constants
        self.latest: Parameters | None = None
        self._round: dict[int, dict[str, Any]] = {}

    def _write(self, server_round: int, **figures: Any) -> None:
        row = self._round.setdefault(server_round, {"round": server_round, **self.constants})
        row.update(figures)
        if "eval_nodes" in row:
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if params is not None:
            self.latest = params
        losses = [float(r.metrics.get("train_loss", 0.0)) for _, r in results if r.metrics]
        compute = [float(r.metrics.get("compute_s", 0.0)) for _, r in results if r.metrics]
        prep = [float(r.metrics.get("prep_s", 0.0)) for _, r in results if r.metrics]
        self._write(
            server_round,
            fit_results=len(results),
            fit_failures=len(failures),
            aggregated=params is not None,
            train_loss=float(np.mean(losses)) if losses else None,
            # Devices train in parallel: the round waits for the slowest.
            train_compute_s=max(compute) if compute else 0.0,
            # The frozen model's passes over each device's texts and anchor (cached after
            # a run's first message): training compute too, reported apart.
            train_prep_s=max(prep) if prep else 0.0,
        )
        return params, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> Any:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[Any],
    ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = self.inner.aggregate_evaluate(server_round, results, failures)
        ratios = [
            float(r.metrics["perplexity"]) / float(r.metrics["base_perplexity"])
            for _, r in results
            if "perplexity" in r.metrics and "base_perplexity" in r.metrics
        ]
        self._write(
            server_round,
            eval_nodes=len(results),
            eval_failures=len(failures),
            eval_nll=loss,
            eval_perplexity=math.exp(loss) if loss is not None else None,
            perplexity_ratio=float(np.mean(ratios)) if ratios else None,
            device_perplexity=sorted(float(r.metrics["perplexity"]) for _, r in results),
            eval_compute_s=max(
                (float(r.metrics.get("compute_s", 0.0)) for _, r in results), default=0.0
            ),
        )
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> Any:
        return self.inner.evaluate(server_round, parameters)


class _CohortFedAvg(FedAvg):
    """FedAvg that samples at most ``cohort`` of the connected nodes: the DP denominator
    and the accountant's sampling rate assume no more take part."""

    def __init__(self, *, cohort: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cohort = cohort

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        sample, needed = super().num_fit_clients(num_available_clients)
        return min(sample, self.cohort), needed

    def num_evaluation_clients(self, num_available_clients: int) -> tuple[int, int]:
        sample, needed = super().num_evaluation_clients(num_available_clients)
        return min(sample, self.cohort), needed


class _ClientLevelDP(DifferentialPrivacyClientSideFixedClipping):
    """Client-level DP over device-clipped updates, with a fixed denominator.

    Flower's wrapper (whose ``configure_fit`` this keeps: it sends the clipping norm to the
    devices' ``fixedclipping_mod``) applies no update to a round in which any device
    failed, so one device that dies mid-round costs the whole round. Here a round applies
    ``sent + (sum of the k clipped updates) / cohort + N(0, (z * clip / cohort)^2)`` when
    ``k >= min_nodes`` devices answered, and nothing below that. The denominator is the
    cohort whatever ``k``: one device changes the sum by at most ``clip``, so the mean's
    sensitivity is ``clip / cohort`` and the noise multiplier ``z`` (hence the accountant's
    epsilon) holds for partial rounds too (the fixed-denominator estimator of DP-FedAvg,
    McMahan et al. 2018); the update is only shrunk by ``k / cohort``.

    The inner FedAvg gives the survivors' mean (each device reports one example; with
    SecAgg+ every result carries the unmasked mean of the survivors).
    """

    def __init__(
        self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float,
        cohort: int, min_nodes: int,
    ) -> None:  # fmt: skip
        super().__init__(strategy, noise_multiplier, clipping_norm, cohort)
        self.min_nodes = min_nodes
        self._sent: Parameters | None = None
        self._rng = np.random.default_rng(secrets.randbits(128))

    @property
    def noise_stddev(self) -> float:
        return self.noise_multiplier * self.clipping_norm / self.num_sampled_clients

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._sent = parameters
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if len(results) < self.min_nodes or self._sent is None:
            return None, {}
        mean, metrics = self.strategy.aggregate_fit(server_round, results, [])
        if mean is None:
            return None, {}
        share = len(results) / self.num_sampled_clients
        new = [
            sent + share * (got - sent) + self._noise(sent.shape)
            for sent, got in zip(
                parameters_to_ndarrays(self._sent), parameters_to_ndarrays(mean), strict=True
            )
        ]
        return ndarrays_to_parameters([a.astype(np.float32) for a in new]), metrics

    def _noise(self, shape: tuple[int, ...]) -> Array:
        if self.noise_multiplier == 0:
            return np.zeros(shape, np.float64)
        return self._rng.normal(0.0, self.noise_stddev, size=shape)


def _strategy(config: dict[str, Any], output_dir: Path) -> _Recorder:
    cohort = int(config["cohort-size"])
    min_nodes = int(config["min-nodes"])
    device_config: dict[str, Scalar] = {k: config[k] for k in DEVICE_KEYS if k in config}

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {**device_config, "seed": int(config["seed"]) * 1000 + server_round}

    fedavg = _CohortFedAvg(
        cohort=cohort,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=min_nodes,
        min_evaluate_clients=min_nodes,
        # Not the cohort: a device the SuperLink has unlisted (dead) must not make every
        # later round wait for it. _main waits for the whole cohort before the first round.
        min_available_clients=min_nodes,
        on_fit_config_fn=fit_config,
        on_evaluate_config_fn=lambda _round: dict(device_config),
        initial_parameters=ndarrays_to_parameters(
            initial_adapter(
                int(config["hidden"]),
                int(config["vocab"]),
                int(config["rank"]),
                int(config["seed"]),
            )
        ),
    )
    dp = _ClientLevelDP(
        fedavg,
        noise_multiplier=float(config["noise-multiplier"]),
        clipping_norm=float(config["clip-norm"]),
        cohort=cohort,
        min_nodes=min_nodes,
    )
    constants = {
        "secaggplus": bool(config.get("secaggplus", False)),
        "noise_stddev": dp.noise_stddev,
        "clip_norm": dp.clipping_norm,
    }
    return _Recorder(dp, output_dir, constants)


def parse_nodes(value: object) -> frozenset[int]:
    """The run config's ``nodes``: SuperNode IDs, comma-separated decimal (they are
    unsigned 64-bit, beyond the run config's signed integers).

    Raises:
        ValueError: no ID, or one that is not an unsigned 64-bit decimal.
    """
    text = str(value).strip()
    ids: set[int] = set()
    for part in text.split(",") if text else []:
        part = part.strip()
        if not part.isdecimal() or not 0 < int(part) < 1 << 64:
            raise ValueError(f"nodes: {part!r} is not a SuperNode ID (an unsigned 64-bit integer)")
        ids.add(int(part))
    if not ids:
        raise ValueError("nodes: the run names no SuperNode of its group")
    return frozenset(ids)


class _GroupGrid(Grid):
    """The SuperLink as the run sees it: only the nodes of the run's group.

    The legacy workflow learns of nodes from :meth:`get_node_ids` (its client manager polls
    it), so a node missing here is never sampled, never counted toward the cohort, and
    gets no SecAgg+ stage; a message addressed to one anyway is refused before it leaves.
    """

    def __init__(self, inner: Grid, nodes: frozenset[int]) -> None:
        self._inner = inner
        self.nodes = nodes

    def set_run(self, run: Run) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        return self._inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid in self._inner.get_node_ids() if nid in self.nodes]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(self._checked(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._inner.send_and_receive(self._checked(messages), timeout=timeout)

    def _checked(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for msg in out:
            if msg.metadata.dst_node_id not in self.nodes:
                raise PermissionError(
                    f"node {msg.metadata.dst_node_id} is not one of the run's group"
                )
        return out


def _wait_for_cohort(
    grid: Grid, cohort: int, timeout_s: float, sleep: Callable[[float], None] = time.sleep
) -> int:
    """Wait until ``cohort`` nodes are connected or ``timeout_s`` passed; the count seen.

    The first round then samples every connected node (at least ``min-nodes``, which
    FedAvg waits for)."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = len(list(grid.get_node_ids()))
        if seen >= cohort or time.monotonic() >= deadline:
            return seen
        sleep(1.0)


app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    output_dir = Path(str(config["output-dir"]))
    output_dir.mkdir(parents=True, exist_ok=True)
    recorder = _strategy(config, output_dir)
    grid = _GroupGrid(grid, parse_nodes(config.get("nodes", "")))
    _wait_for_cohort(grid, int(config["cohort-size"]), float(config.get("join-timeout-s", 600)))
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=int(config["num-rounds"])), strategy=recorder
    )
    if bool(config.get("secaggplus", False)):
        cohort = int(config["cohort-size"])
        fit_workflow = SecAggPlusWorkflow(
            num_shares=int(config.get("num-shares", cohort)),
            reconstruction_threshold=int(config.get("reconstruction-threshold", 2)),
            max_weight=1.0,
            clipping_range=float(config.get("clipping-range", 8.0)),
            quantization_range=int(config.get("quantization-range", 1 << 22)),
            modulus_range=int(config.get("modulus-range", 1 << 32)),
        )
        workflow = DefaultWorkflow(fit_workflow=fit_workflow)
    else:
        workflow = DefaultWorkflow()
    workflow(grid, legacy)
    if recorder.latest is None:
        raise RuntimeError("no round produced an aggregate")
    a, b = parameters_to_ndarrays(recorder.latest)
    tmp = output_dir / f".{RESULT_FILE}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, lora_a=np.asarray(a, np.float32), lora_b=np.asarray(b, np.float32))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output_dir / RESULT_FILE)
