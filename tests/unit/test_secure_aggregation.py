"""Secure aggregation, DP clipping and noise, and dropouts, through the production apps.

The production ServerApp (``server_app._main``: ``DefaultWorkflow``, ``SecAggPlusWorkflow``
when ``secaggplus``, FedAvg under the fixed-denominator ``_ClientLevelDP``) drives
the production ClientApp (``client_app.app`` with its train mods: SecAgg+ around
``_clip_update``) over :class:`tests.support.inprocess_grid.InProcessGrid`. Only the
device's training is replaced: each device's fit returns the adapter it was sent plus a
known update.

Tolerances come from the run: SecAgg+ quantizes each value stochastically to a grid of
step ``2 * clipping_range / quantization_range`` (the ranges read from the setup message
the workflow sent), so each client's error is below one step and the mean's too.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from flwr.common import FitRes, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager

from agent.federated import client_app
from coordinator.federation import server_app
from tests.support.inprocess_grid import (
    Drop,
    InProcessGrid,
    at_secagg_stage,
    at_type,
    serverapp_identity,
)

Array = np.ndarray[Any, Any]
Update = tuple[Array, Array]

CLIP = 2.0
SEED = 7


@dataclass(frozen=True)
class Shape:
    hidden: int
    rank: int
    vocab: int

    @property
    def size(self) -> int:
        return self.hidden * self.rank + self.rank * self.vocab


SMALL = Shape(hidden=8, rank=2, vocab=24)
#: ~100k coordinates for the noise statistics.
LARGE = Shape(hidden=64, rank=4, vocab=25_000)


class _FakeDevice(NumPyClient):
    """A device whose training moves the adapter by a fixed update (or raises)."""

    def __init__(self, update: Update, fails: bool) -> None:
        self._update = update
        self._fails = fails

    def fit(
        self, parameters: list[Array], config: dict[str, Any]
    ) -> tuple[list[Array], int, dict[str, Any]]:
        if self._fails:
            raise MemoryError("the device ran out of memory while training")
        new = [
            np.asarray(p, np.float32) + u.astype(np.float32)
            for p, u in zip(parameters, self._update, strict=True)
        ]
        return new, 1, {"train_loss": 1.0, "steps": 1, "compute_s": 0.0}

    def evaluate(
        self, parameters: list[Array], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        return 1.0, 1, {"perplexity": 2.0, "base_perplexity": 2.0}


@dataclass
class Outcome:
    """What one ServerApp run left: its figures, its aggregate, what the strategy got."""

    grid: InProcessGrid
    start: list[Array]
    rows: list[dict[str, Any]]
    result: list[Array] | None
    #: Per ``aggregate_fit`` call: the parameters of each result (under SecAgg+ each is the
    #: unmasked mean) and the number of failures.
    fit_inputs: list[tuple[list[list[Array]], int]] = field(default_factory=list)
    #: The update each device handed to SecAgg+ for masking (after clipping), per node.
    masked_inputs: dict[int, list[Array]] = field(default_factory=dict)
    error: Exception | None = None
    #: The devices' node IDs, in the order of their updates.
    node_ids: list[int] = field(default_factory=list)

    def quantum(self) -> float:
        """One SecAgg+ quantization step, from the setup the workflow sent."""
        return self.grid.secagg_quantum()


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    """Flower's stochastic rounding and DP noise draw from NumPy's global generator."""
    state = np.random.get_state()
    np.random.seed(20261204)
    yield
    np.random.set_state(state)


def _updates(shape: Shape, norms: Sequence[float], seed: int = 1) -> list[Update]:
    rng = np.random.default_rng(seed)
    out = []
    for norm in norms:
        a = rng.normal(size=(shape.hidden, shape.rank))
        b = rng.normal(size=(shape.rank, shape.vocab))
        scale = norm / math.sqrt(float(np.sum(a * a) + np.sum(b * b))) if norm else 0.0
        out.append(((a * scale).astype(np.float32), (b * scale).astype(np.float32)))
    return out


def _clipped(update: Update, clip: float) -> list[Array]:
    arrays = [u.astype(np.float64) for u in update]
    norm = math.sqrt(sum(float(np.sum(a * a)) for a in arrays))
    return [a * min(1.0, clip / norm) if norm else a for a in arrays]


def _norm(arrays: Sequence[Array]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays))


def _run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    shape: Shape,
    updates: Sequence[Update],
    secaggplus: bool,
    min_nodes: int | None = None,
    noise: float = 0.0,
    drops: Mapping[int, Drop] | None = None,
    failing: frozenset[int] = frozenset(),
    unlist_dead: bool = False,
    extra: Mapping[str, Any] | None = None,
    outsiders: Sequence[Update] = (),
) -> Outcome:
    """One ServerApp run of one round; ``updates[i]`` is the update of node ``101 + i``,
    whose training raises when its node ID is in ``failing``. ``outsiders[i]`` is the
    update of node ``901 + i``, connected to the grid but not of the run's group."""
    cohort = len(updates)
    config: dict[str, Any] = {
        "output-dir": str(tmp_path / "out"),
        "num-rounds": 1,
        "cohort-size": cohort,
        "min-nodes": min_nodes or cohort,
        "seed": SEED,
        "hidden": shape.hidden,
        "vocab": shape.vocab,
        "rank": shape.rank,
        "noise-multiplier": noise,
        "clip-norm": CLIP,
        "secaggplus": secaggplus,
        "nodes": ",".join(str(101 + i) for i in range(cohort)),
        **(extra or {}),
    }
    node_ids = [101 + i for i in range(cohort)]
    by_node = dict(zip(node_ids, updates, strict=True))
    other_ids = [901 + i for i in range(len(outsiders))]
    by_node.update(zip(other_ids, outsiders, strict=True))

    def client_fn(ctx: Context) -> Any:
        nid = int(ctx.node_config["device"])
        return _FakeDevice(by_node[nid], nid in failing).to_client()

    monkeypatch.setattr(client_app, "_client_fn", client_fn)
    grid = InProcessGrid(
        apps={nid: client_app.app for nid in [*node_ids, *other_ids]},
        node_configs={nid: {"device": nid} for nid in [*node_ids, *other_ids]},
        drops=dict(drops or {}),
        unlist_dead=unlist_dead,
    )
    run = Outcome(
        grid=grid,
        start=server_app.initial_adapter(shape.hidden, shape.vocab, shape.rank, SEED),
        rows=[],
        result=None,
        node_ids=node_ids,
    )

    recorder_fit = server_app._Recorder.aggregate_fit

    def spy_fit(
        self: Any, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
    ) -> Any:
        run.fit_inputs.append(
            ([parameters_to_ndarrays(r.parameters) for _, r in results], len(failures))
        )
        return recorder_fit(self, server_round, results, failures)

    monkeypatch.setattr(server_app._Recorder, "aggregate_fit", spy_fit)
    mod = sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"]
    collect = mod._collect_masked_vectors

    def spy_collect(state: Any, configs: Any, num_examples: int, updated: Parameters) -> Any:
        run.masked_inputs[int(state.nid)] = parameters_to_ndarrays(updated)
        return collect(state, configs, num_examples, updated)

    monkeypatch.setattr(mod, "_collect_masked_vectors", spy_collect)

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    try:
        with serverapp_identity(grid.run_id):
            server_app._main(grid, context)
    except RuntimeError as exc:
        run.error = exc
    out = tmp_path / "out"
    metrics = out / server_app.METRICS_FILE
    if metrics.exists():
        run.rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    result = out / server_app.RESULT_FILE
    if result.exists():
        with np.load(result) as npz:
            run.result = [npz["lora_a"], npz["lora_b"]]
    return run


def _plain_mean(start: Sequence[Array], updates: Sequence[Update], clip: float) -> list[Array]:
    clipped = [_clipped(u, clip) for u in updates]
    return [
        np.asarray(s, np.float64) + np.mean([c[i] for c in clipped], axis=0)
        for i, s in enumerate(start)
    ]


def _partial_mean(
    start: Sequence[Array], updates: Sequence[Update], clip: float, cohort: int
) -> list[Array]:
    """The fixed-denominator aggregate of a round some devices left: the survivors' clipped
    updates summed over the whole cohort."""
    clipped = [_clipped(u, clip) for u in updates]
    return [
        np.asarray(s, np.float64) + np.sum([c[i] for c in clipped], axis=0) / cohort
        for i, s in enumerate(start)
    ]


def _max_error(got: Sequence[Array], want: Sequence[Array]) -> float:
    return max(
        float(np.max(np.abs(np.asarray(g, np.float64) - w))) for g, w in zip(got, want, strict=True)
    )


#: float32 rounding of the adapter values (|x| < 2) on the device and in result.npz.
F32 = 8 * float(np.finfo(np.float32).eps)


# --- SecAgg+ aggregate equals the plain mean -------------------------------------------------


def _two_bytes(cohort: int) -> dict[str, int]:
    """Ranges for 2-byte uploads: a modulus of 2**16 and the largest quantization range whose
    cohort sum (values and weight factors) stays below it."""
    return {"quantization-range": ((1 << 16) - 1) // cohort, "modulus-range": 1 << 16}


@pytest.mark.parametrize(
    ("norms", "extra"),
    [
        pytest.param([0.5, 1.0, 6.0], {}, id="3-clients-flower-ranges"),
        pytest.param([0.3, 1.5, 4.0, 0.8, 9.0], {}, id="5-clients-flower-ranges"),
        pytest.param([0.5, 1.0, 6.0], _two_bytes(3), id="3-clients-modulus-2**16"),
        pytest.param([0.3, 1.5, 4.0, 0.8, 9.0], _two_bytes(5), id="5-clients-modulus-2**16"),
        pytest.param(
            [0.5, 1.0, 6.0, 0.7, 1.9],
            {"clipping-range": 1.0, "quantization-range": 1 << 12},
            id="5-clients-coarse-grid",
        ),
    ],
)
def test_secaggplus_aggregate_equals_the_plain_mean_of_clipped_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, norms: list[float], extra: dict[str, Any]
) -> None:
    updates = _updates(SMALL, norms)
    secure = _run(
        tmp_path / "s", monkeypatch, shape=SMALL, updates=updates, secaggplus=True, extra=extra
    )
    plain = _run(tmp_path / "p", monkeypatch, shape=SMALL, updates=updates, secaggplus=False)
    want = _plain_mean(secure.start, updates, CLIP)
    assert secure.result is not None
    assert plain.result is not None
    assert {d.stage for d in secure.grid.log if d.message_type == "train"} == set(Stage.all())
    # The plain FedAvg path is the reference: equal to the clipped mean up to float32.
    assert _max_error(plain.result, want) <= F32
    step = secure.quantum()
    tolerance = step + F32
    # The bound is tight: leaving out any one client, or any overflow of the mod arithmetic
    # (an error of a whole clipping range), is far outside it.
    for left_out in range(len(updates)):
        others = [u for i, u in enumerate(updates) if i != left_out]
        assert _max_error(_plain_mean(secure.start, others, CLIP), want) > 20 * tolerance
    assert _max_error(secure.result, want) <= tolerance
    assert secure.rows[0]["fit_results"] == len(updates)
    assert secure.rows[0]["fit_failures"] == 0


# --- DP clipping bound -----------------------------------------------------------------------


@pytest.mark.parametrize("secaggplus", [False, True], ids=["plain", "secaggplus"])
def test_every_update_that_reaches_aggregation_is_within_the_clipping_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secaggplus: bool
) -> None:
    norms = [0.1 * CLIP, 0.9 * CLIP, 1.5 * CLIP, 40 * CLIP]
    updates = _updates(SMALL, norms)
    run = _run(tmp_path, monkeypatch, shape=SMALL, updates=updates, secaggplus=secaggplus)
    if secaggplus:
        # What each device handed to the SecAgg+ masking, i.e. after _clip_update.
        sent = dict(run.masked_inputs)
    else:
        # The fit replies, which is what the server aggregates without SecAgg+.
        sent = {
            r.metadata.src_node_id: parameters_to_ndarrays(
                compat.recorddict_to_fitres(r.content, keep_input=True).parameters
            )
            for r in run.grid.replies
            if r.metadata.message_type == "train"
        }
    assert sorted(sent) == run.node_ids
    for norm, update, nid in zip(norms, updates, run.node_ids, strict=True):
        params = sent[nid]
        delta = [params[0] - run.start[0], params[1] - run.start[1]]
        assert _norm(delta) <= CLIP * (1 + 1e-6)
        if norm < CLIP:  # below the bound: unchanged
            assert _max_error(delta, [u.astype(np.float64) for u in update]) <= F32
        else:  # above: scaled onto the bound, same direction
            assert _norm(delta) == pytest.approx(CLIP, rel=1e-5)
            assert _max_error(delta, _clipped(update, CLIP)) <= F32


# --- noise scale -----------------------------------------------------------------------------


@pytest.mark.parametrize("secaggplus", [False, True], ids=["plain", "secaggplus"])
def test_noise_on_the_mean_has_std_z_clip_over_cohort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secaggplus: bool
) -> None:
    z, cohort = 1.3, 3
    # Updates of norm 1e-9: "no change" (an exactly zero update is refused, see below).
    updates = _updates(LARGE, [1e-9] * cohort)
    # min-nodes differs from the cohort so that a noise scaled by the wrong count shows.
    run = _run(
        tmp_path,
        monkeypatch,
        shape=LARGE,
        updates=updates,
        secaggplus=secaggplus,
        min_nodes=2,
        noise=z,
    )
    assert run.result is not None
    noise = np.concatenate(
        [
            (np.asarray(r, np.float64) - s).ravel()
            for r, s in zip(run.result, run.start, strict=True)
        ]
    )
    n = noise.size
    sigma = z * CLIP / cohort
    assert n == LARGE.size >= 100_000
    assert run.rows[0]["noise_stddev"] == pytest.approx(sigma)
    # Sample std of n Gaussians: standard error sigma / sqrt(2n); mean: sigma / sqrt(n).
    # Five standard errors (~1.1 % of sigma here); SecAgg+'s quantization adds at most one
    # step of variance, negligible against sigma.
    assert abs(float(np.std(noise)) / sigma - 1) <= 5 / math.sqrt(2 * n)
    assert abs(float(np.mean(noise))) <= 5 * sigma / math.sqrt(n)


# --- dropouts --------------------------------------------------------------------------------

SECAGG_4 = {"num-shares": 4, "reconstruction-threshold": 3}


@pytest.mark.parametrize("ranges", [{}, _two_bytes(4)], ids=["flower-ranges", "modulus-2**16"])
def test_secaggplus_recovers_the_sum_of_the_survivors_when_one_node_drops_after_sharing_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranges: dict[str, int]
) -> None:
    updates = _updates(SMALL, [0.5, 1.0, 1.5, 3.0])
    dead = 104  # the fourth device: it shared its keys, then died before its masked vector
    run = _run(
        tmp_path,
        monkeypatch,
        shape=SMALL,
        updates=updates,
        secaggplus=True,
        min_nodes=3,
        drops={dead: Drop(at_secagg_stage(Stage.COLLECT_MASKED_VECTORS))},
        extra={**SECAGG_4, **ranges},
    )
    shared = {d.node_id for d in run.grid.log if d.stage == Stage.SHARE_KEYS and d.outcome == "ok"}
    assert dead in shared
    # The workflow unmasked the three survivors' sum (the dead node's pairwise masks
    # reconstructed from the shares it had sent) and counted the failure.
    assert len(run.fit_inputs) == 1
    results, failures = run.fit_inputs[0]
    # Flower 1.42's SecAgg+ workflow appends a dead node's error twice at that stage.
    assert len(results) == 3
    assert failures in (1, 2)
    want = _plain_mean(run.start, updates[:3], CLIP)
    for params in results:
        assert _max_error(params, want) <= run.quantum() + F32
    # With the dead node's update counted in, or without its masks removed, it would not be.
    assert _max_error(_plain_mean(run.start, updates, CLIP), want) > 20 * run.quantum()
    # The round goes on and applies the survivors' update with the fixed denominator:
    # start + (sum of the 3 clipped updates) / 4 (+ noise, none here).
    (row,) = run.rows
    assert (row["fit_results"], row["fit_failures"], row["aggregated"]) == (3, failures, True)
    assert (row["eval_nodes"], row["eval_failures"]) == (3, 1)
    assert run.result is not None
    assert _max_error(run.result, _partial_mean(run.start, updates[:3], CLIP, 4)) <= (
        run.quantum() + F32
    )


def test_secaggplus_halts_the_round_when_dropouts_leave_fewer_than_the_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _updates(SMALL, [0.5, 1.0, 1.5, 3.0])
    after_keys = Drop(at_secagg_stage(Stage.COLLECT_MASKED_VECTORS))
    run = _run(
        tmp_path,
        monkeypatch,
        shape=SMALL,
        updates=updates,
        secaggplus=True,
        min_nodes=3,
        drops={103: after_keys, 104: after_keys},
        extra=SECAGG_4,
    )
    # Secure aggregation stops before unmasking: the strategy gets nothing to aggregate,
    # the round's evaluation still runs, the run ends without an aggregate.
    assert run.fit_inputs == []
    assert not any(d.stage == Stage.UNMASK for d in run.grid.log)
    (row,) = run.rows
    assert "fit_results" not in row
    assert (row["eval_nodes"], row["eval_failures"]) == (2, 2)
    assert run.result is None
    assert isinstance(run.error, RuntimeError)
    assert "no round produced an aggregate" in str(run.error)


@pytest.mark.parametrize("how", ["node-unavailable", "client-app-raised"])
def test_plain_fedavg_round_goes_on_when_one_node_fails_mid_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    updates = _updates(SMALL, [0.5, 1.0, 1.5, 3.0])
    drops = {102: Drop(at_type("train"))} if how == "node-unavailable" else {}
    failing = frozenset({102} if how == "client-app-raised" else ())
    run = _run(
        tmp_path,
        monkeypatch,
        shape=SMALL,
        updates=updates,
        secaggplus=False,
        min_nodes=3,
        drops=drops,
        failing=failing,
    )
    outcomes = sorted(d.outcome for d in run.grid.log if d.message_type == "train")
    assert outcomes == sorted(
        ["ok", "ok", "ok", "dropped" if how == "node-unavailable" else "raised"]
    )
    results, failures = run.fit_inputs[0]
    assert len(results) == 3
    assert failures == 1
    survivors = [u for i, u in enumerate(updates) if i != 1]
    got = sorted(results, key=lambda p: _norm([p[0] - run.start[0], p[1] - run.start[1]]))
    for params, update in zip(got, survivors, strict=True):
        assert (
            _max_error(
                params, [s + c for s, c in zip(run.start, _clipped(update, CLIP), strict=True)]
            )
            <= F32
        )
    (row,) = run.rows
    assert (row["fit_results"], row["fit_failures"], row["aggregated"]) == (3, 1, True)
    assert row["eval_nodes"] == (3 if how == "node-unavailable" else 4)
    assert run.result is not None
    assert _max_error(run.result, _partial_mean(run.start, survivors, CLIP, 4)) <= F32


def test_a_round_with_fewer_answers_than_min_nodes_applies_no_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(
        tmp_path,
        monkeypatch,
        shape=SMALL,
        updates=_updates(SMALL, [0.5, 1.0, 1.5, 3.0]),
        secaggplus=False,
        min_nodes=4,
        failing=frozenset({103}),
    )
    (row,) = run.rows
    assert (row["fit_results"], row["fit_failures"], row["aggregated"]) == (3, 1, False)
    assert run.result is None


def test_a_device_that_did_not_move_the_adapter_does_not_fail_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _updates(SMALL, [0.5, 1.0, 0.0])
    run = _run(tmp_path, monkeypatch, shape=SMALL, updates=updates, secaggplus=False)
    assert [d.outcome for d in run.grid.log if d.message_type == "train"] == ["ok"] * 3
    assert run.result is not None
    assert _max_error(run.result, _plain_mean(run.start, updates, CLIP)) <= F32


def test_a_device_the_link_has_unlisted_does_not_stall_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[tuple[int, bool]] = []
    wait_for = SimpleClientManager.wait_for

    def bounded(self: SimpleClientManager, num_clients: int, timeout: int = 86400) -> bool:
        available = wait_for(self, num_clients, timeout=1)  # one second, not a day
        waits.append((num_clients, available))
        return available

    monkeypatch.setattr(SimpleClientManager, "wait_for", bounded)
    run = _run(
        tmp_path,
        monkeypatch,
        shape=SMALL,
        updates=_updates(SMALL, [0.5, 1.0, 1.5, 3.0]),
        secaggplus=True,
        min_nodes=3,
        drops={104: Drop(at_secagg_stage(Stage.COLLECT_MASKED_VECTORS))},
        unlist_dead=True,
        extra=SECAGG_4,
    )
    assert run.rows
    assert all(available for _, available in waits), waits


def test_no_more_than_the_cohort_takes_part_when_more_nodes_are_connected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _updates(SMALL, [0.5, 1.0, 1.5, 3.0])
    run = _run(
        tmp_path,
        monkeypatch,
        shape=SMALL,
        updates=updates,
        secaggplus=False,
        extra={"cohort-size": 3, "min-nodes": 3},
    )
    (row,) = run.rows
    assert (row["fit_results"], row["eval_nodes"]) == (3, 3)
    assert run.result is not None


def test_a_run_samples_only_the_nodes_of_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Six nodes of another group are connected too: sampling 3 of all 9 would pick only
    # the group's 1 time in 84 per round.
    updates = _updates(SMALL, [0.5, 1.0, 1.5])
    run = _run(
        tmp_path,
        monkeypatch,
        shape=SMALL,
        updates=updates,
        secaggplus=True,
        outsiders=_updates(SMALL, [3.0] * 6, seed=9),
        extra={"num-rounds": 2, **_two_bytes(3)},
    )
    assert [(row["fit_results"], row["eval_nodes"]) for row in run.rows] == [(3, 3), (3, 3)]
    reached = {d.node_id for d in run.grid.log}
    assert reached == set(run.node_ids), reached
    assert run.result is not None


def test_the_group_grid_refuses_a_message_to_a_node_outside_the_group() -> None:
    grid = InProcessGrid(
        apps={nid: client_app.app for nid in (101, 102, 901)},
        node_configs={nid: {"device": nid} for nid in (101, 102, 901)},
    )
    group = server_app._GroupGrid(grid, server_app.parse_nodes("101,102"))
    assert sorted(group.get_node_ids()) == [101, 102]
    with serverapp_identity(grid.run_id):
        msg = group.create_message(RecordDict(), "train", 901, "1")
        with pytest.raises(PermissionError, match="node 901 is not one of the run's group"):
            group.push_messages([msg])
        with pytest.raises(PermissionError, match="node 901"):
            group.send_and_receive([msg])
    assert grid.log == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "names no SuperNode"),
        ("12,x", "'x' is not a SuperNode ID"),
        ("0", "'0' is not a SuperNode ID"),
        (str(1 << 64), "is not a SuperNode ID"),
        ("-3", "'-3' is not a SuperNode ID"),
    ],
)
def test_parse_nodes_refuses_what_is_not_a_node_id(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        server_app.parse_nodes(value)
    assert server_app.parse_nodes(f" 5, {(1 << 64) - 1} ,5") == {5, (1 << 64) - 1}
