"""Durable file operations: atomic replace with fsync, and path checks that never follow links.

Invariant: after :func:`write_atomic` returns, the file holds either its old or its new
bytes after any crash or power cut, never a mix; the directory entry is on disk too.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from agent.errors import UnsafePathError


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new, renamed or removed names) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, ``os.replace``.

    Raises:
        OSError: the directory is not writable or the disk is full; ``path`` is unchanged.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def make_dirs(root: Path, relative: str) -> Path:
    """Create the directories of ``relative`` under ``root`` one level at a time.

    Returns the directory. Each level that exists must be a real directory.

    Raises:
        UnsafePathError: a level is a symbolic link or not a directory.
    """
    current = root
    for part in Path(relative).parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current)
            continue
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise UnsafePathError(f"{current} is {kind}; refusing to write through it")
    return current


def remove_tree(path: Path) -> None:
    """Remove ``path`` whether it is a directory tree, a file or a link; links are not followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        for child in os.scandir(path):
            remove_tree(Path(child.path))
        os.rmdir(path)
    else:
        os.unlink(path)
