"""A local mosquitto for one machine: the production mTLS template on a free loopback port.

Used by ``nanofleet demo``. The broker is the real mosquitto (Debian's package, installed
by ``scripts/bootstrap.sh``), run with ``deploy/mosquitto/nanofleet.conf.template`` and an
ACL rendered by :func:`coordinator.broker_config.render_acl`: devices authenticate with
their certificates, the certificate CN is the MQTT username, and each device may touch only
its own topics and its groups' announcements.

Why a real mosquitto and not a pure-Python broker started in-process (the design's first
idea for the embedded default): measured here (FINDINGS.md), amqtt 0.12 speaks MQTT 3.1.1
only (the agent and the coordinator use MQTT 5 sessions), never enforces keepalive (so a
silently dead agent never gets its Last Will and is never marked offline), lets retained
messages leak past its ACLs, and its ACL settings are partly broken; it also cannot share
an environment with flwr (conflicting typer pins). The demo would then show neither the
security model nor liveness as they are in production. mosquitto is one Debian package,
installed by bootstrap, and runs the same file an operator deploys.

Invariants:

- The broker's files live in a private directory under the system temp dir (its parents
  must be traversable by user ``mosquitto``, to which mosquitto switches when started as
  root); when root, the directory and its files are given to group ``mosquitto``.
- The process is started by this module and stopped by its PID only (SIGTERM, then SIGKILL
  after a grace period); the directory is removed afterwards.
- Ready means a TLS handshake presenting the given client certificate (the coordinator's)
  succeeds on the port.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coordinator import pki
from coordinator.broker_config import BrokerFiles, render_acl, render_mosquitto_conf
from coordinator.errors import ConfigError, TransientError

__all__ = ["BROKER_USER", "LocalBroker", "broker_group", "start_local_broker"]

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "nanofleet.conf.template"
HOST = "127.0.0.1"
BROKER_USER = "mosquitto"
READY_TIMEOUT_S = 15.0  # seconds from start to an accepted TLS handshake
STOP_GRACE_S = 10.0  # seconds between SIGTERM and SIGKILL
PORT_ATTEMPTS = 3  # a port taken between picking and binding is retried


@dataclass
class LocalBroker:
    """A running mosquitto: where it listens, its PID, and the files clients need."""

    host: str
    port: int
    directory: Path
    ca_file: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        """The broker's PID."""
        return self.process.pid

    @property
    def log(self) -> Path:
        """The broker's log file."""
        return self.directory / "broker.log"

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the broker by its PID and remove its directory."""
        _stop(self.process, grace_s)
        shutil.rmtree(self.directory, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def mosquitto_binary() -> str:
    """The mosquitto executable. Raises ConfigError saying how to install it if missing."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/bin")
    if found is None:
        raise ConfigError("mosquitto is not installed: run scripts/bootstrap.sh (apt-get)")
    return found


def broker_group() -> str | None:
    """The group that must be able to read the broker's files, when running as root."""
    if os.geteuid() != 0:
        return None
    try:
        grp.getgrnam(BROKER_USER)
    except KeyError:
        return None
    return BROKER_USER


def _share(path: Path, group: str | None) -> None:
    if group is not None:
        pki.share_with_group(path, group)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _handshake(port: int, context: ssl.SSLContext) -> bool:
    try:
        with (
            socket.create_connection((HOST, port), timeout=1.0) as raw,
            context.wrap_socket(raw, server_hostname=HOST),
        ):
            return True
    except OSError:
        return False


def start_local_broker(
    ca: pki.Credential,
    fleet: Mapping[str, tuple[str, ...]],
    probe: pki.CredentialFiles,
    *,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> LocalBroker:
    """Start mosquitto on a free loopback port with the production template, under mTLS.

    ``fleet`` maps device ids to their groups (the ACL); the broker's server certificate and
    its CRL are issued from ``ca``; ``probe`` is a client certificate from the same CA (the
    coordinator's) presented to check that the broker is ready.

    Raises:
        ConfigError: mosquitto is not installed, or its files cannot be given to its group.
        TransientError: mosquitto exited or did not accept a TLS handshake in time (the
            message carries the tail of its log).
    """
    binary = mosquitto_binary()
    group = broker_group()
    directory = Path(tempfile.mkdtemp(prefix="nanofleet-broker-"))
    try:
        data = directory / "data"
        data.mkdir()
        _share(directory, group)
        if group is not None:
            os.chown(data, -1, grp.getgrnam(group).gr_gid)
            data.chmod(0o770)
        ca_file = directory / "ca.crt"
        pki.write_certificate(ca.certificate, ca_file)
        server = pki.write_credential(pki.issue_server(ca), directory, "broker", group=group)
        crl_file = directory / "crl.pem"
        pki.write_crl(pki.issue_crl(ca), crl_file)
        acl_file = directory / "acl"
        acl_file.write_text(render_acl(fleet.items()))
        _share(acl_file, group)
        config = directory / "mosquitto.conf"
        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(str(probe.certificate), str(probe.key))
        template = TEMPLATE.read_text()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = _free_port()
            files = BrokerFiles(
                ca_file=ca_file,
                cert_file=server.certificate,
                key_file=server.key,
                crl_file=crl_file,
                acl_file=acl_file,
                persistence_dir=data,
                port=port,
                bind_address=HOST,
            )
            config.write_text(render_mosquitto_conf(template, files))
            _share(config, group)
            log_path = directory / "broker.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [binary, "-c", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            broker = LocalBroker(HOST, port, directory, ca_file, proc)
            deadline = time.monotonic() + ready_timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                if _handshake(port, context):
                    return broker
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.05)
            tail = broker.log_tail()
            _stop(proc, STOP_GRACE_S)
            if "Address already in use" in tail and attempt < PORT_ATTEMPTS:
                continue
            raise TransientError(f"mosquitto did not start on {HOST}:{port}:\n{tail}")
        raise TransientError("mosquitto could not bind a free port")  # not reached
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
