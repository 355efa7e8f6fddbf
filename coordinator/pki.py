"""The fleet's certificate authority: device, service and broker certificates for mTLS.

The broker authenticates every MQTT client by its certificate and, with mosquitto's
``use_identity_as_username``, takes the subject's common name (CN) as the MQTT username
that its ACLs are keyed on. Hence the invariants:

- A device certificate's CN is its device id, a valid topic segment
  (:func:`protocol.topics.check_segment`); a service certificate's CN is ``svc:<name>``.
  A ``:`` can never appear in a device id, so no device can be issued a certificate that
  the broker takes for a service.
- Leaf certificates are for one purpose only: server certificates carry the ``serverAuth``
  extended key usage, client certificates ``clientAuth``. OpenSSL refuses a server
  certificate presented as a client one, and a client certificate lacks the names a
  device checks on the broker.
- Keys are ECDSA on P-256 with SHA-256 signatures (accepted by mosquitto 2.0 / OpenSSL 3
  and by every TLS stack a device may use).
- Private keys are written atomically and never world-readable: mode 0600, or 0640 with a
  named group for a daemon that drops privileges (mosquitto started as root runs as user
  ``mosquitto`` and reads its certificates after dropping them).

Clock and validity are parameters (``now``, ``valid_days``) so tests can pin them; a naive
``now`` (no time zone) is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

import grp
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.errors import ConfigError, RefusedError
from protocol.topics import TopicError, check_segment

__all__ = [
    "CA_VALID_DAYS",
    "CLIENT_VALID_DAYS",
    "COORDINATOR_IDENTITY",
    "CRL_VALID_DAYS",
    "DEVICE_URI_PREFIX",
    "SERVER_VALID_DAYS",
    "SERVICE_PREFIX",
    "SERVICE_URI_PREFIX",
    "Credential",
    "CredentialFiles",
    "create_ca",
    "issue_crl",
    "issue_device",
    "issue_server",
    "issue_service",
    "load_credential",
    "service_identity",
    "share_with_group",
    "validate_device_id",
    "write_certificate",
    "write_credential",
    "write_crl",
]

CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 825  # the longest that public TLS clients used to accept
CLIENT_VALID_DAYS = 3650  # device keys live as long as the box; revoke with a CRL
CRL_VALID_DAYS = 365  # the broker refuses every client once its CRL's next_update passes
#: Issued certificates start this much before ``now``, so a device whose clock lags a
#: little still accepts a fresh broker certificate.
BACKDATE = timedelta(minutes=5)

#: Common names of service identities start with this; device ids cannot contain ':'.
SERVICE_PREFIX = "svc:"
#: The coordinator's certificate CN and MQTT username.
COORDINATOR_IDENTITY = SERVICE_PREFIX + "coordinator"
#: Client certificates also name their identity as a URI subject alternative name, so a
#: strict RFC 5280 verifier (which wants a SAN on every leaf) can check them too.
DEVICE_URI_PREFIX = "urn:nanofleet:device:"
SERVICE_URI_PREFIX = "urn:nanofleet:service:"

#: Credential file names: a plain name, never a path.
_FILE_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HOSTNAME_PATTERN = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)

_CURVE = ec.SECP256R1()
_KEY_MODE = 0o600
_SHARED_KEY_MODE = 0o640
_PUBLIC_MODE = 0o644


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid device id (a valid MQTT topic segment).

    Raises :class:`RefusedError` naming the rule (see :func:`protocol.topics.check_segment`:
    1 to 64 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit).
    """
    try:
        return check_segment(device_id, "device id")
    except TopicError as e:
        raise RefusedError(str(e)) from e


def service_identity(name: str) -> str:
    """Return the certificate CN (and MQTT username) of the service ``name``: ``svc:<name>``.

    Raises :class:`RefusedError` if ``name`` breaks the device-id rules.
    """
    try:
        return SERVICE_PREFIX + check_segment(name, "service name")
    except TopicError as e:
        raise RefusedError(str(e)) from e


@dataclass(frozen=True)
class Credential:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def common_name(self) -> str:
        """The subject's CN: a device id, a ``svc:`` identity, a host name or the CA's name."""
        attrs = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value)

    def certificate_pem(self) -> bytes:
        """The certificate in PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, passphrase: bytes | None = None) -> bytes:
        """The private key in PKCS#8 PEM, encrypted when ``passphrase`` is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


@dataclass(frozen=True)
class CredentialFiles:
    """Where :func:`write_credential` put a certificate and its key."""

    certificate: Path
    key: Path


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _check_days(valid_days: int) -> None:
    if not 1 <= valid_days <= 36500:
        raise RefusedError(f"valid_days must be between 1 and 36500 (got {valid_days})")


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    valid_days: int,
) -> x509.CertificateBuilder:
    _check_days(valid_days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(
    name: str = "nanofleet fleet CA",
    *,
    valid_days: int = CA_VALID_DAYS,
    now: datetime | None = None,
) -> Credential:
    """Create a self-signed fleet CA that may sign leaf certificates only (path length 0).

    Raises :class:`RefusedError` if ``name`` is empty, longer than 64 characters or has a
    control character, or ``valid_days`` is out of range.
    """
    if not 1 <= len(name) <= 64 or any(ord(c) < 0x20 for c in name):
        raise RefusedError(
            f"CA name {name!r} is invalid: 1 to 64 printable characters are required"
        )
    when = _now(now)
    key = ec.generate_private_key(_CURVE)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key(), when, valid_days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Credential(cert, key)


def _issue(
    ca: Credential,
    common_name: str,
    *,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    valid_days: int,
    now: datetime | None,
) -> Credential:
    when = _now(now)
    ca_not_after = ca.certificate.not_valid_after_utc
    if when >= ca_not_after:
        raise RefusedError(f"the CA {ca.common_name!r} expired at {ca_not_after.isoformat()}")
    key = ec.generate_private_key(_CURVE)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        _builder(subject, ca.certificate.subject, key.public_key(), when, valid_days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return Credential(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server(
    ca: Credential,
    hostnames: Iterable[str] = ("localhost",),
    addresses: Iterable[str] = ("127.0.0.1",),
    *,
    valid_days: int = SERVER_VALID_DAYS,
    now: datetime | None = None,
) -> Credential:
    """Issue the broker's (or another server's) certificate, valid for TLS server auth only.

    ``hostnames`` become DNS names and ``addresses`` IP addresses in the subject alternative
    names; the CN is the first host name (or address). Raises :class:`RefusedError` for an
    invalid host name or IP address, or when both are empty.
    """
    dns = list(hostnames)
    ips: list[IPv4Address | IPv6Address] = []
    for host in dns:
        if _HOSTNAME_PATTERN.fullmatch(host) is None:
            raise RefusedError(f"server host name {host!r} is not a valid DNS name")
    for text in addresses:
        try:
            ips.append(ip_address(text))
        except ValueError as e:
            raise RefusedError(f"server address {text!r} is not an IP address") from e
    if not dns and not ips:
        raise RefusedError("a server certificate needs at least one host name or IP address")
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    sans += [x509.IPAddress(a) for a in ips]
    common_name = dns[0] if dns else str(ips[0])
    return _issue(
        ca,
        common_name,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
        valid_days=valid_days,
        now=now,
    )


def issue_device(
    ca: Credential,
    device_id: str,
    *,
    valid_days: int = CLIENT_VALID_DAYS,
    now: datetime | None = None,
) -> Credential:
    """Issue a device's client certificate: CN ``device_id``, URI ``urn:nanofleet:device:<id>``.

    Raises :class:`RefusedError` if the device id is invalid (see :func:`validate_device_id`).
    """
    return _issue(
        ca,
        validate_device_id(device_id),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)],
        valid_days=valid_days,
        now=now,
    )


def issue_service(
    ca: Credential,
    name: str,
    *,
    valid_days: int = CLIENT_VALID_DAYS,
    now: datetime | None = None,
) -> Credential:
    """Issue a service's client certificate (e.g. the coordinator's), CN ``svc:<name>``.

    Its URI subject alternative name is ``urn:nanofleet:service:<name>``.

    Raises :class:`RefusedError` if ``name`` is invalid (see :func:`service_identity`).
    """
    return _issue(
        ca,
        service_identity(name),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[x509.UniformResourceIdentifier(SERVICE_URI_PREFIX + name)],
        valid_days=valid_days,
        now=now,
    )


def issue_crl(
    ca: Credential,
    revoked_serials: Iterable[int] = (),
    *,
    valid_days: int = CRL_VALID_DAYS,
    now: datetime | None = None,
) -> x509.CertificateRevocationList:
    """Issue the CA's revocation list naming ``revoked_serials`` (certificate serial numbers).

    The broker checks clients against it; it must be reissued before ``next_update``
    (``now + valid_days``), after which OpenSSL refuses every client. Raises
    :class:`RefusedError` if ``valid_days`` is out of range.
    """
    _check_days(valid_days)
    when = _now(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(when - BACKDATE)
        .next_update(when + timedelta(days=valid_days))
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(when - BACKDATE)
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def _gid(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise ConfigError(f"group {group!r} does not exist on this host") from e


def share_with_group(path: Path, group: str) -> None:
    """Make the file ``path`` readable by ``group`` (mode 0640, or 0750 for a directory).

    Raises :class:`ConfigError` if the group does not exist or this process may not give
    the file to it (only root or a member of the group may).
    """
    gid = _gid(group)
    mode = 0o750 if path.is_dir() else _SHARED_KEY_MODE
    try:
        os.chown(path, -1, gid)
        os.chmod(path, mode)
    except PermissionError as e:
        raise ConfigError(
            f"cannot give {path} to group {group!r}: run as root or as a member of the group"
        ) from e


def _write_atomic(path: Path, data: bytes, mode: int, gid: int | None) -> None:
    """Write ``data`` to ``path`` via a private temporary file, fsync and rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_credential(
    credential: Credential,
    directory: Path,
    name: str,
    *,
    group: str | None = None,
    passphrase: bytes | None = None,
) -> CredentialFiles:
    """Write ``<name>.crt`` (mode 0644) and ``<name>.key`` into ``directory``, atomically.

    The key is mode 0600, or 0640 owned by ``group`` when given (for a daemon that reads
    it after dropping root). With ``passphrase`` the key is encrypted. Raises
    :class:`RefusedError` for a file name that is not a plain name, :class:`ConfigError`
    for an unknown group or one this process may not use, and ``OSError`` if the directory
    cannot be written.
    """
    if _FILE_NAME_PATTERN.fullmatch(name) is None:
        raise RefusedError(
            f"credential file name {name!r} is invalid: use a-z, 0-9, '.', '_', '-' "
            "(at most 64 characters, no '/')"
        )
    gid = _gid(group) if group is not None else None
    files = CredentialFiles(directory / f"{name}.crt", directory / f"{name}.key")
    try:
        _write_atomic(
            files.key,
            credential.key_pem(passphrase),
            _SHARED_KEY_MODE if gid is not None else _KEY_MODE,
            gid,
        )
    except PermissionError as e:
        raise ConfigError(
            f"cannot write {files.key} for group {group!r}: run as root or as a member of the group"
        ) from e
    write_certificate(credential.certificate, files.certificate)
    return files


def write_certificate(certificate: x509.Certificate, path: Path) -> None:
    """Write ``certificate`` as PEM to ``path`` (mode 0644), atomically.

    Used alone for the CA certificate that devices and the broker trust. Raises ``OSError``
    if the file cannot be written.
    """
    _write_atomic(path, certificate.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE, None)


def write_crl(crl: x509.CertificateRevocationList, path: Path) -> None:
    """Write ``crl`` as PEM to ``path`` (mode 0644), atomically. Raises ``OSError`` on I/O."""
    _write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE, None)


def load_credential(certificate: Path, key: Path, *, passphrase: bytes | None = None) -> Credential:
    """Read a certificate and its key from PEM files.

    Raises :class:`RefusedError` if a file is not PEM of the right kind, the key is not a
    P-256 EC key, it is encrypted and no (or a wrong) passphrase was given, or the key does
    not belong to the certificate; ``OSError`` if a file cannot be read.
    """
    try:
        cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    except ValueError as e:
        raise RefusedError(f"{certificate} is not a PEM certificate: {e}") from e
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=passphrase)
    except (ValueError, TypeError) as e:
        raise RefusedError(f"{key} is not a readable PEM private key: {e}") from e
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != _CURVE.name:
        raise RefusedError(f"{key} is not an EC P-256 private key")
    if cert.public_key() != private.public_key():
        raise RefusedError(f"{key} is not the private key of {certificate}")
    return Credential(cert, private)
