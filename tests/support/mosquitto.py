"""Real mosquitto brokers for tests: a plain loopback one and an mTLS one with fleet ACLs.

Each broker gets a private directory under the system temp dir (not pytest's ``tmp_path``,
whose parents are mode 0700: mosquitto started as root switches to user ``mosquitto``
before it reads its files, so the directory and every file it reads are given to group
``mosquitto``). It listens on a free loopback port, is ready when a raw MQTT CONNECT gets
an accepting CONNACK, and is stopped by its PID.

The mTLS broker runs the production template ``deploy/mosquitto/nanofleet.conf.template``
with an ACL file from :func:`coordinator.broker_config.render_acl`, a fresh fleet CA, a
broker certificate for 127.0.0.1/localhost, two devices in different groups and the
coordinator.
"""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from coordinator import pki
from coordinator.broker_config import BrokerFiles, render_acl, render_mosquitto_conf
from coordinator.local_broker import broker_group
from tests.support.processes import ManagedProcess, ProcessStartError, Ready, free_port

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "mosquitto" / "nanofleet.conf.template"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 10.0

#: The fleet of the mTLS broker: device id -> groups.
DEVICE_A = "dev-a"
DEVICE_B = "dev-b"
GROUP_A = "alpha"
GROUP_B = "beta"
FLEET: Mapping[str, tuple[str, ...]] = {DEVICE_A: (GROUP_A,), DEVICE_B: (GROUP_B,)}

# MQTT 3.1.1 CONNECT (clean session, keepalive 10 s, client id "nanofleet-probe") and
# DISCONNECT: enough to ask a broker whether it accepts a client, without a client library.
_PROBE_ID = b"nanofleet-probe"
_CONNECT_BODY = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(_PROBE_ID).to_bytes(2, "big") + _PROBE_ID
CONNECT_PACKET = b"\x10" + bytes([len(_CONNECT_BODY)]) + _CONNECT_BODY
DISCONNECT_PACKET = b"\xe0\x00"


_RELOADED = "Reloading config."


def _log_count_above(text: str, count: int) -> Ready:
    def check(proc: ManagedProcess) -> bool:
        return proc.read_log().count(text) > count

    check.__doc__ = f"{text!r} logged more than {count} times"
    return check


def mosquitto_binary() -> Path:
    """The mosquitto executable. Raises RuntimeError telling how to install it if missing."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(
            "mosquitto is not installed (looked in PATH and /usr/sbin): run "
            "scripts/bootstrap.sh, which installs it with apt-get"
        )
    return Path(found)


def mqtt_connack(
    host: str, port: int, context: ssl.SSLContext | None = None, timeout: float = 2.0
) -> int:
    """Send an MQTT CONNECT (over TLS with ``context``) and return the CONNACK return code.

    0 means accepted. Raises ``OSError`` (``ssl.SSLError``, a reset, a timeout) or
    ``ConnectionError`` when the broker closes the connection without a CONNACK.
    """
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock: socket.socket = (
            context.wrap_socket(raw, server_hostname=host) if context is not None else raw
        )
        with sock:
            sock.sendall(CONNECT_PACKET)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    raise ConnectionError(f"{host}:{port} closed the connection without CONNACK")
                reply += chunk
            if reply[:2] != b"\x20\x02":
                raise ConnectionError(f"{host}:{port} answered {reply!r}, not a CONNACK")
            if reply[3] == 0:
                sock.sendall(DISCONNECT_PACKET)
            return reply[3]


def mqtt_accepting(host: str, port: int, context: ssl.SSLContext | None = None) -> Ready:
    """Ready when the broker at ``host:port`` accepts an MQTT connection (CONNACK 0)."""

    def check(_: ManagedProcess) -> bool:
        try:
            return mqtt_connack(host, port, context, timeout=1.0) == 0
        except OSError:
            return False

    check.__doc__ = f"an MQTT client can connect to {host}:{port}"
    return check


def client_context(ca_file: Path, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """A TLS client context that trusts ``ca_file`` and presents the given certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


@contextmanager
def broker_directory() -> Iterator[Path]:
    """A private directory mosquitto can read (and, in ``data/``, write); removed after."""
    directory = Path(tempfile.mkdtemp(prefix="nanofleet-mosquitto-"))
    try:
        group = broker_group()
        data = directory / "data"
        data.mkdir()
        if group is not None:
            pki.share_with_group(directory, group)
            os.chown(data, -1, grp.getgrnam(group).gr_gid)
            data.chmod(0o770)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_shared(path: Path, text: str) -> None:
    path.write_text(text)
    group = broker_group()
    if group is not None:
        pki.share_with_group(path, group)


@dataclass(kw_only=True)
class Broker:
    """A running mosquitto: where it listens, its PID and its files."""

    host: str
    port: int
    process: ManagedProcess
    directory: Path
    config: Path

    @property
    def pid(self) -> int:
        """The broker's PID."""
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the broker's log."""
        return self.process.log_tail(lines)

    def reload(self, timeout: float = READY_TIMEOUT_S) -> None:
        """SIGHUP the broker (it rereads its ACL file and CRL) and wait until it has.

        mosquitto reloads in its single main loop right after logging the line waited
        for, so any connection made after this returns sees the new files.
        """
        before = self.process.read_log().count(_RELOADED)
        self.process.send_signal(signal.SIGHUP)
        self.process.wait_ready(_log_count_above(_RELOADED, before), timeout=timeout)


@dataclass(frozen=True)
class Identity:
    """A client certificate and key on disk, and the MQTT username the broker derives."""

    username: str
    cert_file: Path
    key_file: Path
    serial: int


@dataclass(kw_only=True)
class TlsBroker(Broker):
    """A running mosquitto with the production mTLS configuration and fleet ACLs."""

    ca: pki.Credential = field(repr=False)
    ca_file: Path
    server: pki.CredentialFiles
    crl_file: Path
    acl_file: Path
    identities: dict[str, Identity]
    fleet: Mapping[str, tuple[str, ...]]

    def context(self, username: str | None) -> ssl.SSLContext:
        """A client TLS context presenting ``username``'s certificate (None: no certificate)."""
        if username is None:
            return client_context(self.ca_file, None, None)
        ident = self.identities[username]
        return client_context(self.ca_file, ident.cert_file, ident.key_file)


#: How many free ports to try when another process grabs the one picked first.
PORT_ATTEMPTS = 3


def _start(
    directory: Path,
    write_config: Callable[[int], Path],
    ready: Callable[[int], Ready],
) -> tuple[int, ManagedProcess]:
    """Start mosquitto on a free loopback port; return the port and the running process.

    ``write_config(port)`` writes the configuration and returns its path; ``ready(port)`` is
    the readiness condition. A port taken between picking and binding is retried.
    """
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port(HOST)
        config = write_config(port)
        (directory / "broker.log").unlink(missing_ok=True)
        proc = ManagedProcess(
            [mosquitto_binary(), "-c", config], name="mosquitto", log_path=directory / "broker.log"
        )
        proc.start()
        try:
            proc.wait_ready(ready(port), timeout=READY_TIMEOUT_S)
        except ProcessStartError:
            lost_race = "Address already in use" in proc.read_log()
            proc.close()
            if lost_race and attempt < PORT_ATTEMPTS:
                continue
            raise
        except BaseException:
            proc.close()
            raise
        return port, proc
    raise AssertionError("unreachable: the last attempt returns or raises")


@contextmanager
def plain_broker() -> Iterator[Broker]:
    """A mosquitto on a free loopback port, anonymous clients allowed, no persistence."""
    with broker_directory() as directory:
        config = directory / "mosquitto.conf"

        def write_config(port: int) -> Path:
            lines = [
                f"listener {port} {HOST}",
                "allow_anonymous true",
                "persistence false",
                "log_dest stderr",
                "log_type all",
                "connection_messages true",
            ]
            _write_shared(config, "\n".join(lines) + "\n")
            return config

        port, proc = _start(directory, write_config, lambda p: mqtt_accepting(HOST, p))
        try:
            yield Broker(host=HOST, port=port, process=proc, directory=directory, config=config)
        finally:
            proc.close()


@contextmanager
def tls_broker(fleet: Mapping[str, tuple[str, ...]] = FLEET) -> Iterator[TlsBroker]:
    """A mosquitto running the production mTLS template on a free loopback port.

    Identities: every device of ``fleet`` and the coordinator (``pki.COORDINATOR_IDENTITY``).
    The CRL starts empty.
    """
    group = broker_group()
    with broker_directory() as directory:
        ca = pki.create_ca("nanofleet test CA")
        ca_file = directory / "ca.crt"
        pki.write_certificate(ca.certificate, ca_file)  # the CA's key stays in memory
        server = pki.write_credential(pki.issue_server(ca), directory, "broker", group=group)
        identities: dict[str, Identity] = {}
        issued = {d: pki.issue_device(ca, d) for d in fleet}
        issued[pki.COORDINATOR_IDENTITY] = pki.issue_service(ca, "coordinator")
        for username, cred in issued.items():
            files = pki.write_credential(cred, directory, username.replace(":", "-"))
            identities[username] = Identity(
                username, files.certificate, files.key, cred.certificate.serial_number
            )
        crl_file = directory / "crl.pem"
        pki.write_crl(pki.issue_crl(ca), crl_file)
        acl_file = directory / "acl"
        _write_shared(acl_file, render_acl(fleet.items()))

        config = directory / "mosquitto.conf"

        def write_config(port: int) -> Path:
            broker_files = BrokerFiles(
                ca_file=ca_file,
                cert_file=server.certificate,
                key_file=server.key,
                crl_file=crl_file,
                acl_file=acl_file,
                persistence_dir=directory / "data",
                port=port,
                bind_address=HOST,
            )
            _write_shared(config, render_mosquitto_conf(TEMPLATE.read_text(), broker_files))
            return config

        coordinator = identities[pki.COORDINATOR_IDENTITY]
        probe = client_context(ca_file, coordinator.cert_file, coordinator.key_file)
        port, proc = _start(directory, write_config, lambda p: mqtt_accepting(HOST, p, probe))
        try:
            yield TlsBroker(
                host=HOST,
                port=port,
                process=proc,
                directory=directory,
                config=config,
                ca=ca,
                ca_file=ca_file,
                server=server,
                crl_file=crl_file,
                acl_file=acl_file,
                identities=identities,
                fleet=dict(fleet),
            )
        finally:
            proc.close()
