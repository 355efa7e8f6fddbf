"""The trainer's derived arrays, kept on the device between the messages of a round.

Flower starts a fresh ClientApp process for every message, so without a cache each train
and evaluate message runs the frozen model again over the same local texts (about 36 s
for 20,000 positions of SmolLM2 on 2 cores) and the train message writes the same anchor
texts again (48 x 128 sampled tokens, one to three minutes). The cache keeps those arrays
beside the local store and hands them to the next message.

Invariants:

- A key is the SHA-256 of everything an entry derives from, each part length-prefixed:
  the model's manifest (which names every file's hash), the kind, the settings and the
  input texts. Another model, other settings or one changed text is a miss.
- One entry per kind: writing an entry deletes the kind's older ones, and an entry older
  than ``ttl_s`` (6 h, one training window) is deleted when the cache is next used, so
  hidden states of texts the store has since dropped do not outlive the next round.
- Files are written under a temporary name, flushed and renamed (a crash leaves no
  half entry), mode 0600 in a 0700 directory. An entry that cannot be read is deleted and
  treated as a miss, never an error: the cache only saves time.
- Nothing in it leaves the device: it is derived from the local texts like the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FeatureCache", "cache_key"]

Array = np.ndarray[Any, Any]

#: How long an entry is kept: one training window (eligibility's default window is
#: shorter); rounds of one run arrive minutes apart.
DEFAULT_TTL_S = 6 * 3600.0


def cache_key(*parts: str | bytes | Iterable[str]) -> str:
    """SHA-256 over ``parts``; an iterable of strings counts as its items, each
    length-prefixed, so no two different inputs share a byte stream."""
    digest = hashlib.sha256()

    def feed(item: str | bytes) -> None:
        data = item.encode() if isinstance(item, str) else item
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    for part in parts:
        if isinstance(part, str | bytes):
            feed(part)
        else:
            items = list(part)
            feed(f"{len(items)} items")
            for item in items:
                feed(item)
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureCache:
    """A directory of ``<kind>-<key>.npz`` entries (uncompressed NumPy archives)."""

    root: Path
    ttl_s: float = DEFAULT_TTL_S
    clock: Callable[[], float] = field(default=time.time, compare=False)

    @classmethod
    def beside(cls, data_path: Path) -> FeatureCache:
        """The cache of the store at ``data_path``: ``<store file name>.cache`` next to it,
        in the directory only the training process writes."""
        return cls(data_path.with_name(data_path.name + ".cache"))

    def get_or_compute(
        self, kind: str, key: str, compute: Callable[[], Mapping[str, Array]]
    ) -> dict[str, Array]:
        """The arrays stored under ``kind``/``key``, or ``compute()``'s, stored for next time.

        Entries are hidden states ``h`` float32 ``[N, hidden]`` with, for texts, their
        targets ``y`` integer ``[N]``; a stored entry of another form is computed again."""
        found = self.load(kind, key)
        if found is not None and _well_formed(found):
            return found
        arrays = dict(compute())
        self.store(kind, key, arrays)
        return arrays

    def load(self, kind: str, key: str) -> dict[str, Array] | None:
        """The entry's arrays, or None (missing, expired or unreadable: then deleted)."""
        self._expire()
        path = self._path(kind, key)
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: np.asarray(npz[name]) for name in npz.files}
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, EOFError):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None

    def store(self, kind: str, key: str, arrays: Mapping[str, Array]) -> None:
        """Write the entry and delete the kind's others. A full disk or a read-only
        directory only costs the next message the time: nothing is raised."""
        path = self._path(kind, key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, allow_pickle=False, **dict(arrays))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return
        for other in self.root.glob(f"{kind}-*.npz"):
            if other != path:
                other.unlink(missing_ok=True)

    def _path(self, kind: str, key: str) -> Path:
        if not kind.isidentifier() or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache kind {kind!r} / key {key!r} is not a plain name")
        return self.root / f"{kind}-{key}.npz"

    def _expire(self) -> None:
        if not self.root.is_dir():
            return
        oldest = self.clock() - self.ttl_s
        for entry in self.root.iterdir():
            try:
                if entry.stat().st_mtime < oldest:
                    entry.unlink(missing_ok=True)
            except FileNotFoundError:
                continue


def _well_formed(arrays: Mapping[str, Array]) -> bool:
    """The feature entries' shape: ``h`` float32 ``[N, hidden]`` and, when present, ``y``
    integer ``[N]``."""
    h = arrays.get("h")
    if h is None or h.dtype != np.float32 or h.ndim != 2:
        return False
    y = arrays.get("y")
    return y is None or (y.ndim == 1 and y.shape[0] == h.shape[0] and y.dtype.kind in "iu")
