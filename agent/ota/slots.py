"""The two model slots and the ``current.json`` pointer that says which one is committed.

Layout under the slots root::

    slot_a/base/...         the base bundle's files (hard links into the blob store)
    slot_a/adapter/...      the adapter bundle's files, when the release has one
    slot_a/slot.json        the release plan staged here, written last (the slot is complete)
    slot_b/...
    current.json            the committed release: slot, bundles, release counter

Invariants:

- the committed slot (the one ``current.json`` names) is never written: staging refuses it;
- ``current.json`` is replaced atomically, so after any crash it names the old or the new
  slot, and that slot is complete (it was staged, fsynced and health-checked first);
- slot files are hard links, not symbolic links: ONNX Runtime refuses external weights
  reached through a symlink, and a link cannot be redirected. Store and slots must be on
  the same file system;
- the pointer is a JSON file rather than a symlink so it works on any file system and
  carries the release counter that guards against base rollback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import UpdateStorageError
from agent.ota._fs import fsync_dir, make_dirs, remove_tree, write_atomic
from agent.ota.plan import ReleasePlan
from agent.ota.store import BlobStore
from protocol._types import TopicSegment
from protocol.messages import BundleRef, Slot

POINTER_NAME = "current.json"
MARKER_NAME = "slot.json"
BASE_DIR = "base"
ADAPTER_DIR = "adapter"


class InstalledRelease(BaseModel):
    """The content of ``current.json``: what the device runs after a restart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slot: Slot
    release_id: str = Field(min_length=64, max_length=64)
    group: TopicSegment
    channel: TopicSegment
    base: BundleRef
    adapter: BundleRef | None
    release_counter: int = Field(ge=1)
    """The committed base's release counter: no base below it is installed."""


class SlotManager:
    """Stages releases into the inactive slot and commits them; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, slot: Slot) -> Path:
        return self.root / f"slot_{slot.value}"

    def base_dir(self, slot: Slot) -> Path:
        """The model directory the runtime loads from ``slot``."""
        return self.path(slot) / BASE_DIR

    def adapter_dir(self, slot: Slot) -> Path:
        """The adapter directory of ``slot`` (present only when its release has one)."""
        return self.path(slot) / ADAPTER_DIR

    def current(self) -> InstalledRelease | None:
        """Return the committed release, or None on a device that has none yet.

        Raises:
            UpdateStorageError: ``current.json`` cannot be read or parsed.
        """
        try:
            data = (self.root / POINTER_NAME).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UpdateStorageError(f"{self.root / POINTER_NAME}: {e}") from e
        try:
            return InstalledRelease.model_validate_json(data)
        except ValidationError as e:
            raise UpdateStorageError(f"{self.root / POINTER_NAME} is corrupt: {e}") from e

    def inactive(self) -> Slot:
        """Return the slot an update may stage into: the one not committed."""
        current = self.current()
        return Slot.B if current is not None and current.slot is Slot.A else Slot.A

    def staged(self, slot: Slot) -> ReleasePlan | None:
        """Return the plan completely staged in ``slot``, or None if it holds none."""
        try:
            return ReleasePlan.model_validate_json((self.path(slot) / MARKER_NAME).read_bytes())
        except (FileNotFoundError, NotADirectoryError, ValidationError):
            return None

    def stage(self, slot: Slot, plan: ReleasePlan, store: BlobStore) -> None:
        """Fill ``slot`` with hard links to the plan's blobs, then write its marker.

        Raises:
            UpdateStorageError: a blob is missing or the disk failed.
            UnsafePathError: a path would pass through a link.
            RuntimeError: ``slot`` is the committed slot (an internal error: never written).
        """
        current = self.current()
        if current is not None and current.slot is slot:
            raise RuntimeError(f"slot {slot.value} is committed; staging into it is forbidden")
        directory = self.path(slot)
        try:
            remove_tree(directory)
            directory.mkdir()
            for bundle, sub in ((plan.base, BASE_DIR), (plan.adapter, ADAPTER_DIR)):
                if bundle is None:
                    continue
                bundle_root = make_dirs(directory, sub)
                for planned in bundle.files:
                    if not store.has(planned.sha256, planned.size):
                        raise UpdateStorageError(
                            f"blob {planned.sha256[:12]} of {planned.path} is missing from the "
                            "store"
                        )
                    parent, _, name = planned.path.rpartition("/")
                    target_dir = make_dirs(bundle_root, parent) if parent else bundle_root
                    _link(store.path(planned.sha256), target_dir / name)
                for sub_dir, _, _ in os.walk(bundle_root):
                    fsync_dir(Path(sub_dir))
            fsync_dir(directory)
            write_atomic(directory / MARKER_NAME, plan.model_dump_json().encode())
        except OSError as e:
            raise UpdateStorageError(f"staging into slot {slot.value}: {e}") from e

    def commit(self, slot: Slot, plan: ReleasePlan) -> InstalledRelease:
        """Point ``current.json`` at ``slot``, which must hold ``plan`` completely.

        Raises:
            UpdateStorageError: the slot does not hold the plan, or the disk failed (the
                pointer is then unchanged).
        """
        staged = self.staged(slot)
        if staged is None or staged.release_id != plan.release_id:
            raise UpdateStorageError(f"slot {slot.value} does not hold release {plan.release_id}")
        if plan.base.release_counter is None:
            raise UpdateStorageError("a base bundle without a release counter cannot be committed")
        installed = InstalledRelease(
            slot=slot,
            release_id=plan.release_id,
            group=plan.group,
            channel=plan.channel,
            base=plan.base.ref,
            adapter=plan.adapter.ref if plan.adapter else None,
            release_counter=plan.base.release_counter,
        )
        try:
            write_atomic(self.root / POINTER_NAME, installed.model_dump_json().encode())
        except OSError as e:
            raise UpdateStorageError(f"committing slot {slot.value}: {e}") from e
        return installed

    def referenced_blobs(self) -> set[str]:
        """Return the hashes of every file either slot holds (kept by the store's prune)."""
        keep: set[str] = set()
        for slot in Slot:
            plan = self.staged(slot)
            if plan is not None:
                keep.update(plan.blobs())
        return keep


def _link(blob: Path, dest: Path) -> None:
    try:
        os.link(blob, dest, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise UpdateStorageError(
                f"{dest}: the blob store and the slots must be on the same file system"
            ) from e
        raise
