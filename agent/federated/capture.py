"""Opt-in capture of chat turns into the local training-text store, off the serving path.

When ``[federated.store] capture_enabled`` is set, the agent hands the user's side of
each chat turn it answered to :class:`TurnCapture`, which writes it to the store in its
own worker thread, so a request never waits for SQLite; a failed write is logged (without
the text) and dropped. The store keeps the text on the device: the only reader is the
on-device trainer (:mod:`agent.federated.datastore`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.federated.datastore import LocalTextStore
from agent.federated.store_limits import StoreLimits
from protocol.inference import ChatMessage

__all__ = ["TurnCapture", "user_text"]

log = logging.getLogger(__name__)


def user_text(messages: list[ChatMessage]) -> str | None:
    """What the user wrote in this turn: the last ``user`` message's text, if not blank."""
    for message in reversed(messages):
        if message.role == "user":
            text = message.text.strip()
            return text or None
    return None


class TurnCapture:
    """Writes captured turns to the store at ``data_path`` in one worker thread."""

    def __init__(self, data_path: Path, limits: StoreLimits) -> None:
        self._data_path = data_path
        self._limits = limits
        self._store: LocalTextStore | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turn-capture")

    def __call__(self, messages: list[ChatMessage]) -> None:
        """Queue the turn's user text for the store; returns at once."""
        text = user_text(messages)
        if text is not None:
            self._pool.submit(self._write, text)

    def _write(self, text: str) -> None:
        try:
            if self._store is None:
                self._store = LocalTextStore.open(self._data_path, self._limits)
            self._store.capture_turn(text)
        except Exception as e:  # a turn not captured must not disturb serving
            log.warning(
                "chat turn not captured: %s",
                type(e).__name__,
                extra={"event": "capture_failed", "store": str(self._data_path)},
            )

    def close(self) -> None:
        """Finish the queued writes and close the store."""
        self._pool.shutdown(wait=True)
        if self._store is not None:
            self._store.close()
            self._store = None
