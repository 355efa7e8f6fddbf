"""Read and verify a base model directory against its ``manifest.json``.

A directory passes :func:`read_model_dir` when its manifest parses as a base
:class:`protocol.bundle.BundleManifest` that lists the files the runtime loads, and (with
``verify``) every listed file is a regular file whose size and SHA-256 match. Hashing reads
each file once, in chunks. Every failure is a :class:`agent.errors.ModelError` whose message
names the directory and the file.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from pydantic import ValidationError

from agent.errors import ModelError
from protocol.bundle import MANIFEST_NAME, TOKENIZER_NAME, BundleKind, BundleManifest

MODEL_FILE = "model.onnx"
MAX_MANIFEST_BYTES = 1024 * 1024
_CHUNK = 1 << 20


def _read_manifest(model_dir: Path) -> BundleManifest:
    path = model_dir / MANIFEST_NAME
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as e:
        raise ModelError(f"{model_dir}: {MANIFEST_NAME} is missing (not a model directory)") from e
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = BundleManifest.model_validate_json(raw)
    except ValidationError as e:
        raise ModelError(f"{path}: invalid manifest: {e}") from e
    if manifest.kind is not BundleKind.BASE or manifest.model is None:
        raise ModelError(f"{path}: kind is {manifest.kind.value!r}, a base model is needed")
    listed = {f.path for f in manifest.files}
    for needed in (MODEL_FILE, TOKENIZER_NAME):
        if needed not in listed:
            raise ModelError(f"{path}: files does not list {needed}")
    return manifest


def _verify_file(model_dir: Path, rel: str, size: int, sha256: str) -> None:
    path = model_dir / rel
    try:
        st = path.lstat()
    except FileNotFoundError as e:
        raise ModelError(f"{model_dir}: file {rel} is missing") from e
    except OSError as e:
        raise ModelError(f"{model_dir}: file {rel}: cannot read ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{model_dir}: {rel} is not a regular file (symlinks are refused)")
    if st.st_size != size:
        raise ModelError(
            f"{model_dir}: file {rel} has {st.st_size} bytes, the manifest says {size} (altered?)"
        )
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise ModelError(f"{model_dir}: file {rel}: cannot read ({e.strerror})") from e
    if digest.hexdigest() != sha256:
        raise ModelError(f"{model_dir}: file {rel} does not match its sha256 in the manifest")


def read_model_dir(model_dir: Path, *, verify: bool = True) -> BundleManifest:
    """Return the manifest of ``model_dir`` after checking it (and, with ``verify``, every file).

    Raises:
        ModelError: a missing or invalid manifest, a missing, resized or altered file.
    """
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a directory")
    manifest = _read_manifest(model_dir)
    for f in manifest.files:
        if verify:
            _verify_file(model_dir, f.path, f.size, f.sha256)
        elif not (model_dir / f.path).is_file():
            raise ModelError(f"{model_dir}: file {f.path} is missing")
    return manifest
