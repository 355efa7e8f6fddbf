"""run_round with a fake Flower driver that plays the ServerApp: what the registry and the
repository hold after a round that finishes, fails, is refused by the gate or by preflight.

:class:`FakeFlower` writes ``metrics.jsonl`` one round at a time and waits until the
campaign has recorded each round in the registry before it writes the next, so a test that
passes shows the figures are streamed while the run goes on, not read at the end.
"""

from __future__ import annotations

import json
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.errors import RefusedError, SigningKeyError
from coordinator.federation.campaign import (
    AdapterRelease,
    Canary,
    QualityGate,
    RoundFailedError,
    Stage,
    failure_reason,
    metric_of,
    run_round,
)
from coordinator.federation.rounds import RunSpec
from coordinator.federation.superlink import RunFailedError
from coordinator.registry import NotFoundError, Registry, RoundMetricView, RoundState
from coordinator.repository import KeyRing, Repository, env_passphrases
from coordinator.rollout.policy import PlanError, SizeUnit
from protocol.bundle import BundleKind, BundleManifest
from tests.support.repo_simulator import write_base_bundle

GROUP = "alpha"
DEVICES = ("kiosk-0", "kiosk-1", "kiosk-2")
#: The SuperNode IDs bound to DEVICES, and to a device of another group.
NODES = (101, 102, 103)
OTHER_GROUP_NODE = 201
PASSPHRASES = env_passphrases({"NANOFLEET_KEY_PASSPHRASE": "round test passphrase"})
ONLINE_ROLES = ("snapshot", "timestamp", "adapters", "channels")


@dataclass
class FakeFlower:
    """Plays the ServerApp: per round, one metrics line, then waits for it to be recorded."""

    recorded: RecordingProgress | None  # None: do not wait for each round to be recorded
    ratios: list[float] = field(default_factory=lambda: [0.97, 0.93])
    fail_after: int | None = None  # rounds written before the run fails
    runs: list[Path] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)

    def run(self, app_dir: Path, run_config: Mapping[str, Any], timeout_s: float) -> str:
        self.runs.append(app_dir)
        config = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
            "config"
        ]
        self.configs.append(config)
        output = Path(config["output-dir"])
        output.mkdir(parents=True, exist_ok=True)
        for number in range(1, int(config["num-rounds"]) + 1):
            if self.fail_after is not None and number > self.fail_after:
                raise RunFailedError("flwr run failed (1):\nSuperNode kiosk-2 went away")
            row = {
                "round": number,
                "fit_results": 3,
                "fit_failures": 0,
                "aggregated": True,
                "train_loss": 2.0 / number,
                "eval_nodes": 3,
                "eval_perplexity": 12.0 - number,
                "perplexity_ratio": self.ratios[number - 1],
            }
            with open(output / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            # The next round starts only once this one is in the registry: streaming.
            if self.recorded is not None and not self.recorded.wait_for(number, timeout_s=10.0):
                raise AssertionError(f"round {number} was not recorded while the run went on")
        rng = np.random.default_rng(0)
        hidden, vocab, rank = int(config["hidden"]), int(config["vocab"]), int(config["rank"])
        np.savez(
            output / "result.npz",
            lora_a=rng.normal(size=(hidden, rank)).astype(np.float32),
            lora_b=rng.normal(scale=0.01, size=(rank, vocab)).astype(np.float32),
        )
        return "run finished"


class RecordingProgress:
    """Remembers stages and recorded rounds; lets the fake wait for a round."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.rounds: list[RoundMetricView] = []
        self._changed = threading.Condition()

    def stage(self, stage: Stage) -> None:
        self.stages.append(stage)

    def round_recorded(self, metric: RoundMetricView) -> None:
        with self._changed:
            self.rounds.append(metric)
            self._changed.notify_all()

    def wait_for(self, number: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: any(m.number == number for m in self.rounds), timeout_s
            )


@dataclass(frozen=True)
class Coordinator:
    """A repository with the base published, the coordinator's online keys, a registry with
    the group's devices."""

    repo_path: Path
    online_keys: Path
    base: BundleManifest
    registry: Registry

    def repository(self, roles: tuple[str, ...] = ONLINE_ROLES) -> Repository:
        if roles == ONLINE_ROLES:
            return Repository(self.repo_path, KeyRing([self.online_keys], PASSPHRASES))
        partial = self.online_keys.parent / f"keys-{'-'.join(roles)}"
        for role in roles:
            (partial / role).mkdir(parents=True, exist_ok=True)
            for file in (self.online_keys / role).iterdir():
                (partial / role / file.name).write_bytes(file.read_bytes())
        return Repository(self.repo_path, KeyRing([partial], PASSPHRASES))


def make_coordinator(work: Path, registry: Registry) -> Coordinator:
    offline, online = work / "offline-keys", work / "online-keys"
    everything = KeyRing([offline, online], PASSPHRASES)
    for role in ("root", "targets"):
        everything.create(role)
    for role in ONLINE_ROLES:
        KeyRing([online], PASSPHRASES).create(role)
    repo_path = work / "repo"
    repo = Repository.init(repo_path, everything)
    base = write_base_bundle(work / "base")
    repo.add_bundle(work / "base")
    repo.point(GROUP, "stable", base.name, base.version)
    for device, node in zip(DEVICES, NODES, strict=True):
        registry.register_device(device, groups=[GROUP], actor="test")
        registry.bind_federation_node(device, node, key_sha256=f"{node:064x}", actor="test")
    registry.register_device("till-0", groups=["beta"], actor="test")
    registry.bind_federation_node(
        "till-0", OTHER_GROUP_NODE, key_sha256=f"{OTHER_GROUP_NODE:064x}", actor="test"
    )
    return Coordinator(repo_path, online, base, registry)


@pytest.fixture
def coordinator(tmp_path: Path, sqlite_registry: Registry) -> Coordinator:
    return make_coordinator(tmp_path, sqlite_registry)


def spec(round_id: str = "alpha-r1", **changes: Any) -> RunSpec:
    values: dict[str, Any] = {
        "round_id": round_id,
        "group": GROUP,
        "rounds": 2,
        "cohort_size": 3,
        "min_nodes": 3,
        "secaggplus": True,
        "clip_norm": 1.0,
        "noise_multiplier": 0.5,
        "rank": 4,
        **changes,
    }
    return RunSpec(**values)


def start(
    c: Coordinator,
    work: Path,
    *,
    flower: FakeFlower | None = None,
    progress: RecordingProgress | None = None,
    run: RunSpec | None = None,
    repository: Repository | None = None,
    **options: Any,
) -> Any:
    progress = progress or RecordingProgress()
    return run_round(
        run or spec(),
        base=c.base,
        registry=c.registry,
        repository=repository or c.repository(),
        driver=flower or FakeFlower(progress),
        work_dir=work,
        release=options.pop("release", AdapterRelease("alpha-tuned", "r1")),
        progress=progress,
        poll_s=0.01,
        actor="operator",
        **options,
    )


def test_each_round_is_recorded_while_the_run_goes_on_and_the_release_is_published(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    progress = RecordingProgress()
    outcome = start(coordinator, tmp_path / "round", progress=progress)

    run = coordinator.registry.get_round("alpha-r1")
    assert run.state is RoundState.FINISHED
    assert [(m.number, m.participants, m.loss, m.perplexity) for m in run.metrics] == [
        (1, 3, 2.0, 11.0),
        (2, 3, 1.0, 10.0),
    ]
    assert [m.number for m in progress.rounds] == [1, 2]  # each once, in order
    assert run.manifest["result_sha256"] == outcome.result.manifest.result_sha256
    assert run.manifest["privacy"]["epsilon"] is not None
    assert progress.stages == list(Stage)
    # Signed with the adapters key, bound to the base, recorded as a release, channel moved.
    published = coordinator.repository().find("alpha-tuned", "r1")
    assert published is not None
    assert published.manifest.kind is BundleKind.ADAPTER
    assert published.manifest.adapter is not None
    assert published.manifest.adapter.provenance is not None
    assert published.manifest.adapter.provenance.round_id == "alpha-r1"
    assert coordinator.registry.find_release("alpha-tuned", "r1").id == outcome.release.id
    [pointer] = [p for p in coordinator.repository().channels() if p.group == GROUP]
    assert pointer.adapter is not None
    assert pointer.adapter.sha256 == published.sha256
    assert outcome.rollout is None
    assert failure_reason(coordinator.registry, "alpha-r1") is None


def test_a_canary_rollout_of_the_release_is_created_and_the_group_pointer_stays(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    canary = Canary(devices=1, soak_s=60, max_eval_regression=0.03)
    outcome = start(coordinator, tmp_path / "round", canary=canary)

    rollout = outcome.rollout
    assert rollout is not None
    assert rollout.release.id == outcome.release.id
    assert rollout.selector.groups == (GROUP,)
    assert [(w.size.unit, w.size.value, w.device_count) for w in rollout.waves] == [
        (SizeUnit.COUNT, 1, 1),
        (SizeUnit.PERCENT, 100, 2),
    ]
    assert all(w.soak_s == 60 for w in rollout.waves)
    assert rollout.thresholds.max_eval_regression == 0.03
    # The waves, not the group's pointer, bring the adapter to the devices.
    [pointer] = [p for p in coordinator.repository().channels() if p.group == GROUP]
    assert pointer.adapter is None


def test_a_failed_run_is_recorded_failed_with_its_reason_and_nothing_is_published(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    progress = RecordingProgress()
    flower = FakeFlower(progress, fail_after=1)
    with pytest.raises(RoundFailedError) as caught:
        start(coordinator, tmp_path / "round", flower=flower, progress=progress)

    assert caught.value.stage is Stage.RUN
    run = coordinator.registry.get_round("alpha-r1")
    assert run.state is RoundState.FAILED
    assert [m.number for m in run.metrics] == [1]  # what arrived before the failure
    reason = failure_reason(coordinator.registry, "alpha-r1")
    assert reason is not None
    assert reason.startswith("run: ")
    assert "kiosk-2 went away" in reason
    _nothing_published(coordinator)


def test_an_aggregate_that_worsens_held_out_perplexity_is_not_published(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    progress = RecordingProgress()
    flower = FakeFlower(progress, ratios=[0.99, 1.04])
    with pytest.raises(RoundFailedError, match=r"ratio 1\.0400 exceeds 1\.0000") as caught:
        start(coordinator, tmp_path / "round", flower=flower, progress=progress)

    assert caught.value.stage is Stage.GATE
    run = coordinator.registry.get_round("alpha-r1")
    assert run.state is RoundState.FAILED
    assert run.manifest["result_sha256"] is not None  # the run's manifest is kept
    assert len(run.metrics) == 2
    _nothing_published(coordinator)


def test_a_looser_gate_lets_a_small_regression_through(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    progress = RecordingProgress()
    flower = FakeFlower(progress, ratios=[0.99, 1.04])
    outcome = start(
        coordinator,
        tmp_path / "round",
        flower=flower,
        progress=progress,
        gate=QualityGate(max_perplexity_ratio=1.05),
    )
    assert outcome.round.state is RoundState.FINISHED


def _nothing_published(c: Coordinator) -> None:
    assert c.repository().find("alpha-tuned", "r1") is None
    with pytest.raises(NotFoundError):
        c.registry.find_release("alpha-tuned", "r1")
    assert c.registry.list_rollouts() == []


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("unknown_group", RefusedError, "group 'gamma' has no registered devices"),
        ("rank_above_base", RefusedError, "rank 16 is outside 1..8"),
        ("secaggplus_needs_three", RefusedError, "SecAgg\\+ needs at least 3 devices"),
        ("no_adapters_key", SigningKeyError, "adapters role needs 1 key"),
        ("no_channels_key", SigningKeyError, "channels role needs 1 key"),
        ("release_exists", RefusedError, "tiny 1.0.0 is already published"),
        ("canary_too_big", PlanError, "wave size 0 devices"),
        ("epsilon_over_the_limit", RefusedError, "over the limit of 1000"),
        (
            "fewer_supernodes_than_the_cohort",
            RefusedError,
            "3 of its 4 devices have a SuperNode bound, fewer than the cohort of 4",
        ),
    ],
)
def test_preflight_refuses_before_anything_is_recorded_or_trained(
    coordinator: Coordinator, tmp_path: Path, case: str, error: type[Exception], message: str
) -> None:
    progress = RecordingProgress()
    flower = FakeFlower(progress)
    options: dict[str, Any] = {}
    run = spec()
    if case == "unknown_group":
        run = spec(group="gamma")
    elif case == "rank_above_base":
        run = spec(rank=16)
    elif case == "secaggplus_needs_three":
        run = spec(cohort_size=2, min_nodes=2)
    elif case == "no_adapters_key":
        options["repository"] = coordinator.repository(("snapshot", "timestamp", "channels"))
    elif case == "no_channels_key":
        options["repository"] = coordinator.repository(("snapshot", "timestamp", "adapters"))
    elif case == "release_exists":
        options["release"] = AdapterRelease("tiny", "1.0.0")
    elif case == "canary_too_big":
        options["canary"] = Canary(devices=0)
    elif case == "epsilon_over_the_limit":
        run = spec(noise_multiplier=0.02)
    elif case == "fewer_supernodes_than_the_cohort":
        coordinator.registry.register_device("kiosk-3", groups=[GROUP], actor="test")
        run = spec(cohort_size=4, min_nodes=4)
    with pytest.raises(error, match=message):
        start(coordinator, tmp_path / "round", flower=flower, progress=progress, run=run, **options)
    assert flower.runs == []
    assert coordinator.registry.list_rounds() == []


def test_the_run_samples_only_the_supernodes_of_its_group(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    flower = FakeFlower(None)
    start(coordinator, tmp_path / "round", flower=flower)
    (config,) = flower.configs
    # The ServerApp's run config names the group's nodes; the other group's is not there.
    assert config["nodes"] == ",".join(str(n) for n in NODES)
    assert str(OTHER_GROUP_NODE) not in config["nodes"].split(",")


def test_a_canary_without_the_channels_key_is_fine(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    repository = coordinator.repository(("snapshot", "timestamp", "adapters"))
    outcome = start(coordinator, tmp_path / "round", repository=repository, canary=Canary())
    assert outcome.rollout is not None


def test_canary_waves_fit_small_groups() -> None:
    assert [str(w.size) for w in Canary(devices=1).waves(1)] == ["100%"]
    assert [str(w.size) for w in Canary(devices=2).waves(5)] == ["2 devices", "100%"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"round": 1, "fit_results": 3, "train_loss": 1.5, "eval_perplexity": 9.0},
            (1, 3, 1.5, 9.0),
        ),
        # Noise drowned the adapter: the perplexity overflowed; not a figure to plot.
        (
            {"round": 2, "fit_results": 2, "train_loss": None, "eval_perplexity": 1e400},
            (2, 2, None, None),
        ),
        ({"round": 3}, (3, 0, None, None)),
    ],
)
def test_metric_of_maps_a_server_app_row(row: dict[str, Any], expected: tuple[Any, ...]) -> None:
    m = metric_of(row)
    assert (m.number, m.participants, m.loss, m.perplexity) == expected


def test_metric_of_refuses_a_row_without_a_round() -> None:
    with pytest.raises(RefusedError):
        metric_of({"fit_results": 3})
