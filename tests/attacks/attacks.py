"""The update attacks, named and table-driven, shared by the simulated and the live suites.

Each attack is a function that changes what a simulated repository (or a mirror, or the
network, or the device's blob store) serves, given a :class:`Scene`: a repository
simulator served over loopback HTTP and a device that has committed release ``v1`` from
it. The scene says how bundles are built and how the device is made to poll, so the same
table runs against :class:`~tests.support.repo_simulator.SimDevice` (fake bundles, a fake
activator) and against the real ``nanofleet-agent run`` daemon (real tiny models,
announcements over MQTT). :data:`ATTACKS` pairs each attack with the error it must raise
and the code the device must report.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

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
from protocol.bundle import BundleManifest
from protocol.messages import BundleRef, ReleaseAnnouncement
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
    ref_of,
    write_adapter_bundle,
    write_base_bundle,
)

GROUP, CHANNEL = "lab", "stable"
#: The device under attack (its own pointer is ``devices/{DEVICE}/{CHANNEL}``).
DEVICE = "dev-live"
PAST = datetime(2020, 1, 1, tzinfo=UTC)


@dataclass
class Scene(ABC):
    """A repository, its server and a device that has committed ``v1``."""

    sim: RepoSimulator
    server: RepoHTTPServer
    tmp: Path
    v1: BundleManifest

    @abstractmethod
    def bundle(self, version: str, **kwargs: object) -> tuple[Path, BundleManifest]:
        """Write base ``version`` into a new directory; return it and its manifest.

        Its bytes differ from other versions' unless ``seed`` (an int) says otherwise; a
        bundle with ``seed=0`` has ``v1``'s tokenizer. ``weights_bytes`` may be ignored.
        """

    @abstractmethod
    def poll_quietly(self) -> None:
        """Make the device poll; the poll must succeed (it sees the latest versions)."""

    @abstractmethod
    def blob_path(self, sha256: str) -> Path:
        """Where the device's blob store keeps the blob ``sha256``."""

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
    blob = s.blob_path(tokenizer.sha256)
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


def device_pointer_names_another_device(s: Scene) -> None:
    """A pointer copied from another device's path (its content names that device)."""
    directory, v2 = s.bundle("2.0.0")
    s.sim.add_bundle(directory)
    s.sim.point_device(DEVICE, CHANNEL, ref_of(v2), names="dev-other")
    s.sim.publish()


def device_pointer_to_base_signed_by_channels_key(s: Scene) -> None:
    """The channels key may move a device's pointer, never vouch for a base."""
    directory, v2 = s.bundle("2.0.0")
    s.sim.add_bundle(directory, role=CHANNELS_ROLE)
    s.sim.point_device(DEVICE, CHANNEL, ref_of(v2))
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


def forged_announcement(s: Scene) -> None:
    """Nothing changes in the repository; the announcement names a timestamp far ahead."""


@dataclass(frozen=True)
class Attack:
    run: Callable[[Scene], None]
    error: type[AgentError]
    code: str
    hint_ahead: int | None = None
    """Poll with an announcement naming the timestamp version this far ahead of the served one."""
    installs_first: bool = False
    """The attack lets the device install (and activate) a legitimate release first."""

    @property
    def name(self) -> str:
        return self.run.__name__


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
    Attack(device_pointer_names_another_device, ManifestMismatchError, "manifest_mismatch"),
    Attack(
        base_release_counter_rollback,
        ReleaseCounterError,
        "release_counter_rollback",
        installs_first=True,
    ),
    Attack(base_signed_by_adapters_key, TargetNotSignedError, "target_not_signed"),
    Attack(base_signed_by_channels_key, TargetNotSignedError, "target_not_signed"),
    Attack(adapter_listed_by_channels_role, TargetNotSignedError, "target_not_signed"),
    Attack(
        device_pointer_to_base_signed_by_channels_key, TargetNotSignedError, "target_not_signed"
    ),
    Attack(adapter_for_another_base, AdapterMismatchError, "adapter_mismatch"),
    Attack(adapter_rank_above_base, AdapterMismatchError, "adapter_mismatch"),
    Attack(adapter_for_another_tokenizer, AdapterMismatchError, "adapter_mismatch"),
    Attack(
        forged_announcement,
        AnnouncementUnconfirmedError,
        "announcement_unconfirmed",
        hint_ahead=100,
    ),
]
"""Every attack, in one table: run against a simulated device (``test_update_attacks.py``)
and against the real agent daemon (``test_update_attacks_live.py``)."""
