"""Which SuperNode is which device: register a device's node key with the SuperLink and
bind the node ID it gets to the device in the registry.

A run samples only the node IDs bound to its group's devices
(:func:`coordinator.federation.campaign.run_round`), so a device trains on its own group's
runs and on no other, even though every group's SuperNodes connect to the same SuperLink.
The SuperLink authenticates each node by its key, so a node ID stands for the device whose
key was registered.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from coordinator.errors import RefusedError
from coordinator.registry import FederationNodeView, Registry

__all__ = ["MAX_PUBLIC_KEY_BYTES", "NodeRegistrar", "key_digest", "register_device_node"]

#: An OpenSSH public key line of a NIST EC key is under 300 bytes.
MAX_PUBLIC_KEY_BYTES = 4096


class NodeRegistrar(Protocol):
    """What registers a node key with the SuperLink (``FlowerCli``)."""

    def register_node(self, public_key: Path, timeout_s: float = ...) -> int: ...


def key_digest(public_key: Path) -> str:
    """SHA-256 of the public key's OpenSSH line (``type base64``, comment left out).

    Raises:
        RefusedError: the file is missing, over :data:`MAX_PUBLIC_KEY_BYTES`, or not an
            OpenSSH public key line.
    """
    try:
        size = public_key.stat().st_size
        if size > MAX_PUBLIC_KEY_BYTES:
            raise RefusedError(
                f"public key {public_key}: {size} bytes, over the limit of {MAX_PUBLIC_KEY_BYTES}"
            )
        text = public_key.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise RefusedError(f"public key {public_key}: cannot read it: {e}") from e
    fields = text.split()
    if len(fields) < 2 or not fields[0].startswith(("ecdsa-sha2-", "ssh-")):
        raise RefusedError(f"public key {public_key}: not an OpenSSH public key line")
    return hashlib.sha256(f"{fields[0]} {fields[1]}".encode("ascii")).hexdigest()


def register_device_node(
    registry: Registry,
    registrar: NodeRegistrar,
    device_id: str,
    public_key: Path,
    *,
    actor: str,
) -> FederationNodeView:
    """Register ``device_id``'s SuperNode key with the SuperLink and bind its node ID.

    The device must be in the registry (checked first, so nothing is registered for an
    unknown device).

    Raises:
        NotFoundError: no such device.
        RefusedError: the key file is not a public key (see :func:`key_digest`).
        RunFailedError: the SuperLink refused the key (already registered, among others).
        ConflictError: the SuperLink returned a node ID bound to another device.
    """
    registry.get_device(device_id)
    digest = key_digest(public_key)
    node_id = registrar.register_node(public_key)
    return registry.bind_federation_node(device_id, node_id, key_sha256=digest, actor=actor)
