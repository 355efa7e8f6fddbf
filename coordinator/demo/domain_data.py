"""Domain texts for the demo, federated tests and benchmarks: real prose nanofleet did not write.

Everything comes from files already on the machine, so it works offline and needs nothing
new installed (versions are pinned in ``constraints.txt``, so the texts are stable):

- group ``alpha``: the docstrings of NumPy (array computing), read from its source files;
- group ``beta``: the docstrings of SQLAlchemy (databases, SQL, ORM), read the same way;
- general held-out: Python's language reference as the standard library ships it for
  ``help()`` (``pydoc_data.topics``), a text neither group trains on.

Sources are read with :mod:`ast` (nothing is imported or executed). One docstring is one
document, named ``relative/path.py:Qualified.name``; doctest paragraphs (``>>>``) are
dropped and documents shorter than :data:`MIN_DOCUMENT_CHARS` skipped.

Invariants:

- Deterministic: the same installed packages give the same documents, slices and order.
- A group's documents are dealt to ``devices`` slices by a hash of (group, document name):
  slices are disjoint and each looks like the whole domain (kiosks of one shop chain).
  Inside a slice, a second hash puts ``heldout_fraction`` of the documents in its held-out
  part. No document is in two slices or in both parts of one slice.
- ``max_chars`` caps a slice (train and held-out parts in proportion) by taking documents
  in hash order (skipping any that would overflow), so a small slice is still a sample of
  the whole domain.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Group = Literal["alpha", "beta"]

GROUPS: dict[Group, tuple[str, frozenset[str]]] = {
    # package, sub-directories left out (tests, build helpers, vendored code)
    "alpha": ("numpy", frozenset({"tests", "testing", "_pyinstaller", "f2py", "distutils"})),
    "beta": ("sqlalchemy", frozenset({"testing"})),
}

#: Documents shorter than this (after cleaning) are skipped: one-line docstrings teach little.
MIN_DOCUMENT_CHARS = 200


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class DeviceSlice:
    """One device's local data: documents to train on and documents to evaluate on."""

    group: Group
    index: int
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]

    def train_texts(self) -> list[str]:
        return [d.text for d in self.train]

    def heldout_texts(self) -> list[str]:
        return [d.text for d in self.heldout]


@functools.cache
def domain_documents(group: Group) -> tuple[Document, ...]:
    """Every document of ``group``, in source order (sorted paths, then position)."""
    package, skipped = GROUPS[group]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"package {package!r} for group {group!r} is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    documents: list[Document] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skipped & set(relative.parts):
            continue
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for name, docstring in _docstrings(tree, prefix=""):
            text = _clean(docstring)
            if len(text) >= MIN_DOCUMENT_CHARS:
                documents.append(Document(name=f"{package}/{relative}:{name}", text=text))
    return tuple(documents)


def device_slices(
    group: Group,
    devices: int = 3,
    *,
    heldout_fraction: float = 0.2,
    max_chars: int | None = None,
) -> list[DeviceSlice]:
    """Deal ``group``'s documents to ``devices`` disjoint slices with held-out parts.

    Raises:
        ValueError: ``devices`` < 1, or ``heldout_fraction`` outside (0, 1).
    """
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    dealt: list[list[tuple[int, Document]]] = [[] for _ in range(devices)]
    for doc in domain_documents(group):
        digest = _hash(f"{group}:{doc.name}")
        dealt[digest % devices].append((digest, doc))
    slices = []
    for index, docs in enumerate(dealt):
        docs.sort(key=lambda pair: pair[0])
        train: list[Document] = []
        heldout: list[Document] = []
        for _, doc in docs:
            is_heldout = _hash(f"heldout:{doc.name}") < heldout_fraction * 2**64
            (heldout if is_heldout else train).append(doc)
        if max_chars is not None:
            train = _cap(train, int(max_chars * (1 - heldout_fraction)))
            heldout = _cap(heldout, int(max_chars * heldout_fraction))
        slices.append(DeviceSlice(group, index, tuple(train), tuple(heldout)))
    return slices


@functools.cache
def general_heldout_texts() -> tuple[str, ...]:
    """The general held-out text: the language reference topics, by topic name."""
    from pydoc_data.topics import topics

    return tuple(topics[key].strip() for key in sorted(topics) if topics[key].strip())


def general_heldout(max_chars: int | None = None) -> list[str]:
    """The general held-out texts, at most ``max_chars`` characters in all (whole topics,
    cut inside the last one)."""
    texts = list(general_heldout_texts())
    if max_chars is None:
        return texts
    kept: list[str] = []
    left = max_chars
    for text in texts:
        if left <= 0:
            break
        kept.append(text[:left])
        left -= len(kept[-1])
    return kept


def _docstrings(node: ast.AST, prefix: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, ast.Module):
        docstring = ast.get_docstring(node)
        if docstring:
            found.append(("<module>", docstring))
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{child.name}"
            docstring = ast.get_docstring(child)
            if docstring:
                found.append((name, docstring))
            found.extend(_docstrings(child, prefix=f"{name}."))
    return found


def _clean(docstring: str) -> str:
    paragraphs = [p.strip() for p in docstring.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p and ">>>" not in p)


def _cap(documents: list[Document], max_chars: int) -> list[Document]:
    kept: list[Document] = []
    total = 0
    for doc in documents:
        if total + len(doc.text) > max_chars:
            continue
        kept.append(doc)
        total += len(doc.text)
    return kept


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
