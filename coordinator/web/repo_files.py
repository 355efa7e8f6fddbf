"""HTTP serving of the TUF repository directory: ``metadata/`` and ``targets/``, read-only.

Devices verify every byte against signed metadata, so this server (and any CDN or mirror in
front of it) needs no trust; it must only never serve anything *else* from the disk.

Invariants:

- Only regular files under ``metadata/`` and ``targets/`` of the repository are served.
  A path that is empty, absolute, has a backslash, NUL, an empty, ``.`` or ``..`` segment,
  a segment starting with ``.`` (temporary files of atomic writes), names a directory, or
  reaches a symbolic link anywhere below the root is answered 404, like a missing file:
  there is no directory listing.
- Files are opened once and streamed from that descriptor in :data:`CHUNK_BYTES` pieces
  (``pread`` in a worker thread), never read whole into memory. A file replaced while it
  streams (the repository replaces atomically) keeps streaming the old content, which its
  ETag names.
- One ``bytes`` range is honoured (206 with ``Content-Range``): ``a-b``, ``a-`` and ``-n``;
  an end past the file is clamped. A range that is malformed or starts at or past the end
  of the file is answered 416 with ``Content-Range: bytes */size``. Several ranges, another
  unit, or an ``If-Range`` that does not match the ETag get the whole file (200), as
  RFC 9110 allows. ``If-None-Match`` with the current ETag gets 304.
- ``timestamp.json`` and ``root.json`` (the unversioned names) are ``no-cache``; every other
  file is immutable by construction (versioned or content-addressed names) and says so,
  which is what lets a CDN cache them for good.
"""

from __future__ import annotations

import email.utils
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio.to_thread
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = [
    "CHUNK_BYTES",
    "SERVED_DIRS",
    "ByteRange",
    "RangeNotSatisfiableError",
    "parse_range",
    "repo_files_router",
    "resolve",
]

#: Top-level directories of the repository that are served.
SERVED_DIRS: Final = frozenset({"metadata", "targets"})
#: Bytes read and sent at a time: each piece costs a worker-thread round trip and an
#: event-loop turn, so large pieces make the transfer cheaper (uvicorn has no sendfile).
CHUNK_BYTES: Final = 1024 * 1024
MAX_PATH_CHARS: Final = 1024
_UNVERSIONED: Final = frozenset({"metadata/timestamp.json", "metadata/root.json"})
_IMMUTABLE: Final = "public, max-age=31536000, immutable"
_REVALIDATE: Final = "no-cache"
_SPEC = re.compile(r"(\d{0,19})-(\d{0,19})")


class RangeNotSatisfiableError(ValueError):
    """The Range header asks for bytes the file does not have, or is malformed (416)."""


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range ``first..last`` of a file."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Return the one byte range ``header`` asks for in a file of ``size`` bytes.

    ``None`` means: serve the whole file (no header, another unit, or several ranges).

    Raises:
        RangeNotSatisfiableError: a malformed ``bytes`` range, a first byte at or past the
            end, an end before the start, or a zero-length suffix.
    """
    if header is None:
        return None
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = specs.split(",")
    if len(parts) != 1:
        return None
    match = _SPEC.fullmatch(parts[0].strip())
    if match is None:
        raise RangeNotSatisfiableError(f"malformed range {header[:80]!r}")
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text or int(last_text) == 0:
            raise RangeNotSatisfiableError(f"empty suffix range {header[:80]!r}")
        suffix = int(last_text)
        if size == 0:
            raise RangeNotSatisfiableError("the file is empty")
        return ByteRange(max(0, size - suffix), size - 1)
    first = int(first_text)
    if first >= size:
        raise RangeNotSatisfiableError(f"range starts at {first}, the file has {size} bytes")
    if not last_text:
        return ByteRange(first, size - 1)
    last = int(last_text)
    if last < first:
        raise RangeNotSatisfiableError(f"range ends ({last}) before it starts ({first})")
    return ByteRange(first, min(last, size - 1))


def resolve(root: Path, relative: str) -> Path | None:
    """Return the file ``relative`` names under ``root``, or None if it must not be served.

    Pure path rules only (see the module docstring); :func:`repo_files_router` also refuses
    links and non-regular files when it opens the result.
    """
    if not relative or len(relative) > MAX_PATH_CHARS:
        return None
    if relative.startswith("/") or "\\" in relative or "\x00" in relative:
        return None
    segments = relative.split("/")
    if segments[0] not in SERVED_DIRS or len(segments) < 2:
        return None
    if any(s in ("", ".", "..") or s.startswith(".") for s in segments):
        return None
    return root.joinpath(*segments)


def _open_regular(root: Path, path: Path) -> tuple[int, os.stat_result] | None:
    """Open ``path`` if it is a regular file reached without links; return (fd, stat)."""
    try:
        if os.path.realpath(path) != os.path.join(os.path.realpath(root), path.relative_to(root)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


class _FileResponse(Response):
    """Streams ``length`` bytes of ``fd`` from ``offset``; closes ``fd`` whatever happens."""

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        *,
        status_code: int,
        headers: dict[str, str],
        send_body: bool,
    ) -> None:
        super().__init__(status_code=status_code, headers=headers)
        self._fd, self._offset, self._length, self._send_body = fd, offset, length, send_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            start = {"status": self.status_code, "headers": self.raw_headers}
            await send({"type": "http.response.start", **start})
            offset, remaining = self._offset, self._length if self._send_body else 0
            while remaining > 0:
                chunk = await anyio.to_thread.run_sync(
                    os.pread, self._fd, min(CHUNK_BYTES, remaining), offset
                )
                if not chunk:
                    break
                offset += len(chunk)
                remaining -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(self._fd)


def _not_found() -> Response:
    return Response(status_code=404, content=b"not found\n", media_type="text/plain")


def repo_files_router(root: Path) -> APIRouter:
    """A router serving the repository at ``root`` (include it under a prefix, e.g. /repo)."""
    router = APIRouter()

    @router.api_route("/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def serve_file(path: str, request: Request) -> Response:
        target = resolve(root, path)
        opened = _open_regular(root, target) if target is not None else None
        if opened is None:
            return _not_found()
        fd, st = opened
        etag = _etag(st)
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "Cache-Control": _REVALIDATE if path in _UNVERSIONED else _IMMUTABLE,
            "Content-Type": "application/json"
            if path.endswith(".json")
            else "application/octet-stream",
        }
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            os.close(fd)
            return Response(status_code=304, headers=headers)
        range_header = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if if_range is not None and if_range.strip() != etag:
            range_header = None
        try:
            wanted = parse_range(range_header, st.st_size)
        except RangeNotSatisfiableError:
            os.close(fd)
            return Response(
                status_code=416,
                headers={"Content-Range": f"bytes */{st.st_size}", "ETag": etag},
            )
        send_body = request.method == "GET"
        if wanted is None:
            headers["Content-Length"] = str(st.st_size)
            return _FileResponse(
                fd, 0, st.st_size, status_code=200, headers=headers, send_body=send_body
            )
        headers["Content-Length"] = str(wanted.length)
        headers["Content-Range"] = f"bytes {wanted.first}-{wanted.last}/{st.st_size}"
        return _FileResponse(
            fd, wanted.first, wanted.length, status_code=206, headers=headers, send_body=send_body
        )

    return router
