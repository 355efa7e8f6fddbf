"""Signed updates in the running agent: the real daemon, a real loopback TUF repository.

The agent starts on a factory model (``model.dir``) with ``[ota]`` configured; the
repository (the simulator, served over HTTP) publishes real tiny models built by the
production builder. Shown here:

- a good release is fetched, verified, activated and committed while clients stream
  without a single failed request, and the agent then answers with the new model;
- attacks (a mirror serving other weights, a base model signed by the coordinator's
  adapters key) are refused with their named code; the served model, its greedy answer
  and the committed slot stay the same, and nothing is activated;
- a release whose model gives non-finite logits is refused at activation, and one whose model is
  far slower than the old one fails the health gate and is rolled back; either way the
  committed slot and the answers stay those of the previous model.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.ota.slots import SlotManager
from protocol.bundle import BundleManifest
from protocol.release import ADAPTERS_ROLE, bundle_target_path
from tests.support.ota_models import build_ota_model
from tests.support.processes import ManagedProcess, notified
from tests.support.repo_simulator import RepoHTTPServer, RepoSimulator, ref_of

GROUP, CHANNEL = "lab", "stable"
PROMPT = "hello world"


def _manifest(model_dir: Path) -> BundleManifest:
    return BundleManifest.model_validate_json((model_dir / "manifest.json").read_bytes())


@dataclass
class Fleet:
    sim: RepoSimulator
    server: RepoHTTPServer
    agent: ManagedProcess
    socket: Path
    state: Path

    def publish(self, model_dir: Path) -> BundleManifest:
        manifest = self.sim.add_bundle(model_dir)
        self.sim.point(GROUP, CHANNEL, ref_of(manifest))
        self.sim.publish()
        return manifest

    def committed_version(self) -> str | None:
        current = SlotManager(self.state / "slots").current()
        return None if current is None else current.base.version

    def client(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://a", timeout=60
        )

    def answer(self) -> str:
        with self.client() as c:
            r = c.post(
                "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0},
            )
            r.raise_for_status()
            return str(r.json()["choices"][0]["text"])

    def progress(self) -> list[dict[str, object]]:
        out = []
        for line in self.agent.log_path.read_text(errors="replace").splitlines():
            if '"update_progress"' in line:
                out.append(json.loads(line)["progress"])
        return out


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("ota-models")
    return {
        "factory": build_ota_model(work / "factory", seed=1),
        "v2": build_ota_model(work / "v2", seed=2),
        "nan": build_ota_model(work / "nan", seed=3, overflow=True),
        "slow": build_ota_model(work / "slow", seed=4, layers=96),
    }


@pytest.fixture
def fleet(models: dict[str, Path], tmp_path: Path) -> Iterator[Fleet]:
    sim = RepoSimulator()
    with RepoHTTPServer(sim.serve) as server:
        root = tmp_path / "root.json"
        root.write_bytes(sim.root_bytes)
        sock = Path(f"/tmp/nf-ota-{tmp_path.name[-12:]}.sock")
        state = tmp_path / "state"
        config = tmp_path / "agent.toml"
        config.write_text(
            f"""
[model]
dir = "{models["factory"]}"
threads = 1
[server]
socket_path = "{sock}"
[ota]
state_dir = "{state}"
root_file = "{root}"
repository_url = "{server.url}"
group = "{GROUP}"
channel = "{CHANNEL}"
poll_interval_s = 0.3
[ota.health]
requests = 3
max_tokens = 8
""",
            encoding="utf-8",
        )
        exe = Path(sys.executable).with_name("nanofleet-agent")
        agent = ManagedProcess(
            [str(exe), "run", "--config", str(config)],
            notify=True,
            name="ota",
            log_path=tmp_path / "agent.log",
        )
        with agent:
            agent.wait_ready(notified("READY=1"), timeout=60)
            yield Fleet(sim=sim, server=server, agent=agent, socket=sock, state=state)
        sock.unlink(missing_ok=True)


def test_a_release_commits_under_load_without_a_failed_request(
    fleet: Fleet, models: dict[str, Path]
) -> None:
    before = fleet.answer()
    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def client_loop() -> None:
        nonlocal done
        with fleet.client() as c:
            while not stop.is_set():
                body = {"prompt": PROMPT, "max_tokens": 16, "stream": True}
                try:
                    with c.stream("POST", "/v1/completions", json=body) as r:
                        text = "".join(r.iter_lines())
                    if r.status_code != 200 or "[DONE]" not in text:
                        failures.append(f"{r.status_code}: {text[:200]}")
                    else:
                        done += 1
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        v2 = fleet.publish(models["v2"])
        _wait(lambda: fleet.committed_version() == v2.version, 120, "the commit of v2")
        start = done
        _wait(lambda: done >= start + 4, 60, "requests after the commit")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert done > 0
    states = [p["state"] for p in fleet.progress()]
    for state in ("fetching", "verified", "activating", "health_check", "committed"):
        assert state in states, states
    assert fleet.answer() != before  # the new model answers now


@pytest.mark.parametrize(
    ("bad", "final", "code"),
    [("nan", "rolled_back", "activation_failed"), ("slow", "rolled_back", "health_check_failed")],
)
def test_a_bad_release_leaves_the_previous_model_serving(
    fleet: Fleet, models: dict[str, Path], bad: str, final: str, code: str
) -> None:
    v2 = fleet.publish(models["v2"])
    _wait(lambda: fleet.committed_version() == v2.version, 120, "the commit of v2")
    answer = fleet.answer()
    fleet.publish(models[bad])

    def refused() -> bool:
        return any(p["state"] == final and p.get("error_code") == code for p in fleet.progress())

    _wait(refused, 120, f"the {final} report")
    assert fleet.committed_version() == v2.version
    assert fleet.answer() == answer
    assert fleet.agent.returncode is None  # still running


def _target_url_path(manifest: BundleManifest, path: str) -> str:
    entry = next(f for f in manifest.files if f.path == path)
    target = bundle_target_path(manifest.kind, manifest.name, manifest.version, path)
    directory, _, name = target.rpartition("/")
    return f"targets/{directory}/{entry.sha256}.{name}"


def _mirror_serves_other_weights(fleet: Fleet, model_dir: Path) -> None:
    manifest = fleet.sim.add_bundle(model_dir)
    path = _target_url_path(manifest, "model.onnx.data")
    fleet.sim.overrides[path] = bytes(len(fleet.sim.files[path]))
    fleet.sim.point(GROUP, CHANNEL, ref_of(manifest))
    fleet.sim.publish()


def _base_signed_by_adapters_key(fleet: Fleet, model_dir: Path) -> None:
    manifest = fleet.sim.add_bundle(model_dir, role=ADAPTERS_ROLE)
    fleet.sim.point(GROUP, CHANNEL, ref_of(manifest))
    fleet.sim.publish()


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        (_mirror_serves_other_weights, "hash_mismatch"),
        (_base_signed_by_adapters_key, "target_not_signed"),
    ],
    ids=["mirror_serves_other_weights", "base_signed_by_adapters_key"],
)
def test_an_attack_leaves_the_serving_model_and_its_answers_untouched(
    fleet: Fleet,
    models: dict[str, Path],
    attack: Callable[[Fleet, Path], None],
    code: str,
) -> None:
    v2 = fleet.publish(models["v2"])
    _wait(lambda: fleet.committed_version() == v2.version, 120, "the commit of v2")
    answer = fleet.answer()
    activations = fleet.agent.read_log().count('"event": "activated"')
    attack(fleet, models["slow"])

    def refused() -> bool:
        return any(p["state"] == "failed" and p.get("error_code") == code for p in fleet.progress())

    _wait(refused, 60, f"the {code} refusal")
    assert fleet.committed_version() == v2.version
    assert fleet.answer() == answer
    assert fleet.agent.read_log().count('"event": "activated"') == activations
