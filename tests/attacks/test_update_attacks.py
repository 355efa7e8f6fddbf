"""The update attack suite: every attack named, run end to end through the device's OTA stack.

A device first installs release 1.0.0 from a simulated repository served over real loopback
HTTP. Each attack of the shared table (:mod:`tests.attacks.attacks`) then changes what the
repository (or a mirror, or the network) serves and the device polls. Every refusal must be
the named error with its code, reported as a ``failed`` progress message, and the committed
slot must be byte-for-byte what it was, with nothing new activated in the server.
``test_update_attacks_live.py`` runs the same table against the real agent daemon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.errors import MetadataRollbackError
from agent.ota.fetcher import FetchLimits
from agent.ota.lifecycle import Phase
from protocol.bundle import MANIFEST_NAME, BundleManifest
from protocol.messages import UpdateState
from protocol.release import ADAPTERS_ROLE, CHANNELS_ROLE, device_pointer_path
from tests.attacks.attacks import ATTACKS, CHANNEL, DEVICE, GROUP, Attack, Scene
from tests.support.repo_simulator import (
    RepoHTTPServer,
    RepoSimulator,
    SimDevice,
    ref_of,
    write_base_bundle,
)


@dataclass
class SimScene(Scene):
    """The scene with a simulated device: fake bundles, a fake activator, direct polls."""

    device: SimDevice

    def bundle(self, version: str, **kwargs: object) -> tuple[Path, BundleManifest]:
        directory = self.tmp / f"base-{version}"
        kwargs.setdefault("seed", int(version.split(".")[0]))
        manifest = write_base_bundle(directory, version=version, **kwargs)  # type: ignore[arg-type]
        return directory, manifest

    def poll_quietly(self) -> None:
        outcome = self.device.poll()
        assert outcome.error is None, outcome.error

    def blob_path(self, sha256: str) -> Path:
        return self.device.store.path(sha256)


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[SimScene]:
    sim = RepoSimulator()
    v1 = write_base_bundle(tmp_path / "base-1.0.0", version="1.0.0")
    sim.add_bundle(tmp_path / "base-1.0.0")
    sim.point(GROUP, CHANNEL, ref_of(v1))
    sim.publish()
    with RepoHTTPServer(sim.serve) as server:
        limits = FetchLimits(
            read_timeout_s=2, deadline_s=10, min_rate_bytes_per_s=64 * 1024, rate_grace_s=0.2
        )
        device = SimDevice(
            tmp_path / "device", sim.root_bytes, server.url, limits=limits, device_id=DEVICE
        )
        outcome = device.poll()
        assert outcome.error is None, outcome.error
        assert outcome.record.phase is Phase.COMMITTED
        yield SimScene(sim, server, tmp_path, v1, device)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused_and_the_installed_model_is_untouched(
    scene: SimScene, attack: Attack
) -> None:
    device = scene.device
    attack.run(scene)  # may let the device install legitimate releases first
    before_files = device.installed_files()
    before_pointer = device.slots.current()
    activations = len(device.activator.activated)
    assert before_files, "the device has a committed model before the attack"
    hint = None
    if attack.hint_ahead is not None:
        hint = scene.hint(scene.sim.timestamp.signed.version + attack.hint_ahead)
    outcome = device.poll(hint)

    assert isinstance(outcome.error, attack.error), outcome.error
    assert outcome.error.code == attack.code
    assert outcome.record.phase is Phase.FAILED
    assert outcome.record.error_code == attack.code
    failed = [r for r in device.reports if r.state is UpdateState.FAILED]
    assert failed
    assert failed[-1].error_code == attack.code
    assert device.slots.current() == before_pointer
    assert device.installed_files() == before_files
    assert len(device.activator.activated) == activations


# ---- what must work despite an adversary ------------------------------------------------------


def test_fast_forward_attack_is_recovered_by_rotating_the_timestamp_key(scene: SimScene) -> None:
    sim, device = scene.sim, scene.device
    # The attacker holds the timestamp key and serves a far-future timestamp version.
    real_version = sim.timestamp.signed.version
    sim.timestamp.signed.version = 1000
    sim.publish_timestamp(bump=False)
    scene.poll_quietly()
    # Without a new key, the honest repository's next timestamp is a rollback to the device.
    sim.timestamp.signed.version = real_version
    sim.publish_timestamp()
    assert isinstance(device.poll().error, MetadataRollbackError)
    # The operator rotates the timestamp key in a new root: the device starts over.
    sim.revoke_keys("timestamp")
    sim.add_key("timestamp")
    sim.publish_root(bump=True)
    v2 = scene.release("2.0.0")
    outcome = device.poll()
    assert outcome.error is None, outcome.error
    assert outcome.record.phase is Phase.COMMITTED
    current = device.slots.current()
    assert current is not None
    assert current.base == ref_of(v2)


def test_root_rotation_signed_by_old_and_new_threshold_is_followed(scene: SimScene) -> None:
    sim, device = scene.sim, scene.device
    old_signers = list(sim.signers["root"].values())
    sim.revoke_keys("root")
    sim.add_key("root")
    sim.add_key("root")
    sim.root.signed.roles["root"].threshold = 2
    sim.publish_root(old_signers, bump=True)
    v2 = scene.release("2.0.0")
    outcome = device.poll()
    assert outcome.error is None, outcome.error
    current = device.slots.current()
    assert current is not None
    assert current.base == ref_of(v2)
    assert (device.state / "tuf" / "root_history" / "2.root.json").exists()


def test_a_cut_download_resumes_with_range_and_installs(scene: SimScene) -> None:
    v2 = scene.release("2.0.0")
    weights = scene.target_url_path(v2, "model.onnx.data")
    scene.server.faults.cut_after[weights] = 10_000
    outcome = scene.device.poll()
    assert outcome.error is None, outcome.error
    served = [r for r in scene.server.requests if r.path == weights]
    assert [(r.range, r.status) for r in served] == [(None, 200), ("bytes=10000-", 206)]
    current = scene.device.slots.current()
    assert current is not None
    assert current.base == ref_of(v2)


def test_a_forged_announcement_for_the_current_state_installs_nothing(scene: SimScene) -> None:
    device = scene.device
    before = device.installed_files()
    outcome = device.poll(scene.hint(scene.sim.timestamp.signed.version))
    assert outcome.error is None
    assert outcome.record.phase is Phase.IDLE
    assert device.installed_files() == before
    assert len(device.activator.activated) == 1


def test_an_announcement_for_another_group_is_ignored_without_a_request(scene: SimScene) -> None:
    scene.release("2.0.0")
    requests = len(scene.server.requests)
    hint = scene.hint(scene.sim.timestamp.signed.version).model_copy(update={"group": "other"})
    outcome = scene.device.poll(hint)
    assert outcome.record.phase is Phase.IDLE
    assert len(scene.server.requests) == requests


@pytest.mark.parametrize("whose", ["group", "device"])
def test_a_pointer_listed_by_the_adapters_role_is_never_seen(scene: SimScene, whose: str) -> None:
    directory, v2 = scene.bundle("2.0.0")
    scene.sim.add_bundle(directory)
    if whose == "group":
        scene.sim.point(GROUP, CHANNEL, ref_of(v2), role=ADAPTERS_ROLE)
    else:
        scene.sim.point_device(DEVICE, CHANNEL, ref_of(v2), role=ADAPTERS_ROLE)
    scene.sim.publish()
    before = scene.device.installed_files()
    outcome = scene.device.poll()
    assert outcome.error is None
    assert outcome.record.phase is Phase.IDLE
    assert scene.device.installed_files() == before


def test_a_device_follows_its_own_pointer_and_other_devices_their_group(
    scene: SimScene,
) -> None:
    """A staged rollout's wave: only the pointed device installs v2, hint or poll."""
    other = SimDevice(
        scene.tmp / "other", scene.sim.root_bytes, scene.server.url, device_id="dev-other"
    )
    assert other.poll().record.phase is Phase.COMMITTED
    directory, v2 = scene.bundle("2.0.0")
    scene.sim.add_bundle(directory)
    scene.sim.point_device(DEVICE, CHANNEL, ref_of(v2))
    scene.sim.publish()
    hint = scene.hint(scene.sim.timestamp.signed.version)
    mine = hint.model_copy(update={"group": DEVICE})

    outcome = other.poll(hint)
    assert outcome.error is None
    assert outcome.record.phase is Phase.IDLE
    assert other.poll(mine.model_copy(update={"group": "dev-other"})).record.phase is Phase.IDLE
    assert len(other.activator.activated) == 1
    assert other.slots.current().base.version == "1.0.0"  # type: ignore[union-attr]

    outcome = scene.device.poll(mine)
    assert outcome.error is None, outcome.error
    assert outcome.record.phase is Phase.COMMITTED
    assert scene.device.slots.current().base.version == "2.0.0"  # type: ignore[union-attr]

    # Once its own pointer is gone the device follows the group again (v1 is older: the
    # release counter keeps it on v2; an adapter release would switch back).
    scene.sim.remove_target(CHANNELS_ROLE, device_pointer_path(DEVICE, CHANNEL))
    scene.sim.publish()
    outcome = scene.device.poll()
    assert outcome.error is not None
    assert outcome.error.code == "release_counter_rollback"
    assert scene.device.slots.current().base.version == "2.0.0"  # type: ignore[union-attr]


def test_a_symlink_planted_in_the_inactive_slot_is_removed_not_followed(scene: SimScene) -> None:
    outside = scene.tmp / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    inactive = scene.device.slots.path(scene.device.slots.inactive())
    inactive.symlink_to(outside, target_is_directory=True)
    v2 = scene.release("2.0.0")
    outcome = scene.device.poll()
    assert outcome.error is None, outcome.error
    assert not inactive.is_symlink()
    assert inactive.is_dir()
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    current = scene.device.slots.current()
    assert current is not None
    assert current.base == ref_of(v2)


def test_the_installed_slot_holds_exactly_the_signed_bytes(scene: SimScene) -> None:
    files = scene.device.installed_files()
    expected = {f"base/{f.path}": f.sha256 for f in scene.v1.files}
    manifest_bytes = (scene.tmp / "base-1.0.0" / MANIFEST_NAME).read_bytes()
    expected[f"base/{MANIFEST_NAME}"] = hashlib.sha256(manifest_bytes).hexdigest()
    assert {k: v for k, v in files.items() if k != "slot.json"} == expected
