"""Publishers of the rollout runner: how a started wave's devices are told.

- :class:`MqttPublisher`: one :class:`~protocol.messages.ReleaseAnnouncement` per device on
  its own topic (:func:`protocol.topics.device_releases`), so exactly the wave's devices
  hear of the release; devices of later waves hear nothing. An announcement is a hint: the
  device still verifies everything against its TUF root.
- :class:`LogPublisher`: records nothing on the wire (no broker configured); devices find the
  release when they poll their repository.

The announcement's ``group`` is ``rollout`` and its ``channel`` the release kind; the
``timestamp_version`` is read from the served repository's ``timestamp.json`` at send time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from coordinator.errors import TransientError
from coordinator.mqtt.link import MqttLink
from coordinator.registry.views import ReleaseView
from protocol import topics
from protocol.messages import ReleaseAnnouncement

__all__ = ["ROLLOUT_GROUP", "LogPublisher", "MqttPublisher", "repository_timestamp_version"]

log = logging.getLogger("nanofleet.coordinator.rollout")

ROLLOUT_GROUP: Final = "rollout"
_MAX_TIMESTAMP_BYTES: Final = 64 * 1024


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


class MqttPublisher:
    """Announces a release to each device of a wave over ``link`` (QoS 1, acknowledged)."""

    def __init__(
        self,
        link: MqttLink,
        *,
        repository_url: str,
        timestamp_version: Callable[[], int],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        timeout_s: float = 10.0,
    ) -> None:
        self._link = link
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
        message = ReleaseAnnouncement(
            group=ROLLOUT_GROUP,
            channel=release.kind.value,
            repository_url=self._url,
            timestamp_version=self._timestamp_version(),
            published_at=self._clock(),
        )
        payload = message.model_dump_json().encode()
        for device_id in device_ids:
            self._link.publish(
                topics.device_releases(device_id), payload, timeout_s=self._timeout_s
            )
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
