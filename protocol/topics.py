"""MQTT topic names: the only place they are spelled out.

Layout (``{...}`` are single topic levels)::

    nanofleet/v1/devices/{device_id}/status       DeviceStatus, retained; also the Last Will
    nanofleet/v1/devices/{device_id}/heartbeat    Heartbeat, not retained
    nanofleet/v1/devices/{device_id}/progress     UpdateProgress, not retained
    nanofleet/v1/devices/{device_id}/evaluation   EvaluationReport, not retained
    nanofleet/v1/groups/{group}/releases/{channel}  ReleaseAnnouncement, retained
    nanofleet/v1/groups/{group}/rounds            RoundInvitation, retained
    nanofleet/v1/devices/{device_id}/releases     ReleaseAnnouncement to one device (a
                                                  rollout wave), not retained

Invariants:

- every variable segment passes :func:`check_segment`: 1..64 characters from
  ``[A-Za-z0-9._-]``, starting with a letter or digit; so it can never contain ``/``,
  ``+``, ``#``, NUL or whitespace, and can never change the shape of a topic or a filter;
- the ``device_id`` segment is exactly the device's certificate identity, which is also
  its MQTT username. Broker ACLs key on that username (``%u`` patterns), so a device may
  publish only under its own ``devices/{device_id}/`` and the coordinator learns who sent a
  message from the topic alone; payloads do not repeat the device id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

PREFIX: Final = "nanofleet/v1"
MAX_SEGMENT_LENGTH: Final = 64  # characters

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FORBIDDEN = {"/": "'/' (the level separator)", "+": "'+' (a wildcard)", "#": "'#' (a wildcard)"}


class TopicError(ValueError):
    """A topic segment or a topic is not valid; the message names the segment and the rule."""


class DeviceChannel(StrEnum):
    """What a device publishes under its own topic prefix."""

    STATUS = "status"
    HEARTBEAT = "heartbeat"
    PROGRESS = "progress"
    EVALUATION = "evaluation"


def check_segment(value: str, what: str) -> str:
    """Return ``value`` if it is a valid variable topic segment named ``what``.

    Raises:
        TopicError: empty, longer than 64 characters, containing ``/``, ``+``, ``#``, NUL or
            any character outside ``[A-Za-z0-9._-]``, or not starting with a letter or digit.
    """
    if not value:
        raise TopicError(f"{what} is empty")
    if len(value) > MAX_SEGMENT_LENGTH:
        raise TopicError(f"{what} is {len(value)} characters long, over the limit of 64")
    if "\x00" in value:
        raise TopicError(f"{what} contains NUL")
    for char, why in _FORBIDDEN.items():
        if char in value:
            raise TopicError(f"{what} {value!r} contains {why}")
    if not _SEGMENT.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} must be letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def device_topic(device_id: str, channel: DeviceChannel) -> str:
    """Return the topic a device publishes ``channel`` on. Raises TopicError (bad device_id)."""
    return f"{PREFIX}/devices/{check_segment(device_id, 'device_id')}/{channel.value}"


def device_status(device_id: str) -> str:
    """Return the retained status topic of ``device_id``. Raises TopicError."""
    return device_topic(device_id, DeviceChannel.STATUS)


def device_heartbeat(device_id: str) -> str:
    """Return the heartbeat topic of ``device_id``. Raises TopicError."""
    return device_topic(device_id, DeviceChannel.HEARTBEAT)


def update_progress(device_id: str) -> str:
    """Return the update-progress topic of ``device_id``. Raises TopicError."""
    return device_topic(device_id, DeviceChannel.PROGRESS)


def release_announcements(group: str, channel: str) -> str:
    """Return the retained release-announcement topic of a group's channel. Raises TopicError."""
    return (
        f"{PREFIX}/groups/{check_segment(group, 'group')}"
        f"/releases/{check_segment(channel, 'channel')}"
    )


def device_releases(device_id: str) -> str:
    """Return the topic a rollout wave's announcement reaches one device on (only devices of
    started waves are told; the device reads it under its own prefix). Raises TopicError."""
    return f"{PREFIX}/devices/{check_segment(device_id, 'device_id')}/releases"


def round_invitations(group: str) -> str:
    """Return the retained round-invitation topic of ``group``. Raises TopicError."""
    return f"{PREFIX}/groups/{check_segment(group, 'group')}/rounds"


def all_devices_filter(channel: DeviceChannel) -> str:
    """Return the coordinator's subscription filter for ``channel`` of every device."""
    return f"{PREFIX}/devices/+/{channel.value}"


#: What the coordinator subscribes to: every device's status, heartbeat and progress.
COORDINATOR_FILTERS: Final = tuple(all_devices_filter(c) for c in DeviceChannel)


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed device topic: who sent it and on which channel."""

    device_id: str
    channel: DeviceChannel


def parse_device_topic(topic: str) -> DeviceTopic:
    """Split a topic received on a device filter into the device id and the channel.

    Raises:
        TopicError: the topic is not ``nanofleet/v1/devices/{device_id}/{channel}`` with a
            valid device id and a known channel.
    """
    prefix = f"{PREFIX}/devices/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} does not start with {prefix!r}")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 2:
        raise TopicError(f"topic {topic!r} is not {prefix}{{device_id}}/{{channel}}")
    device_id, channel = parts
    try:
        kind = DeviceChannel(channel)
    except ValueError:
        known = ", ".join(c.value for c in DeviceChannel)
        raise TopicError(
            f"topic {topic!r} has unknown channel {channel!r} (known: {known})"
        ) from None
    return DeviceTopic(check_segment(device_id, "device_id"), kind)
