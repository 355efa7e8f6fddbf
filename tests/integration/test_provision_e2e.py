"""Provision, enroll, start: a new device joins the fleet with nothing but its enrollment file.

The operator runs ``nanofleet device provision`` against the fleet CA (the test broker's),
the release repository and the registry; the device runs ``nanofleet-agent enroll``, and
the agent is started as deploy/systemd/nanofleet-agent.service starts it (its credentials
copied, its environment and ExecStart resolved; systemd itself is not PID 1 here). The
agent connects to mosquitto
under mTLS with the provisioned certificate, the coordinator's ingestion writes its status
into the registry, and a release announced afterwards is verified against the pinned root,
installed, and reported back. Nothing sleeps: every wait is on a condition.

The device is provisioned for federated rounds too: enrollment creates its SuperNode key
pair (private key 0600), and every file deploy/systemd/nanofleet-supernode.service loads
as a credential is where the unit expects it (but the SuperExec secret, which the operator
makes), and the settings the unit's environment rewrites name those credentials.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app as agent_cli
from agent.config import load_settings
from coordinator import pki
from coordinator.cli import app as nanofleet
from coordinator.mqtt import BrokerOptions, Ingestor, TlsFiles
from coordinator.mqtt.announce import Announcer
from coordinator.registry import LivenessRule, Online, Registry, open_registry
from protocol.messages import Health
from tests.integration.test_systemd_units import REPO, parse_unit
from tests.support.mosquitto import TlsBroker, tls_broker
from tests.support.ota_fleet import ReleaseRepo, RepoServer
from tests.support.ota_models import build_ota_model
from tests.support.processes import ManagedProcess, notified

pytestmark = pytest.mark.mosquitto

DEVICE = "kiosk-0042"
GROUP = "store-1"


def wait_for(
    cond: Callable[[], bool], what: str, context: Callable[[], str], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{context()}")
        time.sleep(0.05)


UNIT = REPO / "deploy" / "systemd" / "nanofleet-agent.service"
SUPERNODE_UNIT = REPO / "deploy" / "systemd" / "nanofleet-supernode.service"
SUPERLINK = "fleet.example.net:9092"
INSTALL_DIR = "/etc/nanofleet"
INSTALLED_BIN = "/opt/nanofleet/venv/bin"


def unit_stand_in(dest: Path, credentials: Path) -> tuple[list[str], dict[str, str]]:
    """What systemd does for the agent's unit, as far as the agent can tell: copy each
    ``LoadCredential=ID:PATH`` (PATH under /etc/nanofleet, here ``dest``) to
    ``credentials/ID`` (mode 0400), resolve ``%d`` to that directory in ``Environment=``
    and ``ExecStart=``, and run the venv's console script. It also checks the contract
    between the unit and the enrolled settings: the state directory, the socket's
    directory and group are the unit's StateDirectory=, RuntimeDirectory= and
    SupplementaryGroups=."""
    sections = parse_unit(UNIT.read_text())["Service"]

    def setting(key: str) -> list[str]:
        return [v for k, v in sections if k == key]

    credentials.mkdir(mode=0o700)
    for entry in setting("LoadCredential"):
        ident, _, source = entry.partition(":")
        assert source.startswith(INSTALL_DIR + "/"), entry
        target = credentials / ident
        shutil.copyfile(dest / source.removeprefix(INSTALL_DIR + "/"), target)
        target.chmod(0o400)
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    for entry in setting("Environment"):
        key, _, value = entry.partition("=")
        env[key] = value.replace("%d", str(credentials))
    (exec_start,) = setting("ExecStart")
    argv = [
        arg.replace("%d", str(credentials)).replace(INSTALLED_BIN, str(Path(sys.executable).parent))
        for arg in exec_start.split()
    ]
    config = tomllib.loads((credentials / "agent.toml").read_text())
    (state,) = setting("StateDirectory")
    (runtimes,) = setting("RuntimeDirectory")
    runtime, serving = runtimes.split()
    (group,) = setting("SupplementaryGroups")
    assert config["ota"]["state_dir"] == f"/var/lib/{state}"
    assert Path(config["server"]["socket_path"]).parent == Path(f"/run/{runtime}")
    if "federated" in config:  # the marker sits where the SuperNode's units may see it
        assert Path(config["federated"]["serving_marker"]).parent == Path(f"/run/{serving}")
    assert config["server"]["socket_group"] == group
    return argv, env


def check_supernode_files(dest: Path, credentials: Path) -> None:
    """The SuperNode unit's credentials exist after enrollment (the SuperExec secret is the
    operator's), the node key is private, and the settings with the unit's environment load
    and point at the credentials."""
    sections = parse_unit(SUPERNODE_UNIT.read_text())["Service"]
    assert stat.S_IMODE((dest / "flower").stat().st_mode) == 0o750
    assert stat.S_IMODE((dest / "flower" / "supernode.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((dest / "flower" / "supernode.pub").stat().st_mode) == 0o644
    assert (dest / "flower" / "supernode.pub").read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    env = {}
    for key, value in sections:
        if key == "LoadCredential":
            ident, _, source = value.partition(":")
            assert source.startswith(INSTALL_DIR + "/"), value
            if ident != "superexec.secret":
                assert (dest / source.removeprefix(INSTALL_DIR + "/")).is_file(), value
        elif key == "Environment" and value.startswith("NANOFLEET_"):
            name, _, setting = value.partition("=")
            env[name] = setting.replace("%d", str(credentials))
    (exec_start,) = [v for k, v in sections if k == "ExecStart"]
    assert exec_start.split()[1:] == ["supernode", "--config", "%d/agent.toml"]
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        settings = load_settings(dest / "agent.toml")
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    fed = settings.federated
    assert fed is not None
    assert fed.enabled
    assert fed.superlink == SUPERLINK
    assert fed.isolation == "process"
    assert fed.node_key_file == credentials / "supernode.key"
    assert fed.ca_file == credentials / "ca.crt"
    assert fed.superexec_secret_file == credentials / "superexec.secret"


@pytest.fixture
def broker() -> Iterator[TlsBroker]:
    # The broker's ACL names the device (the registry renders it in production); its
    # certificate is the one provisioning issues, not the fixture's.
    with tls_broker({DEVICE: (GROUP,)}) as b:
        yield b


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[str, Registry]]:
    url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    reg = open_registry(url)
    try:
        yield url, reg
    finally:
        reg.engine.dispose()


def test_a_provisioned_device_connects_under_mtls_registers_and_takes_a_release(
    broker: TlsBroker, registry: tuple[str, Registry], tmp_path: Path
) -> None:
    url, reg = registry
    factory = build_ota_model(tmp_path / "factory", seed=1)
    v2 = build_ota_model(tmp_path / "v2", seed=2)
    repo = ReleaseRepo(tmp_path)
    ca = pki.write_credential(broker.ca, tmp_path, "fleet-ca")  # the operator's CA files
    coordinator = broker.identities[pki.COORDINATOR_IDENTITY]
    ingestor = Ingestor(
        BrokerOptions(
            broker.host,
            broker.port,
            tls=TlsFiles(broker.ca_file, coordinator.cert_file, coordinator.key_file),
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
        ),
        reg.ingest,
    )
    ingestor.start()
    sock = Path(f"/tmp/nf-enroll-{os.getpid()}-{tmp_path.name[-8:]}.sock")
    try:
        assert ingestor.link.wait_connected(10)
        with RepoServer(repo.path) as server:
            # Operator: one command makes the identity, settings and pinned root, and
            # registers the device.
            bundle = tmp_path / f"{DEVICE}.enroll"
            result = CliRunner().invoke(
                nanofleet,
                [
                    "device", "provision", "--id", DEVICE, "--group", GROUP,
                    "--broker", f"{broker.host}:{broker.port}",
                    "--repository-url", server.url,
                    "--ca-cert", str(ca.certificate), "--ca-key", str(ca.key),
                    "--repo", str(repo.path), "--model-dir", str(factory),
                    "--superlink", SUPERLINK,
                    "--out", str(bundle), "--registry-url", url,
                ],
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            assert reg.get_device(DEVICE).online is Online.UNKNOWN

            # Device: enroll, then run on the installed settings.
            dest = tmp_path / "etc-nanofleet"
            result = CliRunner().invoke(agent_cli, ["enroll", str(bundle), "--dest", str(dest)])
            assert result.exit_code == 0, result.output
            assert f"nanofleet round register-node {DEVICE} " in result.output
            check_supernode_files(dest, tmp_path / "supernode-credentials")
            # Start it the way its systemd unit does (credentials, environment, ExecStart).
            argv, env = unit_stand_in(dest, tmp_path / "credentials")
            env.update(
                {
                    # Where this test lets the agent write: the unit's StateDirectory= and
                    # RuntimeDirectory= in production (unit_stand_in checks the config agrees).
                    "NANOFLEET_SERVER__SOCKET_PATH": str(sock),
                    "NANOFLEET_FEDERATED__SERVING_MARKER": str(tmp_path / "serving"),
                    "NANOFLEET_SERVER__SOCKET_GROUP": grp.getgrgid(os.getegid()).gr_name,
                    "NANOFLEET_OTA__STATE_DIR": str(tmp_path / "state"),
                    "NANOFLEET_OTA__POLL_INTERVAL_S": "0",
                    "NANOFLEET_OTA__HEALTH__REQUESTS": "3",
                    "NANOFLEET_OTA__HEALTH__MAX_TOKENS": "8",
                    "NANOFLEET_MODEL__THREADS": "1",
                    "NANOFLEET_MQTT__HEARTBEAT_INTERVAL_S": "1",
                }
            )
            agent = ManagedProcess(
                argv, notify=True, name="enrolled-agent", log_path=tmp_path / "agent.log", env=env
            )
            with agent:
                agent.wait_ready(notified("READY=1"), timeout=60)

                # The coordinator sees it: online and healthy in the registry.
                def healthy() -> bool:
                    # What the coordinator's liveness sweep does every few seconds.
                    reg.sweep_liveness(ingestor.link_state(), LivenessRule(interval_s=1.0))
                    device = reg.get_device(DEVICE)
                    return device.online is Online.ONLINE and device.health is Health.HEALTHY

                def context() -> str:
                    return (
                        f"registry: {reg.get_device(DEVICE)}\nagent log:\n{agent.log_tail(40)}"
                        f"\nbroker log:\n{broker.log_tail(40)}"
                    )

                wait_for(healthy, "the device online and healthy in the registry", context)
                device = reg.get_device(DEVICE)
                assert device.groups == (GROUP,)
                assert device.base is not None
                factory_version = device.base.version

                # A release announced afterwards is verified against the pinned root and
                # installed; the registry learns the new base from the device's status.
                ref = repo.publish(v2, GROUP, "stable")
                assert ref.version != factory_version
                Announcer(ingestor.link).announce(
                    GROUP,
                    "stable",
                    repository_url=server.url,
                    timestamp_version=repo.timestamp_version(),
                )

                def on_v2() -> bool:
                    base = reg.get_device(DEVICE).base
                    return base is not None and base.sha256 == ref.sha256

                wait_for(on_v2, "the registry to show the device on the new release", context, 120)
                assert agent.returncode is None
    finally:
        ingestor.stop()
        sock.unlink(missing_ok=True)
