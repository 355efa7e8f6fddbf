"""The update attack suite: every attack named, run end to end through the device's OTA stack.

A device first installs release 1.0.0 from a simulated repository served over real loopback
HTTP. Each attack then changes what the repository (or a mirror, or the network) serves and
the device polls. Every refusal must be the named error with its code, reported as a
``failed`` progress message, and the committed slot must be byte-for-byte what it was, with
nothing new activated in the server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from agent.errors import (
    AdapterMismatchError,
    AgentError,
    AnnouncementUnconfirmedError,
    BundleInvalidError,
    ManifestMismatchError,
    MetadataExpiredError,
    MetadataMismatchError,
    MetadataRollbackError,
    MetadataSignatureError,
    OversizeError,
    ReleaseCounterError,
    SlowDownloadError,
    TargetHashMismatchError,
    TargetNotSignedError,
    UnsafePathError,
)
from agent.ota.fetcher import FetchLimits
from agent.ota.lifecycle import Phase
from protocol.bundle import MANIFEST_NAME, BundleManifest
from protocol.messages import BundleRef, ReleaseAnnouncement, UpdateState
from protocol.release import (
    ADAPTERS_ROLE,
    CHANNELS_ROLE,
    BundleTargetInfo,
    bundle_target_path,
    custom_field,
)
from tests.support.repo_simulator import (
    RepoHTTPServer,
    RepoSimulator,
    SimDevice,
    ref_of,
    write_adapter_bundle,
    write_base_bundle,
)

GROUP, CHANNEL = "lab", "stable"
PAST = datetime(2020, 1, 1, tzinfo=UTC)


@dataclass
class Scene:
    """A repository, its server and a device that has installed ``v1``."""

    sim: RepoSimulator
    server: RepoHTTPServer
    device: SimDevice
    tmp: Path
    v1: BundleManifest

    def bundle(self, version: str, **kwargs: object) -> tuple[Path, BundleManifest]:
        """Write base ``version``; its bytes differ from other versions' unless ``seed`` says."""
        directory = self.tmp / f"base-{version}"
        kwargs.setdefault("seed", int(version.split(".")[0]))
        manifest = write_base_bundle(directory, version=version, **kwargs)  # type: ignore[arg-type]
        return directory, manifest

    def release(self, version: str, **kwargs: object) -> BundleManifest:
        """Publish base ``version`` and point the channel at it, correctly signed."""
        directory, manifest = self.bundle(version, **kwargs)
        self.sim.add_bundle(directory)
        self.sim.point(GROUP, CHANNEL, ref_of(manifest))
        self.sim.publish()
        return manifest

    def adapter(self, base: BundleManifest, **kwargs: object) -> tuple[Path, BundleManifest]:
        directory = self.tmp / f"adapter-{len(list(self.tmp.glob('adapter-*')))}"
        return directory, write_adapter_bundle(directory, base, **kwargs)  # type: ignore[arg-type]

    def target_url_path(self, manifest: BundleManifest, path: str) -> str:
        entry = next(f for f in manifest.files if f.path == path)
        target = bundle_target_path(manifest.kind, manifest.name, manifest.version, path)
        directory, _, name = target.rpartition("/")
        return f"targets/{directory}/{entry.sha256}.{name}"

    def hint(self, timestamp_version: int) -> ReleaseAnnouncement:
        return ReleaseAnnouncement(
            group=GROUP,
            channel=CHANNEL,
            repository_url=self.server.url,
            timestamp_version=timestamp_version,
            published_at=datetime.now(UTC),
        )

    def poll_quietly(self) -> None:
        """A poll that must succeed (the device sees the repository's latest versions)."""
        outcome = self.device.poll()
        assert outcome.error is None, outcome.error


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    sim = RepoSimulator()
    v1 = write_base_bundle(tmp_path / "base-1.0.0", version="1.0.0")
    sim.add_bundle(tmp_path / "base-1.0.0")
    sim.point(GROUP, CHANNEL, ref_of(v1))
    sim.publish()
    with RepoHTTPServer(sim.serve) as server:
        limits = FetchLimits(
            read_timeout_s=2, deadline_s=10, min_rate_bytes_per_s=64 * 1024, rate_grace_s=0.2
        )
        device = SimDevice(tmp_path / "device", sim.root_bytes, server.url, limits=limits)
        outcome = device.poll()
        assert outcome.error is None, outcome.error
        assert outcome.record.phase is Phase.COMMITTED
        yield Scene(sim, server, device, tmp_path, v1)


# ---- the attacks ----------------------------------------------------------------------------


def unsigned_timestamp(s: Scene) -> None:
    s.release("2.0.0")
    s.sim.files["metadata/timestamp.json"] = s.sim.sign(s.sim.timestamp, "timestamp", [])


def timestamp_signed_by_wrong_key(s: Scene) -> None:
    s.release("2.0.0")
    s.sim.files["metadata/timestamp.json"] = s.sim.sign(
        s.sim.timestamp, "timestamp", [CryptoSigner.generate_ed25519()]
    )


def targets_signed_by_snapshot_key(s: Scene) -> None:
    s.sim.signers["targets"] = dict(s.sim.signers["snapshot"])
    s.release("2.0.0")


def channels_signed_by_adapters_key(s: Scene) -> None:
    s.sim.signers[CHANNELS_ROLE] = dict(s.sim.signers[ADAPTERS_ROLE])
    s.release("2.0.0")


def timestamp_below_threshold(s: Scene) -> None:
    s.sim.root.signed.roles["timestamp"].threshold = 2
    second = s.sim.add_key("timestamp")
    s.sim.publish_root(bump=True)
    s.sim.publish_timestamp()
    s.poll_quietly()
    del s.sim.signers["timestamp"][second.public_key.keyid]
    s.release("2.0.0")


def root_signed_below_new_threshold(s: Scene) -> None:
    old = list(s.sim.signers["root"].values())
    s.sim.add_key("root")
    s.sim.root.signed.roles["root"].threshold = 2
    s.sim.root.signed.version += 1
    s.sim.files[f"metadata/{s.sim.root.signed.version}.root.json"] = s.sim.sign(
        s.sim.root, "root", old
    )


def root_rotation_without_old_threshold(s: Scene) -> None:
    s.sim.revoke_keys("root")
    s.sim.add_key("root")
    s.sim.publish_root(bump=True)  # signed by the new key only


def timestamp_version_rollback(s: Scene) -> None:
    old = s.sim.files["metadata/timestamp.json"]
    s.sim.publish_timestamp()
    s.poll_quietly()
    s.sim.files["metadata/timestamp.json"] = old


def snapshot_version_rollback(s: Scene) -> None:
    old_meta = s.sim.timestamp.signed.snapshot_meta
    s.sim.publish_snapshot()
    s.poll_quietly()
    s.sim.timestamp.signed.snapshot_meta = old_meta
    s.sim.publish_timestamp()


def _role_version_rollback(s: Scene, role: str) -> None:
    old_meta = s.sim.snapshot.signed.meta[f"{role}.json"]
    s.sim.publish((role,))
    s.poll_quietly()
    s.sim.snapshot.signed.meta[f"{role}.json"] = old_meta
    s.sim.publish_snapshot()


def targets_version_rollback(s: Scene) -> None:
    _role_version_rollback(s, "targets")


def channels_version_rollback(s: Scene) -> None:
    _role_version_rollback(s, CHANNELS_ROLE)


def adapters_version_rollback(s: Scene) -> None:
    _role_version_rollback(s, ADAPTERS_ROLE)


def expired_timestamp(s: Scene) -> None:
    s.release("2.0.0")
    s.sim.timestamp.signed.expires = PAST
    s.sim.publish_timestamp()


def expired_snapshot(s: Scene) -> None:
    s.sim.snapshot.signed.expires = PAST
    s.release("2.0.0")


def expired_targets(s: Scene) -> None:
    s.sim.targets.signed.expires = PAST
    s.release("2.0.0")


def expired_channels(s: Scene) -> None:
    s.sim.delegated[CHANNELS_ROLE].signed.expires = PAST
    s.release("2.0.0")


def expired_root(s: Scene) -> None:
    s.sim.root.signed.expires = PAST
    s.sim.publish_root(bump=True)


def mix_and_match_targets(s: Scene) -> None:
    """Serve, under the version the snapshot names, targets from another state of the repo."""
    s.release("2.0.0")
    version = s.sim.targets.signed.version
    honest = s.sim.files[f"metadata/{version}.targets.json"]
    directory, _ = s.bundle("2.0.0", seed=5)  # same sizes and names, other bytes
    s.sim.add_bundle(directory)
    mixed = s.sim.sign(s.sim.targets, "targets")
    assert len(mixed) == len(honest)
    assert mixed != honest
    s.sim.files[f"metadata/{version}.targets.json"] = mixed


def endless_timestamp(s: Scene) -> None:
    s.release("2.0.0")
    s.sim.overrides["metadata/timestamp.json"] = s.sim.files["metadata/timestamp.json"] + (
        b" " * 20_000
    )


def endless_snapshot(s: Scene) -> None:
    s.release("2.0.0")
    path = f"metadata/{s.sim.snapshot.signed.version}.snapshot.json"
    s.sim.overrides[path] = s.sim.files[path] + b" " * 4096


def endless_target(s: Scene) -> None:
    v2 = s.release("2.0.0")
    path = s.target_url_path(v2, "model.onnx.data")
    s.sim.overrides[path] = s.sim.files[path] + b"\0" * 100_000


def throttled_server(s: Scene) -> None:
    s.release("2.0.0")
    s.server.faults.throttle_bytes_per_s = 4096


def target_hash_mismatch(s: Scene) -> None:
    v2 = s.release("2.0.0")
    path = s.target_url_path(v2, "model.onnx")
    s.sim.overrides[path] = bytes(len(s.sim.files[path]))


def _bad_path_release(s: Scene, bad: str) -> None:
    directory, v2 = s.bundle("2.0.0")
    info = custom_field(BundleTargetInfo(manifest=v2, release_counter=9))
    info["nanofleet"]["manifest"]["files"][0]["path"] = bad
    s.sim.add_bundle(directory, info=info)
    s.sim.point(GROUP, CHANNEL, ref_of(v2))
    s.sim.publish()


def bundle_path_dotdot(s: Scene) -> None:
    _bad_path_release(s, "../../etc/cron.d/evil")


def bundle_path_absolute(s: Scene) -> None:
    _bad_path_release(s, "/etc/passwd")


def bundle_path_backslash(s: Scene) -> None:
    _bad_path_release(s, "..\\evil")


def blob_replaced_by_symlink(s: Scene) -> None:
    decoy = s.tmp / "decoy"
    tokenizer = next(f for f in s.v1.files if f.path == "tokenizer.json")
    blob = s.device.store.path(tokenizer.sha256)
    decoy.write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(decoy)
    s.release("2.0.0", seed=0, weights_bytes=50_000)  # same tokenizer, new weights


def manifest_file_differs_from_target(s: Scene) -> None:
    directory, v2 = s.bundle("2.0.0")
    s.sim.add_bundle(directory)
    s.sim.add_target(
        "targets", bundle_target_path(v2.kind, v2.name, v2.version, "model.onnx"), b"other"
    )
    s.sim.point(GROUP, CHANNEL, ref_of(v2))
    s.sim.publish()


def pointer_names_another_manifest(s: Scene) -> None:
    directory, v2 = s.bundle("2.0.0")
    s.sim.add_bundle(directory)
    s.sim.point(GROUP, CHANNEL, BundleRef(name=v2.name, version=v2.version, sha256="ab" * 32))
    s.sim.publish()


def base_release_counter_rollback(s: Scene) -> None:
    s.release("2.0.0")
    s.poll_quietly()
    s.sim.point(GROUP, CHANNEL, ref_of(s.v1))
    s.sim.publish()


def base_signed_by_adapters_key(s: Scene) -> None:
    directory, v2 = s.bundle("2.0.0")
    s.sim.add_bundle(directory, role=ADAPTERS_ROLE)
    s.sim.point(GROUP, CHANNEL, ref_of(v2))
    s.sim.publish()


def base_signed_by_channels_key(s: Scene) -> None:
    directory, v2 = s.bundle("2.0.0")
    s.sim.add_bundle(directory, role=CHANNELS_ROLE)
    s.sim.point(GROUP, CHANNEL, ref_of(v2))
    s.sim.publish()


def adapter_listed_by_channels_role(s: Scene) -> None:
    directory, adapter = s.adapter(s.v1)
    s.sim.add_bundle(directory, role=CHANNELS_ROLE)
    s.sim.point(GROUP, CHANNEL, ref_of(s.v1), ref_of(adapter))
    s.sim.publish()


def _adapter_release(s: Scene, **kwargs: object) -> None:
    directory, adapter = s.adapter(s.v1, **kwargs)
    s.sim.add_bundle(directory)
    s.sim.point(GROUP, CHANNEL, ref_of(s.v1), ref_of(adapter))
    s.sim.publish()


def adapter_for_another_base(s: Scene) -> None:
    _adapter_release(s, base_sha256="cd" * 32)


def adapter_rank_above_base(s: Scene) -> None:
    _adapter_release(s, rank=16)


def adapter_for_another_tokenizer(s: Scene) -> None:
    other = write_base_bundle(s.tmp / "other-base", name="other", seed=7)
    directory, adapter = s.adapter(other, base_sha256=ref_of(s.v1).sha256)
    s.sim.add_bundle(directory)
    s.sim.point(GROUP, CHANNEL, ref_of(s.v1), ref_of(adapter))
    s.sim.publish()


@dataclass(frozen=True)
class Attack:
    run: Callable[[Scene], None]
    error: type[AgentError]
    code: str
    hint_ahead: int | None = None
    """Poll with an announcement naming the timestamp version this far ahead of the served one."""


ATTACKS = [
    Attack(unsigned_timestamp, MetadataSignatureError, "unsigned_metadata"),
    Attack(timestamp_signed_by_wrong_key, MetadataSignatureError, "unsigned_metadata"),
    Attack(targets_signed_by_snapshot_key, MetadataSignatureError, "unsigned_metadata"),
    Attack(channels_signed_by_adapters_key, MetadataSignatureError, "unsigned_metadata"),
    Attack(timestamp_below_threshold, MetadataSignatureError, "unsigned_metadata"),
    Attack(root_signed_below_new_threshold, MetadataSignatureError, "unsigned_metadata"),
    Attack(root_rotation_without_old_threshold, MetadataSignatureError, "unsigned_metadata"),
    Attack(timestamp_version_rollback, MetadataRollbackError, "metadata_rollback"),
    Attack(snapshot_version_rollback, MetadataRollbackError, "metadata_rollback"),
    Attack(targets_version_rollback, MetadataRollbackError, "metadata_rollback"),
    Attack(channels_version_rollback, MetadataRollbackError, "metadata_rollback"),
    Attack(adapters_version_rollback, MetadataRollbackError, "metadata_rollback"),
    Attack(expired_timestamp, MetadataExpiredError, "metadata_expired"),
    Attack(expired_snapshot, MetadataExpiredError, "metadata_expired"),
    Attack(expired_targets, MetadataExpiredError, "metadata_expired"),
    Attack(expired_channels, MetadataExpiredError, "metadata_expired"),
    Attack(expired_root, MetadataExpiredError, "metadata_expired"),
    Attack(mix_and_match_targets, MetadataMismatchError, "metadata_mismatch"),
    Attack(endless_timestamp, OversizeError, "oversize"),
    Attack(endless_snapshot, OversizeError, "oversize"),
    Attack(endless_target, OversizeError, "oversize"),
    Attack(throttled_server, SlowDownloadError, "slow_retrieval"),
    Attack(target_hash_mismatch, TargetHashMismatchError, "hash_mismatch"),
    Attack(bundle_path_dotdot, BundleInvalidError, "bundle_invalid"),
    Attack(bundle_path_absolute, BundleInvalidError, "bundle_invalid"),
    Attack(bundle_path_backslash, BundleInvalidError, "bundle_invalid"),
    Attack(blob_replaced_by_symlink, UnsafePathError, "unsafe_path"),
    Attack(manifest_file_differs_from_target, ManifestMismatchError, "manifest_mismatch"),
    Attack(pointer_names_another_manifest, ManifestMismatchError, "manifest_mismatch"),
    Attack(base_release_counter_rollback, ReleaseCounterError, "release_counter_rollback"),
    Attack(base_signed_by_adapters_key, TargetNotSignedError, "target_not_signed"),
    Attack(base_signed_by_channels_key, TargetNotSignedError, "target_not_signed"),
    Attack(adapter_listed_by_channels_role, TargetNotSignedError, "target_not_signed"),
    Attack(adapter_for_another_base, AdapterMismatchError, "adapter_mismatch"),
    Attack(adapter_rank_above_base, AdapterMismatchError, "adapter_mismatch"),
    Attack(adapter_for_another_tokenizer, AdapterMismatchError, "adapter_mismatch"),
    Attack(
        lambda s: None,
        AnnouncementUnconfirmedError,
        "announcement_unconfirmed",
        hint_ahead=100,
    ),
]


@pytest.mark.parametrize(
    "attack",
    ATTACKS,
    ids=[
        a.run.__name__ if a.run.__name__ != "<lambda>" else "forged_announcement" for a in ATTACKS
    ],
)
def test_attack_is_refused_and_the_installed_model_is_untouched(
    scene: Scene, attack: Attack
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


def test_fast_forward_attack_is_recovered_by_rotating_the_timestamp_key(scene: Scene) -> None:
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


def test_root_rotation_signed_by_old_and_new_threshold_is_followed(scene: Scene) -> None:
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


def test_a_cut_download_resumes_with_range_and_installs(scene: Scene) -> None:
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


def test_a_forged_announcement_for_the_current_state_installs_nothing(scene: Scene) -> None:
    device = scene.device
    before = device.installed_files()
    outcome = device.poll(scene.hint(scene.sim.timestamp.signed.version))
    assert outcome.error is None
    assert outcome.record.phase is Phase.IDLE
    assert device.installed_files() == before
    assert len(device.activator.activated) == 1


def test_an_announcement_for_another_group_is_ignored_without_a_request(scene: Scene) -> None:
    scene.release("2.0.0")
    requests = len(scene.server.requests)
    hint = scene.hint(scene.sim.timestamp.signed.version).model_copy(update={"group": "other"})
    outcome = scene.device.poll(hint)
    assert outcome.record.phase is Phase.IDLE
    assert len(scene.server.requests) == requests


def test_a_pointer_listed_by_the_adapters_role_is_never_seen(scene: Scene) -> None:
    directory, v2 = scene.bundle("2.0.0")
    scene.sim.add_bundle(directory)
    scene.sim.point(GROUP, CHANNEL, ref_of(v2), role=ADAPTERS_ROLE)
    scene.sim.publish()
    before = scene.device.installed_files()
    outcome = scene.device.poll()
    assert outcome.error is None
    assert outcome.record.phase is Phase.IDLE
    assert scene.device.installed_files() == before


def test_a_symlink_planted_in_the_inactive_slot_is_removed_not_followed(scene: Scene) -> None:
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


def test_the_installed_slot_holds_exactly_the_signed_bytes(scene: Scene) -> None:
    files = scene.device.installed_files()
    expected = {f"base/{f.path}": f.sha256 for f in scene.v1.files}
    manifest_bytes = (scene.tmp / "base-1.0.0" / MANIFEST_NAME).read_bytes()
    expected[f"base/{MANIFEST_NAME}"] = hashlib.sha256(manifest_bytes).hexdigest()
    assert {k: v for k, v in files.items() if k != "slot.json"} == expected
