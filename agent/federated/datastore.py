"""The local training-text store: one small SQLite file in the agent's state directory.

**Nothing in this store is ever sent anywhere.** No code path serializes its rows to the
network, MQTT, logs or metrics; the only reader is the on-device trainer, which turns the
texts into hidden states on the device. What leaves the device in a federated round is an
adapter update (clipped, noised, securely aggregated), never text.

Invariants:

- Texts come from two sources: operator imports of text files (:meth:`import_text_file`)
  and, only when ``capture_enabled`` is set (off by default), the user's side of chat turns
  served by the agent (:meth:`capture_turn`).
- A text is identified by the SHA-256 of its UTF-8 bytes; the same text is stored once.
- The split is a pure function of that id (:func:`split_of`): the same text lands in the
  same split (train or held-out) on every device and every time.
- Retention is enforced in the same transaction as every insert: rows older than
  ``max_age_s`` go first, then the oldest rows until at most ``max_rows`` rows and
  ``max_bytes`` bytes of text remain. A single stored text is at most ``max_text_bytes``;
  longer input is cut into paragraphs and pieces first.
- The database file is created with mode 0600 (and its directory, if created, 0700).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
)

from agent.errors import LocalDataError
from agent.federated.store_limits import StoreLimits

__all__ = [
    "DB_FILE",
    "AddReport",
    "LocalTextStore",
    "Source",
    "Split",
    "StoreLimits",
    "StoreStats",
    "split_of",
    "split_paragraphs",
    "text_id",
]

#: File name of the store inside the agent's state directory.
DB_FILE = "training-texts.sqlite3"


class Source(StrEnum):
    """Where a stored text came from."""

    IMPORT = "import"
    CAPTURE = "capture"


class Split(StrEnum):
    """What a stored text is used for."""

    TRAIN = "train"
    HELDOUT = "heldout"


@dataclass(frozen=True)
class AddReport:
    """What an insert did: texts stored, texts already present, rows retention removed."""

    stored: int
    duplicates: int
    evicted: int


@dataclass(frozen=True)
class StoreStats:
    """Rows and UTF-8 bytes in the store, rows per split."""

    rows: int
    bytes: int
    train: int
    heldout: int


_metadata = MetaData()
_texts = Table(
    "texts",
    _metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("text_id", String(64), nullable=False, unique=True),
    Column("text", Text, nullable=False),
    Column("source", String(16), nullable=False),
    Column("split", String(8), nullable=False, index=True),
    Column("created_at_s", Float, nullable=False, index=True),
    Column("n_bytes", Integer, nullable=False),
)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_WHITESPACE_RUN = re.compile(r"(\s+)")


def text_id(text: str) -> str:
    """The id of a text: SHA-256 hex of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(identifier: str, heldout_fraction: float) -> Split:
    """The split of a text id: held-out iff its first 64 bits, as a fraction, fall below."""
    return Split.HELDOUT if int(identifier[:16], 16) < heldout_fraction * 2**64 else Split.TRAIN


def split_paragraphs(text: str, max_bytes: int) -> list[str]:
    """Cut text at blank lines, strip each paragraph, drop empty ones, and cut a paragraph
    longer than ``max_bytes`` (UTF-8) at whitespace (or, for one overlong word, anywhere
    between characters) into pieces of at most ``max_bytes``."""
    pieces: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        stripped = paragraph.strip()
        if stripped:
            pieces.extend(_pieces(stripped, max_bytes))
    return pieces


def _pieces(paragraph: str, max_bytes: int) -> Iterator[str]:
    if len(paragraph.encode("utf-8")) <= max_bytes:
        yield paragraph
        return
    current = ""
    for part in _WHITESPACE_RUN.split(paragraph):
        candidate = current + part
        if len(candidate.encode("utf-8")) <= max_bytes:
            current = candidate
            continue
        if current.strip():
            yield current.strip()
        current = "" if part.isspace() else part
        while len(current.encode("utf-8")) > max_bytes:
            head = _prefix_within(current, max_bytes)
            yield head
            current = current[len(head) :]
    if current.strip():
        yield current.strip()


def _prefix_within(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits ``max_bytes``."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


class LocalTextStore:
    """The store of one device. Open it with :meth:`open`; close it with :meth:`close`."""

    def __init__(self, engine: Engine, limits: StoreLimits, clock: Callable[[], float]) -> None:
        self._engine = engine
        self._limits = limits
        self._clock = clock

    @classmethod
    def open(
        cls,
        path: Path,
        limits: StoreLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> LocalTextStore:
        """Open (creating if needed, mode 0600) the store at ``path``.

        ``clock`` gives the wall time in seconds since the epoch, for ages.

        Raises:
            LocalDataError: the file or its directory cannot be created or opened.
        """
        try:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        except OSError as e:
            raise LocalDataError(f"training text store {path}: cannot create: {e}") from e
        engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 10.0})
        event.listen(engine, "connect", _sqlite_pragmas)
        _metadata.create_all(engine)
        return cls(engine, limits or StoreLimits(), clock)

    @property
    def limits(self) -> StoreLimits:
        return self._limits

    def close(self) -> None:
        self._engine.dispose()

    def add_texts(self, texts: Iterable[str], source: Source) -> AddReport:
        """Store each text (cut into paragraphs and pieces), then enforce retention.

        Raises:
            LocalDataError: a text contains a NUL character.
        """
        chunks: list[str] = []
        for text in texts:
            _refuse_nul(text, "text")
            chunks.extend(split_paragraphs(text, self._limits.max_text_bytes))
        return self._insert(chunks, source)

    def capture_turn(self, user_text: str) -> AddReport | None:
        """Store the user's side of a chat turn if capture is enabled; None when it is off.

        Only what the user wrote is kept: the model's own replies teach the model nothing
        it does not already say.

        Raises:
            LocalDataError: the text contains a NUL character.
        """
        if not self._limits.capture_enabled:
            return None
        return self.add_texts([user_text], Source.CAPTURE)

    def import_text_file(self, path: Path) -> AddReport:
        """Import a UTF-8 text file of at most ``max_file_bytes``, one text per paragraph.

        Raises:
            LocalDataError: the file cannot be read, is too large, is not UTF-8, or
                contains a NUL character; the message names the file and the limit or
                the byte offset.
        """
        limit = self._limits.max_file_bytes
        try:
            with path.open("rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise LocalDataError(f"file {path}: cannot read: {e.strerror}") from e
        if len(data) > limit:
            raise LocalDataError(f"file {path}: larger than the import limit of {limit} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LocalDataError(
                f"file {path}: not UTF-8 (invalid byte at offset {e.start})"
            ) from e
        _refuse_nul(text, f"file {path}")
        return self.add_texts([text], Source.IMPORT)

    def texts(self, split: Split, source: Source | None = None) -> list[str]:
        """Every stored text of ``split`` (and ``source``, if given), oldest first."""
        query = select(_texts.c.text).where(_texts.c.split == split.value)
        if source is not None:
            query = query.where(_texts.c.source == source.value)
        query = query.order_by(_texts.c.seq)
        with self._engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def stats(self) -> StoreStats:
        query = select(_texts.c.split, func.count(), func.coalesce(func.sum(_texts.c.n_bytes), 0))
        with self._engine.connect() as conn:
            rows = conn.execute(query.group_by(_texts.c.split)).all()
        counts = {str(split): (cast(int, count), cast(int, size)) for split, count, size in rows}
        train = counts.get(Split.TRAIN.value, (0, 0))
        heldout = counts.get(Split.HELDOUT.value, (0, 0))
        return StoreStats(
            rows=train[0] + heldout[0],
            bytes=train[1] + heldout[1],
            train=train[0],
            heldout=heldout[0],
        )

    def clear(self) -> int:
        """Delete every stored text; return how many there were."""
        with self._engine.begin() as conn:
            return conn.execute(delete(_texts)).rowcount

    def _insert(self, chunks: list[str], source: Source) -> AddReport:
        now = self._clock()
        stored = duplicates = 0
        with self._engine.begin() as conn:
            for chunk in chunks:
                identifier = text_id(chunk)
                known = conn.execute(
                    select(_texts.c.seq).where(_texts.c.text_id == identifier)
                ).first()
                if known is not None:
                    duplicates += 1
                    continue
                conn.execute(
                    insert(_texts).values(
                        text_id=identifier,
                        text=chunk,
                        source=source.value,
                        split=split_of(identifier, self._limits.heldout_fraction).value,
                        created_at_s=now,
                        n_bytes=len(chunk.encode("utf-8")),
                    )
                )
                stored += 1
            evicted = self._enforce_retention(conn, now)
        return AddReport(stored=stored, duplicates=duplicates, evicted=evicted)

    def _enforce_retention(self, conn: Connection, now: float) -> int:
        limits = self._limits
        evicted = conn.execute(
            delete(_texts).where(_texts.c.created_at_s < now - limits.max_age_s)
        ).rowcount
        totals = conn.execute(
            select(func.count(), func.coalesce(func.sum(_texts.c.n_bytes), 0))
        ).one()
        rows, size = int(totals[0]), cast(int, totals[1])
        if rows <= limits.max_rows and size <= limits.max_bytes:
            return evicted
        doomed: list[int] = []
        oldest_first = select(_texts.c.seq, _texts.c.n_bytes).order_by(_texts.c.seq)
        for seq, n_bytes in conn.execute(oldest_first):
            if rows <= limits.max_rows and size <= limits.max_bytes:
                break
            doomed.append(cast(int, seq))
            rows -= 1
            size -= cast(int, n_bytes)
        for first in range(0, len(doomed), 500):
            batch = doomed[first : first + 500]
            conn.execute(delete(_texts).where(_texts.c.seq.in_(batch)))
        return evicted + len(doomed)


def _refuse_nul(text: str, what: str) -> None:
    offset = text.find("\x00")
    if offset >= 0:
        raise LocalDataError(f"{what}: contains a NUL character at index {offset} (binary data?)")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()
