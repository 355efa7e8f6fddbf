"""Federated personalization end to end: a real SuperLink and three real SuperNodes.

One run (module fixture) on the tiny model: three devices of group ``alpha`` each hold
their own slice of the NumPy documentation; 2 rounds with SecAgg+ and client-level DP
(clipping + Gaussian noise); the devices reach the SuperLink through a TLS-terminating
proxy that records everything they send. The run goes through the operator's workflow
(:func:`coordinator.federation.campaign.run_round`): the registry records it and each
round's figures, the aggregate is packaged as an adapter bundle bound to the base model,
signed by the adapters key (the coordinator holds no root or targets key), recorded as a
release and pointed at by the group's channel; the device's OTA client verifies it and the
runtime loads it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.federated.datastore import LocalTextStore, Split
from agent.ota.client import RepositoryClient
from agent.ota.fetcher import HttpFetcher
from agent.runtime import SamplingParams
from agent.runtime.engine import Engine
from coordinator.demo.domain_data import device_slices
from coordinator.federation.campaign import AdapterRelease, RoundOutcome, metric_of, run_round
from coordinator.federation.nodes import register_device_node
from coordinator.federation.rounds import RunResult, RunSpec
from coordinator.registry import Registry, RoundState, open_registry
from coordinator.repository import KeyRing, Repository, env_passphrases
from protocol.bundle import MANIFEST_NAME, BundleManifest, bundle_hash, canonical_json
from tests.support.federation import Fleet
from tests.support.ota_fleet import RepoServer
from tests.support.ota_models import build_ota_model

pytestmark = pytest.mark.slow

SPEC = RunSpec(
    round_id="alpha-r1",
    group="alpha",
    rounds=2,
    cohort_size=3,
    min_nodes=3,
    secaggplus=True,
    clip_norm=5.0,
    noise_multiplier=0.05,
    rank=4,
    seed=3,
    device={
        "epochs": 3,
        "learning-rate": 0.03,
        "batch-rows": 64,
        "l2": 0.0,
        "max-steps": 400,
        "max-compute-s": 30.0,
        "window": 64,
        "max-rows": 3000,
    },
    timeout_s=240.0,
)


@dataclass(frozen=True)
class Round:
    outcome: RoundOutcome
    fleet: Fleet
    uploaded: bytes
    texts: dict[str, list[str]]
    work: Path
    model_dir: Path
    registry: Registry
    repo_path: Path

    @property
    def result(self) -> RunResult:
        return self.outcome.result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A "well-spoken" tiny model: greedy answers are printable text, so they compare as text.
    return build_ota_model(tmp_path_factory.mktemp("fed-model"), seed=11)


def _release_repository(work: Path, model_dir: Path) -> Repository:
    """The repository with the base signed in by the operator's offline keys, opened with
    the coordinator's keys only (online roles and the delegated adapters and channels)."""
    offline, online = work / "offline-keys", work / "online-keys"
    passphrases = env_passphrases({"NANOFLEET_KEY_PASSPHRASE": "test passphrase"})
    everything = KeyRing([offline, online], passphrases)
    for role in ("root", "targets"):
        everything.create(role)
    coordinator_keys = KeyRing([online], passphrases)
    for role in ("snapshot", "timestamp", "adapters", "channels"):
        coordinator_keys.create(role)
    repo_path = work / "repo"
    Repository.init(repo_path, everything).add_bundle(model_dir)
    return Repository(repo_path, coordinator_keys)


@pytest.fixture(scope="module")
def federated_round(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Round]:
    work = tmp_path_factory.mktemp("federation")
    os.environ["FLWR_HOME"] = str(work / "flwr-home")
    base = BundleManifest.model_validate_json((model_dir / MANIFEST_NAME).read_bytes())
    repository = _release_repository(work, model_dir)
    registry = open_registry(f"sqlite:///{work / 'registry.sqlite3'}")
    texts: dict[str, list[str]] = {}
    with Fleet(work, model_dir) as fleet:

        def register(name: str, public_key: Path) -> int:
            # What `nanofleet round register-node` does: the SuperLink's node ID, bound.
            return register_device_node(registry, fleet.cli, name, public_key, actor="test").node_id

        for piece in device_slices("alpha", devices=3, max_chars=6000):
            name = f"kiosk-{piece.index}"
            texts[name] = piece.train_texts() + piece.heldout_texts()
            registry.register_device(name, groups=["alpha"], actor="test")
            fleet.add_device(name, texts[name], registrar=register)
        # A fourth box whose node key the operator never registered.
        fleet.add_device("intruder", texts["kiosk-0"][:3], register=False)
        # A fifth, registered and connected, of another group (another domain's text).
        (other,) = device_slices("beta", devices=1, max_chars=6000)
        texts["till-0"] = other.train_texts() + other.heldout_texts()
        registry.register_device("till-0", groups=["beta"], actor="test")
        fleet.add_device("till-0", texts["till-0"], registrar=register)
        outcome = run_round(
            SPEC,
            base=base,
            registry=registry,
            repository=repository,
            driver=fleet.cli,
            work_dir=work / "round",
            release=AdapterRelease("alpha-tuned", "1", channel="stable"),
            canary=None,
            poll_s=0.5,
        )
        uploaded = fleet.proxy.uploaded()
        yield Round(outcome, fleet, uploaded, texts, work, model_dir, registry, repository.path)
    registry.engine.dispose()


def test_three_supernodes_run_two_rounds_with_secagg_and_dp(federated_round: Round) -> None:
    result = federated_round.result
    assert [r["round"] for r in result.rounds] == [1, 2]
    for row in result.rounds:
        assert row["secaggplus"] is True
        assert row["noise_stddev"] == pytest.approx(0.05 * 5.0 / 3)
        assert row["fit_results"] >= 1
        assert row["fit_failures"] == 0
        assert row["eval_nodes"] == 3
        assert row["aggregated"]
    manifest = result.manifest
    assert manifest.aggregation.kind == "secaggplus"
    assert manifest.privacy is not None
    assert manifest.privacy.epsilon is not None
    assert manifest.privacy.epsilon > 0
    assert manifest.finished_at is not None
    # The adapter learned the domain: held-out perplexity of every device went down.
    assert result.rounds[-1]["perplexity_ratio"] < 0.99
    # The devices' SuperNodes authenticated with TLS and node keys and ran installed code.
    registered = federated_round.fleet.devices[:3]
    for device in registered:
        assert "Start `flwr-clientapp` process" in device.node.log_text()


def test_an_unregistered_node_is_refused(federated_round: Round) -> None:
    intruder = federated_round.fleet.devices[3]
    assert intruder.name == "intruder"
    # It never got a message, and the rounds ran on the three registered devices only.
    assert "Received successfully" not in intruder.node.log_text()
    assert "Start `flwr-clientapp` process" not in intruder.node.log_text()
    assert all(row["eval_nodes"] == 3 for row in federated_round.result.rounds)


def test_a_device_of_another_group_takes_no_part(federated_round: Round) -> None:
    other = federated_round.fleet.devices[4]
    assert other.name == "till-0"
    assert other.node_id is not None
    # Registered, bound to group beta and connected, yet the alpha run never sampled it:
    # it got no message, so it never computed anything from its text or uploaded a byte.
    assert "Received successfully" not in other.node.log_text()
    assert "Start `flwr-clientapp` process" not in other.node.log_text()
    app = federated_round.work / "round" / "run" / "app" / "pyproject.toml"
    config = tomllib.loads(app.read_text("utf-8"))["tool"]["flwr"]["app"]["config"]
    alpha = {d.node_id for d in federated_round.fleet.devices[:3]}
    assert {int(n) for n in config["nodes"].split(",")} == alpha
    assert [n.device_id for n in federated_round.registry.federation_nodes("beta")] == ["till-0"]


def test_the_registry_holds_the_run_its_rounds_and_the_release(federated_round: Round) -> None:
    registry, outcome = federated_round.registry, federated_round.outcome
    run = registry.get_round(SPEC.round_id)
    assert run.state is RoundState.FINISHED
    assert run.group == "alpha"
    assert run.manifest == outcome.result.manifest.model_dump(mode="json")
    recorded = [(m.number, m.participants, m.loss, m.perplexity) for m in run.metrics]
    expected = [metric_of(row) for row in outcome.result.rounds]
    assert recorded == [(m.number, m.participants, m.loss, m.perplexity) for m in expected]
    assert [m.number for m in run.metrics] == [1, 2]
    assert all(m.participants == 3 and m.perplexity is not None for m in run.metrics)
    # Streamed: each round was recorded when it ended, not both when the run was over.
    assert (run.metrics[1].recorded_at - run.metrics[0].recorded_at).total_seconds() > 1
    release = registry.find_release("alpha-tuned", "1")
    assert release.bundle_sha256 == outcome.published.sha256
    assert release.kind.value == "adapter"


def test_the_aggregate_is_a_signed_adapter_release_that_changes_the_greedy_answer(
    federated_round: Round, tmp_path: Path
) -> None:
    model_dir = federated_round.model_dir
    base = BundleManifest.model_validate_json((model_dir / MANIFEST_NAME).read_bytes())
    bundle_dir = federated_round.outcome.bundle_dir
    manifest = federated_round.outcome.published.manifest
    assert manifest.adapter is not None
    assert manifest.adapter.provenance is not None
    assert manifest.adapter.base_bundle_sha256 == bundle_hash(base)
    assert manifest.adapter.provenance.round_id == "alpha-r1"
    round_bytes = (bundle_dir / "round-manifest.json").read_bytes()
    assert round_bytes == canonical_json(federated_round.result.manifest)

    # Signed with the adapters key by a coordinator that holds no root or targets key; the
    # group's channel points at it (no canary in this run).
    published = federated_round.outcome.published
    repo_path = federated_round.repo_path
    with RepoServer(repo_path) as server:
        client = RepositoryClient(
            root=(repo_path / "metadata" / "1.root.json").read_bytes(),
            metadata_dir=tmp_path / "device-metadata",
            metadata_url=f"{server.url}/metadata/",
            targets_url=f"{server.url}/targets/",
            fetcher=HttpFetcher(),
        )
        plan = client.check("alpha", "stable", None)
    assert plan is not None
    assert plan.adapter is not None
    assert plan.adapter.ref.sha256 == published.sha256 == bundle_hash(manifest)

    engine = Engine.load(model_dir, threads=1)
    adapter = engine.load_adapter(bundle_dir / "adapter.npz")
    # A device's own held-out domain text, as a prompt.
    store = LocalTextStore.open(federated_round.fleet.devices[0].data_path)
    heldout = store.texts(Split.HELDOUT)
    store.close()
    changed = 0
    for text in heldout[:4]:
        prompt = engine.encode(text)[:24]
        params = SamplingParams(max_tokens=12)
        base_gen = engine.generate(prompt, params)
        base_answer = "".join(base_gen)
        tuned_gen = engine.generate(prompt, params, adapter=adapter)
        tuned_answer = "".join(tuned_gen)
        changed += base_gen.token_ids != tuned_gen.token_ids
        assert base_answer.isprintable() or base_answer.strip()
        del tuned_answer
    assert changed >= 1


def test_no_training_text_leaves_the_device(federated_round: Round) -> None:
    uploaded = federated_round.uploaded
    # The capture sees Flower's plaintext messages (so a leak would be visible in it).
    assert b"base_perplexity" in uploaded
    assert b"train_loss" in uploaded
    engine = Engine.load(federated_round.model_dir, threads=1)
    for texts in federated_round.texts.values():  # the three registered devices' texts
        for text in texts:
            data = text.encode("utf-8")
            for start in range(0, max(1, len(data) - 24), 24):
                assert data[start : start + 24] not in uploaded
            ids = engine.encode(text)[:64]
            for dtype in (np.int64, np.int32):
                for start in range(0, max(1, len(ids) - 8), 8):
                    window = np.asarray(ids[start : start + 8], dtype=dtype).tobytes()
                    assert window not in uploaded
