"""The operator API and CLI over a real (SQLite) registry: bad input is refused with an
error naming the field, every CLI command's ``--json`` parses, and commands reach the
registry (a rollout started through the CLI exists, pause/resume/abort change its state)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from coordinator.cli import app as cli_app
from coordinator.rollout.policy import StartWave, decide
from coordinator.serve import Coordinator
from coordinator.settings import CoordinatorSettings
from protocol.bundle import BundleKind
from protocol.exitcodes import ExitCode
from protocol.messages import BundleRef, UpdateProgress, UpdateState
from tests.support.coordinator_http import http_server
from tests.support.db_fixtures import make_manifest

TOKEN = "operator-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEVICES = [f"dev-{i:02d}" for i in range(10)]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Coordinator:
    path = tmp_path_factory.mktemp("api")
    settings = CoordinatorSettings(
        database_url=f"sqlite:///{path / 'registry.sqlite3'}",
        api_token=TOKEN,
        repository_path=path / "repo",
    )
    c = Coordinator(settings)
    for i, device in enumerate(DEVICES):
        c.registry.register_device(
            device, groups=["edge"], tags=["lab"] if i < 3 else [], actor="test"
        )
    c.registry.create_release(make_manifest("nano", "1.0.0"), actor="test")
    c.registry.create_release(make_manifest("nano-adapter", "1", BundleKind.ADAPTER), actor="test")
    return c


@pytest.fixture(scope="module")
def base_url(coordinator: Coordinator) -> Iterator[str]:
    with http_server(coordinator.app) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url) as c:
        yield c


@dataclass
class Cli:
    """Runs `nanofleet` commands in-process against the served API."""

    base_url: str

    def invoke(self, argv: list[str]) -> Result:
        return CliRunner().invoke(cli_app, [*argv, "--url", self.base_url])


@pytest.fixture
def cli(base_url: str, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.delenv("NANOFLEET_API_TOKEN", raising=False)
    monkeypatch.delenv("NANOFLEET_API_URL", raising=False)
    return Cli(base_url)


def _rollout(**overrides: Any) -> dict[str, Any]:
    return {"release": "nano:1.0.0", "groups": ["edge"], "waves": ["20%", "100%"]} | overrides


API_REFUSALS = [
    # (name, method, path, body, headers, status, field)
    ("missing token", "GET", "/api/v1/devices", None, {}, 401, "authorization"),
    (
        "wrong token",
        "GET",
        "/api/v1/devices",
        None,
        {"Authorization": "Bearer nope"},
        401,
        "authorization",
    ),
    ("unknown device", "GET", "/api/v1/devices/dev-99", None, AUTH, 404, "device_id"),
    (
        "unknown device in selector",
        "POST",
        "/api/v1/rollouts",
        _rollout(groups=[], devices=["dev-01", "ghost-1"]),
        AUTH,
        404,
        "selector.devices",
    ),
    (
        "group with no devices",
        "POST",
        "/api/v1/rollouts",
        _rollout(groups=["nowhere"]),
        AUTH,
        422,
        "selector.groups",
    ),
    (
        "malformed group",
        "POST",
        "/api/v1/rollouts",
        _rollout(groups=["bad/group"]),
        AUTH,
        422,
        "selector.groups",
    ),
    ("empty selector", "POST", "/api/v1/rollouts", _rollout(groups=[]), AUTH, 422, "selector"),
    (
        "wave over 100%",
        "POST",
        "/api/v1/rollouts",
        _rollout(waves=["10%", "150%"]),
        AUTH,
        422,
        "waves[1]",
    ),
    (
        "wave neither form",
        "POST",
        "/api/v1/rollouts",
        _rollout(waves=["ten"]),
        AUTH,
        422,
        "waves[0]",
    ),
    (
        "waves leave targets out",
        "POST",
        "/api/v1/rollouts",
        _rollout(waves=["10%", "20%"]),
        AUTH,
        422,
        "waves",
    ),
    (
        "failure rate over 1",
        "POST",
        "/api/v1/rollouts",
        _rollout(max_failure_rate=1.5),
        AUTH,
        422,
        "max_failure_rate",
    ),
    (
        "negative regression",
        "POST",
        "/api/v1/rollouts",
        _rollout(max_eval_regression=-0.1),
        AUTH,
        422,
        "max_eval_regression",
    ),
    (
        "unknown release",
        "POST",
        "/api/v1/rollouts",
        _rollout(release="nano:9"),
        AUTH,
        404,
        "release",
    ),
    (
        "malformed release",
        "POST",
        "/api/v1/rollouts",
        _rollout(release="nano"),
        AUTH,
        422,
        "release",
    ),
    ("unknown rollout", "GET", "/api/v1/rollouts/999", None, AUTH, 404, "rollout_id"),
    ("unknown round", "GET", "/api/v1/rounds/nope", None, AUTH, 404, "round_id"),
    (
        "rollback without history",
        "POST",
        "/api/v1/rollbacks",
        {"group": "edge"},
        AUTH,
        409,
        "group",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "field"),
    [case[1:] for case in API_REFUSALS],
    ids=[case[0] for case in API_REFUSALS],
)
def test_api_refuses_bad_input_naming_the_field(
    client: httpx.Client,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    status: int,
    field: str,
) -> None:
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field, detail
    assert detail["message"]
    assert TOKEN not in response.text


def test_api_unparseable_body_names_the_field(client: httpx.Client) -> None:
    response = client.post("/api/v1/rollouts", json=_rollout(soak_s="long"), headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "soak_s"]


def test_api_openapi_document_lists_the_operator_routes(client: httpx.Client) -> None:
    document = client.get("/api/v1/openapi.json").json()
    paths = document["paths"]
    assert {"/api/v1/devices", "/api/v1/rollouts", "/api/v1/rounds/{round_id}"} <= set(paths)
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert paths["/api/v1/devices"]["get"]["security"] == [{"HTTPBearer": []}]


def test_api_rollout_lifecycle(client: httpx.Client, coordinator: Coordinator) -> None:
    created = client.post("/api/v1/rollouts", json=_rollout(tags=["lab"], groups=[]), headers=AUTH)
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert rollout["target_count"] == 3
    assert [w["size"] for w in rollout["waves"]] == ["20%", "100%"]
    rid = rollout["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/pause", headers=AUTH).json()["state"] == "paused"
    again = client.post(f"/api/v1/rollouts/{rid}/pause", headers=AUTH)
    assert again.status_code == 409
    assert "cannot pause" in again.json()["detail"]["message"]
    aborted = client.post(
        f"/api/v1/rollouts/{rid}/abort", json={"reason": "wrong build"}, headers=AUTH
    ).json()
    assert aborted["state"] == "aborted"
    assert aborted["decisions"][-1]["reason"] == "wrong build"
    assert coordinator.registry.get_rollout(rid).state.value == "aborted"


START = ["rollouts", "start", "--release", "nano:1.0.0"]
CLI_REFUSALS = [
    # (name, argv, exit code, field)
    ("missing token", ["devices", "list", "--json"], ExitCode.USAGE, "token"),
    ("unknown device", ["devices", "show", "ghost-1", "--json"], ExitCode.BAD_INPUT, "device_id"),
    (
        "bad selector",
        ["rollouts", "start", "--release", "nano:1.0.0", "--group", "a/b", "--json"],
        ExitCode.BAD_INPUT,
        "selector.groups",
    ),
    (
        "unknown device in selector",
        ["rollouts", "start", "--release", "nano:1.0.0", "--device", "dev-01,ghost", "--json"],
        ExitCode.BAD_INPUT,
        "selector.devices",
    ),
    (
        "wave over 100%",
        [*START, "--group", "edge", "--wave", "50%", "--wave", "101%", "--json"],
        ExitCode.BAD_INPUT,
        "waves[1]",
    ),
    (
        "no selector",
        ["rollouts", "start", "--release", "nano:1.0.0", "--json"],
        ExitCode.BAD_INPUT,
        "selector",
    ),
    ("unknown rollout", ["rollouts", "status", "4242", "--json"], ExitCode.BAD_INPUT, "rollout_id"),
]


@pytest.mark.parametrize(
    ("argv", "code", "field"),
    [case[1:] for case in CLI_REFUSALS],
    ids=[case[0] for case in CLI_REFUSALS],
)
def test_cli_refuses_bad_input_naming_the_field(
    cli: Cli, argv: list[str], code: ExitCode, field: str
) -> None:
    token = [] if field == "token" else ["--token", TOKEN]
    result = cli.invoke([*argv, *token])
    assert result.exit_code == code, result.output
    error = json.loads(result.stdout)
    assert error["field"] == field
    assert error["message"]


def test_cli_commands_print_parseable_json(cli: Cli, coordinator: Coordinator) -> None:
    def run(*argv: str) -> Any:
        result = cli.invoke([*argv, "--json", "--token", TOKEN])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    listed = run("devices", "list", "--group", "edge")
    assert [d["id"] for d in listed["devices"]] == DEVICES
    assert listed["counts"]["unknown"] == len(DEVICES)
    assert run("devices", "show", "dev-03")["device"]["groups"] == ["edge"]
    started = run(
        "rollouts", "start", "--release", "nano-adapter:1", "--device", "dev-04,dev-05",
        "--device", "dev-06", "--wave", "1", "--wave", "100%", "--soak", "30",
        "--max-eval-regression", "0.05",
    )  # fmt: skip
    rid = started["id"]
    assert started["target_count"] == 3
    assert started["thresholds"]["max_eval_regression"] == 0.05
    assert [w["device_count"] for w in started["waves"]] == [1, 2]
    assert run("rollouts", "pause", str(rid))["state"] == "paused"
    assert run("rollouts", "resume", str(rid))["state"] == "running"
    status = run("rollouts", "status", str(rid))
    assert status["decisions"][0]["kind"] == "create"
    assert rid in [r["id"] for r in run("rollouts", "status")["rollouts"]]
    assert run("rollouts", "abort", str(rid), "--reason", "test over")["state"] == "aborted"
    assert coordinator.registry.get_rollout(rid).state.value == "aborted"


def test_cli_tables_render(cli: Cli) -> None:
    result = cli.invoke(["devices", "list", "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert "dev-09" in result.stdout
    assert "last seen" in result.stdout


def test_settings_refuse_bad_config_naming_the_key(tmp_path: Path) -> None:
    from coordinator.errors import ConfigError
    from coordinator.settings import load_settings

    config = tmp_path / "coordinator.toml"
    config.write_text('api_token = "short"\nport = 99999\n')
    with pytest.raises(ConfigError) as e:
        load_settings(config)
    assert "port (env NANOFLEET_PORT)" in str(e.value)
    assert "short" not in str(e.value)
    config.write_text('api_token = "long-enough-token-123"\n[mqtt]\nhost = "broker.example"\n')
    with pytest.raises(ConfigError, match=r"mqtt.*loopback"):
        load_settings(config)


def _complete(coordinator: Coordinator, rollout_id: int) -> None:
    """Drive a rollout to completion through the policy, every device committing."""
    reg = coordinator.registry
    release = reg.get_rollout(rollout_id).release
    target = BundleRef(name=release.name, version=release.version, sha256=release.bundle_sha256)
    for _ in range(10):
        decision, _ = reg.step(rollout_id, decide)
        if isinstance(decision, StartWave):
            at = datetime.now(UTC)
            report = UpdateProgress(
                state=UpdateState.COMMITTED,
                target=target,
                timestamp_version=1,
                bytes_done=1,
                bytes_total=1,
                at=at,
            )
            reg.ingest([(d, report, at) for d in decision.devices])
    assert reg.get_rollout(rollout_id).state.value == "completed"


def test_cli_rollback_returns_a_group_to_its_previous_release(
    cli: Cli, coordinator: Coordinator
) -> None:
    reg = coordinator.registry
    for device in ("canary-1", "canary-2"):
        reg.register_device(device, groups=["canary"], actor="test")
    reg.create_release(make_manifest("nano", "1.1.0"), actor="test")

    def run(*argv: str) -> Any:
        result = cli.invoke([*argv, "--json", "--token", TOKEN])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    refused = cli.invoke(["rollouts", "rollback", "--group", "canary", "--json", "--token", TOKEN])
    assert refused.exit_code == ExitCode.BAD_INPUT
    assert "never had a rollout" in json.loads(refused.stdout)["message"]
    first = run("rollouts", "start", "--release", "nano:1.0.0", "--group", "canary")
    _complete(coordinator, first["id"])
    second = run("rollouts", "start", "--release", "nano:1.1.0", "--group", "canary")
    back = run("rollouts", "rollback", "--group", "canary")
    assert back["release"]["version"] == "1.0.0"
    assert back["rollback_of"] == second["id"]
    assert reg.get_rollout(second["id"]).state.value == "aborted"


def test_settings_environment_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.settings import load_settings

    token_file = tmp_path / "token"
    token_file.write_text("from-a-file-0123456789\n")
    config = tmp_path / "coordinator.toml"
    config.write_text('port = 9000\napi_token = "inline-token-0123456789"\n')
    monkeypatch.setenv("NANOFLEET_PORT", "9100")
    assert load_settings(config).port == 9100
    monkeypatch.delenv("NANOFLEET_PORT")
    config.write_text(f'api_token_file = "{token_file}"\n[mqtt]\nport = 1883\n')
    monkeypatch.setenv("NANOFLEET_MQTT__HOST", "localhost")
    settings = load_settings(config)
    assert settings.token() == "from-a-file-0123456789"
    assert settings.mqtt is not None
    assert (settings.mqtt.host, settings.mqtt.port) == ("localhost", 1883)
