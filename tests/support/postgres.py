"""A throwaway PostgreSQL server for tests: Debian's binaries, a temp dir, a free port.

Invariants:

- The server is this process's own child, started from Debian's ``postgres`` binary on
  ``127.0.0.1`` and a port the OS picked, with its data in a private temporary directory
  and durability off (``fsync=off``: the data is thrown away anyway).
- As root, ``initdb`` and ``postgres`` run as the ``postgres`` user (``initdb`` refuses
  root); the temporary directory is made traversable (o+x) for that user.
- Readiness is a successful connection, retried until a deadline while waiting on the
  child itself, never a fixed sleep. Stopping sends SIGINT (fast shutdown) to the PID we
  started and reaps it; SIGKILL only if it outlives the deadline.
- Missing binaries fail with a message that says to run ``scripts/bootstrap.sh``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

from tests.support.processes import free_port

__all__ = ["PostgresServer", "PostgresUnavailableError", "find_bin_dir"]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.02
_SUPERUSER = "postgres"


class PostgresUnavailableError(RuntimeError):
    """PostgreSQL cannot be started here; the message says what to do."""


def find_bin_dir() -> Path:
    """Return the directory of Debian's PostgreSQL binaries (the newest major version).

    Raises:
        PostgresUnavailableError: no ``initdb`` under ``/usr/lib/postgresql/*/bin``.
    """
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise PostgresUnavailableError(
            "PostgreSQL binaries not found under /usr/lib/postgresql/*/bin; "
            "run scripts/bootstrap.sh (it installs Debian's postgresql package)"
        )
    return candidates[-1].parent


class PostgresServer:
    """One PostgreSQL server; use as a context manager. :meth:`create_database` per test."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.port = free_port()
        self.host = "127.0.0.1"
        self._tmp = Path(tempfile.mkdtemp(prefix="nanofleet-pg-"))
        self._data = self._tmp / "data"
        self._log = self._tmp / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(_SUPERUSER)
            except KeyError as e:
                raise PostgresUnavailableError(
                    "running as root but there is no 'postgres' user to run the server as; "
                    "run scripts/bootstrap.sh (Debian's postgresql package creates it)"
                ) from e
            self._user = _SUPERUSER

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Create the cluster and start the server; return when it accepts connections.

        Raises:
            PostgresUnavailableError: initdb failed, or the server died or was not ready
                within :data:`START_TIMEOUT_S`; the message has the log tail.
        """
        self._tmp.chmod(0o711)
        self._data.mkdir(mode=0o700)
        if self._user is not None:
            shutil.chown(self._data, self._user, self._user)
        init = subprocess.run(
            [
                self.bin_dir / "initdb",
                "--pgdata",
                self._data,
                "--username",
                _SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            user=self._user,
            capture_output=True,
            check=False,
        )
        if init.returncode != 0:
            raise PostgresUnavailableError(
                f"initdb failed with status {init.returncode}:\n"
                f"{init.stdout.decode(errors='replace')}{init.stderr.decode(errors='replace')}"
            )
        log = self._log.open("ab")
        try:
            self._proc = subprocess.Popen(
                [
                    self.bin_dir / "postgres",
                    "-D",
                    self._data,
                    "-p",
                    str(self.port),
                    "-c",
                    f"listen_addresses={self.host}",
                    "-c",
                    f"unix_socket_directories={self._data}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                user=self._user,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        proc = self._started()
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error = "no attempt yet"
        while True:
            if proc.poll() is not None:
                raise PostgresUnavailableError(
                    f"postgres (pid {proc.pid}) exited with status {proc.returncode} before "
                    f"accepting connections\n{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as e:
                last_error = str(e).strip()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PostgresUnavailableError(
                    f"postgres (pid {proc.pid}) not accepting connections after "
                    f"{START_TIMEOUT_S:g} s ({last_error})\n{self.log_tail()}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(_POLL_S, remaining))

    def stop(self) -> None:
        """Fast-shut down the server we started (by its PID) and delete its files."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- use -------------------------------------------------------------------------

    def dsn(self, database: str) -> str:
        """A libpq connection string for ``database`` as the superuser."""
        return f"host={self.host} port={self.port} user={_SUPERUSER} dbname={database}"

    def url(self, database: str) -> str:
        """A SQLAlchemy URL for ``database`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{_SUPERUSER}@{self.host}:{self.port}/{database}"

    def create_database(self, template: str | None = None) -> str:
        """Create a uniquely named database (a copy of ``template`` if given); return its name."""
        name = f"t{os.getpid()}_{next(self._names)}"
        sql = f'CREATE DATABASE "{name}"'
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            if template is not None:
                sql += f' TEMPLATE "{template}"'
                if conn.info.server_version >= 150000:
                    sql += " STRATEGY FILE_COPY"  # twice as fast as WAL_LOG for small copies
            conn.execute(sql.encode())
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever still uses it."""
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            text = self._log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("the server has not been started")
        return self._proc
