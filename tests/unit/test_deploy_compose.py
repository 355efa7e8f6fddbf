"""deploy/compose: the coordinator stack's compose file, checked without a container engine.

Checked: the services and their images or build, that every file mounted from the
repository exists (and every secret file the operator creates is documented), the
published ports, dependencies and networks, and that the mounted broker files are what
``coordinator.broker_config`` renders.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from coordinator.broker_config import BrokerFiles, render_acl, render_mosquitto_conf

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
TEMPLATE = REPO / "deploy" / "mosquitto" / "nanofleet.conf.template"
SECRETS_README = COMPOSE_DIR / "secrets" / "README.md"
TOP_LEVEL = {"name", "services", "networks", "volumes", "secrets", "configs"}
SERVICE_KEYS = {
    "image", "build", "restart", "ports", "volumes", "environment", "secrets", "command",
    "healthcheck", "depends_on", "networks",
}  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def bind_mounts(compose: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(service, host path, container path) of every bind mount (short syntax)."""
    mounts = []
    for name, service in compose["services"].items():
        for entry in service.get("volumes", []):
            source, _, rest = entry.partition(":")
            if source.startswith((".", "/")):
                mounts.append((name, source, rest.split(":")[0]))
    return mounts


def test_the_stack_has_its_four_services_and_only_known_keys(compose: dict[str, Any]) -> None:
    assert set(compose) <= TOP_LEVEL
    assert set(compose["services"]) == {
        "mosquitto", "postgres", "coordinator", "superlink", "fleet-proxy",
    }  # fmt: skip
    for name, service in compose["services"].items():
        assert set(service) <= SERVICE_KEYS, f"{name}: {set(service) - SERVICE_KEYS}"
        assert "image" in service or "build" in service, name
        assert service.get("restart") == "unless-stopped", name


def test_the_image_builds_from_files_in_the_repository(compose: dict[str, Any]) -> None:
    build = compose["services"]["coordinator"]["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == REPO
    dockerfile = context / build["dockerfile"]
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (context / source).exists(), f"{dockerfile}: COPY {source}"
    # The SuperLink runs from the image the coordinator builds.
    image = compose["services"]["coordinator"]["image"]
    assert compose["services"]["superlink"]["image"] == image


def test_every_mounted_file_exists_or_is_a_documented_secret(compose: dict[str, Any]) -> None:
    documented = SECRETS_README.read_text()
    mounts = bind_mounts(compose)
    assert mounts
    secret_files = [s["file"] for s in compose.get("secrets", {}).values()]
    for name, source, target in mounts:
        assert PurePosixPath(target).is_absolute(), f"{name}: {target}"
        path = (COMPOSE_DIR / source).resolve()
        assert path.is_relative_to(REPO), f"{name}: {source} is outside the repository"
        if source.startswith("./secrets/"):
            assert f"`{Path(source).name}" in documented, f"{source} not in {SECRETS_README}"
        else:
            assert path.is_file(), f"{name} mounts {source}, which does not exist"
    for source in secret_files:
        assert source.startswith("./secrets/"), source
        assert f"`{Path(source).name}`" in documented, f"{source} not in {SECRETS_README}"
    ignore = (COMPOSE_DIR / "secrets" / ".gitignore").read_text().split()
    assert ignore[0] == "*"


def test_services_use_only_declared_secrets_volumes_networks_and_services(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name, service in services.items():
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: secret {secret}"
        for entry in service.get("volumes", []):
            source = entry.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: volume {source}"
        for network in service.get("networks", []):
            assert network in compose["networks"], f"{name}: network {network}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name}: depends on {dependency}"
    assert services["coordinator"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]


_PORT = re.compile(r"^(?:(?P<ip>[\d.]+):)?(?P<host>\d+):(?P<container>\d+)$")


def published(compose: dict[str, Any]) -> dict[str, list[tuple[str, int, int]]]:
    result: dict[str, list[tuple[str, int, int]]] = {}
    for name, service in compose["services"].items():
        for entry in service.get("ports", []):
            found = _PORT.match(entry)
            assert found is not None, f"{name}: port {entry!r} is not IP:HOST:CONTAINER"
            result.setdefault(name, []).append(
                (found["ip"] or "0.0.0.0", int(found["host"]), int(found["container"]))
            )
    return result


def test_published_ports_and_the_superlink_stays_on_the_host(compose: dict[str, Any]) -> None:
    ports = published(compose)
    assert ports == {
        "mosquitto": [("0.0.0.0", 8883, 8883)],
        "coordinator": [("0.0.0.0", 8080, 8080)],
        "superlink": [("127.0.0.1", 9091, 9091)],
        "fleet-proxy": [("0.0.0.0", 9092, 9092)],
    }
    host_ports = [p for entries in ports.values() for _, p, _ in entries]
    assert len(host_ports) == len(set(host_ports))
    # The database is on an internal network only the coordinator joins.
    assert compose["networks"]["backend"]["internal"] is True
    members = [n for n, s in compose["services"].items() if "backend" in s.get("networks", [])]
    assert sorted(members) == ["coordinator", "postgres"]


def test_the_coordinator_uses_the_broker_over_mtls_and_postgresql(compose: dict[str, Any]) -> None:
    env = compose["services"]["coordinator"]["environment"]
    assert env["NANOFLEET_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:" in env["NANOFLEET_DATABASE_URL"]
    assert env["NANOFLEET_MQTT__HOST"] == "mosquitto"
    for key in ("CA_FILE", "CERT_FILE", "KEY_FILE"):
        assert env[f"NANOFLEET_MQTT__{key}"].startswith("/run/secrets/")
    assert compose["services"]["coordinator"]["command"] == ["nanofleet", "serve"]
    superlink = compose["services"]["superlink"]["command"]
    assert "--enable-supernode-auth" in superlink
    assert "--disable-runtime-dependency-installation" in superlink


def test_the_mounted_broker_files_are_what_the_coordinator_renders(
    compose: dict[str, Any],
) -> None:
    targets = {t: s for n, s, t in bind_mounts(compose) if n == "mosquitto"}
    conf_dir = Path("/mosquitto/config")
    files = BrokerFiles(
        ca_file=conf_dir / "ca.crt",
        cert_file=conf_dir / "broker.crt",
        key_file=conf_dir / "broker.key",
        crl_file=conf_dir / "crl.pem",
        acl_file=conf_dir / "acl",
        persistence_dir=Path("/mosquitto/data"),
        port=8883,
        bind_address="0.0.0.0",
    )
    for path in (files.ca_file, files.cert_file, files.key_file, files.crl_file, files.acl_file):
        assert str(path) in targets, f"{path} is not mounted into mosquitto"
    config_source = COMPOSE_DIR / targets["/mosquitto/config/mosquitto.conf"]
    expected = render_mosquitto_conf(TEMPLATE.read_text(), files)
    assert config_source.read_text() == expected, (
        "re-render deploy/compose/mosquitto/nanofleet.conf"
    )
    acl_source = COMPOSE_DIR / targets["/mosquitto/config/acl"]
    assert acl_source.read_text() == render_acl([])
    volumes = compose["services"]["mosquitto"]["volumes"]
    assert "mosquitto-data:/mosquitto/data" in volumes


_LOCATION = re.compile(r"location\s+(\S+)\s*\{(.*?)\}", re.S)


@pytest.mark.parametrize(
    ("conf", "upstream"),
    [
        (REPO / "deploy" / "nginx" / "nanofleet-superlink-fleet.conf", "https://127.0.0.1:9091"),
        (COMPOSE_DIR / "nginx" / "superlink-fleet.conf", "https://superlink:9091"),
    ],
    ids=["host", "compose"],
)
def test_the_fleet_proxy_forwards_the_fleet_api_and_nothing_else(conf: Path, upstream: str) -> None:
    text = "\n".join(line.split("#", 1)[0] for line in conf.read_text().splitlines())
    locations = dict(_LOCATION.findall(text))
    assert set(locations) == {"/v1/fleet/", "/"}
    assert f"proxy_pass {upstream};" in locations["/v1/fleet/"]
    assert "proxy_ssl_verify on;" in locations["/v1/fleet/"]
    assert "proxy_pass" not in locations["/"]
    assert "return 404;" in locations["/"]
    assert text.count("proxy_pass") == 1
    assert "listen 9092 ssl;" in text
