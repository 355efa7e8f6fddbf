"""The local training-text store's limits and its capture switch: settings only (pure
pydantic), so the agent's configuration names them without loading the store's engine."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["StoreLimits"]


class StoreLimits(BaseModel):
    """Retention, size limits and the capture switch of the local store."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Capture the user's side of chat turns. Off unless the operator turns it on.
    capture_enabled: bool = False
    max_rows: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    #: Texts older than this are deleted on the next insert (default 90 days).
    max_age_s: Annotated[float, Field(gt=0, le=10 * 365 * 86_400)] = 90 * 86_400.0
    #: Total UTF-8 bytes of stored text.
    max_bytes: Annotated[int, Field(ge=1024, le=1 << 34)] = 64 << 20
    #: One stored text (a paragraph, or a piece of a longer one).
    max_text_bytes: Annotated[int, Field(ge=64, le=1 << 20)] = 4096
    #: A file offered to :meth:`LocalTextStore.import_text_file`.
    max_file_bytes: Annotated[int, Field(ge=1, le=1 << 30)] = 8 << 20
    #: Share of texts (by id hash) kept out of training for evaluation.
    heldout_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1

    @model_validator(mode="after")
    def _text_fits_store(self) -> Self:
        if self.max_text_bytes > self.max_bytes:
            raise ValueError(
                f"max_text_bytes ({self.max_text_bytes}) exceeds max_bytes ({self.max_bytes})"
            )
        return self
