"""Field types and the base model shared by every protocol module.

Invariants every protocol model inherits from :class:`StrictModel`:

- unknown fields are refused (``extra="forbid"``), instances are immutable (``frozen``);
- values are not coerced (``strict``): ``"5"`` is not an int, ``1`` is not a bool, ``NaN``
  and infinities are refused. Only enums and timestamps are read leniently, so that JSON
  text and ``json.loads`` output (strings) both validate;
- every string and list that a remote party can send has an upper bound.

Top-level messages derive from :class:`Message` and carry ``schema_version``. A version
higher than :data:`SCHEMA_VERSION` is refused with an error saying it is newer than this
build supports, so an old device never half-reads a message from a newer coordinator.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
)

#: The newest message schema version this build reads and writes.
SCHEMA_VERSION: Final = 1

#: Upper bound of a single bundle file (bytes): 8 GiB.
MAX_FILE_SIZE = 8 * 1024**3

MAX_PATH_LENGTH = 255  # characters


def _refuse_future_version(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool) and value > SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {value} is newer than supported (this build reads up to "
            f"{SCHEMA_VERSION}); upgrade nanofleet to read this message"
        )
    return value


def _check_rel_path(value: str) -> str:
    if value.startswith("/"):
        raise ValueError(f"path {value!r} is absolute; it must be relative to the bundle")
    if "\\" in value:
        raise ValueError(f"path {value!r} contains a backslash; use '/' as separator")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in value):
        raise ValueError(f"path {value!r} contains a control character")
    for part in value.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(
                f"path {value!r} has an empty, '.' or '..' segment; "
                "it must name a file inside the bundle"
            )
    return value


def _timestamp_text_only(value: object) -> object:
    if isinstance(value, str | datetime):
        return value
    raise ValueError(
        "timestamp must be an RFC 3339 string with a UTC offset, "
        f"e.g. 2026-12-03T20:00:00Z (got {type(value).__name__})"
    )


SchemaVersion = Annotated[Literal[1], BeforeValidator(_refuse_future_version)]

Sha256Hex = Annotated[
    str,
    StringConstraints(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$"),
    Field(description="A SHA-256 digest: 64 lowercase hexadecimal characters."),
]

RelPath = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_PATH_LENGTH),
    AfterValidator(_check_rel_path),
    Field(
        description=(
            "A relative POSIX path inside a bundle: '/' separators, no leading '/', "
            "no backslash, no control characters, no empty, '.' or '..' segments."
        )
    ),
]

Slug = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$"),
    Field(description="Lowercase name: [a-z0-9][a-z0-9._-]{0,63}."),
]

#: Identifiers chosen by an operator or a device (round ids, bundle versions).
Identifier = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"),
    Field(description="An identifier: [A-Za-z0-9][A-Za-z0-9._+-]{0,63}."),
]

#: A variable MQTT topic level (device id, group, channel); the same rule as
#: :func:`protocol.topics.check_segment`.
TopicSegment = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    Field(description="An MQTT topic level: [A-Za-z0-9][A-Za-z0-9._-]{0,63}."),
]

#: A point in time with an explicit UTC offset, written as RFC 3339 text.
Timestamp = Annotated[AwareDatetime, Strict(False), BeforeValidator(_timestamp_text_only)]


class StrictModel(BaseModel):
    """Base of every protocol model: closed, immutable, no coercion (see module docstring)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )


class Message(StrictModel):
    """A top-level document that crosses a process or machine boundary."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    """Version of this message's schema; a newer one than the reader knows is refused."""
