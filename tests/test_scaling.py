"""bsbr.scaling: the tables of the scaling notebook, on small hand-made measurements with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bsbr.scaling import (attention_metrics, check_target, crossover, crossover_text, extrapolate_times, find_fit,
                          layer_fits, layer_metrics, layer_targets, layer_targets_text, leader,
                          memory_curves,
                          memory_growth, model_comparison, model_comparison_metrics, model_comparison_text,
                          model_fits, model_headline, module_time_split, operator_ratios, parameter_counts,
                          power_law_fits, rounded, scaling_parameters, speed_memory_targets, targets_text,
                          targets_view, upper_half, value_at, who_wins)
from tests.conftest import SCALING_SMOKE


def attention_table(points):
    """Forward/backward points ``(impl, mode, seq_len, median_s, peak_bytes)``, GFLOP/s = 1e9 / seq_len."""
    return pd.DataFrame([dict(impl=i, mode=m, seq_len=n, median_s=t, peak_bytes=b, gflops_per_s=1e9 / n, mean_s=t,
                              min_s=t, max_s=t, median_low_s=t, median_high_s=t) for i, m, n, t, b in points])


def exact_attention():
    """BSBR linear in n (module 1e-5·n s, core 0.25e-5·n), full attention quadratic (module 1e-8·n² s, core half of
    it) run up to 256 tokens only."""
    rows = []
    for mode, scale in (("forward", 1), ("backward", 3)):
        for n in (64, 128, 256, 512, 1024):
            rows.append(("bsbr", mode, n, scale * 1e-5 * n, 1000 * n))
            rows.append(("bsbr_core", mode, n, scale * 0.25e-5 * n, 500 * n))
            if n <= 256:
                rows.append(("standard", mode, n, scale * 1e-8 * n * n, 2000 * n))
                rows.append(("sdpa_core", mode, n, scale * 0.5e-8 * n * n, 1000 * n))
    return attention_table(rows)


LENS = [64, 128, 256, 512, 1024]


def test_upper_half_and_power_law_fits_recover_exact_exponents():
    assert upper_half([4, 1, 3, 2]) == [3, 4] and upper_half([3, 1, 2]) == [1, 2, 3]
    table = pd.DataFrame({"model": ["a"] * 4 + ["b"] * 4, "seq_len": [1, 2, 4, 8] * 2,
                          "median_s": [3 * n**2 for n in (1, 2, 4, 8)] + [0.5 * n for n in (1, 2, 4, 8)]})
    fits = power_law_fits(table, ["model"])
    assert list(zip(fits.model, fits.lengths, fits.first_len, fits.last_len)) == [
        ("a", "upper half", 4, 8), ("a", "all", 1, 8), ("b", "upper half", 4, 8), ("b", "all", 1, 8)]
    assert fits.exponent.tolist() == pytest.approx([2, 2, 1, 1])
    assert fits.prefactor.tolist() == pytest.approx([3, 3, 0.5, 0.5]) and fits.r2.tolist() == pytest.approx([1] * 4)
    assert find_fit(fits, model="b").exponent == pytest.approx(1) and find_fit(fits, model="c") is None


def test_power_law_fits_skip_non_positive_values_and_single_lengths():
    table = pd.DataFrame({"impl": ["x"] * 3 + ["y"], "seq_len": [1, 2, 4, 1], "peak_bytes": [0, 8, 32, 5]})
    fits = power_law_fits(table, ["impl"], "peak_bytes")
    assert fits.impl.tolist() == ["x", "x"]  # y: one length; x: the 0 byte point left out
    assert fits.first_len.tolist() == [2, 2] and fits.exponent.tolist() == pytest.approx([2, 2])


def test_model_fits_and_headline():
    results = pd.DataFrame([dict(model=m, seq_len=n, median_s=k * n, min_s=k * n, max_s=k * n, peak_bytes=int(k * n * n),
                                 baseline_rss_bytes=7) for m, k in (("bsbr", 1.0), ("standard", 2.0))
                            for n in (10, 20, 40, 80)])
    fits = model_fits(results)
    assert list(fits.columns) == ["model", "quantity", "lengths", "first_len", "last_len", "exponent", "prefactor", "r2"]
    assert list(zip(fits.quantity, fits.model, fits.lengths))[:2] == [("time", "bsbr", "upper half"), ("time", "bsbr", "all")]
    assert fits[fits.quantity == "memory"].exponent.tolist() == pytest.approx([2, 2, 2, 2])
    entry = model_headline(results, fits, "standard", 80)
    assert entry == {"median_s": 160.0, "min_s": 160.0, "max_s": 160.0, "peak_bytes": 12800, "baseline_rss_bytes": 7,
                     "time_exponent": 1.0, "time_r2": 1.0, "time_exponent_all": 1.0, "time_r2_all": 1.0,
                     "memory_exponent": 2.0, "memory_r2": 1.0, "memory_exponent_all": 2.0, "memory_r2_all": 1.0}


def test_leader_and_crossover_use_the_tie_tolerance():
    assert [leader(r, 0.2) for r in (1.21, 1.2, 1.0, 1 / 1.2, 0.8)] == ["BSBR", "tie", "tie", "tie", "standard"]
    assert leader(0.5, 0.2, slower="full attention") == "full attention"
    ratio = pd.Series([2.0, 0.9, 1.3, 1.5], index=[1, 2, 4, 8])
    assert crossover(ratio, 0.2) == 4  # leads at 1, but not at 2
    assert crossover(ratio, 0.4) == 8
    assert crossover(pd.Series([1.0, 1.1], index=[1, 2]), 0.2) is None


def test_model_comparison_ratios_verdicts_text_and_metrics():
    results = pd.DataFrame([dict(model=m, seq_len=n, median_s=t, peak_bytes=b)
                            for m, n, t, b in (("bsbr", 64, 2.0, 0), ("bsbr", 128, 2.0, 2**20),
                                               ("standard", 64, 1.0, 2**20), ("standard", 128, 4.0, 2**21))])
    comparison = model_comparison(results, 0.2)
    assert comparison.time_ratio.tolist() == [0.5, 2.0]
    assert math.isnan(comparison.memory_ratio.loc[64]) and comparison.memory_ratio.loc[128] == 2.0
    assert comparison.faster.tolist() == ["standard", "BSBR"] and comparison.less_memory.tolist() == ["n/a", "BSBR"]
    assert model_comparison_metrics(comparison, 0.2) == {
        "time_ratio_standard_over_bsbr": 2.0, "memory_ratio_standard_over_bsbr": 2.0, "time_crossover_seq_len": 128,
        "memory_crossover_seq_len": 128, "tie_tolerance": 0.2}
    fits = pd.DataFrame([dict(model="bsbr", quantity="time", lengths="upper half", exponent=1.0, r2=1.0),
                         dict(model="standard", quantity="time", lengths="upper half", exponent=2.0, r2=0.99)])
    text = model_comparison_text(comparison, fits, 0.2)
    assert "**2.00× faster**" in text and "from **128 tokens** on" in text
    assert "standard attention is faster at 64 tokens" in text and "BSBR k = 1.00" in text and "uses **less** memory" in text


def test_extrapolated_times_who_wins_and_the_time_split():
    attention = exact_attention()
    fits = power_law_fits(attention, ["impl", "mode"])
    times = extrapolate_times(attention, ["bsbr", "standard", "bsbr_core", "sdpa_core"], LENS, fits)
    assert len(times) == 2 * 4 * 5
    standard = times[(times.impl == "standard") & (times["mode"] == "forward")].set_index("seq_len")
    assert standard.source.tolist() == ["measured"] * 3 + ["extrapolated"] * 2
    assert standard.median_s.loc[1024] == pytest.approx(1e-8 * 1024**2)  # the exact power law, continued
    wins = who_wins(times, LENS, 0.2)
    assert list(zip(wins.level, wins["mode"]))[::5] == [("core", "backward"), ("core", "forward"),
                                                        ("module", "backward"), ("module", "forward")]
    module = wins[(wins.level == "module") & (wins["mode"] == "forward")]
    assert module.ratio.tolist() == pytest.approx([1e-3 * n for n in LENS])  # 1e-8 n² / 1e-5 n
    assert module.winner.tolist() == ["full attention"] * 4 + ["tie"]  # 1.024 at 1024 tokens
    crossovers = {f"{l}_{m}": crossover(g.set_index("seq_len").ratio, 0.2) for (l, m), g in wins.groupby(["level", "mode"])}
    assert crossovers == {"core_backward": 1024, "core_forward": 1024, "module_backward": None, "module_forward": None}
    text = crossover_text(wins, crossovers, 0.2)
    assert "* **core forward+backward**: BSBR leads from **1024 tokens** on; at 1024 tokens full attention / BSBR = " \
           "**2.05×** (full attention extrapolated)." in text
    assert "* **module forward**: no crossover" in text
    split = module_time_split(times, LENS)
    assert split.bsbr_outside_core_s.tolist() == pytest.approx([0.75e-5 * n for n in LENS])
    assert split.ratio_if_bsbr_core_were_free.tolist() == pytest.approx([1e-3 * n / 0.75 for n in LENS])
    assert split.full_source.tolist() == ["measured"] * 3 + ["extrapolated"] * 2


def test_speed_memory_targets_values_statuses_and_not_measured():
    attention = exact_attention()
    times = extrapolate_times(attention, ["bsbr", "standard", "bsbr_core", "sdpa_core"], LENS,
                              power_law_fits(attention, ["impl", "mode"]))
    decode = pd.DataFrame({"impl": ["bsbr", "bsbr"], "position": [64, 1024], "median_s": [1.0, 1.2],
                           "median_low_s": [1.0, 1.2], "median_high_s": [1.0, 1.2]})
    targets = speed_memory_targets(attention, times, decode, 1e9 / 256 / 0.25, [256, 1024], [1024, 64])
    assert targets.target.tolist() == ["module_forward_speedup_256", "module_forward_speedup_1024",
                                       "core_gap_larger_1024", "bsbr_forward_peak_memory_1024",
                                       "bsbr_memory_growth_256_1024", "bsbr_decode_latency_1024_vs_64",
                                       "bsbr_matmul_fraction_256"]
    assert targets.value.tolist() == pytest.approx([0.256, 1.024, 2.048, 1.024e-3, 1.0, 1.2, 0.25])
    assert targets.threshold.tolist() == pytest.approx([5.0, 20.0, 1.024, 1.5, 1.1, 1.5, 0.3])
    assert targets.extrapolated.tolist() == [False, True, True, False, False, False, False]
    assert targets.status.tolist() == ["FAIL", "FAIL", "pass", "pass", "pass", "pass", "FAIL"]
    view = targets_view(targets)
    assert view.measured.iloc[1] == "1.02 × (extrapolated)" and view.required.iloc[3] == "≤ 1.5 GB"
    assert targets_text(targets, [256, 1024], [64, 1024]).startswith(
        "BSBR's speed and memory targets: **4 of 7 pass**; **3 fail**")
    missing = speed_memory_targets(attention, times, decode.iloc[:1], 1.0, [256, 2048], [64, 4096])
    assert missing.set_index("target").status.to_dict()["bsbr_forward_peak_memory_2048"] == "not measured"
    assert "not measured in this profile" in targets_text(missing, [256, 2048], [64, 4096])


def test_time_targets_are_undecided_when_the_medians_intervals_straddle_the_goal():
    """standard / BSBR at 256 tokens: median 5.12× (1e-8·256² / 1e-5·256 · 20); the medians' intervals decide."""
    attention = exact_attention()
    attention.loc[attention.impl == "standard", "median_s"] *= 20
    attention["median_low_s"], attention["median_high_s"] = attention.median_s * 0.9, attention.median_s * 1.1
    attention["min_s"], attention["max_s"] = attention.median_s * 0.5, attention.median_s * 9  # outliers: not used
    times = extrapolate_times(attention, ["bsbr", "standard", "bsbr_core", "sdpa_core"], LENS,
                              power_law_fits(attention, ["impl", "mode"]))
    extrapolated_point = times.set_index(["mode", "impl", "seq_len"]).loc[("forward", "standard", 1024)]
    assert pd.isna(extrapolated_point.median_low_s) and pd.isna(extrapolated_point.median_high_s)
    decode = pd.DataFrame({"impl": ["bsbr", "bsbr"], "position": [64, 1024], "median_s": [1.0, 1.2],
                           "median_low_s": [0.9, 1.0], "median_high_s": [1.1, 1.4], "min_s": [0.1, 0.1],
                           "max_s": [50.0, 50.0]})
    targets = speed_memory_targets(attention, times, decode, 1.0, [256, 1024], [64, 1024]).set_index("target")
    speedup = targets.loc["module_forward_speedup_256"]
    assert speedup.value == pytest.approx(5.12)
    assert (speedup.low, speedup.high) == pytest.approx((5.12 * 0.9 / 1.1, 5.12 * 1.1 / 0.9))
    assert speedup.status == "undecided" and speedup.passed is None  # 4.19 … 6.26 straddles 5
    latency = targets.loc["bsbr_decode_latency_1024_vs_64"]  # 1.0/1.1 … 1.4/0.9 = 0.909 … 1.556 straddles 1.5
    assert (latency.low, latency.high) == pytest.approx((1.0 / 1.1, 1.4 / 0.9)) and latency.status == "undecided"
    extrapolated = targets.loc["module_forward_speedup_1024"]  # no calls at 1024: judged by its value, flagged
    assert extrapolated.extrapolated and pd.isna(extrapolated.low) and extrapolated.status == "pass"
    view = targets_view(targets.reset_index())
    assert view.measured.iloc[0] == "5.12 × [4.19, 6.26]" and view.status.iloc[0] == "undecided"
    text = targets_text(targets.reset_index(), [256, 1024], [64, 1024])
    assert "**2 undecided at this noise**" in text and "BSBR decode: median time per token" in text
    # a narrower spread decides the same median both ways
    attention["median_low_s"], attention["median_high_s"] = attention.median_s * 0.99, attention.median_s * 1.01
    times = extrapolate_times(attention, ["bsbr", "standard", "bsbr_core", "sdpa_core"], LENS,
                              power_law_fits(attention, ["impl", "mode"]))
    assert speed_memory_targets(attention, times, decode, 1.0, [256, 1024], [64, 1024]).status.iloc[0] == "pass"
    attention.loc[attention.impl == "standard", ["median_s", "median_low_s", "median_high_s"]] *= 0.9  # 4.61×
    times = extrapolate_times(attention, ["bsbr", "standard", "bsbr_core", "sdpa_core"], LENS,
                              power_law_fits(attention, ["impl", "mode"]))
    assert speed_memory_targets(attention, times, decode, 1.0, [256, 1024], [64, 1024]).status.iloc[0] == "FAIL"


def test_check_target_ranges_against_a_measured_threshold():
    assert check_target("a", "", 2.0, "≥", 1.5, low=1.6, high=2.4)["status"] == "pass"
    assert check_target("a", "", 2.0, "≥", 2.5, low=1.6, high=2.4)["status"] == "FAIL"
    assert check_target("a", "", 2.0, "≤", 2.5, low=1.6, high=2.4)["status"] == "pass"
    assert check_target("a", "", 2.0, "≤", 1.5, low=1.6, high=2.4)["status"] == "FAIL"
    assert check_target("a", "", 2.0, "≤", 2.0, low=1.6, high=2.4)["status"] == "undecided"
    # "cores above the modules": both sides measured, each with its range
    assert check_target("a", "", 3.0, ">", 2.0, low=2.6, high=3.4, threshold_low=1.8, threshold_high=2.2)["passed"]
    gap = check_target("a", "", 3.0, ">", 2.0, low=2.6, high=3.4, threshold_low=1.8, threshold_high=2.7)
    assert gap["status"] == "undecided" and (gap["low"], gap["high"]) == (2.6, 3.4)
    assert check_target("a", "", 3.0, ">", 4.0, low=2.6, high=3.4, threshold_low=3.5,
                        threshold_high=4.5)["status"] == "FAIL"
    with pytest.raises(ValueError, match="low and high must be given together"):
        check_target("a", "", 2.0, "≥", 1.5, low=1.6)


def test_check_target_comparisons_and_bad_comparison():
    assert check_target("a", "", 2.0, ">", 2.0)["status"] == "FAIL"
    assert check_target("a", "", 2.0, "≥", 2.0)["passed"] is True
    assert check_target("a", "", None, "≤", 1.0)["status"] == "not measured"
    with pytest.raises(ValueError, match="comparison"):
        check_target("a", "", 1.0, "<", 2.0)


def test_operator_ratios_layer_fits_and_layer_targets():
    operators = pd.DataFrame([dict(impl=i, seq_len=64, median_s=t) for i, t in (
        ("delta_chunkwise", 0.002), ("delta_recurrent", 0.05), ("linear_chunkwise", 0.001), ("linear_recurrent", 0.004))])
    view = operator_ratios(operators, [64])
    assert view.iloc[0].to_dict() == pytest.approx({
        "seq_len": 64, "delta_chunkwise_ms": 2.0, "delta_recurrent_ms": 50.0, "linear_chunkwise_ms": 1.0,
        "linear_recurrent_ms": 4.0, "delta_recurrent_over_chunkwise": 25.0, "linear_recurrent_over_chunkwise": 4.0,
        "delta_over_linear_chunkwise": 2.0})
    layers = pd.DataFrame([dict(impl=i, seq_len=n, median_s=1e-3 * n**k, peak_bytes=b * n * n)
                           for i, k, b in (("bsbr", 1, 1), ("hopfield", 2, 8), ("standard", 2, 100))
                           for n in (32, 64, 128, 256)])
    fits = layer_fits(layers)
    assert fits.impl.tolist() == ["bsbr", "hopfield", "standard"] and fits.first_len.tolist() == [128] * 3
    assert fits.time_exponent.tolist() == pytest.approx([1, 2, 2])
    targets = layer_targets(view, layers, 64)
    assert list(targets.columns) == ["target", "description", "value", "comparison", "threshold", "unit", "status",
                                     "passed"]
    assert targets.target.tolist() == ["delta_chunkwise_speedup_64", "delta_vs_linear_64", "no_nxn_bsbr",
                                       "no_nxn_hopfield"]
    assert targets.value.tolist() == pytest.approx([25.0, 2.0, 0.25, 2.0])
    assert targets.status.tolist() == ["pass", "pass", "pass", "FAIL"]
    assert layer_targets_text(targets).startswith(
        "**Operator and memory targets missed:** hopfield forward peak at 256 tokens")
    assert layer_targets_text(targets.iloc[:3]) == "All operator and memory targets pass."
    decode = pd.DataFrame({"impl": ["bsbr"], "position": [32], "median_s": [1.23456789e-4]})
    metrics = layer_metrics(layers, fits, decode, view, targets)
    assert metrics["forward_peak_bytes"]["hopfield"]["256"] == 8 * 256 * 256
    assert metrics["decode_median_s"] == {"bsbr": {"32": 0.0001235}}
    assert metrics["targets"]["no_nxn_hopfield"] == {"value": 2.0, "threshold": 1.0, "comparison": "≤", "status": "FAIL"}


def test_memory_curves_and_growth():
    attention = exact_attention()
    models = pd.DataFrame({"model": ["bsbr"] * 3, "seq_len": [200, 100, 400], "peak_bytes": [400, 100, 1600]})
    curves = memory_curves(attention, models, ["bsbr", "bsbr_core"], ["bsbr"], 2)
    assert list(curves) == ["bsbr forward", "bsbr_core forward", "bsbr forward+backward", "bsbr model (2 layers)"]
    assert curves["bsbr model (2 layers)"][0].tolist() == [100, 200, 400] and curves["bsbr forward"][2:] == ("bsbr", "-")
    growth = memory_growth({"bsbr model": curves["bsbr model (2 layers)"], "zero": ([1, 2], [0, 5])})
    assert growth.growth_vs_linear.iloc[:2].tolist() == [2.0, 2.0] and math.isnan(growth.growth_vs_linear.iloc[2])
    assert growth.to_MiB.iloc[0] == 400 / 2**20


def test_attention_metrics_sections():
    attention = exact_attention()
    times = extrapolate_times(attention, ["bsbr", "standard", "bsbr_core", "sdpa_core"], LENS,
                              power_law_fits(attention, ["impl", "mode"]))
    wins = who_wins(times, LENS, 0.2)
    decode = pd.DataFrame({"impl": ["bsbr"], "position": [64], "median_s": [1e-3], "mean_s": [2e-3],
                           "state_bytes": [4096]})
    targets = pd.DataFrame([check_target("t", "", 1.23456, "≥", 1.0, True, "×")])
    metrics = attention_metrics(attention, wins, {"module_forward": None}, decode, targets, 1234.5678, 1024,
                                {"hidden_dim": 8}, 0.2)
    assert metrics["at_longest"]["module_forward_ratio"] == pytest.approx(1.024)
    assert metrics["at_longest"]["module_forward_full_extrapolated"] is True
    assert metrics["at_longest"]["bsbr_backward_s"] == pytest.approx(0.03072)
    assert metrics["at_longest"]["bsbr_forward_peak_bytes"] == 1024000
    assert metrics["matmul_gflops_per_s"] == 1234.57 and metrics["longest_seq_len"] == 1024
    assert metrics["bsbr_forward_gflops_fraction_of_matmul"]["64"] == rounded(1e9 / 64 / 1234.5678)
    assert metrics["decode"] == {"bsbr": {"64": {"median_s": 0.001, "mean_s": 0.002, "state_bytes": 4096}}}
    assert metrics["targets"] == {"t": {"value": 1.2346, "threshold": 1.0, "comparison": "≥", "extrapolated": True,
                                        "status": "pass"}}


def test_value_at_rounded_and_parameter_counts():
    table = pd.DataFrame({"impl": ["a", "b"], "seq_len": [1, 2], "x": [3, 4]})
    assert value_at(table, "x", impl="b", seq_len=2) == 4.0 and value_at(table, "x", impl="c") is None
    assert rounded(None) is None and rounded(np.nan) is None and rounded(1.23456, 2) == 1.23
    common = dict(vocab_size=16, hidden_dim=8, num_layers=1, num_heads=2, ff_dim=16, dropout=0.0)
    counts = parameter_counts({"standard": common, "bsbr": {**common, "chunk_size": 4}})
    assert counts.model.tolist() == ["bsbr", "standard"]
    # standard: embedding 16·8, per layer 4 projections (8·8 + 8) + two layer norms + feed-forward, final norm
    attention = 4 * (8 * 8 + 8)
    assert counts.set_index("model").attention_parameters_per_layer.loc["standard"] == attention
    assert counts.set_index("model").vs_standard.loc["standard"] == 1.0
    assert counts.set_index("model").parameters.loc["bsbr"] > counts.set_index("model").parameters.loc["standard"]


def test_scaling_parameters_normalise_and_name_bad_values():
    params = {**SCALING_SMOKE, "seq_lens": [128, 64, 64], "attn_impls": ["sdpa_core", "bsbr"], "out_dir": "x",
              "metrics_path": "y", "tie_tolerance": 0.2, "max_timed_s": 1.0}
    checked = scaling_parameters(params)
    assert checked["seq_lens"] == [64, 128] and checked["attn_impls"] == ["bsbr", "sdpa_core"]
    assert checked["decode_impls"] == ["bsbr"] and checked["full_max_len"] == {"forward": 64, "backward": 64}
    assert checked["configs"]["bsbr"]["chunk_size"] == 32 and "chunk_size" not in checked["configs"]["standard"]
    for key, bad, match in (("models", ["nope"], "models"), ("seq_lens", [64], "seq_lens"),
                            ("attn_impls", ["x"], "attn_impls"), ("baseline_impls", ["bsbr"], "baseline_impls"),
                            ("operator_target_seq_len", 128, "operator_target_seq_len"), ("hidden_dim", 0, "hidden_dim"),
                            ("warmup", -1, "warmup"), ("repeats", True, "repeats")):
        with pytest.raises(ValueError, match=match):
            scaling_parameters({**params, key: bad})


def test_module_time_split_text_prints_three_significant_digits():
    from bsbr.scaling import module_time_split_text

    split = pd.DataFrame([{"seq_len": 65536, "bsbr_module_s": 0.004212, "bsbr_core_s": 0.0031, "bsbr_outside_core_s": 0.001112,
                           "outside_share": 0.264, "full_module_s": 12.34, "full_source": "measured", "full_core_s": 12.0,
                           "module_ratio": 2929.7, "ratio_if_bsbr_core_were_free": 11097.0}])
    assert module_time_split_text(split) == (
        "At 65,536 tokens the BSBR module takes 0.00421 s, of which the core is 0.00310 s and the rest (mostly the four "
        "projections) 0.00111 s (26%); full attention's module takes 12.3 s (measured). The module ratio is 2,930×; "
        "with a BSBR core of zero cost it would be at most 11,100×.")
    assert module_time_split_text(split.iloc[:0]) == ""
