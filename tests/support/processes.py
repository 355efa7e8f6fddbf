"""Real processes in tests: start a daemon, wait until it is ready, stop it by its PID.

Invariants:

- A :class:`ManagedProcess` only ever signals the PID it started itself; nothing here
  looks processes up by name.
- Nothing waits on a fixed sleep. :meth:`ManagedProcess.wait_ready` polls a readiness
  condition until a deadline; between polls it waits on the child itself (or on the
  sd_notify socket), so a child that dies ends the wait at once.
- Every failure to start says why (exit code or timeout, the condition waited for) and
  ends with the tail of the child's log.

Readiness conditions are callables ``(ManagedProcess) -> bool`` that must not block for
long: :func:`tcp_accepting`, :func:`unix_accepting`, :func:`file_exists`,
:func:`log_contains` and :func:`notified` (``READY=1`` on ``NOTIFY_SOCKET``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = [
    "ManagedProcess",
    "ProcessStartError",
    "Ready",
    "file_exists",
    "free_port",
    "log_contains",
    "notified",
    "tcp_accepting",
    "unix_accepting",
]

#: How long to wait between two polls of a readiness condition, in seconds.
POLL_INTERVAL_S = 0.02
#: How many log lines an error message shows.
LOG_TAIL_LINES = 30
#: Upper bound on one sd_notify datagram, in bytes (systemd uses the same order of size).
_NOTIFY_MAX_BYTES = 4096

Ready = Callable[["ManagedProcess"], bool]


class ProcessStartError(RuntimeError):
    """A managed process died or did not become ready in time; the message has its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def tcp_accepting(host: str, port: int) -> Ready:
    """Ready when a TCP connection to ``host:port`` is accepted."""

    def check(_: ManagedProcess) -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    check.__doc__ = f"TCP {host}:{port} accepts connections"
    return check


def unix_accepting(path: Path) -> Ready:
    """Ready when a stream connection to the Unix socket at ``path`` is accepted."""

    def check(_: ManagedProcess) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect(str(path))
            except OSError:
                return False
            return True

    check.__doc__ = f"Unix socket {path} accepts connections"
    return check


def file_exists(path: Path) -> Ready:
    """Ready when ``path`` exists."""

    def check(_: ManagedProcess) -> bool:
        return path.exists()

    check.__doc__ = f"{path} exists"
    return check


def log_contains(text: str) -> Ready:
    """Ready when the process's combined stdout/stderr log contains ``text``."""

    def check(proc: ManagedProcess) -> bool:
        return text in proc.read_log()

    check.__doc__ = f"the log contains {text!r}"
    return check


def notified(state: str = "READY=1") -> Ready:
    """Ready when the process sent ``state`` (a ``KEY=VALUE`` line) to its ``NOTIFY_SOCKET``.

    The process must have been created with ``notify=True``.
    """

    def check(proc: ManagedProcess) -> bool:
        return state in proc.notifications()

    check.__doc__ = f"{state} arrived on NOTIFY_SOCKET"
    return check


class ManagedProcess:
    """One child process with its log captured to a file, stopped by its PID.

    ``argv``, ``env`` (added to a copy of this process's environment; a value of ``None``
    removes the variable) and ``cwd`` are passed to :class:`subprocess.Popen`. stdout and
    stderr go to ``log_path`` (a file in a private temporary directory when not given).
    With ``notify=True`` a datagram socket is bound and passed as ``NOTIFY_SOCKET``, the
    way systemd does for ``Type=notify`` units.

    Use as a context manager: entering starts the process, leaving stops it and removes
    the private directory (call :meth:`close` otherwise).
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        notify: bool = False,
        name: str | None = None,
    ) -> None:
        if not argv:
            raise ValueError("argv must name a program")
        self.argv = [os.fspath(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self._env = dict(env or {})
        self._cwd = cwd
        # A private directory only for what the caller did not place: the log, the socket.
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if log_path is None or notify:
            self._scratch = tempfile.TemporaryDirectory(prefix=f"nanofleet-{self.name}-")
        self.log_path = log_path or Path(self._scratch_dir()) / "process.log"
        self._log: IO[bytes] | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._notify_socket: socket.socket | None = None
        self._notify_path: Path | None = None
        self._notifications: list[str] = []
        if notify:
            self._notify_path = Path(self._scratch_dir()) / "notify.sock"
            self._notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify_socket.bind(str(self._notify_path))
            self._notify_socket.setblocking(False)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start the process. Raises :class:`ProcessStartError` if the program cannot run."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started (pid {self._popen.pid})")
        env = dict(os.environ)
        for key, value in self._env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        if self._notify_path is not None:
            env["NOTIFY_SOCKET"] = str(self._notify_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        try:
            self._popen = subprocess.Popen(
                self.argv,
                env=env,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is not meant for it
            )
        except OSError as e:
            self._log.close()
            raise ProcessStartError(f"cannot run {self.argv[0]!r}: {e}") from e
        return self

    @property
    def pid(self) -> int:
        """The child's PID. Raises RuntimeError before :meth:`start`."""
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while it runs."""
        return self._started().poll()

    def wait_ready(self, ready: Ready, timeout: float = 10.0) -> None:
        """Wait until ``ready(self)`` is true, at most ``timeout`` seconds.

        Raises :class:`ProcessStartError` (with the log tail) if the process exits first
        or the deadline passes.
        """
        popen = self._started()
        what = ready.__doc__ or getattr(ready, "__name__", "the readiness condition")
        deadline = time.monotonic() + timeout
        while True:
            self._drain_notifications()
            if popen.poll() is not None:
                raise ProcessStartError(
                    f"{self.name} (pid {popen.pid}) exited with status {popen.returncode} "
                    f"before {what}\n{self._tail_for_error()}"
                )
            if ready(self):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcessStartError(
                    f"{self.name} (pid {popen.pid}) still running but not ready after "
                    f"{timeout:g} s: waited for {what}\n{self._tail_for_error()}"
                )
            self._pause(min(POLL_INTERVAL_S, remaining))

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit on its own and return its status.

        Raises :class:`subprocess.TimeoutExpired` if it is still running after ``timeout``.
        """
        return self._started().wait(timeout=timeout)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child's PID (nothing happens if it already exited)."""
        popen = self._started()
        if popen.poll() is None:
            popen.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL the child and reap it; return its status."""
        self.send_signal(signal.SIGKILL)
        return self._started().wait()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the PID, wait up to ``timeout`` s, then SIGKILL; return the exit status.

        Safe to call more than once and before :meth:`start` (returns None then).
        """
        popen = self._popen
        status: int | None = None
        if popen is not None:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
                try:
                    popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
            status = popen.returncode
        if self._log is not None and not self._log.closed:
            self._log.close()
        if self._notify_socket is not None:
            self._notify_socket.close()
        return status

    def close(self) -> None:
        """Stop the process and remove the private temporary directory (and default log)."""
        self.stop()
        if self._scratch is not None:
            self._scratch.cleanup()

    def __enter__(self) -> Self:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what the process said -------------------------------------------------------

    def read_log(self) -> str:
        """The whole log so far, decoded leniently."""
        if self._log is not None and not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.read_log().splitlines()[-lines:])

    def notifications(self) -> list[str]:
        """Every ``KEY=VALUE`` line received on ``NOTIFY_SOCKET`` so far, in order."""
        self._drain_notifications()
        return list(self._notifications)

    # -- internals -------------------------------------------------------------------

    def _scratch_dir(self) -> str:
        assert self._scratch is not None
        return self._scratch.name

    def _started(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen

    def _pause(self, seconds: float) -> None:
        """Wait up to ``seconds`` for something to happen: a notify datagram or the exit."""
        if self._notify_socket is not None:
            select.select([self._notify_socket], [], [], seconds)
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._started().wait(timeout=seconds)

    def _drain_notifications(self) -> None:
        sock = self._notify_socket
        if sock is None or sock.fileno() < 0:
            return
        while True:
            try:
                data = sock.recv(_NOTIFY_MAX_BYTES)
            except BlockingIOError:
                return
            self._notifications.extend(
                line for line in data.decode("utf-8", errors="replace").splitlines() if line
            )

    def _tail_for_error(self) -> str:
        tail = self.log_tail()
        header = f"--- last lines of {self.log_path} ---"
        return f"{header}\n{tail}" if tail else f"{header}\n(empty)"
