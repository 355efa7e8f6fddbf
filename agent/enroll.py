"""Installing an enrollment file (``nanofleet-agent enroll FILE``) on a device.

The file comes from ``nanofleet device provision`` (see ``coordinator/provision.py`` for
its format): an uncompressed tar of six flat regular files. It is input from outside, so
it is read into memory under strict bounds and checked whole before anything is written:

- the file is at most :data:`BUNDLE_MAX_BYTES`; members are at most
  :data:`MEMBER_MAX_BYTES` each, regular files with a plain name from :data:`MEMBERS`, each
  present once: a path that climbs (``..``) or starts at ``/``, a link, a device, a
  directory, an unknown or repeated member is refused, naming the member;
- ``enrollment.json`` names the device and the SHA-256 of every other member;
- ``device.key`` is the key of ``device.crt``, which ``ca.crt`` (a CA) signed, whose CN is
  the device id, and which is valid now;
- ``root.json`` is TUF root metadata signed by its own threshold of root keys;
- ``agent.toml`` is valid agent settings for the same device id.

When ``agent.toml`` has a ``[federated]`` section, the device also creates its SuperNode key
pair here (P-384, :func:`agent.federated.supernode.new_node_key`): the private key never
leaves the device (``flower/supernode.key``, 0600) and the public key
(``flower/supernode.pub``) is what the operator registers with the SuperLink
(``nanofleet round register-node DEVICE KEY``, which also binds the node ID the
SuperLink gives it to the device, so it trains only on its own group's runs). Replacing
an enrollment (``force``) makes a new pair.

Then the files are written into a new directory beside ``dest``, with their final modes
(directories 0750, the key 0600 in ``tls/``, settings 0640, certificates and the root
0644), synced, and renamed into place: a device is enrolled completely or not at all. An
existing enrollment is replaced only when asked (``force``).

Every refusal raises :class:`EnrollmentError` whose message names the problem.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Final, Literal

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from agent.config import AgentSettings
from agent.errors import RefusedError
from agent.federated.supernode import new_node_key
from agent.ota._fs import fsync_dir

__all__ = [
    "BUNDLE_MAX_BYTES",
    "DEFAULT_DEST",
    "MEMBERS",
    "MEMBER_MAX_BYTES",
    "EnrollmentError",
    "Installed",
    "enroll",
    "read_enrollment",
]

#: An enrollment file larger than this is refused before it is parsed.
BUNDLE_MAX_BYTES: Final = 1 << 20
#: And so is any member larger than this.
MEMBER_MAX_BYTES: Final = 256 * 1024
MANIFEST: Final = "enrollment.json"
MEMBERS: Final = (MANIFEST, "agent.toml", "ca.crt", "device.crt", "device.key", "root.json")
DEFAULT_DEST: Final = Path("/etc/nanofleet")

_DIR_MODE: Final = 0o750
_KEY_MODE: Final = 0o600
_CONFIG_MODE: Final = 0o640
_PUBLIC_MODE: Final = 0o644
#: Where each member goes below ``dest``, and its mode.
_LAYOUT: Final[Mapping[str, tuple[str, int]]] = {
    MANIFEST: (MANIFEST, _PUBLIC_MODE),
    "agent.toml": ("agent.toml", _CONFIG_MODE),
    "ca.crt": ("tls/ca.crt", _PUBLIC_MODE),
    "device.crt": ("tls/device.crt", _PUBLIC_MODE),
    "device.key": ("tls/device.key", _KEY_MODE),
    "root.json": ("tuf/root.json", _PUBLIC_MODE),
}
#: The SuperNode's key pair, created on the device when the settings have ``[federated]``.
NODE_KEY: Final = ("flower/supernode.key", _KEY_MODE)
NODE_PUBLIC_KEY: Final = ("flower/supernode.pub", _PUBLIC_MODE)


class EnrollmentError(RefusedError):
    """The enrollment file was refused; the message names the problem."""


class _Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["nanofleet-enrollment"]
    schema_version: Literal[1]
    device_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")]
    groups: Annotated[list[str], Field(min_length=1, max_length=32)]
    created_at: datetime
    files: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]


@dataclass(frozen=True)
class Enrollment:
    """A checked enrollment file, in memory."""

    device_id: str
    groups: tuple[str, ...]
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class Installed:
    """Where an enrollment was installed."""

    device_id: str
    dest: Path
    config: Path
    key: Path
    #: The SuperNode's public key to register with the SuperLink (None: no [federated]).
    node_public_key: Path | None = None


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or "\\" in name:
        return "path traversal"
    if member.issym() or member.islnk():
        return f"a link (to {member.linkname!r})"
    if not member.isreg():
        return "not a regular file"
    if len(parts) != 1:
        return "not a plain file name (nested path)"
    if name not in MEMBERS:
        return f"unexpected (allowed: {', '.join(MEMBERS)})"
    if member.size > MEMBER_MAX_BYTES:
        return f"oversize: {member.size} bytes, over the limit of {MEMBER_MAX_BYTES}"
    return None


def _read_members(data: bytes) -> dict[str, bytes]:
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115 - closed below
    except tarfile.TarError as e:
        raise EnrollmentError(f"not an uncompressed tar file: {e}") from e
    files: dict[str, bytes] = {}
    with tar:
        try:
            # Every member is checked as it is met, so at most len(MEMBERS) are ever read.
            for member in tar:
                problem = _member_problem(member)
                if problem is not None:
                    raise EnrollmentError(f"member {member.name!r} refused: {problem}")
                if member.name in files:
                    raise EnrollmentError(f"member {member.name!r} refused: it appears twice")
                handle = tar.extractfile(member)
                content = handle.read(MEMBER_MAX_BYTES + 1) if handle is not None else b""
                if len(content) != member.size:
                    raise EnrollmentError(f"member {member.name!r} is truncated")
                files[member.name] = content
        except tarfile.TarError as e:
            raise EnrollmentError(f"the tar file is malformed: {e}") from e
    missing = [name for name in MEMBERS if name not in files]
    if missing:
        raise EnrollmentError(f"members missing: {', '.join(missing)}")
    return files


def _manifest(files: Mapping[str, bytes]) -> _Manifest:
    try:
        manifest = _Manifest.model_validate_json(files[MANIFEST])
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise EnrollmentError(f"{MANIFEST} is invalid: {problems}") from e
    expected = set(MEMBERS) - {MANIFEST}
    if set(manifest.files) != expected:
        raise EnrollmentError(
            f"{MANIFEST} lists {sorted(manifest.files)}, expected {sorted(expected)}"
        )
    for name, digest in manifest.files.items():
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise EnrollmentError(f"member {name!r} does not match its SHA-256 in {MANIFEST}")
    return manifest


def _certificate(files: Mapping[str, bytes], name: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(files[name])
    except ValueError as e:
        raise EnrollmentError(f"{name} is not a PEM certificate: {e}") from e


def _check_identity(files: Mapping[str, bytes], device_id: str, now: datetime) -> None:
    ca = _certificate(files, "ca.crt")
    cert = _certificate(files, "device.crt")
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise EnrollmentError("ca.crt is not a CA certificate (no basicConstraints CA:TRUE)")
    try:
        key = serialization.load_pem_private_key(files["device.key"], password=None)
    except TypeError as e:
        raise EnrollmentError("device.key is encrypted; the enrollment key must not be") from e
    except ValueError as e:
        raise EnrollmentError(f"device.key is not a PEM private key: {e}") from e
    if key.public_key() != cert.public_key():
        raise EnrollmentError("device.key does not match device.crt (a different key pair)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise EnrollmentError(
            f"device.crt is not signed by the bundled CA ca.crt ({ca.subject.rfc4514_string()})"
        ) from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if common_name != device_id:
        raise EnrollmentError(
            f"device.crt is for {common_name!r}, but the enrollment is for {device_id!r}"
        )
    for what, c in (("device.crt", cert), ("ca.crt", ca)):
        if now < c.not_valid_before_utc:
            raise EnrollmentError(
                f"{what} is not valid before {c.not_valid_before_utc.isoformat()} "
                f"(this device's clock says {now.isoformat()})"
            )
        if now > c.not_valid_after_utc:
            raise EnrollmentError(f"{what} expired at {c.not_valid_after_utc.isoformat()}")


def _check_root(files: Mapping[str, bytes]) -> None:
    from tuf.api.exceptions import RepositoryError
    from tuf.api.metadata import Metadata, Root

    try:
        md = Metadata[Root].from_bytes(files["root.json"])
    except Exception as e:  # python-tuf raises assorted errors for malformed metadata
        raise EnrollmentError(f"root.json is not TUF root metadata: {e}") from e
    if not isinstance(md.signed, Root):
        raise EnrollmentError(f"root.json holds {md.signed.type!r} metadata, not root")
    try:
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except RepositoryError as e:
        raise EnrollmentError(f"root.json is not signed by its own root keys: {e}") from e


@functools.cache
def _file_settings() -> type[BaseModel]:
    """AgentSettings' fields as a plain model: validates the file alone (settings classes
    also read ``NANOFLEET_*`` variables, which must not decide whether a file is valid)."""
    fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in AgentSettings.model_fields.items()
    }
    return create_model(
        "EnrolledAgentSettings", __config__=ConfigDict(extra="forbid", frozen=True), **fields
    )


def _config(files: Mapping[str, bytes], device_id: str, dest: Path) -> dict[str, Any]:
    try:
        config = tomllib.loads(files["agent.toml"].decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise EnrollmentError(f"agent.toml is not valid TOML: {e}") from e
    mqtt = config.get("mqtt")
    ota = config.get("ota")
    if not isinstance(mqtt, dict) or not isinstance(ota, dict):
        raise EnrollmentError("agent.toml needs [mqtt] and [ota] sections")
    if mqtt.get("device_id") != device_id:
        raise EnrollmentError(
            f"agent.toml mqtt.device_id is {mqtt.get('device_id')!r}, not {device_id!r}"
        )
    # The settings name the files where this enrollment puts them.
    mqtt["ca_file"] = str(dest / _LAYOUT["ca.crt"][0])
    mqtt["cert_file"] = str(dest / _LAYOUT["device.crt"][0])
    mqtt["key_file"] = str(dest / _LAYOUT["device.key"][0])
    ota["root_file"] = str(dest / _LAYOUT["root.json"][0])
    federated = config.get("federated")
    if federated is not None:
        if not isinstance(federated, dict):
            raise EnrollmentError("agent.toml [federated] is not a table")
        federated["ca_file"] = str(dest / _LAYOUT["ca.crt"][0])
        federated["node_key_file"] = str(dest / NODE_KEY[0])
    try:
        _file_settings().model_validate(config)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
        )
        raise EnrollmentError(f"agent.toml is not valid agent settings: {problems}") from e
    return config


def read_enrollment(path: Path, *, now: datetime | None = None) -> Enrollment:
    """Read and check the enrollment file at ``path`` (see the module docstring).

    Raises:
        EnrollmentError: the file is too large or fails any check; the message names it.
        OSError: the file cannot be read.
    """
    with path.open("rb") as f:
        data = f.read(BUNDLE_MAX_BYTES + 1)
    if len(data) > BUNDLE_MAX_BYTES:
        raise EnrollmentError(f"{path} is over the limit of {BUNDLE_MAX_BYTES} bytes")
    files = _read_members(data)
    manifest = _manifest(files)
    _check_identity(files, manifest.device_id, now or datetime.now(UTC))
    _check_root(files)
    _config(files, manifest.device_id, DEFAULT_DEST)
    return Enrollment(manifest.device_id, tuple(manifest.groups), files)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def enroll(
    path: Path,
    dest: Path = DEFAULT_DEST,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> Installed:
    """Check the enrollment file at ``path`` and install it into ``dest``, atomically.

    Raises:
        EnrollmentError: the file is refused, ``dest`` is a link or not a directory, or it
            holds an enrollment already and ``force`` is false.
        OSError: a file cannot be read or written.
    """
    enrollment = read_enrollment(path, now=now)
    dest = Path(os.path.abspath(dest))
    if dest.is_symlink():
        raise EnrollmentError(f"{dest} is a symbolic link; give the real directory")
    if dest.exists():
        if not dest.is_dir():
            raise EnrollmentError(f"{dest} exists and is not a directory")
        if any(dest.iterdir()) and not force:
            raise EnrollmentError(
                f"{dest} is not empty (an enrollment is installed); pass --force to replace it"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    config = _config(enrollment.files, enrollment.device_id, dest)
    files = dict(enrollment.files)
    files["agent.toml"] = (
        f"# Enrolled device {enrollment.device_id}; installed by `nanofleet-agent enroll`.\n"
        + tomli_w.dumps(config)
    ).encode()

    federated = "federated" in config
    subdirs = ("tls", "tuf", "flower") if federated else ("tls", "tuf")
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.enroll-"))
    old: Path | None = None
    try:
        for sub in subdirs:
            (staging / sub).mkdir(mode=_DIR_MODE)
            os.chmod(staging / sub, _DIR_MODE)
        for name, (relative, mode) in _LAYOUT.items():
            _write(staging / relative, files[name], mode)
        if federated:
            private, public = new_node_key()
            _write(staging / NODE_KEY[0], private, NODE_KEY[1])
            _write(staging / NODE_PUBLIC_KEY[0], public, NODE_PUBLIC_KEY[1])
        for sub in subdirs:
            fsync_dir(staging / sub)
        os.chmod(staging, _DIR_MODE)
        fsync_dir(staging)
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            os.rename(dest, old / "previous")
        os.rename(staging, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not dest.exists():
            os.rename(old / "previous", dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return Installed(
        device_id=enrollment.device_id,
        dest=dest,
        config=dest / "agent.toml",
        key=dest / _LAYOUT["device.key"][0],
        node_public_key=dest / NODE_PUBLIC_KEY[0] if federated else None,
    )
