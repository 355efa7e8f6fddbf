"""The agent's supervisor of ``flower-supernode``: a child process started and stopped by PID.

Flower 1.42 has no in-process SuperNode API, so the agent runs the SuperNode as a child
(or systemd runs it as a sibling unit with the same arguments, see
``deploy/systemd/nanofleet-supernode.service``).

Invariants:

- TLS to the SuperLink with the fleet CA (``--root-certificates``), never ``--insecure``;
- node authentication with the device's own EC key (:func:`ensure_node_key` creates a
  P-384 key, mode 0600, and its OpenSSH public key for registration with the SuperLink);
- telemetry and update checks off; runtime dependency installation stays off (the
  SuperNode default); the ClientApp code is the installed :mod:`agent.federated.client_app`;
- the node config points at the device's local data and model and nothing else, and its
  values are checked to be plain (no quotes, spaces or newlines that would change its
  meaning);
- isolation ``subprocess`` (the SuperNode starts one ClientApp process per message) by
  default; ``process`` expects a ``flower-superexec`` the operator runs in its own unit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Self

from agent.errors import ConfigError

__all__ = ["NodeKey", "SuperNode", "SuperNodeConfig", "ensure_node_key", "new_node_key"]

_PLAIN = re.compile(r"^[A-Za-z0-9_./:+@-]{1,4096}$")


@dataclass(frozen=True)
class NodeKey:
    private_key: Path
    public_key: Path  # OpenSSH format, what `flwr supernode register` takes


def new_node_key() -> tuple[bytes, bytes]:
    """A fresh P-384 key pair: the private key (OpenSSH PEM, unencrypted) and its OpenSSH
    public key line (what ``flwr supernode register`` takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP384R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return pem, public + b"\n"


def ensure_node_key(directory: Path, name: str = "supernode") -> NodeKey:
    """The device's SuperNode key pair in ``directory``, created on first use (P-384)."""
    key = NodeKey(directory / f"{name}.key", directory / f"{name}.pub")
    if key.private_key.exists() and key.public_key.exists():
        return key
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem, public = new_node_key()
    fd = os.open(key.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    key.public_key.write_bytes(public)
    return key


@dataclass(frozen=True)
class SuperNodeConfig:
    superlink: str  # host:port of the Fleet API
    root_certificates: Path
    node_key: Path
    data_path: Path
    model_dir: Path
    state_dir: Path
    serving_marker: Path | None = None
    isolation: Literal["subprocess", "process"] = "subprocess"
    clientappio_port: int | None = None  # loopback port of the ClientAppIo/runtime API
    #: The secret shared with ``flower-superexec`` (``process`` isolation in systemd units).
    superexec_secret_file: Path | None = None

    def node_config(self) -> str:
        """The ``--node-config`` string the ClientApp reads.

        Raises:
            ConfigError: a path has characters that do not fit a plain node-config value.
        """
        values = {"data-path": self.data_path, "model-dir": self.model_dir}
        if self.serving_marker is not None:
            values["serving-marker"] = self.serving_marker
        parts = []
        for key, value in values.items():
            text = str(value)
            if _PLAIN.fullmatch(text) is None:
                raise ConfigError(f"federated {key} {text!r}: use a path without spaces or quotes")
            parts.append(f'{key}="{text}"')
        return " ".join(parts)


class SuperNode:
    """A ``flower-supernode`` child process."""

    def __init__(self, config: SuperNodeConfig) -> None:
        self.config = config
        self.log_path = config.state_dir / "supernode.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def argv(self) -> list[str]:
        c = self.config
        exe = Path(sys.executable).parent / "flower-supernode"
        argv = [
            str(exe) if exe.exists() else "flower-supernode",
            "--superlink",
            c.superlink,
            "--root-certificates",
            str(c.root_certificates),
            "--auth-supernode-private-key",
            str(c.node_key),
            "--node-config",
            c.node_config(),
            "--isolation",
            c.isolation,
            "--max-retries",
            "100",
        ]
        if c.clientappio_port is not None:
            argv += ["--host", "127.0.0.1", "--port", str(c.clientappio_port)]
        if c.superexec_secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(c.superexec_secret_file)]
        return argv

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The SuperNode starts `flower-superexec` (and the ClientApp) by name: the ones
        # installed beside this Python, even when its bin directory is not on PATH.
        bin_dir = str(Path(sys.executable).parent)
        path = env.get("PATH", os.defpath)
        if bin_dir not in path.split(os.pathsep):
            env["PATH"] = os.pathsep.join([bin_dir, path])
        env.update(
            FLWR_HOME=str(self.config.state_dir / "flwr-home"),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
            # The trainer and the ClientApp's engine must not take every core from serving.
            OMP_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
        )
        return env

    def start(self) -> Self:
        """Start the SuperNode (it connects and retries on its own)."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.argv(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=self.config.state_dir,
        )
        return self

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout_s: float) -> bool:
        """True once ``text`` appears in the SuperNode's log within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log_text():
                return True
            if not self.running():
                return text in self.log_text()
            time.sleep(0.05)
        return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the SuperNode by its PID (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
