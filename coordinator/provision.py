"""Device provisioning: one enrollment file carries everything a new device needs.

``nanofleet device provision`` builds it on the operator's machine; ``nanofleet-agent
enroll`` installs it on the device (:mod:`agent.enroll`, which re-checks everything). The
file is an uncompressed POSIX tar of exactly these regular files, flat (no directories):

- ``enrollment.json``: format name and version, the device id and groups, the creation
  time, and the SHA-256 of every other member;
- ``agent.toml``: the agent's settings (loads with ``agent.config.AgentSettings``), its file
  paths pointing into :data:`INSTALL_DIR` (``enroll --dest`` rewrites them); with a
  SuperLink address, a ``[federated]`` section too (the SuperLink, the fleet CA that signed
  its certificate, the node key ``enroll`` creates on the device, the training store);
- ``ca.crt``: the fleet CA certificate (the device trusts the broker through it);
- ``device.crt`` and ``device.key``: the device's client certificate (CN = device id) and
  its private key, which exists nowhere else;
- ``root.json``: the TUF root metadata the device pins (the only source of update trust).

The SuperNode's key pair is not in the file: ``nanofleet-agent enroll`` creates it on the
device, so its private key exists only there, and prints the public key's path for
registration with the SuperLink.

Invariants: the device key is generated here and written only into the enrollment file,
which is created with mode 0600 and never overwritten; every name that goes into the file
is validated (:func:`coordinator.pki.validate_device_id`); the pure part
(:func:`build_enrollment`) takes the clock as a parameter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final

import tomli_w
from cryptography.hazmat.primitives import hashes

from coordinator import pki
from coordinator.errors import RefusedError

__all__ = [
    "ENROLLMENT_FORMAT",
    "ENROLLMENT_VERSION",
    "INSTALL_DIR",
    "MEMBERS",
    "MEMBER_MAX_BYTES",
    "Enrollment",
    "EnrollmentRequest",
    "agent_config",
    "build_enrollment",
    "check_superlink",
    "write_enrollment",
]

ENROLLMENT_FORMAT: Final = "nanofleet-enrollment"
ENROLLMENT_VERSION: Final = 1
MANIFEST: Final = "enrollment.json"
#: The members of an enrollment file, in the order they are written.
MEMBERS: Final = (MANIFEST, "agent.toml", "ca.crt", "device.crt", "device.key", "root.json")
#: No member may be larger (a TUF root with a few keys is ~2-10 KB).
MEMBER_MAX_BYTES: Final = 256 * 1024

#: Where ``nanofleet-agent enroll`` installs by default, and the layout below it.
INSTALL_DIR: Final = PurePosixPath("/etc/nanofleet")
TLS_DIR: Final = "tls"
TUF_DIR: Final = "tuf"
#: Defaults of the device's other paths (the systemd unit's StateDirectory, RuntimeDirectory).
STATE_DIR: Final = PurePosixPath("/var/lib/nanofleet")
SOCKET_PATH: Final = PurePosixPath("/run/nanofleet/agent.sock")
SOCKET_GROUP: Final = "nanofleet-clients"
MODEL_DIR: Final = PurePosixPath("/opt/nanofleet/model")
#: The federated defaults: the ClientApp unit's store, the SuperNode unit's state.
FEDERATED_DATA_PATH: Final = PurePosixPath("/var/lib/nanofleet-federated/training-texts.sqlite3")
SUPERNODE_STATE_DIR: Final = PurePosixPath("/var/lib/nanofleet-supernode")
#: Exists while the agent serves a request: training pauses (the agent unit's second
#: RuntimeDirectory, readable by the SuperNode and ClientApp units, unlike /run/nanofleet).
SERVING_MARKER: Final = PurePosixPath("/run/nanofleet-serving/busy")
FLOWER_DIR: Final = "flower"
MQTT_TLS_PORT: Final = 8883
_ROOT_MAX_BYTES: Final = MEMBER_MAX_BYTES
_URL_MAX: Final = 2048


_SUPERLINK = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$")


def check_superlink(address: str) -> str:
    """Return ``address`` if it is ``HOST:PORT`` (``[IPV6]:PORT``) with a port in 1..65535.

    Raises:
        RefusedError: it is not.
    """
    match = _SUPERLINK.fullmatch(address)
    if match is None or not 1 <= int(match[2]) <= 65535:
        raise RefusedError(f"SuperLink address {address!r} is not HOST:PORT")
    return address


@dataclass(frozen=True)
class EnrollmentRequest:
    """What the operator decides about a new device."""

    device_id: str
    broker_host: str
    repository_url: str
    groups: Sequence[str] = ("default",)
    broker_port: int = MQTT_TLS_PORT
    channel: str = "stable"
    model_dir: PurePosixPath = MODEL_DIR
    socket_group: str | None = SOCKET_GROUP
    state_dir: PurePosixPath = STATE_DIR
    socket_path: PurePosixPath = SOCKET_PATH
    #: ``HOST:PORT`` of the SuperLink's Fleet API; None: the device takes no part in rounds.
    superlink: str | None = None
    federated_data_path: PurePosixPath = FEDERATED_DATA_PATH
    supernode_state_dir: PurePosixPath = SUPERNODE_STATE_DIR
    serving_marker: PurePosixPath = SERVING_MARKER

    def check(self) -> None:
        """Raise :class:`RefusedError` naming the first field that is invalid."""
        pki.validate_device_id(self.device_id)
        if not self.groups:
            raise RefusedError("a device needs at least one group")
        for name in (*self.groups, self.channel):
            pki.validate_device_id(name)  # the same rule: a topic segment
        if len(set(self.groups)) != len(self.groups):
            raise RefusedError(f"groups repeat a name: {list(self.groups)}")
        if (
            not self.broker_host
            or len(self.broker_host) > 253
            or not self.broker_host.isprintable()
        ):
            raise RefusedError(f"broker host {self.broker_host!r} is not a host name")
        if not 1 <= self.broker_port <= 65535:
            raise RefusedError(f"broker port {self.broker_port} is outside 1..65535")
        url = self.repository_url
        if not url.startswith(("https://", "http://")) or len(url) > _URL_MAX:
            raise RefusedError(
                f"repository url {url!r} must start with https:// (or http://) and be at most "
                f"{_URL_MAX} characters"
            )
        if self.superlink is not None:
            check_superlink(self.superlink)
        for what, path in (
            ("model dir", self.model_dir),
            ("state dir", self.state_dir),
            ("socket path", self.socket_path),
            ("federated data path", self.federated_data_path),
            ("supernode state dir", self.supernode_state_dir),
            ("serving marker", self.serving_marker),
        ):
            if not path.is_absolute():
                raise RefusedError(f"{what} {str(path)!r} must be an absolute path")


@dataclass(frozen=True)
class Enrollment:
    """A built enrollment file and what the registry should know about its certificate."""

    data: bytes
    device_id: str
    groups: tuple[str, ...]
    serial: int
    fingerprint_sha256: str


def agent_config(request: EnrollmentRequest, install_dir: PurePosixPath = INSTALL_DIR) -> str:
    """The device's ``agent.toml``: model, socket, signed updates, the mTLS MQTT link and,
    with a SuperLink, the federated section."""
    tls = install_dir / TLS_DIR
    server: dict[str, Any] = {"socket_path": str(request.socket_path)}
    if request.socket_group is not None:
        server["socket_group"] = request.socket_group
    config: dict[str, Any] = {
        "model": {"dir": str(request.model_dir)},
        "server": server,
        "ota": {
            "state_dir": str(request.state_dir),
            "root_file": str(install_dir / TUF_DIR / "root.json"),
            "repository_url": request.repository_url,
            "group": request.groups[0],
            "channel": request.channel,
        },
        "mqtt": {
            "host": request.broker_host,
            "port": request.broker_port,
            "device_id": request.device_id,
            "groups": list(request.groups),
            "channels": [request.channel],
            "ca_file": str(tls / "ca.crt"),
            "cert_file": str(tls / "device.crt"),
            "key_file": str(tls / "device.key"),
        },
    }
    if request.superlink is not None:
        config["federated"] = {
            "enabled": True,
            "superlink": request.superlink,
            "ca_file": str(tls / "ca.crt"),
            "node_key_file": str(install_dir / FLOWER_DIR / "supernode.key"),
            "data_path": str(request.federated_data_path),
            "state_dir": str(request.supernode_state_dir),
            "serving_marker": str(request.serving_marker),
        }
    header = (
        f"# nanofleet agent settings for device {request.device_id}, written by "
        "`nanofleet device provision`.\n# NANOFLEET_* environment variables override any key "
        "(see agent/config.py).\n"
    )
    return header + tomli_w.dumps(config)


def _check_root(root_json: bytes) -> None:
    if len(root_json) > _ROOT_MAX_BYTES:
        raise RefusedError(f"the TUF root is {len(root_json)} bytes, over {_ROOT_MAX_BYTES}")
    try:
        signed = json.loads(root_json)["signed"]
        kind = signed["_type"]
    except (ValueError, KeyError, TypeError) as e:
        raise RefusedError(f"the TUF root is not root metadata: {e}") from e
    if kind != "root":
        raise RefusedError(f"the TUF root file holds {kind!r} metadata, not root")


def _member(name: str, data: bytes, mode: int, mtime: int) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = mtime
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def build_enrollment(
    request: EnrollmentRequest,
    ca: pki.Credential,
    root_json: bytes,
    *,
    now: datetime | None = None,
) -> Enrollment:
    """Issue the device's certificate and pack the enrollment file (returned in memory).

    Raises :class:`RefusedError` for an invalid request (naming the field), a ``root_json``
    that is not TUF root metadata or is too large, or an expired CA.
    """
    request.check()
    _check_root(root_json)
    when = now if now is not None else datetime.now(UTC)
    credential = pki.issue_device(ca, request.device_id, now=when)
    files = {
        "agent.toml": agent_config(request).encode(),
        "ca.crt": ca.certificate_pem(),
        "device.crt": credential.certificate_pem(),
        "device.key": credential.key_pem(),
        "root.json": root_json,
    }
    manifest = {
        "format": ENROLLMENT_FORMAT,
        "schema_version": ENROLLMENT_VERSION,
        "device_id": request.device_id,
        "groups": list(request.groups),
        "created_at": when.isoformat(),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    members = {MANIFEST: json.dumps(manifest, indent=2).encode() + b"\n", **files}
    out = io.BytesIO()
    mtime = int(when.timestamp())
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in MEMBERS:
            mode = 0o600 if name == "device.key" else 0o644
            tar.addfile(*_member(name, members[name], mode, mtime))
    cert = credential.certificate
    return Enrollment(
        data=out.getvalue(),
        device_id=request.device_id,
        groups=tuple(request.groups),
        serial=cert.serial_number,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def write_enrollment(enrollment: Enrollment, path: Path) -> None:
    """Write the enrollment file to ``path``, mode 0600 (it holds the device's private key).

    Raises :class:`RefusedError` if ``path`` already exists (a device key is never
    overwritten), ``OSError`` if it cannot be written.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as e:
        raise RefusedError(f"{path} already exists; remove it or choose another --out") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(enrollment.data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
