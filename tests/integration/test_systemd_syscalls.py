"""The daemons live within their units' system-call filters, address families and W^X rule.

systemd cannot start units here (it is not PID 1), so the sandbox's syscall side is checked
by tracing: the real agent runs under ``strace -f`` through a working day in small (start,
smoke generation, socket group change, a completion over the socket, MQTT to mosquitto,
signed-update polls over HTTP, SIGTERM drain), and every system call it made must be in
the set the unit's ``SystemCallFilter=`` lines allow (expanded with ``systemd-analyze
syscall-filter``), every socket it opened in ``RestrictAddressFamilies=``, and no mapping
may be writable and executable at once (``MemoryDenyWriteExecute=yes``). The Flower
SuperLink, SuperNode and ClientApp executor are traced the same way from start until the
node is active.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import httpx
import pytest

from tests.integration.test_systemd_units import systemd_analyze, values
from tests.support.mosquitto import Broker
from tests.support.ota_fleet import ReleaseRepo, RepoServer
from tests.support.ota_models import build_ota_model
from tests.support.processes import (
    ManagedProcess,
    free_port,
    log_contains,
    notified,
    tcp_accepting,
    unix_accepting,
)

pytestmark = pytest.mark.mosquitto

UNIT = "nanofleet-agent.service"
_CALL = re.compile(r"^\d+\s+([a-z_0-9]+)\(", re.M)
_SOCKET = re.compile(r"^\d+\s+socket(?:pair)?\((AF_\w+)", re.M)
_ROOT_FCHOWN = re.compile(r"^\d+\s+fchown\(\d+, 0, 0[ )]", re.M)


def calls(text: str) -> set[str]:
    """System call names in an strace log.

    SQLite run as root gives every journal file it creates to root (``fchown(fd, 0, 0)``);
    it skips that for any other user, such as the unit's dynamic user. Those calls alone are
    not counted when this test runs as root.
    """
    used = set(_CALL.findall(text))
    if os.geteuid() == 0 and "fchown" in used:
        every = len(re.findall(r"^\d+\s+fchown\(", text, re.M))
        if every == len(_ROOT_FCHOWN.findall(text)):
            used.discard("fchown")
    return used


_WX = re.compile(r"^\d+\s+(mmap|mprotect|pkey_mprotect)\(.*PROT_WRITE\|PROT_EXEC", re.M)


def strace() -> str:
    found = shutil.which("strace")
    if found is None:
        raise RuntimeError("strace is not installed: run scripts/bootstrap.sh")
    return found


@cache
def syscall_groups() -> dict[str, list[str]]:
    """Every ``@group`` systemd knows, with its members (syscalls and nested groups)."""
    out = subprocess.run(
        [systemd_analyze(), "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if not line[0].isspace() and item.startswith("@"):
            current = groups.setdefault(item, [])
        elif current is not None:
            current.append(item)
    return groups


def expand(names: list[str]) -> set[str]:
    result: set[str] = set()
    for name in names:
        result |= expand(syscall_groups()[name]) if name.startswith("@") else {name}
    return result


def unit_allowed_syscalls(unit: str) -> set[str]:
    """What the unit's SystemCallFilter= lines allow, applied in order (an allow list)."""
    lines = values(unit, "SystemCallFilter")
    assert lines
    assert not lines[0].startswith("~"), "the first SystemCallFilter= line is an allow list"
    allowed = expand(["@default"])  # systemd always allows @default with an allow list
    for line in lines:
        names = line.removeprefix("~").split()
        if line.startswith("~"):
            allowed -= expand(names)
        else:
            allowed |= expand(names)
    return allowed


def test_the_expansion_matches_systemd_for_a_known_group() -> None:
    assert "chown" in expand(["@privileged"])
    assert "setpriority" in expand(["@resources"])
    assert "read" in unit_allowed_syscalls(UNIT)
    assert "mount" not in unit_allowed_syscalls(UNIT)
    assert "reboot" not in unit_allowed_syscalls(UNIT)


def test_the_agent_stays_within_its_units_sandbox(mosquitto: Broker, tmp_path: Path) -> None:
    model = build_ota_model(tmp_path / "model", seed=1)
    repo = ReleaseRepo(tmp_path)
    sock = Path(f"/tmp/nf-sys-{os.getpid()}-{tmp_path.name[-8:]}.sock")
    trace = tmp_path / "trace"
    group = grp.getgrgid(os.getegid()).gr_name  # a group this process may give the socket
    with RepoServer(repo.path) as server:
        config = tmp_path / "agent.toml"
        config.write_text(
            f"""
[model]
dir = "{model}"
[server]
socket_path = "{sock}"
socket_group = "{group}"
[ota]
state_dir = "{tmp_path / "state"}"
root_file = "{repo.root_file}"
repository_url = "{server.url}"
group = "g1"
poll_interval_s = 0.2
[mqtt]
host = "{mosquitto.host}"
port = {mosquitto.port}
device_id = "dev-trace"
groups = ["g1"]
heartbeat_interval_s = 0.2
"""
        )
        agent = ManagedProcess(
            [
                strace(), "-f", "-qq", "-o", str(trace),
                str(Path(sys.executable).with_name("nanofleet-agent")),
                "run", "--config", str(config),
            ],
            notify=True,
            name="agent-strace",
            log_path=tmp_path / "agent.log",
            env={"WATCHDOG_USEC": "200000"},
        )  # fmt: skip
        try:
            agent.start()
            agent.wait_ready(notified("READY=1"), timeout=120)
            agent.wait_ready(unix_accepting(sock), timeout=30)
            assert grp.getgrgid(sock.stat().st_gid).gr_name == group
            transport = httpx.HTTPTransport(uds=str(sock))
            with httpx.Client(transport=transport, base_url="http://a", timeout=60) as c:
                r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
                assert r.status_code == 200
            # Wait until the update service has polled the repository and MQTT connected.
            deadline = time.monotonic() + 60
            while not (
                '"mqtt_connected"' in agent.read_log()
                and any(p.startswith("/repo/metadata/") for p in server.served())
            ):
                assert time.monotonic() < deadline, agent.log_tail()
                time.sleep(0.05)
            assert len(_traced_children(agent)) == 1
            assert _stop_traced(agent) == 0, agent.log_tail()
        finally:
            _close_traced(agent)
            sock.unlink(missing_ok=True)

    text = trace.read_text()
    used = calls(text)
    assert {"execve", "bind", "connect", "sendto"} <= used  # the trace is real
    outside = sorted(used - unit_allowed_syscalls(UNIT))
    assert outside == [], f"system calls the unit's SystemCallFilter= refuses: {outside}"
    (families,) = values(UNIT, "RestrictAddressFamilies")
    opened = set(_SOCKET.findall(text))
    assert opened
    assert opened <= set(families.split()), opened
    writable_executable = _WX.findall(text)
    assert writable_executable == [], "a W+X mapping: MemoryDenyWriteExecute=yes would refuse it"
    assert values(UNIT, "MemoryDenyWriteExecute") == ["yes"]


def _traced(argv: list[str], trace: Path, name: str, log: Path) -> ManagedProcess:
    return ManagedProcess(
        [strace(), "-f", "-qq", "-o", str(trace), *argv],
        name=name,
        log_path=log,
        env={
            "FLWR_HOME": str(log.parent / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        },
    )


def _traced_children(proc: ManagedProcess) -> list[int]:
    """The PIDs of strace's children: the traced program (empty once it has exited)."""
    try:
        return [
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
    except OSError:
        return []


def _stop_traced(proc: ManagedProcess, sig: signal.Signals = signal.SIGTERM) -> int:
    """Send ``sig`` to the traced program (strace's child, as systemd would), then wait for
    strace to end; return its exit status (the program's). strace outlives nothing it traces:
    a traced program left behind would keep running after strace is stopped."""
    if proc.returncode is not None:
        return proc.returncode
    for child in _traced_children(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, sig)
    return proc.wait_exit(timeout=30)


def _close_traced(proc: ManagedProcess) -> None:
    """Stop the traced program and strace whatever happened (for ``finally``)."""
    try:
        running = proc.returncode is None
    except RuntimeError:  # never started
        running = False
    try:
        if running and _traced_children(proc):
            try:
                _stop_traced(proc)
            except Exception:
                _stop_traced(proc, signal.SIGKILL)
    finally:
        proc.close()


@pytest.mark.slow
def test_the_flower_processes_stay_within_their_units_sandboxes(tmp_path: Path) -> None:
    """SuperLink, SuperNode and the ClientApp executor, from start until the node is active
    and the executor holds its Runtime API connection (no round: that is the federation
    tests' job), then SIGTERM."""
    bin_dir = Path(sys.executable).parent
    link_port, runtime_port = free_port(), free_port()
    traces = {u: tmp_path / f"{u}.trace" for u in ("superlink", "supernode", "clientapp")}
    superlink = _traced(
        [
            str(bin_dir / "flower-superlink"), "--insecure",
            "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "state.db"),
            "--host", "127.0.0.1", "--port", str(link_port),
        ],
        traces["superlink"], "superlink", tmp_path / "superlink.log",
    )  # fmt: skip
    supernode = _traced(
        [
            str(bin_dir / "flower-supernode"), "--insecure",
            "--superlink", f"127.0.0.1:{link_port}", "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(runtime_port),
        ],
        traces["supernode"], "supernode", tmp_path / "supernode.log",
    )  # fmt: skip
    executor = _traced(
        [
            str(bin_dir / "flower-superexec"), "--insecure",
            "--runtime-api-address", f"127.0.0.1:{runtime_port}",
        ],
        traces["clientapp"], "clientapp", tmp_path / "clientapp.log",
    )  # fmt: skip
    connected = re.compile(rf"connect\(\d+, \{{sa_family=AF_INET, sin_port=htons\({runtime_port}\)")
    try:
        superlink.start()
        superlink.wait_ready(tcp_accepting("127.0.0.1", link_port), timeout=60)
        supernode.start()
        supernode.wait_ready(log_contains("SuperNode ID"), timeout=60)
        superlink.wait_ready(log_contains("Activated node_id"), timeout=30)
        executor.start()
        deadline = time.monotonic() + 60
        trace = traces["clientapp"]
        while not (trace.exists() and connected.search(trace.read_text())):
            assert time.monotonic() < deadline, executor.log_tail()
            time.sleep(0.05)
        for proc in (executor, supernode, superlink):
            _stop_traced(proc)
    finally:
        for proc in (executor, supernode, superlink):
            _close_traced(proc)

    for name, trace in traces.items():
        unit = f"nanofleet-{name}.service"
        text = trace.read_text()
        used = calls(text)
        assert {"execve", "connect"} <= used, name
        outside = sorted(used - unit_allowed_syscalls(unit))
        assert outside == [], f"{unit}: calls its SystemCallFilter= refuses: {outside}"
        (families,) = values(unit, "RestrictAddressFamilies")
        assert set(_SOCKET.findall(text)) <= set(families.split()), unit
        assert _WX.findall(text) == [], f"{unit}: a writable and executable mapping"
        assert values(unit, "MemoryDenyWriteExecute") == ["yes"], unit
