"""What the server serves: an engine plus the adapter every generation applies.

An adapter-only release changes what a device answers without reloading the base model;
the server treats the pair as one model (``ModelHolder`` swaps it whole).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.errors import ModelError
from agent.runtime.adapter import ADAPTER_FILE, Adapter
from agent.runtime.engine import Engine, Generation
from agent.runtime.sampling import SamplingParams
from protocol.bundle import BundleManifest

#: The prompt whose logits must be finite before a model may serve.
FINITE_PROBE = "Hello"


class ServedModel:
    """An :class:`Engine` with a default adapter (None: the bare base model)."""

    def __init__(
        self, engine: Engine, adapter: Adapter | None = None, adapter_dir: Path | None = None
    ) -> None:
        self.engine = engine
        self.adapter = adapter
        self.adapter_dir = adapter_dir
        self.manifest: BundleManifest = engine.manifest
        self.bundle_hash: str = engine.bundle_hash
        self.context_length: int = engine.context_length

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        return self.engine.render_chat(messages)

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        adapter: Adapter | None = None,
    ) -> Generation:
        """As :meth:`Engine.generate`, with this model's adapter unless one is given."""
        return self.engine.generate(
            prompt_ids, params, cancel=cancel, adapter=adapter or self.adapter
        )


def load_served(
    base_dir: Path, adapter_dir: Path | None, *, threads: int | None, verify: bool = True
) -> ServedModel:
    """Load a base model directory and, if given, the adapter bundle beside it; check that
    the pair gives finite logits.

    Raises:
        ModelError: a file is missing or altered, the adapter does not fit the model, or
            the logits are not finite; the message names which.
    """
    engine = Engine.load(base_dir, threads=threads, verify=verify)
    adapter = engine.load_adapter(adapter_dir / ADAPTER_FILE) if adapter_dir else None
    served = ServedModel(engine, adapter, adapter_dir)
    logits = engine.forward(engine.encode(FINITE_PROBE), adapter=adapter).logits
    if not np.isfinite(logits).all():
        raise ModelError(f"{base_dir}: the model's logits are not finite (NaN or infinity)")
    return served
