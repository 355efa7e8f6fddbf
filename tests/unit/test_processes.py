"""The test process helper: readiness conditions, clear failures, stopping by PID."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import (
    ManagedProcess,
    ProcessStartError,
    file_exists,
    free_port,
    log_contains,
    notified,
    tcp_accepting,
    unix_accepting,
)


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


IDLE = "import threading; threading.Event().wait()"


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ready_on_sd_notify() -> None:
    code = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'STATUS=warming up\\nREADY=1', os.environ['NOTIFY_SOCKET'])\n" + IDLE
    )
    with ManagedProcess(python(code), notify=True) as proc:
        proc.wait_ready(notified(), timeout=10)
        assert proc.notifications() == ["STATUS=warming up", "READY=1"]


def test_ready_on_tcp_and_unix_sockets_and_a_file(tmp_path: Path) -> None:
    port = free_port()
    sock_path = tmp_path / "api.sock"
    flag = tmp_path / "ready.flag"
    code = (
        "import pathlib, socket, sys\n"
        "t = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
        "u = socket.socket(socket.AF_UNIX); u.bind(sys.argv[2]); u.listen()\n"
        "pathlib.Path(sys.argv[3]).touch()\n" + IDLE
    )
    with ManagedProcess(python(code, str(port), str(sock_path), str(flag))) as proc:
        proc.wait_ready(tcp_accepting("127.0.0.1", port), timeout=10)
        proc.wait_ready(unix_accepting(sock_path), timeout=10)
        proc.wait_ready(file_exists(flag), timeout=10)


def test_ready_on_a_log_line_with_env_and_cwd(tmp_path: Path) -> None:
    code = "import os; print('serving in', os.getcwd(), os.environ['GREETING'], flush=True)\n"
    argv = python(code + IDLE)
    with ManagedProcess(argv, env={"GREETING": "hello"}, cwd=tmp_path) as proc:
        proc.wait_ready(log_contains(f"serving in {tmp_path} hello"), timeout=10)


def test_an_env_value_of_none_removes_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOFLEET_TEST_SECRET", "x")
    code = "import os; print('secret' if 'NANOFLEET_TEST_SECRET' in os.environ else 'clean')"
    with ManagedProcess(python(code), env={"NANOFLEET_TEST_SECRET": None}) as proc:
        assert proc.wait_exit(timeout=10) == 0
        assert proc.read_log().strip() == "clean"


def test_a_process_that_dies_before_ready_fails_fast_with_its_log() -> None:
    code = "import sys; print('cannot bind: address in use'); sys.exit(69)"
    with ManagedProcess(python(code), name="doomed") as proc:
        started = time.monotonic()
        with pytest.raises(ProcessStartError) as caught:
            proc.wait_ready(log_contains("listening"), timeout=30)
        assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "doomed" in message
    assert "exited with status 69" in message
    assert "the log contains 'listening'" in message
    assert "cannot bind: address in use" in message


def test_a_process_that_never_gets_ready_times_out_with_its_log() -> None:
    code = "print('still loading the model', flush=True)\n" + IDLE
    with ManagedProcess(python(code)) as proc:
        proc.wait_ready(log_contains("still loading"), timeout=10)
        with pytest.raises(ProcessStartError) as caught:
            proc.wait_ready(log_contains("ready"), timeout=0.3)
        assert proc.returncode is None  # a timeout does not kill it; stop() does
    message = str(caught.value)
    assert "not ready after 0.3 s" in message
    assert "still loading the model" in message


def test_a_program_that_cannot_run_is_reported() -> None:
    proc = ManagedProcess(["/nonexistent/nanofleet-daemon"])
    with pytest.raises(ProcessStartError, match="cannot run '/nonexistent/nanofleet-daemon'"):
        proc.start()
    proc.close()


def test_stop_sends_sigterm_first() -> None:
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('draining', flush=True), sys.exit(0)))\n"
        "print('up', flush=True)\n" + IDLE
    )
    with ManagedProcess(python(code)) as proc:
        proc.wait_ready(log_contains("up"), timeout=10)
        assert proc.stop(timeout=10) == 0
        assert "draining" in proc.read_log()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    code = (
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('armed', flush=True)\n"
    )
    with ManagedProcess(python(code + IDLE)) as proc:
        proc.wait_ready(log_contains("armed"), timeout=10)
        assert proc.stop(timeout=0.2) == -signal.SIGKILL
        assert proc.stop() == -signal.SIGKILL  # idempotent


def test_kill_is_sigkill_by_pid() -> None:
    with ManagedProcess(python("print('up', flush=True)\n" + IDLE)) as proc:
        proc.wait_ready(log_contains("up"), timeout=10)
        pid = proc.pid
        assert proc.kill() == -signal.SIGKILL
        assert proc.pid == pid
