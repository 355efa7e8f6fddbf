"""The TUF repository of releases, kept as static files, edited with python-tuf's metadata API.

Layout (everything under ``metadata/`` and ``targets/`` can be served by any static host
or CDN: it carries its own signatures)::

    metadata/N.root.json        every root version (clients walk the chain)
    metadata/root.json          a copy of the newest root (what new devices pin)
    metadata/timestamp.json     the only unversioned role clients fetch
    metadata/V.snapshot.json    consistent snapshots: every version is a distinct file
    metadata/V.targets.json  metadata/V.adapters.json  metadata/V.channels.json
    targets/<dir>/<sha256>.<name>   target files, named by content (hash-prefixed)

Roles: root and targets are offline keys; snapshot, timestamp and the delegated roles
``adapters`` (``adapters/*/*/*``) and ``channels`` (``channels/*/*``) are online keys held
by the coordinator. Base bundles are signed by targets, adapters by ``adapters``, channel
pointers by ``channels`` (see :mod:`protocol.release` for the paths and custom fields).

Invariants:

- a version only goes up; each publish writes new role files first, then the snapshot,
  then ``timestamp.json`` last (atomically), so a reader always sees a consistent state;
- nothing out of a delegated role's scope is ever published (a device would silently not
  find it); a published ``name/version`` never changes content;
- every base bundle gets a release counter one above the highest published, so devices
  can refuse going back to an older base (undo = publish the old files as a new version);
- a new root is signed by the threshold of the previous root and of itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

from pydantic import ValidationError
from securesystemslib.signer import Signer
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from coordinator.errors import RefusedError, SigningKeyError
from coordinator.repository.keys import ROLES, KeyRing, check_role
from protocol.bundle import MANIFEST_NAME, BundleKind, BundleManifest, bundle_hash, canonical_json
from protocol.messages import BundleRef
from protocol.release import (
    ADAPTERS_ROLE,
    CHANNELS_DIR,
    CHANNELS_ROLE,
    DELEGATED_PATHS,
    DEVICE_BINS_PREFIX,
    BundleTargetInfo,
    ChannelPointer,
    DevicePointer,
    bundle_target_path,
    channel_target_path,
    custom_field,
    device_pointer_path,
    manifest_target_path,
    parse_bundle_info,
    parse_channel_pointer,
    parse_device_pointer,
)

DELEGATED_ROLES = (ADAPTERS_ROLE, CHANNELS_ROLE)
#: Device pointers are spread over 2**bits hash bins (64: about 160 devices per bin at 10,000).
DEFAULT_DEVICE_BIN_BITS = 6
#: The lock file every writer holds (``flock``), so the daemon and the CLI can share a repo.
LOCK_NAME = ".lock"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _exclusive(
    method: Callable[Concatenate[Repository, _P], _R],
) -> Callable[Concatenate[Repository, _P], _R]:
    """Run a writer holding the repository's lock (re-entrant within one object)."""

    def locked(self: Repository, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock():
            return method(self, *args, **kwargs)

    return cast("Callable[Concatenate[Repository, _P], _R]", functools.wraps(method)(locked))


_CHUNK = 1 << 20  # bytes read at a time while hashing


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    delegated: timedelta = timedelta(days=14)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        top = role in ("root", "targets", "snapshot", "timestamp")
        lifetime: timedelta = getattr(self, role if top else "delegated")
        return lifetime


class Progress(Protocol):
    """Receives hashing progress (the CLI draws a bar)."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...


class _NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class PublishedBundle:
    """A bundle in the repository, as its signed target describes it."""

    manifest: BundleManifest
    release_counter: int | None
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", bundle_hash(self.manifest))

    @property
    def ref(self) -> BundleRef:
        return BundleRef(name=self.manifest.name, version=self.manifest.version, sha256=self.sha256)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Repository:
    """A repository directory; see the module docstring.

    Writers take an exclusive ``flock`` on ``.lock`` in the directory, so several processes
    (the coordinator daemon moving pointers, the release CLI adding bundles) can share it.
    """

    def __init__(
        self,
        path: Path,
        keys: KeyRing | None = None,
        *,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """Open the repository at ``path``; without ``keys`` it can only be read."""
        self.path = path
        self.metadata_dir = path / "metadata"
        self.targets_dir = path / "targets"
        self.keys = keys
        self.expiry = expiry or ExpiryPolicy()
        self._clock = clock
        self._held = 0
        self._guard = threading.RLock()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with self._guard:
            if self._held:
                self._held += 1
                try:
                    yield
                finally:
                    self._held -= 1
                return
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._held = 1
                try:
                    yield
                finally:
                    self._held = 0
            finally:
                os.close(fd)  # closing releases the lock

    # ---- creation ----------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: Path,
        keys: KeyRing,
        *,
        root_threshold: int = 1,
        device_bin_bits: int = DEFAULT_DEVICE_BIN_BITS,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> Repository:
        """Create a repository signed by every key ``keys`` holds for each role.

        The channels role delegates device pointers to ``2**device_bin_bits`` hash bins
        (each signed with the channels key), created empty here.

        Raises:
            RefusedError: ``path`` already holds a repository, or the threshold is invalid.
            SigningKeyError: a role has no key, or root has fewer keys than its threshold.
        """
        repo = cls(path, keys, expiry=expiry, clock=clock)
        if (repo.metadata_dir / "1.root.json").exists():
            raise RefusedError(f"{path} already holds a repository")
        role_keys = {role: keys.public_keys(role) for role in ROLES}
        for role, found in role_keys.items():
            if not found:
                raise SigningKeyError(
                    f"no {role} key in {', '.join(map(str, keys.dirs))}; create one with "
                    f"`nanofleet keys create {role}`"
                )
        if not 1 <= root_threshold <= len(role_keys["root"]):
            raise RefusedError(
                f"root threshold {root_threshold} needs between 1 and the "
                f"{len(role_keys['root'])} root keys available"
            )
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        root = Root(consistent_snapshot=True, expires=repo._expires("root"))
        for role in ("root", "targets", "snapshot", "timestamp"):
            for key in role_keys[role]:
                root.add_key(key, role)
        root.roles["root"].threshold = root_threshold
        repo._write_root(Metadata(root), previous=None)

        targets = Targets(expires=repo._expires("targets"))
        roles = {
            role: DelegatedRole(
                name=role,
                keyids=[],
                threshold=1,
                terminating=True,
                paths=list(DELEGATED_PATHS[role]),
            )
            for role in DELEGATED_ROLES
        }
        targets.delegations = Delegations(keys={}, roles=roles)
        for role in DELEGATED_ROLES:
            for key in role_keys[role]:
                targets.add_key(key, role)
        if not 1 <= device_bin_bits <= 12:
            raise RefusedError(f"device_bin_bits must be 1..12, got {device_bin_bits}")
        delegated = {
            role: Metadata(Targets(expires=repo._expires(role))) for role in DELEGATED_ROLES
        }
        bins = SuccinctRoles(
            keyids=[], threshold=1, bit_length=device_bin_bits, name_prefix=DEVICE_BINS_PREFIX
        )
        channels = delegated[CHANNELS_ROLE].signed
        channels.delegations = Delegations(keys={}, succinct_roles=bins)
        for key in role_keys[CHANNELS_ROLE]:
            channels.add_key(key)
        for name in bins.get_roles():
            delegated[name] = Metadata(Targets(expires=repo._expires(CHANNELS_ROLE)))
        repo._publish(Metadata(targets), delegated, first=True)
        return repo

    # ---- reading -----------------------------------------------------------------------

    def root(self) -> Metadata[Root]:
        """Return the newest root."""
        versions = [
            int(p.name.split(".", 1)[0])
            for p in self.metadata_dir.glob("*.root.json")
            if p.name.split(".", 1)[0].isdigit()
        ]
        if not versions:
            raise RefusedError(f"{self.path} holds no repository; run `nanofleet release init`")
        return Metadata[Root].from_file(str(self.metadata_dir / f"{max(versions)}.root.json"))

    def timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))

    def snapshot(self) -> Metadata[Snapshot]:
        version = self.timestamp().signed.snapshot_meta.version
        return Metadata[Snapshot].from_file(str(self.metadata_dir / f"{version}.snapshot.json"))

    def targets(self, role: str = "targets") -> Metadata[Targets]:
        """Return the current metadata of ``targets`` or a delegated role."""
        version = self.snapshot().signed.meta[f"{role}.json"].version
        return Metadata[Targets].from_file(str(self.metadata_dir / f"{version}.{role}.json"))

    def bundles(self) -> list[PublishedBundle]:
        """Return every published bundle, bases first, in publication order within a kind."""
        out = []
        for role in ("targets", ADAPTERS_ROLE):
            for path, target in self.targets(role).signed.targets.items():
                if path.endswith(f"/{MANIFEST_NAME}"):
                    info = parse_bundle_info(target.custom)
                    out.append(PublishedBundle(info.manifest, info.release_counter))
        return out

    def channels(self) -> list[ChannelPointer]:
        """Return every group channel pointer."""
        return [
            parse_channel_pointer(target.custom)
            for path, target in self.targets(CHANNELS_ROLE).signed.targets.items()
            if path.startswith(f"{CHANNELS_DIR}/")
        ]

    def device_pointers(self) -> list[DevicePointer]:
        """Return every device's own pointer (those a staged rollout has moved)."""
        return [
            parse_device_pointer(target.custom)
            for name in self._bins().get_roles()
            for target in self.targets(name).signed.targets.values()
        ]

    def find(self, name: str, version: str) -> PublishedBundle | None:
        """Return the bundle ``name`` ``version`` if published."""
        return next(
            (b for b in self.bundles() if (b.manifest.name, b.manifest.version) == (name, version)),
            None,
        )

    # ---- releases ----------------------------------------------------------------------

    @_exclusive
    def add_bundle(self, directory: Path, progress: Progress | None = None) -> PublishedBundle:
        """Publish the bundle in ``directory``: a base under targets, an adapter under adapters.

        Idempotent: the same bundle published again changes nothing.

        Raises:
            RefusedError: the manifest is invalid, a file is missing, a link, or differs
                from the manifest, an adapter's file is not flat or its base is not
                published, or this name and version exist with other content.
            SigningKeyError: a signing key is missing or locked.
        """
        progress = progress or _NoProgress()
        manifest_path = directory / MANIFEST_NAME
        manifest_bytes = _read_regular(manifest_path)
        try:
            manifest = BundleManifest.model_validate_json(manifest_bytes)
        except ValidationError as e:
            raise RefusedError(f"{manifest_path}: {e}") from e
        kind = manifest.kind
        existing = self.find(manifest.name, manifest.version)
        if existing is not None:
            if existing.sha256 == bundle_hash(manifest) and existing.manifest.kind is kind:
                return existing
            raise RefusedError(
                f"{manifest.name} {manifest.version} is already published with other content; "
                "publish it under a new version"
            )
        if kind is BundleKind.ADAPTER:
            self._check_adapter(manifest)

        entries: dict[str, TargetFile] = {}
        for entry in manifest.files:
            source = directory / entry.path
            target_path = bundle_target_path(kind, manifest.name, manifest.version, entry.path)
            sha256, size = self._store_target(source, target_path, progress)
            if (sha256, size) != (entry.sha256, entry.size):
                raise RefusedError(
                    f"{source}: {size} bytes with sha256 {sha256[:12]}, but the manifest says "
                    f"{entry.size} bytes {entry.sha256[:12]}"
                )
            entries[target_path] = TargetFile(size, {"sha256": sha256}, target_path)

        counter = None
        if kind is BundleKind.BASE:
            counter = 1 + max((b.release_counter or 0 for b in self.bundles()), default=0)
        info = BundleTargetInfo(manifest=manifest, release_counter=counter)
        manifest_target = manifest_target_path(kind, manifest.name, manifest.version)
        manifest_sha = self._store_bytes(manifest_bytes, manifest_target)
        entries[manifest_target] = TargetFile(
            len(manifest_bytes),
            {"sha256": manifest_sha},
            manifest_target,
            unrecognized_fields={"custom": custom_field(info)},
        )

        role = "targets" if kind is BundleKind.BASE else ADAPTERS_ROLE
        md = self.targets(role)
        md.signed.targets.update(entries)
        if role == "targets":
            self._publish(md, {})
        else:
            self._publish(None, {role: md})
        return PublishedBundle(manifest, counter)

    @_exclusive
    def point(self, group: str, channel: str, name: str, version: str) -> ChannelPointer:
        """Point ``group``'s ``channel`` at a published bundle (an adapter brings its base).

        Raises:
            RefusedError: the bundle is not published, or an adapter's base is not.
            SigningKeyError: the channels key is missing or locked.
        """
        base, adapter = self._release(name, version)
        try:
            pointer = ChannelPointer(
                group=group,
                channel=channel,
                base=base.ref,
                adapter=adapter.ref if adapter else None,
            )
        except ValidationError as e:
            raise RefusedError(f"channel {group}/{channel}: {e}") from e
        md = self.targets(CHANNELS_ROLE)
        if self._set_pointer(md, channel_target_path(group, channel), pointer):
            self._publish(None, {CHANNELS_ROLE: md})
        return pointer

    @_exclusive
    def point_devices(
        self, device_ids: Iterable[str], channel: str, name: str, version: str
    ) -> list[DevicePointer]:
        """Point each device's own ``channel`` at a published bundle, in one publish.

        A device with its own pointer follows it instead of its group's pointer; this is how
        a staged rollout reaches exactly one wave's devices.

        Raises:
            RefusedError: the bundle or an adapter's base is not published, or a device id or
                the channel is not a valid path segment.
            SigningKeyError: the channels key is missing or locked.
        """
        base, adapter = self._release(name, version)
        bins = self._bins()
        changed: dict[str, Metadata[Targets]] = {}
        loaded: dict[str, Metadata[Targets]] = {}
        pointers = []
        for device_id in device_ids:
            try:
                pointer = DevicePointer(
                    device_id=device_id,
                    channel=channel,
                    base=base.ref,
                    adapter=adapter.ref if adapter else None,
                )
            except ValidationError as e:
                raise RefusedError(f"device {device_id!r} channel {channel!r}: {e}") from e
            path = device_pointer_path(device_id, channel)
            name = bins.get_role_for_target(path)
            if name not in loaded:
                loaded[name] = self.targets(name)
            md = loaded[name]
            if self._set_pointer(md, path, pointer):
                changed[name] = md
            pointers.append(pointer)
        if changed:
            self._publish(None, changed)
        return pointers

    @_exclusive
    def clear_devices(self, device_ids: Iterable[str], channel: str) -> list[str]:
        """Remove the devices' own pointers for ``channel`` (they follow their group again).

        Returns the ids whose pointer was removed; unknown ids are skipped.

        Raises:
            SigningKeyError: the channels key is missing or locked.
        """
        bins = self._bins()
        loaded: dict[str, Metadata[Targets]] = {}
        changed: dict[str, Metadata[Targets]] = {}
        removed = []
        for device_id in device_ids:
            path = device_pointer_path(device_id, channel)
            name = bins.get_role_for_target(path)
            if name not in loaded:
                loaded[name] = self.targets(name)
            if loaded[name].signed.targets.pop(path, None) is not None:
                changed[name] = loaded[name]
                removed.append(device_id)
        if changed:
            self._publish(None, changed)
        return removed

    def _bins(self) -> SuccinctRoles:
        """The hash bins the channels role delegates device pointers to."""
        delegations = self.targets(CHANNELS_ROLE).signed.delegations
        if delegations is None or delegations.succinct_roles is None:
            raise RefusedError(
                f"{self.path} has no device pointer bins (made by an older `release init`)"
            )
        return delegations.succinct_roles

    def _release(self, name: str, version: str) -> tuple[PublishedBundle, PublishedBundle | None]:
        """The base and adapter a pointer at ``name`` ``version`` names."""
        bundle = self.find(name, version)
        if bundle is None:
            raise RefusedError(
                f"{name} {version} is not published; add it with `release add-bundle`"
            )
        if bundle.manifest.kind is BundleKind.BASE:
            return bundle, None
        return self._check_adapter(bundle.manifest), bundle

    def _set_pointer(
        self, md: Metadata[Targets], path: str, pointer: ChannelPointer | DevicePointer
    ) -> bool:
        """List ``pointer`` at ``path`` in ``md``; False if it is already listed as is."""
        current = md.signed.targets.get(path)
        if current is not None and current.custom == custom_field(pointer):
            return False
        data = canonical_json(pointer)
        md.signed.targets[path] = TargetFile(
            len(data),
            {"sha256": self._store_bytes(data, path)},
            path,
            unrecognized_fields={"custom": custom_field(pointer)},
        )
        return True

    @_exclusive
    def refresh(self, *, force: bool = False) -> list[str]:
        """Re-sign the online roles whose metadata is past half its lifetime (or all: ``force``).

        Returns the roles re-signed. The coordinator daemon calls this periodically.

        Raises:
            SigningKeyError: an online key is missing or locked.
        """
        due = [
            role
            for role in (*DELEGATED_ROLES, "snapshot", "timestamp")
            if force or self._past_half_life(role)
        ]
        if not due:
            return []
        delegated = {role: self.targets(role) for role in DELEGATED_ROLES if role in due}
        if CHANNELS_ROLE in delegated:  # the device pointer bins share its key and lifetime
            delegated.update({name: self.targets(name) for name in self._bins().get_roles()})
        if delegated or "snapshot" in due:
            self._publish(None, delegated)
            return sorted({*due, "snapshot", "timestamp"})
        self._publish_timestamp(self.snapshot())
        return ["timestamp"]

    def expiring_offline(self, within: timedelta) -> list[str]:
        """Return the offline roles (root, targets) expiring within ``within``."""
        limit = self._clock() + within
        out = []
        if self.root().signed.expires <= limit:
            out.append("root")
        if self.targets().signed.expires <= limit:
            out.append("targets")
        return out

    # ---- keys --------------------------------------------------------------------------

    @_exclusive
    def rotate(
        self,
        role: str,
        *,
        revoke: list[str] | None = None,
        new_keys: int | None = None,
        threshold: int | None = None,
    ) -> list[str]:
        """Replace keys of ``role``: revoke ``revoke`` (default: all), add ``new_keys`` fresh ones.

        Returns the new keyids. A top-level role changes in a new root (signed by the old and
        the new root thresholds); a delegated role in a new targets (offline key). The role
        is then re-signed with its new keys and published.

        Raises:
            RefusedError: a keyid is not a key of the role, or the threshold is impossible.
            SigningKeyError: the signatures needed are not available.
        """
        check_role(role)
        delegated = role in DELEGATED_ROLES
        delegator_md: Metadata[Any] = self.targets() if delegated else self.root()
        delegator = cast("Root | Targets", delegator_md.signed)
        current = list(delegator.get_delegated_role(role).keyids)
        revoked = current if revoke is None else revoke
        for keyid in revoked:
            if keyid not in current:
                raise RefusedError(f"{keyid[:12]} is not a key of {role}")
        count = len(revoked) if new_keys is None else new_keys
        remaining = len(current) - len(revoked) + count
        wanted = threshold or min(delegator.get_delegated_role(role).threshold, remaining)
        if not 1 <= wanted <= remaining:
            raise RefusedError(
                f"{role} would have {remaining} keys; its threshold must be between 1 and that"
            )
        created = [self._ring().create(role) for _ in range(count)]
        for keyid in revoked:
            delegator.revoke_key(keyid, role)
        for key in created:
            delegator.add_key(key.public, role)
        delegator.get_delegated_role(role).threshold = wanted
        if delegated:
            signed = {role: self.targets(role)}
            if role == CHANNELS_ROLE:  # its bins are signed by the same keys
                inner = signed[role].signed
                for keyid in revoked:
                    inner.revoke_key(keyid)
                for key in created:
                    inner.add_key(key.public)
                bins = self._bins()
                if inner.delegations is not None and inner.delegations.succinct_roles:
                    inner.delegations.succinct_roles.threshold = wanted
                signed.update({name: self.targets(name) for name in bins.get_roles()})
            self._publish(cast("Metadata[Targets]", delegator_md), signed)
        else:
            previous = self.root()
            self._write_root(cast("Metadata[Root]", delegator_md), previous=previous)
            if role == "targets":
                self._publish(self.targets(), {})
            elif role == "snapshot":
                self._publish(None, {})
            elif role == "timestamp":
                self._publish_timestamp(self.snapshot())
        return [k.keyid for k in created]

    # ---- internals ---------------------------------------------------------------------

    def _expires(self, role: str) -> datetime:
        return (self._clock() + self.expiry.of(role)).replace(microsecond=0)

    def _past_half_life(self, role: str) -> bool:
        md: Metadata[Any]
        if role == "timestamp":
            md = self.timestamp()
        elif role == "snapshot":
            md = self.snapshot()
        else:
            md = self.targets(role)
        expires: datetime = md.signed.expires
        return expires - self._clock() < self.expiry.of(role) / 2

    def _check_adapter(self, manifest: BundleManifest) -> PublishedBundle:
        if manifest.adapter is None:
            raise RefusedError(f"{manifest.name} {manifest.version} is not an adapter")
        nested = [f.path for f in manifest.files if "/" in f.path]
        if nested:
            raise RefusedError(
                f"adapter files must sit at the top of the bundle (the adapters role may sign "
                f"only {DELEGATED_PATHS[ADAPTERS_ROLE][0]}); nested: {nested}"
            )
        base = next(
            (
                b
                for b in self.bundles()
                if b.sha256 == manifest.adapter.base_bundle_sha256
                and b.manifest.kind is BundleKind.BASE
            ),
            None,
        )
        if base is None:
            raise RefusedError(
                f"adapter {manifest.name} {manifest.version} fits base "
                f"{manifest.adapter.base_bundle_sha256[:12]}, which is not published"
            )
        return base

    def _target_file(self, target_path: str, sha256: str) -> Path:
        directory, _, name = target_path.rpartition("/")
        return self.targets_dir / directory / f"{sha256}.{name}"

    def _store_bytes(self, data: bytes, target_path: str) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        dest = self._target_file(target_path, sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            _write_atomic(dest, data)
        return sha256

    def _store_target(self, source: Path, target_path: str, progress: Progress) -> tuple[str, int]:
        """Copy ``source`` into the targets dir, hashing it once on the way; return (sha, size)."""
        st = _lstat_regular(source)
        progress.start(source.name, st.st_size)
        tmp_dir = self.targets_dir / ".incoming"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{os.getpid()}-{source.name}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                    progress.advance(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            sha256 = digest.hexdigest()
            dest = self._target_file(target_path, sha256)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return sha256, size

    def _ring(self) -> KeyRing:
        if self.keys is None:
            raise SigningKeyError("this repository was opened without keys; pass --keys")
        return self.keys

    def _sign(self, md: Metadata[Any], keyids: list[str], threshold: int, role: str) -> None:
        md.signatures.clear()
        signers: list[Signer] = []
        for keyid in keyids:
            signer = self._ring().signer(keyid)
            if signer is not None:
                signers.append(signer)
        if len(signers) < threshold:
            dirs = ", ".join(map(str, self._ring().dirs))
            raise SigningKeyError(
                f"{role} needs {threshold} signature(s); only {len(signers)} of its keys "
                f"({', '.join(k[:12] for k in keyids)}) are in {dirs}"
            )
        for one in signers:
            md.sign(one, append=True)

    def _write_root(self, md: Metadata[Root], previous: Metadata[Root] | None) -> None:
        root = md.signed
        if previous is not None:
            root.version = previous.signed.version + 1
        root.expires = self._expires("root")
        keyids = list(root.roles["root"].keyids)
        old_keyids = list(previous.signed.roles["root"].keyids) if previous else []
        md.signatures.clear()
        signed = 0
        for keyid in dict.fromkeys([*keyids, *old_keyids]):
            signer = self._ring().signer(keyid)
            if signer is not None:
                md.sign(signer, append=True)
                signed += 1
        result = root.get_root_verification_result(
            previous.signed if previous else None, md.signed_bytes, md.signatures
        )
        if not result.verified:
            raise SigningKeyError(
                f"root version {root.version} is signed by {signed} key(s), short of the "
                "threshold of the new root"
                + (" and of the previous root" if previous else "")
                + "; make more root keys available"
            )
        data = md.to_bytes(JSONSerializer(compact=False))
        _write_atomic(self.metadata_dir / f"{root.version}.root.json", data)
        _write_atomic(self.metadata_dir / "root.json", data)

    def _publish(
        self,
        targets: Metadata[Targets] | None,
        delegated: dict[str, Metadata[Targets]],
        *,
        first: bool = False,
    ) -> None:
        """Bump and sign the given targets roles, then a new snapshot and timestamp."""
        root = self.root().signed
        snapshot = (
            Metadata(Snapshot(expires=self._expires("snapshot"))) if first else self.snapshot()
        )
        top = targets.signed if targets is not None else self.targets().signed
        for role, md in [
            *([("targets", targets)] if targets is not None else []),
            *delegated.items(),
        ]:
            if not first:
                md.signed.version += 1
            md.signed.expires = self._expires(role)
            keyids, threshold = self._signing_keys(role, root, top, delegated)
            self._sign(md, keyids, threshold, role)
            data = md.to_bytes(JSONSerializer(compact=True))
            _write_atomic(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
            snapshot.signed.meta[f"{role}.json"] = _meta_file(md.signed.version, data)
        if not first:
            snapshot.signed.version += 1
        snapshot.signed.expires = self._expires("snapshot")
        self._publish_timestamp(snapshot, sign_snapshot=True, first=first)

    def _signing_keys(
        self, role: str, root: Root, top: Targets, delegated: dict[str, Metadata[Targets]]
    ) -> tuple[list[str], int]:
        """The keyids and threshold that sign ``role``: from root, targets' delegations, or
        (a device pointer bin) the channels role's succinct delegation."""
        if role == "targets":
            return list(root.roles["targets"].keyids), root.roles["targets"].threshold
        if top.delegations is None or top.delegations.roles is None:
            raise RefusedError("targets has no delegations; the repository is damaged")
        if role in top.delegations.roles:
            delegation = top.delegations.roles[role]
            return list(delegation.keyids), delegation.threshold
        channels = delegated.get(CHANNELS_ROLE) or self.targets(CHANNELS_ROLE)
        inner = channels.signed.delegations
        if inner is None or inner.succinct_roles is None:
            raise RefusedError(f"no delegation signs {role!r}; the repository is damaged")
        bins = inner.succinct_roles
        if not bins.is_delegated_role(role):
            raise RefusedError(f"no delegation signs {role!r}; the repository is damaged")
        return list(bins.keyids), bins.threshold

    def _publish_timestamp(
        self, snapshot: Metadata[Snapshot], *, sign_snapshot: bool = False, first: bool = False
    ) -> None:
        root = self.root().signed
        if sign_snapshot:
            role = root.roles["snapshot"]
            self._sign(snapshot, list(role.keyids), role.threshold, "snapshot")
            data = snapshot.to_bytes(JSONSerializer(compact=True))
            _write_atomic(self.metadata_dir / f"{snapshot.signed.version}.snapshot.json", data)
        else:
            data = (self.metadata_dir / f"{snapshot.signed.version}.snapshot.json").read_bytes()
        if first:
            timestamp = Metadata(Timestamp(expires=self._expires("timestamp")))
        else:
            timestamp = self.timestamp()
            timestamp.signed.version += 1
        timestamp.signed.snapshot_meta = _meta_file(snapshot.signed.version, data)
        timestamp.signed.expires = self._expires("timestamp")
        role = root.roles["timestamp"]
        self._sign(timestamp, list(role.keyids), role.threshold, "timestamp")
        _write_atomic(
            self.metadata_dir / "timestamp.json", timestamp.to_bytes(JSONSerializer(compact=True))
        )


def _meta_file(version: int, data: bytes) -> MetaFile:
    return MetaFile(
        version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()}
    )


def _lstat_regular(path: Path) -> os.stat_result:
    try:
        st = os.lstat(path)
    except FileNotFoundError as e:
        raise RefusedError(f"{path} is missing") from e
    if not stat.S_ISREG(st.st_mode):
        raise RefusedError(f"{path} is a link or not a regular file; bundles hold regular files")
    return st


def _read_regular(path: Path) -> bytes:
    _lstat_regular(path)
    return path.read_bytes()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
