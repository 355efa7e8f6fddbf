"""Alembic environment: runs migrations on the connection that ``migrate.py`` hands over.

There is no alembic.ini: :mod:`coordinator.registry.migrate` builds the configuration and
puts an open connection in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

from coordinator.registry.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run registry migrations through coordinator.registry.migrate, which supplies the "
        "database connection"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
