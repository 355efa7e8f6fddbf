"""Simulated devices over a real broker: one MQTT 5 client per device, speaking the wire
protocol (status, heartbeats, progress on its own topics; release hints on its own
``releases`` topic). A device installs only what it was told about: on an announcement it
reports ``downloading``, then ``committed`` or, if it is in ``failing``, ``failed``.

``evaluate`` (optional) gives a device's held-out metric (baseline, candidate) for the
release; the device publishes it as an :class:`~protocol.messages.EvaluationReport` on its
``evaluation`` topic before it reports ``committed``, as a real agent does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from protocol import topics
from protocol.messages import (
    BundleRef,
    DeviceStatus,
    EvaluationReport,
    Health,
    Heartbeat,
    ReleaseAnnouncement,
    UpdateProgress,
    UpdateState,
)

CONNECT_TIMEOUT_S = 20.0


@dataclass
class FleetScript:
    """What the simulated fleet does; read at announcement time."""

    release: BundleRef | None = None
    failing: set[str] = field(default_factory=set)
    evaluate: Callable[[str, BundleRef], tuple[float, float]] | None = None


class SimDevice:
    """One device: a paho client on its own topics."""

    def __init__(self, device_id: str, host: str, port: int, script: FleetScript) -> None:
        self.device_id = device_id
        self.script = script
        self.announcements: list[ReleaseAnnouncement] = []
        self._cond = threading.Condition()
        self._connected = False
        self._last_at: datetime | None = None
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv5
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.connect_async(host, port, keepalive=30)
        self._client.loop_start()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        client.subscribe(topics.device_releases(self.device_id), qos=1)
        with self._cond:
            self._connected = True
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        hint = ReleaseAnnouncement.model_validate_json(msg.payload)
        with self._cond:
            self.announcements.append(hint)
        target = self.script.release
        if target is None:
            return
        self._progress(UpdateState.FETCHING, None)
        if self.device_id in self.script.failing:
            self._progress(UpdateState.FAILED, target, "health_check_failed")
            return
        if self.script.evaluate is not None:
            baseline, candidate = self.script.evaluate(self.device_id, target)
            report = EvaluationReport(
                bundle=target, baseline=baseline, candidate=candidate, tokens=1000, at=self._tick()
            )
            topic = topics.device_topic(self.device_id, topics.DeviceChannel.EVALUATION)
            self.publish(topic, report.model_dump_json().encode())
        self._progress(UpdateState.COMMITTED, target)

    def _progress(
        self, state: UpdateState, target: BundleRef | None, error: str | None = None
    ) -> None:
        report = UpdateProgress(
            state=state,
            target=target,
            timestamp_version=1,
            bytes_done=100 if target else 0,
            bytes_total=100 if target else 0,
            error_code=error,
            at=self._tick(),
        )
        self.publish(topics.update_progress(self.device_id), report.model_dump_json().encode())

    def _tick(self) -> datetime:
        """A strictly increasing report time (reports not newer than the last are stale)."""
        now = datetime.now(UTC)
        with self._cond:
            if self._last_at is not None and now <= self._last_at:
                now = self._last_at + timedelta(microseconds=1)
            self._last_at = now
        return now

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain)

    def wait_connected(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._connected, timeout_s)

    def report_alive(self, base: BundleRef | None, health: Health = Health.HEALTHY) -> None:
        now = datetime.now(UTC)
        status = DeviceStatus(
            agent_version="0.1.0",
            health=health,
            base=base,
            adapter=None,
            slot="a" if base else None,
            uptime_s=60,
            load_1m=0.1,
            free_disk_bytes=10**9,
            reported_at=now,
        )
        self.publish(topics.device_status(self.device_id), status.model_dump_json().encode(), True)
        beat = Heartbeat(
            sent_at=now,
            health=health,
            base_sha256=base.sha256 if base else None,
            uptime_s=60,
            load_1m=0.1,
            free_disk_bytes=10**9,
        )
        self.publish(topics.device_heartbeat(self.device_id), beat.model_dump_json().encode())

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class SimFleet:
    """Many :class:`SimDevice`; use as a context manager."""

    def __init__(self, devices: Iterable[str], host: str, port: int, script: FleetScript) -> None:
        self.script = script
        self.devices = {d: SimDevice(d, host, port, script) for d in devices}

    def __enter__(self) -> SimFleet:
        for device in self.devices.values():
            if not device.wait_connected(CONNECT_TIMEOUT_S):
                self.close()
                raise TimeoutError(f"{device.device_id} did not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for device in self.devices.values():
            device.close()

    def announced(self) -> set[str]:
        """Devices that received at least one announcement."""
        return {d for d, sim in self.devices.items() if sim.announcements}
