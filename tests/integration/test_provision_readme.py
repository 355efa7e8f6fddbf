"""The README's "Deploying a fleet" commands, run as written by bash in an empty directory.

The operator's and the device's blocks run verbatim with this virtual environment first on
PATH; only the steps that change the host's system configuration (``install`` into
/etc and /usr, ``systemd-sysusers``, ``systemctl``) are left out (their paths are checked
by tests/unit/test_readme_commands.py), and ``enroll`` installs into a temporary directory
through ``NANOFLEET_ENROLL_DEST`` instead of /etc/nanofleet.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from agent.config import load_settings
from coordinator.registry import open_registry
from tests.unit.test_readme_commands import REPO, shell_lines, split_commands

SECTION = "## Deploying a fleet"
#: Programs that change the host's system configuration: not run by tests.
SYSTEM_PROGRAMS = frozenset({"install", "systemd-sysusers", "systemctl"})


def section_script() -> tuple[str, list[str]]:
    """The section's shell lines as one script, and the lines left out."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    kept, left_out = [], []
    for line in shell_lines(text[start : end if end != -1 else None]):
        programs = {argv[0] for argv in split_commands(line)}
        (left_out if programs & SYSTEM_PROGRAMS else kept).append(line)
    return "\n".join(kept) + "\n", left_out


def test_the_deploy_section_runs_as_written(tmp_path: Path) -> None:
    script, left_out = section_script()
    assert "nanofleet device provision" in script
    assert "nanofleet-agent enroll" in script
    assert all(not line.lstrip().startswith("nanofleet") for line in left_out)
    dest = tmp_path / "etc-nanofleet"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "NANOFLEET_CA_PASSPHRASE": "ca passphrase for the test",
        "NANOFLEET_KEY_PASSPHRASE": "key passphrase for the test",
        "NANOFLEET_ENROLL_DEST": str(dest),
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"

    device_id = re.search(r"--id (\S+)", script)
    assert device_id is not None
    assert b"ENCRYPTED" in (tmp_path / "ca" / "ca.key").read_bytes()[:64]
    assert (tmp_path / "repo" / "metadata" / "root.json").is_file()
    assert stat.S_IMODE((dest / "tls" / "device.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((dest / "tls").stat().st_mode) == 0o750
    settings = load_settings(dest / "agent.toml")
    assert settings.mqtt is not None
    assert settings.mqtt.device_id == device_id.group(1)
    assert (dest / "tuf" / "root.json").read_bytes() == (
        tmp_path / "repo" / "metadata" / "root.json"
    ).read_bytes()
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.sqlite3'}")
    try:
        assert registry.get_device(device_id.group(1)).groups == ("store-12",)
    finally:
        registry.engine.dispose()
