"""The active model: a reference that an update swaps atomically.

Invariants:

- :meth:`ModelHolder.current` always returns a whole engine, never a half-activated one.
- Each request captures the engine once, at admission, and finishes on it; :meth:`swap`
  never disturbs requests already running on the old engine. Whoever swaps decides when the
  old engine may be dropped (after its in-flight requests end).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from protocol.bundle import BundleManifest


class GenerationLike(Protocol):
    """What :meth:`EngineLike.generate` returns: iterate for text deltas, then read counts."""

    prompt_tokens: int
    completion_tokens: int

    def __iter__(self) -> Iterator[str]: ...


class EngineLike(Protocol):
    """The part of :class:`agent.runtime.Engine` the server uses."""

    manifest: BundleManifest
    bundle_hash: str
    context_length: int

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str: ...

    def encode(self, text: str) -> list[int]: ...


E = TypeVar("E", bound=EngineLike)


class ModelHolder(Generic[E]):
    """Holds the engine that new requests use."""

    def __init__(self, engine: E, *, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        #: Unix time at which the current engine became active.
        self.activated_at = clock()

    def current(self) -> E:
        """The engine a request admitted now must use (capture it once)."""
        with self._lock:
            return self._engine

    def swap(self, engine: E) -> E:
        """Make ``engine`` the active one and return the previous engine."""
        with self._lock:
            old, self._engine = self._engine, engine
            self.activated_at = self._clock()
            return old
