"""Staged rollouts on real agents: each wave's devices, and only they, install the release.

Four real ``nanofleet-agent run`` daemons (tiny models) follow group ``store`` over mosquitto
with mTLS and the production ACL. The coordinator (``Coordinator``: registry, ingestion,
the rollout loop, its HTTP app serving the TUF repository) holds the online keys, so every
started wave signs its devices' own pointers and announces on their own topics. Devices
also poll the repository every second, so a device outside a started wave would find the
release on its own if the rollout leaked it.

- A release that fails the health gate, waves ``1`` then the rest: the first device rolls
  back, the rollout halts on its failure rate, and the other three never fetch it although
  they keep polling; they still run the group's release.
- A healthy release, waves ``1`` then the rest: the first device installs it before any
  other does, then the rest follow, and the rollout completes.
- An adapter release that makes held-out perplexity worse: the first wave's device
  commits it, measures its own held-out text with and without it, reports the two numbers
  over MQTT, and the rollout halts on the regression; the others never install it.

Nothing sleeps except the polling devices' grace period after the halt; every other wait is
a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.federated.datastore import LocalTextStore, Source
from coordinator import pki
from coordinator.demo.domain_data import device_slices
from coordinator.models.adapter_bundle import write_random_adapter_bundle
from coordinator.models.tiny import train_tiny_tokenizer
from coordinator.rollout.policy import order_targets
from coordinator.serve import Coordinator
from coordinator.settings import CoordinatorSettings, MqttSettings
from protocol.bundle import MANIFEST_NAME, BundleManifest
from tests.support.coordinator_http import http_server
from tests.support.mosquitto import TlsBroker, tls_broker
from tests.support.ota_fleet import PASSPHRASE, MqttIdentity, ReleaseRepo, agent_config
from tests.support.ota_models import build_ota_model, unprintable_tokens
from tests.support.processes import ManagedProcess, notified

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

GROUP, CHANNEL = "store", "stable"
DEVICES = [f"kiosk-{i}" for i in range(1, 5)]
TOKEN = "waves-live-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEADLINE_S = 240.0
#: How long devices outside the wave keep polling (every second) after a halt.
GRACE_S = 4.0


def wait_for(what: str, check: Callable[[], Any], context: Callable[[], str]) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{context()}")


def manifest_of(bundle_dir: Path) -> BundleManifest:
    return BundleManifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_bytes())


def federated_section(home: Path) -> str:
    """What makes the agent evaluate a committed adapter on its own held-out text."""
    return f"""
[federated]
superlink = "127.0.0.1:9092"
ca_file = "{home}/ca.crt"
node_key_file = "{home}/supernode.key"
data_path = "{home}/texts.sqlite3"
state_dir = "{home}/supernode"
"""


def fill_store(path: Path, index: int) -> None:
    """A device's local text: its own slice of a domain, with a held-out part."""
    texts = device_slices("alpha", devices=len(DEVICES), max_chars=40_000)[index]
    store = LocalTextStore.open(path)
    try:
        store.add_texts([*texts.train_texts(), *texts.heldout_texts()], Source.IMPORT)
    finally:
        store.close()


@pytest.fixture
def broker() -> Iterator[TlsBroker]:
    with tls_broker({d: (GROUP,) for d in DEVICES}) as b:
        yield b


class Scene:
    """The coordinator, its HTTP address, the release repository and the agents."""

    def __init__(
        self,
        coordinator: Coordinator,
        url: str,
        repo: ReleaseRepo,
        agents: dict[str, ManagedProcess],
    ) -> None:
        self.coordinator = coordinator
        self.url = url
        self.repo = repo
        self.agents = agents
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=30)
        self.factory = ""

    def add(self, bundle_dir: Path) -> BundleManifest:
        """Sign the bundle into the repository (no pointer moves). The rollout registers
        the release from the repository's signed manifest."""
        self.repo.cli(
            "release", "add-bundle", str(bundle_dir),
            "--repo", str(self.repo.path), "--keys", str(self.repo.keys),
        )  # fmt: skip
        return manifest_of(bundle_dir)

    def versions(self) -> dict[str, str | None]:
        out = {}
        for device in DEVICES:
            base = self.coordinator.registry.get_device(device).base
            out[device] = base.version if base else None
        return out

    def adapters(self) -> dict[str, str | None]:
        out = {}
        for device in DEVICES:
            adapter = self.coordinator.registry.get_device(device).adapter
            out[device] = adapter.version if adapter else None
        return out

    def rollout(self, manifest: BundleManifest, **extra: object) -> int:
        created = self.http.post(
            "/api/v1/rollouts",
            json={
                "release": f"{manifest.name}:{manifest.version}",
                "groups": [GROUP],
                "waves": ["1", "100%"],
                "max_failure_rate": 0.1,
                "soak_s": 1,
                **extra,
            },
        )
        assert created.status_code == 201, created.text
        return int(created.json()["id"])

    def state(self, rollout_id: int) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get(f"/api/v1/rollouts/{rollout_id}").json()
        return data

    def context(self) -> str:
        logs = "\n".join(f"--- {d}\n{a.log_tail(15)}" for d, a in self.agents.items())
        rollouts = self.http.get("/api/v1/rollouts").json()["rollouts"]
        pointers = [(p.device_id, p.base.version) for p in _repository(self).device_pointers()]
        return (
            f"versions: {self.versions()}\nrollouts: {rollouts}\n"
            f"device pointers: {pointers}\n{logs}"
        )


@pytest.fixture
def scene(broker: TlsBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scene]:
    repo = ReleaseRepo(tmp_path)
    factory = build_ota_model(tmp_path / "factory", seed=1)
    monkeypatch.setenv("NANOFLEET_KEY_PASSPHRASE", PASSPHRASE)  # the online keys' passphrase
    ident = broker.identities[pki.COORDINATOR_IDENTITY]
    settings = CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / 'registry.sqlite3'}",
        api_token=TOKEN,
        repository_path=repo.path,
        keys=repo.keys,
        channel=CHANNEL,
        rollout_interval_s=0.2,
        heartbeat_interval_s=1.0,
        mqtt=MqttSettings(
            host=broker.host,
            port=broker.port,
            ca_file=broker.ca_file,
            cert_file=ident.cert_file,
            key_file=ident.key_file,
        ),
    )
    coordinator = Coordinator(settings)
    for device in DEVICES:
        coordinator.registry.register_device(device, groups=[GROUP], actor="test")
    agents: dict[str, ManagedProcess] = {}
    with contextlib.ExitStack() as stack, http_server(coordinator.app) as url:
        coordinator.start()
        try:
            # Every device starts on the group's release 1.0.0 (factory model, then OTA).
            repo.publish(factory, GROUP, CHANNEL)
            exe = Path(sys.executable).with_name("nanofleet-agent")
            for device in DEVICES:
                ident = broker.identities[device]
                config = agent_config(
                    tmp_path / f"{device}.toml",
                    model_dir=factory,
                    socket_path=Path(f"/tmp/nf-waves-{tmp_path.name[-8:]}-{device}.sock"),
                    state_dir=tmp_path / device,
                    root_file=repo.root_file,
                    repository_url=f"{url}/repo",
                    group=GROUP,
                    poll_interval_s=1.0,
                    mqtt=MqttIdentity(
                        broker.host, broker.port, device, GROUP,
                        broker.ca_file, ident.cert_file, ident.key_file,
                    ),
                )  # fmt: skip
                config.write_text(config.read_text() + federated_section(tmp_path / device))
                fill_store(tmp_path / device / "texts.sqlite3", DEVICES.index(device))
                agent = ManagedProcess(
                    [str(exe), "run", "--config", str(config)],
                    notify=True,
                    name=device,
                    log_path=tmp_path / f"{device}.log",
                )
                agents[device] = agent
                agent.start()
            for agent in agents.values():
                agent.wait_ready(notified("READY=1"), timeout=60)
            s = Scene(coordinator, url, repo, agents)
            stack.callback(s.http.close)
            s.factory = manifest_of(factory).version
            wait_for(
                "every device on the group's release",
                lambda: set(s.versions().values()) == {s.factory},
                s.context,
            )
            yield s
        finally:
            for agent in agents.values():
                agent.stop()
                agent.close()
            coordinator.stop()


def test_waves_reach_only_their_devices_and_a_failing_wave_halts(
    scene: Scene, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nanofleet.coordinator")  # shown if it fails
    # -- A release registered but never signed into the repository cannot be rolled out.
    unsigned = manifest_of(build_ota_model(tmp_path / "unsigned", seed=5))
    scene.coordinator.registry.create_release(unsigned, actor="test")
    refused = scene.http.post(
        "/api/v1/rollouts",
        json={"release": f"{unsigned.name}:{unsigned.version}", "groups": [GROUP]},
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["detail"]["field"] == "release", refused.text
    assert "not in the repository" in refused.text

    # -- A release that fails the health gate: the first wave fails, the rollout halts.
    bad = scene.add(build_ota_model(tmp_path / "bad", seed=3, layers=96))
    first = scene.rollout(bad)
    (canary,) = order_targets(first, DEVICES)[:1]
    halted = wait_for(
        "the rollout to halt",
        lambda: (r := scene.state(first))["state"] == "halted" and r,
        scene.context,
    )
    assert [w["state"] for w in halted["waves"]] == ["failed", "cancelled"]
    assert "failure" in halted["halt_reason"], halted
    time.sleep(GRACE_S)  # the other devices poll the repository a few times meanwhile
    assert scene.versions() == dict.fromkeys(DEVICES, scene.factory), scene.context()
    updates = scene.http.get(f"/api/v1/rollouts/{first}/updates").json()["updates"]
    assert {u["device_id"] for u in updates} == {canary}
    for device in set(DEVICES) - {canary}:
        history = scene.http.get(f"/api/v1/devices/{device}").json()["updates"]
        assert history == [], (device, history)
        assert bad.version not in scene.agents[device].log_tail(400), device

    # -- A healthy release: the first wave's device installs it first, then the rest.
    good_dir = build_ota_model(tmp_path / "good", seed=4)
    good = scene.add(good_dir)
    second = scene.rollout(good)
    leader = order_targets(second, DEVICES)[0]
    wait_for(
        "the first wave's device on the new release",
        lambda: scene.versions()[leader] == good.version,
        scene.context,
    )
    completed = wait_for(
        "the rollout to complete",
        lambda: (r := scene.state(second))["state"] == "completed" and r,
        scene.context,
    )
    assert [w["state"] for w in completed["waves"]] == ["passed", "passed"]
    wait_for(
        "every device on the new release",
        lambda: set(scene.versions().values()) == {good.version},
        scene.context,
    )
    pointers = {p.device_id: p.base.version for p in _repository(scene).device_pointers()}
    assert pointers == dict.fromkeys(DEVICES, good.version)

    # -- An adapter that makes the devices' held-out perplexity worse: halts on evaluation.
    keep = unprintable_tokens(train_tiny_tokenizer())  # still answers: passes the health gate
    worse = scene.add(
        write_random_adapter_bundle(
            tmp_path / "worse", good_dir, name="tuned", version="1", scale=0.5, keep_zero=keep
        )
    )
    third = scene.rollout(worse, max_eval_regression=0.05)
    first_device = order_targets(third, DEVICES)[0]
    halted = wait_for(
        "the adapter rollout to halt",
        lambda: (r := scene.state(third))["state"] == "halted" and r,
        scene.context,
    )
    assert "evaluation metric regressed" in halted["halt_reason"], halted
    (update,) = scene.http.get(f"/api/v1/rollouts/{third}/updates").json()["updates"]
    assert update["device_id"] == first_device
    assert update["candidate"] > update["baseline"] * 1.05, update  # measured on the device
    assert scene.adapters() == {d: ("1" if d == first_device else None) for d in DEVICES}


def _repository(scene: Scene) -> Any:
    from coordinator.repository import Repository

    return Repository(scene.repo.path)
