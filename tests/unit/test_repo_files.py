"""Serving the repository directory: Range semantics, caching headers, streaming, and
refusal of every path that leaves ``metadata/`` or ``targets/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from coordinator.web.repo_files import (
    CHUNK_BYTES,
    ByteRange,
    RangeNotSatisfiableError,
    parse_range,
    repo_files_router,
    resolve,
)

DATA = bytes(range(100))
TARGET = "targets/models/tiny/1.0.0/" + "0" * 64 + ".model.onnx"
BIG = "targets/models/tiny/1.0.0/" + "1" * 64 + ".model.onnx.data"
BIG_DATA = os.urandom(3 * CHUNK_BYTES + 123)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "timestamp.json").write_text('{"signed": {}}')
    (root / "metadata" / "3.snapshot.json").write_text('{"signed": {}}')
    (root / "metadata" / ".timestamp.json.tmp").write_text("half written")
    for name, data in ((TARGET, DATA), (BIG, BIG_DATA)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "targets" / ".incoming").mkdir()
    (root / "targets" / ".incoming" / "partial").write_bytes(b"partial")
    (root / "keys").mkdir()
    (root / "keys" / "timestamp.key").write_text("PRIVATE KEY")
    (tmp_path / "secret").write_text("outside the repository")
    (root / "metadata" / "link.json").symlink_to(tmp_path / "secret")
    (root / "targets" / "linked").symlink_to(tmp_path, target_is_directory=True)
    return root


class Client:
    """A synchronous client for the app, over httpx's ASGI transport (no network)."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    def request(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        async def main() -> httpx.Response:
            transport = httpx.ASGITransport(app=self._app)
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as c:
                return await c.request(method, url, headers=headers)

        return anyio.run(main)

    def get(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("GET", url, headers or {})

    def head(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("HEAD", url, headers or {})


@pytest.fixture
def client(repo: Path) -> Client:
    app = FastAPI()
    app.include_router(repo_files_router(repo), prefix="/repo")
    return Client(app)


def _get(client: Client, path: str, **headers: str) -> Any:
    return client.get(f"/repo/{path}", headers=headers)


# -- Range over HTTP ---------------------------------------------------------------------

RANGES = [
    # (Range header, status, body slice, Content-Range)
    (None, 200, slice(0, 100), None),
    ("bytes=0-9", 206, slice(0, 10), "bytes 0-9/100"),
    ("bytes=10-", 206, slice(10, 100), "bytes 10-99/100"),
    ("bytes=-5", 206, slice(95, 100), "bytes 95-99/100"),
    ("bytes=-500", 206, slice(0, 100), "bytes 0-99/100"),
    ("bytes=99-99", 206, slice(99, 100), "bytes 99-99/100"),
    ("bytes=90-500", 206, slice(90, 100), "bytes 90-99/100"),
    (" bytes = 0-1 ", 206, slice(0, 2), "bytes 0-1/100"),
    ("bytes=100-", 416, None, "bytes */100"),
    ("bytes=500-600", 416, None, "bytes */100"),
    ("bytes=-0", 416, None, "bytes */100"),
    ("bytes=9-3", 416, None, "bytes */100"),
    ("bytes=abc", 416, None, "bytes */100"),
    ("bytes=-", 416, None, "bytes */100"),
    ("bytes=0-1,5-6", 200, slice(0, 100), None),  # several ranges: the whole file
    ("items=0-1", 200, slice(0, 100), None),  # another unit: ignored
]


@pytest.mark.parametrize(("header", "status", "part", "content_range"), RANGES)
def test_range_requests(
    client: Client, header: str | None, status: int, part: slice | None, content_range: str
) -> None:
    response = _get(client, TARGET, **({"Range": header} if header else {}))
    assert response.status_code == status
    assert response.headers.get("content-range") == content_range
    if part is not None:
        assert response.content == DATA[part]
        assert response.headers["content-length"] == str(len(DATA[part]))
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["etag"]


def test_if_range_with_the_current_etag_resumes_and_with_another_sends_everything(
    client: Client,
) -> None:
    etag = _get(client, TARGET).headers["etag"]
    resumed = _get(client, TARGET, Range="bytes=50-", **{"If-Range": etag})
    assert (resumed.status_code, resumed.content) == (206, DATA[50:])
    changed = _get(client, TARGET, Range="bytes=50-", **{"If-Range": '"old"'})
    assert (changed.status_code, changed.content) == (200, DATA)


def test_if_none_match_with_the_current_etag_is_not_modified(client: Client) -> None:
    etag = _get(client, TARGET).headers["etag"]
    response = _get(client, TARGET, **{"If-None-Match": etag})
    assert response.status_code == 304
    assert response.content == b""


def test_a_replaced_file_gets_a_new_etag(client: Client, repo: Path) -> None:
    before = _get(client, "metadata/timestamp.json").headers["etag"]
    tmp = repo / "metadata" / ".new"
    tmp.write_text('{"signed": {"version": 2}}')
    os.replace(tmp, repo / "metadata" / "timestamp.json")
    assert _get(client, "metadata/timestamp.json").headers["etag"] != before


def test_head_sends_the_headers_without_the_body(client: Client) -> None:
    response = client.head(f"/repo/{TARGET}", headers={"Range": "bytes=0-9"})
    assert response.status_code == 206
    assert response.headers["content-length"] == "10"
    assert response.content == b""


def test_unversioned_metadata_must_be_revalidated_and_the_rest_is_immutable(
    client: Client,
) -> None:
    timestamp = _get(client, "metadata/timestamp.json")
    assert timestamp.headers["cache-control"] == "no-cache"
    assert timestamp.headers["content-type"] == "application/json"
    assert "immutable" in _get(client, "metadata/3.snapshot.json").headers["cache-control"]
    target = _get(client, TARGET)
    assert "immutable" in target.headers["cache-control"]
    assert target.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("header", "part"),
    [(None, slice(None)), (f"bytes={CHUNK_BYTES - 10}-{2 * CHUNK_BYTES + 9}", None)],
)
def test_large_files_stream_in_chunks(repo: Path, header: str | None, part: slice | None) -> None:
    """Drive the app as ASGI directly and look at every body message it sends."""
    app = FastAPI()
    app.include_router(repo_files_router(repo), prefix="/repo")
    sent: list[dict[str, Any]] = []
    headers = [(b"range", header.encode())] if header else []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/repo/{BIG}",
        "raw_path": f"/repo/{BIG}".encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    expected = BIG_DATA[part] if part else BIG_DATA[CHUNK_BYTES - 10 : 2 * CHUNK_BYTES + 10]
    assert b"".join(bodies) == expected
    pieces = [len(b) for b in bodies if b]
    assert len(pieces) >= 2
    # Every piece but the last is a full chunk, and chunks are large: each one costs the
    # server a worker-thread round trip (64 KiB pieces made it 2x slower than a static host).
    assert all(n == CHUNK_BYTES for n in pieces[:-1])
    assert 0 < pieces[-1] <= CHUNK_BYTES
    assert CHUNK_BYTES >= 1024 * 1024


# -- paths that must not be served --------------------------------------------------------

REFUSED = [
    "",
    "metadata",
    "metadata/",
    "targets/models",  # a directory: no listing
    "metadata/missing.json",
    "%2e%2e/secret",
    "metadata/%2e%2e/%2e%2e/secret",
    "metadata/..%2f..%2fsecret",
    "metadata%2f..%2f..%2fsecret",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "metadata%5c..%5c..%5csecret",
    "metadata/timestamp.json%00",
    "metadata/%2e/timestamp.json",
    "metadata//timestamp.json",
    "metadata/.timestamp.json.tmp",  # a half-written atomic write
    "targets/.incoming/partial",
    "keys/timestamp.key",  # in the repository directory, but not served
    "metadata/link.json",  # a symbolic link out of the tree
    "targets/linked/secret",  # through a linked directory
]


@pytest.mark.parametrize("path", REFUSED)
def test_paths_outside_the_served_tree_are_not_found(client: Client, path: str) -> None:
    response = client.get(f"/repo/{path}")
    assert response.status_code == 404
    assert b"outside" not in response.content
    assert b"PRIVATE" not in response.content


def test_served_paths_still_work(client: Client) -> None:
    assert _get(client, "metadata/timestamp.json").status_code == 200
    assert _get(client, TARGET).content == DATA


@pytest.mark.parametrize(
    "relative",
    ["../x", "metadata/../x", "/metadata/x", "metadata\\x", "metadata/\x00", "other/x", "metadata"],
)
def test_resolve_refuses(tmp_path: Path, relative: str) -> None:
    assert resolve(tmp_path, relative) is None


def test_resolve_accepts_a_plain_path(tmp_path: Path) -> None:
    assert resolve(tmp_path, "targets/a/b.bin") == tmp_path / "targets" / "a" / "b.bin"


# -- the parser alone ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, ByteRange(0, 0)),
        ("bytes=3-", 10, ByteRange(3, 9)),
        ("bytes=-3", 10, ByteRange(7, 9)),
        ("bytes=-30", 10, ByteRange(0, 9)),
        ("bytes=5-99", 10, ByteRange(5, 9)),
        ("BYTES=1-2", 10, ByteRange(1, 2)),
        ("bytes=1-2,4-5", 10, None),
        ("lines=1-2", 10, None),
        ("bytes", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=10-", 10),
        ("bytes=0-", 0),
        ("bytes=-1", 0),
        ("bytes=-0", 10),
        ("bytes=5-4", 10),
        ("bytes=x-4", 10),
        ("bytes=1-2-3", 10),
        ("bytes=" + "9" * 30 + "-", 10),
    ],
)
def test_parse_range_refuses(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, size)
