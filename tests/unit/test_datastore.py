"""The local training-text store: splits, retention, capture switch, imports."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.errors import LocalDataError
from agent.federated.datastore import (
    DB_FILE,
    LocalTextStore,
    Source,
    Split,
    StoreLimits,
    split_of,
    split_paragraphs,
    text_id,
)


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


def _open(tmp_path: Path, clock: _Clock, **limits: object) -> LocalTextStore:
    return LocalTextStore.open(
        tmp_path / "state" / DB_FILE, StoreLimits(heldout_fraction=0.0, **limits), clock=clock
    )


@pytest.fixture
def store(tmp_path: Path, clock: _Clock) -> Iterator[LocalTextStore]:
    opened = _open(tmp_path, clock)
    yield opened
    opened.close()


def test_store_file_is_private_and_survives_reopening(tmp_path: Path, clock: _Clock) -> None:
    first = _open(tmp_path, clock)
    first.add_texts(["kept across restarts"], Source.IMPORT)
    first.close()
    path = tmp_path / "state" / DB_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = _open(tmp_path, clock)
    assert again.texts(Split.TRAIN) == ["kept across restarts"]
    again.close()


def test_texts_are_cut_into_paragraphs_and_stored_once(store: LocalTextStore) -> None:
    report = store.add_texts(["First para.\n\n  Second\npara.  \n \n\nFirst para."], Source.IMPORT)
    assert (report.stored, report.duplicates, report.evicted) == (2, 1, 0)
    again = store.add_texts(["Second\npara."], Source.IMPORT)
    assert (again.stored, again.duplicates) == (0, 1)
    assert store.texts(Split.TRAIN) == ["First para.", "Second\npara."]
    stats = store.stats()
    assert (stats.rows, stats.bytes, stats.train, stats.heldout) == (2, 23, 2, 0)


def test_split_is_a_pure_function_of_the_text(tmp_path: Path, clock: _Clock) -> None:
    texts = [f"paragraph number {i}" for i in range(400)]
    stores = [
        LocalTextStore.open(tmp_path / name, StoreLimits(heldout_fraction=0.25), clock=clock)
        for name in ("a.db", "b.db")
    ]
    stores[0].add_texts(texts, Source.IMPORT)
    stores[1].add_texts(reversed(texts), Source.IMPORT)
    held = [set(s.texts(Split.HELDOUT)) for s in stores]
    assert held[0] == held[1]
    assert 70 <= len(held[0]) <= 130  # about a quarter
    assert held[0] == {t for t in texts if split_of(text_id(t), 0.25) is Split.HELDOUT}
    assert set(stores[0].texts(Split.TRAIN)) == set(texts) - held[0]
    for s in stores:
        s.close()
    assert all(split_of(text_id(t), 0.0) is Split.TRAIN for t in texts)


def test_oldest_rows_go_beyond_max_rows(tmp_path: Path, clock: _Clock) -> None:
    store = _open(tmp_path, clock, max_rows=3)
    store.add_texts(["one", "two"], Source.IMPORT)
    report = store.add_texts(["three", "four", "five"], Source.IMPORT)
    assert (report.stored, report.evicted) == (3, 2)
    assert store.texts(Split.TRAIN) == ["three", "four", "five"]
    store.close()


def test_rows_older_than_max_age_go_on_the_next_insert(tmp_path: Path, clock: _Clock) -> None:
    store = _open(tmp_path, clock, max_age_s=3600)
    store.add_texts(["old"], Source.IMPORT)
    clock.now += 1800
    store.add_texts(["middle"], Source.IMPORT)
    clock.now += 1801
    report = store.add_texts(["new"], Source.IMPORT)
    assert report.evicted == 1
    assert store.texts(Split.TRAIN) == ["middle", "new"]
    store.close()


def test_oldest_rows_go_beyond_max_bytes(tmp_path: Path, clock: _Clock) -> None:
    store = _open(tmp_path, clock, max_bytes=1024, max_text_bytes=400)
    store.add_texts(["a" * 400, "b" * 400], Source.IMPORT)
    report = store.add_texts(["c" * 300], Source.IMPORT)
    assert report.evicted == 1
    assert [t[0] for t in store.texts(Split.TRAIN)] == ["b", "c"]
    assert store.stats().bytes == 700
    store.close()


def test_capture_is_off_by_default(store: LocalTextStore) -> None:
    assert store.limits.capture_enabled is False
    assert store.capture_turn("what are the opening hours?") is None
    assert store.stats().rows == 0


def test_capture_when_enabled_keeps_the_users_words(tmp_path: Path, clock: _Clock) -> None:
    store = _open(tmp_path, clock, capture_enabled=True)
    store.add_texts(["imported text"], Source.IMPORT)
    report = store.capture_turn("what are the opening hours?")
    assert report is not None
    assert report.stored == 1
    assert store.texts(Split.TRAIN, Source.CAPTURE) == ["what are the opening hours?"]
    assert store.texts(Split.TRAIN, Source.IMPORT) == ["imported text"]
    store.close()


def test_import_reads_paragraphs_of_a_utf8_file(store: LocalTextStore, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("Crème brûlée.\n\nÜber 9000 items.\n", encoding="utf-8")
    report = store.import_text_file(path)
    assert report.stored == 2
    assert store.texts(Split.TRAIN, Source.IMPORT) == ["Crème brûlée.", "Über 9000 items."]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"x" * 101, "larger than the import limit of 100 bytes"),
        (b"valid start \xff\xfe then junk", "not UTF-8 (invalid byte at offset 12)"),
        (b"text\x00with a NUL", "contains a NUL character at index 4"),
    ],
)
def test_bad_files_are_refused_with_the_reason(
    tmp_path: Path, clock: _Clock, content: bytes, message: str
) -> None:
    store = _open(tmp_path, clock, max_file_bytes=100)
    path = tmp_path / "in.txt"
    path.write_bytes(content)
    with pytest.raises(LocalDataError) as caught:
        store.import_text_file(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert store.stats().rows == 0
    store.close()


def test_missing_file_is_refused(store: LocalTextStore, tmp_path: Path) -> None:
    with pytest.raises(LocalDataError, match="cannot read"):
        store.import_text_file(tmp_path / "absent.txt")


def test_long_paragraphs_are_cut_at_whitespace_within_the_byte_limit() -> None:
    words = [f"wörd{i}" for i in range(200)]
    paragraph = " ".join(words)
    pieces = split_paragraphs(paragraph + "\n\n" + "z" * 150, max_bytes=64)
    assert all(len(p.encode("utf-8")) <= 64 for p in pieces)
    assert " ".join(pieces[:-3]).split() == words
    assert pieces[-3:] == ["z" * 64, "z" * 64, "z" * 22]
    assert split_paragraphs("é" * 40, max_bytes=64) == ["é" * 32, "é" * 8]


def test_clear_deletes_everything(store: LocalTextStore) -> None:
    store.add_texts(["a", "b"], Source.IMPORT)
    assert store.clear() == 2
    assert store.stats().rows == 0


def test_limits_name_the_field_and_the_bound() -> None:
    with pytest.raises(
        ValidationError, match=r"max_text_bytes \(5000\) exceeds max_bytes \(4096\)"
    ):
        StoreLimits(max_bytes=4096, max_text_bytes=5000)
    with pytest.raises(ValidationError, match=r"heldout_fraction\n.*less than or equal to 0.5"):
        StoreLimits(heldout_fraction=0.9)
