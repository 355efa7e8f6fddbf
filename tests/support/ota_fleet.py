"""The operator's side of a signed update, for end-to-end tests and benchmarks.

- :class:`ReleaseRepo`: a real TUF repository driven through the operator CLI
  (``nanofleet keys create``, ``release init``, ``release publish``),
  run in-process with typer's runner; offline keys are encrypted with a passphrase.
- :class:`RepoServer`: the coordinator's repository file routes served by uvicorn on a free
  loopback port, counting the bytes it sends per path, so a test can show what a device
  downloaded.
- :func:`write_adapter_bundle`: a real, loadable LM-head adapter bundle bound to a base.
- :func:`agent_config`: the agent's TOML for a model, a socket, ``[ota]`` and ``[mqtt]``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import uvicorn
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send
from typer.testing import CliRunner

from coordinator.cli import app as nanofleet
from coordinator.models.adapter_bundle import write_random_adapter_bundle
from coordinator.web.repo_files import repo_files_router
from protocol.bundle import (
    MANIFEST_NAME,
    BundleManifest,
    bundle_hash,
)
from protocol.messages import BundleRef

PASSPHRASE = "correct horse battery staple"
ROLES = ("root", "targets", "snapshot", "timestamp", "adapters", "channels")


class ReleaseRepo:
    """A repository and its keys under ``work``; every change goes through the CLI."""

    def __init__(self, work: Path) -> None:
        self.path = work / "repo"
        self.keys = work / "keys"
        self._runner = CliRunner()
        self._env = {"NANOFLEET_KEY_PASSPHRASE": PASSPHRASE}
        for role in ROLES:
            self.cli("keys", "create", role, "--keys", str(self.keys))
        self.cli("release", "init", "--repo", str(self.path), "--keys", str(self.keys))

    def cli(self, *args: str) -> str:
        """Run ``nanofleet ARGS``; return its output. Raises AssertionError on failure."""
        result = self._runner.invoke(nanofleet, list(args), env=self._env)
        if result.exit_code != 0:
            raise AssertionError(f"nanofleet {' '.join(args)} failed: {result.output}")
        return result.output

    @property
    def root_file(self) -> Path:
        """The root metadata devices pin."""
        return self.path / "metadata" / "1.root.json"

    def timestamp_version(self) -> int:
        import json

        data = json.loads((self.path / "metadata" / "timestamp.json").read_bytes())
        return int(data["signed"]["version"])

    def publish(self, bundle_dir: Path, group: str, channel: str) -> BundleRef:
        """``release publish`` (add-bundle, then point); return the bundle's reference."""
        manifest = BundleManifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_bytes())
        self.cli(
            "release", "publish", str(bundle_dir), "--group", group, "--channel", channel,
            "--repo", str(self.path), "--keys", str(self.keys),
        )  # fmt: skip
        return BundleRef(name=manifest.name, version=manifest.version, sha256=bundle_hash(manifest))


class _Counting:
    """ASGI middleware: bytes of response bodies sent, per request path."""

    def __init__(self, app: Any, counts: Counter[str], lock: threading.Lock) -> None:
        self.app, self.counts, self.lock = app, counts, lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.body":
                with self.lock:
                    self.counts[path] += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)


class RepoServer:
    """Serves ``repo_path`` at ``{url}/metadata/...`` and ``{url}/targets/...``."""

    def __init__(self, repo_path: Path) -> None:
        app = FastAPI()
        app.include_router(repo_files_router(repo_path), prefix="/repo")
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/repo"
        config = uvicorn.Config(
            _Counting(app, self._counts, self._lock),
            log_config=None,
            access_log=False,
            ws="none",
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def served(self) -> dict[str, int]:
        """Bytes sent so far, per path."""
        with self._lock:
            return dict(self._counts)

    def target_bytes(self) -> int:
        """Bytes of target files (not metadata) sent so far."""
        return sum(n for p, n in self.served().items() if p.startswith("/repo/targets/"))

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the repository server did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


def write_adapter_bundle(
    directory: Path,
    base_dir: Path,
    *,
    name: str = "tuned",
    version: str = "1",
    rank: int = 4,
    seed: int = 7,
    scale: float = 0.5,
    keep_zero: list[int] | None = None,
) -> Path:
    """A loadable LM-head adapter bundle bound to the base model in ``base_dir``, with
    factors large enough to change a tiny model's answers (see
    :func:`coordinator.models.adapter_bundle.write_random_adapter_bundle`)."""
    return write_random_adapter_bundle(
        directory,
        base_dir,
        name=name,
        version=version,
        rank=rank,
        seed=seed,
        scale=scale,
        keep_zero=keep_zero,
    )


@dataclass(frozen=True)
class MqttIdentity:
    """Where the broker is and the device's TLS files."""

    host: str
    port: int
    device_id: str
    group: str
    ca_file: Path
    cert_file: Path
    key_file: Path


def agent_config(
    path: Path,
    *,
    model_dir: Path,
    socket_path: Path,
    state_dir: Path,
    root_file: Path,
    repository_url: str,
    group: str,
    channel: str = "stable",
    poll_interval_s: float = 0.0,
    mqtt: MqttIdentity | None = None,
    health_requests: int = 3,
) -> Path:
    """Write the agent's TOML config to ``path`` and return it."""
    text = f"""
[model]
dir = "{model_dir}"
threads = 1
[server]
socket_path = "{socket_path}"
[ota]
state_dir = "{state_dir}"
root_file = "{root_file}"
repository_url = "{repository_url}"
group = "{group}"
channel = "{channel}"
poll_interval_s = {poll_interval_s}
[ota.health]
requests = {health_requests}
max_tokens = 8
"""
    if mqtt is not None:
        text += f"""
[mqtt]
host = "{mqtt.host}"
port = {mqtt.port}
device_id = "{mqtt.device_id}"
groups = ["{mqtt.group}"]
channels = ["{channel}"]
ca_file = "{mqtt.ca_file}"
cert_file = "{mqtt.cert_file}"
key_file = "{mqtt.key_file}"
heartbeat_interval_s = 1.0
reconnect_min_s = 0.1
reconnect_max_s = 1.0
"""
    path.write_text(text, encoding="utf-8")
    return path
