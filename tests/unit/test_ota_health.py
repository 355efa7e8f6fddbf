"""The health gate's verdict (pure): well-formed answers, latency and rate against the old
model, with slacks that keep sub-millisecond timings from being judged on noise."""

from __future__ import annotations

from agent.ota.health import HealthPolicy, Sample, judge

POLICY = HealthPolicy()


def _sample(first_s: float, per_token_s: float, text: str = "a fine answer") -> Sample:
    return Sample(ok=True, text=text, first_token_s=first_s, tokens=9, decode_s=8 * per_token_s)


def test_a_model_as_fast_as_the_old_one_passes() -> None:
    old = [_sample(0.08, 0.009)] * 3
    assert judge(POLICY, old, [_sample(0.09, 0.010)] * 3) is None


def test_timer_noise_on_a_tiny_model_is_not_a_failure() -> None:
    old = [_sample(0.0005, 0.00007)] * 3
    assert judge(POLICY, old, [_sample(0.0015, 0.0002)] * 3) is None


def test_a_much_slower_model_fails_on_its_decode_rate() -> None:
    old = [_sample(0.08, 0.009)] * 3
    reason = judge(POLICY, old, [_sample(0.1, 0.03)] * 3)
    assert reason is not None
    assert "decode rate" in reason


def test_a_much_later_first_token_fails() -> None:
    old = [_sample(0.08, 0.009)] * 3
    reason = judge(POLICY, old, [_sample(0.5, 0.009)] * 3)
    assert reason is not None
    assert "first-token latency" in reason


def test_malformed_or_failed_answers_fail_without_a_baseline() -> None:
    assert judge(POLICY, [], [_sample(0.1, 0.01, text="\ufffd\ufffd\ufffd")]) is not None
    assert judge(POLICY, [], [_sample(0.1, 0.01, text="zzzzzzzzzz")]) is not None
    assert judge(POLICY, [], [Sample(ok=False, error="HTTP 500")]) is not None
    assert judge(POLICY, [], [_sample(0.1, 0.01)]) is None
