"""The broker ACL and config renderers: the grants match the protocol's topics, inputs are checked.

mosquitto itself enforces the ACL in tests/integration/test_mosquitto.py; here the rendered
text is checked against the topic functions of :mod:`protocol.topics` with MQTT's own
matching rules, so a topic layout change that the ACL misses fails here first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import broker_config as bc
from coordinator.errors import RefusedError
from coordinator.pki import COORDINATOR_IDENTITY
from protocol import topics

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "nanofleet.conf.template"
FLEET = [("dev-b", ["beta", "alpha"]), ("dev-a", ["alpha"])]


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching: '+' is one level, a trailing '#' any number (even none)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def parse_acl(text: str) -> tuple[dict[str, list[tuple[str, str]]], list[tuple[str, str]]]:
    """Return ({user: [(access, topic)]}, [(access, pattern)]) from an ACL file."""
    users: dict[str, list[tuple[str, str]]] = {}
    patterns: list[tuple[str, str]] = []
    current: str | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        keyword, rest = line.split(" ", 1)
        if keyword == "user":
            current = rest
            users[current] = []
        elif keyword == "topic":
            assert current is not None, "topic line outside a user block grants anonymous"
            access, topic = rest.split(" ", 1)
            users[current].append((access, topic))
        elif keyword == "pattern":
            access, topic = rest.split(" ", 1)
            patterns.append((access, topic))
        else:
            raise AssertionError(f"unexpected ACL line {line!r}")
    return users, patterns


def may(acl: str, user: str, access: str, topic: str) -> bool:
    """Whether ``user`` may ``access`` ("read"/"write") ``topic`` under mosquitto's rules."""
    users, patterns = parse_acl(acl)
    grants = list(users.get(user, []))
    grants += [(a, p.replace("%u", user)) for a, p in patterns]
    return any(a in (access, "readwrite") and matches(f, topic) for a, f in grants)


def test_the_matcher_follows_mqtt_rules() -> None:
    assert matches("a/+/c", "a/b/c")
    assert not matches("a/+/c", "a/b/d/c")
    assert matches("a/#", "a")
    assert matches("a/#", "a/b/c")
    assert not matches("a/b", "a/b/c")


def test_a_device_writes_only_its_own_reports() -> None:
    acl = bc.render_acl(FLEET)
    for topic_of in (topics.device_status, topics.device_heartbeat, topics.update_progress):
        assert may(acl, "dev-a", "write", topic_of("dev-a"))
        assert may(acl, "dev-a", "read", topic_of("dev-a"))
        assert not may(acl, "dev-a", "write", topic_of("dev-b"))
        assert not may(acl, "dev-a", "read", topic_of("dev-b"))


def test_a_device_reads_the_announcements_of_its_groups_only() -> None:
    acl = bc.render_acl(FLEET)
    for group in ("alpha", "beta"):
        for channel in ("stable", "beta-ring"):
            announcement = topics.release_announcements(group, channel)
            assert may(acl, "dev-b", "read", announcement)
            assert not may(acl, "dev-b", "write", announcement)
        assert may(acl, "dev-b", "read", topics.round_invitations(group))
        assert not may(acl, "dev-b", "write", topics.round_invitations(group))
    assert may(acl, "dev-a", "read", topics.release_announcements("alpha", "stable"))
    assert not may(acl, "dev-a", "read", topics.release_announcements("beta", "stable"))
    assert not may(acl, "dev-a", "read", topics.round_invitations("beta"))


def test_the_coordinator_reads_every_report_and_writes_every_announcement() -> None:
    acl = bc.render_acl(FLEET)
    coordinator = COORDINATOR_IDENTITY
    for device in ("dev-a", "dev-z-not-provisioned"):
        for channel in topics.DeviceChannel:
            assert may(acl, coordinator, "read", topics.device_topic(device, channel))
            assert not may(acl, coordinator, "write", topics.device_topic(device, channel))
    assert may(acl, coordinator, "write", topics.release_announcements("any", "stable"))
    assert may(acl, coordinator, "write", topics.round_invitations("any"))


def test_an_unknown_identity_gets_nothing_beyond_its_own_topics() -> None:
    acl = bc.render_acl(FLEET)
    assert not may(acl, "stranger", "read", topics.release_announcements("alpha", "stable"))
    assert not may(acl, "stranger", "read", topics.device_status("dev-a"))


def test_the_acl_keys_on_the_username_never_the_client_id() -> None:
    acl = bc.render_acl(FLEET)
    assert "%c" not in acl
    settings = [ln for ln in TEMPLATE.read_text().splitlines() if not ln.startswith("#")]
    assert not any("%c" in ln for ln in settings)
    _, patterns = parse_acl(acl)
    assert patterns
    assert all("%u" in p for _, p in patterns)


def test_the_acl_is_deterministic() -> None:
    assert bc.render_acl(FLEET) == bc.render_acl(list(reversed(FLEET)))
    text = bc.render_acl(FLEET)
    assert text.index("user dev-a") < text.index("user dev-b")
    assert text.count("nanofleet/v1/groups/alpha/rounds") == 2


@pytest.mark.parametrize(
    ("devices", "match"),
    [
        ([("dev/a", [])], "device id"),
        ([("#", [])], "device id"),
        ([("svc:coordinator", [])], "device id"),
        ([("dev-a", ["al pha"])], "group"),
        ([("dev-a", ["+"])], "group"),
        ([("dev-a", ["g\nuser svc:coordinator"])], "group"),
        ([("dev-a", []), ("dev-a", ["alpha"])], "listed twice"),
        ([("dev-a", [f"g{i}" for i in range(bc.MAX_GROUPS_PER_DEVICE + 1)])], "over the limit"),
    ],
)
def test_bad_fleet_input_is_refused(devices: list[tuple[str, list[str]]], match: str) -> None:
    with pytest.raises(RefusedError, match=match):
        bc.render_acl(devices)


def test_a_coordinator_name_that_could_add_a_line_is_refused() -> None:
    with pytest.raises(RefusedError, match="coordinator username"):
        bc.render_acl(FLEET, coordinator="svc:x\ntopic readwrite #")


def _files(tmp: Path, **overrides: object) -> bc.BrokerFiles:
    values: dict[str, object] = {
        "ca_file": tmp / "ca.crt",
        "cert_file": tmp / "broker.crt",
        "key_file": tmp / "broker.key",
        "crl_file": tmp / "crl.pem",
        "acl_file": tmp / "acl",
        "persistence_dir": tmp / "data",
    }
    values.update(overrides)
    return bc.BrokerFiles(**values)  # type: ignore[arg-type]


def test_the_production_template_renders_mtls_with_identity_usernames() -> None:
    conf = bc.render_mosquitto_conf(TEMPLATE.read_text(), _files(Path("/etc/mosquitto/nanofleet")))
    lines = {line.strip() for line in conf.splitlines() if line and not line.startswith("#")}
    for expected in (
        "listener 8883 0.0.0.0",
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "acl_file /etc/mosquitto/nanofleet/acl",
        "keyfile /etc/mosquitto/nanofleet/broker.key",
        "crlfile /etc/mosquitto/nanofleet/crl.pem",
        "persistence true",
        "persistence_location /etc/mosquitto/nanofleet/data/",
        "tls_version tlsv1.2",
    ):
        assert expected in lines
    assert "${" not in conf


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"acl_file": Path("relative/acl")}, "acl_file .* absolute"),
        ({"key_file": Path("/etc/my keys/broker.key")}, "key_file .* whitespace"),
        ({"ca_file": Path("/etc/ca.crt\nallow_anonymous true")}, "ca_file .* whitespace"),
        ({"port": 0}, "port 0"),
        ({"port": 65536}, "port 65536"),
        ({"bind_address": "localhost"}, "bind_address"),
    ],
)
def test_bad_broker_settings_are_refused(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(RefusedError, match=match):
        bc.render_mosquitto_conf(TEMPLATE.read_text(), _files(Path("/srv"), **overrides))


def test_a_template_with_an_unknown_placeholder_is_refused() -> None:
    with pytest.raises(RefusedError, match="unknown placeholder 'password'"):
        bc.render_mosquitto_conf("listener ${port}\npassword ${password}\n", _files(Path("/srv")))


def test_the_example_acl_in_deploy_is_what_render_acl_writes() -> None:
    example = TEMPLATE.with_name("acl.example").read_text()
    fleet = [("kiosk-0001", ["store-12", "canary"]), ("kiosk-0002", ["store-12"])]
    assert example == bc.render_acl(fleet)
