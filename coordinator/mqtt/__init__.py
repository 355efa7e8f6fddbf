"""The coordinator's MQTT side; the only coordinator package that imports paho-mqtt.

- :mod:`.link`: one MQTT 5 connection with a persistent session, jittered reconnects and a
  round-trip probe (:class:`MqttLink`).
- :mod:`.ingest`: device reports from the broker to the registry through a bounded queue
  and a batching writer (:class:`Ingestor`), optionally as shared subscriptions.
- :mod:`.announce`: retained release announcements (:class:`Announcer`).

See ``docs/coordinator.md``.
"""

from coordinator.mqtt.announce import Announcer, make_announcement
from coordinator.mqtt.ingest import (
    IngestOptions,
    Ingestor,
    IngestStats,
    Malformed,
    Sink,
    decode_device_message,
    device_filters,
)
from coordinator.mqtt.link import (
    BrokerOptions,
    LinkStats,
    MqttLink,
    TlsFiles,
    certificate_identity,
    reconnect_delay,
)

__all__ = [
    "Announcer",
    "BrokerOptions",
    "IngestOptions",
    "IngestStats",
    "Ingestor",
    "LinkStats",
    "Malformed",
    "MqttLink",
    "Sink",
    "TlsFiles",
    "certificate_identity",
    "decode_device_message",
    "device_filters",
    "make_announcement",
    "reconnect_delay",
]
