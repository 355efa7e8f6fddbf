"""Schema migrations: bring a registry database to the newest revision (or any other).

The Alembic scripts live in ``coordinator/registry/migrations`` inside the package, so an
installed coordinator can upgrade its own database; no ``alembic.ini`` is needed.
Migrations run in one transaction on both backends (SQLite and PostgreSQL have
transactional DDL): a failed upgrade leaves the database at its previous revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from coordinator.registry.engine import writer

__all__ = ["HEAD", "current_revision", "head_revision", "upgrade"]

MIGRATIONS_DIR: Final = Path(__file__).with_name("migrations")
HEAD: Final = "head"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(engine: Engine, revision: str = HEAD) -> None:
    """Upgrade the database behind ``engine`` to ``revision`` (default: the newest).

    Raises:
        alembic.util.CommandError: ``revision`` is unknown.
        sqlalchemy.exc.SQLAlchemyError: the database refused a step; nothing was applied.
    """
    config = _config()
    with writer(engine).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    """Return the database's revision, or ``None`` for an empty (never migrated) database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """Return the newest revision this build ships."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head
