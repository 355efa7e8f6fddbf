"""The units in deploy/systemd pass `systemd-analyze verify` and keep their exposure scores.

The units name ``/opt/nanofleet/venv/bin/...``; each test renders a copy pointing at this
virtual environment, so ``verify`` can check that every ExecStart binary exists. ``verify``
only warns (exit 0) on an unknown key or a bad value, so any output at all is a failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.exitcodes import NO_RESTART

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "deploy" / "systemd"
README = UNITS_DIR / "README.md"
INSTALLED_BIN = "/opt/nanofleet/venv/bin"
VENV_BIN = Path(sys.executable).parent
UNITS = sorted(p.name for p in UNITS_DIR.glob("*.service"))
#: Units of the daemons that use the exit-code registry.
REGISTRY_UNITS = ("nanofleet-agent.service", "nanofleet-coordinator.service")
#: No unit may be less confined than this (systemd-analyze's 0..10 scale).
EXPOSURE_MAX = 2.0


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        raise RuntimeError(
            "systemd-analyze is not installed: run scripts/bootstrap.sh (Debian package systemd)"
        )
    return found


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file: (key, value) pairs in order, continuation lines joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep:
            raise AssertionError(f"not a unit file line: {line!r}")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: str, key: str, section: str = "Service") -> list[str]:
    sections = parse_unit((UNITS_DIR / unit).read_text())
    return [v for k, v in sections.get(section, []) if k == key]


def render(unit: str, directory: Path) -> Path:
    """A copy of ``unit`` in ``directory`` whose binaries are this venv's console scripts."""
    text = (UNITS_DIR / unit).read_text().replace(INSTALLED_BIN, str(VENV_BIN))
    path = directory / unit
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("units")
    return [render(unit, directory) for unit in UNITS]


def test_every_daemon_has_a_unit() -> None:
    assert UNITS == [
        "nanofleet-agent.service",
        "nanofleet-clientapp.service",
        "nanofleet-coordinator.service",
        "nanofleet-superlink.service",
        "nanofleet-supernode.service",
    ]


@pytest.mark.parametrize("unit", UNITS)
def test_exec_start_binaries_are_installed_console_scripts(unit: str) -> None:
    (exec_start,) = values(unit, "ExecStart")
    binary = exec_start.split()[0]
    assert binary.startswith(INSTALLED_BIN + "/"), binary
    assert (VENV_BIN / Path(binary).name).is_file(), f"{unit}: {binary} is not a console script"


def test_verify_passes_on_every_unit_without_any_output(rendered: list[Path]) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", *map(str, rendered)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout == "", result.stdout


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("WatchdogSec=30s", "WatchdogSecs=30s"), "Unknown key"),
        (("nanofleet-agent run", "nanofleet-agentx run"), "is not executable"),
    ],
    ids=["misspelled-key", "missing-binary"],
)
def test_verify_output_catches_a_broken_unit(
    tmp_path: Path, change: tuple[str, str], complaint: str
) -> None:
    path = render("nanofleet-agent.service", tmp_path)
    path.write_text(path.read_text().replace(*change))
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert complaint in result.stderr


_OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+\.\d)")


def measured_scores(rendered: list[Path]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for path in rendered:
        result = subprocess.run(
            [systemd_analyze(), "security", "--offline=true", "--no-pager", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.stderr == "", result.stderr
        found = _OVERALL.search(result.stdout)
        assert found is not None, result.stdout[-2000:]
        assert found.group(1) == path.name
        scores[path.name] = float(found.group(2))
    return scores


def readme_scores() -> dict[str, float]:
    rows = re.findall(r"^\| `([\w.-]+\.service)` \| (\d+\.\d) \|$", README.read_text(), re.M)
    return {unit: float(score) for unit, score in rows}


def test_exposure_scores_are_low_and_the_readme_table_is_current(rendered: list[Path]) -> None:
    scores = measured_scores(rendered)
    assert readme_scores() == scores, f"update the table in {README}: measured {scores}"
    too_exposed = {unit: s for unit, s in scores.items() if s > EXPOSURE_MAX}
    assert not too_exposed


@pytest.mark.parametrize("unit", REGISTRY_UNITS)
def test_restart_prevent_exit_status_equals_the_registrys_config_error_codes(unit: str) -> None:
    (listed,) = values(unit, "RestartPreventExitStatus")
    assert sorted(int(code) for code in listed.split()) == sorted(int(c) for c in NO_RESTART)
    assert values(unit, "Restart") == ["on-failure"]


HARDENING = {
    "DynamicUser": "yes",
    "ProtectSystem": "strict",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "RestrictNamespaces": "yes",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("unit", UNITS)
def test_every_unit_is_confined(unit: str) -> None:
    for key, value in HARDENING.items():
        assert value in values(unit, key), f"{unit}: {key}={value} missing"
    assert values(unit, "MemoryMax"), f"{unit}: no MemoryMax"
    assert values(unit, "StateDirectory"), f"{unit}: no StateDirectory"
    (families,) = values(unit, "RestrictAddressFamilies")
    assert set(families.split()) <= {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_agent_unit_is_a_watched_notify_service_with_its_socket_directory() -> None:
    unit = "nanofleet-agent.service"
    assert values(unit, "Type") == ["notify"]
    assert values(unit, "NotifyAccess") == ["main"]
    assert values(unit, "WatchdogSec")
    # The socket's directory, and the serving marker's, which the training units may see.
    assert values(unit, "RuntimeDirectory") == ["nanofleet nanofleet-serving"]
    for training in ("nanofleet-supernode.service", "nanofleet-clientapp.service"):
        hidden = " ".join(values(training, "InaccessiblePaths")).split()
        assert "-/run/nanofleet-serving" not in hidden, training
    assert values(unit, "StateDirectory") == ["nanofleet"]
    assert values(unit, "SupplementaryGroups") == ["nanofleet-clients"]
    assert "g nanofleet-clients -" in (UNITS_DIR / "nanofleet.sysusers.conf").read_text()


def test_clientapp_reaches_only_loopback_and_not_the_agent() -> None:
    unit = "nanofleet-clientapp.service"
    assert values(unit, "IPAddressDeny") == ["any"]
    assert values(unit, "IPAddressAllow") == ["localhost"]
    hidden = " ".join(values(unit, "InaccessiblePaths")).split()
    for path in ("/run/nanofleet", "/var/lib/nanofleet", "/etc/nanofleet"):
        assert f"-{path}" in hidden, path
    for unit in ("nanofleet-supernode.service", "nanofleet-clientapp.service"):
        assert not values(unit, "SupplementaryGroups"), "the socket's group is for clients"


def test_training_runs_in_the_idle_scheduling_class_below_the_agent() -> None:
    unit = "nanofleet-clientapp.service"
    assert values(unit, "CPUSchedulingPolicy") == ["idle"]
    assert int(values(unit, "CPUWeight")[0]) < 100  # the agent keeps the default weight
    assert not values("nanofleet-agent.service", "CPUSchedulingPolicy")
