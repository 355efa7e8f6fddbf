"""The database engine from a URL: a SQLite file by default, PostgreSQL by URL.

Invariants of every SQLite connection: WAL journal (readers never block the writer),
foreign keys enforced, ``synchronous=NORMAL`` (safe with WAL: a power cut may lose the last
commits, never corrupts), a busy timeout instead of immediate "database is locked"
errors. Transactions are begun explicitly; a write transaction (:func:`writer`) begins
with ``BEGIN IMMEDIATE`` so that two writers queue up instead of failing when one of them
upgrades a read lock.

PostgreSQL URLs (``postgresql://`` or ``postgres://``) are driven by psycopg 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError

from coordinator.errors import ConfigError

__all__ = ["BUSY_TIMEOUT_MS", "default_url", "make_engine", "writer"]

BUSY_TIMEOUT_MS: Final = 10_000
_WRITE_OPTION: Final = "nanofleet_write"
REGISTRY_FILE: Final = "registry.sqlite3"


def default_url(data_dir: Path) -> str:
    """Return the URL of the default registry: a SQLite file in ``data_dir``."""
    return f"sqlite:///{data_dir / REGISTRY_FILE}"


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ConfigError(f"registry url {url!r} is not a database URL: {e}") from e
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.get_driver_name() != "pysqlite":
            raise ConfigError(f"registry url {url!r}: use sqlite:///PATH (the built-in driver)")
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(
                f"registry url {url!r} names no file; an in-memory registry would lose the "
                "fleet on restart: use sqlite:///PATH"
            )
        parent = Path(parsed.database).parent
        if not parent.is_dir():
            raise ConfigError(f"registry url {url!r}: directory {parent} does not exist")
        return parsed
    raise ConfigError(
        f"registry url {url!r} uses {backend!r}; supported: sqlite:///PATH, postgresql://..."
    )


def make_engine(url: str, **options: Any) -> Engine:
    """Return an engine for ``url`` (``options`` go to :func:`sqlalchemy.create_engine`).

    Raises:
        ConfigError: the URL is malformed, names an unsupported backend, an in-memory
            SQLite database, or a SQLite file in a directory that does not exist.
    """
    parsed = _parse(url)
    engine = create_engine(parsed, **options)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def writer(engine: Engine) -> Engine:
    """Return a view of ``engine`` whose transactions take the write lock up front."""
    return engine.execution_options(**{_WRITE_OPTION: True})


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
