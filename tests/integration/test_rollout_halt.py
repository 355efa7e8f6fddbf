"""Staged rollouts that halt by themselves, end to end: the coordinator (``Coordinator``:
registry, MQTT ingestion, per-device announcements, the background rollout loop) against a
real mosquitto and 24 simulated devices, each its own MQTT client on its own topics.

- A base release whose second wave fails past the failure threshold: the rollout halts,
  the third wave's devices are never targeted (no announcement, no update record), and
  the reason is in the API and the CLI.
- An adapter release whose reported held-out perplexity regresses past the threshold in
  the second wave: the same, with the regression as the reason.

Device order (and so who is in which wave) is the policy's seeded shuffle, computed here
with the same pure functions before the rollout starts; waits are conditions with a
deadline, never sleeps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from coordinator.cli import app as cli_app
from coordinator.rollout.policy import Plan, Thresholds, WaveSize, WaveSpec, order_targets
from coordinator.serve import Coordinator
from coordinator.settings import CoordinatorSettings, MqttSettings
from protocol.bundle import BundleKind, bundle_hash
from protocol.messages import BundleRef
from tests.support.coordinator_http import http_server
from tests.support.db_fixtures import make_manifest
from tests.support.fleet_sim import FleetScript, SimFleet
from tests.support.mosquitto import Broker, plain_broker

pytestmark = pytest.mark.mosquitto

TOKEN = "rollout-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEVICES = [f"edge-{i:02d}" for i in range(24)]
WAVES = ["4", "50%", "100%"]  # 4, 12 and 8 devices
DEADLINE_S = 60.0


@pytest.fixture
def broker() -> Iterator[Broker]:
    with plain_broker() as b:
        yield b


@pytest.fixture
def coordinator(broker: Broker, tmp_path: Path) -> Iterator[Coordinator]:
    settings = CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / 'registry.sqlite3'}",
        api_token=TOKEN,
        repository_path=tmp_path / "repo",
        rollout_interval_s=0.1,
        mqtt=MqttSettings(host=broker.host, port=broker.port),
    )
    c = Coordinator(settings)
    for device in DEVICES:
        c.registry.register_device(device, groups=["edge"], actor="test")
    c.start()
    try:
        assert c.ingestor is not None
        assert c.ingestor.link.wait_connected(20)
        yield c
    finally:
        c.stop()


def wave_devices(rollout_id: int, adapter: bool) -> tuple[tuple[str, ...], ...]:
    """Who will be in which wave: the policy's own (pure) plan for this rollout id."""
    specs = tuple(WaveSpec(WaveSize.parse(w)) for w in WAVES)
    return Plan(rollout_id, adapter, order_targets(rollout_id, DEVICES), specs).wave_devices


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_and_wait_halt(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client(base_url=base_url, headers=AUTH) as c:
        created = c.post("/api/v1/rollouts", json=body)
        assert created.status_code == 201, created.text
        rid = created.json()["id"]

        def halted() -> dict[str, Any] | None:
            data: dict[str, Any] = c.get(f"/api/v1/rollouts/{rid}").json()
            assert data["state"] in ("running", "halted"), data
            return data if data["state"] == "halted" else None

        return wait_for("the rollout to halt", halted)  # type: ignore[no-any-return]


def check_never_targeted(
    base_url: str, fleet: SimFleet, rollout: dict[str, Any], waves: tuple[tuple[str, ...], ...]
) -> None:
    first, second, third = waves
    assert [w["state"] for w in rollout["waves"]] == ["passed", "failed", "cancelled"]
    assert fleet.announced() == set(first) | set(second)
    assert not fleet.announced() & set(third)
    with httpx.Client(base_url=base_url, headers=AUTH) as c:
        updates = c.get(f"/api/v1/rollouts/{rollout['id']}/updates").json()["updates"]
        assert {u["device_id"] for u in updates} == set(first) | set(second)
        for device in third:
            assert c.get(f"/api/v1/devices/{device}").json()["updates"] == []


def cli_status(base_url: str, rollout_id: int) -> tuple[dict[str, Any], str]:
    runner = CliRunner()
    argv = ["rollouts", "status", str(rollout_id), "--url", base_url, "--token", TOKEN]
    as_json = runner.invoke(cli_app, [*argv, "--json"])
    assert as_json.exit_code == 0, as_json.output
    table = runner.invoke(cli_app, argv)
    assert table.exit_code == 0, table.output
    return json.loads(as_json.stdout), table.stdout


def test_wave_failures_past_the_threshold_halt_the_rollout(
    coordinator: Coordinator, broker: Broker
) -> None:
    release = coordinator.registry.create_release(make_manifest("nano", "2.0.0"), actor="test")
    target = BundleRef(name="nano", version="2.0.0", sha256=release.bundle_sha256)
    waves = wave_devices(1, adapter=False)
    failing = set(waves[1][:3])  # 3 of 12 = 25 %, over the 10 % threshold
    script = FleetScript(release=target, failing=failing)
    with (
        SimFleet(DEVICES, broker.host, broker.port, script) as fleet,
        http_server(coordinator.app) as base_url,
    ):
        body = {"release": "nano:2.0.0", "groups": ["edge"], "waves": WAVES}
        rollout = start_and_wait_halt(base_url, body | {"max_failure_rate": 0.1})
        assert rollout["id"] == 1
        reason = rollout["halt_reason"]
        assert "wave 2 of 3: 3 of 12 devices failed" in reason
        assert "over the failure threshold of 10.0%" in reason
        assert rollout["decisions"][-1]["kind"] == "halt"
        assert rollout["decisions"][-1]["actor"] == "policy"
        check_never_targeted(base_url, fleet, rollout, waves)
        status, table = cli_status(base_url, 1)
        assert status["halt_reason"] == reason
        assert "halted" in table
        assert "3 of 12 devices failed" in " ".join(table.split())
        page = httpx.get(f"{base_url}/ui/rollouts/1", headers=AUTH).text
        assert "id='halt-reason'>Halted: wave 2 of 3: 3 of 12 devices failed" in page


def test_adapter_evaluation_regression_halts_the_rollout(
    coordinator: Coordinator, broker: Broker
) -> None:
    base = make_manifest("nano", "1.0.0")
    manifest = make_manifest("nano-lora", "1", BundleKind.ADAPTER, base_sha256=bundle_hash(base))
    release = coordinator.registry.create_release(manifest, actor="test")
    target = BundleRef(name="nano-lora", version="1", sha256=release.bundle_sha256)
    waves = wave_devices(1, adapter=True)
    first = set(waves[0])

    def evaluate(device_id: str, bundle: BundleRef) -> tuple[float, float]:
        # Held-out perplexity before and after (sent over MQTT): +1 % in the first wave,
        # +20 % after.
        return 20.0, 20.2 if device_id in first else 24.0

    script = FleetScript(release=target, evaluate=evaluate)
    with (
        SimFleet(DEVICES, broker.host, broker.port, script) as fleet,
        http_server(coordinator.app) as base_url,
    ):
        body = {
            "release": "nano-lora:1",
            "groups": ["edge"],
            "waves": WAVES,
            "max_eval_regression": 0.05,
        }
        rollout = start_and_wait_halt(base_url, body)
        assert rollout["thresholds"] == Thresholds(0.1, 0.05, 3600).__dict__
        reason = rollout["halt_reason"]
        assert "wave 2 of 3: the evaluation metric regressed by a median of 20.0%" in reason
        assert "over the regression threshold of 5.0%" in reason
        assert "median evaluation change +1.0%" in rollout["waves"][0]["reason"]
        check_never_targeted(base_url, fleet, rollout, waves)
        status, table = cli_status(base_url, 1)
        assert status["halt_reason"] == reason
        assert "regressed" in " ".join(table.split())
