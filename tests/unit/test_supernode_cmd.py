"""The device's side of federated rounds: `nanofleet-agent supernode`, `data import`, and the
SuperNode files that provisioning and enrollment set up.

The supervisor's decisions run against fakes (a clock, a child, facts); the commands run
through the CLI. The real SuperNode joining a real SuperLink is the demo's test
(tests/integration/test_demo.py) and tests/integration/test_federated.py.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from agent.cli import app as agent_app
from agent.config import load_settings
from agent.enroll import enroll
from agent.errors import ConfigError
from agent.federated.eligibility import (
    Action,
    EligibilityPolicy,
    Ineligible,
    Verdict,
    next_action,
)
from agent.federated.supernode import new_node_key
from agent.supernode_cmd import Facts, SupervisorLoop
from coordinator import pki, provision
from coordinator.errors import RefusedError
from coordinator.repository.keys import ROLES, KeyRing, env_passphrases
from coordinator.repository.repo import Repository
from protocol.exitcodes import ExitCode

LOCAL = timezone(timedelta(hours=1))
NIGHT = EligibilityPolicy(idle_s=60, window="22:00-06:00", min_examples=10)


def _at(hh_mm: str, day: int = 1) -> datetime:
    hours, minutes = (int(x) for x in hh_mm.split(":"))
    return datetime(2026, 3, day, hours, minutes, tzinfo=LOCAL)


# -- the decision ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "running", "action"),
    [
        (None, False, Action.START),
        (None, True, Action.KEEP),
        (Ineligible.REQUEST_IN_FLIGHT, False, Action.KEEP),
        (Ineligible.NOT_IDLE, False, Action.KEEP),
        # A request during a round pauses training (serving marker), it does not end it.
        (Ineligible.REQUEST_IN_FLIGHT, True, Action.KEEP),
        (Ineligible.NOT_IDLE, True, Action.KEEP),
        (Ineligible.OUTSIDE_WINDOW, True, Action.STOP),
        (Ineligible.TOO_FEW_EXAMPLES, True, Action.STOP),
        (Ineligible.OUTSIDE_WINDOW, False, Action.KEEP),
    ],
)
def test_next_action(reason: Ineligible | None, running: bool, action: Action) -> None:
    assert next_action(Verdict(reason, "x"), running=running) is action


class FakeNode:
    def __init__(self) -> None:
        self.alive = False
        self.starts = 0
        self.stops = 0

    def start(self) -> int:
        self.alive = True
        self.starts += 1
        return 4242

    def stop(self) -> None:
        self.alive = False
        self.stops += 1


def _loop(facts: Iterator[Facts], node: FakeNode, lines: list[str], checks: int) -> SupervisorLoop:
    waits = iter(range(checks))

    def wait(_seconds: float) -> bool:
        return next(waits, None) is None  # True (stop) after `checks` checks

    return SupervisorLoop(
        NIGHT,
        facts=lambda: next(facts),
        start=node.start,
        stop=node.stop,
        running=lambda: node.alive,
        say=lines.append,
        wait=wait,
        interval_s=1.0,
    )


def test_the_supernode_starts_only_in_the_window_and_stops_when_the_window_closes() -> None:
    node = FakeNode()
    lines: list[str] = []
    facts = iter(
        [
            Facts(_at("21:58"), serving=False, examples=50),  # outside the window
            Facts(_at("22:01"), serving=False, examples=50),  # eligible: start
            Facts(_at("23:00"), serving=True, examples=50),  # a request: training pauses
            Facts(_at("05:59", day=2), serving=True, examples=50),
            Facts(_at("06:00", day=2), serving=True, examples=50),  # the window closes: stop
        ]
    )
    assert _loop(facts, node, lines, checks=4).run() is ExitCode.SUCCESS
    assert (node.starts, node.stops) == (1, 1)
    assert lines[0].startswith("not eligible (local time 21:58 is outside the window")
    assert lines[1].startswith("eligible (")
    assert lines[1].endswith("started, pid 4242")
    assert lines[2].startswith("not eligible (local time 06:00")
    assert lines[2].endswith("SuperNode stopped")
    assert len(lines) == 3


def test_a_device_that_served_recently_waits_for_the_idle_time() -> None:
    node = FakeNode()
    lines: list[str] = []
    facts = iter(
        [
            Facts(_at("23:00"), serving=True, examples=50),
            Facts(_at("23:00"), serving=False, examples=50),  # idle 0 s of 60
            Facts(_at("23:01"), serving=False, examples=50),  # idle 60 s: start
        ]
    )
    _loop(facts, node, lines, checks=2).run()
    assert node.starts == 1
    assert "an inference request is in flight" in lines[0]
    assert "idle for 0 s of the 60 s required" in lines[1]
    assert "started" in lines[2]


def test_a_device_without_enough_data_never_starts_its_supernode() -> None:
    node = FakeNode()
    lines: list[str] = []
    facts = iter([Facts(_at("23:00"), serving=False, examples=9)] * 3)
    _loop(facts, node, lines, checks=2).run()
    assert node.starts == 0
    assert lines == ["not eligible (9 training examples, 10 required): SuperNode not started"]


def test_a_supernode_that_dies_ends_the_loop_for_a_restart() -> None:
    node = FakeNode()
    lines: list[str] = []
    facts = iter([Facts(_at("23:00"), serving=False, examples=50)] * 3)
    loop = _loop(facts, node, lines, checks=5)
    assert loop.check() is None
    node.alive = False  # it crashed
    assert loop.run() is ExitCode.UNAVAILABLE
    assert lines[-1] == "the SuperNode exited by itself"


def test_stopping_the_loop_stops_a_running_supernode() -> None:
    node = FakeNode()
    lines: list[str] = []
    facts = iter([Facts(_at("23:00"), serving=False, examples=50)] * 2)
    _loop(facts, node, lines, checks=1).run()
    assert (node.starts, node.stops, node.alive) == (1, 1, False)
    assert lines[-1] == "SuperNode stopped"


# -- settings -------------------------------------------------------------------------


def _federated(tmp_path: Path, **overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "enabled": True,
        "superlink": "127.0.0.1:9092",
        "ca_file": str(tmp_path / "ca.crt"),
        "node_key_file": str(tmp_path / "supernode.key"),
        "data_path": str(tmp_path / "texts.sqlite3"),
        "state_dir": str(tmp_path / "supernode"),
        "eligibility": {"idle_s": 0, "window": "00:00-24:00", "min_examples": 3},
    }
    values.update(overrides)
    return values


def _config(tmp_path: Path, **federated: object) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        tomli_w.dumps(
            {
                "model": {"dir": str(tmp_path / "model")},
                "federated": _federated(tmp_path, **federated),
            }
        )
    )
    return path


def test_the_federated_section_loads_with_its_eligibility_policy(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path))
    assert settings.federated is not None
    assert settings.federated.eligibility.min_examples == 3
    assert str(settings.federated.eligibility.window) == "00:00-24:00"
    assert settings.federated.isolation == "subprocess"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"superlink": "no-port"}, "federated.superlink"),
        ({"superlink": "a b:1"}, "federated.superlink"),
        ({"isolation": "process"}, "superexec_secret_file"),
        ({"eligibility": {"window": "25:00-26:00"}}, "federated.eligibility.window"),
        ({"surprise": 1}, "federated.surprise"),
        ({"store": {"max_rows": 0}}, "federated.store.max_rows"),
        ({"store": {"capture": True}}, "federated.store.capture"),
    ],
)
def test_a_bad_federated_section_is_refused_naming_the_key(
    tmp_path: Path, overrides: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(_config(tmp_path, **overrides))


# -- the commands ---------------------------------------------------------------------


def test_data_import_loads_paragraphs_into_the_store_of_the_config(tmp_path: Path) -> None:
    config = _config(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i} about the shop's espresso machine." for i in range(12))
    )
    runner = CliRunner()
    result = runner.invoke(agent_app, ["data", "import", str(text), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert f"{text}: 12 texts stored, 0 already there" in result.output
    assert stat.S_IMODE((tmp_path / "texts.sqlite3").stat().st_mode) == 0o600
    again = runner.invoke(agent_app, ["data", "import", str(text), "--config", str(config)])
    assert "0 texts stored, 12 already there" in again.output
    stats = runner.invoke(agent_app, ["data", "stats", "--store", str(tmp_path / "texts.sqlite3")])
    assert stats.exit_code == 0
    assert ": 12 texts (" in stats.output
    assert "espresso" not in result.output + again.output + stats.output  # counts, never text


def test_data_import_applies_the_retention_limits_of_the_config(tmp_path: Path) -> None:
    config = _config(tmp_path, store={"max_rows": 5})
    settings = load_settings(config)
    assert settings.federated is not None
    assert settings.federated.store.capture_enabled is False  # opt-in
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i} about the shop's grinder." for i in range(8)))
    result = CliRunner().invoke(agent_app, ["data", "import", str(text), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "8 texts stored, 0 already there, 3 removed by retention" in result.output
    assert ": 5 texts (" in result.output


def test_data_import_refuses_binary_input_and_needs_one_store(tmp_path: Path) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"abc\x00def")
    runner = CliRunner()
    store = str(tmp_path / "s.sqlite3")
    result = runner.invoke(agent_app, ["data", "import", str(binary), "--store", store])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "NUL" in result.output
    neither = runner.invoke(agent_app, ["data", "import", str(binary)])
    assert neither.exit_code == ExitCode.USAGE


def test_supernode_check_says_whether_the_device_may_train(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "supernode.key").write_bytes(new_node_key()[0])
    runner = CliRunner()
    result = runner.invoke(agent_app, ["supernode", "--config", str(config), "--check"])
    assert result.exit_code == 1
    assert "not eligible: 0 training examples, 3 required" in result.output
    text = tmp_path / "t.txt"
    text.write_text("one paragraph here\n\nand a second one\n\na third\n\nand a fourth\n\nfifth")
    runner.invoke(agent_app, ["data", "import", str(text), "--config", str(config)])
    result = runner.invoke(agent_app, ["supernode", "--config", str(config), "--check"])
    assert result.exit_code == 0, result.output
    assert "eligible: idle, inside the window" in result.output


@pytest.mark.parametrize(
    ("overrides", "with_key", "message"),
    [
        ({"enabled": False}, True, "federated learning is off"),
        ({}, False, "node_key_file"),
        ({"data_path": "/tmp/with space/x.sqlite3"}, True, "data-path"),
    ],
)
def test_supernode_refuses_a_config_it_cannot_run(
    tmp_path: Path, overrides: dict[str, object], with_key: bool, message: str
) -> None:
    config = _config(tmp_path, **overrides)
    if with_key:
        (tmp_path / "supernode.key").write_bytes(new_node_key()[0])
    result = CliRunner().invoke(agent_app, ["supernode", "--config", str(config)])
    assert result.exit_code == ExitCode.CONFIG
    assert message in result.output


# -- provisioning and enrollment ------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[pki.Credential, bytes]:
    base = tmp_path_factory.mktemp("fleet")
    keys = KeyRing([base / "keys"], env_passphrases({"NANOFLEET_KEY_PASSPHRASE": "p"}))
    for role in ROLES:
        keys.create(role)
    Repository.init(base / "repo", keys)
    return pki.create_ca("test CA"), (base / "repo" / "metadata" / "root.json").read_bytes()


def _request(**overrides: object) -> provision.EnrollmentRequest:
    values: dict[str, object] = {
        "device_id": "kiosk-9",
        "broker_host": "broker.example.net",
        "repository_url": "https://releases.example.net/repo",
        "groups": ("store-1",),
        "superlink": "fleet.example.net:9092",
    }
    values.update(overrides)
    return provision.EnrollmentRequest(**values)  # type: ignore[arg-type]


def test_enroll_creates_the_supernode_key_on_the_device_and_points_the_settings_at_it(
    fleet: tuple[pki.Credential, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("NANOFLEET_")]:
        monkeypatch.delenv(name)
    ca, root = fleet
    enrollment = provision.build_enrollment(_request(), ca, root)
    with tarfile.open(fileobj=io.BytesIO(enrollment.data), mode="r:") as tar:
        assert tuple(tar.getnames()) == provision.MEMBERS  # no node key leaves the operator
    bundle = tmp_path / "k.enroll"
    bundle.write_bytes(enrollment.data)
    dest = tmp_path / "etc"
    installed = enroll(bundle, dest)
    modes = {
        p: stat.S_IMODE((dest / p).stat().st_mode)
        for p in ("flower", "flower/supernode.key", "flower/supernode.pub")
    }
    assert modes == {"flower": 0o750, "flower/supernode.key": 0o600, "flower/supernode.pub": 0o644}
    assert installed.node_public_key == dest / "flower" / "supernode.pub"
    settings = load_settings(installed.config)
    fed = settings.federated
    assert fed is not None
    assert fed.enabled
    assert fed.superlink == "fleet.example.net:9092"
    assert fed.ca_file == dest / "tls" / "ca.crt"
    assert fed.node_key_file == dest / "flower" / "supernode.key"
    assert str(fed.data_path) == str(provision.FEDERATED_DATA_PATH)
    private = serialization.load_ssh_private_key((dest / "flower/supernode.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((dest / "flower/supernode.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key() == public
    # A device enrolled without a SuperLink has no federated files.
    plain = tmp_path / "p.enroll"
    plain.write_bytes(provision.build_enrollment(_request(superlink=None), ca, root).data)
    assert enroll(plain, tmp_path / "etc2").node_public_key is None
    assert not (tmp_path / "etc2" / "flower").exists()
    assert load_settings(tmp_path / "etc2" / "agent.toml").federated is None


@pytest.mark.parametrize("address", ["fleet.example.net", "a b:1", "host:70000", ":9092"])
def test_provisioning_refuses_a_bad_superlink_address(
    fleet: tuple[pki.Credential, bytes], address: str
) -> None:
    ca, root = fleet
    with pytest.raises(RefusedError, match="SuperLink address"):
        provision.build_enrollment(_request(superlink=address), ca, root)


def test_data_evaluate_reports_held_out_perplexity_with_and_without_an_adapter(
    tmp_path: Path,
) -> None:
    from coordinator.demo.domain_data import device_slices
    from coordinator.models.adapter_bundle import write_random_adapter_bundle
    from tests.support.ota_models import build_ota_model

    model = build_ota_model(tmp_path / "model", seed=11)
    adapter = write_random_adapter_bundle(tmp_path / "adapter", model, name="a", version="1")
    config = tmp_path / "agent.toml"
    config.write_text(
        tomli_w.dumps({"model": {"dir": str(model)}, "federated": _federated(tmp_path)})
    )
    texts = tmp_path / "texts.txt"
    piece = device_slices("alpha", devices=3, max_chars=6000)[0]
    texts.write_text("\n\n".join(piece.train_texts() + piece.heldout_texts()))
    runner = CliRunner()
    imported = runner.invoke(agent_app, ["data", "import", str(texts), "--config", str(config)])
    assert imported.exit_code == 0, imported.output
    args = ["data", "evaluate", "--config", str(config), "--adapter", str(adapter / "adapter.npz")]
    result = runner.invoke(agent_app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["positions"] > 0
    assert 1 < figures["base_perplexity"] < 1e6
    assert figures["perplexity"] != figures["base_perplexity"]  # the adapter changes logits
    text = runner.invoke(agent_app, args)
    assert "held-out perplexity over" in text.output
    missing = runner.invoke(agent_app, [*args[:-1], str(tmp_path / "nope.npz")])
    assert missing.exit_code == ExitCode.MODEL_INVALID
