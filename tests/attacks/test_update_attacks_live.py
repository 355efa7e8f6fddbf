"""The update attack suite against the real agent daemon: the model in service is untouched.

One ``nanofleet-agent run`` daemon serves a real tiny model over its Unix socket, with
``[ota]`` pointed at the repository simulator served over loopback HTTP and ``[mqtt]`` at a
real mosquitto; it polls nothing (``poll_interval_s = 0``) and learns of releases only from
announcements. It first commits release ``v1`` (a real tiny model) from the simulator.

Then every attack of the shared table (:mod:`tests.attacks.attacks`) runs in turn: the
attack is set up, an announcement is published, and the test waits for the update thread
to come to rest (its ``ota_rest`` log event) after reporting ``failed`` with the attack's
code. The bundle hash of the committed slot, ``/v1/models``, a greedy answer (temperature
0, fixed prompt, over the socket) and the number of activations must be what they were
before the attack.

Between attacks the device is brought back to where it stood right after committing
``v1``, as the simulated suite starts each attack on a fresh device: the simulator is
restored (same keys, same metadata), the server's faults are cleared, the daemon's TUF
metadata cache is restored and blobs not in ``v1`` are pruned from its store. The daemon
is at rest while this happens (the last announcement was handled and no poll is due).
Attacks that let the device install a release first run last, since they change the
model in service.

Refusals the daemon treats as possibly transient (a slow server, an unconfirmed
announcement) are retried with jittered backoff before they are reported, so those rows
take longer.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata

from agent.ota.slots import SlotManager
from agent.ota.store import BlobStore
from protocol import topics
from protocol.bundle import MANIFEST_NAME, BundleManifest, canonical_json
from tests.attacks.attacks import ATTACKS, CHANNEL, DEVICE, GROUP, Attack, Scene
from tests.support.mosquitto import Broker, mosquitto_binary, plain_broker
from tests.support.mqtt_client import RecordingClient
from tests.support.ota_models import build_ota_model
from tests.support.processes import ManagedProcess, notified
from tests.support.repo_simulator import (
    DELEGATED,
    RepoHTTPServer,
    RepoSimulator,
    ServerFaults,
    ref_of,
)

pytestmark = pytest.mark.mosquitto

PROMPT = "hello world"
#: Longest wait for one announcement to be handled: a throttled server is retried five
#: times (each try gives up after the fetcher's 10 s grace) with jittered backoff.
HANDLED_TIMEOUT_S = 240.0


# ---- the device's side ------------------------------------------------------------------------


@dataclass
class Agent:
    """The running daemon, its files, and the operator's MQTT client that announces."""

    process: ManagedProcess
    socket: Path
    state: Path
    announcer: RecordingClient

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.process.read_log().splitlines():
            if f'"{name}"' in line and line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    out.append(entry)
        return out

    def announce(self, scene: Scene, timestamp_version: int) -> dict[str, Any]:
        """Publish an announcement; wait until the update thread has handled it.

        Returns the ``ota_rest`` event that ended its handling.
        """
        heard = len(self.events("announcement"))
        rested = len(self.events("ota_rest"))
        hint = scene.hint(timestamp_version)
        topic = topics.release_announcements(GROUP, CHANNEL)
        self.announcer.publish(topic, hint.model_dump_json().encode(), qos=1)

        def handled(_: ManagedProcess) -> bool:
            """the announcement handled (an ota_rest event after it)"""
            return (
                len(self.events("announcement")) > heard and len(self.events("ota_rest")) > rested
            )

        self.process.wait_ready(handled, timeout=HANDLED_TIMEOUT_S)
        return self.events("ota_rest")[rested]

    def progress(self) -> list[dict[str, Any]]:
        return [e["progress"] for e in self.events("update_progress")]

    def client(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://a", timeout=60
        )

    def in_service(self) -> dict[str, object]:
        """What the device serves: committed bundle, served model, greedy answer, activations."""
        current = SlotManager(self.state / "slots").current()
        with self.client() as c:
            models = c.get("/v1/models")
            models.raise_for_status()
            answer = c.post(
                "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0},
            )
            answer.raise_for_status()
        return {
            "committed": None if current is None else current.model_dump(mode="json"),
            "models": models.json(),
            "answer": answer.json()["choices"][0]["text"],
            "activations": len(self.events("activated")),
        }


# ---- the repository's side --------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A simulator's whole state (metadata, files, keys) and the device's TUF cache."""

    metadata: dict[str, bytes]
    files: dict[str, bytes]
    signers: dict[str, dict[str, Signer]]
    counter: int
    tuf: Path
    blobs: set[str]


def _roles(sim: RepoSimulator) -> dict[str, Metadata[Any]]:
    return {
        "root": sim.root,
        "targets": sim.targets,
        "snapshot": sim.snapshot,
        "timestamp": sim.timestamp,
        **{role: sim.delegated[role] for role in DELEGATED},
    }


def _save(sim: RepoSimulator, state: Path, where: Path) -> Checkpoint:
    shutil.copytree(state / "tuf", where, symlinks=True)
    return Checkpoint(
        metadata={role: md.to_bytes() for role, md in _roles(sim).items()},
        files=dict(sim.files),
        signers={role: dict(signers) for role, signers in sim.signers.items()},
        counter=sim.counter,
        tuf=where,
        blobs=set(BlobStore(state / "blobs").blobs()),
    )


def _restore(sim: RepoSimulator, state: Path, cp: Checkpoint) -> None:
    md = {role: Metadata.from_bytes(data) for role, data in cp.metadata.items()}
    sim.root, sim.targets, sim.snapshot, sim.timestamp = (
        md["root"],
        md["targets"],
        md["snapshot"],
        md["timestamp"],
    )
    sim.delegated = {role: md[role] for role in DELEGATED}
    sim.files = dict(cp.files)
    sim.overrides = {}
    sim.signers = {role: dict(signers) for role, signers in cp.signers.items()}
    sim.counter = cp.counter
    shutil.rmtree(state / "tuf")
    shutil.copytree(cp.tuf, state / "tuf", symlinks=True)
    store = BlobStore(state / "blobs")
    store.prune(cp.blobs)
    for sha256 in cp.blobs:  # an attack may have replaced a blob by a link to a decoy
        blob = store.path(sha256)
        if blob.is_symlink():
            data = blob.read_bytes()
            blob.unlink()
            blob.write_bytes(data)
            blob.chmod(0o444)


def _bundle(
    tmp: Path, models: dict[int, Path], version: str, seed: int
) -> tuple[Path, BundleManifest]:
    """The real tiny model of ``seed`` (built once) as bundle ``version``."""
    if seed not in models:
        models[seed] = build_ota_model(tmp / f"model-seed-{seed}", seed=seed)
    source = models[seed]
    directory = tmp / f"base-{version}-seed-{seed}"
    shutil.copytree(source, directory, dirs_exist_ok=True)
    raw = (source / MANIFEST_NAME).read_bytes()
    manifest = BundleManifest.model_validate_json(raw).model_copy(update={"version": version})
    (directory / MANIFEST_NAME).write_bytes(canonical_json(manifest))
    return directory, manifest


@dataclass
class LiveScene(Scene):
    """The scene with the real daemon: real tiny models, polls by announcement."""

    agent: Agent = field(repr=False)
    models: dict[int, Path] = field(repr=False)

    def bundle(self, version: str, **kwargs: object) -> tuple[Path, BundleManifest]:
        """A real tiny model of ``seed`` (default: the version's major number). Every tiny
        model has the same tokenizer; ``weights_bytes`` is ignored."""
        seed = kwargs.get("seed", int(version.split(".")[0]))
        assert isinstance(seed, int)
        return _bundle(self.tmp, self.models, version, seed)

    def poll_quietly(self) -> None:
        rest = self.agent.announce(self, 1)
        assert rest["phase"] != "failed", rest
        assert "error" not in rest, rest

    def blob_path(self, sha256: str) -> Path:
        return BlobStore(self.agent.state / "blobs").path(sha256)


def _agent_config(
    tmp: Path, model_dir: Path, sock: Path, server: RepoHTTPServer, broker: Broker
) -> Path:
    config = tmp / "agent.toml"
    config.write_text(
        f"""
[model]
dir = "{model_dir}"
threads = 1
[server]
socket_path = "{sock}"
[ota]
state_dir = "{tmp / "state"}"
root_file = "{tmp / "root.json"}"
repository_url = "{server.url}"
group = "{GROUP}"
channel = "{CHANNEL}"
poll_interval_s = 0
[ota.health]
requests = 2
max_tokens = 8
[mqtt]
host = "{broker.host}"
port = {broker.port}
device_id = "{DEVICE}"
groups = ["{GROUP}"]
channels = ["{CHANNEL}"]
follow_rounds = false
""",
        encoding="utf-8",
    )
    return config


@dataclass
class Live:
    scene: LiveScene
    checkpoint: Checkpoint


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The daemon, started on the factory model, once it has committed ``v1``."""
    try:
        mosquitto_binary()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    tmp = tmp_path_factory.mktemp("attacks-live")
    models: dict[int, Path] = {}
    sim = RepoSimulator()
    directory, v1 = _bundle(tmp, models, "1.0.0", 1)
    sim.add_bundle(directory)
    sim.point(GROUP, CHANNEL, ref_of(v1))
    sim.publish()
    (tmp / "root.json").write_bytes(sim.root_bytes)
    factory = build_ota_model(tmp / "factory", seed=3)
    sock = Path(f"/tmp/nf-attacks-{tmp.name[-12:]}.sock")
    with (
        RepoHTTPServer(sim.serve) as server,
        plain_broker() as broker,
        RecordingClient(broker.host, broker.port, "operator") as announcer,
    ):
        announcer.connect()
        config = _agent_config(tmp, factory, sock, server, broker)
        exe = Path(sys.executable).with_name("nanofleet-agent")
        process = ManagedProcess(
            [str(exe), "run", "--config", str(config)],
            notify=True,
            name="agent",
            log_path=tmp / "agent.log",
        )
        agent = Agent(process, sock, tmp / "state", announcer)
        with process:
            process.wait_ready(notified("READY=1"), timeout=60)

            def committed(_: ManagedProcess) -> bool:
                """v1 committed by the check at start"""
                return any(e["phase"] == "committed" for e in agent.events("ota_rest"))

            process.wait_ready(committed, timeout=120)
            scene = LiveScene(sim, server, tmp, v1, agent, models)
            yield Live(scene, _save(sim, tmp / "state", tmp / "tuf-checkpoint"))
        sock.unlink(missing_ok=True)


#: Attacks that install a release first change the model in service: they run last.
LIVE_ORDER = sorted(ATTACKS, key=lambda a: a.installs_first)


def test_the_attacks_that_install_first_fit_in_one_run() -> None:
    # After such an attack the device serves another release than v1, so a second one
    # would start from a state the checkpoint does not describe.
    assert sum(a.installs_first for a in ATTACKS) <= 1


@pytest.mark.parametrize("attack", LIVE_ORDER, ids=[a.name for a in LIVE_ORDER])
def test_attack_is_refused_and_the_model_in_service_is_untouched(
    live: Live, attack: Attack
) -> None:
    scene, agent = live.scene, live.scene.agent
    scene.server.faults = ServerFaults()
    _restore(scene.sim, agent.state, live.checkpoint)
    attack.run(scene)  # may let the device install legitimate releases first
    before = agent.in_service()
    assert before["committed"] is not None, "the device has a committed model before the attack"
    reports = len(agent.progress())
    version = 1
    if attack.hint_ahead is not None:
        version = scene.sim.timestamp.signed.version + attack.hint_ahead

    rest = agent.announce(scene, version)

    assert getattr(attack.error, "code", None) == attack.code
    assert rest["phase"] == "failed", rest
    failed = [p for p in agent.progress()[reports:] if p["state"] == "failed"]
    assert [p["error_code"] for p in failed] == [attack.code], agent.progress()[reports:]
    assert agent.in_service() == before
    assert agent.process.returncode is None
