"""The RDP accountant of client-level DP: closed forms, monotonicity, calibration."""

from __future__ import annotations

import math

import pytest

from coordinator.federation.accountant import epsilon, noise_for_epsilon, rdp_sampled_gaussian


def test_full_participation_is_the_gaussian_mechanisms_closed_form() -> None:
    for z in (0.5, 1.0, 3.0):
        for a in (2, 7, 32):
            assert rdp_sampled_gaussian(1.0, z, a) == pytest.approx(a / (2 * z * z))


def test_subsampling_at_order_two_matches_its_closed_form() -> None:
    # a = 2: sum_k C(2,k)(1-q)^(2-k) q^k e^{(k^2-k)/(2z^2)} = 1 - q^2 + q^2 e^{1/z^2}.
    q, z = 0.1, 1.3
    expected = math.log((1 - q) ** 2 + 2 * q * (1 - q) + q * q * math.exp(1 / z**2))
    assert rdp_sampled_gaussian(q, z, 2) == pytest.approx(expected)


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise() -> None:
    def eps(z: float, q: float, t: int) -> float:
        return epsilon(noise_multiplier=z, sampling_rate=q, rounds=t, delta=1e-5)

    assert eps(1.0, 1.0, 1) < eps(1.0, 1.0, 5)
    assert eps(1.0, 0.01, 100) < eps(1.0, 0.1, 100) < eps(1.0, 1.0, 100)
    assert eps(2.0, 1.0, 5) < eps(1.0, 1.0, 5)
    assert math.isinf(eps(0.0, 1.0, 5))
    assert eps(1.0, 0.0, 5) < 0.01  # nobody sampled: only the conversion term remains


def test_a_known_dp_sgd_setting_lands_where_published_accountants_put_it() -> None:
    # Abadi et al.'s MNIST setting (q = 256/60000, z = 1.1, 60 epochs, delta 1e-5): RDP
    # accountants report about 2.9 with the classic conversion; the tighter conversion
    # used here gives a little less.
    steps = int(60 * 60000 / 256)
    value = epsilon(noise_multiplier=1.1, sampling_rate=256 / 60000, rounds=steps, delta=1e-5)
    assert 2.3 < value < 3.0


def test_calibrated_noise_reaches_the_target_epsilon() -> None:
    for target in (2.0, 8.0):
        z = noise_for_epsilon(target, sampling_rate=1.0, rounds=5, delta=1e-5)
        reached = epsilon(noise_multiplier=z, sampling_rate=1.0, rounds=5, delta=1e-5)
        assert reached <= target
        assert reached > 0.99 * target


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="sampling rate"):
        rdp_sampled_gaussian(1.5, 1.0, 2)
    with pytest.raises(ValueError, match="order"):
        rdp_sampled_gaussian(0.5, 1.0, 1)
    with pytest.raises(ValueError, match="delta"):
        epsilon(noise_multiplier=1.0, sampling_rate=1.0, rounds=1, delta=0.0)
    with pytest.raises(ValueError, match="target epsilon"):
        noise_for_epsilon(0.0, sampling_rate=1.0, rounds=1, delta=1e-5)
