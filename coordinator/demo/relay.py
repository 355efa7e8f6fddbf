"""A byte-counting TCP relay: what one device sent to and received from the SuperLink.

Each demo device reaches the SuperLink through its own relay on a loopback port. The relay
forwards the bytes unchanged (TLS stays end to end between the SuperNode and the
SuperLink; the relay sees only ciphertext) and counts them each way, so the demo can say
what crossed the network in a round. Threads, not processes: :meth:`CountingRelay.stop`
closes every socket and joins every thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Self

__all__ = ["CountingRelay"]

_CHUNK = 65536
_TICK_S = 0.2


class CountingRelay:
    """Listens on ``127.0.0.1:port``; forwards each connection to ``upstream``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sent = 0
        self._received = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="relay-accept", daemon=True)

    @property
    def sent(self) -> int:
        """Bytes the device sent (device to SuperLink) so far."""
        with self._lock:
            return self._sent

    @property
    def received(self) -> int:
        """Bytes the device received (SuperLink to device) so far."""
        with self._lock:
            return self._received

    def start(self) -> Self:
        self._accepter.start()
        return self

    def _accept(self) -> None:
        self._listener.settimeout(_TICK_S)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            worker = threading.Thread(target=self._pipe, args=(conn,), daemon=True)
            with self._lock:
                self._threads.append(worker)
            worker.start()

    def _pipe(self, down: socket.socket) -> None:
        try:
            up = socket.create_connection(self._upstream, timeout=10)
        except OSError:
            down.close()
            return
        peer = {down: up, up: down}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(list(peer), [], [], _TICK_S)
                for src in ready:
                    data = src.recv(_CHUNK)
                    if not data:
                        return
                    peer[src].sendall(data)
                    with self._lock:
                        if src is down:
                            self._sent += len(data)
                        else:
                            self._received += len(data)
        except OSError:
            return
        finally:
            for s in peer:
                with contextlib.suppress(OSError):
                    s.close()

    def stop(self) -> None:
        """Close the listener and every connection; wait for the threads."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._accepter.is_alive():
            self._accepter.join(2)
        with self._lock:
            threads = list(self._threads)
        for worker in threads:
            worker.join(2)
