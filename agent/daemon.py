"""``nanofleet-agent run``: load the settings and the model, serve, drain on SIGTERM.

Invariants:

- The exit status is always one of :class:`protocol.exitcodes.ExitCode`: a bad setting is
  ``CONFIG`` (the message names the key), a bad model ``MODEL_INVALID``, a socket that
  cannot be bound ``UNAVAILABLE``, a SIGTERM followed by a drain ``SUCCESS``.
- ``READY=1`` goes to systemd only after the model answered a one-token smoke generation
  and the sockets listen. ``WATCHDOG=1`` is sent from the event loop at half of
  ``WATCHDOG_USEC``, and only while no generation has gone without progress for longer than
  ``scheduler.engine_stall_max_s``: a hung engine stops the pings, and systemd restarts it.
- A notification never blocks the event loop for long: a watchdog ping that finds the
  manager's queue full is dropped (the queue already holds unread pings), and a state change
  waits at most :data:`NOTIFY_TIMEOUT_S`. A manager that stops reading must not freeze the
  server or its drain.
- On SIGTERM: ``STOPPING=1``, no new connections or requests, admitted requests finish
  within ``server.drain_timeout_s`` (then they are cancelled), exit 0.
- Logs are JSON lines on stdout (journald keeps them), one object per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from agent import sdnotify
from agent.config import AgentSettings, load_settings
from agent.errors import ConfigError, ModelError
from agent.server.app import ServerState, create_app
from agent.server.holder import ModelHolder
from agent.server.listeners import PeerAwareProtocol, bind_tcp, bind_unix, resolve_group
from agent.server.runner import Scheduler
from agent.server.scheduling import SchedulerCore
from protocol.exitcodes import ExitCode

if TYPE_CHECKING:
    from agent.federated.capture import TurnCapture

log = logging.getLogger("nanofleet.agent")

#: A bearer token shorter than this is refused.
TOKEN_MIN_CHARS = 32
#: A token file larger than this is refused.
TOKEN_FILE_MAX_BYTES = 4096
#: The prompt of the smoke generation that gates READY=1.
SMOKE_PROMPT = "Hello"
#: How long a state notification (READY=1, STOPPING=1) may wait for room in the service
#: manager's queue, blocking the event loop meanwhile.
NOTIFY_TIMEOUT_S = 2.0

#: LogRecord attributes that are not ``extra`` fields (uvicorn's color_message is noise).
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stdout as a JSON line."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def read_token(path: Path) -> str:
    """Read the TCP bearer token from ``path``.

    Raises:
        ConfigError: unreadable, readable by others, too large, or shorter than
            :data:`TOKEN_MIN_CHARS` (the message names ``server.tcp_token_file``).
    """
    key = "server.tcp_token_file"
    try:
        info = path.stat()
        if info.st_mode & stat.S_IROTH:
            raise ConfigError(f"{key}: {path} is readable by others; chmod o-r it")
        if info.st_size > TOKEN_FILE_MAX_BYTES:
            raise ConfigError(f"{key}: {path} is over {TOKEN_FILE_MAX_BYTES} bytes")
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from e
    if len(token) < TOKEN_MIN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"{key}: the token must be at least {TOKEN_MIN_CHARS} characters without "
            f"spaces (got {len(token)})"
        )
    return token


def load_engine(settings: AgentSettings) -> Any:
    """Load the model to serve and check it answers one token: the committed update slot
    when signed updates are on and one was committed, else ``model.dir``.

    Raises:
        ModelError: the model directory is refused or the smoke generation fails.
    """
    from agent.runtime import SamplingParams
    from agent.runtime.served import load_served

    base_dir, adapter_dir = settings.model.dir, None
    if settings.ota is not None:
        from agent.ota.service import committed_dirs

        committed = committed_dirs(settings.ota.state_dir)
        if committed is not None:
            base_dir, adapter_dir = committed
    engine = load_served(
        base_dir, adapter_dir, threads=settings.model.threads, verify=settings.model.verify
    )
    try:
        generation = engine.generate(
            engine.encode(SMOKE_PROMPT), SamplingParams(max_tokens=1, temperature=0.0)
        )
        for _ in generation:
            pass
    except Exception as e:
        raise ModelError(f"model.dir: the model failed its smoke generation: {e}") from e
    if generation.completion_tokens < 1 and generation.finish_reason is None:
        raise ModelError("model.dir: the model produced nothing in its smoke generation")
    return engine


class _Server(uvicorn.Server):
    """uvicorn's server without its signal capture (the daemon owns SIGTERM)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


def run(config_path: Path | None) -> int:
    """Run the agent until SIGTERM; return the exit status (an :class:`ExitCode`)."""
    configure_logging()
    try:
        settings = load_settings(config_path)
        configure_logging(settings.log.level)
        gid = (
            resolve_group(settings.server.socket_group)
            if settings.server.socket_group is not None
            else None
        )
        token = (
            read_token(settings.server.tcp_token_file)
            if settings.server.tcp_token_file is not None
            else None
        )
        if settings.ota is not None:
            from agent.ota.service import read_root

            read_root(settings.ota.root_file)
        if settings.mqtt is not None and settings.mqtt.tls:
            from agent.mqtt.link import tls_context

            tls_context(settings.mqtt)
    except ConfigError as e:
        log.error(str(e), extra={"event": "config_error", "exit": int(ExitCode.CONFIG)})
        print(f"nanofleet-agent: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    started = time.monotonic()
    try:
        engine = load_engine(settings)
    except ModelError as e:
        log.error(str(e), extra={"event": "model_error", "exit": int(ExitCode.MODEL_INVALID)})
        print(f"nanofleet-agent: {e}", file=sys.stderr)
        return ExitCode.MODEL_INVALID
    log.info(
        "model loaded",
        extra={
            "event": "model_loaded",
            "model": engine.manifest.name,
            "version": engine.manifest.version,
            "bundle_hash": engine.bundle_hash,
            "load_s": round(time.monotonic() - started, 3),
        },
    )
    try:
        sockets = _bind(settings, gid)
    except OSError as e:
        log.error(
            f"cannot listen: {e}",
            extra={"event": "bind_error", "exit": int(ExitCode.UNAVAILABLE)},
        )
        print(f"nanofleet-agent: cannot listen: {e}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    try:
        asyncio.run(_serve(settings, engine, token, sockets))
    finally:
        for sock in sockets:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            settings.server.socket_path.unlink()
    log.info("stopped", extra={"event": "stopped", "exit": 0})
    return ExitCode.SUCCESS


def _bind(settings: AgentSettings, gid: int | None) -> list[socket.socket]:
    server = settings.server
    server.socket_path.parent.mkdir(parents=True, exist_ok=True)
    sockets = [bind_unix(server.socket_path, gid)]
    if server.tcp_host is not None and server.tcp_port is not None:
        try:
            sockets.append(bind_tcp(server.tcp_host, server.tcp_port))
        except OSError:
            sockets[0].close()
            raise
    return sockets


async def _serve(
    settings: AgentSettings, engine: Any, token: str | None, sockets: list[socket.socket]
) -> None:
    sched = settings.server.scheduler
    scheduler = Scheduler(
        SchedulerCore(
            concurrency=sched.concurrency,
            queue_length_max=sched.queue_length_max,
            retry_after_s=sched.retry_after_s,
        ),
        deadline_s=sched.request_deadline_s,
        on_busy=_serving_marker(settings),
    )
    capture = _turn_capture(settings)
    state = ServerState(
        holder=ModelHolder(engine),
        scheduler=scheduler,
        limits=settings.server.limits,
        tcp_token=token,
        on_chat_turn=capture,
    )
    app = create_app(state)
    link = _device_link(settings, state.holder, engine)
    updates = _update_service(settings, state.holder, link)
    config = uvicorn.Config(
        app,
        http=PeerAwareProtocol,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.server.drain_timeout_s) or 1,
        server_header=False,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
        log.info("SIGTERM: draining", extra={"event": "draining"})
        scheduler.close_admission()
        server.should_exit = True
        _notify_state("STOPPING=1")

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, on_sigterm)
    serving = asyncio.create_task(server.serve(sockets=sockets))
    listening = asyncio.create_task(server.listening.wait())
    await asyncio.wait({serving, listening}, return_when=asyncio.FIRST_COMPLETED)
    if listening.done():
        state.ready.set()
        _notify_state("READY=1")
        log.info(
            "serving",
            extra={
                "event": "ready",
                "socket": str(settings.server.socket_path),
                "tcp": f"{settings.server.tcp_host}:{settings.server.tcp_port}"
                if settings.server.tcp_host
                else None,
            },
        )
    else:
        listening.cancel()
    watchdog = asyncio.create_task(_watchdog(scheduler, sched.engine_stall_max_s))
    hints = None
    if listening.done():
        if updates is not None:
            updates.start()
        if link is not None:
            link.start()
            hints = _HintDispatcher(link, updates)
            hints.start()
    try:
        await serving
    finally:
        watchdog.cancel()
        if hints is not None:
            await asyncio.to_thread(hints.stop)
        if updates is not None:
            await asyncio.to_thread(updates.stop)
        if link is not None:
            await asyncio.to_thread(link.stop)
        state.ready.clear()
        await asyncio.to_thread(scheduler.shutdown)
        if capture is not None:
            await asyncio.to_thread(capture.close)


def _notify_state(state: str) -> None:
    """Tell the service manager ``state``; a failure is logged, the daemon goes on."""
    try:
        sdnotify.notify(state, timeout_s=NOTIFY_TIMEOUT_S)
    except OSError as e:
        log.error(
            f"cannot notify the service manager of {state}: {e}",
            extra={"event": "notify_error", "state": state},
        )


def _turn_capture(settings: AgentSettings) -> TurnCapture | None:
    """With ``federated.store.capture_enabled``: stores the user's side of each chat turn
    the agent answers in the local training store (never sent anywhere)."""
    fed = settings.federated
    if fed is None or not fed.store.capture_enabled:
        return None
    from agent.federated.capture import TurnCapture

    log.info(
        "capturing chat turns into the local training store",
        extra={"event": "capture_on", "store": str(fed.data_path)},
    )
    return TurnCapture(fed.data_path, fed.store)


def _serving_marker(settings: AgentSettings) -> Callable[[bool], None] | None:
    """With ``federated.serving_marker``: a file that exists while a request is in flight.

    On-device training pauses while it exists (and eligibility counts idle time from its
    last removal), so serving always wins over a round. A marker a crash left is removed
    at start.
    """
    if settings.federated is None or settings.federated.serving_marker is None:
        return None
    marker = settings.federated.serving_marker
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()

    def busy(serving: bool) -> None:
        try:
            if serving:
                marker.touch()
            else:
                marker.unlink(missing_ok=True)
        except OSError as e:
            log.warning(
                f"cannot {'create' if serving else 'remove'} the serving marker {marker}: {e}",
                extra={"event": "serving_marker_error"},
            )

    return busy


def _update_service(settings: AgentSettings, holder: ModelHolder[Any], link: Any) -> Any:
    """The signed-update service when ``[ota]`` is configured (started once serving).

    Every progress message is logged and, with ``[mqtt]``, published; an update that ends
    (committed, rolled back, failed) also makes the link publish a fresh status.
    """
    if settings.ota is None:
        return None
    from agent.ota.live import LiveActivator
    from agent.ota.service import UpdateService
    from protocol.messages import UpdateState

    activator = LiveActivator(
        holder,
        socket_path=settings.server.socket_path,
        policy=settings.ota.health,
        threads=settings.model.threads,
    )
    endings = {UpdateState.COMMITTED, UpdateState.ROLLED_BACK, UpdateState.FAILED}

    def report(progress: Any) -> None:
        _log_progress(progress)
        if link is not None:
            link.publish_progress(progress)
            if progress.state in endings:
                link.status_changed()
            if progress.state is UpdateState.COMMITTED:
                _evaluate_committed(settings, link)

    device_id = settings.mqtt.device_id if settings.mqtt is not None else None
    return UpdateService(settings.ota, activator, report, device_id=device_id)


def _evaluate_committed(settings: AgentSettings, link: Any) -> None:
    """A committed adapter release is measured on the device's held-out text (with
    ``[federated]``), in the background, and the result is sent to the coordinator."""
    if settings.ota is None or settings.federated is None:
        return
    from agent.ota.evaluation import evaluate_in_background
    from agent.ota.slots import SlotManager

    slots = SlotManager(settings.ota.state_dir / "slots")
    current = slots.current()
    if current is None or current.adapter is None:
        return
    evaluate_in_background(
        current.adapter,
        slots.base_dir(current.slot),
        slots.adapter_dir(current.slot),
        settings.federated.data_path,
        link.publish_evaluation,
    )


def _log_progress(progress: Any) -> None:
    log.info(
        "update progress",
        extra={"event": "update_progress", "progress": progress.model_dump(mode="json")},
    )


def _device_link(settings: AgentSettings, holder: ModelHolder[Any], factory: Any) -> Any:
    """The MQTT link when ``[mqtt]`` is configured (started once serving).

    Raises:
        ConfigError: the TLS files cannot be loaded or the certificate is not the device's.
    """
    if settings.mqtt is None:
        return None
    from agent.mqtt import DeviceLink

    return DeviceLink(settings.mqtt, _StatusSource(settings, holder, factory))


class _StatusSource:
    """The device's state for the MQTT link (called from the link's worker thread).

    The base, adapter and slot reported are those of the committed update slot, which is
    what a restart would serve; before any update they are the model ``model.dir`` loaded
    at start, reported as slot B (the first update stages into slot A).
    """

    def __init__(self, settings: AgentSettings, holder: ModelHolder[Any], factory: Any) -> None:
        from protocol.messages import BundleRef

        self._settings = settings
        self._holder = holder
        self._started = time.monotonic()
        self._factory = BundleRef(
            name=factory.manifest.name, version=factory.manifest.version, sha256=factory.bundle_hash
        )
        ota = settings.ota
        self._disk_path = ota.state_dir if ota is not None else settings.server.socket_path.parent

    def __call__(self) -> Any:
        import os
        import shutil

        from agent import __version__
        from agent.mqtt import DeviceState
        from protocol.messages import Health, Slot

        committed = None
        if self._settings.ota is not None:
            from agent.ota.slots import SlotManager

            committed = SlotManager(self._settings.ota.state_dir / "slots").current()
        try:
            free = shutil.disk_usage(self._disk_path).free
        except OSError:
            free = 0
        return DeviceState(
            agent_version=__version__,
            health=Health.HEALTHY,
            base=committed.base if committed else self._factory,
            adapter=committed.adapter if committed else None,
            slot=committed.slot if committed else Slot.B,
            uptime_s=int(time.monotonic() - self._started),
            load_1m=min(os.getloadavg()[0], 10000.0),
            free_disk_bytes=free,
        )


class _HintDispatcher:
    """Takes the link's events off its queue (a thread of its own, never paho's) and
    hands release announcements to the update service as hints."""

    def __init__(self, link: Any, updates: Any) -> None:
        self._link = link
        self._updates = updates
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nanofleet-hints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        from agent.mqtt import AnnouncementReceived

        while not self._stop.is_set():
            event = self._link.events.get(timeout_s=0.5)
            if event is None:
                continue
            if isinstance(event, AnnouncementReceived):
                log.info(
                    "release announced",
                    extra={
                        "event": "announcement",
                        "group": event.announcement.group,
                        "channel": event.announcement.channel,
                        "timestamp_version": event.announcement.timestamp_version,
                        "retained": event.retained,
                    },
                )
                if self._updates is not None:
                    self._updates.announce(event.announcement)
            else:
                log.info("round invitation received (not handled here)")


async def _watchdog(scheduler: Scheduler, stall_max_s: float) -> None:
    interval = sdnotify.watchdog_interval_s()
    if interval is None:
        return
    stall_warned = dropped = False
    while True:
        stalled = scheduler.stalled_s(time.monotonic())
        if stalled <= stall_max_s:
            stall_warned = False
            try:
                sdnotify.notify("WATCHDOG=1", timeout_s=0)
            except BlockingIOError:
                if not dropped:
                    log.warning(
                        "the service manager's queue is full; dropping watchdog pings",
                        extra={"event": "watchdog_dropped"},
                    )
                dropped = True
            else:
                dropped = False
        elif not stall_warned:
            log.error(
                "the engine made no progress; withholding the watchdog ping",
                extra={"event": "engine_stalled", "stalled_s": round(stalled, 1)},
            )
            stall_warned = True
        await asyncio.sleep(interval)
