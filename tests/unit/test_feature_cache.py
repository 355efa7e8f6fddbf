"""The device's cache of hidden states between the messages of a round: hits only on the
same model, settings and texts; one entry per kind; expiry; damage is a miss; and a cached
round trains exactly as an uncached one without running the model over the texts again."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.federated.cache import FeatureCache, cache_key
from agent.federated.datastore import LocalTextStore, Source
from agent.federated.local import (
    AnchorConfig,
    FeatureConfig,
    LocalModel,
    evaluate_round,
    train_round,
)
from agent.federated.trainer import TrainConfig, init_adapter
from coordinator.demo.domain_data import device_slices

Array = np.ndarray[Any, Any]


def _entry(rows: int, seed: int = 0) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {
        "h": rng.normal(size=(rows, 8)).astype(np.float32),
        "y": rng.integers(0, 50, size=rows),
    }


class _Counter:
    def __init__(self, arrays: dict[str, Array]) -> None:
        self.arrays = arrays
        self.calls = 0

    def __call__(self) -> dict[str, Array]:
        self.calls += 1
        return self.arrays


def test_a_second_message_reads_what_the_first_computed(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    compute = _Counter(_entry(5))
    first = cache.get_or_compute("train", cache_key("model", "texts"), compute)
    again = FeatureCache(tmp_path / "cache").get_or_compute(
        "train", cache_key("model", "texts"), compute
    )
    assert compute.calls == 1
    for name in ("h", "y"):
        np.testing.assert_array_equal(first[name], again[name])


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("model-a", "w=64", ["x"]), ("model-b", "w=64", ["x"])),  # another model
        (("m", "w=64", ["x"]), ("m", "w=128", ["x"])),  # other settings
        (("m", "w", ["ab", "c"]), ("m", "w", ["a", "bc"])),  # texts cut elsewhere
        (("m", "w", ["a"]), ("m", "w", ["a", ""])),  # one more (empty) text
        (("m", "w", ["a"]), ("m", "w", ["b"])),  # one changed text
    ],
)
def test_any_change_of_what_an_entry_derives_from_is_another_key(
    one: tuple[Any, ...], other: tuple[Any, ...]
) -> None:
    assert cache_key(*one) != cache_key(*other)
    assert cache_key(*one) == cache_key(*one)


def test_one_entry_per_kind_and_files_only_the_owner_reads(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    cache.store("train", cache_key("old"), _entry(3))
    cache.store("heldout", cache_key("h"), _entry(3))
    cache.store("train", cache_key("new"), _entry(4))
    names = sorted(p.name.split("-")[0] for p in cache.root.iterdir())
    assert names == ["heldout", "train"]
    assert cache.load("train", cache_key("old")) is None
    loaded = cache.load("train", cache_key("new"))
    assert loaded is not None
    assert loaded["h"].shape == (4, 8)
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o700
    for entry in cache.root.iterdir():
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600


def test_entries_older_than_the_ttl_are_deleted(tmp_path: Path) -> None:
    now = [1_000_000.0]
    cache = FeatureCache(tmp_path / "cache", ttl_s=60.0, clock=lambda: now[0])
    key = cache_key("k")
    cache.store("anchor", key, {"h": np.ones((2, 8), np.float32)})
    (entry,) = cache.root.iterdir()
    import os

    os.utime(entry, (now[0] - 30, now[0] - 30))
    assert cache.load("anchor", key) is not None
    os.utime(entry, (now[0] - 61, now[0] - 61))
    assert cache.load("anchor", key) is None
    assert not entry.exists()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b"not an archive"), id="garbage"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:100]), id="truncated"),
        pytest.param(lambda p: np.savez(p, h=np.ones((3, 8), np.float64)), id="wrong-dtype"),
        pytest.param(
            lambda p: np.savez(p, h=np.ones((3, 8), np.float32), y=np.ones(2, np.int64)),
            id="rows-disagree",
        ),
    ],
)
def test_a_damaged_entry_is_computed_again_not_an_error(tmp_path: Path, damage: Any) -> None:
    cache = FeatureCache(tmp_path / "cache")
    key = cache_key("k")
    cache.store("train", key, _entry(3))
    (entry,) = cache.root.iterdir()
    with open(entry, "r+b") as f:  # keep the name: np.savez on a path would add ".npz"
        f.truncate(0)
    damage(entry)
    compute = _Counter(_entry(3, seed=1))
    got = cache.get_or_compute("train", key, compute)
    assert compute.calls == 1
    np.testing.assert_array_equal(got["h"], compute.arrays["h"])


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = FeatureCache(blocker / "cache")  # a directory under a file: mkdir fails
    compute = _Counter(_entry(3))
    cache.get_or_compute("train", cache_key("k"), compute)
    cache.get_or_compute("train", cache_key("k"), compute)
    assert compute.calls == 2


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("device") / "texts.sqlite3"
    piece = device_slices("beta", devices=3, max_chars=4000)[1]
    texts = LocalTextStore.open(path)
    texts.add_texts(piece.train_texts() + piece.heldout_texts(), Source.IMPORT)
    texts.close()
    return path


def test_a_cached_round_trains_and_evaluates_as_an_uncached_one_without_the_model(
    tiny_model_dir: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = LocalModel(tiny_model_dir)
    start = init_adapter(model.engine.hidden_size, model.engine.vocab_size, 4, seed=2)
    features = FeatureConfig(window=64, max_rows=1500)
    config = TrainConfig(epochs=1, batch_rows=64, learning_rate=0.03, anchor_weight=1.0, seed=4)
    anchor = AnchorConfig(samples=2, tokens=10, seed=1)
    cache = FeatureCache.beside(store)
    assert cache.root == store.parent / "texts.sqlite3.cache"
    uncached = train_round(model, store, start, config, features, anchor=anchor)
    first = train_round(model, store, start, config, features, anchor=anchor, cache=cache)
    assert sorted(p.name.split("-")[0] for p in cache.root.iterdir()) == ["anchor", "train"]
    base_eval = evaluate_round(model, store, first.adapter, features, cache=cache)

    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("the model ran over texts the cache holds")

    monkeypatch.setattr(LocalModel, "features", no_model)
    monkeypatch.setattr(LocalModel, "anchor", no_model)
    second = train_round(model, store, start, config, features, anchor=anchor, cache=cache)
    for report in (first, second):
        np.testing.assert_array_equal(report.adapter.a, uncached.adapter.a)
        np.testing.assert_array_equal(report.adapter.b, uncached.adapter.b)
    nll, n, metrics = evaluate_round(model, store, first.adapter, features, cache=cache)
    assert (nll, n) == base_eval[:2]
    for name in ("perplexity", "base_perplexity"):
        assert metrics[name] == base_eval[2][name]
    # Another setting is another entry: the model must run again.
    with pytest.raises(AssertionError, match="cache holds"):
        train_round(
            model, store, start, config, FeatureConfig(window=32, max_rows=1500), cache=cache
        )
