"""Privacy accounting of a run: client-level DP of the subsampled Gaussian mechanism.

Each round the server releases the mean of ``cohort`` device updates, each clipped to
L2 norm ``C``, plus Gaussian noise of std ``z * C / cohort`` (``z`` the noise multiplier):
the Gaussian mechanism with sensitivity ``C / cohort`` on the mean, so its Renyi DP at
order ``a`` is ``a / (2 z^2)``. When the cohort is sampled from a larger population with
rate ``q`` (each device takes part with probability ``q``), the round is the *sampled*
Gaussian mechanism, whose RDP at an integer order ``a >= 2`` is bounded by (Mironov,
Talwar and Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019,
Sec. 3.3)::

    rdp(a) = 1/(a-1) * log sum_{k=0..a} C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 z^2))

RDP composes by addition over rounds; it becomes (epsilon, delta)-DP with the conversion
of Balle et al. 2020 ("Hypothesis testing interpretations and Renyi DP", Thm. 21)::

    epsilon = min_a  rdp_total(a) + log((a-1)/a) - (log delta + log a) / (a-1)

We keep this 60-line accountant rather than depend on a DP library: Opacus pulls in
torch (not on the coordinator), and Google's ``dp-accounting`` brings several
dependencies for the one function we need. The tests check it against the closed form
at ``q = 1`` and against known properties (monotone in ``z``, ``q`` and rounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["DEFAULT_ORDERS", "epsilon", "noise_for_epsilon", "rdp_sampled_gaussian"]

#: Integer Renyi orders searched for the tightest epsilon.
DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 64), 80, 96, 128, 192, 256, 512, 1024)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def rdp_sampled_gaussian(q: float, noise_multiplier: float, order: int) -> float:
    """RDP at integer ``order`` of one round of the sampled Gaussian mechanism.

    Raises:
        ValueError: ``q`` outside [0, 1], a negative noise multiplier, or ``order`` < 2.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate must lie in [0, 1], got {q}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if order < 2:
        raise ValueError(f"order must be an integer >= 2, got {order}")
    if q == 0.0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    two_var = 2.0 * noise_multiplier**2
    if q == 1.0:
        return order / two_var
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [
        math.lgamma(order + 1)
        - math.lgamma(k + 1)
        - math.lgamma(order - k + 1)
        + (order - k) * log_1q
        + k * log_q
        + (k * k - k) / two_var
        for k in range(order + 1)
    ]
    return _logsumexp(terms) / (order - 1)


def epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (``math.inf`` without noise).

    Raises:
        ValueError: ``delta`` outside (0, 1), negative ``rounds``, or bad mechanism inputs.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    best = math.inf
    for a in orders:
        rdp = rounds * rdp_sampled_gaussian(sampling_rate, noise_multiplier, a)
        if math.isinf(rdp):
            continue
        eps = rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


def noise_for_epsilon(
    target_epsilon: float, *, sampling_rate: float, rounds: int, delta: float
) -> float:
    """The smallest noise multiplier (to 0.1%) whose epsilon is at most ``target_epsilon``.

    Raises:
        ValueError: ``target_epsilon`` is not positive.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    low, high = 0.0, 1.0
    while (
        epsilon(noise_multiplier=high, sampling_rate=sampling_rate, rounds=rounds, delta=delta)
        > target_epsilon
    ):
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon}")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        eps = epsilon(noise_multiplier=mid, sampling_rate=sampling_rate, rounds=rounds, delta=delta)
        if eps > target_epsilon:
            low = mid
        else:
            high = mid
    return high
