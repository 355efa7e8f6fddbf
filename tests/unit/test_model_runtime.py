"""The runtime on the tiny model: ORT vs the NumPy reference, KV cache, adapters, generation."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from agent.cli import app as agent_app
from agent.errors import ContextLengthError, ModelError
from agent.runtime import (
    Engine,
    FinishReason,
    SamplingParams,
    load_adapter,
    save_adapter,
)
from coordinator.models.build import build_gguf
from coordinator.models.graph import GraphOptions
from coordinator.models.reference import KVCache, ReferenceModel
from tests.support.model_fixtures import TinyModel

PROMPT = [("user", "Give me three tips for staying healthy.")]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir, threads=1)


@pytest.fixture(scope="module")
def prompt_ids(engine: Engine) -> list[int]:
    return engine.encode(engine.render_chat(PROMPT))


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-4 * np.abs(expected).max())


def test_logits_and_hidden_states_match_the_reference_at_every_position(
    engine: Engine, tiny_reference: ReferenceModel, prompt_ids: list[int]
) -> None:
    ours = engine.forward(prompt_ids)
    ref = tiny_reference.forward(prompt_ids)
    assert ours.logits.shape == (len(prompt_ids), engine.vocab_size)
    _close(ours.logits, ref.logits)
    _close(ours.hidden_states, ref.hidden_states)
    np.testing.assert_array_equal(ours.hidden_states, engine.forward_hidden(prompt_ids))


def _ort_session(model_dir: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(model_dir / "model.onnx"), so)


def test_prefill_equals_token_by_token_with_the_kv_cache(
    tiny_model: TinyModel, tiny_reference: ReferenceModel, prompt_ids: list[int]
) -> None:
    """Graph-level: growing past/present tensors, one token per run, vs one prefill run."""
    session = _ort_session(tiny_model.model_dir)
    cfg = tiny_reference.config
    layers, heads, dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    past = {
        f"past_key_values.{i}.{k}": np.zeros((1, heads, 0, dim), np.float32)
        for i in range(layers)
        for k in ("key", "value")
    }
    names = [o.name for o in session.get_outputs()]
    ids = np.asarray([prompt_ids], dtype=np.int64)
    full = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **past})[
        0
    ][0]
    steps = []
    for t, token in enumerate(prompt_ids):
        feeds = {
            "input_ids": np.asarray([[token]], np.int64),
            "attention_mask": np.ones((1, t + 1), np.int64),
            **past,
        }
        out = dict(zip(names, session.run(None, feeds), strict=True))
        steps.append(out["logits"][0, 0])
        past = {
            f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"]
            for i in range(layers)
            for k in ("key", "value")
        }
    _close(np.stack(steps), full)
    # The reference agrees with itself token by token too.
    cache = KVCache()
    ref_steps = [tiny_reference.forward([tok], cache).logits[0] for tok in prompt_ids]
    _close(np.stack(ref_steps), tiny_reference.forward(prompt_ids).logits)


def test_logits_start_selects_positions_without_changing_them(
    tiny_model: TinyModel, tiny_reference: ReferenceModel, prompt_ids: list[int]
) -> None:
    """A prefill asks for the last position only (``logits_start`` = -1): its logits are
    the full run's last row; 0 (the default) keeps every position, 3 all from the fourth."""
    session = _ort_session(tiny_model.model_dir)
    cfg = tiny_reference.config
    feeds = {
        "input_ids": np.asarray([prompt_ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(prompt_ids)), np.int64),
        **{
            f"past_key_values.{i}.{k}": np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.num_layers)
            for k in ("key", "value")
        },
    }
    full = session.run(["logits"], feeds)[0][0]
    last = session.run(["logits"], {**feeds, "logits_start": np.array([-1], np.int64)})[0][0]
    assert full.shape[0] == len(prompt_ids)
    assert last.shape[0] == 1
    _close(last[0], full[-1])  # the same up to the GEMM's summation order
    from_three = session.run(["logits"], {**feeds, "logits_start": np.array([3], np.int64)})[0][0]
    assert from_three.shape[0] == len(prompt_ids) - 3
    _close(from_three, full[3:])


def test_greedy_generation_equals_the_reference(
    engine: Engine, tiny_reference: ReferenceModel, prompt_ids: list[int]
) -> None:
    gen = engine.generate(prompt_ids, SamplingParams(max_tokens=24))
    text = "".join(gen)
    expected = tiny_reference.greedy(prompt_ids, 24, eos=set(engine.info.eos_token_ids))
    assert gen.token_ids == expected
    assert gen.prompt_tokens == len(prompt_ids)
    assert gen.completion_tokens == len(expected)
    assert text == engine.decode([t for t in expected if t not in engine.info.eos_token_ids])


def _adapter_arrays(engine: Engine, rank: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((engine.hidden_size, rank)).astype(np.float32) * 0.3
    b = rng.standard_normal((rank, engine.vocab_size)).astype(np.float32) * 0.3
    return a, b


def test_adapter_changes_logits_exactly_as_the_reference(
    engine: Engine, tiny_reference: ReferenceModel, prompt_ids: list[int], tmp_path: Path
) -> None:
    a, b = _adapter_arrays(engine, rank=3)  # smaller than the graph's rank 8: zero-padded
    adapter = engine.make_adapter(a, b)
    plain = engine.forward(prompt_ids)
    ours = engine.forward(prompt_ids, adapter=adapter)
    ref = tiny_reference.forward(prompt_ids, lora=(a, b))
    assert np.abs(ours.logits - plain.logits).max() > 0.1
    _close(ours.logits, ref.logits)
    # Per call: the next call without the adapter is the plain model again.
    np.testing.assert_array_equal(engine.forward(prompt_ids).logits, plain.logits)
    # Through the file format, and through generation.
    save_adapter(tmp_path / "adapter.npz", adapter)
    loaded = engine.load_adapter(tmp_path / "adapter.npz")
    gen = engine.generate(prompt_ids, SamplingParams(max_tokens=12), adapter=loaded)
    list(gen)
    cache = KVCache()
    out = tiny_reference.forward(prompt_ids, cache, lora=(a, b))
    expected = []
    for _ in range(len(gen.token_ids)):
        expected.append(int(np.argmax(out.logits[-1])))
        out = tiny_reference.forward([expected[-1]], cache, lora=(a, b))
    assert gen.token_ids == expected


def test_seeded_sampling_is_reproducible(engine: Engine, prompt_ids: list[int]) -> None:
    def run(seed: int, **kw: float) -> list[int]:
        gen = engine.generate(
            prompt_ids, SamplingParams(max_tokens=16, temperature=1.0, seed=seed, **kw)
        )
        list(gen)
        return gen.token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = engine.generate(prompt_ids, SamplingParams(max_tokens=16))
    list(greedy)
    assert run(3, top_k=1) == greedy.token_ids
    assert run(4, top_p=1e-6) == greedy.token_ids


def test_max_tokens_ends_with_length(engine: Engine, prompt_ids: list[int]) -> None:
    gen = engine.generate(prompt_ids, SamplingParams(max_tokens=5))
    list(gen)
    assert gen.completion_tokens == 5
    assert gen.finish_reason is FinishReason.LENGTH


def test_stop_sequence_is_never_emitted(engine: Engine, prompt_ids: list[int]) -> None:
    full = "".join(engine.generate(prompt_ids, SamplingParams(max_tokens=24)))
    stop = full[10:13]
    assert len(stop) == 3
    gen = engine.generate(prompt_ids, SamplingParams(max_tokens=24, stop=(stop,)))
    text = "".join(gen)
    assert text == full[: full.index(stop)]
    assert gen.finish_reason is FinishReason.STOP


def test_context_length_error_names_the_numbers(engine: Engine, prompt_ids: list[int]) -> None:
    limit = engine.context_length
    with pytest.raises(ContextLengthError) as info:
        engine.generate(prompt_ids, SamplingParams(max_tokens=limit))
    message = str(info.value)
    assert f"{len(prompt_ids)} tokens" in message
    assert f"max_tokens is {limit}" in message
    assert f"context length of {limit}" in message
    with pytest.raises(ContextLengthError):
        engine.forward([5] * (limit + 1))
    fits = engine.generate(prompt_ids, SamplingParams(max_tokens=limit - len(prompt_ids)))
    assert fits.prompt_tokens == len(prompt_ids)


def test_bad_prompts_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.generate([engine.vocab_size], SamplingParams())


def test_cancel_stops_within_one_token(engine: Engine, prompt_ids: list[int]) -> None:
    cancel = threading.Event()
    gen = engine.generate(prompt_ids, SamplingParams(max_tokens=100), cancel=cancel)
    produced = 0
    for _ in gen:
        produced += 1
        cancel.set()
    assert gen.finish_reason is FinishReason.CANCELLED
    assert produced == 1
    assert gen.completion_tokens <= 2

    cancel_first = threading.Event()
    cancel_first.set()
    early = engine.generate(prompt_ids, SamplingParams(max_tokens=100), cancel=cancel_first)
    assert list(early) == []
    assert early.finish_reason is FinishReason.CANCELLED
    assert early.completion_tokens == 0


def test_abandoned_iteration_is_cancelled(engine: Engine, prompt_ids: list[int]) -> None:
    gen = engine.generate(prompt_ids, SamplingParams(max_tokens=100))
    it = iter(gen)
    next(it)
    it.close()  # what a consumer's break or garbage collection does
    assert gen.finish_reason is FinishReason.CANCELLED
    with pytest.raises(RuntimeError, match="only once"):
        iter(gen)


def test_concurrent_generations_on_one_engine_are_independent(
    engine: Engine, prompt_ids: list[int]
) -> None:
    prompts = [prompt_ids, prompt_ids[:20], prompt_ids[5:], prompt_ids]
    expected = []
    for p in prompts:
        g = engine.generate(p, SamplingParams(max_tokens=20))
        list(g)
        expected.append(g.token_ids)
    results: list[list[int] | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        g = engine.generate(prompts[i], SamplingParams(max_tokens=20))
        barrier.wait(timeout=10)
        list(g)
        results[i] = g.token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected


def test_chat_template_inserts_the_default_system_message(engine: Engine) -> None:
    prompt = engine.render_chat([("user", "hi")])
    assert prompt == (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    own = engine.render_chat([("system", "Be brief."), ("user", "hi")])
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        engine.render_chat([("User!", "hi")])


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(model_dir, dest)
    return dest


def test_missing_file_is_a_model_error_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model_dir, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"file tokenizer\.json is missing"):
        Engine.load(d)


def test_altered_file_is_a_model_error_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model_dir, tmp_path)
    with open(d / "model.onnx.data", "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelError, match=r"model\.onnx\.data does not match its sha256"):
        Engine.load(d)
    with open(d / "model.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(ModelError, match=r"model\.onnx has \d+ bytes, the manifest says"):
        Engine.load(d)


def test_symlinked_file_and_missing_manifest_are_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    d = _copy(tiny_model_dir, tmp_path)
    (d / "tokenizer.json").rename(tmp_path / "tok.json")
    (d / "tokenizer.json").symlink_to(tmp_path / "tok.json")
    with pytest.raises(ModelError, match="symlinks are refused"):
        Engine.load(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ModelError, match=r"manifest\.json is missing"):
        Engine.load(d)
    with pytest.raises(ModelError, match="not a directory"):
        Engine.load(tmp_path / "absent")


def test_adapter_files_are_validated(engine: Engine, tmp_path: Path) -> None:
    a, b = _adapter_arrays(engine, rank=2)
    bad_cases: dict[str, dict[str, np.ndarray]] = {
        "expected \\['lora_a', 'lora_b'\\]": {"lora_a": a},
        "lora_b has shape": {"lora_a": a, "lora_b": b[:, :-1]},
        "rank 9 is outside": {
            "lora_a": np.zeros((engine.hidden_size, 9), np.float32),
            "lora_b": np.zeros((9, engine.vocab_size), np.float32),
        },
        "lora_a has non-finite": {"lora_a": a * np.float32(np.inf), "lora_b": b},
        "must be a 2-D float32": {"lora_a": a.astype(np.float64), "lora_b": b},
    }
    for i, (message, arrays) in enumerate(bad_cases.items()):
        path = tmp_path / f"bad{i}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ModelError, match=message):
            engine.load_adapter(path)
    pickled = tmp_path / "pickle.npz"
    np.savez(pickled, lora_a=np.array([{"x": 1}], dtype=object), lora_b=b)
    with pytest.raises(ModelError, match=r"not a valid \.npz"):
        engine.load_adapter(pickled)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"not a valid \.npz"):
        engine.load_adapter(junk)
    good = tmp_path / "good.npz"
    np.savez(good, lora_a=a, lora_b=b)
    adapter = load_adapter(
        good, hidden=engine.hidden_size, vocab=engine.vocab_size, max_rank=engine.adapter_rank
    )
    assert adapter.rank == 2


def test_generate_cli_streams_the_greedy_answer(
    engine: Engine, tiny_model_dir: Path, prompt_ids: list[int]
) -> None:
    expected = "".join(engine.generate(prompt_ids, SamplingParams(max_tokens=10)))
    result = CliRunner().invoke(
        agent_app,
        ["generate", "--model", str(tiny_model_dir), "--max-tokens", "10", PROMPT[0][1]],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_generate_cli_reports_an_altered_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model_dir, tmp_path)
    (d / "model.onnx.data").write_bytes(b"")
    result = CliRunner().invoke(agent_app, ["generate", "--model", str(d), "hello"])
    assert result.exit_code == 66
    assert "model.onnx.data has 0 bytes" in result.output
    assert "Traceback" not in result.output


def test_rescored_top_k_logits_are_exact_on_the_int8_path(
    tmp_path: Path, tiny_model: TinyModel, prompt_ids: list[int]
) -> None:
    """With int8 activations everywhere except the rescoring, the k best logits of the last
    position equal the float32 LM head applied to the graph's own hidden state; the other
    positions are untouched. Without rescoring the last position's best logits differ."""
    k = 4
    models = {}
    for rescore in (0, k):
        options = GraphOptions(accuracy_level=4, exact=(), rescore_top_k=rescore)
        out = tmp_path / f"rescore-{rescore}"
        build_gguf(tiny_model.gguf, out, name="tiny-llama", options=options)
        models[rescore] = Engine.load(out, threads=1).forward(prompt_ids)
    np.testing.assert_array_equal(models[0].logits[:-1], models[k].logits[:-1])
    head = ReferenceModel(tiny_model.gguf).w["token_embd.weight"].astype(np.float64)
    for rescore, forward in models.items():
        exact = forward.hidden_states[-1].astype(np.float64) @ head.T
        top = np.argsort(forward.logits[-1])[-k:]
        error = float(np.abs(forward.logits[-1][top] - exact[top]).max())
        scale = float(np.abs(exact[top]).max())
        if rescore:
            assert error <= 1e-5 * scale, error
        else:
            assert error > 1e-3 * scale, error
