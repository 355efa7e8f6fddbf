"""Fleet benchmark: many simulated devices against the real coordinator on a real broker.

Setup per backend (SQLite file, PostgreSQL 15 started on a free port): a mosquitto on
loopback (queue limits raised for the coordinator's session), `nanofleet serve` as its own
process with ``[mqtt]``, ``N`` devices registered in the registry, and ``N`` simulated
devices split over ``--procs`` processes. A device is one MQTT 3.1.1 connection of a
minimal asyncio client (raw packets, no library thread per device), publishing on its own
topics like an agent: a retained status on connect, QoS 1 heartbeats, and on a rollout
announcement (on its own ``releases`` topic) a ``committed`` progress report.

Phases of one run:

1. connect every device (each sends its retained status);
2. steady: every device sends a heartbeat every ``--heartbeat-s`` / ``--scale`` seconds
   (random phase) for ``--steady-s``; offered and ingested message rates are measured, and
   how long after the phase the last message is written (a backlog shows here);
3. capacity: every device sends ``--burst`` heartbeats back to back; the time until the
   coordinator has written them all gives its ingestion capacity (messages/s);
4. one rollout of a release to every device in waves 1 %, 10 %, 100 % with no soak: time
   from the API call to ``completed``.

Figures per run: offered rate at the real heartbeat interval (``N / heartbeat_s``), the
capacity, headroom = capacity / offered, the steady-phase ingested/offered ratio, the
coordinator's CPU (% of one core, from /proc) and peak RSS. Medians over ``--runs`` runs.
The last line of output is one JSON object.

Run: ``python benchmarks/fleet.py --devices 10000 --runs 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import re
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import httpx
from sqlalchemy import insert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.registry import open_registry  # noqa: E402
from coordinator.registry.liveness import Online  # noqa: E402
from coordinator.registry.models import Device, DeviceGroup  # noqa: E402
from protocol import topics  # noqa: E402
from protocol.bundle import bundle_hash  # noqa: E402
from tests.support.db_fixtures import make_manifest  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402
from tests.support.processes import ManagedProcess, free_port, log_contains  # noqa: E402

TOKEN = "fleet-benchmark-token-0123456789"
GROUP = "fleet"
CONNECT_CONCURRENCY = 200

# -- a minimal MQTT 3.1.1 client (only what a device needs) -------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    data = s.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str) -> bytes:
    return _packet(
        0x10, _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + _string(client_id)
    )


def publish_packet(topic: str, payload: bytes, packet_id: int, retain: bool = False) -> bytes:
    return _packet(
        0x32 | (1 if retain else 0), _string(topic) + struct.pack("!H", packet_id) + payload
    )


def subscribe_packet(topic: str, packet_id: int) -> bytes:
    return _packet(0x82, struct.pack("!H", packet_id) + _string(topic) + b"\x01")


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class SimDevice:
    def __init__(self, device_id: str, target: dict[str, str]) -> None:
        self.id = device_id
        self.target = target
        self.next_id = 0
        self.writer: asyncio.StreamWriter | None = None
        self.hb_topic = topics.device_heartbeat(device_id)
        self.sent = 0

    def pid(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    def heartbeat(self) -> bytes:
        payload = (
            '{"schema_version":1,"health":"healthy","base_sha256":null,"uptime_s":100,'
            f'"load_1m":0.1,"free_disk_bytes":1000000000,"sent_at":"{_now()}"}}'
        ).encode()
        self.sent += 1
        return publish_packet(self.hb_topic, payload, self.pid())

    def status(self) -> bytes:
        payload = (
            '{"schema_version":1,"agent_version":"0.1.0","health":"healthy","base":null,'
            '"adapter":null,"slot":null,"uptime_s":100,"load_1m":0.1,'
            f'"free_disk_bytes":1000000000,"reported_at":"{_now()}"}}'
        ).encode()
        return publish_packet(topics.device_status(self.id), payload, self.pid(), retain=True)

    def committed(self) -> bytes:
        payload = json.dumps(
            {
                "schema_version": 1,
                "state": "committed",
                "target": self.target,
                "timestamp_version": 1,
                "bytes_done": 100,
                "bytes_total": 100,
                "error_code": None,
                "error_message": None,
                "at": _now(),
            }
        ).encode()
        return publish_packet(topics.update_progress(self.id), payload, self.pid())

    async def run(self, host: str, port: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(connect_packet(self.id))
            first, _ = await read_packet(reader)
            if first >> 4 != 2:
                raise RuntimeError(f"{self.id}: no CONNACK")
            writer.write(subscribe_packet(topics.device_releases(self.id), self.pid()))
            writer.write(self.status())
            await writer.drain()
        self.writer = writer
        while True:
            first, body = await read_packet(reader)
            if first >> 4 == 3:  # an announcement
                (n,) = struct.unpack("!H", body[:2])
                qos = (first >> 1) & 3
                if qos:
                    packet_id = body[2 + n : 4 + n]
                    writer.write(b"\x40\x02" + packet_id)
                writer.write(self.committed())


async def _device_process(
    ids: list[str], host: str, port: int, target: dict[str, str], conn: Any, rate_s: float
) -> None:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    devices = [SimDevice(d, target) for d in ids]
    started = time.monotonic()
    tasks = [asyncio.create_task(d.run(host, port, gate)) for d in devices]
    while any(d.writer is None for d in devices):
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            raise RuntimeError(f"device failed: {failed[0].exception()!r}")
        await asyncio.sleep(0.05)
    conn.send(("connected", time.monotonic() - started))
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "steady":
            duration = command[1]
            offsets = [random.uniform(0, rate_s) for _ in devices]
            counts = [0] * len(devices)
            start = time.monotonic()
            while (now := time.monotonic() - start) < duration:
                for i, (d, off) in enumerate(zip(devices, offsets, strict=True)):
                    due = int((now - off) // rate_s) + 1 if now >= off else 0
                    while counts[i] < due and d.writer is not None:
                        d.writer.write(d.heartbeat())
                        counts[i] += 1
                await asyncio.sleep(0.05)
            conn.send(("steady", sum(counts)))
        elif command[0] == "burst":
            before = sum(d.sent for d in devices)
            for _ in range(command[1]):
                for d in devices:
                    assert d.writer is not None
                    d.writer.write(d.heartbeat())
                await asyncio.gather(*(d.writer.drain() for d in devices if d.writer))
            conn.send(("burst", sum(d.sent for d in devices) - before))
        elif command[0] == "stop":
            for task in tasks:
                task.cancel()
            for d in devices:
                if d.writer is not None:
                    d.writer.close()
            conn.send(("stopped",))
            return


def device_process(
    ids: list[str], host: str, port: int, target: dict[str, str], conn: Any, rate_s: float
) -> None:
    asyncio.run(_device_process(ids, host, port, target, conn, rate_s))


# -- the real components --------------------------------------------------------------------


@contextmanager
def mosquitto(directory: Path) -> Iterator[int]:
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "persistence false",
                "user root",
                "max_queued_messages 1000000",
                "max_inflight_messages 0",
                "log_dest stderr",
                "log_type error",
            ]
        )
        + "\n"
    )
    binary = "/usr/sbin/mosquitto"
    with ManagedProcess([binary, "-c", config], name="mosquitto") as proc:
        proc.wait_ready(_tcp(port), timeout=10)
        yield port


def _tcp(port: int) -> Any:
    import socket

    def check(_: Any) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def register(url: str, n: int) -> tuple[list[str], dict[str, str]]:
    registry = open_registry(url)
    ids = [f"sim-{i:05d}" for i in range(n)]
    now = datetime.now(UTC)
    with registry.engine.begin() as conn:
        for start in range(0, n, 2000):
            chunk = ids[start : start + 2000]
            conn.execute(
                insert(Device),
                [{"id": d, "registered_at": now, "online": Online.UNKNOWN} for d in chunk],
            )
            conn.execute(insert(DeviceGroup), [{"device_id": d, "name": GROUP} for d in chunk])
    manifest = make_manifest("nano", "2.0.0")
    registry.create_release(manifest, actor="benchmark")
    registry.engine.dispose()
    return ids, {"name": "nano", "version": "2.0.0", "sha256": bundle_hash(manifest)}


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mb(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match[1]) / 1024 if match else float("nan")


def written(client: httpx.Client) -> int:
    text = client.get("/metrics").text
    return sum(
        int(float(v))
        for v in re.findall(r"^nanofleet_ingest_results_total\{[^}]*\} (\S+)", text, re.M)
    )


def wait_written(client: httpx.Client, target: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if written(client) >= target:
            return time.monotonic() - start
        time.sleep(0.1)
    sys.stderr.write(client.get("/metrics").text[-1500:])
    raise TimeoutError(
        f"the coordinator wrote {written(client)} of {target} messages in {timeout_s} s"
    )


def one_run(args: argparse.Namespace, backend: str, pg: PostgresServer | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nanofleet-fleet-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        url = (
            pg.url(pg.create_database())
            if pg is not None
            else f"sqlite:///{work / 'registry.sqlite3'}"
        )
        ids, target = register(url, args.devices)
        with mosquitto(work) as broker_port:
            http_port = free_port()
            config = work / "coordinator.toml"
            config.write_text(
                f'database_url = "{url}"\napi_token = "{TOKEN}"\nport = {http_port}\n'
                f'repository_path = "{work / "repo"}"\nrollout_interval_s = 0.5\n'
                f"heartbeat_interval_s = {args.heartbeat_s / args.scale}\n"
                f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\nqueue_max = 100000\n'
                f"batch_max = {args.batch}\n"
            )
            argv = [
                sys.executable,
                "-c",
                "from coordinator.cli import main; main()",
                "serve",
                "-c",
                config,
            ]
            with (
                ManagedProcess(argv, cwd=work, name="coordinator") as coord,
                httpx.Client(
                    base_url=f"http://127.0.0.1:{http_port}",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=60,
                ) as api,
            ):
                coord.wait_ready(log_contains("listening on"), timeout=120)
                pipes, procs = [], []
                share = [ids[i :: args.procs] for i in range(args.procs)]
                for part in share:
                    parent, child = mp.Pipe()
                    p = mp.Process(
                        daemon=True,
                        target=device_process,
                        args=(
                            part,
                            "127.0.0.1",
                            broker_port,
                            target,
                            child,
                            args.heartbeat_s / args.scale,
                        ),
                    )
                    p.start()
                    pipes.append(parent)
                    procs.append(p)
                connect_s = max(pipe.recv()[1] for pipe in pipes)
                wait_written(api, args.devices, 120)  # every retained status written

                base = written(api)
                cpu0, t0 = proc_cpu_s(coord.pid), time.monotonic()
                for pipe in pipes:
                    pipe.send(("steady", args.steady_s))
                steady_sent = sum(pipe.recv()[1] for pipe in pipes)
                steady_elapsed = time.monotonic() - t0
                drain_s = wait_written(api, base + steady_sent, 300)
                steady_written = written(api) - base
                steady_total_s = time.monotonic() - t0
                cpu_steady = (proc_cpu_s(coord.pid) - cpu0) / steady_total_s

                base = written(api)
                cpu0, t0 = proc_cpu_s(coord.pid), time.monotonic()
                for pipe in pipes:
                    pipe.send(("burst", args.burst))
                burst_sent = sum(pipe.recv()[1] for pipe in pipes)
                wait_written(api, base + burst_sent, 600)
                burst_s = time.monotonic() - t0
                cpu_burst = (proc_cpu_s(coord.pid) - cpu0) / burst_s

                t0 = time.monotonic()
                created = api.post(
                    "/api/v1/rollouts",
                    json={
                        "release": "nano:2.0.0",
                        "groups": [GROUP],
                        "waves": ["1%", "10%", "100%"],
                        "wave_timeout_s": 600,
                    },
                )
                created.raise_for_status()
                rid = created.json()["id"]
                state = "running"
                while state == "running" and time.monotonic() - t0 < 600:
                    time.sleep(0.5)
                    state = api.get(f"/api/v1/rollouts/{rid}").json()["state"]
                rollout_s = time.monotonic() - t0
                peak_rss = proc_peak_rss_mb(coord.pid)
                for pipe in pipes:
                    pipe.send(("stop",))
                    pipe.recv()
                for p in procs:
                    p.join(30)
        offered = args.devices / args.heartbeat_s
        capacity = burst_sent / burst_s
        return {
            "connect_s": round(connect_s, 2),
            "offered_msg_s": round(offered, 1),
            "steady_offered_msg_s": round(steady_sent / steady_elapsed, 1),
            "steady_written_ratio": round(steady_written / max(steady_sent, 1), 4),
            "steady_drain_s": round(drain_s, 2),
            "steady_ingest_msg_s": round(steady_written / steady_total_s, 1),
            "capacity_msg_s": round(capacity, 1),
            "headroom": round(capacity / offered, 2),
            "cpu_steady_pct": round(100 * cpu_steady, 1),
            "cpu_burst_pct": round(100 * cpu_burst, 1),
            "peak_rss_mb": round(peak_rss, 1),
            "rollout_state": state,
            "rollout_s": round(rollout_s, 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=2, help="device simulator processes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--heartbeat-s", type=float, default=30.0, help="real heartbeat interval")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.5,
        help="the steady phase's heartbeats come this much faster than the real interval",
    )
    parser.add_argument("--steady-s", type=float, default=30.0)
    parser.add_argument(
        "--burst", type=int, default=3, help="heartbeats per device in the capacity phase"
    )
    parser.add_argument("--batch", type=int, default=2000, help="ingest batch size")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    figures: dict[str, Any] = {"benchmark": "fleet", "devices": args.devices, "runs": args.runs}
    for backend in args.backends.split(","):
        pg = PostgresServer().start() if backend == "postgresql" else None
        try:
            runs = []
            for i in range(args.runs):
                result = one_run(args, backend, pg)
                print(f"{backend} run {i + 1}: {json.dumps(result)}", flush=True)
                runs.append(result)
        finally:
            if pg is not None:
                pg.stop()
        figures[backend] = {
            k: (median(r[k] for r in runs) if isinstance(runs[0][k], float | int) else runs[-1][k])
            for k in runs[0]
        }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
