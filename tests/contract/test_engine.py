"""The engine factory: SQLite pragmas, PostgreSQL driver, and refused URLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from coordinator.errors import ConfigError
from coordinator.registry import default_url, make_engine, open_registry
from coordinator.registry.engine import writer


def test_sqlite_file_has_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(default_url(tmp_path))
    try:
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        with writer(engine).begin() as c:  # BEGIN IMMEDIATE works
            c.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        assert (tmp_path / "registry.sqlite3").exists()
    finally:
        engine.dispose()


def test_sqlite_enforces_foreign_keys(tmp_path: Path) -> None:
    registry = open_registry(default_url(tmp_path))
    try:
        with pytest.raises(sa.exc.IntegrityError), registry.engine.begin() as c:
            c.exec_driver_sql(
                "INSERT INTO device_groups (device_id, name) VALUES ('nobody', 'edge')"
            )
    finally:
        registry.engine.dispose()


def test_postgresql_urls_use_psycopg() -> None:
    for url in ("postgresql://u@db.example/fleet", "postgres://u@db.example/fleet"):
        engine = make_engine(url)
        assert engine.dialect.name == "postgresql"
        assert engine.dialect.driver == "psycopg"
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("mysql://u@h/db", "uses 'mysql'; supported: sqlite:///PATH, postgresql://"),
        ("sqlite://", "names no file"),
        ("sqlite:///:memory:", "names no file"),
        ("sqlite:////nonexistent-dir/x.db", "directory /nonexistent-dir does not exist"),
        ("not a url", "is not a database URL"),
    ],
)
def test_bad_urls_refused(url: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        make_engine(url)
