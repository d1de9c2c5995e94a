"""Notebook 03 (chunk size × compression ablation) runs through the pipeline runner with smoke parameters on the
embedded SmolLM2 and writes consistent, checkable tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tests.conftest import ROOT, run_notebook_smoke

SMOKE = {"seq_len": 160, "num_windows": 1, "chunk_sizes": [32, 64], "compression_factors": [None, 8],
         "sink_size": 2, "calibration_steps": 1, "calibration_windows": 1, "timing_seq_len": 128,
         "timing_repeats": 1, "threads": 1}
LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 30, 9, 3, 64, 576  # SmolLM2-135M


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    for split in ("validation", "train"):
        if not (ROOT / "data" / "corpus" / f"{split}.jsonl").is_file():
            pytest.fail(f"notebook 03 needs data/corpus/{split}.jsonl: run `dvc repro prepare_corpus`")
    run = run_notebook_smoke(tmp_path_factory.mktemp("ablation"), "03_chunk_size_ablation", SMOKE)
    out = run["out"]
    return {**run, "table": pd.read_csv(out / "ablation.csv"), "original": pd.read_csv(out / "original.csv"),
            "layers": pd.read_csv(out / "layer_timing.csv")}


def state_bytes(chunk_size, factor, n=SMOKE["seq_len"], sinks=SMOKE["sink_size"]):
    """NormalizedState bytes of all layers after n tokens, written out from the shapes (fp32)."""
    f = HEAD_DIM // factor
    p, c = n % chunk_size, n // chunk_size
    per_chunk = HEADS * 2 * f * HEAD_DIM + HEADS * 2 * f + KV_HEADS * HEAD_DIM  # F_j, z_j, h_j
    mixed = HEADS * 2 * f * HEAD_DIM + HEADS * 2 * f
    current = 2 * KV_HEADS * (p + sinks) * HEAD_DIM + HIDDEN  # partial and sink keys/values, hidden-state sum
    return LAYERS * 4 * (current + c * per_chunk + mixed)


def test_one_row_per_configuration_sorted(ablation):
    table = ablation["table"]
    bsbr = [("bsbr", c, f) for c in SMOKE["chunk_sizes"] for f in (1, 8)]
    own = [("own_chunk", c, 0) for c in SMOKE["chunk_sizes"]]
    assert list(zip(table.variant, table.chunk_size, table.compression_factor)) == bsbr + own


def test_quality_columns_are_consistent(ablation):
    table, original = ablation["table"], ablation["original"].iloc[0]
    assert 1 < original.perplexity < 1000 and original.kl_to_original == 0 and original.top1_agreement == 1
    assert table.perplexity.map(math.isfinite).all() and (table.perplexity >= 1).all()
    assert (table.kl_to_original > 1e-4).all()  # every variant changes the predictions after the largest chunk
    assert table.top1_agreement.between(0, 1).all() and table.hidden_cosine.between(-1, 1).all()
    for row in table.itertuples():
        assert row.perplexity_vs_original == pytest.approx(row.perplexity / original.perplexity, rel=1e-5)
        own = table[(table.variant == "own_chunk") & (table.chunk_size == row.chunk_size)].perplexity.item()
        assert row.perplexity_vs_own_chunk == pytest.approx(row.perplexity / own, rel=1e-5)


def test_state_bytes_follow_the_shapes_and_shrink_with_compression(ablation):
    table = ablation["table"].set_index(["variant", "chunk_size", "compression_factor"])
    kv = LAYERS * 2 * KV_HEADS * SMOKE["seq_len"] * HEAD_DIM * 4
    assert (ablation["table"].kv_cache_bytes == kv).all() and ablation["original"].kv_cache_bytes.item() == kv
    for c in SMOKE["chunk_sizes"]:
        for f in (1, 8):
            assert table.loc[("bsbr", c, f), "state_bytes"] == state_bytes(c, f)
        assert table.loc[("bsbr", c, 8), "state_bytes"] < table.loc[("bsbr", c, 1), "state_bytes"]
        # own chunk: only the partial chunk's and the sink tokens' keys/values and the hidden-state sum
        p = SMOKE["seq_len"] % c
        assert table.loc[("own_chunk", c, 0), "state_bytes"] == LAYERS * 4 * (
            2 * KV_HEADS * (p + SMOKE["sink_size"]) * HEAD_DIM + HIDDEN)
    assert ablation["table"].state_vs_kv_cache.tolist() == pytest.approx(
        (ablation["table"].state_bytes / kv).tolist(), rel=1e-5)  # CSV keeps 6 significant digits


def test_calibration_rows_and_layer_timing(ablation):
    calibration = pd.read_csv(ablation["out"] / "calibration.csv")
    assert len(calibration) == LAYERS * 4 and (calibration.final_rel_mse >= 0).all()
    assert sorted(set(zip(calibration.chunk_size, calibration.compression_factor))) == [
        (c, f) for c in SMOKE["chunk_sizes"] for f in (1, 8)]
    layers = ablation["layers"]
    assert list(zip(layers.variant, layers.chunk_size, layers.compression_factor)) == [
        ("bsbr", c, f) for c in SMOKE["chunk_sizes"] for f in (1, 8)] + [("original", 0, 0)]
    assert (layers.median_s > 0).all() and (layers.seq_len == SMOKE["timing_seq_len"]).all()
    original = layers[layers.variant == "original"].median_s.item()
    assert layers.speedup_vs_original.tolist() == pytest.approx((original / layers.median_s).tolist(), rel=1e-5)


def test_metrics_match_the_tables(ablation):
    metrics, table = ablation["metrics"], ablation["table"]
    bsbr = table[table.variant == "bsbr"]
    best = bsbr.loc[bsbr.perplexity.idxmin()]
    # the CSV keeps 6 significant digits, the metrics JSON full precision
    assert metrics["best"] == {"chunk_size": best.chunk_size, "compression_factor": best.compression_factor,
                               "perplexity": pytest.approx(best.perplexity, rel=1e-5),
                               "perplexity_vs_original": pytest.approx(best.perplexity_vs_original, rel=1e-5)}
    assert metrics["original_perplexity"] == pytest.approx(ablation["original"].perplexity.item(), rel=1e-5)
    assert metrics["retrieval_beats_own_chunk"] == f"{(bsbr.perplexity_vs_own_chunk < 1).sum()}/{len(bsbr)}"
    assert metrics["scored_tokens"] == SMOKE["seq_len"] - max(SMOKE["chunk_sizes"]) - 1
    assert metrics["calibration_steps"] == 1


def test_executed_notebook_has_provenance_figure_and_no_errors(ablation):
    outputs = [o for cell in ablation["notebook"].cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "git revision:" in text and "streamed vs full forward" in text
    assert (ablation["out"] / "tradeoff.png").stat().st_size > 1000
