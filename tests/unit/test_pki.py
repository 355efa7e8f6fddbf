"""The fleet PKI: what it issues verifies as intended, bad names are refused, keys stay private."""

from __future__ import annotations

import grp
import os
import stat
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from coordinator import pki
from coordinator.errors import ConfigError, RefusedError

NOW = datetime(2026, 12, 3, 20, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> pki.Credential:
    return pki.create_ca("test fleet CA", now=NOW)


def _store(ca: pki.Credential) -> Store:
    return Store([ca.certificate])


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_the_ca_is_a_p256_ca_that_signs_only_leaves(ca: pki.Credential) -> None:
    cert = ca.certificate
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert ca.key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)
    assert ca.common_name == "test fleet CA"


def test_the_server_certificate_verifies_for_its_names_and_addresses(ca: pki.Credential) -> None:
    server = pki.issue_server(ca, ["localhost", "broker.fleet.example"], ["127.0.0.1", "::1"])
    sans = server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost", "broker.fleet.example"]
    assert sans.value.get_values_for_type(x509.IPAddress) == [
        ip_address("127.0.0.1"),
        ip_address("::1"),
    ]
    assert _eku(server.certificate) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in (x509.DNSName("broker.fleet.example"), x509.IPAddress(ip_address("127.0.0.1"))):
        verifier = PolicyBuilder().store(_store(ca)).build_server_verifier(name)
        chain = verifier.verify(server.certificate, [])
        assert chain[-1] == ca.certificate
    other = PolicyBuilder().store(_store(ca)).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(VerificationError):
        other.verify(server.certificate, [])


def test_a_device_certificate_names_the_device_and_is_for_clients_only(ca: pki.Credential) -> None:
    device = pki.issue_device(ca, "Dev-42.kitchen_1")
    assert device.common_name == "Dev-42.kitchen_1"
    assert _eku(device.certificate) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verified = (
        PolicyBuilder().store(_store(ca)).build_client_verifier().verify(device.certificate, [])
    )
    assert verified.subjects == [
        x509.UniformResourceIdentifier("urn:nanofleet:device:Dev-42.kitchen_1")
    ]
    as_server = PolicyBuilder().store(_store(ca)).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(VerificationError):
        as_server.verify(device.certificate, [])


def test_the_server_certificate_is_not_a_client_certificate(ca: pki.Credential) -> None:
    server = pki.issue_server(ca)
    with pytest.raises(VerificationError, match="EKU"):
        PolicyBuilder().store(_store(ca)).build_client_verifier().verify(server.certificate, [])


def test_a_service_identity_can_never_be_a_device_id(ca: pki.Credential) -> None:
    coordinator = pki.issue_service(ca, "coordinator")
    assert coordinator.common_name == pki.COORDINATOR_IDENTITY == "svc:coordinator"
    assert _eku(coordinator.certificate) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(RefusedError, match="device id"):
        pki.issue_device(ca, pki.COORDINATOR_IDENTITY)


def test_a_certificate_from_an_impostor_ca_with_the_same_name_does_not_verify(
    ca: pki.Credential,
) -> None:
    foreign = pki.create_ca(ca.common_name)
    device = pki.issue_device(foreign, "dev-1")
    with pytest.raises(VerificationError):
        PolicyBuilder().store(_store(ca)).build_client_verifier().verify(device.certificate, [])
    with pytest.raises(InvalidSignature):
        device.certificate.verify_directly_issued_by(ca.certificate)


@pytest.mark.parametrize(
    ("device_id", "why"),
    [
        ("", "empty"),
        ("a" * 65, "over the limit of 64"),
        ("dev/1", "'/'"),
        ("dev+", "wildcard"),
        ("#", "wildcard"),
        ("dev 1", "letters, digits"),
        ("svc:coordinator", "letters, digits"),
        ("-dev", "starting with a letter or digit"),
        ("dev\x00", "NUL"),
        ("dév", "letters, digits"),
    ],
)
def test_an_invalid_device_id_is_refused_with_the_rule(
    ca: pki.Credential, device_id: str, why: str
) -> None:
    with pytest.raises(RefusedError, match="device id") as caught:
        pki.issue_device(ca, device_id)
    assert why in str(caught.value)


def test_an_invalid_service_name_is_refused(ca: pki.Credential) -> None:
    with pytest.raises(RefusedError, match="service name"):
        pki.issue_service(ca, "co/ordinator")


def test_validity_follows_the_injected_clock(ca: pki.Credential) -> None:
    device = pki.issue_device(ca, "dev-1", valid_days=30, now=NOW)
    assert device.certificate.not_valid_before_utc == NOW - pki.BACKDATE
    assert device.certificate.not_valid_after_utc == NOW + timedelta(days=30)


@pytest.mark.parametrize("days", [0, -1, 36501])
def test_a_validity_out_of_range_is_refused(ca: pki.Credential, days: int) -> None:
    with pytest.raises(RefusedError, match="valid_days"):
        pki.issue_device(ca, "dev-1", valid_days=days, now=NOW)


def test_an_expired_ca_issues_nothing(ca: pki.Credential) -> None:
    later = NOW + timedelta(days=pki.CA_VALID_DAYS + 1)
    with pytest.raises(RefusedError, match="expired"):
        pki.issue_device(ca, "dev-1", now=later)


@pytest.mark.parametrize(
    ("hostnames", "addresses", "match"),
    [
        (["bad host"], [], "not a valid DNS name"),
        (["-leading.example"], [], "not a valid DNS name"),
        ([], ["256.1.1.1"], "not an IP address"),
        ([], [], "at least one"),
    ],
)
def test_bad_server_names_are_refused(
    ca: pki.Credential, hostnames: list[str], addresses: list[str], match: str
) -> None:
    with pytest.raises(RefusedError, match=match):
        pki.issue_server(ca, hostnames, addresses)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_keys_are_private_and_certificates_public(
    ca: pki.Credential, tmp_path: Path
) -> None:
    device = pki.issue_device(ca, "dev-1")
    files = pki.write_credential(device, tmp_path, "dev-1")
    assert files.key == tmp_path / "dev-1.key"
    assert _mode(files.key) == 0o600
    assert _mode(files.certificate) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev-1.crt", "dev-1.key"]
    loaded = pki.load_credential(files.certificate, files.key)
    assert loaded.certificate == device.certificate
    assert loaded.key.private_numbers() == device.key.private_numbers()


def test_a_key_can_be_shared_with_a_group(ca: pki.Credential, tmp_path: Path) -> None:
    group = grp.getgrgid(os.getegid()).gr_name  # a group this process may always use
    files = pki.write_credential(pki.issue_server(ca), tmp_path, "broker", group=group)
    assert _mode(files.key) == 0o640
    assert files.key.stat().st_gid == os.getegid()
    plain = tmp_path / "acl"
    plain.write_text("x")
    pki.share_with_group(plain, group)
    assert _mode(plain) == 0o640


def test_an_unknown_group_is_a_config_error(ca: pki.Credential, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no-such-group-nanofleet"):
        pki.write_credential(ca, tmp_path, "ca", group="no-such-group-nanofleet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../ca", "a/b", "", ".hidden", "Upper"])
def test_a_file_name_that_is_not_a_plain_name_is_refused(
    ca: pki.Credential, tmp_path: Path, name: str
) -> None:
    with pytest.raises(RefusedError, match="file name"):
        pki.write_credential(ca, tmp_path, name)


def test_an_encrypted_key_needs_its_passphrase(ca: pki.Credential, tmp_path: Path) -> None:
    files = pki.write_credential(ca, tmp_path, "ca", passphrase=b"correct horse")
    assert b"ENCRYPTED" in files.key.read_bytes()
    assert pki.load_credential(files.certificate, files.key, passphrase=b"correct horse").key
    with pytest.raises(RefusedError, match="not a readable PEM private key"):
        pki.load_credential(files.certificate, files.key)
    with pytest.raises(RefusedError, match="not a readable PEM private key"):
        pki.load_credential(files.certificate, files.key, passphrase=b"wrong")


def test_a_key_that_does_not_match_its_certificate_is_refused(
    ca: pki.Credential, tmp_path: Path
) -> None:
    a = pki.write_credential(pki.issue_device(ca, "dev-a"), tmp_path, "dev-a")
    b = pki.write_credential(pki.issue_device(ca, "dev-b"), tmp_path, "dev-b")
    with pytest.raises(RefusedError, match="not the private key"):
        pki.load_credential(a.certificate, b.key)
    with pytest.raises(RefusedError, match="not a PEM certificate"):
        pki.load_credential(a.key, a.key)


def test_the_crl_lists_revoked_serials_and_is_signed_by_the_ca(
    ca: pki.Credential, tmp_path: Path
) -> None:
    revoked = pki.issue_device(ca, "stolen")
    kept = pki.issue_device(ca, "kept")
    crl = pki.issue_crl(ca, [revoked.certificate.serial_number], valid_days=7, now=NOW)
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(revoked.certificate.serial_number)
    assert crl.get_revoked_certificate_by_serial_number(kept.certificate.serial_number) is None
    assert crl.next_update_utc == NOW + timedelta(days=7)
    path = tmp_path / "crl.pem"
    pki.write_crl(crl, path)
    assert x509.load_pem_x509_crl(path.read_bytes()) == crl
    assert _mode(path) == 0o644
