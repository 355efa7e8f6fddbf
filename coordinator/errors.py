"""Errors of the coordinator and the operator tools, named for who is at fault.

- :class:`RefusedError`: the operator's or a device's input is wrong (unknown device, bad
  selector, a file that is not what it claims). Shown as a clear message, never retried.
- :class:`BuildError`: a model could not be built from its source (corrupt or truncated
  GGUF, unsupported architecture).
- :class:`TransientError`: the network, broker or database is temporarily unavailable.
- :class:`ConfigError`: the configuration is invalid; the message names the key.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error the coordinator raises on purpose."""


class RefusedError(CoordinatorError):
    """The input was refused; retrying the same input cannot succeed."""


class BuildError(RefusedError):
    """A model or bundle could not be built from the given source."""


class SigningKeyError(RefusedError):
    """A signing key is missing, locked (no or a wrong passphrase) or too few for a threshold."""


class TransientError(CoordinatorError):
    """A temporary failure; the caller may retry later."""


class ConfigError(CoordinatorError):
    """The configuration is invalid; the message names the key."""
