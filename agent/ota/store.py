"""The device's content-addressed blob store: ``blobs/sha256/<hex>``.

Invariants:

- a file named ``sha256/<hex>`` holds exactly the bytes whose SHA-256 is ``<hex>``: bytes
  are hashed once while they stream in, to ``partial/<hex>``, then fsynced and renamed into
  place; a blob is never modified (mode 0444) and slots hard-link to it;
- the store never follows a symbolic link: a link where a blob or a partial file should be
  is refused with :class:`~agent.errors.UnsafePathError`;
- a partial file left by a cut or a crash is resumed from its length (its bytes are hashed
  again first); a partial file that turns out wrong is deleted, so the next attempt starts
  from zero.

Lengths and hashes come from verified TUF metadata; the store takes them as given and
enforces them exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from tuf.api import exceptions

from agent.errors import UnsafePathError
from agent.ota._fs import fsync_dir

#: Opens the remote file from a byte offset; yields its bytes from there.
Opener = Callable[[int], Iterator[bytes]]
#: Called with the number of new bytes written.
ProgressHook = Callable[[int], None]

_HEX = frozenset("0123456789abcdef")


def _check_digest(sha256: str) -> None:
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")


def _regular_size(path: Path) -> int | None:
    """Return the size of the regular file ``path``, None if absent; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UnsafePathError(f"{path} is {kind}; the store never follows it")
    return st.st_size


class BlobStore:
    """Blobs under ``root``; see the module docstring for the invariants."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "sha256"
        self._partial = root / "partial"
        for directory in (root, self._blobs, self._partial):
            directory.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Return where the blob ``sha256`` lives (whether or not it is present)."""
        _check_digest(sha256)
        return self._blobs / sha256

    def has(self, sha256: str, size: int) -> bool:
        """Return whether the blob is present with the right size.

        Raises:
            UnsafePathError: the blob's name is taken by a link or a non-regular file.
        """
        return _regular_size(self.path(sha256)) == size

    def partial_size(self, sha256: str) -> int:
        """Return how many bytes of the blob an earlier attempt left (0 if none)."""
        _check_digest(sha256)
        return _regular_size(self._partial / sha256) or 0

    def ingest(
        self, sha256: str, size: int, opener: Opener, progress: ProgressHook | None = None
    ) -> Path:
        """Download the blob ``sha256`` of ``size`` bytes through ``opener`` unless present.

        Returns the blob's path.

        Raises:
            tuf.api.exceptions.DownloadLengthMismatchError: more bytes than ``size`` arrived.
            tuf.api.exceptions.LengthOrHashMismatchError: the bytes have another hash.
            tuf.api.exceptions.DownloadError: the download failed or ended short (the
                partial file stays for a resume).
            UnsafePathError: a link sits where the blob or its partial file belongs.
            OSError: the disk is full or not writable.
        """
        final = self.path(sha256)
        if _regular_size(final) == size:
            return final
        partial = self._partial / sha256
        have = _regular_size(partial) or 0
        digest = hashlib.sha256()
        if have > size:
            os.unlink(partial)
            have = 0
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
        fd = os.open(partial, flags, 0o600)
        try:
            with os.fdopen(fd, "r+b") as f:
                f.truncate(have)
                _hash_prefix(f, have, digest)
                f.seek(have)
                written = have
                if written < size:
                    for chunk in opener(written):
                        written += len(chunk)
                        if written > size:
                            raise exceptions.DownloadLengthMismatchError(
                                f"blob {sha256[:12]}: more than the {size} bytes its target "
                                "declares arrived"
                            )
                        digest.update(chunk)
                        f.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
                if written < size:
                    raise exceptions.DownloadError(
                        f"blob {sha256[:12]}: download ended at byte {written} of {size}"
                    )
                if digest.hexdigest() != sha256:
                    raise exceptions.LengthOrHashMismatchError(
                        f"blob {sha256[:12]}: the {size} bytes received have sha256 "
                        f"{digest.hexdigest()}, not the one its signed target names"
                    )
                f.flush()
                os.fsync(f.fileno())
        except (exceptions.DownloadLengthMismatchError, exceptions.LengthOrHashMismatchError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        os.chmod(partial, 0o444)
        os.replace(partial, final)
        fsync_dir(self._blobs)
        return final

    def blobs(self) -> Iterable[str]:
        """Return the digests of the blobs present."""
        return [entry.name for entry in os.scandir(self._blobs) if entry.is_file()]

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every blob and partial file not named in ``keep``; return what was deleted."""
        removed = []
        for directory in (self._blobs, self._partial):
            for entry in os.scandir(directory):
                if entry.name not in keep:
                    os.unlink(entry.path)
                    removed.append(entry.name)
        if removed:
            fsync_dir(self._blobs)
        return removed


def _hash_prefix(f: BinaryIO, length: int, digest: hashlib._Hash) -> None:
    left = length
    while left:
        block = f.read(min(left, 1 << 20))
        if not block:
            raise exceptions.DownloadError("partial file shrank while it was being read")
        digest.update(block)
        left -= len(block)
