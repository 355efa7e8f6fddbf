"""The coordinator's Flower processes: the SuperLink and the ``flwr`` CLI that drives it.

Invariants:

- The SuperLink runs with TLS and SuperNode authentication (only registered node keys
  may join), without runtime dependency installation (no ``uv sync`` against a package
  index per run), with telemetry and update checks off. Flower 1.42 serves the Fleet,
  Control and runtime APIs on one HTTP port, and the Control API (which accepts apps to
  run) has no login in the open-source edition: the port is bound to loopback, and devices
  on other hosts reach the Fleet API through a proxy that forwards only its routes.
- Every process is started with its own ``FLWR_HOME`` and is stopped by its PID
  (SIGTERM, then SIGKILL after a bound), never by name.
- The app a run names is code installed on both sides (``coordinator.federation.
  server_app:app`` and ``agent.federated.client_app:app``); the app directory holds only
  its ``pyproject.toml``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, Self

from coordinator.errors import CoordinatorError
from coordinator.processes import descendants, stop_pids

__all__ = [
    "APP_PYPROJECT",
    "FlowerCli",
    "FlowerDriver",
    "RunFailedError",
    "SuperLink",
    "SuperLinkConfig",
    "flower_env",
    "registered_node_id",
    "write_app",
]

#: The Flower app of a personalization run: both components are installed code.
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "nanofleet-personalize"
version = "1.0.0"
description = "nanofleet federated LM-head adapter"
dependencies = []

[tool.flwr.app]
publisher = "nanofleet"

[tool.flwr.app.components]
serverapp = "coordinator.federation.server_app:app"
clientapp = "agent.federated.client_app:app"

[tool.flwr.app.config]
{config}
"""


class RunFailedError(CoordinatorError):
    """A Flower process did not start, or a run did not finish; the message has the log tail."""


class FlowerDriver(Protocol):
    """What a round needs of Flower: submit the app in ``app_dir`` and block until the run
    ends. :class:`FlowerCli` is the real one; tests use a fake that plays the ServerApp."""

    def run(self, app_dir: Path, run_config: Mapping[str, Any], timeout_s: float) -> str:
        """Run the app; return its log.

        Raises:
            RunFailedError: the run failed or did not end within ``timeout_s``.
        """
        ...


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: its own home, no telemetry, no update checks,
    and this interpreter's scripts first on ``PATH`` (the SuperLink starts
    ``flower-superexec`` by name)."""
    env = dict(os.environ if base is None else base)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        [scripts, *(p for p in env.get("PATH", "").split(os.pathsep) if p)]
    )
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_app(app_dir: Path, defaults: Mapping[str, Any]) -> Path:
    """Write the run's app directory (a ``pyproject.toml`` with ``defaults`` as its config)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{key} = {_toml_value(value)}" for key, value in sorted(defaults.items()))
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT.format(config=config), encoding="utf-8")
    return app_dir


def _tcp_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass(frozen=True)
class SuperLinkConfig:
    """Where the SuperLink listens and its TLS files."""

    host: str  # Fleet, Control and runtime APIs share one HTTP port in Flower 1.42
    port: int
    certfile: Path
    keyfile: Path
    ca_certfile: Path
    state_dir: Path

    def __post_init__(self) -> None:
        if self.host not in {"127.0.0.1", "::1", "localhost"}:
            raise CoordinatorError(
                f"the SuperLink serves its Control API on the Fleet API's port: bind it to "
                f"loopback, not {self.host!r}, and let devices in through a proxy that "
                "forwards only the Fleet API"
            )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class SuperLink:
    """A ``flower-superlink`` child process."""

    def __init__(self, config: SuperLinkConfig) -> None:
        self.config = config
        self.flwr_home = config.state_dir / "flwr-home"
        self.log_path = config.state_dir / "superlink.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def argv(self) -> list[str]:
        c = self.config
        return [
            _bin("flower-superlink"),
            "--ssl-certfile",
            str(c.certfile),
            "--ssl-keyfile",
            str(c.keyfile),
            "--ssl-ca-certfile",
            str(c.ca_certfile),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host",
            c.host,
            "--port",
            str(c.port),
            "--database",
            str(c.state_dir / "superlink.db"),
        ]

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start the SuperLink and wait until its Fleet and Control APIs accept connections.

        Raises:
            RunFailedError: it exited or did not listen within ``timeout_s``.
        """
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.argv(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=flower_env(self.flwr_home),
            cwd=self.config.state_dir,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _tcp_open(self.config.address):
                return self
            time.sleep(0.05)
        self.stop()
        raise RunFailedError(f"flower-superlink did not start:\n{_tail(self.log_path)}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the SuperLink by its PID (SIGTERM, then SIGKILL), then what it started and
        left running (``flower-superexec``, a run's ``flwr-serverapp``)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            below = descendants(proc.pid)
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout_s)
            stop_pids(below)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def registered_node_id(output: str) -> int:
    """The node ID in the JSON answer of ``flwr supernode register --format json``.

    Raises:
        RunFailedError: no JSON object with a positive ``node-id`` in ``output``.
    """
    answer: object = None
    start = output.find("{")
    while start >= 0 and not isinstance(answer, dict):
        try:
            answer = json.JSONDecoder().raw_decode(output, start)[0]
        except json.JSONDecodeError:
            start = output.find("{", start + 1)
    node_id = answer.get("node-id") if isinstance(answer, dict) else None
    if not isinstance(node_id, int) or isinstance(node_id, bool) or node_id <= 0:
        raise RunFailedError(f"flwr supernode register named no node ID:\n{output[-1000:]}")
    return node_id


class FlowerCli:
    """The ``flwr`` CLI pointed at one SuperLink's Control API (its own ``FLWR_HOME``)."""

    CONNECTION = "nanofleet"

    def __init__(self, flwr_home: Path, control_address: str, ca_certfile: Path) -> None:
        self.flwr_home = flwr_home
        self.control_address = control_address
        flwr_home.mkdir(parents=True, exist_ok=True)
        (flwr_home / "config.toml").write_text(
            f"[superlink]\ndefault = {_toml_value(self.CONNECTION)}\n\n"
            f"[superlink.{self.CONNECTION}]\n"
            f"address = {_toml_value(control_address)}\n"
            f"root-certificates = {_toml_value(str(ca_certfile))}\n",
            encoding="utf-8",
        )

    def _run(self, args: list[str], timeout_s: float, cwd: Path | None = None) -> str:
        try:
            done = subprocess.run(
                [_bin("flwr"), *args],
                capture_output=True,
                text=True,
                env=flower_env(self.flwr_home),
                timeout=timeout_s,
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            out = e.stdout if isinstance(e.stdout, str) else out
            raise RunFailedError(
                f"flwr {args[0]} timed out after {timeout_s} s:\n{out[-3000:]}"
            ) from e
        if done.returncode != 0:
            raise RunFailedError(
                f"flwr {' '.join(args[:2])} failed ({done.returncode}):\n"
                f"{(done.stdout + done.stderr)[-3000:]}"
            )
        return done.stdout + done.stderr

    def reachable(self) -> bool:
        """Whether the SuperLink accepts TCP connections at its Control API's address."""
        return _tcp_open(self.control_address)

    def register_node(self, public_key: Path, timeout_s: float = 30.0) -> int:
        """Register a SuperNode's public key (OpenSSH, NIST EC) with the federation; return
        the node ID the SuperLink gave it (the SuperNode connects as that node).

        Raises:
            RunFailedError: the CLI failed (a key registered already, among others) or its
                answer names no node ID.
        """
        out = self._run(
            ["supernode", "register", str(public_key), self.CONNECTION, "--format", "json"],
            timeout_s,
        )
        return registered_node_id(out)

    def run(self, app_dir: Path, run_config: Mapping[str, Any], timeout_s: float) -> str:
        """Submit the app and stream its logs until the run ends; return them.

        Raises:
            RunFailedError: the CLI failed or the run did not end within ``timeout_s``.
        """
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in sorted(run_config.items()))
        args = ["run", str(app_dir), self.CONNECTION, "--stream"]
        if overrides:
            args += ["--run-config", overrides]
        return self._run(args, timeout_s, cwd=app_dir)
