"""bsbr.intervals: block sums against a loop, the statistic against a hand computation, paired ratios, errors."""

import math

import numpy as np
import pytest
import torch

from bsbr.intervals import block_sums, bootstrap_table, paired_ratio, perplexity_interval


def _nll(windows=4, positions=300, seed=0):
    return torch.rand(windows, positions, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4


def test_block_sums_match_a_loop_with_a_partial_last_block():
    nll = _nll(3, 150)
    sums, counts = block_sums(nll, 64)
    expected = [(nll[w, s : s + 64].sum().item(), min(64, 150 - s)) for w in range(3) for s in range(0, 150, 64)]
    assert np.allclose(sums, [e[0] for e in expected], atol=1e-12)
    assert list(counts) == [e[1] for e in expected] == [64, 64, 22] * 3


def test_point_estimate_is_the_perplexity_and_the_interval_holds_it():
    nll = _nll()
    ppl, low, high = perplexity_interval(nll, resamples=500)
    assert ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-12)
    assert low < ppl < high


def test_constant_losses_give_a_zero_width_interval():
    nll = torch.full((2, 100), 1.5, dtype=torch.float64)
    ppl, low, high = perplexity_interval(nll, resamples=200)
    assert ppl == low == high == pytest.approx(math.exp(1.5))


def test_correlated_losses_widen_the_block_interval():
    # each window's loss is a constant drawn per 64-token stretch: single-token resampling sees 64× more
    # independent tokens than there are, a 64-token block resampling does not
    rng = np.random.default_rng(1)
    nll = np.repeat(rng.exponential(2.0, size=(8, 32)), 64, axis=1)  # [8, 2048]
    _, low1, high1 = perplexity_interval(nll, block_size=1, resamples=1000)
    _, low64, high64 = perplexity_interval(nll, block_size=64, resamples=1000)
    assert (high64 - low64) > 4 * (high1 - low1)


def test_paired_ratio_of_a_variant_with_itself_plus_a_shift_is_exact():
    nll = _nll()
    ratio, low, high = paired_ratio(nll + 0.1, nll, resamples=300)
    assert ratio == pytest.approx(math.exp(0.1)) and low == pytest.approx(math.exp(0.1))
    assert high == pytest.approx(math.exp(0.1))


def test_paired_interval_is_narrower_than_the_separate_ones():
    nll = _nll(8, 512)
    other = nll + 0.05 + 0.1 * _nll(8, 512, seed=3)
    _, low_a, high_a = perplexity_interval(other, resamples=500)
    ratio, low, high = paired_ratio(other, nll, resamples=500)
    assert 1 < low < ratio < high  # the shift is separated
    ppl_b = math.exp(nll.mean().item())
    assert (high - low) * ppl_b < (high_a - low_a) / 2


def test_bootstrap_table_rows_agree_with_the_functions():
    nll = {"original": _nll(), "variant": _nll(seed=5)}
    table = bootstrap_table(nll, "original", resamples=400, seed=7).set_index("variant")
    assert list(table.index) == ["original", "variant"]
    assert table.loc["original", ["ratio", "ratio_low", "ratio_high"]].tolist() == [1.0, 1.0, 1.0]
    assert table.loc["variant", "ppl"] == pytest.approx(math.exp(nll["variant"].mean().item()))
    assert table.loc["variant", "ratio"] == pytest.approx(paired_ratio(nll["variant"], nll["original"])[0])
    assert tuple(table.loc["variant", ["ppl", "ppl_low", "ppl_high"]]) == pytest.approx(
        perplexity_interval(nll["variant"], resamples=400, seed=7))
    assert (table.tokens == 4 * 300).all()


def test_same_seed_same_interval():
    nll = _nll()
    assert perplexity_interval(nll, seed=3, resamples=300) == perplexity_interval(nll, seed=3, resamples=300)


@pytest.mark.parametrize("call, match", [
    (lambda: perplexity_interval(torch.zeros(5)), "windows, positions"),
    (lambda: perplexity_interval(torch.zeros(0, 4)), "windows, positions"),
    (lambda: perplexity_interval(torch.tensor([[1.0, float("nan")]])), "NaN"),
    (lambda: perplexity_interval(torch.ones(2, 4), block_size=0), "block_size"),
    (lambda: perplexity_interval(torch.ones(2, 4), resamples=0), "resamples"),
    (lambda: perplexity_interval(torch.ones(2, 4), confidence=1.0), "confidence"),
    (lambda: paired_ratio(torch.ones(2, 4), torch.ones(2, 5)), "same positions"),
    (lambda: bootstrap_table({"a": torch.ones(2, 4)}, "original"), "reference 'original'"),
    (lambda: bootstrap_table({}, "original"), "reference"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
