"""What a device is about to install, as read from verified metadata, and the pure checks on it.

A :class:`ReleasePlan` is built only from TUF metadata the client has verified; the
lifecycle record persists it, so an update resumed after a crash stages exactly the files
that were verified, without the network. Its checks are pure functions: bytes in, a typed
refusal out.
"""

from __future__ import annotations

import hashlib
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import AdapterMismatchError, ReleaseCounterError
from protocol._types import RelPath, Sha256Hex, TopicSegment
from protocol.bundle import BundleKind, BundleManifest
from protocol.messages import BundleRef


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlannedFile(_Frozen):
    """One file of a bundle: where it goes in the bundle directory and what it must be."""

    path: RelPath
    target_path: str = Field(min_length=1, max_length=1024)
    """The TUF target path it was verified under."""
    url_path: str = Field(min_length=1, max_length=1100)
    """Where to download it, relative to the targets base URL (hash-prefixed name)."""
    sha256: Sha256Hex
    size: int = Field(ge=0)


class PlannedBundle(_Frozen):
    """A bundle of a release: its identity, signed manifest and every file incl. the manifest."""

    ref: BundleRef
    manifest: BundleManifest
    release_counter: int | None
    files: tuple[PlannedFile, ...] = Field(min_length=2)

    @property
    def kind(self) -> BundleKind:
        return self.manifest.kind


class ReleasePlan(_Frozen):
    """A group channel's release: a base and optionally an adapter on top of it."""

    group: TopicSegment
    channel: TopicSegment
    timestamp_version: int = Field(ge=1)
    """The TUF timestamp version the plan was verified against."""
    base: PlannedBundle
    adapter: PlannedBundle | None = None

    @model_validator(mode="after")
    def _kinds(self) -> Self:
        if self.base.kind is not BundleKind.BASE:
            raise ValueError("ReleasePlan.base must be a base bundle")
        if self.adapter is not None and self.adapter.kind is not BundleKind.ADAPTER:
            raise ValueError("ReleasePlan.adapter must be an adapter bundle")
        return self

    @property
    def release_id(self) -> str:
        """The identity of what runs: a hash over the base and the adapter bundle hashes."""
        adapter = self.adapter.ref.sha256 if self.adapter else "-"
        return hashlib.sha256(f"{self.base.ref.sha256}+{adapter}".encode()).hexdigest()

    @property
    def target(self) -> BundleRef:
        """The bundle a progress message names: the adapter when there is one, else the base."""
        return self.adapter.ref if self.adapter else self.base.ref

    def bundles(self) -> tuple[PlannedBundle, ...]:
        return (self.base,) if self.adapter is None else (self.base, self.adapter)

    def blobs(self) -> dict[str, PlannedFile]:
        """Return one planned file per distinct content hash."""
        out: dict[str, PlannedFile] = {}
        for bundle in self.bundles():
            for f in bundle.files:
                out.setdefault(f.sha256, f)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.blobs().values())


def check_adapter_fits(base: BundleManifest, base_sha256: str, adapter: BundleManifest) -> None:
    """Check that ``adapter`` may run on the base ``base`` whose bundle hash is ``base_sha256``.

    Raises:
        AdapterMismatchError: the adapter names another base, another tokenizer, or a rank
            above what the base's graph accepts.
    """
    if adapter.adapter is None or base.model is None:
        raise AdapterMismatchError(
            f"{adapter.name} {adapter.version} is not an adapter for a base model"
        )
    info = adapter.adapter
    if info.base_bundle_sha256 != base_sha256:
        raise AdapterMismatchError(
            f"adapter {adapter.name} {adapter.version} is bound to base "
            f"{info.base_bundle_sha256[:12]}, not to {base.name} {base.version} "
            f"({base_sha256[:12]})"
        )
    if info.tokenizer_sha256 != base.model.tokenizer_sha256:
        raise AdapterMismatchError(
            f"adapter {adapter.name} {adapter.version} was trained with tokenizer "
            f"{info.tokenizer_sha256[:12]}, the base uses {base.model.tokenizer_sha256[:12]}"
        )
    if info.rank > base.model.max_adapter_rank:
        raise AdapterMismatchError(
            f"adapter {adapter.name} {adapter.version} has rank {info.rank}, above the "
            f"base's max_adapter_rank of {base.model.max_adapter_rank}"
        )


def check_release_counter(name: str, version: str, counter: int, committed: int | None) -> None:
    """Refuse a base whose release counter is below the committed one.

    Raises:
        ReleaseCounterError: ``counter < committed``. Going back to older bytes takes a new
            release with a higher counter, signed by the offline targets key.
    """
    if committed is not None and counter < committed:
        raise ReleaseCounterError(
            f"base {name} {version} has release counter {counter}, below the committed "
            f"counter {committed}; an older base needs a new release signed with the offline key"
        )
