"""How releases are laid out in the TUF repository: target paths, roles, signed custom fields.

The coordinator writes these shapes into TUF targets metadata; the agent reads them back
from metadata it has verified. Both sides take the names from here and nowhere else.

Target paths (every ``{...}`` is one path level):

- ``models/{name}/{version}/{path}``: every file of a base bundle, listed by the top-level
  ``targets`` role (offline key). ``path`` may have several levels.
- ``adapters/{name}/{version}/{file}``: every file of an adapter bundle, listed by the
  delegated :data:`ADAPTERS_ROLE` (the coordinator's key). Adapter files are flat (one level)
  because a TUF path pattern's ``*`` matches one level only.
- ``channels/{group}/{channel}``: the :class:`ChannelPointer` of a group's release channel,
  listed by the delegated :data:`CHANNELS_ROLE` (the coordinator's key).
- ``devices/{device_id}/{channel}``: a :class:`DevicePointer`, one device's own release
  channel, in :data:`CHANNELS_ROLE`'s scope and listed by one of its hash bins
  (:data:`DEVICE_BINS_PREFIX`, signed with the channels key). A staged rollout moves these
  wave by wave; a device follows its own pointer when there is one and its group's
  otherwise.

Invariants:

- the ``manifest.json`` target of a bundle carries a :class:`BundleTargetInfo` under the
  custom key :data:`CUSTOM_KEY`; the manifest in it is the bundle's manifest, and its
  :func:`protocol.bundle.bundle_hash` is the bundle's identity;
- a base bundle carries a ``release_counter`` (>= 1, increasing with every base the
  repository publishes); an adapter carries none. A device never installs a base whose
  counter is below the one it has committed;
- a :class:`ChannelPointer` names the base a channel runs and, optionally, one adapter on
  top of it. The pointer cannot say which base an adapter fits: the adapter's own signed
  manifest does, and both sides check that its ``base_bundle_sha256`` is ``base.sha256``.
  A :class:`DevicePointer` names the same things for one device and overrides the group's.
"""

from __future__ import annotations

from typing import Any, Final, Self

from pydantic import Field, model_validator

from protocol._types import Message, StrictModel, TopicSegment
from protocol.bundle import MANIFEST_NAME, BundleKind, BundleManifest
from protocol.messages import BundleRef

#: Key under which nanofleet's fields sit in a TUF target's ``custom`` object.
CUSTOM_KEY: Final = "nanofleet"

MODELS_DIR: Final = "models"
ADAPTERS_DIR: Final = "adapters"
CHANNELS_DIR: Final = "channels"
DEVICES_DIR: Final = "devices"

#: Delegated role that may list adapter files only; its key is held by the coordinator.
ADAPTERS_ROLE: Final = "adapters"
#: Delegated role that may list channel pointers only; its key is held by the coordinator.
CHANNELS_ROLE: Final = "channels"
#: Name prefix of the hash bins the channels role delegates device pointers to (TUF succinct
#: roles, ``devices-00`` ...): a device downloads only its own bin, not every device's pointer.
DEVICE_BINS_PREFIX: Final = "devices"
#: The path patterns each delegated role is confined to (``*`` matches one path level).
DELEGATED_PATHS: Final[dict[str, tuple[str, ...]]] = {
    ADAPTERS_ROLE: (f"{ADAPTERS_DIR}/*/*/*",),
    CHANNELS_ROLE: (f"{CHANNELS_DIR}/*/*", f"{DEVICES_DIR}/*/*"),
}

#: Largest release counter (JSON-safe integer).
MAX_RELEASE_COUNTER: Final = 2**53 - 1


def bundle_dir(kind: BundleKind, name: str, version: str) -> str:
    """Return the target directory of a bundle: ``models/{name}/{version}`` or ``adapters/...``."""
    top = MODELS_DIR if kind is BundleKind.BASE else ADAPTERS_DIR
    return f"{top}/{name}/{version}"


def bundle_target_path(kind: BundleKind, name: str, version: str, path: str) -> str:
    """Return the TUF target path of the file ``path`` of a bundle."""
    return f"{bundle_dir(kind, name, version)}/{path}"


def manifest_target_path(kind: BundleKind, name: str, version: str) -> str:
    """Return the TUF target path of a bundle's ``manifest.json``."""
    return bundle_target_path(kind, name, version, MANIFEST_NAME)


def channel_target_path(group: str, channel: str) -> str:
    """Return the TUF target path of a group channel's pointer."""
    return f"{CHANNELS_DIR}/{group}/{channel}"


def device_pointer_path(device_id: str, channel: str) -> str:
    """Return the TUF target path of one device's own pointer for ``channel``."""
    return f"{DEVICES_DIR}/{device_id}/{channel}"


class BundleTargetInfo(StrictModel):
    """The signed custom field of a bundle's ``manifest.json`` target."""

    manifest: BundleManifest
    release_counter: int | None = Field(ge=1, le=MAX_RELEASE_COUNTER)
    """Monotonic counter of base releases; ``None`` for an adapter."""

    @model_validator(mode="after")
    def _counter_for_base_only(self) -> Self:
        is_base = self.manifest.kind is BundleKind.BASE
        if is_base and self.release_counter is None:
            raise ValueError("a base bundle needs a release_counter")
        if not is_base and self.release_counter is not None:
            raise ValueError("an adapter bundle has no release_counter")
        return self


class ChannelPointer(Message):
    """What a group's release channel should run; the target ``channels/{group}/{channel}``.

    The pointer only chooses among bundles that are signed on their own: a base signed by
    the offline targets key, an adapter signed by the adapters role.
    """

    group: TopicSegment
    channel: TopicSegment
    base: BundleRef
    """The base bundle (name, version, bundle hash)."""
    adapter: BundleRef | None = None
    """An adapter to run on top of ``base``, or ``None`` for the plain base."""


class DevicePointer(Message):
    """What one device's release channel should run; the target ``devices/{device_id}/{channel}``.

    It overrides the device's group pointer while it exists: a staged rollout points the
    devices of each started wave here, and devices of waves not started keep following their
    group. The device checks ``device_id`` and ``channel`` against its own.
    """

    device_id: TopicSegment
    channel: TopicSegment
    base: BundleRef
    adapter: BundleRef | None = None


def custom_field(info: BundleTargetInfo | ChannelPointer | DevicePointer) -> dict[str, Any]:
    """Return the TUF ``custom`` object that carries ``info``."""
    return {CUSTOM_KEY: info.model_dump(mode="json")}


def _unwrap(custom: object, what: str) -> object:
    if not isinstance(custom, dict) or CUSTOM_KEY not in custom:
        raise ValueError(f"{what}: the target has no custom field {CUSTOM_KEY!r}")
    return custom[CUSTOM_KEY]


def parse_bundle_info(custom: object) -> BundleTargetInfo:
    """Parse the ``custom`` object of a ``manifest.json`` target.

    Raises:
        ValueError: the custom field is missing (pydantic's ValidationError, a ValueError,
            when it is malformed; the message names the field).
    """
    return BundleTargetInfo.model_validate(_unwrap(custom, "bundle manifest target"))


def parse_channel_pointer(custom: object) -> ChannelPointer:
    """Parse the ``custom`` object of a ``channels/{group}/{channel}`` target.

    Raises:
        ValueError: the custom field is missing or malformed (see :func:`parse_bundle_info`).
    """
    return ChannelPointer.model_validate(_unwrap(custom, "channel pointer target"))


def parse_device_pointer(custom: object) -> DevicePointer:
    """Parse the ``custom`` object of a ``devices/{device_id}/{channel}`` target.

    Raises:
        ValueError: the custom field is missing or malformed (see :func:`parse_bundle_info`).
    """
    return DevicePointer.model_validate(_unwrap(custom, "device pointer target"))
