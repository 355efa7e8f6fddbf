"""Releases on both backends: recorded once per bundle, versions never reused."""

from __future__ import annotations

import pytest

from coordinator.errors import RefusedError
from coordinator.registry import ConflictError, NotFoundError, Registry
from protocol.bundle import BundleKind, bundle_hash
from tests.support.db_fixtures import ManualClock, make_manifest


def test_create_find_and_list(registry: Registry, clock: ManualClock) -> None:
    base = make_manifest("smollm2-135m", "1.0.0")
    adapter = make_manifest(
        "support-lora", "0.1.0", BundleKind.ADAPTER, base_sha256=bundle_hash(base)
    )
    r1 = registry.create_release(base, actor="op")
    r2 = registry.create_release(adapter, actor="ci")
    assert r1.bundle_sha256 == bundle_hash(base)
    assert r1.kind is BundleKind.BASE
    assert r1.manifest == base
    assert r1.created_at == clock.now
    assert r2.kind is BundleKind.ADAPTER
    assert registry.get_release(r1.id) == r1
    assert registry.find_release("support-lora", "0.1.0") == r2
    assert registry.list_releases() == [r2, r1]
    assert registry.list_releases(limit=1) == [r2]
    assert [a.action for a in registry.list_audit()] == ["release.create", "release.create"]
    assert registry.list_audit()[0].details["bundle_sha256"] == r2.bundle_sha256


def test_same_bundle_twice_is_the_same_release(registry: Registry) -> None:
    manifest = make_manifest()
    assert registry.create_release(manifest, actor="op") == registry.create_release(
        manifest, actor="op"
    )
    assert len(registry.list_releases()) == 1


def test_reused_version_refused(registry: Registry) -> None:
    registry.create_release(make_manifest("m", "1.0.0"), actor="op")
    other = make_manifest("m", "1.0.0", BundleKind.ADAPTER)
    with pytest.raises(ConflictError, match=r"release m 1.0.0 already exists with bundle"):
        registry.create_release(other, actor="op")


def test_unknown_and_bad_input(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="unknown release 42"):
        registry.get_release(42)
    with pytest.raises(NotFoundError, match=r"unknown release m 9.9"):
        registry.find_release("m", "9.9")
    with pytest.raises(RefusedError, match=r"actor must be 1..128 printable"):
        registry.create_release(make_manifest(), actor="")
    with pytest.raises(RefusedError, match=r"limit 0 is outside 1..1000"):
        registry.list_releases(limit=0)
