"""Notebook 06 (long documents) runs through the pipeline runner with smoke parameters and writes consistent data.

The smoke run streams the first 600 tokens of the real held-out play through the real SmolLM2 converted to
normalised BSBR at chunk 64 (uncalibrated: a file the test writes with save_conversion, as CI has no
data/conversion), and the original model's KV cache for 300 tokens, on one thread.
"""

from __future__ import annotations

import json
import math

import nbformat
import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, run_notebook_cli

CHUNK, SINKS = 64, 4
SMOKE = {"max_tokens": 600, "piece_size": 100, "decode_every": 128, "decode_steps": 2, "original_max_tokens": 300,
         "bin_size": 128, "threads": 1}
# SmolLM2-135M: 30 layers, 9 query / 3 key-value heads, head_dim 64, hidden 576; normalised features 2f = 128
LAYERS, HEADS, KV_HEADS, D, HIDDEN, FEATURES = 30, 9, 3, 64, 576, 128


def bsbr_state_bytes(tokens: int) -> int:
    """NormalizedState formula (bsbr/normalized.py), written out for SmolLM2, fp32, retrieval on."""
    p, c, k = tokens % CHUNK, tokens // CHUNK, min(SINKS, tokens)
    per_chunk = HEADS * FEATURES * (D + 1)
    per_layer = 2 * KV_HEADS * (p + k) * D + HIDDEN + c * (per_chunk + KV_HEADS * D) + (per_chunk if c else 0)
    return 4 * LAYERS * per_layer


def kv_bytes(tokens: int) -> int:
    return 4 * LAYERS * 2 * KV_HEADS * D * tokens


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import torch

    from bsbr.convert import converted_copy, load_pretrained, save_conversion

    if not (ROOT / "data" / "model").is_dir() or not (ROOT / "data" / "corpus" / "validation.jsonl").is_file():
        pytest.skip("needs data/model and data/corpus (dvc repro prepare_corpus)")
    out = tmp_path_factory.mktemp("long_documents")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, _ = load_pretrained()
        save_conversion(converted_copy(base, CHUNK, retrieval="normalized", sink_size=SINKS), out / "bsbr.safetensors")
    finally:
        torch.set_num_threads(threads)
    del base
    metrics = out / "metrics" / "06_long_documents.json"
    proc = run_notebook_cli(ROOT / "notebooks" / "06_long_documents.ipynb", "06_long_documents", out,
                            overrides={**SMOKE, "calibrated_path": str(out / "bsbr.safetensors"), "out_dir": str(out),
                                       "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "metrics": json.loads(metrics.read_text()), "notebook": out / "06_long_documents.ipynb"}


def test_calls_tile_the_stream_and_cache_bytes_follow_the_formulas(smoke):
    steps = pd.read_csv(smoke["out"] / "steps.csv")
    ends = {"bsbr": SMOKE["max_tokens"], "original": SMOKE["original_max_tokens"]}  # the original stops at its limit
    assert sorted(steps.model.unique()) == ["bsbr", "original"]
    for name, group in steps.groupby("model"):
        assert group.start.iloc[0] == 0 and group.end.iloc[-1] == ends[name]
        assert (group.start.iloc[1:].to_numpy() == group.end.iloc[:-1].to_numpy()).all()  # sorted, contiguous
        assert (group.tokens == group.end - group.start).all() and (group.tokens <= SMOKE["piece_size"]).all()
        decode = group[group.kind == "decode"]
        expected = [p + j for p in range(SMOKE["decode_every"] - 1, ends[name] - 1, SMOKE["decode_every"])
                    for j in range(SMOKE["decode_steps"])]
        assert decode.start.tolist() == expected and (decode.tokens == 1).all()
        formula = bsbr_state_bytes if name == "bsbr" else kv_bytes
        assert (group.cache_bytes == [formula(int(n)) for n in group.end]).all()
        assert (group.cache_bytes == group.expected_cache_bytes).all()
        assert group.cache_bytes.is_monotonic_increasing
        assert (group.seconds > 0).all() and (group.rss_bytes > 100 * 2**20).all()  # the models are loaded
    # a BSBR call finishes a chunk exactly when its end is a multiple of the chunk size
    bsbr = steps[steps.model == "bsbr"]
    assert (bsbr.finishes_chunk == (bsbr.end % CHUNK == 0)).all() and not steps[steps.model == "original"].finishes_chunk.any()


def test_per_token_and_binned_perplexity(smoke):
    tokens = pd.read_csv(smoke["out"] / "token_nll.csv")
    n = SMOKE["max_tokens"]  # position t predicts token t + 1; the play goes on after the streamed prefix
    assert tokens.position.tolist() == list(range(n))
    assert np.isfinite(tokens.bsbr_nll).all() and (tokens.bsbr_nll >= 0).all()
    original = tokens.original_nll
    assert original.notna().sum() == SMOKE["original_max_tokens"] and original[: SMOKE["original_max_tokens"]].notna().all()
    # inside BSBR's first chunk there is nothing to retrieve: the same NLL as the original
    assert (tokens.bsbr_nll - original)[: CHUNK - 1].abs().max() < 1e-3
    assert (tokens.bsbr_nll - original)[CHUNK:].abs().max() > 1e-3  # and retrieval changes later tokens
    bins = pd.read_csv(smoke["out"] / "perplexity_bins.csv")
    for name, column in (("bsbr", tokens.bsbr_nll), ("original", original.dropna())):
        group = bins[bins.model == name]
        assert group.bin.tolist() == list(range(math.ceil(len(column) / SMOKE["bin_size"])))
        assert group.tokens.sum() == len(column) and (group.start == group.bin * SMOKE["bin_size"]).all()
        means = [column.iloc[s:e].mean() for s, e in zip(group.start, group.end)]
        assert np.allclose(group.nll, means, rtol=1e-5)
        assert np.isfinite(group.ppl).all() and (group.ppl > 1).all()
        assert group.cumulative_ppl.iloc[-1] == pytest.approx(math.exp(column.mean()), rel=1e-5)


def test_decode_latency_table(smoke):
    latency = pd.read_csv(smoke["out"] / "decode_latency.csv")
    for name, limit in (("bsbr", SMOKE["max_tokens"]), ("original", SMOKE["original_max_tokens"])):
        group = latency[latency.model == name]
        assert group.decode_position.tolist() == list(range(SMOKE["decode_every"] - 1, limit - 1, SMOKE["decode_every"]))
        # BSBR's first step at k·decode_every − 1 finishes a chunk and is reported apart; the original has none
        assert (group.steps == SMOKE["decode_steps"] - (name == "bsbr")).all()
        assert group.chunk_finish_s.notna().all() if name == "bsbr" else group.chunk_finish_s.isna().all()
        assert ((group.min_s <= group.median_s) & (group.median_s <= group.max_s)).all()


def test_metrics_json_matches_the_data(smoke):
    metrics, out = smoke["metrics"], smoke["out"]
    plays = pd.read_csv(out / "held_out_plays.csv")
    assert set(plays.split) <= {"validation", "test"}  # never the calibration (train) split
    qualifying = plays[plays.tokens >= 40000]
    chosen = qualifying.sort_values(["tokens", "doc_id"]).iloc[0]
    assert metrics["play"] == chosen.title and metrics["play_tokens"] == chosen.tokens >= 40000
    assert metrics["play_split"] == chosen.split
    assert metrics["tokens_streamed"] == SMOKE["max_tokens"] and metrics["original_tokens"] == SMOKE["original_max_tokens"]
    assert metrics["chunk_size"] == CHUNK and metrics["sink_size"] == SINKS and metrics["threads"] == 1
    assert metrics["max_position_embeddings"] == 8192
    assert metrics["stream_max_abs_nll_diff"] <= 1e-3 and metrics["first_chunk_max_abs_nll_diff"] <= 1e-3
    memory = metrics["memory"]
    assert memory["bsbr_state_last_bytes"] == bsbr_state_bytes(SMOKE["max_tokens"])
    assert memory["original_kv_last_formula_bytes"] == kv_bytes(SMOKE["max_tokens"])
    assert memory["original_kv_measured_last_bytes"] == kv_bytes(SMOKE["original_max_tokens"])
    assert memory["bsbr_over_kv"] == pytest.approx(bsbr_state_bytes(600) / kv_bytes(600), abs=1e-4)
    assert memory["kv_per_token"] == kv_bytes(1)
    assert memory["bsbr_state_per_token"] == pytest.approx((HEADS * FEATURES * (D + 1) + KV_HEADS * D) * LAYERS * 4 / CHUNK,
                                                           abs=0.1)
    tokens = pd.read_csv(out / "token_nll.csv")
    common = SMOKE["original_max_tokens"] - 1
    ppl = metrics["perplexity"]
    assert ppl["bsbr_common"] == pytest.approx(math.exp(tokens.bsbr_nll[:common].mean()), rel=1e-3)
    assert ppl["original_common"] == pytest.approx(math.exp(tokens.original_nll[:common].mean()), rel=1e-3)
    assert ppl["bsbr_whole_stream"] == pytest.approx(math.exp(tokens.bsbr_nll.mean()), rel=1e-3)
    bins = pd.read_csv(out / "perplexity_bins.csv")
    bsbr_bins = bins[bins.model == "bsbr"]
    assert ppl["bsbr_bin_max"] == pytest.approx(bsbr_bins.ppl.max(), rel=1e-3)
    assert ppl["bsbr_bin_max_position"] == bsbr_bins.start[bsbr_bins.ppl.idxmax()]
    degraded = bsbr_bins[(bsbr_bins.start >= SMOKE["original_max_tokens"])
                         & (bsbr_bins.ppl > 2 * ppl["bsbr_bin_median_common"])]
    assert ppl["bsbr_degrades_from_position"] == (int(degraded.start.iloc[0]) if len(degraded) else None)
    latency = pd.read_csv(out / "decode_latency.csv").set_index(["model", "decode_position"])
    decode = metrics["decode_latency"]
    assert decode["position_common"] == 255 and decode["position_last"] == 511
    assert decode["bsbr_common_s"] == pytest.approx(latency.loc[("bsbr", 255), "median_s"], rel=1e-3)
    assert decode["original_common_s"] == pytest.approx(latency.loc[("original", 255), "median_s"], rel=1e-3)
    fits = pd.read_csv(out / "fits.csv")
    assert sorted(zip(fits.model, fits.quantity)) == [(m, q) for m in ("bsbr", "original")
                                                      for q in ("cache_bytes", "decode_latency", "piece_time_per_token")]
    kv_fit = fits[(fits.model == "original") & (fits.quantity == "cache_bytes")].iloc[0]
    assert kv_fit.slope_per_token == pytest.approx(kv_bytes(1)) and kv_fit.r2 == pytest.approx(1.0)


def test_executed_notebook_has_provenance_progress_and_no_errors(smoke):
    nb = nbformat.read(smoke["notebook"], as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "threads: 1", "CPU:", "max_tokens = 600", "bsbr stream: 100%", "original stream: 100%",
                 "cache bytes equal their formula after every call: True"):
        assert line in printed, line
    assert "IProgress" not in printed  # importing bsbr.experiment first filters tqdm.auto's warning
    assert "model: SmolLM2-135M-Instruct.Q4_1.gguf" in printed and "loaded the model and " in printed
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (smoke["out"] / "long_documents.png").stat().st_size > 1000
