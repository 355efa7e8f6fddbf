"""The content-addressed blob store: exact lengths and hashes, resume, no links followed."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api import exceptions

from agent.errors import UnsafePathError
from agent.ota.store import BlobStore

DATA = bytes(range(256)) * 64
SHA = hashlib.sha256(DATA).hexdigest()


class Source:
    """An opener over ``data`` that records the offsets it was opened at."""

    def __init__(self, data: bytes, *, stop_at: int | None = None) -> None:
        self.data = data
        self.stop_at = stop_at
        self.offsets: list[int] = []

    def __call__(self, offset: int) -> Iterator[bytes]:
        self.offsets.append(offset)
        end = len(self.data) if self.stop_at is None else self.stop_at
        for i in range(offset, end, 1000):
            yield self.data[i : min(i + 1000, end)]


def test_a_blob_is_written_once_read_only_and_named_by_its_hash(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    progress: list[int] = []
    path = store.ingest(SHA, len(DATA), Source(DATA), progress.append)
    assert path == tmp_path / "sha256" / SHA
    assert path.read_bytes() == DATA
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert sum(progress) == len(DATA)
    assert store.has(SHA, len(DATA))
    assert store.partial_size(SHA) == 0


def test_a_present_blob_is_not_downloaded_again(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.ingest(SHA, len(DATA), Source(DATA))
    again = Source(DATA)
    store.ingest(SHA, len(DATA), again)
    assert again.offsets == []


def test_more_bytes_than_declared_are_refused_and_dropped(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        store.ingest(SHA, len(DATA), Source(DATA + b"x" * 5000))
    assert not store.has(SHA, len(DATA))
    assert store.partial_size(SHA) == 0


def test_other_bytes_of_the_same_length_are_refused_and_dropped(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(exceptions.LengthOrHashMismatchError):
        store.ingest(SHA, len(DATA), Source(bytes(len(DATA))))
    assert list((tmp_path / "sha256").iterdir()) == []
    assert store.partial_size(SHA) == 0


def test_a_short_download_keeps_its_partial_file_and_resumes_from_it(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(exceptions.DownloadError, match="ended at byte 7000"):
        store.ingest(SHA, len(DATA), Source(DATA, stop_at=7000))
    assert store.partial_size(SHA) == 7000
    rest = Source(DATA)
    progress: list[int] = []
    store.ingest(SHA, len(DATA), rest, progress.append)
    assert rest.offsets == [7000]
    assert sum(progress) == len(DATA) - 7000
    assert store.path(SHA).read_bytes() == DATA


def test_a_corrupt_partial_file_fails_the_hash_and_is_dropped(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    (tmp_path / "partial" / SHA).write_bytes(b"\xff" * 7000)
    with pytest.raises(exceptions.LengthOrHashMismatchError):
        store.ingest(SHA, len(DATA), Source(DATA))
    assert store.partial_size(SHA) == 0
    store.ingest(SHA, len(DATA), Source(DATA))
    assert store.has(SHA, len(DATA))


def test_a_link_in_place_of_a_blob_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    decoy = tmp_path / "decoy"
    decoy.write_bytes(DATA)
    os.symlink(decoy, store.path(SHA))
    with pytest.raises(UnsafePathError, match="symbolic link"):
        store.has(SHA, len(DATA))
    with pytest.raises(UnsafePathError):
        store.ingest(SHA, len(DATA), Source(DATA))


def test_a_link_in_place_of_a_partial_file_is_never_written_through(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, tmp_path / "store" / "partial" / SHA)
    with pytest.raises(UnsafePathError):
        store.ingest(SHA, len(DATA), Source(DATA))
    assert victim.read_bytes() == b"keep me"


def test_prune_keeps_only_what_is_named(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    other = b"other"
    other_sha = hashlib.sha256(other).hexdigest()
    store.ingest(SHA, len(DATA), Source(DATA))
    store.ingest(other_sha, len(other), Source(other))
    assert store.prune({SHA}) == [other_sha]
    assert sorted(store.blobs()) == [SHA]


def test_a_malformed_digest_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        BlobStore(tmp_path).path("../etc/passwd")
