"""Signing keys of the TUF repository: ed25519 key files, encrypted when offline.

Layout of a key directory (the operator keeps offline roles' directories off the
coordinator; several directories can be combined)::

    <dir>/<role>/<keyid>.key    PKCS#8 PEM private key, mode 0600
    <dir>/<role>/<keyid>.pub    the public key as TUF key JSON

Invariants:

- keys of the offline roles (:data:`OFFLINE_ROLES`: root, targets) are always encrypted
  (``BestAvailableEncryption``); a passphrase comes from ``NANOFLEET_KEY_PASSPHRASE_<ROLE>``,
  then ``NANOFLEET_KEY_PASSPHRASE``, then an interactive prompt;
- keys of the online roles (snapshot, timestamp, adapters, channels) are written
  unencrypted (mode 0600) unless a passphrase is available, so the coordinator daemon can
  re-sign unattended;
- which keys sign a role is decided by the metadata (the keyids its delegator lists), never
  by which files happen to be present.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from coordinator.errors import ConfigError, SigningKeyError
from protocol.release import ADAPTERS_ROLE, CHANNELS_ROLE

OFFLINE_ROLES: Final = ("root", "targets")
ONLINE_ROLES: Final = ("snapshot", "timestamp", ADAPTERS_ROLE, CHANNELS_ROLE)
ROLES: Final = (*OFFLINE_ROLES, *ONLINE_ROLES)
PASSPHRASE_ENV: Final = "NANOFLEET_KEY_PASSPHRASE"  # noqa: S105 (a variable name)

#: Returns the passphrase of a key (role, keyid), or None when there is none to give.
PassphraseSource = Callable[[str, str], bytes | None]

_KEYID = re.compile(r"^[0-9a-f]{64}$")


def check_role(role: str) -> str:
    """Return ``role`` if it is a repository role.

    Raises:
        SigningKeyError: it is not one of :data:`ROLES`.
    """
    if role not in ROLES:
        raise SigningKeyError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return role


def env_passphrases(
    env: Mapping[str, str] | None = None, prompt: Callable[[str], str] | None = None
) -> PassphraseSource:
    """Return a source reading ``NANOFLEET_KEY_PASSPHRASE[_<ROLE>]``.

    When neither variable is set, an offline role's passphrase is asked with ``prompt`` (if
    given); an online role then has none.
    """
    environ = os.environ if env is None else env

    def source(role: str, keyid: str) -> bytes | None:
        value = environ.get(f"{PASSPHRASE_ENV}_{role.upper()}") or environ.get(PASSPHRASE_ENV)
        if value is None and prompt is not None and role in OFFLINE_ROLES:
            value = prompt(f"Passphrase for the {role} key {keyid[:12]}")
        return value.encode() if value else None

    return source


@dataclass(frozen=True)
class KeyFile:
    """One key on disk."""

    role: str
    keyid: str
    private_path: Path
    public: SSlibKey

    @property
    def encrypted(self) -> bool:
        return b"ENCRYPTED" in self.private_path.read_bytes()[:64]


class KeyRing:
    """The keys found in ``dirs`` (new keys go to the first); see the module docstring."""

    def __init__(self, dirs: Sequence[Path], passphrases: PassphraseSource) -> None:
        if not dirs:
            raise ConfigError("keys: at least one key directory is needed")
        self.dirs = list(dirs)
        self._passphrases = passphrases
        self._signers: dict[str, CryptoSigner] = {}

    def create(self, role: str) -> KeyFile:
        """Generate an ed25519 key for ``role`` in the first directory.

        Raises:
            ConfigError: an offline role and no passphrase is available.
        """
        check_role(role)
        private = Ed25519PrivateKey.generate()
        public = SSlibKey.from_crypto(private.public_key())
        passphrase = self._passphrases(role, public.keyid)
        if role in OFFLINE_ROLES and not passphrase:
            raise ConfigError(
                f"the {role} key is offline and must be encrypted: set {PASSPHRASE_ENV}_"
                f"{role.upper()} or {PASSPHRASE_ENV}, or run interactively"
            )
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        directory = self.dirs[0] / role
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        private_path = directory / f"{public.keyid}.key"
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        (directory / f"{public.keyid}.pub").write_text(json.dumps(public.to_dict(), indent=1))
        return KeyFile(role, public.keyid, private_path, public)

    def keys(self, role: str | None = None) -> list[KeyFile]:
        """Return the keys on disk, of ``role`` or of every role, sorted by role then keyid."""
        found: dict[str, KeyFile] = {}
        for directory in self.dirs:
            for r in [role] if role else ROLES:
                for pub in sorted((directory / r).glob("*.pub")):
                    keyid = pub.stem
                    if not _KEYID.match(keyid) or keyid in found:
                        continue
                    key = SSlibKey.from_dict(keyid, json.loads(pub.read_text()))
                    found[keyid] = KeyFile(r, keyid, pub.with_suffix(".key"), key)
        return sorted(found.values(), key=lambda k: (ROLES.index(k.role), k.keyid))

    def public_keys(self, role: str) -> list[SSlibKey]:
        """Return the public keys of ``role`` found on disk."""
        return [k.public for k in self.keys(check_role(role))]

    def signer(self, keyid: str) -> CryptoSigner | None:
        """Return a signer for ``keyid``, or None when its private key is not in these dirs.

        Raises:
            SigningKeyError: the key file is encrypted and the passphrase is missing or wrong.
        """
        if keyid in self._signers:
            return self._signers[keyid]
        key = next((k for k in self.keys() if k.keyid == keyid), None)
        if key is None or not key.private_path.exists():
            return None
        pem = key.private_path.read_bytes()
        passphrase = self._passphrases(key.role, keyid) if key.encrypted else None
        if key.encrypted and not passphrase:
            raise SigningKeyError(
                f"the {key.role} key {keyid[:12]} is encrypted: set {PASSPHRASE_ENV}_"
                f"{key.role.upper()} or {PASSPHRASE_ENV}"
            )
        try:
            private = serialization.load_pem_private_key(pem, passphrase)
        except (ValueError, TypeError) as e:
            raise SigningKeyError(
                f"cannot open the {key.role} key {keyid[:12]}: wrong passphrase or damaged file"
            ) from e
        signer = CryptoSigner(private, key.public)
        self._signers[keyid] = signer
        return signer
