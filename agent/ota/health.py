"""The health gate's verdict: does the newly activated model serve well enough to commit?

Pure: measurements in, a verdict out. The live side (:mod:`agent.ota.live`) takes the
measurements through the agent's own socket, the way a client would: the same smoke
prompts on the old model just before the swap (the baseline, on this machine, now) and on
the new one just after.

The new model passes when, over ``HealthPolicy.requests`` smoke requests:

- every request succeeded and produced well-formed text (non-empty, not one character
  repeated, not mostly the Unicode replacement character);
- its median first-token latency is at most ``first_token_ratio_max`` times the old one's,
  plus ``first_token_slack_s``;
- its median time per token is at most the old one's divided by ``tokens_per_s_ratio_min``
  (its decode rate at least that share of the old one's), plus ``token_time_slack_s``.

The slacks keep a model whose timings are tiny (sub-millisecond tokens) from being judged
on timer noise: a ratio alone rolled back good models whose tokens took 0.2 ms instead of
0.07 ms on a busy machine.

A device without a baseline (its first model) is judged on the first rule only.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from pydantic import BaseModel, ConfigDict, Field

#: Smoke prompts, used in turn.
SMOKE_PROMPTS = (
    "Give me three tips for staying healthy.",
    "Write one sentence about the sea.",
    "List three colours.",
)


class HealthPolicy(BaseModel):
    """Bounds of the health gate (part of the agent's settings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Smoke requests on each of the old and the new model.
    requests: int = Field(default=3, ge=1, le=32)
    #: Tokens each smoke request asks for.
    max_tokens: int = Field(default=24, ge=2, le=512)
    #: The new model's median first-token latency may be this many times the old one's.
    first_token_ratio_max: float = Field(default=2.0, gt=1.0, le=100.0)
    #: Added to the allowed first-token latency (seconds).
    first_token_slack_s: float = Field(default=0.05, ge=0.0, le=60.0)
    #: The new model's median decode rate must be at least this share of the old one's.
    tokens_per_s_ratio_min: float = Field(default=0.5, gt=0.0, lt=1.0)
    #: Added to the allowed time per token (seconds).
    token_time_slack_s: float = Field(default=0.002, ge=0.0, le=10.0)
    #: One smoke request may take this long.
    request_timeout_s: float = Field(default=60.0, gt=0, le=600)


@dataclass(frozen=True)
class Sample:
    """One smoke request as a client saw it."""

    ok: bool
    text: str = ""
    first_token_s: float = 0.0
    tokens: int = 0
    decode_s: float = 0.0
    error: str = ""

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else 0.0


def malformed(text: str) -> str | None:
    """Why ``text`` is not a well-formed answer, or None."""
    stripped = text.strip()
    if not stripped:
        return "empty answer"
    if stripped.count("\ufffd") * 2 > len(stripped):
        return "most of the answer is the Unicode replacement character (broken UTF-8)"
    if len(stripped) >= 8 and len(set(stripped)) == 1:
        return f"the answer is one character repeated ({stripped[0]!r})"
    return None


def judge(policy: HealthPolicy, baseline: list[Sample], candidate: list[Sample]) -> str | None:
    """The reason the candidate fails the gate, or None when it passes."""
    if not candidate:
        return "no smoke request was made"
    for i, s in enumerate(candidate):
        if not s.ok:
            return f"smoke request {i + 1} failed: {s.error or 'no answer'}"
        why = malformed(s.text)
        if why is not None:
            return f"smoke request {i + 1}: {why}"
    base = [s for s in baseline if s.ok and s.tokens > 1]
    if not base:
        return None
    old_first = median(s.first_token_s for s in base)
    new_first = median(s.first_token_s for s in candidate)
    allowed_first = policy.first_token_ratio_max * old_first + policy.first_token_slack_s
    if new_first > allowed_first:
        return (
            f"first-token latency {new_first * 1000:.1f} ms is over the "
            f"{allowed_first * 1000:.1f} ms allowed ({policy.first_token_ratio_max:g}x the "
            f"previous model's {old_first * 1000:.1f} ms plus the slack)"
        )
    old_rate = median(s.tokens_per_s for s in base)
    new_rate = median(s.tokens_per_s for s in candidate)
    if old_rate > 0:
        allowed = 1.0 / (policy.tokens_per_s_ratio_min * old_rate) + policy.token_time_slack_s
        if new_rate <= 0 or 1.0 / new_rate > allowed:
            return (
                f"decode rate {new_rate:.1f} tokens/s is under the {1.0 / allowed:.1f} "
                f"tokens/s allowed ({policy.tokens_per_s_ratio_min:g}x the previous model's "
                f"{old_rate:.1f} tokens/s less the slack)"
            )
    return None
