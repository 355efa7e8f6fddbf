"""The SuperNode each device trains through, so a run samples only its group's nodes.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federation_nodes",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(20), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_federation_nodes_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name="pk_federation_nodes"),
        sa.UniqueConstraint("node_id", name="uq_federation_nodes_node_id"),
    )


def downgrade() -> None:
    op.drop_table("federation_nodes")
