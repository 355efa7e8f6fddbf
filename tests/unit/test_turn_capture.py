"""What the opt-in capture takes from a chat turn, and that it writes off the caller's
thread, applies the store's switch and survives a store it cannot open."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.federated.capture import TurnCapture, user_text
from agent.federated.datastore import LocalTextStore, Source
from agent.federated.store_limits import StoreLimits
from protocol.inference import ChatMessage

ON = StoreLimits(capture_enabled=True, heldout_fraction=0.0)


def _messages(*pairs: tuple[str, object]) -> list[ChatMessage]:
    return [ChatMessage.model_validate({"role": r, "content": c}) for r, c in pairs]


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ((("user", "  hello there \n"),), "hello there"),
        ((("system", "be brief"), ("user", "first"), ("assistant", "ok"), ("user", "second")),
         "second"),
        ((("user", [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]),),
         "parts joined"),
        ((("user", "asked"), ("assistant", "an answer")), "asked"),
        ((("system", "only a system prompt"),), None),
        ((("user", "   \n"),), None),
    ],
    ids=["stripped", "last-user", "parts", "reply-not-taken", "no-user", "blank"],
)  # fmt: skip
def test_user_text_is_the_last_user_message(
    pairs: tuple[tuple[str, object], ...], expected: str | None
) -> None:
    assert user_text(_messages(*pairs)) == expected


def _stored(path: Path) -> list[tuple[str, str]]:
    """(text, source) of every stored row."""
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT text, source FROM texts ORDER BY seq"))


def test_capture_writes_the_turn_in_its_own_thread(tmp_path: Path) -> None:
    path = tmp_path / "texts.sqlite3"
    capture = TurnCapture(path, ON)
    writers: list[str] = []
    original = LocalTextStore.capture_turn

    def spy(self: LocalTextStore, text: str) -> object:
        writers.append(threading.current_thread().name)
        return original(self, text)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalTextStore, "capture_turn", spy)
        capture(_messages(("user", "where are the hoses?")))
        capture(_messages(("system", "nothing to take")))
        capture.close()
    assert _stored(path) == [("where are the hoses?", Source.CAPTURE.value)]
    assert writers
    assert all(w.startswith("turn-capture") for w in writers)


def test_the_store_switch_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "texts.sqlite3"
    capture = TurnCapture(path, StoreLimits())  # capture_enabled defaults to off
    capture(_messages(("user", "where are the hoses?")))
    capture.close()
    assert _stored(path) == []


def test_a_store_that_cannot_open_loses_the_turn_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    capture = TurnCapture(blocker / "texts.sqlite3", ON)
    with caplog.at_level(logging.WARNING, logger="agent.federated.capture"):
        capture(_messages(("user", "a secret question")))
        capture.close()
    assert [r.getMessage() for r in caplog.records] == ["chat turn not captured: LocalDataError"]
    assert "a secret question" not in caplog.text
