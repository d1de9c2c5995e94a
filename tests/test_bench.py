"""bsbr.bench: exact power-law fits, per-point subprocess measurements, machine header. No timing is asserted."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bsbr.bench import fit_power_law, git_revision, machine_info, measure_forward

TINY = dict(vocab_size=64, hidden_dim=256, num_layers=1, num_heads=4, ff_dim=1024)


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


def test_machine_info_header():
    info = machine_info(threads=3)
    assert set(info) == {"cpu", "cores", "torch", "threads", "python", "platform"}
    assert info["threads"] == 3 and info["cores"] >= 1 and info["cpu"]
    import torch

    assert info["torch"] == torch.__version__
    revision = git_revision()
    assert revision == "unknown" or len(revision.removesuffix("+dirty")) == 40


def test_measure_forward_in_fresh_subprocesses():
    small = measure_forward("standard", TINY, 64, repeats=2, warmup=1, threads=1)
    large = measure_forward("standard", TINY, 4096, repeats=1, warmup=0, threads=1)
    for result, n, repeats in ((small, 64, 2), (large, 4096, 1)):
        assert (result["model"], result["seq_len"], result["repeats"], result["threads"]) == ("standard", n, repeats, 1)
        assert len(result["times_s"]) == repeats and all(t > 0 for t in result["times_s"])
        assert result["min_s"] <= result["median_s"] <= result["max_s"]
        assert result["baseline_rss_bytes"] > 10 * 2**20  # Python + torch are resident
        assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"]
        assert result["peak_bytes"] == result["peak_rss_bytes"] - result["baseline_rss_bytes"] >= 0
    # 4096 tokens hold a [4096, 1024] fp32 feed-forward activation (16 MiB) that 64 tokens do not need.
    assert large["peak_bytes"] > small["peak_bytes"] + 8 * 2**20
    # Each point is its own process: the baseline is not inflated by this (pytest) process's peak.
    assert abs(large["baseline_rss_bytes"] - small["baseline_rss_bytes"]) < 64 * 2**20


def test_measure_forward_bsbr_takes_its_own_settings():
    result = measure_forward("bsbr", {**TINY, "chunk_size": 16}, 48, repeats=1, warmup=0, threads=1)
    assert result["model"] == "bsbr" and result["seq_len"] == 48 and result["median_s"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope"), "name"),
    (dict(seq_len=0), "seq_len"),
    (dict(repeats=0), "repeats"),
    (dict(warmup=-1), "warmup"),
    (dict(batch_size=1.5), "batch_size"),
    (dict(threads=0), "threads"),
    (dict(config={"hidden_dim": 8}), "vocab_size"),
])
def test_measure_forward_rejects_bad_arguments_before_running(kwargs, match):
    args = dict(name="standard", config=TINY, seq_len=16) | kwargs
    with pytest.raises(ValueError, match=match):
        measure_forward(**args)


def test_measure_forward_reports_a_failing_subprocess():
    with pytest.raises(RuntimeError, match="chunk_size"):  # standard attention does not take chunk_size
        measure_forward("standard", {**TINY, "chunk_size": 16}, 16, repeats=1, warmup=0, threads=1)
