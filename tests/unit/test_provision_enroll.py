"""Provisioning (`nanofleet device provision`) and enrollment (`nanofleet-agent enroll`).

A provisioned file installs with the right modes and loads as agent settings; every way of
tampering with the file is refused with an error that names the problem, and nothing is
written then.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent import enroll as agent_enroll
from agent.cli import app as agent_app
from agent.config import load_settings
from agent.enroll import EnrollmentError, enroll, read_enrollment
from coordinator import pki, provision
from coordinator.cli import app as coordinator_app
from coordinator.errors import RefusedError
from coordinator.registry import open_registry
from coordinator.repository.keys import ROLES, KeyRing, env_passphrases
from coordinator.repository.repo import Repository
from protocol.exitcodes import ExitCode

DEVICE = "kiosk-0007"
NOW = datetime.now(UTC)
PASSPHRASES = env_passphrases({"NANOFLEET_KEY_PASSPHRASE": "test passphrase"})


@dataclass(frozen=True)
class Fleet:
    ca: pki.Credential
    ca_files: pki.CredentialFiles
    repo: Path
    root_json: bytes


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    base = tmp_path_factory.mktemp("fleet")
    ca = pki.create_ca("test fleet CA")
    ca_files = pki.write_credential(ca, base, "ca")
    keys = KeyRing([base / "keys"], PASSPHRASES)
    for role in ROLES:
        keys.create(role)
    repo = base / "repo"
    Repository.init(repo, keys)
    return Fleet(ca, ca_files, repo, (repo / "metadata" / "root.json").read_bytes())


def request(**overrides: object) -> provision.EnrollmentRequest:
    values: dict[str, object] = {
        "device_id": DEVICE,
        "broker_host": "broker.example.net",
        "repository_url": "https://releases.example.net/repo",
        "groups": ("store-12", "canary"),
    }
    values.update(overrides)
    return provision.EnrollmentRequest(**values)  # type: ignore[arg-type]


def build(fleet: Fleet, **overrides: object) -> bytes:
    return provision.build_enrollment(request(**overrides), fleet.ca, fleet.root_json).data


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


def pack(files: dict[str, bytes], *, fix_manifest: bool = True) -> bytes:
    """A tar of ``files``; the manifest's hashes are recomputed unless told otherwise."""
    files = dict(files)
    if fix_manifest and "enrollment.json" in files:
        manifest = json.loads(files["enrollment.json"])
        manifest["files"] = {
            name: hashlib.sha256(data).hexdigest()
            for name, data in files.items()
            if name in manifest["files"]
        }
        files["enrollment.json"] = json.dumps(manifest).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def with_extra_member(data: bytes, info: tarfile.TarInfo, content: bytes = b"") -> bytes:
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:") as src,
        tarfile.open(fileobj=out, mode="w") as tar,
    ):
        tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
        for m in src:
            tar.addfile(m, src.extractfile(m))
    return out.getvalue()


def tree(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in sorted(root.rglob("*"))
    }


# -- the good path -------------------------------------------------------------------


def test_a_provisioned_device_enrolls_with_restricted_modes_and_valid_settings(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "kiosk.enroll"
    bundle.write_bytes(build(fleet))
    dest = tmp_path / "etc" / "nanofleet"
    installed = enroll(bundle, dest)

    assert installed.device_id == DEVICE
    assert tree(dest) == {
        "agent.toml": 0o640,
        "enrollment.json": 0o644,
        "tls": 0o750,
        "tls/ca.crt": 0o644,
        "tls/device.crt": 0o644,
        "tls/device.key": 0o600,
        "tuf": 0o750,
        "tuf/root.json": 0o644,
    }
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    for name in list(os.environ):
        if name.startswith("NANOFLEET_"):
            monkeypatch.delenv(name)
    settings = load_settings(installed.config)
    assert settings.mqtt is not None
    assert settings.ota is not None
    assert settings.mqtt.device_id == DEVICE
    assert settings.mqtt.groups == ("store-12", "canary")
    assert settings.mqtt.key_file == dest / "tls" / "device.key"
    assert settings.ota.root_file == dest / "tuf" / "root.json"
    assert settings.ota.group == "store-12"
    assert (dest / "tuf" / "root.json").read_bytes() == fleet.root_json
    # The key on disk belongs to the certificate, which the fleet CA signed.
    cred = pki.load_credential(dest / "tls" / "device.crt", dest / "tls" / "device.key")
    assert cred.common_name == DEVICE
    cred.certificate.verify_directly_issued_by(fleet.ca.certificate)
    # The systemd unit points the file paths at its credentials directory: the environment
    # overrides them and keeps the rest of [mqtt].
    monkeypatch.setenv("NANOFLEET_MQTT__KEY_FILE", "/run/credentials/agent/device.key")
    overridden = load_settings(installed.config)
    assert overridden.mqtt is not None
    assert overridden.mqtt.key_file == Path("/run/credentials/agent/device.key")
    assert overridden.mqtt.device_id == DEVICE


def test_the_provisioned_agent_toml_loads_as_is(fleet: Fleet, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_bytes(members(build(fleet))["agent.toml"])
    settings = load_settings(config)
    assert settings.mqtt is not None
    assert settings.mqtt.tls
    assert settings.server.socket_group == "nanofleet-clients"
    assert str(settings.mqtt.key_file) == "/etc/nanofleet/tls/device.key"


def test_every_enrollment_has_its_own_key(fleet: Fleet) -> None:
    first, second = members(build(fleet)), members(build(fleet))
    assert first["device.key"] != second["device.key"]


def test_an_existing_enrollment_is_replaced_only_with_force(fleet: Fleet, tmp_path: Path) -> None:
    bundle = tmp_path / "a.enroll"
    bundle.write_bytes(build(fleet))
    dest = tmp_path / "nanofleet"
    enroll(bundle, dest)
    old_key = (dest / "tls" / "device.key").read_bytes()
    again = tmp_path / "b.enroll"
    again.write_bytes(build(fleet))
    with pytest.raises(EnrollmentError, match=r"not empty.*--force"):
        enroll(again, dest)
    assert (dest / "tls" / "device.key").read_bytes() == old_key
    enroll(again, dest, force=True)
    assert (dest / "tls" / "device.key").read_bytes() != old_key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.enroll", "b.enroll", "nanofleet"]


def test_provisioning_and_enrollment_agree_on_the_format() -> None:
    assert provision.MEMBERS == agent_enroll.MEMBERS
    assert provision.MEMBER_MAX_BYTES == agent_enroll.MEMBER_MAX_BYTES
    assert provision.ENROLLMENT_FORMAT == "nanofleet-enrollment"
    assert str(provision.INSTALL_DIR) == str(agent_enroll.DEFAULT_DEST)


# -- refusals ------------------------------------------------------------------------


def _replace(
    name: str, content: Callable[[Fleet, dict[str, bytes]], bytes]
) -> Callable[..., bytes]:
    def change(fleet: Fleet, files: dict[str, bytes]) -> bytes:
        files[name] = content(fleet, files)
        return pack(files)

    return change


def _other_key(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    return pki.issue_device(fleet.ca, DEVICE).key_pem()


def _foreign_ca_cert(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    return pki.create_ca("someone else's CA").certificate_pem()


def _cert_for_other_device(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    other = pki.issue_device(fleet.ca, "kiosk-9999")
    files["device.key"] = other.key_pem()
    return other.certificate_pem()


def _expired_cert(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    old = pki.issue_device(fleet.ca, DEVICE, valid_days=1, now=NOW - timedelta(days=3))
    files["device.key"] = old.key_pem()
    return old.certificate_pem()


def _unsigned_root(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    root = json.loads(files["root.json"])
    root["signatures"] = []
    return json.dumps(root).encode()


def _tampered_root(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    root = json.loads(files["root.json"])
    root["signed"]["version"] = 7
    return json.dumps(root).encode()


def _config_for_other_device(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    return files["agent.toml"].replace(b'"kiosk-0007"', b'"kiosk-9999"')


def _traversal(name: str) -> Callable[..., bytes]:
    def change(fleet: Fleet, files: dict[str, bytes]) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = 4
        return with_extra_member(pack(files), info, b"evil")

    return change


def _link(kind: bytes) -> Callable[..., bytes]:
    def change(fleet: Fleet, files: dict[str, bytes]) -> bytes:
        del files["device.key"]
        info = tarfile.TarInfo("device.key")
        info.type = kind
        info.linkname = "/etc/shadow"
        return with_extra_member(pack(files), info)

    return change


def _fifo(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    del files["root.json"]
    info = tarfile.TarInfo("root.json")
    info.type = tarfile.FIFOTYPE
    return with_extra_member(pack(files), info)


def _oversize(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    files["root.json"] = b" " * (agent_enroll.MEMBER_MAX_BYTES + 1)
    return pack(files)


def _unknown_member(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    files["run.sh"] = b"#!/bin/sh\n"
    return pack(files)


def _missing_key(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    del files["device.key"]
    return pack(files)


def _duplicate(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    info = tarfile.TarInfo("ca.crt")
    info.size = len(files["ca.crt"])
    return with_extra_member(pack(files), info, files["ca.crt"])


def _hash_mismatch(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    files["agent.toml"] += b"\n# edited\n"
    return pack(files, fix_manifest=False)


def _gzip(fleet: Fleet, files: dict[str, bytes]) -> bytes:
    import gzip

    return gzip.compress(pack(files))


CASES: dict[str, tuple[Callable[[Fleet, dict[str, bytes]], bytes], str]] = {
    "path-traversal-dotdot": (_traversal("../../etc/cron.d/evil"), "path traversal"),
    "path-traversal-absolute": (_traversal("/etc/cron.d/evil"), "path traversal"),
    "nested-path": (_traversal("tls/device.key"), "nested path"),
    "symlink": (_link(tarfile.SYMTYPE), "a link"),
    "hardlink": (_link(tarfile.LNKTYPE), "a link"),
    "fifo": (_fifo, "not a regular file"),
    "oversize-member": (_oversize, "oversize"),
    "unknown-member": (_unknown_member, "'run.sh' refused: unexpected"),
    "missing-member": (_missing_key, "members missing: device.key"),
    "duplicate-member": (_duplicate, "appears twice"),
    "hash-mismatch": (_hash_mismatch, "'agent.toml' does not match its SHA-256"),
    "compressed": (_gzip, "not an uncompressed tar"),
    "key-not-matching-cert": (
        _replace("device.key", _other_key),
        "device.key does not match device.crt",
    ),
    "cert-not-signed-by-bundled-ca": (
        _replace("ca.crt", _foreign_ca_cert),
        "not signed by the bundled CA",
    ),
    "cert-for-another-device": (
        _replace("device.crt", _cert_for_other_device),
        "device.crt is for 'kiosk-9999'",
    ),
    "expired-cert": (_replace("device.crt", _expired_cert), "device.crt expired"),
    "root-unsigned": (_replace("root.json", _unsigned_root), "root.json is not signed"),
    "root-tampered": (_replace("root.json", _tampered_root), "root.json is not signed"),
    "root-garbage": (_replace("root.json", lambda f, m: b"{}"), "root.json is not TUF root"),
    "config-for-another-device": (
        _replace("agent.toml", _config_for_other_device),
        "mqtt.device_id is 'kiosk-9999'",
    ),
    "config-invalid": (
        _replace("agent.toml", lambda f, m: m["agent.toml"] + b"\n[bogus]\nx = 1\n"),
        "not valid agent settings: bogus",
    ),
    "config-not-toml": (_replace("agent.toml", lambda f, m: b"[[["), "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tampered_enrollment_is_refused_naming_the_problem_and_nothing_is_written(
    fleet: Fleet, tmp_path: Path, case: str
) -> None:
    change, message = CASES[case]
    bundle = tmp_path / "bad.enroll"
    bundle.write_bytes(change(fleet, members(build(fleet))))
    dest = tmp_path / "nanofleet"
    with pytest.raises(EnrollmentError) as caught:
        enroll(bundle, dest)
    assert message in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.enroll"]


def test_an_oversize_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    bundle = tmp_path / "huge.enroll"
    bundle.write_bytes(b"\0" * (agent_enroll.BUNDLE_MAX_BYTES + 1))
    with pytest.raises(EnrollmentError, match="over the limit"):
        read_enrollment(bundle)


def test_a_symlinked_destination_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    bundle = tmp_path / "a.enroll"
    bundle.write_bytes(build(fleet))
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(EnrollmentError, match="symbolic link"):
        enroll(bundle, tmp_path / "link")
    assert list((tmp_path / "real").iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device_id": "../etc"}, "device id"),
        ({"device_id": "svc:coordinator"}, "device id"),
        ({"groups": ()}, "at least one group"),
        ({"groups": ("a", "a")}, "repeat"),
        ({"groups": ("a/b",)}, "device id"),
        ({"repository_url": "ftp://x"}, "repository url"),
        ({"broker_port": 0}, "broker port"),
        ({"broker_host": "a\nb"}, "broker host"),
    ],
)
def test_provisioning_refuses_a_bad_request_naming_the_field(
    fleet: Fleet, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(RefusedError, match=message):
        build(fleet, **overrides)


def test_provisioning_refuses_a_root_that_is_not_root_metadata(fleet: Fleet) -> None:
    timestamp = (fleet.repo / "metadata" / "timestamp.json").read_bytes()
    with pytest.raises(RefusedError, match="'timestamp' metadata, not root"):
        provision.build_enrollment(request(), fleet.ca, timestamp)


# -- the two commands ----------------------------------------------------------------


def test_cli_provision_registers_the_device_and_enroll_installs_it(
    fleet: Fleet, tmp_path: Path
) -> None:
    out = tmp_path / "kiosk.enroll"
    db = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    args = [
        "device", "provision", "--id", DEVICE, "--group", "store-12",
        "--broker", "broker.example.net:18883",
        "--repository-url", "https://releases.example.net/repo",
        "--ca-cert", str(fleet.ca_files.certificate), "--ca-key", str(fleet.ca_files.key),
        "--repo", str(fleet.repo), "--out", str(out), "--registry-url", db,
    ]  # fmt: skip
    result = CliRunner().invoke(coordinator_app, args)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    registry = open_registry(db)
    try:
        assert tuple(registry.get_device(DEVICE).groups) == ("store-12",)
    finally:
        registry.engine.dispose()
    # The file is never overwritten: it holds a private key.
    again = CliRunner().invoke(coordinator_app, args)
    assert again.exit_code == ExitCode.BAD_INPUT
    assert "already exists" in again.output

    dest = tmp_path / "device-etc"
    result = CliRunner().invoke(agent_app, ["enroll", str(out), "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    assert f"enrolled device {DEVICE}" in result.output
    settings = load_settings(dest / "agent.toml")
    assert settings.mqtt is not None
    assert settings.mqtt.port == 18883

    tampered = tmp_path / "tampered.enroll"
    files = members(out.read_bytes())
    files["device.key"] = pki.issue_device(fleet.ca, DEVICE).key_pem()
    tampered.write_bytes(pack(files))
    result = CliRunner().invoke(agent_app, ["enroll", str(tampered), "--dest", str(tmp_path / "x")])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "device.key does not match device.crt" in result.output


def test_cli_provision_without_the_ca_key_is_a_config_error(fleet: Fleet, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        coordinator_app,
        [
            "device",
            "provision",
            "--id",
            DEVICE,
            "--broker",
            "b",
            "--repository-url",
            "https://r",
            "--ca-cert",
            str(fleet.ca_files.certificate),
            "--ca-key",
            str(tmp_path / "missing.key"),
            "--repo",
            str(fleet.repo),
            "--out",
            str(tmp_path / "x.enroll"),
        ],
    )
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "cannot read the CA" in result.output
    assert not (tmp_path / "x.enroll").exists()


def test_enrollment_judges_the_file_alone_not_the_environment(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOFLEET_LOG__LEVEL", "bogus")
    bundle = tmp_path / "a.enroll"
    bundle.write_bytes(build(fleet))
    assert enroll(bundle, tmp_path / "nanofleet").device_id == DEVICE


def test_cli_ca_init_writes_a_ca_once_that_provisioning_uses(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOFLEET_CA_PASSPHRASE", "ca passphrase")
    ca_dir = tmp_path / "ca"
    result = CliRunner().invoke(coordinator_app, ["device", "ca-init", "--out", str(ca_dir)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert b"ENCRYPTED" in (ca_dir / "ca.key").read_bytes()
    again = CliRunner().invoke(coordinator_app, ["device", "ca-init", "--out", str(ca_dir)])
    assert again.exit_code == ExitCode.BAD_INPUT
    assert "already holds a CA" in again.output
    out = tmp_path / "d.enroll"
    args = [
        "device", "provision", "--id", DEVICE, "--broker", "mqtt.example.net",
        "--repository-url", "https://r.example.net/repo", "--ca-cert", str(ca_dir / "ca.crt"),
        "--ca-key", str(ca_dir / "ca.key"), "--repo", str(fleet.repo), "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(coordinator_app, args)
    assert result.exit_code == 0, result.output
    ca_pem = (ca_dir / "ca.crt").read_bytes()
    assert members(out.read_bytes())["ca.crt"] == ca_pem
    monkeypatch.delenv("NANOFLEET_CA_PASSPHRASE")
    locked = CliRunner().invoke(coordinator_app, [*args[:-1], str(tmp_path / "e.enroll")])
    assert locked.exit_code == ExitCode.CONFIG
    assert "is encrypted: set NANOFLEET_CA_PASSPHRASE" in locked.output
