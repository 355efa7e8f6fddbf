"""Release announcements: a retained hint per group channel that the channel moved on.

An announcement carries no trust (see :class:`protocol.messages.ReleaseAnnouncement`): it
names the repository URL and the timestamp version to expect, and a device that reads it
refreshes its TUF metadata. It is published retained at QoS 1, so a device that connects
or subscribes later gets the newest one at once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import ValidationError

from coordinator.errors import RefusedError
from coordinator.mqtt.link import MqttLink
from protocol import topics
from protocol.messages import ReleaseAnnouncement

__all__ = ["Announcer", "make_announcement"]


def make_announcement(
    group: str,
    channel: str,
    *,
    repository_url: str,
    timestamp_version: int,
    published_at: datetime,
) -> ReleaseAnnouncement:
    """Build an announcement.

    Raises:
        RefusedError: a group or channel that is not a topic segment, a repository URL that
            is not plain http(s), or a timestamp version below 1.
    """
    try:
        return ReleaseAnnouncement(
            group=group,
            channel=channel,
            repository_url=repository_url,
            timestamp_version=timestamp_version,
            published_at=published_at,
        )
    except ValidationError as e:
        raise RefusedError(f"announcement for {group}/{channel}: {e}") from e


class Announcer:
    """Publishes announcements over an :class:`MqttLink` (the coordinator's identity)."""

    def __init__(
        self, link: MqttLink, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._link = link
        self._clock = clock

    def announce(
        self,
        group: str,
        channel: str,
        *,
        repository_url: str,
        timestamp_version: int,
        timeout_s: float = 10.0,
    ) -> ReleaseAnnouncement:
        """Publish the retained announcement of ``group``'s ``channel``; return it.

        Raises:
            RefusedError: an invalid announcement, or the broker refused it.
            TransientError: the broker could not be reached or did not acknowledge in time.
        """
        message = make_announcement(
            group,
            channel,
            repository_url=repository_url,
            timestamp_version=timestamp_version,
            published_at=self._clock(),
        )
        topic = topics.release_announcements(message.group, message.channel)
        self._link.publish(
            topic, message.model_dump_json().encode(), retain=True, timeout_s=timeout_s
        )
        return message
