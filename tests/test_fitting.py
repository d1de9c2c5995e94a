"""bsbr.fitting: the log-log power-law fit recovers exact power laws, matches a hand fit, rejects bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bsbr.fitting import fit_power_law


@pytest.mark.parametrize("exponent, prefactor", [(2.0, 3e-9), (1.0, 0.5), (1.37, 42.0), (-0.5, 7.0)])
def test_fit_power_law_recovers_exact_power_law(exponent, prefactor):
    seq_lens = [256, 512, 1024, 2048, 4096, 8192, 16384]
    times = [prefactor * n**exponent for n in seq_lens]
    k, a, r2 = fit_power_law(seq_lens, times)
    assert k == pytest.approx(exponent, abs=1e-10)
    assert a == pytest.approx(prefactor, rel=1e-9)
    assert r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_power_law_matches_a_hand_computed_two_point_fit_and_r2_drops_with_noise():
    k, a, r2 = fit_power_law([100, 400], [1.0, 16.0])
    assert (k, a, r2) == (pytest.approx(2.0), pytest.approx(1e-4), pytest.approx(1.0))
    rng = np.random.default_rng(0)
    n = np.array([2**i for i in range(6, 15)], dtype=float)
    noisy = 1e-6 * n**1.5 * np.exp(rng.normal(0, 0.3, n.size))
    k, _, r2 = fit_power_law(n, noisy)
    assert abs(k - 1.5) < 0.2 and 0.8 < r2 < 1.0


@pytest.mark.parametrize("seq_lens, times", [([1, 2, 3], [1, 2]), ([4, 4], [1, 2]), ([0, 2], [1, 2]),
                                             ([1, 2], [1, -2]), ([1, 2], [1, math.nan]), ([[1, 2]], [[1, 2]])])
def test_fit_power_law_rejects_bad_input(seq_lens, times):
    with pytest.raises(ValueError):
        fit_power_law(seq_lens, times)
