"""Errors of the registry, refinements of :mod:`coordinator.errors` (refused input)."""

from __future__ import annotations

from coordinator.errors import RefusedError

__all__ = ["ConflictError", "NotFoundError", "SelectorError"]


class NotFoundError(RefusedError):
    """A device, release, rollout or round named by the caller does not exist."""


class ConflictError(RefusedError):
    """The request contradicts what is stored (e.g. a release version reused for other bytes)."""


class SelectorError(RefusedError):
    """A rollout's target selector is malformed or selects nothing; the message says why."""
