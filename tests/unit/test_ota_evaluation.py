"""The post-commit evaluation: what is reported, and that a failure sends nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.errors import TrainingInputError
from agent.ota.evaluation import evaluate_in_background
from protocol.messages import MAX_METRIC, BundleRef, EvaluationReport

BUNDLE = BundleRef(name="tuned", version="1", sha256="ab" * 32)
DIRS = (Path("/base"), Path("/adapter"), Path("/texts.sqlite3"))


def run(result: tuple[float, float, int] | Exception) -> list[EvaluationReport]:
    sent: list[EvaluationReport] = []

    def evaluate(base: Path, adapter: Path, data: Path) -> tuple[float, float, int]:
        assert (base, adapter, data) == DIRS
        if isinstance(result, Exception):
            raise result
        return result

    evaluate_in_background(BUNDLE, *DIRS, sent.append, evaluate=evaluate).join(10)
    return sent


def test_the_report_names_the_bundle_and_both_metrics() -> None:
    (report,) = run((20.0, 17.5, 1800))
    assert (report.bundle, report.baseline, report.candidate, report.tokens) == (
        BUNDLE,
        20.0,
        17.5,
        1800,
    )
    assert report.metric == "heldout_perplexity"


def test_an_adapter_that_blows_perplexity_up_is_reported_as_the_largest_metric() -> None:
    (report,) = run((20.0, math.inf, 1800))
    assert report.candidate == MAX_METRIC


@pytest.mark.parametrize(
    "failure", [TrainingInputError("too little held-out text"), OSError("permission denied")]
)
def test_a_device_that_cannot_evaluate_sends_nothing(
    failure: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    assert run(failure) == []
    assert "no evaluation of tuned 1" in caplog.text
