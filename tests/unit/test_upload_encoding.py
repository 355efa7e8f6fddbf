"""A device's SecAgg+ upload in the narrowest unsigned dtype the run's modulus divides: the
server's sum (Flower's own arithmetic) is the same as with Flower's int64 arrays, and the
coordinator picks a modulus whose masked sum never wraps."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from pydantic import ValidationError

from agent.errors import TrainingInputError
from agent.federated.client_app import _narrow_secaggplus_upload
from agent.federated.upload import clip_update, narrow_dtype, narrow_masked
from coordinator.federation.rounds import (
    SECAGG_CLIPPING_RANGE,
    RunSpec,
    plan_manifest,
    run_personalization,
    secaggplus_ranges,
)
from coordinator.federation.superlink import RunFailedError
from protocol.bundle import BundleManifest
from protocol.rounds import RoundManifest, SecAggPlus

Array = np.ndarray[Any, Any]
SHAPES = [(576, 8), (8, 1000)]


@pytest.mark.parametrize(
    ("mod_range", "dtype"),
    [(1 << 8, np.uint16), (1 << 16, np.uint16), (1 << 17, np.uint32), (1 << 32, np.uint32)],
)
def test_the_encoding_round_trips_in_the_narrowest_dtype(mod_range: int, dtype: type) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, mod_range, size=s, dtype=np.int64) for s in [(1,), *SHAPES]]
    arrays[1][0, 0] = mod_range - 1
    arrays[1][0, 1] = 0
    narrow = narrow_masked(arrays, mod_range)
    assert [a.dtype for a in narrow] == [np.dtype(dtype)] * 3
    # Through the bytes the server reads, back to the same integers.
    back = [bytes_to_ndarray(ndarray_to_bytes(a)) for a in narrow]
    for a, b in zip(arrays, back, strict=True):
        assert b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b.astype(np.int64))
    assert (
        sum(len(ndarray_to_bytes(a)) for a in narrow)
        < sum(len(ndarray_to_bytes(a)) for a in arrays) * np.dtype(dtype).itemsize / 8 + 3 * 200
    )


@pytest.mark.parametrize("mod_range", [3 << 14, 1 << 33, 1 << 40, 1, 0])
def test_a_modulus_without_a_narrow_dtype_leaves_the_arrays_int64(mod_range: int) -> None:
    arrays = [np.array([0, 1, 2], dtype=np.int64)]
    assert narrow_dtype(mod_range) is None
    out = narrow_masked(arrays, mod_range)
    assert out[0] is arrays[0]
    assert out[0].dtype == np.int64


@pytest.mark.parametrize(
    "bad",
    [np.array([0, 1 << 16], np.int64), np.array([-1, 5], np.int64), np.array([0.5], np.float64)],
    ids=["too_big", "negative", "float"],
)
def test_values_outside_the_modulus_are_refused(bad: Array) -> None:
    with pytest.raises(TrainingInputError, match="masked array 1"):
        narrow_masked([np.array([3], np.int64), bad], 1 << 16)


def _client_upload(
    params: list[Array],
    nid: int,
    seeds: dict[int, bytes],
    pairs: dict[frozenset[int], bytes],
    q: int,
    mod: int,
) -> list[Array]:
    """What ``secaggplus_mod``'s collect-masked-vectors stage computes (weight 1, max_weight
    1): quantize, prepend the factor, add the private and the pairwise masks, mod."""
    quantized = factor_combine(q, quantize(params, SECAGG_CLIPPING_RANGE, q))
    shapes = [a.shape for a in quantized]
    masked = parameters_addition(quantized, pseudo_rand_gen(seeds[nid], mod, shapes))
    for pair, key in pairs.items():
        if nid not in pair:
            continue
        (other,) = pair - {nid}
        mask = pseudo_rand_gen(key, mod, shapes)
        masked = (
            parameters_addition(masked, mask)
            if nid > other
            else parameters_subtraction(masked, mask)
        )
    return parameters_mod(masked, mod)


def _server_aggregate(
    uploads: list[list[bytes]], seeds: dict[int, bytes], q: int, mod: int
) -> tuple[list[Array], list[Array]]:
    """What ``SecAggPlusWorkflow`` does with the uploads: sum, mod, remove the private masks
    (pairwise ones cancel), mod, extract the factor, dequantize to the mean."""
    total: list[Array] | None = None
    for upload in uploads:
        vec = [bytes_to_ndarray(b) for b in upload]
        total = vec if total is None else parameters_addition(total, vec)
    assert total is not None
    summed = parameters_mod(total, mod)
    masked = summed
    for seed in seeds.values():
        masked = parameters_subtraction(
            masked, pseudo_rand_gen(seed, mod, [a.shape for a in masked])
        )
    recon = parameters_mod(masked, mod)
    factor, recon = factor_extract(recon)
    mean = dequantize(recon, SECAGG_CLIPPING_RANGE, q)
    offset = -(len(uploads) - 1) * SECAGG_CLIPPING_RANGE
    return summed, [(arr + offset) * (q / factor) for arr in mean]


@pytest.mark.parametrize(("clients", "mod"), [(3, 1 << 16), (5, 1 << 16), (3, 1 << 32)])
def test_the_server_sums_narrow_uploads_to_the_int64_result(clients: int, mod: int) -> None:
    q = (mod - 1) // clients
    if mod == 1 << 16:
        assert secaggplus_ranges(clients) == (q, mod)
    rng = np.random.default_rng(clients)
    nids = list(range(11, 11 + clients))
    seeds = {n: rng.bytes(32) for n in nids}
    pairs = {frozenset((a, b)): rng.bytes(32) for a in nids for b in nids if a < b}
    # Adapter-like values: A near its N(0, 1/24) start, B small, one value at each clip edge.
    params = {
        n: [
            rng.normal(0, 0.05, SHAPES[0]).astype(np.float32),
            rng.normal(0, 0.02, SHAPES[1]).astype(np.float32),
        ]
        for n in nids
    }
    params[nids[0]][1][0, 0] = SECAGG_CLIPPING_RANGE
    params[nids[1]][1][0, 0] = -SECAGG_CLIPPING_RANGE
    wide = {n: _client_upload(params[n], n, seeds, pairs, q, mod) for n in nids}
    assert all(a.dtype == np.int64 for n in nids for a in wide[n])
    narrow = {n: narrow_masked(wide[n], mod) for n in nids}
    assert all(a.dtype == narrow_dtype(mod) for n in nids for a in narrow[n])
    # The narrow sum wraps (masks are uniform in [0, mod)), yet agrees mod the modulus.
    assert sum(int(narrow[n][1].astype(np.int64).max()) for n in nids) >= mod

    def upload(arrays: list[Array]) -> list[bytes]:
        return [ndarray_to_bytes(a) for a in arrays]

    wide_sum, wide_mean = _server_aggregate([upload(wide[n]) for n in nids], seeds, q, mod)
    narrow_sum, narrow_mean = _server_aggregate([upload(narrow[n]) for n in nids], seeds, q, mod)
    for w, n in zip(wide_sum, narrow_sum, strict=True):
        np.testing.assert_array_equal(w, n.astype(np.int64))
    for w, n in zip(wide_mean, narrow_mean, strict=True):
        np.testing.assert_array_equal(w, n)
    # And the aggregate is the clients' mean within the quantization step.
    # (at 2**32 the float32 values quantize() works in are coarser than the step)
    step = max(
        2 * SECAGG_CLIPPING_RANGE / q, 4 * SECAGG_CLIPPING_RANGE * float(np.finfo(np.float32).eps)
    )
    for i, got in enumerate(narrow_mean):
        expected = np.mean([params[n][i].astype(np.float64) for n in nids], axis=0)
        assert np.abs(got - expected).max() <= step


def _train_message() -> Message:
    # As the SuperNode hands a ClientApp its message (metadata set by the SuperLink).
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict({"arrays": ArrayRecord([np.zeros(2, np.float32)])})
    return Message(content, metadata=metadata)  # type: ignore[call-overload,no-any-return]


def _context(state: RecordDict) -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=state, run_config={})


def test_the_mod_leaves_a_plain_reply_unchanged() -> None:
    msg = _train_message()
    content = RecordDict(
        {"arrays": ArrayRecord([np.ones(3, np.float32)]), "metrics": MetricRecord({"n": 1})}
    )
    reply = Message(content, reply_to=msg)
    out = _narrow_secaggplus_upload(msg, _context(RecordDict()), lambda m, c: reply)
    assert out is reply
    assert out.content is content
    assert set(out.content.array_records) == {"arrays"}


def test_the_mod_leaves_other_secaggplus_stages_unchanged() -> None:
    msg = _train_message()
    keys = ConfigRecord({Key.DESTINATION_LIST: [2, 3], Key.CIPHERTEXT_LIST: [b"x", b"y"]})
    reply = Message(RecordDict({RECORD_KEY_CONFIGS: keys}), reply_to=msg)
    state = RecordDict({RECORD_KEY_STATE: ConfigRecord({"mod_range": 1 << 16})})
    out = _narrow_secaggplus_upload(msg, _context(state), lambda m, c: reply)
    assert out.content.config_records[RECORD_KEY_CONFIGS][Key.CIPHERTEXT_LIST] == [b"x", b"y"]


def test_the_mod_narrows_the_masked_vectors_with_the_nodes_modulus() -> None:
    msg = _train_message()
    masked = [np.array([21845], np.int64), np.arange(0, 65536, 7, dtype=np.int64).reshape(-1, 1)]
    res = ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in masked]}, False)
    reply = Message(RecordDict({RECORD_KEY_CONFIGS: res}), reply_to=msg)
    state = RecordDict({RECORD_KEY_STATE: ConfigRecord({"mod_range": 1 << 16, "nid": 7})})
    out = _narrow_secaggplus_upload(msg, _context(state), lambda m, c: reply)
    sent = out.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    assert isinstance(sent, list)
    got = [bytes_to_ndarray(b) for b in sent]  # type: ignore[arg-type]
    assert [a.dtype for a in got] == [np.dtype(np.uint16)] * 2
    for a, b in zip(masked, got, strict=True):
        np.testing.assert_array_equal(a, b.astype(np.int64))
    assert sum(map(len, sent)) < sum(len(ndarray_to_bytes(a)) for a in masked) / 2  # type: ignore[arg-type]


@pytest.mark.parametrize("cohort", [3, 5, 20, 63, 64, 1000, 1025, 100_000])
def test_the_coordinators_ranges_never_wrap_the_sum(cohort: int) -> None:
    q, mod = secaggplus_ranges(cohort)
    assert mod == (1 << 16 if cohort <= 63 else 1 << 32)
    assert q >= 1 << 10
    # cohort values and factors, each at most q: the sum stays below the modulus.
    assert cohort * q < mod
    assert narrow_dtype(mod) == np.dtype(np.uint16 if mod == 1 << 16 else np.uint32)
    SecAggPlus(
        kind="secaggplus",
        num_shares=min(cohort, 7),
        reconstruction_threshold=2,
        clipping_range=SECAGG_CLIPPING_RANGE,
        quantization_range=q,
        modulus_range=mod,
    )


@pytest.mark.parametrize(
    ("q", "mod", "message"),
    [(100, 3 << 14, "power of two"), (1 << 16, 1 << 16, "must exceed")],
)
def test_the_manifest_refuses_a_bad_modulus(q: int, mod: int, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SecAggPlus(
            kind="secaggplus",
            num_shares=3,
            reconstruction_threshold=2,
            clipping_range=8.0,
            quantization_range=q,
            modulus_range=mod,
        )


GOLDEN = Path(__file__).resolve().parent.parent / "golden"


class _ConfigCapture:
    """A Flower driver that only keeps the run's app config (and leaves no aggregate)."""

    def __init__(self) -> None:
        self.pyproject = ""

    def run(self, app_dir: Path, run_config: Mapping[str, Any], timeout_s: float) -> str:
        self.pyproject = (app_dir / "pyproject.toml").read_text("utf-8")
        return "no aggregate"


@pytest.mark.parametrize(("cohort", "q", "mod"), [(3, 21845, 1 << 16), (100, 42949672, 1 << 32)])
def test_a_secaggplus_run_records_and_sends_its_modulus(
    tmp_path: Path, cohort: int, q: int, mod: int
) -> None:
    base = BundleManifest.model_validate_json((GOLDEN / "BundleManifest.json").read_bytes())
    spec = RunSpec(
        round_id="r1",
        group="alpha",
        rounds=1,
        cohort_size=cohort,
        min_nodes=3,
        nodes=tuple(range(1, cohort + 1)),
    )
    manifest = plan_manifest(spec, base, datetime(2026, 12, 1, tzinfo=UTC))
    assert isinstance(manifest.aggregation, SecAggPlus)
    assert (manifest.aggregation.quantization_range, manifest.aggregation.modulus_range) == (q, mod)
    driver = _ConfigCapture()
    with pytest.raises(RunFailedError):
        run_personalization(spec, base, driver, tmp_path)
    assert f"modulus-range = {mod}\n" in driver.pyproject
    assert f"quantization-range = {q}\n" in driver.pyproject


def test_the_manifest_refuses_a_cohort_whose_sum_would_wrap() -> None:
    data = json.loads((GOLDEN / "RoundManifest.json").read_text("utf-8"))
    data["aggregation"]["quantization_range"] = 3277  # 20 x 3277 >= 2**16
    with pytest.raises(ValidationError, match="overflows modulus_range"):
        RoundManifest.model_validate(data)


@pytest.mark.parametrize(
    ("scale", "expected_norm"),
    [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (3.0, 1.0), (1e6, 1.0)],
    ids=["zero", "inside", "on-the-bound", "outside", "far-outside"],
)
def test_clip_update_scales_only_updates_beyond_the_norm(
    scale: float, expected_norm: float
) -> None:
    rng = np.random.default_rng(3)
    sent = [rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)]
    direction = [rng.normal(size=a.shape) for a in sent]
    length = float(np.sqrt(sum(float(np.sum(d * d)) for d in direction)))
    new = [
        (s + d / length * scale).astype(np.float32) for s, d in zip(sent, direction, strict=True)
    ]
    got = clip_update(new, sent, 1.0)
    deltas = [g.astype(np.float64) - s for g, s in zip(got, sent, strict=True)]
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas)))
    assert norm == pytest.approx(expected_norm, abs=1e-5)
    if scale <= 1.0:
        for g, n in zip(got, new, strict=True):
            np.testing.assert_allclose(g, n, atol=1e-6)


@pytest.mark.parametrize(
    ("new_shapes", "norm", "message"),
    [
        ([(4, 2)], 1.0, "do not match"),
        ([(4, 2), (2, 5)], 1.0, "do not match"),
        ([(4, 2), (2, 6)], 0.0, "clipping norm must be > 0"),
        ([(4, 2), (2, 6)], float("nan"), "clipping norm must be > 0"),
    ],
)
def test_clip_update_refuses_what_does_not_pair_up(
    new_shapes: list[tuple[int, int]], norm: float, message: str
) -> None:
    sent = [np.zeros((4, 2), np.float32), np.zeros((2, 6), np.float32)]
    with pytest.raises(TrainingInputError, match=message):
        clip_update([np.zeros(s, np.float32) for s in new_shapes], sent, norm)
