"""A federated fleet on loopback for tests and benchmarks: a real SuperLink, real SuperNodes.

- :class:`CaptureProxy`: a TLS-terminating TCP proxy in front of the SuperLink that
  records every byte the devices send (after TLS, i.e. the HTTP requests as Flower sends
  them), so a test can look for local data in it.
- :class:`Fleet`: TLS material from the fleet CA, the SuperLink, the ``flwr`` CLI, and one
  SuperNode per device, each with its own node key (registered), local text store and
  state directory. Everything is stopped by PID on exit.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from agent.federated.datastore import LocalTextStore, Source
from agent.federated.supernode import SuperNode, SuperNodeConfig, ensure_node_key
from coordinator.federation.superlink import FlowerCli, SuperLink, SuperLinkConfig
from coordinator.pki import create_ca, issue_server, write_certificate, write_credential
from coordinator.processes import descendants, is_running
from tests.support.processes import free_port


class CaptureProxy:
    """Accepts TLS on a loopback port, forwards to ``upstream`` over TLS, records uploads."""

    def __init__(self, upstream_port: int, certfile: Path, keyfile: Path, ca: Path) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ctx.load_cert_chain(certfile, keyfile)
        self._client_ctx = ssl.create_default_context(cafile=str(ca))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._uploaded: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def uploaded(self) -> bytes:
        """Everything any device sent so far, concatenated."""
        with self._lock:
            return b"".join(self._uploaded)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Both directions in one thread: an SSL object must not be used by two at once."""
        try:
            down = self._server_ctx.wrap_socket(conn, server_side=True)
            up = self._client_ctx.wrap_socket(
                socket.create_connection(self._upstream), server_hostname="127.0.0.1"
            )
        except (OSError, ssl.SSLError):
            conn.close()
            return
        peers = {down: up, up: down}
        for s in peers:
            s.setblocking(False)
        try:
            while not self._stop.is_set():
                ready = [s for s in peers if s.pending()]
                if not ready:
                    ready, _, _ = select.select(list(peers), [], [], 0.5)
                for src in ready:
                    try:
                        data = src.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        continue  # a TLS record that carries no data (e.g. a ticket)
                    if not data:
                        return
                    if src is down:
                        with self._lock:
                            self._uploaded.append(data)
                    self._send(peers[src], data)
        except (OSError, ssl.SSLError):
            return
        finally:
            for s in peers:
                with contextlib.suppress(OSError):
                    s.close()

    @staticmethod
    def _send(dst: ssl.SSLSocket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = dst.send(view)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                select.select([], [dst], [], 0.5)
                continue
            view = view[sent:]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sock.close()


@dataclass
class Device:
    name: str
    data_path: Path
    node: SuperNode
    #: The node ID the SuperLink gave its key (None: never registered).
    node_id: int | None = None


@dataclass
class Fleet:
    """SuperLink + CLI + devices under ``work``; devices connect through a capture proxy."""

    work: Path
    model_dir: Path
    devices: list[Device] = field(default_factory=list)

    def __post_init__(self) -> None:
        tls = self.work / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        ca = create_ca()
        self.ca_file = tls / "ca.crt"
        write_certificate(ca.certificate, self.ca_file)
        files = write_credential(issue_server(ca, ("localhost",), ("127.0.0.1",)), tls, "link")
        self.link = SuperLink(
            SuperLinkConfig(
                host="127.0.0.1",
                port=free_port(),
                certfile=files.certificate,
                keyfile=files.key,
                ca_certfile=self.ca_file,
                state_dir=self.work / "superlink",
            )
        )
        self.proxy = CaptureProxy(self.link.config.port, files.certificate, files.key, self.ca_file)
        self.cli = FlowerCli(self.work / "operator", self.link.config.address, self.ca_file)

    def add_device(
        self,
        name: str,
        texts: list[str],
        *,
        register: bool = True,
        registrar: Callable[[str, Path], int] | None = None,
    ) -> Device:
        """Create the device's store with ``texts``, its node key, and start its SuperNode.

        The key is registered with the SuperLink (unless ``register`` is false) by
        ``registrar(name, public_key)`` when given (which returns the node ID), else by the
        ``flwr`` CLI directly."""
        home = self.work / name
        data_path = home / "training-texts.sqlite3"
        store = LocalTextStore.open(data_path)
        try:
            store.add_texts(texts, Source.IMPORT)
        finally:
            store.close()
        key = ensure_node_key(home / "keys")
        node_id: int | None = None
        if register:
            node_id = (
                registrar(name, key.public_key)
                if registrar is not None
                else self.cli.register_node(key.public_key)
            )
        node = SuperNode(
            SuperNodeConfig(
                superlink=f"127.0.0.1:{self.proxy.port}",
                root_certificates=self.ca_file,
                node_key=key.private_key,
                data_path=data_path,
                model_dir=self.model_dir,
                state_dir=home / "supernode",
                clientappio_port=free_port(),
            )
        ).start()
        device = Device(name, data_path, node, node_id)
        self.devices.append(device)
        return device

    def node_ids(self, names: list[str] | None = None) -> tuple[int, ...]:
        """The registered node IDs of the devices named (default: all registered ones)."""
        return tuple(
            d.node_id
            for d in self.devices
            if d.node_id is not None and (names is None or d.name in names)
        )

    def __enter__(self) -> Self:
        self.link.start()
        self.proxy.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for device in self.devices:
            device.node.stop()
        self.proxy.__exit__()
        link_pid = self.link.pid
        below = descendants(link_pid) if link_pid is not None else []
        self.link.stop()
        # Stopping the SuperLink also stops what it started (flower-superexec, serverapps).
        left = [pid for pid in below if is_running(pid)]
        if exc_type is None:
            assert not left, f"the SuperLink left processes running: {left}"
