"""Migrations on both backends: empty to head, previous revision with data to head, and
models that match the migrations exactly."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from coordinator.registry import Registry, current_revision, head_revision, make_engine, upgrade
from coordinator.registry.models import Base
from coordinator.registry.views import RoundState
from coordinator.rollout.policy import RolloutState, WaveState
from protocol.messages import UpdateState
from tests.support.db_fixtures import ManualClock, make_manifest, make_round_manifest

CORE_TABLES = {
    "devices",
    "device_groups",
    "device_tags",
    "heartbeats",
    "heartbeat_hours",
    "releases",
    "rollouts",
    "rollout_targets",
    "waves",
    "update_records",
    "rollout_decisions",
}
LATER_TABLES = {"rounds", "round_metrics", "audit_log", "federation_nodes"}
T = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_upgrade_empty_database_to_head(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision() == "0003"
        tables = set(sa.inspect(engine).get_table_names())
        assert tables >= CORE_TABLES | LATER_TABLES
        upgrade(engine)  # a second upgrade is a no-op
        assert current_revision(engine) == "0003"
    finally:
        engine.dispose()


def test_upgrade_previous_revision_with_data_to_head(database_url: str, clock: ManualClock) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        assert not LATER_TABLES & set(sa.inspect(engine).get_table_names())
        manifest = make_manifest()
        meta = sa.MetaData()
        meta.reflect(engine)
        t = meta.tables
        with engine.begin() as c:
            c.execute(
                t["devices"].insert(),
                [
                    {"id": "dev-1", "registered_at": T, "online": "online", "last_seen": T},
                    {"id": "dev-2", "registered_at": T, "online": "unknown", "last_seen": None},
                ],
            )
            c.execute(t["device_groups"].insert(), [{"device_id": "dev-1", "name": "edge"}])
            c.execute(
                t["releases"].insert(),
                {
                    "id": 1,
                    "name": manifest.name,
                    "version": manifest.version,
                    "kind": "base",
                    "bundle_sha256": "b" * 64,
                    "manifest": manifest.model_dump(mode="json"),
                    "created_at": T,
                    "created_by": "op",
                },
            )
            c.execute(
                t["rollouts"].insert(),
                {
                    "id": 1,
                    "release_id": 1,
                    "selector": {"groups": ["edge"], "tags": [], "devices": []},
                    "state": "running",
                    "max_failure_rate": 0.1,
                    "wave_timeout_s": 600,
                    "created_at": T,
                    "created_by": "op",
                },
            )
            c.execute(
                t["rollout_targets"].insert(),
                {"rollout_id": 1, "device_id": "dev-1", "position": 0},
            )
            c.execute(
                t["waves"].insert(),
                {
                    "id": 1,
                    "rollout_id": 1,
                    "position": 0,
                    "size_unit": "percent",
                    "size_value": 100,
                    "device_count": 1,
                    "soak_s": 0,
                    "state": "running",
                    "started_at": T,
                },
            )
            c.execute(
                t["update_records"].insert(),
                {
                    "device_id": "dev-1",
                    "rollout_id": 1,
                    "wave_id": 1,
                    "state": "fetching",
                    "bytes_done": 5,
                    "bytes_total": 10,
                    "announced_at": T,
                    "changed_at": T,
                },
            )
        upgrade(engine)
        assert current_revision(engine) == head_revision()

        registry = Registry(engine, clock=clock)
        device = registry.get_device("dev-1")
        assert device.groups == ("edge",)
        assert device.last_seen == T
        rollout = registry.get_rollout(1)
        assert rollout.state is RolloutState.RUNNING
        assert rollout.waves[0].state is WaveState.RUNNING
        assert rollout.waves[0].progress == {UpdateState.FETCHING: 1}
        assert [u.bytes_done for u in registry.rollout_updates(1)] == [5]
        # the tables of 0002 work on the upgraded database
        assert registry.create_round(make_round_manifest(), actor="op").state is RoundState.RUNNING
        assert registry.list_audit()[0].action == "round.create"
        # and those of 0003
        registry.bind_federation_node("dev-1", 7, key_sha256="a" * 64, actor="op")
        assert [n.node_id for n in registry.federation_nodes("edge")] == [7]
    finally:
        engine.dispose()


def test_models_match_migrations(registry_url: str) -> None:
    engine = make_engine(registry_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()
