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

from typing import ClassVar


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class RefusedError(AgentError):
    """The input was refused; retrying the same input cannot succeed."""


class ModelError(RefusedError):
    """A model directory or bundle is missing, incomplete, altered or malformed."""


class ContextLengthError(RefusedError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class UpdateRefusedError(RefusedError):
    """An update failed verification (signatures, versions, hashes, bindings).

    ``code`` is the stable reason an update progress message reports (``error_code``); each
    subclass below has its own. The same input is never retried.
    """

    code: ClassVar[str] = "update_refused"


class MetadataSignatureError(UpdateRefusedError):
    """TUF metadata is unsigned, wrongly signed or signed below its role's threshold."""

    code = "unsigned_metadata"


class MetadataRollbackError(UpdateRefusedError):
    """TUF metadata has a lower version than the one already trusted."""

    code = "metadata_rollback"


class MetadataExpiredError(UpdateRefusedError):
    """TUF metadata has expired (a freeze attack, or a repository nobody re-signs)."""

    code = "metadata_expired"


class MetadataMismatchError(UpdateRefusedError):
    """TUF metadata differs from the length, hash or version its parent role declared."""

    code = "metadata_mismatch"


class MetadataInvalidError(UpdateRefusedError):
    """TUF metadata is malformed or inconsistent in another way."""

    code = "metadata_invalid"


class OversizeError(UpdateRefusedError):
    """A metadata or target file is longer than declared or allowed (endless data)."""

    code = "oversize"


class TargetHashMismatchError(UpdateRefusedError):
    """A downloaded file's bytes do not match the length and hash its signed target names."""

    code = "hash_mismatch"


class TargetNotSignedError(UpdateRefusedError):
    """A file a release needs is not listed by any role trusted to list it."""

    code = "target_not_signed"


class ManifestMismatchError(UpdateRefusedError):
    """A bundle's signed manifest disagrees with its targets, its file or its pointer."""

    code = "manifest_mismatch"


class BundleInvalidError(UpdateRefusedError):
    """Signed release data (a manifest, a pointer) does not pass the protocol's validation."""

    code = "bundle_invalid"


class UnsafePathError(UpdateRefusedError):
    """A path in the store or a slot is a link or leaves its directory; it is never followed."""

    code = "unsafe_path"


class ReleaseCounterError(UpdateRefusedError):
    """A base bundle's release counter is below the counter this device has committed."""

    code = "release_counter_rollback"


class AdapterMismatchError(UpdateRefusedError):
    """An adapter does not fit the base it would run on (base hash, tokenizer or rank)."""

    code = "adapter_mismatch"


class ActivationFailedError(UpdateRefusedError):
    """A staged release could not be loaded into the running server."""

    code = "activation_failed"


class HealthCheckFailedError(UpdateRefusedError):
    """A newly activated release failed the health gate; the device rolls back."""

    code = "health_check_failed"


class TransientError(AgentError):
    """A temporary failure; the caller may retry later."""


class UpdateTransientError(TransientError):
    """An update step failed for a reason that may pass (network, mirror lag, disk).

    ``code`` is what the progress message reports once retries are exhausted.
    """

    code: ClassVar[str] = "update_transient"


class DownloadFailedError(UpdateTransientError):
    """A download failed: connection refused or cut beyond resume, an HTTP error status."""

    code = "download_failed"


class SlowDownloadError(UpdateTransientError):
    """A download stayed below the minimum average rate or passed its deadline."""

    code = "slow_retrieval"


class AnnouncementUnconfirmedError(UpdateTransientError):
    """An announcement names a newer repository state than the repository serves."""

    code = "announcement_unconfirmed"


class UpdateStorageError(UpdateTransientError):
    """The device's update storage could not be read or written (disk full, I/O error)."""

    code = "storage"


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
