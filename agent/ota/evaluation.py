"""After an adapter release commits: measure it on the device's own held-out text, report it.

The coordinator's rollout policy halts an adapter rollout whose wave regresses on the
devices' own data. Each device measures held-out perplexity of its local store
(:mod:`agent.federated.datastore`, the held-out split) with the committed base alone
(``baseline``) and with the new adapter (``candidate``), and sends the two numbers and the
token count as a :class:`~protocol.messages.EvaluationReport`. The text never leaves the
device.

Invariants:

- Runs off the update thread and at the lowest CPU priority, so serving and later updates
  never wait for it; it loads its own copy of the base model and drops it when done.
- Bounded: at most :data:`MAX_ROWS` scored positions.
- Never raises into its caller: a device without enough held-out text, or whose store
  the agent cannot read, sends nothing and logs why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from protocol.bundle import ADAPTER_NAME
from protocol.messages import MAX_METRIC, BundleRef, EvaluationReport

__all__ = ["MAX_ROWS", "evaluate_adapter", "evaluate_in_background"]

log = logging.getLogger("nanofleet.agent.ota")

#: Positions scored at most (bounds time and memory; ~2 s on the Nano model here).
MAX_ROWS: Final = 2000
#: Tokens per scored window.
WINDOW: Final = 64


def evaluate_adapter(
    base_dir: Path, adapter_dir: Path, data_path: Path, *, max_rows: int = MAX_ROWS
) -> tuple[float, float, int]:
    """Held-out perplexity of the local store without and with the adapter, and positions.

    Raises:
        agent.errors.LocalDataError: the store cannot be read.
        agent.errors.TrainingInputError: too little held-out text, or the adapter does not
            fit the base.
        agent.errors.ModelError: the model or the adapter cannot be loaded.
    """
    import numpy as np

    from agent.federated.local import FeatureConfig, LocalModel, evaluate_round
    from agent.federated.trainer import Adapter

    model = LocalModel(base_dir)
    loaded = model.engine.load_adapter(adapter_dir / ADAPTER_NAME)
    adapter = Adapter(a=np.asarray(loaded.lora_a), b=np.asarray(loaded.lora_b))
    _, positions, metrics = evaluate_round(
        model, data_path, adapter, FeatureConfig(window=WINDOW, max_rows=max_rows)
    )
    return metrics["base_perplexity"], metrics["perplexity"], positions


def evaluate_in_background(
    bundle: BundleRef,
    base_dir: Path,
    adapter_dir: Path,
    data_path: Path,
    send: Callable[[EvaluationReport], None],
    *,
    evaluate: Callable[[Path, Path, Path], tuple[float, float, int]] = evaluate_adapter,
) -> threading.Thread:
    """Start a daemon thread that evaluates ``bundle`` and hands the report to ``send``."""

    def run() -> None:
        with contextlib.suppress(OSError):  # not allowed here: the normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            baseline, candidate, tokens = evaluate(base_dir, adapter_dir, data_path)
            report = EvaluationReport(
                bundle=bundle,
                baseline=baseline,
                # An adapter that blows perplexity up is a regression, not a broken report.
                candidate=min(candidate, MAX_METRIC),
                tokens=tokens,
                at=datetime.now(UTC),
            )
        except Exception as e:  # a device that cannot evaluate sends nothing
            log.warning(
                "no evaluation of %s %s: %s",
                bundle.name,
                bundle.version,
                e,
                extra={"event": "evaluation_skipped"},
            )
            return
        log.info(
            "evaluated %s %s: held-out perplexity %.3f -> %.3f over %d positions",
            bundle.name,
            bundle.version,
            baseline,
            candidate,
            tokens,
            extra={"event": "evaluation", "baseline": baseline, "candidate": candidate},
        )
        send(report)

    thread = threading.Thread(target=run, name="nanofleet-evaluation", daemon=True)
    thread.start()
    return thread
