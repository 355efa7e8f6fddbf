"""Federated rounds and the audit log on both backends."""

from __future__ import annotations

import pytest

from coordinator.errors import RefusedError
from coordinator.registry import ConflictError, NotFoundError, Registry, RoundState
from tests.support.db_fixtures import ManualClock, make_round_manifest


def test_round_lifecycle(registry: Registry, clock: ManualClock) -> None:
    started = registry.create_round(make_round_manifest("run-1", "edge"), actor="op")
    assert started.state is RoundState.RUNNING
    assert started.group == "edge"
    assert started.metrics == ()
    registry.record_round_metric("run-1", 2, participants=3, loss=1.5, perplexity=4.4)
    registry.record_round_metric("run-1", 1, participants=4, loss=2.0)
    clock.advance(10)
    registry.record_round_metric("run-1", 2, participants=4, loss=1.4, perplexity=4.1)  # replaced
    finished = registry.finish_round(
        "run-1", RoundState.FINISHED, manifest=make_round_manifest("run-1", "edge", finished=True)
    )
    assert finished.state is RoundState.FINISHED
    assert finished.finished_at == clock.now
    assert finished.manifest["result_sha256"] is not None
    assert [(m.number, m.participants, m.loss, m.perplexity) for m in finished.metrics] == [
        (1, 4, 2.0, None),
        (2, 4, 1.4, 4.1),
    ]
    assert registry.get_round("run-1") == finished
    with pytest.raises(ConflictError, match="already ended"):
        registry.finish_round("run-1", RoundState.FAILED)


def test_round_listing_and_refusals(registry: Registry, clock: ManualClock) -> None:
    registry.create_round(make_round_manifest("run-1", "edge"), actor="op")
    clock.advance(1)
    registry.create_round(make_round_manifest("run-2", "core"), actor="op")
    assert [r.id for r in registry.list_rounds()] == ["run-2", "run-1"]
    assert [r.id for r in registry.list_rounds(group="edge")] == ["run-1"]
    with pytest.raises(ConflictError, match="round 'run-1' already exists"):
        registry.create_round(make_round_manifest("run-1", "edge"), actor="op")
    with pytest.raises(NotFoundError, match="unknown round 'nope'"):
        registry.record_round_metric("nope", 1, participants=1)
    with pytest.raises(NotFoundError, match="unknown round 'nope'"):
        registry.get_round("nope")
    with pytest.raises(RefusedError, match="loss must be a finite number >= 0"):
        registry.record_round_metric("run-1", 1, participants=1, loss=float("nan"))
    with pytest.raises(RefusedError, match="round number must be >= 1"):
        registry.record_round_metric("run-1", 0, participants=1)
    with pytest.raises(ConflictError, match="manifest is for round 'run-2'"):
        registry.finish_round(
            "run-1", RoundState.FINISHED, manifest=make_round_manifest("run-2", finished=True)
        )
    with pytest.raises(RefusedError, match="finished as finished or failed"):
        registry.finish_round("run-1", RoundState.RUNNING)


def test_audit_log(registry: Registry, clock: ManualClock) -> None:
    for i in range(5):
        registry.audit("op", "key.rotate", subject=f"key/{i}", details={"n": i})
        clock.advance(1)
    newest = registry.list_audit(limit=2)
    assert [(a.subject, a.details) for a in newest] == [("key/4", {"n": 4}), ("key/3", {"n": 3})]
    older = registry.list_audit(limit=10, before_id=newest[-1].id)
    assert [a.subject for a in older] == ["key/2", "key/1", "key/0"]
    assert older[0].at < newest[-1].at
    with pytest.raises(RefusedError, match="over the limit of 16384"):
        registry.audit("op", "x", details={"blob": "x" * 20000})
    with pytest.raises(RefusedError, match=r"audit action must be 1..64"):
        registry.audit("op", "", details={})
    with pytest.raises(RefusedError, match="actor must be"):
        registry.audit("op\n", "x", details={})
