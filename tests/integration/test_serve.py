"""`nanofleet serve` as a real process: a bad configuration exits with the config code and
names the key; a good one serves the token-guarded API, its OpenAPI document, the
repository files, /healthz and /metrics, and stops cleanly on SIGTERM."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import httpx
import pytest

from protocol.exitcodes import ExitCode
from tests.support.processes import ManagedProcess, free_port, log_contains

TOKEN = "serve-test-token-0123456789"
NANOFLEET = [sys.executable, "-c", "from coordinator.cli import main; main()"]


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ('port = "eighty"\napi_token = "long-enough-token-123"\n', {}, "port (env NANOFLEET_PORT)"),
        ("", {}, "give exactly one of api_token and api_token_file"),
        (
            'api_token = "long-enough-token-123"\n',
            {"NANOFLEET_MQTT__PORT": "0"},
            "mqtt.port (env NANOFLEET_MQTT__PORT)",
        ),
        ('api_token = "long-enough-token-123"\nsurprise = 1\n', {}, "surprise"),
        ('api_token = "long-enough-token-123"\ndatabase_url = "mysql://x/y"\n', {}, "mysql"),
        ("api_token = [", {}, "not valid TOML"),
    ],
    ids=["bad port", "no token", "bad env", "unknown key", "bad database", "not toml"],
)
def test_bad_config_exits_with_the_config_code_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], named: str
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(toml)
    with ManagedProcess([*NANOFLEET, "serve", "--config", config], env=env, cwd=tmp_path) as proc:
        assert proc.wait_exit(60) == ExitCode.CONFIG, proc.log_tail()
        assert named in proc.read_log()
        assert "long-enough-token-123" not in proc.read_log()


def test_serve_answers_the_api_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    repo = tmp_path / "repo"
    (repo / "metadata").mkdir(parents=True)
    (repo / "metadata" / "timestamp.json").write_text('{"signed": {"version": 3}}')
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "registry.sqlite3"}"\n'
        f'repository_path = "{repo}"\nport = {port}\nrollout_interval_s = 0.5\n'
    )
    env = {"NANOFLEET_API_TOKEN_FILE": str(token_file)}
    with ManagedProcess([*NANOFLEET, "serve", "-c", config], env=env, cwd=tmp_path) as proc:
        proc.wait_ready(log_contains("listening on"), timeout=60)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            assert c.get("/api/v1/devices").status_code == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert c.get("/api/v1/devices", headers=auth).json()["devices"] == []
            assert "/api/v1/rollouts" in c.get("/api/v1/openapi.json").json()["paths"]
            assert c.get("/repo/metadata/timestamp.json").json()["signed"]["version"] == 3
            assert 'nanofleet_devices{state="online"} 0.0' in c.get("/metrics").text
            assert c.get("/ui/", follow_redirects=False).status_code == 303
        assert proc.stop(timeout=15) == ExitCode.SUCCESS, proc.log_tail()


def test_port_in_use_exits_unavailable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "coordinator.toml"
        config.write_text(
            f'database_url = "sqlite:///{tmp_path / "r.sqlite3"}"\nport = {port}\n'
            f'api_token = "long-enough-token-123"\n'
        )
        with ManagedProcess([*NANOFLEET, "serve", "-c", config], cwd=tmp_path) as proc:
            assert proc.wait_exit(60) == ExitCode.UNAVAILABLE, proc.log_tail()
            assert f"cannot listen on 127.0.0.1:{port}" in proc.read_log()
