"""The agent lives within its unit's system-call filter, address families and W^X rule.

systemd cannot start units here (it is not PID 1), so the sandbox's syscall side is checked
by tracing: the real agent runs under ``strace -f`` through a working day in small (start,
smoke generation, socket group change, a completion over the socket, MQTT to mosquitto,
signed-update polls over HTTP, SIGTERM drain), and every system call it made must be in
the set the unit's ``SystemCallFilter=`` lines allow (expanded with ``systemd-analyze
syscall-filter``), every socket it opened in ``RestrictAddressFamilies=``, and no mapping
may be writable and executable at once (``MemoryDenyWriteExecute=yes``).
"""

from __future__ import annotations

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
from tests.support.processes import ManagedProcess, notified, unix_accepting

pytestmark = pytest.mark.mosquitto

UNIT = "nanofleet-agent.service"
_CALL = re.compile(r"^\d+\s+([a-z_0-9]+)\(", re.M)
_SOCKET = re.compile(r"^\d+\s+socket(?:pair)?\((AF_\w+)", re.M)
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
            # SIGTERM goes to the agent (strace's child), as systemd would send it.
            children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text()
            (agent_pid,) = children.split()
            os.kill(int(agent_pid), signal.SIGTERM)
            assert agent.wait_exit(timeout=60) == 0, agent.log_tail()
        finally:
            agent.close()
            sock.unlink(missing_ok=True)

    text = trace.read_text()
    used = set(_CALL.findall(text))
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
