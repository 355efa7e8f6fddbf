"""A/B slots: staging by hard link, the committed slot never written, the atomic pointer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import UnsafePathError, UpdateStorageError
from agent.ota.slots import SlotManager
from agent.ota.store import BlobStore
from protocol.messages import Slot
from tests.support.repo_simulator import (
    plan_from_bundle,
    write_adapter_bundle,
    write_base_bundle,
    write_bundle,
)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def test_stage_links_every_file_and_commit_points_at_the_slot(
    tmp_path: Path, store: BlobStore
) -> None:
    base = write_base_bundle(tmp_path / "b1")
    write_adapter_bundle(tmp_path / "a1", base)
    plan = plan_from_bundle(tmp_path / "b1", adapter_dir=tmp_path / "a1", store=store)
    slots = SlotManager(tmp_path / "slots")
    assert slots.current() is None
    assert slots.inactive() is Slot.A

    slots.stage(Slot.A, plan, store)
    weights = slots.base_dir(Slot.A) / "model.onnx.data"
    assert weights.read_bytes() == (tmp_path / "b1" / "model.onnx.data").read_bytes()
    assert not weights.is_symlink()
    assert os.stat(weights).st_ino == os.stat(store.path(plan.base.files[2].sha256)).st_ino
    assert (slots.adapter_dir(Slot.A) / "adapter.npz").exists()
    assert slots.staged(Slot.A) == plan

    installed = slots.commit(Slot.A, plan)
    assert slots.current() == installed
    assert installed.release_counter == 1
    assert installed.adapter is not None
    assert slots.inactive() is Slot.B
    assert slots.referenced_blobs() == set(plan.blobs())


def test_the_committed_slot_is_never_staged_into(tmp_path: Path, store: BlobStore) -> None:
    write_base_bundle(tmp_path / "b1")
    plan = plan_from_bundle(tmp_path / "b1", store=store)
    slots = SlotManager(tmp_path / "slots")
    slots.stage(Slot.A, plan, store)
    slots.commit(Slot.A, plan)
    with pytest.raises(RuntimeError, match="committed"):
        slots.stage(Slot.A, plan, store)


def test_staging_replaces_an_old_slot_without_following_links(
    tmp_path: Path, store: BlobStore
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    slots = SlotManager(tmp_path / "slots")
    slots.path(Slot.B).mkdir()
    (slots.path(Slot.B) / "base").symlink_to(outside, target_is_directory=True)
    write_base_bundle(tmp_path / "b1")
    plan = plan_from_bundle(tmp_path / "b1", store=store)
    slots.stage(Slot.B, plan, store)
    assert not slots.base_dir(Slot.B).is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


def test_nested_bundle_paths_become_directories(tmp_path: Path, store: BlobStore) -> None:
    base = write_base_bundle(tmp_path / "b1")
    files = {f.path: (tmp_path / "b1" / f.path).read_bytes() for f in base.files}
    files["onnx/model.onnx"] = files.pop("model.onnx")
    nested = base.model_copy(
        update={
            "files": [
                f.model_copy(update={"path": "onnx/model.onnx"}) if f.path == "model.onnx" else f
                for f in base.files
            ]
        }
    )
    write_bundle(tmp_path / "nested", nested, files)
    plan = plan_from_bundle(tmp_path / "nested", store=store)
    slots = SlotManager(tmp_path / "slots")
    slots.stage(Slot.A, plan, store)
    assert (slots.base_dir(Slot.A) / "onnx" / "model.onnx").is_file()


def test_a_file_path_clashing_with_a_directory_is_refused(tmp_path: Path, store: BlobStore) -> None:
    write_base_bundle(tmp_path / "b1")
    plan = plan_from_bundle(tmp_path / "b1", store=store)
    weights = next(f for f in plan.base.files if f.path == "model.onnx.data")
    clash = weights.model_copy(update={"path": "model.onnx.data/x"})
    base = plan.base.model_copy(update={"files": (*plan.base.files, clash)})
    with pytest.raises(UnsafePathError, match="not a directory"):
        SlotManager(tmp_path / "slots").stage(Slot.A, plan.model_copy(update={"base": base}), store)


def test_staging_needs_every_blob(tmp_path: Path, store: BlobStore) -> None:
    write_base_bundle(tmp_path / "b1")
    plan = plan_from_bundle(tmp_path / "b1")
    with pytest.raises(UpdateStorageError, match="missing from the store"):
        SlotManager(tmp_path / "slots").stage(Slot.A, plan, store)


def test_commit_needs_a_completely_staged_slot(tmp_path: Path, store: BlobStore) -> None:
    write_base_bundle(tmp_path / "b1")
    plan = plan_from_bundle(tmp_path / "b1", store=store)
    with pytest.raises(UpdateStorageError, match="does not hold"):
        SlotManager(tmp_path / "slots").commit(Slot.B, plan)


def test_a_corrupt_pointer_is_reported_not_guessed(tmp_path: Path) -> None:
    slots = SlotManager(tmp_path)
    (tmp_path / "current.json").write_text("{not json")
    with pytest.raises(UpdateStorageError, match="corrupt"):
        slots.current()
