"""Errors of the agent, named for who is at fault.

- :class:`RefusedError` and its subclasses: the input is wrong (a bad request, a bad bundle,
  an update that fails verification). Never retried; reported to whoever sent it.
- :class:`TransientError`: the world is temporarily wrong (network, broker, disk busy).
  Retried with jittered backoff.
- :class:`ConfigError`: the operator's configuration is wrong; the daemon exits with
  :attr:`protocol.exitcodes.ExitCode.CONFIG`.

Boundaries translate foreign exceptions into these with ``raise ... from e``.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class RefusedError(AgentError):
    """The input was refused; retrying the same input cannot succeed."""


class ModelError(RefusedError):
    """A model directory or bundle is missing, incomplete, altered or malformed."""


class ContextLengthError(RefusedError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class UpdateRefusedError(RefusedError):
    """An update failed verification (signatures, versions, hashes, bindings)."""


class TransientError(AgentError):
    """A temporary failure; the caller may retry later."""


class ConfigError(AgentError):
    """The configuration is invalid; the message names the key."""


class RequestError(RefusedError):
    """A client's request to the inference API is invalid.

    ``param`` names the offending field (``messages[2].role``) or is None when the request
    as a whole is at fault (malformed JSON, oversize body).
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class OverloadedError(TransientError):
    """The inference queue is full; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(TransientError):
    """A request did not finish within its deadline (queued or generating)."""


class TrainingInputError(RefusedError):
    """Arrays handed to the on-device trainer do not fit together (shape, dtype, ids)."""


class LocalDataError(RefusedError):
    """Text offered to the local training store was refused (size, encoding, limits)."""
