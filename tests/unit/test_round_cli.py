"""`nanofleet round start`, `round status` and `round register-node`: refusals
(table-driven, each with its exit code and field), --json documents that parse, and a whole
round through the CLI with a fake Flower driver in place of the ``flwr`` CLI."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from agent.federated.supernode import new_node_key
from coordinator import round_cli
from coordinator.cli import app
from coordinator.federation.nodes import key_digest
from coordinator.federation.superlink import RunFailedError
from coordinator.registry import Online, Registry, open_registry
from coordinator.web.dashboard import dashboard_router
from protocol.exitcodes import ExitCode
from tests.support.coordinator_http import http_server
from tests.support.db_fixtures import make_round_manifest
from tests.unit.test_round_campaign import FakeFlower, make_coordinator

TOKEN = "a-token-of-sixteen-chars"
ENV = {"NANOFLEET_KEY_PASSPHRASE": "round test passphrase"}


@dataclass(frozen=True)
class Setup:
    config: Path
    registry: Registry
    work: Path


@pytest.fixture
def superlink() -> Iterator[int]:
    """A loopback port that accepts connections (the SuperLink's, as far as a probe sees)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def _write_config(path: Path, work: Path, *, superlink_port: int, keys: Path | None) -> Path:
    lines = [
        f'database_url = "sqlite:///{work / "registry.sqlite3"}"',
        f'api_token = "{TOKEN}"',
        f'repository_path = "{work / "repo"}"',
    ]
    if keys is not None:
        lines.append(f'keys = "{keys}"')
    lines += [
        "[federation]",
        f'superlink = "127.0.0.1:{superlink_port}"',
        f'ca_file = "{work / "ca.crt"}"',
        f'work_dir = "{work / "federation"}"',
        "poll_s = 0.01",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def setup(tmp_path: Path, superlink: int) -> Iterator[Setup]:
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.sqlite3'}")
    coordinator = make_coordinator(tmp_path, registry)
    config = _write_config(
        tmp_path / "coordinator.toml",
        tmp_path,
        superlink_port=superlink,
        keys=coordinator.online_keys,
    )
    yield Setup(config, registry, tmp_path)
    registry.engine.dispose()


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["round", *args], env=ENV)


def as_json(result: Any) -> Any:
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "args", [["--help"], ["start", "--help"], ["status", "--help"], ["register-node", "--help"]]
)
def test_help(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


BAD_OPTIONS = [
    (["--rounds", "0"], "rounds", "must lie in 1..10000"),
    (["--epsilon", "-1"], "epsilon", "finite number > 0"),
    (["--epsilon", "nan"], "epsilon", "finite number > 0"),
    (["--epsilon", "1", "--noise", "0.5"], "epsilon", "not both"),
    (["--clip", "0"], "clip", "finite number > 0"),
    (["--rank", "0"], "rank", "must be >= 1"),
    (["--min-nodes", "0"], "min-nodes", "must be >= 1"),
    (["--max-eval-regression", "-0.1"], "max-eval-regression", "must be >= 0"),
]


@pytest.mark.parametrize(("args", "field", "message"), BAD_OPTIONS)
def test_start_refuses_bad_option_values_before_touching_anything(
    tmp_path: Path, args: list[str], field: str, message: str
) -> None:
    result = invoke("start", "--group", "alpha", *args, "--json", "--config", str(tmp_path / "no"))
    assert result.exit_code == ExitCode.USAGE, result.output
    error = as_json(result)
    assert error["error"] == "usage"
    assert error["field"] == field
    assert message in error["message"]


def test_start_refuses_an_unknown_group(setup: Setup) -> None:
    result = invoke("start", "--group", "omega", "--config", str(setup.config), "--json")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert as_json(result)["field"] == "group"
    assert "unknown group 'omega'" in as_json(result)["message"]
    assert setup.registry.list_rounds() == []


def test_start_refuses_a_group_whose_channel_names_no_base(setup: Setup) -> None:
    setup.registry.register_device("lonely", groups=["gamma"], actor="test")
    result = invoke("start", "--group", "gamma", "--config", str(setup.config), "--json")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "no 'stable' channel" in as_json(result)["message"]


def test_start_says_the_superlink_is_unreachable(setup: Setup, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: connections are refused
        config = _write_config(
            tmp_path / "closed.toml", setup.work, superlink_port=closed, keys=setup.work / "k"
        )
        result = invoke("start", "--group", "alpha", "--config", str(config), "--json")
    assert result.exit_code == ExitCode.UNAVAILABLE, result.output
    assert as_json(result)["field"] == "federation.superlink"
    assert "not reachable" in as_json(result)["message"]


def test_start_refuses_without_the_adapters_key(setup: Setup, superlink: int) -> None:
    empty = setup.work / "no-keys"
    empty.mkdir()
    config = _write_config(
        setup.work / "nokeys.toml", setup.work, superlink_port=superlink, keys=empty
    )
    result = invoke("start", "--group", "alpha", "--config", str(config), "--json")
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert as_json(result)["field"] == "keys"
    assert "adapters role needs 1 key" in as_json(result)["message"]
    assert setup.registry.list_rounds() == []


def test_start_refuses_without_keys_or_federation_settings(setup: Setup, tmp_path: Path) -> None:
    no_keys = _write_config(tmp_path / "a.toml", setup.work, superlink_port=1, keys=None)
    result = invoke("start", "--group", "alpha", "--config", str(no_keys), "--json")
    assert result.exit_code == ExitCode.CONFIG
    assert "keys" in as_json(result)["message"]
    no_federation = tmp_path / "b.toml"
    no_federation.write_text(no_keys.read_text().split("[federation]")[0])
    result = invoke("start", "--group", "alpha", "--config", str(no_federation), "--json")
    assert result.exit_code == ExitCode.CONFIG
    assert "federation: not configured" in as_json(result)["message"]


def test_a_remote_superlink_address_is_a_config_error(setup: Setup, tmp_path: Path) -> None:
    config = tmp_path / "remote.toml"
    config.write_text(setup.config.read_text().replace("127.0.0.1:", "10.0.0.5:"))
    result = invoke("status", "--config", str(config), "--json")
    assert result.exit_code == ExitCode.CONFIG
    assert "not a loopback address" in as_json(result)["message"]


class _FakeCli(FakeFlower):
    """Stands in for FlowerCli: reachable, plays the ServerApp without waiting."""

    def __init__(self, flwr_home: Path, control_address: str, ca_certfile: Path) -> None:
        super().__init__(None)

    def reachable(self) -> bool:
        return True

    def run(self, app_dir: Path, run_config: Mapping[str, Any], timeout_s: float) -> str:
        return super().run(app_dir, run_config, timeout_s)


def test_a_round_through_the_cli_prints_one_json_document(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(round_cli, "FlowerCli", _FakeCli)
    result = invoke(
        "start", "--group", "alpha", "--rounds", "2", "--epsilon", "8", "--round-id", "alpha-7",
        "--config", str(setup.config), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = as_json(result)
    assert data["round"]["state"] == "finished"
    assert [m["number"] for m in data["round"]["metrics"]] == [1, 2]
    assert data["round"]["manifest"]["privacy"]["epsilon"] <= 8
    assert data["release"]["name"] == "alpha-adapter"
    assert data["release"]["version"] == "alpha-7"
    assert [w["size"] for w in data["rollout"]["waves"]] == ["1 devices", "100%"]

    status = invoke("status", "--config", str(setup.config), "--json")
    assert status.exit_code == 0, status.output
    assert [r["id"] for r in as_json(status)["rounds"]] == ["alpha-7"]
    table = invoke("status", "alpha-7", "--config", str(setup.config))
    assert table.exit_code == 0, table.output
    assert "alpha-7" in table.output
    assert "held-out perplexity" in table.output


def test_a_failed_round_exits_1_and_status_shows_why(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Failing(_FakeCli):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.fail_after = 1

    monkeypatch.setattr(round_cli, "FlowerCli", Failing)
    result = invoke(
        "start", "--group", "alpha", "--round-id", "alpha-8", "--no-canary",
        "--config", str(setup.config), "--json",
    )  # fmt: skip
    assert result.exit_code == ExitCode.FAILURE, result.output
    assert as_json(result)["field"] == "run"
    assert "went away" in as_json(result)["message"]
    status = invoke("status", "alpha-8", "--config", str(setup.config), "--json")
    data = as_json(status)
    assert data["state"] == "failed"
    assert data["failure_reason"].startswith("run: ")
    shown = invoke("status", "alpha-8", "--config", str(setup.config))
    assert "failed at run" in shown.output
    # The dashboard's round page says why, and how far the run got.
    web = FastAPI()
    web.include_router(dashboard_router(setup.registry, TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with http_server(web) as url, httpx.Client(base_url=url, headers=auth) as client:
        page = client.get("/ui/rounds/alpha-8")
        listing = client.get("/ui/rounds")
    assert page.status_code == 200
    assert "id='failure-reason'>Failed at run: flwr run failed" in page.text
    assert "1/3 rounds" in page.text
    assert "<td>1/3</td>" in listing.text


def test_status_lists_runs_and_refuses_an_unknown_one(setup: Setup) -> None:
    setup.registry.create_round(make_round_manifest("edge-1", "edge"), actor="test")
    setup.registry.record_round_metric("edge-1", 1, participants=4, loss=1.2, perplexity=9.5)
    listed = invoke("status", "--config", str(setup.config))
    assert listed.exit_code == 0, listed.output
    assert "edge-1" in listed.output
    one = as_json(invoke("status", "edge-1", "--config", str(setup.config), "--json"))
    assert one["metrics"][0]["perplexity"] == 9.5
    assert one["failure_reason"] is None
    unknown = invoke("status", "nope", "--config", str(setup.config), "--json")
    assert unknown.exit_code == ExitCode.BAD_INPUT
    assert as_json(unknown)["field"] == "round_id"


def test_a_round_in_text_mode_shows_each_round_and_what_was_published(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(round_cli, "FlowerCli", _FakeCli)
    result = invoke(
        "start", "--group", "alpha", "--rounds", "2", "--no-canary", "--round-id", "alpha-9",
        "--config", str(setup.config),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "round 1: 3 devices, loss 2" in result.output
    assert "round 2: 3 devices, loss 1" in result.output
    assert "published alpha-adapter alpha-9" in result.output
    assert "the alpha group's channel points at it" in result.output


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({Online.ONLINE: 2, Online.OFFLINE: 1}, 2),  # a round waits for its whole cohort
        ({Online.UNKNOWN: 3}, 3),  # no liveness known (no broker): every registered device
        ({Online.ONLINE: 0, Online.OFFLINE: 4}, 4),
    ],
)
def test_the_default_cohort_is_the_online_devices(counts: dict[Online, int], expected: int) -> None:
    assert round_cli.default_cohort(counts) == expected


def test_start_refuses_a_cohort_larger_than_the_group(setup: Setup) -> None:
    result = invoke(
        "start", "--group", "alpha", "--cohort", "4", "--config", str(setup.config), "--json"
    )
    assert result.exit_code == ExitCode.USAGE, result.output
    assert as_json(result)["field"] == "cohort"
    assert "exceeds the group's 3 registered devices" in as_json(result)["message"]


class _Registrar(_FakeCli):
    """Stands in for FlowerCli at registration: the SuperLink gives node IDs from 501 on,
    and refuses a key it has seen."""

    given: ClassVar[dict[str, int]] = {}

    def register_node(self, public_key: Path, timeout_s: float = 30.0) -> int:
        key = public_key.read_text().split()[1]
        if key in self.given:
            raise RunFailedError("flwr supernode register failed (1):\nPublic key already in use")
        self.given[key] = 501 + len(self.given)
        return self.given[key]


def _public_key(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(new_node_key()[1])
    return path


def test_register_node_binds_the_node_id_to_the_device(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(round_cli, "FlowerCli", _Registrar)
    monkeypatch.setattr(_Registrar, "given", {})
    setup.registry.register_device("till-9", groups=["shop-b"], actor="test")
    key = _public_key(tmp_path / "till-9" / "supernode.pub")
    result = invoke("register-node", "till-9", str(key), "--config", str(setup.config), "--json")
    assert result.exit_code == 0, result.output
    answer = as_json(result)
    assert answer["device"] == "till-9"
    assert answer["node_id"] == "501"
    assert answer["key_sha256"] == key_digest(key)
    assert [n.node_id for n in setup.registry.federation_nodes("shop-b")] == [501]
    # The alpha group's nodes (make_coordinator's) are untouched.
    assert [n.node_id for n in setup.registry.federation_nodes("alpha")] == [101, 102, 103]


@pytest.mark.parametrize(
    ("case", "field", "message"),
    [
        ("unknown_device", "device", "unknown device 'ghost'"),
        ("not_a_key", "public_key", "not an OpenSSH public key line"),
        ("missing_key", "public_key", "cannot read it"),
        ("key_registered_already", "public_key", "the SuperLink refused the key"),
    ],
)
def test_register_node_refusals(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str, field: str,
    message: str,
) -> None:  # fmt: skip
    monkeypatch.setattr(round_cli, "FlowerCli", _Registrar)
    monkeypatch.setattr(_Registrar, "given", {})
    setup.registry.register_device("till-9", groups=["shop-b"], actor="test")
    device, key = "till-9", _public_key(tmp_path / "k" / "supernode.pub")
    if case == "unknown_device":
        device = "ghost"
    elif case == "not_a_key":
        key.write_text("hello\n")
    elif case == "missing_key":
        key = tmp_path / "nowhere.pub"
    elif case == "key_registered_already":
        first = invoke("register-node", "till-9", str(key), "--config", str(setup.config))
        assert first.exit_code == 0, first.output
        setup.registry.register_device("till-10", groups=["shop-b"], actor="test")
        device = "till-10"
    result = invoke("register-node", device, str(key), "--config", str(setup.config), "--json")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    error = as_json(result)
    assert (error["field"], message in error["message"]) == (field, True), error
    bound = {n.device_id for n in setup.registry.federation_nodes("shop-b")}
    assert bound == ({"till-9"} if case == "key_registered_already" else set())
