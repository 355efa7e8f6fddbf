"""A small synchronous MQTT client for tests, on paho-mqtt 2 (callback API version 2).

Every call that waits (connect, subscribe, publish, expect) waits on a condition with a
deadline and raises ``TimeoutError`` naming what it waited for; nothing sleeps. Messages
are recorded in arrival order; network callbacks only record and notify.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Received:
    """One message as the subscriber saw it."""

    topic: str
    payload: bytes
    retain: bool
    qos: int


@dataclass(frozen=True)
class Will:
    """A Last Will: published by the broker when the client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class RecordingClient:
    """An MQTT 5 client that records what it receives; use as a context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        context: ssl.SSLContext | None = None,
        will: Will | None = None,
        keepalive: int = 10,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.keepalive = keepalive
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._connack: ReasonCode | None = None
        self._suback: dict[int, list[ReasonCode]] = {}
        self._puback: dict[int, ReasonCode] = {}
        self._disconnects: list[ReasonCode] = []
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if context is not None:
            self._client.tls_set_context(context)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    # -- paho callbacks (network thread): record and notify only ----------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connack = reason_code
            self._cond.notify_all()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._suback[mid] = list(reason_codes)
            self._cond.notify_all()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._puback[mid] = reason_code
            self._cond.notify_all()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._disconnects.append(reason_code)
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self._messages.append(Received(msg.topic, bytes(msg.payload), msg.retain, msg.qos))
            self._cond.notify_all()

    # -- waiting ----------------------------------------------------------------------

    def _wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.client_id}: no {what} within {timeout:g} s")
                self._cond.wait(remaining)

    # -- the API ----------------------------------------------------------------------

    def connect(self, timeout: float = DEFAULT_TIMEOUT_S) -> Self:
        """Connect and wait for the CONNACK. Raises ConnectionError if it is a refusal."""
        self._client.connect(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()
        self._wait(lambda: self._connack is not None, "CONNACK", timeout)
        assert self._connack is not None
        if self._connack.is_failure:
            raise ConnectionError(f"{self.client_id}: connection refused: {self._connack}")
        return self

    def subscribe(
        self, topic_filter: str, qos: int = 1, timeout: float = DEFAULT_TIMEOUT_S
    ) -> ReasonCode:
        """Subscribe and wait for the SUBACK; return its reason code (granted QoS or error)."""
        result, mid = self._client.subscribe(topic_filter, qos=qos)
        if result != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(
                f"{self.client_id}: subscribe failed: {paho.error_string(result)}"
            )
        assert mid is not None
        self._wait(lambda: mid in self._suback, f"SUBACK for {topic_filter}", timeout)
        return self._suback[mid][0]

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> ReasonCode | None:
        """Publish; at QoS 1 wait for the PUBACK and return its reason code (0x87: refused)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            why = paho.error_string(info.rc)
            raise ConnectionError(f"{self.client_id}: publish failed: {why}")
        if qos == 0:
            return None
        self._wait(lambda: info.mid in self._puback, f"PUBACK for {topic}", timeout)
        return self._puback[info.mid]

    def expect(
        self,
        topic: str,
        payload: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> Received:
        """Wait until a message on ``topic`` (with ``payload``, if given) has arrived."""

        def find() -> Received | None:
            for m in self._messages:
                if m.topic == topic and (payload is None or m.payload == payload):
                    return m
            return None

        self._wait(lambda: find() is not None, f"message on {topic} ({payload!r})", timeout)
        found = find()
        assert found is not None
        return found

    @property
    def messages(self) -> list[Received]:
        """Every message received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    @property
    def disconnects(self) -> list[ReasonCode]:
        """Why each connection so far ended (paho reconnects on its own after one)."""
        with self._cond:
            return list(self._disconnects)

    def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
