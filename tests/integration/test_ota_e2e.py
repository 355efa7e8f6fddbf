"""End to end on one machine: operator CLI -> TUF repository over HTTP -> announcement over
mosquitto (mTLS, fleet ACLs) -> the real agent daemon -> progress and status back over MQTT.

The agent polls nothing (``poll_interval_s = 0``): it learns of each release only from the
coordinator's retained announcement. Shown here:

- a new base bundle published with ``nanofleet release publish`` is
  verified, activated and reported ``committed``; the retained status names it;
- an adapter-only release then downloads only the adapter bundle's files (the repository
  server counts every byte it sends), is committed, and changes the answers;
- a release whose model fails the health gate is rolled back, reported over MQTT, and the
  device keeps serving (and reporting) the committed release;
- a SIGKILLed agent is marked offline by its Last Will, and comes back on the committed
  release.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from coordinator import pki
from coordinator.models.tiny import train_tiny_tokenizer
from coordinator.mqtt.announce import Announcer
from coordinator.mqtt.link import BrokerOptions, MqttLink, TlsFiles
from protocol import topics
from protocol.messages import BundleRef, DeviceStatus, Health, UpdateProgress, UpdateState
from tests.support.mosquitto import DEVICE_A, GROUP_A, TlsBroker
from tests.support.ota_fleet import (
    MqttIdentity,
    ReleaseRepo,
    RepoServer,
    agent_config,
    write_adapter_bundle,
)
from tests.support.ota_models import build_ota_model, unprintable_tokens
from tests.support.processes import ManagedProcess, notified

CHANNEL = "stable"
PROMPT = "hello world"


class Recorder:
    """The coordinator's receiver: every device message, in arrival order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._messages: list[tuple[str, bytes, bool]] = []

    def message(self, topic: str, payload: bytes, retain: bool, received_at: datetime) -> None:
        with self._cond:
            self._messages.append((topic, payload, retain))
            self._cond.notify_all()

    def progress(self) -> list[UpdateProgress]:
        topic = topics.update_progress(DEVICE_A)
        with self._cond:
            return [
                UpdateProgress.model_validate_json(p) for t, p, _ in self._messages if t == topic
            ]

    def statuses(self) -> list[DeviceStatus]:
        topic = topics.device_status(DEVICE_A)
        with self._cond:
            return [DeviceStatus.model_validate_json(p) for t, p, _ in self._messages if t == topic]

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self._cond.wait(remaining)


@dataclass
class Fleet:
    repo: ReleaseRepo
    server: RepoServer
    announcer: Announcer
    recorder: Recorder
    config: Path
    socket: Path
    log: Path
    agent: ManagedProcess

    def release(self, bundle_dir: Path) -> BundleRef:
        ref = self.repo.publish(bundle_dir, GROUP_A, CHANNEL)
        self.announcer.announce(
            GROUP_A,
            CHANNEL,
            repository_url=self.server.url,
            timestamp_version=self.repo.timestamp_version(),
        )
        return ref

    def wait_progress(self, state: UpdateState, after: int, what: str) -> UpdateProgress:
        def found() -> UpdateProgress | None:
            return next((p for p in self.recorder.progress()[after:] if p.state is state), None)

        self.recorder.wait(lambda: found() is not None, what)
        result = found()
        assert result is not None
        return result

    def answer(self) -> str:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://a", timeout=60
        ) as c:
            r = c.post(
                "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
            )
            r.raise_for_status()
            return str(r.json()["choices"][0]["text"])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("e2e-models")
    return {
        "factory": build_ota_model(work / "factory", seed=1),
        "v2": build_ota_model(work / "v2", seed=2),
        "bad": build_ota_model(work / "bad", seed=3, layers=96),
    }


def _start_agent(config: Path, log: Path) -> ManagedProcess:
    exe = Path(sys.executable).with_name("nanofleet-agent")
    agent = ManagedProcess(
        [str(exe), "run", "--config", str(config)], notify=True, name="agent", log_path=log
    )
    agent.start()
    agent.wait_ready(notified("READY=1"), timeout=60)
    return agent


@pytest.fixture
def fleet(mosquitto_tls: TlsBroker, models: dict[str, Path], tmp_path: Path) -> Iterator[Fleet]:
    b = mosquitto_tls
    repo = ReleaseRepo(tmp_path)
    recorder = Recorder()
    coordinator = b.identities[pki.COORDINATOR_IDENTITY]
    link = MqttLink(
        BrokerOptions(
            b.host, b.port, tls=TlsFiles(b.ca_file, coordinator.cert_file, coordinator.key_file)
        ),
        subscriptions=topics.COORDINATOR_FILTERS,
        receiver=recorder,
    )
    link.start()
    assert link.wait_connected(10)
    device = b.identities[DEVICE_A]
    sock = Path(f"/tmp/nf-e2e-{tmp_path.name[-12:]}.sock")
    with RepoServer(repo.path) as server:
        config = agent_config(
            tmp_path / "agent.toml",
            model_dir=models["factory"],
            socket_path=sock,
            state_dir=tmp_path / "state",
            root_file=repo.root_file,
            repository_url=server.url,
            group=GROUP_A,
            mqtt=MqttIdentity(
                b.host, b.port, DEVICE_A, GROUP_A, b.ca_file, device.cert_file, device.key_file
            ),
        )
        log = tmp_path / "agent.log"
        fleet = Fleet(
            repo, server, Announcer(link), recorder, config, sock, log, _start_agent(config, log)
        )
        try:
            yield fleet
        finally:
            fleet.agent.close()
            link.stop()
            sock.unlink(missing_ok=True)


def test_base_then_adapter_release_end_to_end(
    fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    rec = fleet.recorder
    rec.wait(lambda: any(s.health is Health.HEALTHY for s in rec.statuses()), "a status")
    factory_answer = fleet.answer()

    v2 = fleet.release(models["v2"])
    committed = fleet.wait_progress(UpdateState.COMMITTED, 0, "the commit of v2")
    assert committed.target == v2
    states = [p.state for p in rec.progress()]
    for state in (UpdateState.FETCHING, UpdateState.VERIFIED, UpdateState.ACTIVATING):
        assert state in states
    rec.wait(lambda: rec.statuses()[-1].base == v2, "a status naming v2")
    v2_answer = fleet.answer()
    assert v2_answer != factory_answer

    # The adapter release: only the adapter's files cross the network.
    keep = unprintable_tokens(train_tiny_tokenizer())
    adapter_dir = write_adapter_bundle(tmp_path / "adapter", models["v2"], keep_zero=keep)
    adapter_files = {p.name: p.stat().st_size for p in adapter_dir.iterdir()}
    base_bytes = sum(p.stat().st_size for p in models["v2"].iterdir() if p.is_file())
    before, seen = fleet.server.target_bytes(), len(rec.progress())
    served_before = fleet.server.served()
    adapter = fleet.release(adapter_dir)
    fleet.wait_progress(UpdateState.COMMITTED, seen, "the commit of the adapter")
    rec.wait(lambda: rec.statuses()[-1].adapter == adapter, "a status naming the adapter")
    assert rec.statuses()[-1].base == v2
    downloaded = fleet.server.target_bytes() - before
    new_targets = {
        path: n - served_before.get(path, 0)
        for path, n in fleet.server.served().items()
        if path.startswith("/repo/targets/") and n != served_before.get(path, 0)
    }
    assert downloaded == sum(adapter_files.values()), (downloaded, adapter_files, new_targets)
    assert all(any(path.endswith("." + name) for name in adapter_files) for path in new_targets), (
        new_targets
    )
    assert downloaded < base_bytes / 10
    assert fleet.answer() != v2_answer  # the adapter changes what the model says


def test_a_release_that_fails_the_gate_rolls_back_and_says_so(
    fleet: Fleet, models: dict[str, Path]
) -> None:
    rec = fleet.recorder
    v2 = fleet.release(models["v2"])
    fleet.wait_progress(UpdateState.COMMITTED, 0, "the commit of v2")
    answer = fleet.answer()
    seen = len(rec.progress())
    bad = fleet.release(models["bad"])
    rolled = fleet.wait_progress(UpdateState.ROLLED_BACK, seen, "the rollback report")
    assert rolled.target == bad
    assert rolled.error_code == "health_check_failed"
    assert rolled.error_message is not None
    assert "previous model" in rolled.error_message
    rec.wait(lambda: rec.statuses()[-1].base == v2, "a status naming v2 again")
    assert fleet.answer() == answer
    assert fleet.agent.returncode is None

    # A power cut: the broker publishes the Last Will; the restarted agent serves v2.
    fleet.agent.kill()
    fleet.agent.close()
    rec.wait(lambda: rec.statuses()[-1].health is Health.OFFLINE, "the Last Will")
    fleet.agent = _start_agent(fleet.config, fleet.log)
    rec.wait(
        lambda: rec.statuses()[-1].health is Health.HEALTHY and rec.statuses()[-1].base == v2,
        "the restarted agent's status",
    )
    assert fleet.answer() == answer
