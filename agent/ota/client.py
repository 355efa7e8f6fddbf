"""The device's TUF client: verify a channel's release, then download what the store lacks.

Trust comes only from the root pinned at provisioning. Every check runs python-tuf's
``Updater`` (one per check: it refreshes once) over the metadata cache on durable storage,
so versions never go back, even across reboots. What the client returns is built from
verified metadata alone:

1. the device's own pointer ``devices/{device_id}/{channel}`` if there is one (a staged
   rollout puts it there), else the group's pointer ``channels/{group}/{channel}``; both are
   listed by the ``channels`` role or the top-level targets role (a pointer listed anywhere
   else is not found), and must name this device (or group) and channel;
2. each bundle's ``manifest.json`` target with the signed manifest and release counter in its
   custom field; base files are only found under ``models/`` in the offline-signed targets
   role, adapter files under ``adapters/`` in the ``adapters`` role or above;
3. every file of every manifest must be a target with exactly the manifest's length and
   sha256; an adapter must fit the base it would run on; a base's counter must not be
   below the committed one.

Targets are downloaded by streaming once through sha256 into the content-addressed store
(not tuf's ``download_target``, which re-reads and copies), checked against the verified
length and hash exactly.

Every failure leaves as an :class:`~agent.errors.UpdateRefusedError` subclass (the
repository or a mirror served something wrong) or an
:class:`~agent.errors.UpdateTransientError` subclass (network, disk): tuf's exceptions are
translated here and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, TargetFile, Timestamp
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from agent.errors import (
    AnnouncementUnconfirmedError,
    BundleInvalidError,
    DownloadFailedError,
    ManifestMismatchError,
    MetadataExpiredError,
    MetadataInvalidError,
    MetadataMismatchError,
    MetadataRollbackError,
    MetadataSignatureError,
    OversizeError,
    SlowDownloadError,
    TargetHashMismatchError,
    TargetNotSignedError,
    UpdateStorageError,
)
from agent.ota.fetcher import HttpFetcher
from agent.ota.plan import (
    PlannedBundle,
    PlannedFile,
    ReleasePlan,
    check_adapter_fits,
    check_release_counter,
)
from agent.ota.store import BlobStore
from protocol.bundle import MANIFEST_NAME, BundleKind, BundleManifest, bundle_hash
from protocol.messages import BundleRef, ReleaseAnnouncement
from protocol.release import (
    ChannelPointer,
    DevicePointer,
    channel_target_path,
    device_pointer_path,
    manifest_target_path,
    parse_bundle_info,
    parse_channel_pointer,
    parse_device_pointer,
)

_T = TypeVar("_T")

#: Called with (bytes done, bytes total) while targets download.
FetchProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class Installed:
    """What the device runs now, as far as the client's checks need to know."""

    base_sha256: str
    adapter_sha256: str | None
    release_counter: int


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn tuf's and the OS's exceptions raised inside the block into the agent's errors."""
    try:
        yield
    except exceptions.UnsignedMetadataError as e:
        raise MetadataSignatureError(f"{what}: {e}") from e
    except exceptions.BadVersionNumberError as e:
        raise MetadataRollbackError(f"{what}: {e}") from e
    except exceptions.ExpiredMetadataError as e:
        raise MetadataExpiredError(f"{what}: {e}") from e
    except exceptions.LengthOrHashMismatchError as e:
        raise MetadataMismatchError(f"{what}: {e}") from e
    except exceptions.RepositoryError as e:
        raise MetadataInvalidError(f"{what}: {e}") from e
    except exceptions.DownloadLengthMismatchError as e:
        raise OversizeError(f"{what}: {e}") from e
    except exceptions.SlowRetrievalError as e:
        raise SlowDownloadError(f"{what}: {e}") from e
    except exceptions.DownloadError as e:
        raise DownloadFailedError(f"{what}: {e}") from e
    except OSError as e:
        raise UpdateStorageError(f"{what}: {e}") from e


class RepositoryClient:
    """Checks a group channel against the repository and fetches a plan's files.

    ``root`` is the root metadata pinned at provisioning; ``metadata_dir`` must be on durable
    storage and used by this client only (python-tuf supports one process per cache).
    """

    def __init__(
        self,
        *,
        root: bytes,
        metadata_dir: Path,
        metadata_url: str,
        targets_url: str,
        fetcher: HttpFetcher,
        config: UpdaterConfig | None = None,
    ) -> None:
        self._root = root
        self._metadata_dir = metadata_dir
        self._metadata_url = metadata_url
        self._targets_url = targets_url if targets_url.endswith("/") else f"{targets_url}/"
        self._fetcher = fetcher
        self._config = config or UpdaterConfig()
        metadata_dir.mkdir(parents=True, exist_ok=True)

    def check(
        self,
        group: str,
        channel: str,
        installed: Installed | None,
        hint: ReleaseAnnouncement | None = None,
        device_id: str | None = None,
    ) -> ReleasePlan | None:
        """Verify the channel's current release; return it, or None if nothing is to be done.

        With ``device_id``, the device's own pointer (if any) overrides the group's. Nothing
        is to be done when neither pointer exists or the one followed names what is installed.

        Raises:
            UpdateRefusedError: a subclass naming what failed verification.
            AnnouncementUnconfirmedError: ``hint`` names a newer timestamp than the
                repository serves (a forged announcement, or a mirror lagging behind).
            UpdateTransientError: the repository could not be reached or the disk failed.
        """
        with translate_errors("metadata"):
            updater = Updater(
                str(self._metadata_dir),
                self._metadata_url,
                target_base_url=self._targets_url,
                fetcher=self._fetcher,
                config=self._config,
                bootstrap=self._root,
            )
            updater.refresh()
            timestamp_version, consistent = self._trusted_versions()
            if hint is not None and hint.timestamp_version > timestamp_version:
                raise AnnouncementUnconfirmedError(
                    f"the announcement names timestamp version {hint.timestamp_version}, the "
                    f"repository serves version {timestamp_version}"
                )
            pointer = self._pointer(updater, group, channel, device_id)
            if pointer is None:
                return None
            if installed is not None and (
                pointer.base.sha256 == installed.base_sha256
                and (pointer.adapter.sha256 if pointer.adapter else None)
                == installed.adapter_sha256
            ):
                return None
            base = self._bundle(updater, pointer.base, BundleKind.BASE, consistent)
            if base.release_counter is None:
                raise BundleInvalidError(f"base {base.ref.name} {base.ref.version} has no counter")
            check_release_counter(
                base.ref.name,
                base.ref.version,
                base.release_counter,
                installed.release_counter if installed else None,
            )
            adapter = None
            if pointer.adapter is not None:
                adapter = self._bundle(updater, pointer.adapter, BundleKind.ADAPTER, consistent)
                check_adapter_fits(base.manifest, base.ref.sha256, adapter.manifest)
            try:
                return ReleasePlan(
                    group=group,
                    channel=channel,
                    timestamp_version=timestamp_version,
                    base=base,
                    adapter=adapter,
                )
            except ValidationError as e:
                raise BundleInvalidError(f"release of {group}/{channel}: {e}") from e

    def fetch(self, plan: ReleasePlan, store: BlobStore, progress: FetchProgress) -> None:
        """Download every blob of ``plan`` the store lacks, each checked exactly.

        ``progress`` gets (bytes done, bytes total) over the blobs that were missing.

        Raises:
            OversizeError: a file is longer than its signed length.
            TargetHashMismatchError: a file's bytes do not match its signed hash.
            UnsafePathError: a link sits where a blob belongs.
            UpdateTransientError: the download failed or was too slow, or the disk failed.
        """
        missing = [f for f in plan.blobs().values() if not store.has(f.sha256, f.size)]
        total = sum(f.size for f in missing)
        done = sum(store.partial_size(f.sha256) for f in missing)
        progress(done, total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

        for planned in missing:
            url = f"{self._targets_url}{planned.url_path}"
            with translate_errors(planned.target_path):
                try:
                    store.ingest(
                        planned.sha256, planned.size, partial(self._fetcher.stream, url), advance
                    )
                except exceptions.LengthOrHashMismatchError as e:
                    raise TargetHashMismatchError(f"{planned.target_path}: {e}") from e
        with translate_errors("manifest files"):
            check_manifest_files(plan, store)

    def _pointer(
        self, updater: Updater, group: str, channel: str, device_id: str | None
    ) -> ChannelPointer | DevicePointer | None:
        """The device's own pointer if it has one, else its group's (or None)."""
        if device_id is not None:
            info = updater.get_targetinfo(device_pointer_path(device_id, channel))
            if info is not None:
                mine = _parse(parse_device_pointer, info, "device pointer")
                if (mine.device_id, mine.channel) != (device_id, channel):
                    raise ManifestMismatchError(
                        f"the pointer at {info.path} names device {mine.device_id!r} "
                        f"channel {mine.channel!r}"
                    )
                return mine
        info = updater.get_targetinfo(channel_target_path(group, channel))
        if info is None:
            return None
        pointer = _parse(parse_channel_pointer, info, "channel pointer")
        if (pointer.group, pointer.channel) != (group, channel):
            raise ManifestMismatchError(
                f"the pointer at {info.path} names group {pointer.group!r} "
                f"channel {pointer.channel!r}"
            )
        return pointer

    def _trusted_versions(self) -> tuple[int, bool]:
        """Read the timestamp version and the consistent-snapshot flag just verified.

        ``refresh()`` persisted both files; they are trusted local state.
        """
        timestamp = Metadata[Timestamp].from_file(str(self._metadata_dir / "timestamp.json"))
        root = Metadata[Root].from_file(str(self._metadata_dir / "root.json"))
        return timestamp.signed.version, bool(root.signed.consistent_snapshot)

    def _bundle(
        self, updater: Updater, ref: BundleRef, kind: BundleKind, consistent: bool
    ) -> PlannedBundle:
        what = f"{kind.value} {ref.name} {ref.version}"
        manifest_path = manifest_target_path(kind, ref.name, ref.version)
        manifest_info = updater.get_targetinfo(manifest_path)
        if manifest_info is None:
            raise TargetNotSignedError(
                f"{what}: {manifest_path} is not listed by a role trusted to list it"
            )
        info = _parse(parse_bundle_info, manifest_info, f"{what} manifest")
        manifest = info.manifest
        if (manifest.kind, manifest.name, manifest.version) != (kind, ref.name, ref.version):
            raise ManifestMismatchError(
                f"{what}: the signed manifest describes {manifest.kind.value} "
                f"{manifest.name} {manifest.version}"
            )
        if bundle_hash(manifest) != ref.sha256:
            raise ManifestMismatchError(
                f"{what}: the signed manifest's bundle hash is {bundle_hash(manifest)[:12]}, "
                f"the channel pointer names {ref.sha256[:12]}"
            )
        files = [_planned(MANIFEST_NAME, manifest_info, consistent)]
        for entry in manifest.files:
            target_path = manifest_path.removesuffix(MANIFEST_NAME) + entry.path
            target = updater.get_targetinfo(target_path)
            if target is None:
                raise TargetNotSignedError(
                    f"{what}: {target_path} is not listed by a role trusted to list it"
                )
            planned = _planned(entry.path, target, consistent)
            if (planned.size, planned.sha256) != (entry.size, entry.sha256):
                raise ManifestMismatchError(
                    f"{what}: {entry.path} is {entry.size} bytes {entry.sha256[:12]} in the "
                    f"manifest but {planned.size} bytes {planned.sha256[:12]} in its target"
                )
            files.append(planned)
        return PlannedBundle(
            ref=ref, manifest=manifest, release_counter=info.release_counter, files=tuple(files)
        )


def _parse(parser: Callable[[object], _T], target: TargetFile, what: str) -> _T:
    try:
        return parser(target.custom)
    except ValueError as e:
        raise BundleInvalidError(f"{what} at {target.path}: {e}") from e


def _planned(path: str, target: TargetFile, consistent: bool) -> PlannedFile:
    sha256 = target.hashes.get("sha256")
    if sha256 is None:
        raise MetadataInvalidError(f"target {target.path} has no sha256 hash")
    directory, _, name = target.path.rpartition("/")
    url_name = f"{sha256}.{name}" if consistent else name
    url_path = f"{directory}/{url_name}" if directory else url_name
    try:
        return PlannedFile(
            path=path,
            target_path=target.path,
            url_path=url_path,
            sha256=sha256,
            size=target.length,
        )
    except ValidationError as e:
        raise BundleInvalidError(f"target {target.path}: {e}") from e


def check_manifest_files(plan: ReleasePlan, store: BlobStore) -> None:
    """Check that each bundle's downloaded ``manifest.json`` is its signed manifest.

    The runtime reads the file; the checks above read the signed custom field. They must
    say the same thing.

    Raises:
        ManifestMismatchError: a manifest file parses to something else, or not at all.
    """
    for bundle in plan.bundles():
        planned = next(f for f in bundle.files if f.path == MANIFEST_NAME)
        data = store.path(planned.sha256).read_bytes()
        try:
            on_disk = BundleManifest.model_validate_json(data)
        except ValidationError as e:
            raise ManifestMismatchError(
                f"{bundle.ref.name} {bundle.ref.version}: {MANIFEST_NAME} is not a valid "
                f"manifest: {e}"
            ) from e
        if on_disk != bundle.manifest:
            raise ManifestMismatchError(
                f"{bundle.ref.name} {bundle.ref.version}: {MANIFEST_NAME} differs from the "
                "manifest signed in its target's custom field"
            )
