"""Pack a built model into a bundle directory, atomically, and find it again (cache).

A model directory holds ``model.onnx``, ``model.onnx.data``, ``tokenizer.json`` and a
``manifest.json`` (:class:`protocol.bundle.BundleManifest`, kind ``base``) listing the other
three files with size and SHA-256. The chat template lives in the manifest.

Invariants:

- :func:`build_model_dir` writes into a fresh sibling directory and renames it into place
  only when complete, so ``out_dir`` is either the old model, the new one, or absent;
  never half-written.
- The manifest ``version`` is ``BUILDER_VERSION + "+" + <first 16 hex of the GGUF's
  sha256>``; :func:`is_current` treats a directory as up to date only when that version
  matches and every file verifies, which makes a repeated build a no-op.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from coordinator.errors import BuildError
from coordinator.models.gguf_source import LlamaSource
from coordinator.models.graph import (
    DATA_FILE,
    DEFAULT_OPTIONS,
    MODEL_FILE,
    GraphOptions,
    build_graph,
)
from coordinator.models.tokenizer import build_tokenizer
from protocol.bundle import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    BundleFile,
    BundleKind,
    BundleManifest,
    ModelInfo,
    canonical_json,
)

#: Bump when the graph or the packing changes: cached builds of older versions are rebuilt.
BUILDER_VERSION = "4"
QUANTIZATION = "q4_1-exact"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_version(source_sha256: str) -> str:
    """The manifest version of a build of the GGUF whose hash is ``source_sha256``."""
    return f"{BUILDER_VERSION}+{source_sha256[:16]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_current(out_dir: Path, version: str) -> bool:
    """True when ``out_dir`` holds a verified build whose manifest version is ``version``."""
    try:
        manifest = BundleManifest.model_validate_json((out_dir / MANIFEST_NAME).read_bytes())
    except (OSError, ValidationError):
        return False
    if manifest.version != version or manifest.kind is not BundleKind.BASE:
        return False
    for f in manifest.files:
        path = out_dir / f.path
        try:
            if path.is_symlink() or path.stat().st_size != f.size:
                return False
        except OSError:
            return False
        if sha256_file(path) != f.sha256:
            return False
    return True


def _write_dir(
    src: LlamaSource,
    tmp: Path,
    *,
    name: str,
    version: str,
    options: GraphOptions,
    progress: Callable[[int, int], None] | None,
) -> BundleManifest:
    build_graph(src, tmp, options, progress)
    build_tokenizer(src.tokenizer).save(str(tmp / TOKENIZER_NAME))
    files = [
        BundleFile(path=p, sha256=sha256_file(tmp / p), size=(tmp / p).stat().st_size)
        for p in (MODEL_FILE, DATA_FILE, TOKENIZER_NAME)
    ]
    cfg = src.config
    try:
        manifest = BundleManifest(
            name=name,
            version=version,
            kind=BundleKind.BASE,
            files=files,
            model=ModelInfo(
                architecture="llama",
                quantization=QUANTIZATION,
                context_length=cfg.context_length,
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size,
                num_layers=cfg.num_layers,
                tokenizer_sha256=files[2].sha256,
                chat_template=src.chat_template,
                bos_token_id=src.tokenizer.bos_token_id,
                eos_token_ids=[src.tokenizer.eos_token_id],
                max_adapter_rank=options.adapter_rank,
            ),
        )
    except ValidationError as e:
        raise BuildError(f"the model does not fit a bundle manifest: {e}") from e
    with open(tmp / MANIFEST_NAME, "wb") as f:
        f.write(canonical_json(manifest))
        f.flush()
        os.fsync(f.fileno())
    return manifest


def build_model_dir(
    src: LlamaSource,
    out_dir: Path,
    *,
    name: str,
    version: str,
    options: GraphOptions = DEFAULT_OPTIONS,
    progress: Callable[[int, int], None] | None = None,
) -> BundleManifest:
    """Build ``src`` into the bundle directory ``out_dir`` (replacing what is there).

    Raises:
        BuildError: the model does not fit a bundle manifest, or ``out_dir`` cannot be
            written; the message names the problem.
    """
    out_dir = out_dir.absolute()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    except OSError as e:
        raise BuildError(f"cannot create a build directory beside {out_dir}: {e}") from e
    old: Path | None = None
    try:
        manifest = _write_dir(
            src, tmp, name=name, version=version, options=options, progress=progress
        )
        os.chmod(tmp, 0o755)  # noqa: S103 - a model is public; mkdtemp made it 0700
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "model")
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except OSError as e:
        raise BuildError(f"cannot write the model directory {out_dir}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return manifest
