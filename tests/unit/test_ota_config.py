"""The ``[ota]`` and ``[mqtt]`` sections of the agent's config file: what provisioning
writes loads, and each mistake is refused naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentSettings, load_settings
from agent.errors import ConfigError

FULL = """
[model]
dir = "/opt/nanofleet/model"
[ota]
state_dir = "/var/lib/nanofleet/ota"
root_file = "/etc/nanofleet/root.json"
repository_url = "https://coordinator.example/repo"
group = "lab"
channel = "stable"
poll_interval_s = 600
[ota.health]
requests = 3
max_tokens = 24
[mqtt]
host = "broker.example"
port = 8883
device_id = "dev-a"
groups = ["lab", "north"]
channels = ["stable"]
ca_file = "/etc/nanofleet/ca.crt"
cert_file = "/etc/nanofleet/device.crt"
key_file = "/etc/nanofleet/device.key"
"""


def _load(tmp_path: Path, text: str) -> AgentSettings:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


def test_a_provisioned_config_loads(tmp_path: Path) -> None:
    settings = _load(tmp_path, FULL)
    assert settings.ota is not None
    assert settings.ota.health.requests == 3
    mqtt = settings.mqtt
    assert mqtt is not None
    assert mqtt.tls
    assert mqtt.groups == ("lab", "north")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (('repository_url = "https://coordinator.example/repo"', 'repository_url = "ftp://x/y"'),
         "repository_url"),
        (('group = "lab"', 'group = "lab/#"'), "group"),
        (('device_id = "dev-a"', 'device_id = "dev+a"'), "device_id"),
        (('key_file = "/etc/nanofleet/device.key"', ""), "key_file"),
        (('ca_file = "/etc/nanofleet/ca.crt"\ncert_file = "/etc/nanofleet/device.crt"\n'
          'key_file = "/etc/nanofleet/device.key"', ""), "loopback"),
        (('groups = ["lab", "north"]', 'groups = ["lab", "lab"]'), "repeat"),
        (("requests = 3", "requests = 0"), "requests"),
        (("poll_interval_s = 600", "poll_interval_s = 600\nretries = 3"), "retries"),
    ],
)  # fmt: skip
def test_a_mistake_is_refused_naming_it(tmp_path: Path, change: tuple[str, str], key: str) -> None:
    old, new = change
    assert old in FULL
    with pytest.raises(ConfigError, match=key):
        _load(tmp_path, FULL.replace(old, new))
