"""Fault suite: the real agent daemon SIGKILLed at each named point of an update.

For every point of :data:`tests.faults.crash_agent.POINTS`, a device serving its factory
model is sent a release; the harness kills the process the first time the update reaches
the point (it says so first). The device is then restarted as systemd would, with the
plain ``nanofleet-agent``, and must:

- come up and answer at once, on the old or the new model, never neither: the model it
  loads at start is exactly one of the two bundles (by bundle hash) and its answer is
  that bundle's greedy answer (never a mix);
- finish on its own: a good release ends committed and served, a release that fails its
  health gate ends rolled back with the old model served and nothing committed;
- keep its state consistent: the slot pointer names what it serves after the update.

Each point runs ``NANOFLEET_FAULT_REPEATS`` times (default 1); the table of outcomes is
printed. A broken device is any case where one of the rules above does not hold.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.ota.slots import SlotManager
from protocol.bundle import BundleManifest, bundle_hash
from tests.faults.crash_agent import POINTS
from tests.support.ota_fleet import agent_config
from tests.support.ota_models import build_ota_model
from tests.support.processes import ManagedProcess, notified
from tests.support.repo_simulator import RepoHTTPServer, RepoSimulator, ref_of

GROUP, CHANNEL = "lab", "stable"
PROMPT = "hello world"
HARNESS = Path(__file__).with_name("crash_agent.py")
AGENT = Path(sys.executable).with_name("nanofleet-agent")
REPEATS = int(os.environ.get("NANOFLEET_FAULT_REPEATS", "1"))
#: Points reached only when the new model fails its health gate.
ROLLBACK_POINTS = frozenset({"mid_rollback"})


def _hash(model_dir: Path) -> str:
    manifest = (model_dir / "manifest.json").read_bytes()
    return bundle_hash(BundleManifest.model_validate_json(manifest))


def _answer(socket: Path) -> str:
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://a", timeout=60
    ) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])


def _loaded_hash(log: Path) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if '"model_loaded"' in line:
            return str(json.loads(line)["bundle_hash"])
    raise AssertionError(f"{log}: no model_loaded line")


def _rejected(state: Path) -> list[str]:
    """Release ids the device rolled back and will not install again."""
    try:
        return list(json.loads((state / "record.json").read_bytes())["rejected"])
    except FileNotFoundError:
        return []


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class Models:
    factory: Path
    good: Path
    bad: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    work = tmp_path_factory.mktemp("fault-models")
    return Models(
        factory=build_ota_model(work / "factory", seed=1),
        good=build_ota_model(work / "good", seed=2),
        bad=build_ota_model(work / "bad", seed=3, layers=96),
    )


@pytest.fixture(scope="module")
def answers(models: Models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each bundle's greedy answer, by bundle hash, from an agent serving it directly."""
    out = {}
    for model_dir in (models.factory, models.good):
        work = tmp_path_factory.mktemp("answer")
        sock = Path(f"/tmp/nf-fault-{work.name[-12:]}.sock")
        config = work / "agent.toml"
        config.write_text(
            f'[model]\ndir = "{model_dir}"\nthreads = 1\n[server]\nsocket_path = "{sock}"\n'
        )
        with ManagedProcess(
            [str(AGENT), "run", "--config", str(config)],
            notify=True,
            name="answer",
            log_path=work / "log",
        ) as agent:
            agent.wait_ready(notified("READY=1"), timeout=60)
            out[_hash(model_dir)] = _answer(sock)
    assert len(set(out.values())) == 2, "the two models must answer differently"
    return out


@pytest.fixture
def repo() -> Iterator[tuple[RepoSimulator, RepoHTTPServer]]:
    sim = RepoSimulator()
    with RepoHTTPServer(sim.serve) as server:
        yield sim, server


def _device(
    models: Models, sim: RepoSimulator, server: RepoHTTPServer, tmp_path: Path
) -> tuple[Path, Path, Path]:
    """An agent config trusting ``sim`` and following ``server``: (config, socket, state dir)."""
    root = tmp_path / "root.json"
    root.write_bytes(sim.root_bytes)
    sock = Path(f"/tmp/nf-fault-{tmp_path.name[-12:]}.sock")
    state = tmp_path / "state"
    config = agent_config(
        tmp_path / "agent.toml",
        model_dir=models.factory,
        socket_path=sock,
        state_dir=state,
        root_file=root,
        repository_url=server.url,
        group=GROUP,
        poll_interval_s=0.2,
    )
    return config, sock, state


CASES = [pytest.param(point, i, id=f"{point}-{i}") for point in POINTS for i in range(REPEATS)]


@pytest.mark.parametrize(("point", "run"), CASES)
def test_a_crash_at_each_point_leaves_a_working_device(
    point: str,
    run: int,
    models: Models,
    answers: dict[str, str],
    repo: tuple[RepoSimulator, RepoHTTPServer],
    tmp_path: Path,
) -> None:
    sim, server = repo
    config, sock, state = _device(models, sim, server, tmp_path)
    bad = point in ROLLBACK_POINTS
    release = models.bad if bad else models.good
    old, new = _hash(models.factory), _hash(release)

    # 1. The harness runs the update and dies at the point.
    crashed = ManagedProcess(
        [sys.executable, str(HARNESS), point, str(config)],
        notify=True,
        name=f"crash-{point}",
        log_path=tmp_path / "crash.log",
    )
    with crashed:
        crashed.wait_ready(notified("READY=1"), timeout=60)
        manifest = sim.add_bundle(release)
        sim.point(GROUP, CHANNEL, ref_of(manifest))
        sim.publish()
        code = crashed.wait_exit(60)
    assert f"fault-injected {point}" in crashed.read_log(), crashed.log_tail()
    assert code == -9

    # 2. Restarted, it serves at once: the old model or the new one, whole.
    log = tmp_path / "restart.log"
    with ManagedProcess(
        [str(AGENT), "run", "--config", str(config)], notify=True, name="restart", log_path=log
    ) as agent:
        agent.wait_ready(notified("READY=1"), timeout=60)
        loaded = _loaded_hash(log)
        assert loaded in (old, new), loaded
        first = _answer(sock)
        assert first in (answers[old], answers.get(new, first))

        # 3. It finishes the update on its own, consistently.
        slots = SlotManager(state / "slots")
        if bad:
            _wait(lambda: bool(_rejected(state)), "the rollback")
            assert slots.current() is None
            assert _answer(sock) == answers[old]
        else:

            def committed() -> bool:
                current = slots.current()
                return current is not None and current.base.sha256 == new

            _wait(committed, "the commit")
            _wait(lambda: _answer(sock) == answers[new], "the new model's answers")
        assert agent.returncode is None
    ended = "rolled back" if bad else "committed"
    print(f"\n{point} run {run}: restarted on {'new' if loaded == new else 'old'}, {ended}")


def test_a_release_that_keeps_killing_the_agent_is_rolled_back(
    models: Models,
    answers: dict[str, str],
    repo: tuple[RepoSimulator, RepoHTTPServer],
    tmp_path: Path,
) -> None:
    """Killed twice with the new model live: the third start rolls it back for good
    (``activation_interrupted``) instead of trying again, and serves the old model."""
    sim, server = repo
    config, sock, state = _device(models, sim, server, tmp_path)
    old = _hash(models.factory)
    for attempt in range(2):
        with ManagedProcess(
            [sys.executable, str(HARNESS), "mid_activation", str(config)],
            notify=True,
            name=f"crash-{attempt}",
            log_path=tmp_path / f"crash-{attempt}.log",
        ) as crashed:
            crashed.wait_ready(notified("READY=1"), timeout=60)
            if attempt == 0:
                manifest = sim.add_bundle(models.good)
                sim.point(GROUP, CHANNEL, ref_of(manifest))
                sim.publish()
            assert crashed.wait_exit(60) == -9
    log = tmp_path / "restart.log"
    with ManagedProcess(
        [str(AGENT), "run", "--config", str(config)], notify=True, name="restart", log_path=log
    ) as agent:
        agent.wait_ready(notified("READY=1"), timeout=60)
        assert _loaded_hash(log) == old

        def reported() -> bool:
            return any(
                '"update_progress"' in line
                and json.loads(line)["progress"]["state"] == "rolled_back"
                and json.loads(line)["progress"]["error_code"] == "activation_interrupted"
                for line in log.read_text(errors="replace").splitlines()
            )

        _wait(reported, "the activation_interrupted rollback report")
        assert len(_rejected(state)) == 1
        assert SlotManager(state / "slots").current() is None
        assert _answer(sock) == answers[old]
        assert '"event": "activated"' not in log.read_text()
