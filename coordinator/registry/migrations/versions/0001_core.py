"""Core tables: devices, groups, tags, heartbeats, releases, rollouts, waves, update records.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("registered_at", _ts, nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("health", sa.String(16), nullable=True),
        sa.Column("base_name", sa.String(64), nullable=True),
        sa.Column("base_version", sa.String(64), nullable=True),
        sa.Column("base_sha256", sa.String(64), nullable=True),
        sa.Column("adapter_name", sa.String(64), nullable=True),
        sa.Column("adapter_version", sa.String(64), nullable=True),
        sa.Column("adapter_sha256", sa.String(64), nullable=True),
        sa.Column("slot", sa.String(1), nullable=True),
        sa.Column("uptime_s", sa.BigInteger(), nullable=True),
        sa.Column("load_1m", sa.Float(), nullable=True),
        sa.Column("free_disk_bytes", sa.BigInteger(), nullable=True),
        sa.Column("status_at", _ts, nullable=True),
        sa.Column("last_seen", _ts, nullable=True),
        sa.Column("will_at", _ts, nullable=True),
        sa.Column("online", sa.String(8), nullable=False),
        sa.Column("online_changed_at", _ts, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )
    op.create_index("ix_devices_online", "devices", ["online"])

    for table in ("device_groups", "device_tags"):
        op.create_table(
            table,
            sa.Column("device_id", sa.String(64), nullable=False),
            sa.Column("name", sa.String(64), nullable=False),
            sa.ForeignKeyConstraint(
                ["device_id"],
                ["devices.id"],
                name=f"fk_{table}_device_id_devices",
                ondelete="CASCADE",
            ),
            sa.PrimaryKeyConstraint("device_id", "name", name=f"pk_{table}"),
        )
        op.create_index(f"ix_{table}_name", table, ["name"])

    op.create_table(
        "heartbeats",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("sent_at", _ts, nullable=False),
        sa.Column("received_at", _ts, nullable=False),
        sa.Column("health", sa.String(16), nullable=False),
        sa.Column("base_sha256", sa.String(64), nullable=True),
        sa.Column("uptime_s", sa.BigInteger(), nullable=False),
        sa.Column("load_1m", sa.Float(), nullable=False),
        sa.Column("free_disk_bytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_heartbeats_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name="pk_heartbeats"),
    )
    op.create_table(
        "heartbeat_hours",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("hour", _ts, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_heartbeat_hours_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "hour", name="pk_heartbeat_hours"),
    )
    op.create_index("ix_heartbeat_hours_hour", "heartbeat_hours", ["hour"])

    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_releases"),
        sa.UniqueConstraint("bundle_sha256", name="uq_releases_bundle_sha256"),
        sa.UniqueConstraint("name", "version", name="uq_releases_name_version"),
    )

    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("max_failure_rate", sa.Float(), nullable=False),
        sa.Column("max_eval_regression", sa.Float(), nullable=True),
        sa.Column("wave_timeout_s", sa.Integer(), nullable=False),
        sa.Column("rollback_of", sa.Integer(), nullable=True),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("finished_at", _ts, nullable=True),
        sa.ForeignKeyConstraint(
            ["release_id"], ["releases.id"], name="fk_rollouts_release_id_releases"
        ),
        sa.ForeignKeyConstraint(
            ["rollback_of"], ["rollouts.id"], name="fk_rollouts_rollback_of_rollouts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_index("ix_rollouts_release_id", "rollouts", ["release_id"])

    op.create_table(
        "rollout_targets",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name="fk_rollout_targets_rollout_id_rollouts",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name="fk_rollout_targets_device_id_devices"
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name="pk_rollout_targets"),
        sa.UniqueConstraint(
            "rollout_id", "position", name="uq_rollout_targets_rollout_id_position"
        ),
    )

    op.create_table(
        "waves",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("size_unit", sa.String(8), nullable=False),
        sa.Column("size_value", sa.Integer(), nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("soak_s", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", _ts, nullable=True),
        sa.Column("decided_at", _ts, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name="fk_waves_rollout_id_rollouts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_waves"),
        sa.UniqueConstraint("rollout_id", "position", name="uq_waves_rollout_id_position"),
    )

    op.create_table(
        "update_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("wave_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.String(1024), nullable=True),
        sa.Column("baseline", sa.Float(), nullable=True),
        sa.Column("candidate", sa.Float(), nullable=True),
        sa.Column("announced_at", _ts, nullable=False),
        sa.Column("reported_at", _ts, nullable=True),
        sa.Column("changed_at", _ts, nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name="fk_update_records_device_id_devices"
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name="fk_update_records_rollout_id_rollouts",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["wave_id"],
            ["waves.id"],
            name="fk_update_records_wave_id_waves",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_update_records"),
        sa.UniqueConstraint(
            "rollout_id", "device_id", name="uq_update_records_rollout_id_device_id"
        ),
    )
    op.create_index("ix_update_records_wave_id", "update_records", ["wave_id"])
    op.create_index("ix_update_records_device_id_id", "update_records", ["device_id", "id"])

    op.create_table(
        "rollout_decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("at", _ts, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("wave_index", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name="fk_rollout_decisions_rollout_id_rollouts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rollout_decisions"),
    )
    op.create_index("ix_rollout_decisions_rollout_id", "rollout_decisions", ["rollout_id"])


def downgrade() -> None:
    for table in (
        "rollout_decisions",
        "update_records",
        "waves",
        "rollout_targets",
        "rollouts",
        "releases",
        "heartbeat_hours",
        "heartbeats",
        "device_tags",
        "device_groups",
        "devices",
    ):
        op.drop_table(table)
