"""The daemon's update service: one thread that runs the lifecycle on hints and on a timer.

Events come from two places: announcements (hints, from the MQTT link) and a periodic poll
(``ota.poll_interval_s``), so a device whose broker is away still learns of releases. They
queue (bounded; a full queue drops the hint, as the next poll finds the same release) and
are handled one at a time by :class:`~agent.ota.runner.UpdateRunner`, first resuming
whatever the last process left unfinished. The serving loop never waits on this thread.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

from agent.config import OtaSettings
from agent.errors import ConfigError
from agent.ota.client import RepositoryClient
from agent.ota.fetcher import FetchLimits, HttpFetcher
from agent.ota.lifecycle import Announce
from agent.ota.runner import (
    Activator,
    DeviceController,
    Outcome,
    RecordStore,
    UpdateRunner,
    jittered_backoff,
)
from agent.ota.slots import SlotManager
from agent.ota.store import BlobStore
from protocol.messages import ReleaseAnnouncement, UpdateProgress

log = logging.getLogger("nanofleet.agent.ota")

#: A pinned root file larger than this is refused.
ROOT_FILE_MAX_BYTES = 512 * 1024
#: Hints waiting for the update thread; more are dropped (the next poll finds them).
HINT_QUEUE_MAX = 16


def committed_dirs(state_dir: Path) -> tuple[Path, Path | None] | None:
    """The base and adapter directories of the committed slot, or None (no update yet)."""
    slots = SlotManager(state_dir / "slots")
    current = slots.current()
    if current is None:
        return None
    adapter = slots.adapter_dir(current.slot) if current.adapter else None
    return slots.base_dir(current.slot), adapter


def read_root(path: Path) -> bytes:
    """The pinned root metadata. Raises ConfigError naming ``ota.root_file``."""
    try:
        size = path.stat().st_size
        if size > ROOT_FILE_MAX_BYTES:
            raise ConfigError(f"ota.root_file: {path} is over {ROOT_FILE_MAX_BYTES} bytes")
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"ota.root_file: cannot read {path}: {e.strerror}") from e


class UpdateService:
    """See the module docstring."""

    def __init__(
        self,
        settings: OtaSettings,
        activator: Activator,
        reporter: Callable[[UpdateProgress], None],
        *,
        device_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``device_id`` makes the device follow its own pointer when a rollout sets one."""
        self.settings = settings
        state = settings.state_dir
        url = settings.repository_url.rstrip("/")
        self.client = RepositoryClient(
            root=read_root(settings.root_file),
            metadata_dir=state / "tuf",
            metadata_url=f"{url}/metadata/",
            targets_url=f"{url}/targets/",
            fetcher=HttpFetcher(FetchLimits(min_rate_bytes_per_s=settings.min_rate_bytes_s)),
        )
        self.slots = SlotManager(state / "slots")
        self.controller = DeviceController(
            group=settings.group,
            channel=settings.channel,
            client=self.client,
            store=BlobStore(state / "blobs"),
            slots=self.slots,
            activator=activator,
            reporter=reporter,
            device_id=device_id,
        )
        self._rng = rng or random.SystemRandom()
        self._stop = threading.Event()
        self._hints: queue.Queue[ReleaseAnnouncement | None] = queue.Queue(HINT_QUEUE_MAX)
        self.runner = UpdateRunner(
            self.controller,
            RecordStore(state / "record.json"),
            backoff=lambda attempt: jittered_backoff(attempt, self._rng),
            wait=self._wait,
        )
        self._thread = threading.Thread(target=self._loop, name="nanofleet-ota", daemon=True)
        #: The outcome of the last run (for status reports and tests).
        self.last: Outcome | None = None

    def _wait(self, seconds: float) -> None:
        self._stop.wait(seconds)  # a stop request cuts a retry backoff short

    def start(self) -> None:
        self._thread.start()

    def announce(self, hint: ReleaseAnnouncement | None) -> None:
        """Queue a hint (None: check now). Never blocks; a full queue drops it."""
        try:
            self._hints.put_nowait(hint)
        except queue.Full:
            log.warning("update hint dropped: the queue is full", extra={"event": "hint_dropped"})

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the current step; waits up to ``timeout_s`` for the thread."""
        self._stop.set()
        self.announce(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        self._run(self.runner.resume)
        interval = self.settings.poll_interval_s or None
        first = True
        while not self._stop.is_set():
            if first:
                hint: ReleaseAnnouncement | None = None  # check once at start
                first = False
            else:
                try:
                    hint = self._hints.get(timeout=interval)
                except queue.Empty:
                    hint = None  # the periodic poll
            if self._stop.is_set():
                return
            self._run(partial(self.runner.handle, Announce(hint)))

    def _run(self, work: Callable[[], Outcome]) -> None:
        try:
            self.last = work()
        except Exception:  # a bug: log it and keep serving; the next event tries again
            log.exception("the update runner failed", extra={"event": "ota_bug"})
            return
        record = self.last.record
        extra = {"event": "ota_rest", "phase": record.phase.value}
        if self.last.error is not None:
            extra["error"] = str(self.last.error)
        log.info("update lifecycle at rest", extra=extra)
