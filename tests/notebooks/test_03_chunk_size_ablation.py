"""Notebook 03 (chunk size × state compression of the terraced conversion) runs through the pipeline runner with smoke
parameters on the embedded SmolLM2 and writes consistent, checkable tables and metrics."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tests.conftest import ROOT, run_notebook_smoke

# The notebook's own defaults shrunk further (params.yaml holds the full profile, so every key is overridden).
SMOKE = {"seq_len": 256, "windows_per_source": 1, "chunk_sizes": [32, 64], "compression_factors": [None, 4],
         "sink_size": 4, "score_from": None, "calibration_steps": 1, "calibration_windows": 1,
         "state_tokens": [2048, 40960], "state_goal_chunk_size": 256, "state_goal_ratio": 0.3,
         "timing_seq_lens": [256], "timing_chunk_sizes": [32, 64], "timing_goal_min_chunk": 64, "timing_repeats": 2,
         "threads": 1}
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
KINDS = ["exact_region", "uncalibrated", "calibrated", "calibrated"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    for split in ("validation", "train"):
        if not (ROOT / "data" / "corpus" / f"{split}.jsonl").is_file():
            pytest.fail(f"notebook 03 needs data/corpus/{split}.jsonl: run `dvc repro prepare_corpus`")
    run = run_notebook_smoke(tmp_path_factory.mktemp("ablation"), "03_chunk_size_ablation", SMOKE)
    out = run["out"]
    return {**run, "quality": pd.read_csv(out / "quality.csv"), "state": pd.read_csv(out / "state.csv"),
            "timing": pd.read_csv(out / "layer_timing.csv"), "calibration": pd.read_csv(out / "calibration.csv")}


def terraced_bytes(tokens, chunk_size, feature_dim, sinks=SMOKE["sink_size"], retrieve=True):
    """TerracedState bytes of all layers after ``tokens`` tokens, written out from the shapes (fp32)."""
    p, previous = tokens % chunk_size, chunk_size if tokens >= chunk_size else 0
    per_layer = KV_HEADS * (2 * (p + previous + sinks) * HEAD_DIM + (2 * feature_dim * (HEAD_DIM + 1) if retrieve else 0))
    return 4 * LAYERS * per_layer


def test_one_row_per_configuration_sorted(ablation):
    quality = ablation["quality"]
    expected = [("original", 0, 0)] + [(kind, c, f) for c in SMOKE["chunk_sizes"]
                                       for kind, f in zip(KINDS, [0, 1, 1, 4])]
    assert list(zip(quality.kind, quality.chunk_size, quality.compression_factor)) == expected
    assert (quality.tokens == 2 * (SMOKE["seq_len"] - 1 - 2 * max(SMOKE["chunk_sizes"]))).all()  # 2 sources


def test_perplexities_carry_intervals_and_consistent_ratios(ablation):
    quality = ablation["quality"].set_index("variant")
    original = quality.loc["original"]
    assert 1 < original.ppl < 1000 and original.kl_to_original == 0 and original.top1_agreement == 1
    for name, row in quality.iterrows():
        assert row.ppl_low <= row.ppl <= row.ppl_high and row.vs_original_low <= row.vs_original <= row.vs_original_high
        assert row.vs_original == pytest.approx(row.ppl / original.ppl, rel=1e-5)
        if name == "original":
            continue
        exact = quality.loc[f"exact_region c{row.chunk_size}"]
        assert row.vs_exact_region == pytest.approx(row.ppl / exact.ppl, rel=1e-5)
        assert row.vs_exact_region_low <= row.vs_exact_region <= row.vs_exact_region_high
        assert row.kl_to_original > 1e-4 and 0 < row.top1_agreement < 1  # every variant retrieves or drops context
        assert row.gains_on_exact_region == (row.vs_exact_region_high < 1)
    assert (quality.loc[[f"exact_region c{c}" for c in SMOKE["chunk_sizes"]], "vs_exact_region"] == 1).all()


def test_measured_state_bytes_equal_the_formula(ablation):
    quality = ablation["quality"]
    n = SMOKE["seq_len"]
    for row in quality[quality.kind != "original"].itertuples():
        expected = terraced_bytes(n, row.chunk_size, row.feature_dim or HEAD_DIM, retrieve=row.kind != "exact_region")
        assert row.state_bytes_measured == row.state_bytes_formula == expected
    kv = 4 * LAYERS * 2 * KV_HEADS * HEAD_DIM * n
    assert (quality.kv_cache_bytes == kv).all()
    assert quality[quality.kind == "original"].state_bytes_measured.item() == kv


def test_state_table_and_goal(ablation):
    state, goal = ablation["state"], ablation["metrics"]["state_goal"]
    row = state[(state.tokens == 40960) & (state.chunk_size == 256) & (state.variant == "terraced")
                & (state.compression_factor == 1)].iloc[0]
    kv = 4 * LAYERS * 2 * KV_HEADS * HEAD_DIM * 40960
    assert row.state_bytes == terraced_bytes(40960, 256, HEAD_DIM) and row.kv_cache_bytes == kv
    assert goal == {"met": True, "chunk_size": 256, "tokens": 40960, "state_bytes": int(row.state_bytes),
                    "kv_cache_bytes": kv, "state_vs_kv_cache": pytest.approx(row.state_bytes / kv), "goal_ratio": 0.3}
    # compression shrinks the state; the exact region alone keeps no feature-space state
    at = state[(state.tokens == 2048) & (state.chunk_size == 64)].set_index(["variant", "compression_factor"])
    assert at.loc[("terraced", 4), "state_bytes"] < at.loc[("terraced", 1), "state_bytes"]
    assert at.loc[("exact_region", 0), "state_bytes"] == terraced_bytes(2048, 64, HEAD_DIM, retrieve=False)


def test_exactness_checks_passed(ablation):
    exactness = ablation["metrics"]["exactness"]
    assert exactness["passed"] and exactness["state_bytes_measured_equals_formula"]
    assert exactness["first_two_chunks_max_logit_diff"] <= exactness["tolerance"] == 1e-3
    assert exactness["streamed_vs_full_max_logit_diff"] <= 1e-3


def test_layer_timing_rows_verdicts_and_peak_memory(ablation):
    timing = ablation["timing"]
    n = SMOKE["timing_seq_lens"][0]
    assert list(zip(timing.seq_len, timing.variant, timing.chunk_size)) == [
        (n, "original", 0), (n, "terraced", 32), (n, "terraced", 64)]
    assert ((timing.min_s <= timing.median_s) & (timing.median_s <= timing.max_s)).all()
    assert (timing.repeats == SMOKE["timing_repeats"]).all() and timing.load_1min.notna().all()
    assert (timing.peak_bytes >= n * 576 * 4).all()  # at least the layer's fp32 output: a fresh process per point
    original = timing.iloc[0]
    for row in timing.iloc[1:].itertuples():
        times = [float(t) for t in row.times_s.split()]
        expected = ("faster" if max(times) < original.min_s else "slower" if min(times) > original.max_s else "tie")
        assert row.verdict == expected
        assert row.speedup_vs_original == pytest.approx(original.median_s / row.median_s, rel=1e-4)
    metrics = ablation["metrics"]
    verdict_64 = timing.verdict.iloc[2]
    assert metrics["layer_goal_no_slower"] == {"seq_len": n, "met": {"64": verdict_64 != "slower"}}
    assert metrics["layer_goal_faster"] == {"seq_len": n, "met": {"64": {"faster": True, "slower": False}.get(verdict_64)}}


def test_calibration_rows_and_metrics(ablation):
    calibration, metrics, quality = ablation["calibration"], ablation["metrics"], ablation["quality"]
    assert len(calibration) == LAYERS * 4 and (calibration.final_rel_mse >= 0).all()
    assert sorted(set(zip(calibration.chunk_size, calibration.compression_factor))) == [
        (c, f) for c in SMOKE["chunk_sizes"] for f in (1, 4)]
    calibrated = quality[quality.kind == "calibrated"]
    best = calibrated.loc[calibrated.ppl.idxmin()]
    assert metrics["best_calibrated"]["chunk_size"] == best.chunk_size
    assert metrics["best_calibrated"]["perplexity"] == pytest.approx(best.ppl, rel=1e-5)
    assert metrics["original_perplexity"] == pytest.approx(quality.ppl.iloc[0], rel=1e-5)
    assert metrics["calibrated_gaining_on_exact_region"] == f"{calibrated.gains_on_exact_region.sum()}/4"
    assert metrics["calibration_steps"] == 1 and metrics["scored_tokens"] == quality.tokens.iloc[0]
    assert all(math.isfinite(v) and v > 0 for v in metrics["run_seconds"].values())


def test_executed_notebook_has_findings_figure_and_no_errors(ablation):
    cells = [cell for cell in ablation["notebook"].cells if cell.cell_type == "code"]
    outputs = [o for cell in cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "git revision:" in text and "streamed vs full forward" in text and "first two chunks vs the original" in text
    findings = "".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert "Goal 2, state vs KV cache: met" in findings and "Goal 3a" in findings
    from bsbr.formatting import quantity

    timing = ablation["timing"]
    original = timing.iloc[0]
    for row in timing.iloc[1:].itertuples():  # each terraced layer's peak memory, and its ratio to the original's
        assert (f"peak {quantity(row.peak_bytes / 2**20, 'MiB')}, "
                f"{quantity(row.peak_bytes / original.peak_bytes, '×')} the original's") in findings
    assert "<details>" in "".join(o["data"].get("text/html", "") for o in outputs if "data" in o)
    assert (ablation["out"] / "tradeoff.png").stat().st_size > 1000
