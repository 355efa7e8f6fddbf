"""The SuperNode each device trains through, on both backends."""

from __future__ import annotations

import pytest

from coordinator.errors import RefusedError
from coordinator.registry import ConflictError, NotFoundError, Registry
from tests.support.db_fixtures import ManualClock

KEY_A, KEY_B = "a" * 64, "b" * 64
#: Flower's node IDs are unsigned 64-bit: this one does not fit a signed BIGINT.
BIG = (1 << 64) - 5


def _fleet(registry: Registry) -> None:
    registry.register_device("kiosk-1", groups=["alpha"], actor="op")
    registry.register_device("kiosk-2", groups=["alpha", "canary"], actor="op")
    registry.register_device("till-1", groups=["beta"], actor="op")
    registry.register_device("kiosk-3", groups=["alpha"], actor="op")  # no node yet


def test_a_group_lists_only_its_members_nodes(registry: Registry, clock: ManualClock) -> None:
    _fleet(registry)
    registry.bind_federation_node("kiosk-1", 11, key_sha256=KEY_A, actor="op")
    registry.bind_federation_node("kiosk-2", BIG, key_sha256=KEY_A, actor="op")
    registry.bind_federation_node("till-1", 31, key_sha256=KEY_B, actor="op")
    alpha = registry.federation_nodes("alpha")
    assert [(n.device_id, n.node_id) for n in alpha] == [("kiosk-1", 11), ("kiosk-2", BIG)]
    assert alpha[0].registered_at == clock.now
    assert [n.node_id for n in registry.federation_nodes("beta")] == [31]
    assert [n.node_id for n in registry.federation_nodes("canary")] == [BIG]
    assert registry.federation_nodes("nobody") == []
    entry = registry.list_audit()[0]
    assert (entry.action, entry.subject) == ("federation.bind", "device/till-1")
    assert entry.details == {"node_id": "31", "key_sha256": KEY_B}


def test_a_device_registered_again_moves_to_its_new_node(registry: Registry) -> None:
    _fleet(registry)
    registry.bind_federation_node("kiosk-1", 11, key_sha256=KEY_A, actor="op")
    registry.bind_federation_node("kiosk-1", 12, key_sha256=KEY_B, actor="op")
    (node,) = registry.federation_nodes("alpha")
    assert (node.node_id, node.key_sha256) == (12, KEY_B)
    # Its old node ID is free again.
    registry.bind_federation_node("kiosk-2", 11, key_sha256=KEY_A, actor="op")


def test_refusals(registry: Registry) -> None:
    _fleet(registry)
    registry.bind_federation_node("kiosk-1", 11, key_sha256=KEY_A, actor="op")
    with pytest.raises(ConflictError, match="SuperNode 11 is bound to device 'kiosk-1'"):
        registry.bind_federation_node("till-1", 11, key_sha256=KEY_B, actor="op")
    with pytest.raises(NotFoundError, match="unknown device 'ghost'"):
        registry.bind_federation_node("ghost", 99, key_sha256=KEY_B, actor="op")
    for bad in (0, -1, 1 << 64):
        with pytest.raises(RefusedError, match="node_id must be an unsigned 64-bit integer"):
            registry.bind_federation_node("till-1", bad, key_sha256=KEY_B, actor="op")
    with pytest.raises(RefusedError, match="key_sha256 must be 64 lowercase hex digits"):
        registry.bind_federation_node("till-1", 5, key_sha256="XYZ", actor="op")
    assert [n.node_id for n in registry.federation_nodes("beta")] == []
