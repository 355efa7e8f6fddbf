"""The nanofleet device agent: model runtime, local inference server, OTA client, MQTT link.

The agent never imports the coordinator; both sides share only :mod:`protocol`.
"""

__version__ = "0.1.0"
