"""Decode speed, first-token latency and peak memory: our ONNX runtime vs llama.cpp.

Both engines run the same chat prompt, greedy, the same thread count and the same number
of new tokens, each run in a fresh child process (so peak RSS is the engine's own), the
two engines interleaved run after run; figures are medians. The memory-bandwidth bound is
measured in the same run: bytes of weights read per token / read bandwidth (NumPy sum over
a buffer much larger than the last-level cache).

Also, in-process: top-1 agreement and mean KL of each engine's next-token distribution
with the float32 NumPy reference over a fixed chat text, and where each engine's greedy
answer first leaves the reference's (with the reference's own top-2 margin there).

llama.cpp comes from llama-cpp-python, which compiles from source (~20 minutes here):

    .venv/bin/pip install llama-cpp-python==0.3.36

Without it, the script says loudly that no comparison was made and reports ours only.

    .venv/bin/python benchmarks/inference.py [--runs 5] [--tokens 128] [--threads 2]

Ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from tests.support.fidelity import LONG_PROMPT as PROMPT  # noqa: E402 (after the path)


def _child_ours(model_dir: str, threads: int, tokens: int) -> dict[str, Any]:
    from agent.runtime import Engine, SamplingParams

    engine = Engine.load(Path(model_dir), threads=threads, verify=False)
    ids = engine.encode(engine.render_chat([("user", PROMPT)]))
    warm = engine.generate(ids, SamplingParams(max_tokens=4))
    for _ in warm:
        pass
    gen = engine.generate(ids, SamplingParams(max_tokens=tokens))
    start = time.perf_counter()
    first: float | None = None
    for _ in gen:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    n = len(gen.token_ids)
    if first is None or n != tokens:
        raise SystemExit(f"decoded {n} tokens, expected {tokens}: pick a longer prompt")
    return {
        "prompt_tokens": len(ids),
        "tokens": n,
        "first_token_ms": (first - start) * 1000,
        "decode_tok_s": (n - 1) / (end - first),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child_llama(gguf: str, threads: int, tokens: int) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, seed=0)
    # The same ChatML text our engine renders, tokenized by llama.cpp itself.
    text = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        break  # warm-up: one prefill and one token
    llm.reset()
    start = time.perf_counter()
    first: float | None = None
    n = 0
    for _tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if first is None:
            first = time.perf_counter()
        n += 1
        if n == tokens:
            break
    end = time.perf_counter()
    if first is None:
        raise SystemExit("llama.cpp produced no token")
    return {
        "prompt_tokens": len(ids),
        "tokens": n,
        "first_token_ms": (first - start) * 1000,
        "decode_tok_s": (n - 1) / (end - first),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_child(kind: str, arg: str, threads: int, tokens: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, arg, str(threads), str(tokens)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def read_bandwidth_gb_s(repeats: int = 7) -> float:
    """Median single-thread read bandwidth: NumPy sum over 256 MiB."""
    buf = np.ones(256 << 20 >> 3, dtype=np.float64)
    buf.sum()
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        speeds.append(buf.nbytes / (time.perf_counter() - start) / 1e9)
    return median(speeds)


def weight_bytes(model_dir: Path) -> int:
    """Bytes of weights a decode step reads: the graph's external data, all of it."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in {".data", ".bin"})


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fidelity(model_dir: Path, gguf: Path, threads: int, have_llama: bool) -> dict[str, Any]:
    """Top-1 agreement, mean KL and greedy divergence vs the float32 NumPy reference."""
    from agent.runtime import Engine, SamplingParams
    from coordinator.models.reference import ReferenceModel
    from tests.support.fidelity import FIDELITY_TEXT
    from tests.support.fidelity import HEALTH_PROMPT as GREEDY_PROMPT

    engine = Engine.load(model_dir, threads=threads)
    ref = ReferenceModel(gguf)
    ids = engine.encode(engine.render_chat(FIDELITY_TEXT))
    ref_lp = _log_softmax(ref.forward(ids).logits)

    def compare(lp: np.ndarray) -> tuple[float, float]:
        kl = float((np.exp(ref_lp) * (ref_lp - lp)).sum(-1).mean())
        return kl, float((lp.argmax(-1) == ref_lp.argmax(-1)).mean())

    out: dict[str, Any] = {"fidelity_tokens": len(ids)}
    out["ours_kl"], out["ours_top1"] = compare(_log_softmax(engine.forward(ids).logits))
    prompt = engine.encode(engine.render_chat([("user", GREEDY_PROMPT)]))
    gen = engine.generate(prompt, SamplingParams(max_tokens=32))
    for _ in gen:
        pass
    out["ours_greedy_equal"], out["ours_greedy_margin"] = _divergence(ref, prompt, gen.token_ids)
    if have_llama:
        from llama_cpp import Llama

        llm = Llama(
            model_path=str(gguf), n_ctx=2048, n_threads=threads, logits_all=True, verbose=False
        )
        llm.eval(ids)
        lp = _log_softmax(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
        out["llama_kl"], out["llama_top1"] = compare(lp)
        llm.reset()
        toks = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            toks.append(int(tok))
            if len(toks) == 32:
                break
        out["llama_greedy_equal"], out["llama_greedy_margin"] = _divergence(ref, prompt, toks)
    return out


def _divergence(ref: Any, prompt: list[int], tokens: list[int]) -> tuple[int, float | None]:
    """How many leading tokens equal the reference's greedy choice, and its top-2 margin
    (in logits) at the first one that does not (None if all do)."""
    logits = ref.forward(prompt + tokens).logits[len(prompt) - 1 :]
    for i, tok in enumerate(tokens):
        row = logits[i]
        best = int(row.argmax())
        if best != tok:
            top2 = np.sort(row)[-2:]
            return i, float(top2[1] - top2[0])
    return len(tokens), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per engine (medians)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines")
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: build)")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the fidelity part")
    args = parser.parse_args()

    from coordinator.models.build import build_smollm2, smollm2_gguf

    model_dir = args.model or build_smollm2().path
    gguf = smollm2_gguf()
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    if not have_llama:
        print(
            "\n!!! llama-cpp-python is not installed: NO COMPARISON WITH llama.cpp WAS MADE.\n"
            "!!! Install it (compiles ~20 min): .venv/bin/pip install llama-cpp-python==0.3.36\n",
            file=sys.stderr,
        )
    ours: list[dict[str, Any]] = []
    llama: list[dict[str, Any]] = []
    for i in range(args.runs):
        ours.append(_run_child("ours", str(model_dir), args.threads, args.tokens))
        if have_llama:
            llama.append(_run_child("llama", str(gguf), args.threads, args.tokens))
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)

    bandwidth = read_bandwidth_gb_s()
    wbytes = weight_bytes(model_dir)
    bound = bandwidth * 1e9 / wbytes
    fig: dict[str, Any] = {
        "runs": args.runs,
        "tokens": args.tokens,
        "threads": args.threads,
        "prompt_tokens": ours[0]["prompt_tokens"],
        "ours_decode_tok_s": median([r["decode_tok_s"] for r in ours]),
        "ours_first_token_ms": median([r["first_token_ms"] for r in ours]),
        "ours_peak_rss_mb": median([r["peak_rss_mb"] for r in ours]),
        "read_bandwidth_gb_s": bandwidth,
        "weight_mb_per_token": wbytes / 1e6,
        "bandwidth_bound_tok_s": bound,
    }
    fig["ours_of_bound"] = fig["ours_decode_tok_s"] / bound
    if llama:
        fig["llama_decode_tok_s"] = median([r["decode_tok_s"] for r in llama])
        fig["llama_first_token_ms"] = median([r["first_token_ms"] for r in llama])
        fig["llama_peak_rss_mb"] = median([r["peak_rss_mb"] for r in llama])
        fig["decode_ratio"] = fig["ours_decode_tok_s"] / fig["llama_decode_tok_s"]
        fig["first_token_ratio"] = fig["ours_first_token_ms"] / fig["llama_first_token_ms"]
        fig["peak_rss_ratio"] = fig["ours_peak_rss_mb"] / fig["llama_peak_rss_mb"]
    if not args.no_fidelity:
        fig.update(fidelity(model_dir, gguf, args.threads, have_llama))

    rows = [
        ("decode tok/s", "ours_decode_tok_s", "llama_decode_tok_s", "decode_ratio"),
        ("first token ms", "ours_first_token_ms", "llama_first_token_ms", "first_token_ratio"),
        ("peak RSS MB", "ours_peak_rss_mb", "llama_peak_rss_mb", "peak_rss_ratio"),
        ("top-1 vs fp32 reference", "ours_top1", "llama_top1", None),
        ("mean KL vs fp32 reference", "ours_kl", "llama_kl", None),
        ("greedy tokens = reference", "ours_greedy_equal", "llama_greedy_equal", None),
    ]
    print(f"\n{'':28}{'ours':>12}{'llama.cpp':>12}{'ratio':>10}")
    for label, a, b, r in rows:
        if a not in fig:
            continue
        cells = [_fmt(fig.get(a)), _fmt(fig.get(b)), _fmt(fig.get(r)) if r else ""]
        print(f"{label:28}{cells[0]:>12}{cells[1]:>12}{cells[2]:>10}")
    print(
        f"\nbandwidth bound: {bandwidth:.1f} GB/s / {wbytes / 1e6:.1f} MB per token = "
        f"{bound:.0f} tok/s; ours reaches {fig['ours_of_bound']:.0%} of it"
    )
    print(json.dumps({"benchmark": "inference", **fig}))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:.1f}"
    return str(value)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, arg, threads, tokens = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        fn = _child_ours if kind == "ours" else _child_llama
        print(json.dumps(fn(arg, threads, tokens)))
    else:
        main()
