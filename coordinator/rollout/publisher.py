"""Publishers of the rollout runner: how a started wave's devices get the release.

- :class:`PointerPublisher`: signs each device's own pointer
  (``devices/{device_id}/{channel}``, :class:`protocol.release.DevicePointer`) at the
  release with the online channels key, then hands the wave on. This is what makes a wave
  real: a device follows its own pointer over its group's, so devices of waves not started
  (and devices outside the rollout) keep what their group pointer names, even when they
  poll the repository.
- :class:`MqttPublisher`: one :class:`~protocol.messages.ReleaseAnnouncement` per device on
  its own topic (:func:`protocol.topics.device_releases`), so the wave's devices check at
  once instead of at their next poll. An announcement is a hint: the device still verifies
  everything against its TUF root.
- :class:`LogPublisher`: records nothing on the wire (no broker configured); devices find the
  release when they poll their repository.

An announcement names the device id as its ``group`` and the rollout's channel; its
``timestamp_version`` is read from the served repository's ``timestamp.json`` at send time
(after the pointers moved, so the device's check finds them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from coordinator.errors import TransientError
from coordinator.mqtt.link import MqttLink
from coordinator.registry.views import ReleaseView
from coordinator.repository import Repository
from protocol import topics
from protocol.messages import ReleaseAnnouncement

__all__ = [
    "DEFAULT_CHANNEL",
    "LogPublisher",
    "MqttPublisher",
    "PointerPublisher",
    "WavePublisher",
    "repository_timestamp_version",
]

log = logging.getLogger("nanofleet.coordinator.rollout")

#: The release channel rollouts move unless configured otherwise (the agent's default too).
DEFAULT_CHANNEL: Final = "stable"
_MAX_TIMESTAMP_BYTES: Final = 64 * 1024
_CHUNK: Final = 1000  # announcements published before waiting for their PUBACKs


def repository_timestamp_version(repository_path: Path) -> int:
    """The version of ``metadata/timestamp.json`` under ``repository_path`` (1 if absent).

    Raises:
        TransientError: the file exists but cannot be read or parsed.
    """
    path = repository_path / "metadata" / "timestamp.json"
    if not path.is_file():
        return 1
    try:
        if path.stat().st_size > _MAX_TIMESTAMP_BYTES:
            raise TransientError(f"{path} is over {_MAX_TIMESTAMP_BYTES} bytes")
        version = json.loads(path.read_bytes())["signed"]["version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransientError(f"cannot read the timestamp version from {path}: {e}") from e
    if not isinstance(version, int) or version < 1:
        raise TransientError(f"{path} has no valid version")
    return version


class WavePublisher(Protocol):
    """What :class:`PointerPublisher` hands a wave to once the pointers moved."""

    def announce(self, device_ids: Sequence[str], release: ReleaseView) -> None: ...


class PointerPublisher:
    """Points each device of a wave at the release in the repository, then tells ``then``."""

    def __init__(
        self, repository: Repository, then: WavePublisher, *, channel: str = DEFAULT_CHANNEL
    ) -> None:
        self._repository = repository
        self._then = then
        self._channel = channel

    def announce(self, device_ids: Sequence[str], release: ReleaseView) -> None:
        """Sign the devices' pointers (one publish), then announce.

        Raises:
            RefusedError: the release is not published in the repository.
            SigningKeyError: the channels key is missing or locked.
            Exception: whatever ``then`` raised (the pointers are set; announcing again
                is harmless).
        """
        self._repository.point_devices(device_ids, self._channel, release.name, release.version)
        log.info(
            "pointed %d devices at %s %s",
            len(device_ids),
            release.name,
            release.version,
            extra={"event": "rollout_pointed", "release_id": release.id},
        )
        self._then.announce(device_ids, release)


class MqttPublisher:
    """Announces a release to each device of a wave over ``link`` (QoS 1, acknowledged)."""

    def __init__(
        self,
        link: MqttLink,
        *,
        channel: str = DEFAULT_CHANNEL,
        repository_url: str,
        timestamp_version: Callable[[], int],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        timeout_s: float = 10.0,
    ) -> None:
        self._link = link
        self._channel = channel
        self._url = repository_url
        self._timestamp_version = timestamp_version
        self._clock = clock
        self._timeout_s = timeout_s

    def announce(self, device_ids: Sequence[str], release: ReleaseView) -> None:
        """Publish one announcement per device.

        Raises:
            TransientError: the broker is away or did not acknowledge (the runner retries).
            RefusedError: the broker refused (the coordinator may not write device topics).
        """
        timestamp_version = self._timestamp_version()
        published_at = self._clock()
        messages = [
            (
                topics.device_releases(device_id),
                ReleaseAnnouncement(
                    group=device_id,
                    channel=self._channel,
                    repository_url=self._url,
                    timestamp_version=timestamp_version,
                    published_at=published_at,
                )
                .model_dump_json()
                .encode(),
            )
            for device_id in device_ids
        ]
        # Pipelined: one wait for a chunk's PUBACKs, not one per device.
        for start in range(0, len(messages), _CHUNK):
            self._link.publish_many(messages[start : start + _CHUNK], timeout_s=self._timeout_s)
        log.info(
            "announced %s %s to %d devices",
            release.name,
            release.version,
            len(device_ids),
            extra={"event": "rollout_announced", "release_id": release.id},
        )


class LogPublisher:
    """No broker: log the wave; devices learn of the release by polling their repository."""

    def announce(self, device_ids: Sequence[str], release: ReleaseView) -> None:
        """Log and return."""
        log.info(
            "wave of %d devices for %s %s (no broker configured: devices poll)",
            len(device_ids),
            release.name,
            release.version,
            extra={"event": "rollout_wave_unannounced", "release_id": release.id},
        )
