"""The demo's workspace: the operator's files, made with the same functions the CLI uses.

Layout under the workspace root::

    ca/            the fleet CA (ca.crt, ca.key 0600)
    keys/          the release signing keys (offline ones encrypted) and ``passphrase``
                   (0600) unless NANOFLEET_KEY_PASSPHRASE gave one
    repo/          the TUF repository the coordinator serves under /repo
    bundles/       the adapter bundle the demo releases
    coordinator/   coordinator.toml, operator.token (0600), tls/ (its MQTT client
                   certificate, CN svc:coordinator), registry.sqlite3, serve.log
    superlink/     the SuperLink's TLS certificate (from the fleet CA), state and log
    flower/        the operator's ``flwr`` CLI home (node registration, runs)
    round/         the federated round's app, output (metrics.jsonl, result.npz) and bundle
    device-N/      one device: its enrollment file, etc/ (installed by
                   ``nanofleet-agent enroll``, with the SuperNode key in etc/flower/),
                   state/, agent.sock, agent.log, its training texts (training.txt, then
                   federated/training-texts.sqlite3), supernode/ (the SuperNode's log)

The broker's files live elsewhere (see :mod:`coordinator.local_broker`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w

from coordinator import pki
from coordinator.provision import EnrollmentRequest, build_enrollment, write_enrollment
from coordinator.repository.keys import PASSPHRASE_ENV, ROLES, KeyRing
from coordinator.repository.repo import PublishedBundle, Repository
from protocol.bundle import (
    MANIFEST_NAME,
    BundleManifest,
)

#: Every demo device is in this group; a rollout's first wave (one device) is its canary.
FLEET = "fleet"
GROUPS = (FLEET,)
CHANNEL = "stable"


@dataclass
class Workspace:
    """The operator's files for one demo run."""

    root: Path
    ca: pki.Credential
    ca_files: pki.CredentialFiles
    coordinator_tls: pki.CredentialFiles
    passphrase: str

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def repo_dir(self) -> Path:
        return self.root / "repo"

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"

    def repository(self) -> Repository:
        """The repository, able to sign (every key's passphrase is the workspace's)."""
        secret = self.passphrase.encode()
        return Repository(self.repo_dir, KeyRing([self.keys_dir], lambda _r, _k: secret))


def create_workspace(root: Path) -> Workspace:
    """Create the fleet CA, the coordinator's MQTT client certificate, the release keys and
    an empty signed repository under ``root``.

    The keys' passphrase is ``NANOFLEET_KEY_PASSPHRASE`` when set, else a generated one
    kept in ``keys/passphrase`` (mode 0600).
    """
    root.mkdir(parents=True, exist_ok=True)
    ca_dir = root / "ca"
    ca_dir.mkdir(mode=0o700, exist_ok=True)
    ca = pki.create_ca("nanofleet demo CA")
    ca_files = pki.write_credential(ca, ca_dir, "ca")
    keys = root / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    passphrase = os.environ.get(PASSPHRASE_ENV) or ""
    if not passphrase:
        passphrase = secrets.token_urlsafe(24)
        fd = os.open(keys / "passphrase", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(passphrase + "\n")
    tls = root / "coordinator" / "tls"
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    coordinator_tls = pki.write_credential(pki.issue_service(ca, "coordinator"), tls, "coordinator")
    ws = Workspace(root, ca, ca_files, coordinator_tls, passphrase)
    ring = KeyRing([keys], lambda _r, _k: passphrase.encode())
    for role in ROLES:
        ring.create(role)
    Repository.init(ws.repo_dir, ring)
    return ws


def group_of(index: int) -> str:
    """The group of the demo's ``index``-th device (0-based)."""
    return FLEET


def publish(ws: Workspace, bundle_dir: Path, *, groups: Sequence[str] = ()) -> PublishedBundle:
    """Sign ``bundle_dir`` into the repository and point each of ``groups``' channel at it
    (``release add-bundle`` and ``release point``)."""
    repo = ws.repository()
    published = repo.add_bundle(bundle_dir)
    for group in groups:
        repo.point(group, CHANNEL, published.manifest.name, published.manifest.version)
    return published


def point(ws: Workspace, manifest: BundleManifest, group: str) -> None:
    """Point ``group``'s channel at a published bundle (``release point``)."""
    ws.repository().point(group, CHANNEL, manifest.name, manifest.version)


def bundle_bytes(bundle_dir: Path) -> int:
    """The size of a bundle: its manifest and every file it lists."""
    manifest = BundleManifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_bytes())
    return (bundle_dir / MANIFEST_NAME).stat().st_size + sum(f.size for f in manifest.files)


def provision(
    ws: Workspace,
    device_id: str,
    home: Path,
    *,
    group: str,
    broker: tuple[str, int],
    repository_url: str,
    model_dir: Path,
    superlink: str | None = None,
) -> Path:
    """Write ``device_id``'s enrollment file into ``home`` (``nanofleet device provision``)
    with its state directory, socket, training store and SuperNode state under ``home``;
    return the file's path."""
    home.mkdir(parents=True, exist_ok=True)
    request = EnrollmentRequest(
        device_id=device_id,
        broker_host=broker[0],
        broker_port=broker[1],
        repository_url=repository_url,
        groups=(group,),
        channel=CHANNEL,
        model_dir=PurePosixPath(model_dir),
        socket_group=None,
        state_dir=PurePosixPath(home / "state"),
        socket_path=PurePosixPath(home / "agent.sock"),
        superlink=superlink,
        federated_data_path=PurePosixPath(home / "federated" / "training-texts.sqlite3"),
        supernode_state_dir=PurePosixPath(home / "supernode"),
        serving_marker=PurePosixPath(home / "serving"),
    )
    root_json = (ws.repo_dir / "metadata" / "root.json").read_bytes()
    target = home / f"{device_id}.enroll"
    write_enrollment(build_enrollment(request, ws.ca, root_json), target)
    return target


def coordinator_config(
    ws: Workspace,
    *,
    port: int,
    broker: tuple[str, int],
    broker_ca: Path,
    heartbeat_interval_s: float,
) -> Path:
    """Write the coordinator's settings and a fresh operator token; return the settings file."""
    directory = ws.coordinator_dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_file = directory / "operator.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    settings: dict[str, Any] = {
        "database_url": f"sqlite:///{directory / 'registry.sqlite3'}",
        "host": "127.0.0.1",
        "port": port,
        "api_token_file": str(token_file),
        "repository_path": str(ws.repo_dir),
        # The online keys: each rollout wave signs its devices' own pointers.
        "keys": str(ws.keys_dir),
        "channel": CHANNEL,
        "repository_url": f"http://127.0.0.1:{port}/repo",
        "rollout_interval_s": 0.5,
        "heartbeat_interval_s": heartbeat_interval_s,
        "missed_heartbeats": 3,
        "mqtt": {
            "host": broker[0],
            "port": broker[1],
            "ca_file": str(broker_ca),
            "cert_file": str(ws.coordinator_tls.certificate),
            "key_file": str(ws.coordinator_tls.key),
        },
    }
    path = directory / "coordinator.toml"
    path.write_text(tomli_w.dumps(settings), encoding="utf-8")
    return path


def superlink_tls(ws: Workspace) -> pki.CredentialFiles:
    """The SuperLink's server certificate for 127.0.0.1, issued by the fleet CA (which the
    devices' enrolled settings trust)."""
    directory = ws.root / "superlink" / "tls"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return pki.write_credential(
        pki.issue_server(ws.ca, ("localhost",), ("127.0.0.1",)), directory, "superlink"
    )
