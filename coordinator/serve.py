"""`nanofleet serve`: the coordinator daemon.

One process holds: the registry (SQLite or PostgreSQL), the HTTP app (the operator API
under ``/api/v1`` with its OpenAPI document at ``/api/v1/openapi.json``, the dashboard
under ``/ui``, the TUF repository under ``/repo``, ``/healthz``, ``/metrics``), and, when
``[mqtt]`` is configured, the MQTT ingestion of device reports and per-device release
announcements. A background thread steps every active rollout with the pure policy every
``rollout_interval_s`` and sweeps device liveness (only while the broker link can tell).

Exit codes (:mod:`protocol.exitcodes`): 0 after SIGTERM/SIGINT; ``CONFIG`` (78) for a bad
configuration (the message names the key); ``UNAVAILABLE`` (69) when the database cannot
be reached or the port cannot be bound.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import OperationalError

from coordinator.errors import ConfigError, RefusedError, SigningKeyError
from coordinator.mqtt import BrokerOptions, IngestOptions, Ingestor, TlsFiles
from coordinator.registry import LinkState, LivenessRule, Registry, open_registry
from coordinator.registry.api import utc_now
from coordinator.registry.errors import ConflictError
from coordinator.registry.views import ReleaseView
from coordinator.repository import KeyRing, Repository, env_passphrases
from coordinator.rollout.policy import RolloutState
from coordinator.rollout.publisher import (
    LogPublisher,
    MqttPublisher,
    PointerPublisher,
    repository_timestamp_version,
)
from coordinator.rollout.runner import Publisher, RolloutRunner
from coordinator.settings import CoordinatorSettings, MqttSettings, load_settings
from coordinator.web.api import API_PREFIX, api_router
from coordinator.web.app import Health, WebContext, create_app
from coordinator.web.dashboard import dashboard_router
from protocol.bundle import BundleManifest, bundle_hash
from protocol.exitcodes import ExitCode

__all__ = ["REFRESH_EVERY_S", "Coordinator", "serve_command"]

#: How often the daemon looks for online metadata past half its lifetime (timestamp: 1 day).
REFRESH_EVERY_S = 600.0

log = logging.getLogger("nanofleet.coordinator.serve")


def broker_options(mqtt: MqttSettings) -> BrokerOptions:
    """The MQTT link options of ``[mqtt]``. Raises ConfigError."""
    tls = None
    if mqtt.ca_file and mqtt.cert_file and mqtt.key_file:
        tls = TlsFiles(mqtt.ca_file, mqtt.cert_file, mqtt.key_file)
    return BrokerOptions(host=mqtt.host, port=mqtt.port, tls=tls)


class _FleetCollector(Collector):
    """Prometheus figures read from the registry and the ingestor at scrape time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator

    def collect(self) -> Iterator[Any]:
        devices = GaugeMetricFamily(
            "nanofleet_devices", "Registered devices by online state", labels=["state"]
        )
        for state, n in self._c.registry.count_devices().items():
            devices.add_metric([state.value], n)
        yield devices
        rollouts = GaugeMetricFamily(
            "nanofleet_rollouts_active", "Rollouts that are running or paused"
        )
        rollouts.add_metric([], len(self._c.registry.active_rollouts()))
        yield rollouts
        if self._c.ingestor is not None:
            stats = self._c.ingestor.stats()
            received = CounterMetricFamily(
                "nanofleet_ingest_messages", "Device messages received over MQTT"
            )
            received.add_metric([], stats.received)
            yield received
            results = CounterMetricFamily(
                "nanofleet_ingest_results", "Written device messages by result", labels=["result"]
            )
            for result, n in stats.results.items():
                results.add_metric([result], n)
            yield results
            malformed = CounterMetricFamily(
                "nanofleet_ingest_malformed",
                "Device messages dropped as malformed",
                labels=["reason"],
            )
            for reason, n in stats.malformed.items():
                malformed.add_metric([reason], n)
            yield malformed
            queue = GaugeMetricFamily("nanofleet_ingest_queue", "Messages waiting to be written")
            queue.add_metric([], stats.queue_length)
            yield queue


def _signing_repository(settings: CoordinatorSettings) -> Repository | None:
    """The served repository with the online keys (None without ``keys``)."""
    if settings.keys is None:
        log.warning(
            "no keys directory: rollout waves are announced but devices install what their "
            "group pointer names, and the repository's online metadata is not re-signed",
            extra={"event": "rollout_unsigned"},
        )
        return None
    return Repository(settings.repository_path, KeyRing([settings.keys], env_passphrases()))


def _wave_publisher(
    settings: CoordinatorSettings, ingestor: Ingestor | None, repository: Repository | None
) -> Publisher:
    """Sign each wave's device pointers (with ``keys``), then announce (with a broker)."""
    announce: Publisher = (
        MqttPublisher(
            ingestor.link,
            channel=settings.channel,
            repository_url=settings.repository_url,
            timestamp_version=lambda: repository_timestamp_version(settings.repository_path),
        )
        if ingestor is not None
        else LogPublisher()
    )
    if repository is None:
        return announce
    return PointerPublisher(repository, announce, channel=settings.channel)


class _RepositoryReleases:
    """The releases of the served repository (with ``keys``, rollouts point devices there)."""

    def __init__(self, path: Path) -> None:
        self._repository = Repository(path)
        self._path = path

    def manifest(self, name: str, version: str) -> BundleManifest | None:
        published = self._repository.find(name, version)
        return published.manifest if published is not None else None

    def check(self, release: ReleaseView) -> None:
        published = self._repository.find(release.name, release.version)
        if published is None:
            raise ConflictError(
                f"release {release.name} {release.version} is not in the repository "
                f"{self._path}; sign it with `nanofleet release add-bundle`"
            )
        if bundle_hash(published.manifest) != release.bundle_sha256:
            raise ConflictError(
                f"release {release.name} {release.version} in the repository is not the "
                "registered bundle (their bundle hashes differ)"
            )


class Coordinator:
    """Everything `nanofleet serve` runs, built from settings; :meth:`start` the loops."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        clock: Callable[[], datetime] = utc_now,
        publisher: Publisher | None = None,
    ) -> None:
        self.settings = settings
        token = settings.token()
        self.registry: Registry = open_registry(settings.database_url, clock=clock)
        self.ingestor: Ingestor | None = None
        if settings.mqtt is not None:
            options = IngestOptions(
                queue_max=settings.mqtt.queue_max,
                batch_max=settings.mqtt.batch_max,
                shared_group=settings.mqtt.shared_group,
            )
            self.ingestor = Ingestor(broker_options(settings.mqtt), self.registry.ingest, options)
        self.repository = _signing_repository(settings)
        if publisher is None:
            publisher = _wave_publisher(settings, self.ingestor, self.repository)
        self._refreshed_at = -math.inf
        self.runner = RolloutRunner(self.registry, publisher)
        self.rule = LivenessRule(
            interval_s=settings.heartbeat_interval_s, missed=settings.missed_heartbeats
        )
        self.metrics = CollectorRegistry()
        self.metrics.register(_FleetCollector(self))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.app: FastAPI = create_app(
            WebContext(
                registry=self.registry,
                repository_path=settings.repository_path,
                metrics=self.metrics,
                health=self.health,
                routers=(
                    api_router(
                        self.registry,
                        token,
                        published=(
                            _RepositoryReleases(settings.repository_path)
                            if settings.keys is not None
                            else None
                        ),
                    ),
                    dashboard_router(self.registry, token),
                ),
                openapi_url=f"{API_PREFIX}/openapi.json",
            )
        )

    def health(self) -> Health:
        """``ok`` while the registry answers; ``degraded`` while the broker link is down."""
        try:
            counts = self.registry.count_devices()
        except OperationalError as e:
            return Health(False, {"status": "error", "registry": str(e.orig or e)[:200]})
        details: dict[str, Any] = {
            "status": "ok",
            "devices": sum(counts.values()),
            "api": API_PREFIX,
        }
        if self.ingestor is not None:
            connected = self.ingestor.link.connected_since is not None
            details["mqtt"] = "connected" if connected else "down"
            if not connected:
                details["status"] = "degraded"
        return Health(True, details)

    def step(self) -> None:
        """One pass of the background loop: advance rollouts, sweep liveness, and (every
        :data:`REFRESH_EVERY_S`) re-sign the repository's online metadata that is past half
        its lifetime, so devices never find it expired."""
        try:
            self.runner.advance_all()
        except Exception:
            log.exception("a rollout step failed; retrying next pass")
        self.refresh_repository()
        if self.ingestor is not None:
            link: LinkState = self.ingestor.link_state()
            try:
                changes = self.registry.sweep_liveness(link, self.rule)
            except OperationalError:
                log.exception("the liveness sweep failed; retrying next pass")
            else:
                if changes:
                    log.info("liveness: %d devices changed state", len(changes))

    def refresh_repository(self, *, now: float | None = None) -> list[str]:
        """Re-sign what is due (at most every :data:`REFRESH_EVERY_S`); the roles signed."""
        at = time.monotonic() if now is None else now
        if self.repository is None or at - self._refreshed_at < REFRESH_EVERY_S:
            return []
        self._refreshed_at = at
        try:
            signed = self.repository.refresh()
        except (RefusedError, SigningKeyError, OSError) as e:
            log.error(
                "cannot re-sign the repository's online metadata: %s",
                e,
                extra={"event": "repository_refresh_failed"},
            )
            return []
        if signed:
            log.info(
                "re-signed %s",
                ", ".join(signed),
                extra={"event": "repository_refreshed", "roles": signed},
            )
        return signed

    def start(self) -> None:
        """Connect to the broker (if configured) and start the background loop."""
        if self.ingestor is not None:
            self.ingestor.start()
        self._thread = threading.Thread(target=self._loop, name="rollout-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and the ingestion (writing what is queued)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.ingestor is not None:
            self.ingestor.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.settings.rollout_interval_s)

    def active_summary(self) -> dict[str, int]:
        """Rollouts by state (for the log line at start)."""
        out: dict[str, int] = {}
        for r in self.registry.list_rollouts(limit=1000):
            if r.state in (RolloutState.RUNNING, RolloutState.PAUSED):
                out[r.state.value] = out.get(r.state.value, 0) + 1
        return out


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen before announcing readiness, so a client that reads the ready line
    can connect at once (connections wait in the backlog until the server accepts).

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn, except that SIGTERM/SIGINT end a graceful shutdown with exit code 0 (uvicorn
    re-raises the signal after shutting down, which would end the process by the signal)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def run(settings: CoordinatorSettings) -> int:
    """Run the daemon until SIGTERM/SIGINT; return its exit code."""
    try:
        coordinator = Coordinator(settings)
    except ConfigError as e:
        typer.echo(f"nanofleet serve: {e}", err=True)
        return ExitCode.CONFIG
    except OperationalError as e:
        typer.echo(f"nanofleet serve: the registry database is unreachable: {e.orig}", err=True)
        return ExitCode.UNAVAILABLE
    try:
        sock = _listen(settings.host, settings.port)
    except OSError as e:
        typer.echo(
            f"nanofleet serve: cannot listen on {settings.host}:{settings.port}: {e.strerror}",
            err=True,
        )
        return ExitCode.UNAVAILABLE
    server = _Server(
        uvicorn.Config(
            coordinator.app,
            host=settings.host,
            port=settings.port,
            lifespan="off",
            ws="none",
            log_level="warning",
            access_log=False,
        )
    )
    coordinator.start()
    host, port = sock.getsockname()[:2]
    log.info("serving on %s:%d", host, port)
    typer.echo(f"nanofleet serve: listening on http://{host}:{port}", err=True)
    try:
        server.run(sockets=[sock])
    finally:
        coordinator.stop()
        sock.close()
    return ExitCode.SUCCESS if server.started else ExitCode.UNAVAILABLE


def serve_command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML settings file (NANOFLEET_ variables override)."),
    ] = None,
) -> None:
    """Run the coordinator: HTTP API, dashboard, repository, MQTT ingestion, rollouts."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    try:
        settings = load_settings(config)
    except ConfigError as e:
        typer.echo(f"nanofleet serve: {e}", err=True)
        raise typer.Exit(ExitCode.CONFIG) from e
    raise typer.Exit(run(settings))
