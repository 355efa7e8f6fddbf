"""The device's MQTT link: status, heartbeats and update progress out; announcements in.

- :mod:`agent.mqtt.link`: :class:`DeviceLink`, the only paho importer on the device;
- :mod:`agent.mqtt._inbound`: followed topics, received message -> typed event (pure);
- :mod:`agent.mqtt._policy`: reconnect backoff with per-device jitter, the worker's
  schedule (pure; time and randomness are arguments);
- :mod:`agent.mqtt._status`: the status and heartbeat messages (pure).

MQTT carries hints, never trust: an announcement only makes the update service refresh its
signed metadata.
"""

from agent.mqtt._inbound import AnnouncementReceived, InvitationReceived, LinkEvent
from agent.mqtt._status import DeviceState, StatusProvider
from agent.mqtt.link import DeviceLink, LinkStats

__all__ = [
    "AnnouncementReceived",
    "DeviceLink",
    "DeviceState",
    "InvitationReceived",
    "LinkEvent",
    "LinkStats",
    "StatusProvider",
]
