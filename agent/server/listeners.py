"""The server's sockets: a Unix socket whose mode and group decide who may connect, an
optional loopback TCP socket, and the peer credentials of each connection.

Invariants:

- The Unix socket file is created with mode 0600 (umask set around ``bind``), then given to
  its group and opened to 0660; at no moment can a user outside owner and group connect.
  (uvicorn's own ``uds=`` path binds first and then sets 0666, which is why the agent binds
  the sockets itself and hands them to uvicorn.)
- A stale socket file is replaced; any other file at the path is left alone and refused.
- Every request's ASGI scope carries ``scope["extensions"]["nanofleet.peer"]``, a
  :class:`Peer` built from the connection itself: SO_PEERCRED (pid, uid, gid) for the Unix
  socket, the address for TCP. The app never trusts a header for this.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.errors import ConfigError

#: Mode of the socket file: owner and group may connect, nobody else.
SOCKET_MODE = 0o660
#: Pending connections the kernel keeps per listener.
BACKLOG = 128
#: The ASGI scope extension that carries the peer of a request.
PEER_EXTENSION = "nanofleet.peer"

_UCRED = struct.Struct("3i")  # pid, uid, gid: struct ucred on Linux


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection."""

    transport: Literal["unix", "tcp"]
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    address: str | None = None


def resolve_group(group: str) -> int:
    """Return the gid of ``group`` (a name or a number).

    Raises:
        ConfigError: no such group (the message names ``server.socket_group``).
    """
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise ConfigError(f"server.socket_group: no group named {group!r}") from e


def bind_unix(path: Path, gid: int | None) -> socket.socket:
    """Bind and listen on a Unix socket at ``path``: mode 0660, group ``gid`` if given.

    Raises:
        OSError: the path cannot be bound (missing directory, permissions, or another kind
            of file is in the way).
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, SOCKET_MODE)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (the config allows loopback hosts only).

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_of(sock: socket.socket | None) -> Peer | None:
    """The peer of a connected socket, or None when it cannot be told."""
    if sock is None:
        return None
    if sock.family == socket.AF_UNIX:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        return Peer("unix", pid=pid, uid=uid, gid=gid)
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return None
    return Peer("tcp", address=f"{host}:{port}")


class PeerAwareProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, adding the connection's :class:`Peer` to each scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = peer_of(transport.get_extra_info("socket"))
        inner = self.app

        async def with_peer(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})[PEER_EXTENSION] = peer
            await inner(scope, receive, send)

        self.app = with_peer
