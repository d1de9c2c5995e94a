"""Notebook 06 (long documents) runs through the pipeline runner with smoke parameters and writes consistent data.

The smoke run streams the first 600 tokens of the real held-out text through the real SmolLM2 converted to block
retrieval at chunk 64 (blocks of 16, top-2, 4 sinks, compact positions) with retrieval on and off, the original's KV
cache for 300 tokens and the original started fresh on positions 256..600, on one thread.
"""

from __future__ import annotations

import json
import math

import nbformat
import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, run_notebook_cli

CHUNK, BLOCK = 64, 16
SMOKE = {"max_tokens": 600, "chunk_size": CHUNK,
         "blocks": {"block_size": BLOCK, "top_k": 2, "summary": "mean", "selection": "group", "sink_size": 4,
                    "positions": "compact"},
         "original_max_tokens": 300, "fresh_tokens": 300, "piece_size": 100, "decode_every": 128, "decode_steps": 2,
         "bin_size": 128, "flat_from": 256, "threads": 1}
WINDOWS = {"blocks": (0, 600), "exact_region": (0, 600), "original": (0, 300), "original_fresh": (256, 600)}
# SmolLM2-135M: 30 layers, 3 key-value heads, head_dim 64
LAYERS, KV_HEADS, D = 30, 3, 64


def kv_bytes(tokens: int) -> int:
    return 4 * LAYERS * 2 * KV_HEADS * D * tokens


def blocks_bytes(tokens: int) -> int:
    """Keys, values and compact-position keys of every token, one mean summary per finished block; fp32."""
    return 4 * LAYERS * KV_HEADS * D * (3 * tokens + tokens // BLOCK)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not (ROOT / "data" / "model").is_dir() or not (ROOT / "data" / "corpus" / "validation.jsonl").is_file():
        pytest.skip("needs data/model and data/corpus (dvc repro prepare_corpus)")
    out = tmp_path_factory.mktemp("long_documents")
    metrics = out / "metrics" / "06_long_documents.json"
    proc = run_notebook_cli(ROOT / "notebooks" / "06_long_documents.ipynb", "06_long_documents", out,
                            overrides={**SMOKE, "out_dir": str(out), "metrics_path": str(metrics)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "metrics": json.loads(metrics.read_text()), "notebook": out / "06_long_documents.ipynb"}


def test_calls_tile_each_window_and_cache_bytes_follow_the_formulas(smoke):
    steps = pd.read_csv(smoke["out"] / "steps.csv")
    assert sorted(steps.variant.unique()) == sorted(WINDOWS)
    for name, group in steps.groupby("variant"):
        start, end = WINDOWS[name]
        assert group.start.iloc[0] == start and group.end.iloc[-1] == end
        assert (group.start.iloc[1:].to_numpy() == group.end.iloc[:-1].to_numpy()).all()  # sorted, contiguous
        assert (group.tokens == group.end - group.start).all() and (group.tokens <= SMOKE["piece_size"]).all()
        decode = group[group.kind == "decode"]
        # groups of 2 single-token steps ending at 128, 256, 384, 512 and the end; none for the fresh original
        ends = [] if name == "original_fresh" else [e for e in range(128, end, 128)] + [end]
        assert decode.start.tolist() == [e - 2 + j for e in ends for j in range(2)] and (decode.tokens == 1).all()
        formula = kv_bytes if name.startswith("original") else blocks_bytes
        assert (group.cache_bytes == [formula(int(e - start)) for e in group.end]).all()
        assert (group.seconds > 0).all() and (group.rss_bytes > 100 * 2**20).all()  # the models are loaded


def test_per_token_and_binned_perplexity(smoke):
    tokens = pd.read_csv(smoke["out"] / "token_nll.csv")
    bins = pd.read_csv(smoke["out"] / "perplexity_bins.csv")
    for name, (start, end) in WINDOWS.items():
        column = tokens[tokens.variant == name]
        assert column.position.tolist() == list(range(start, end))  # the text goes on: every position is scored
        assert np.isfinite(column.nll).all() and (column.nll >= 0).all()
        group = bins[bins.variant == name]
        assert group.start.tolist() == list(range(start, end, 128)) and group.tokens.sum() == end - start
        means = [column.nll.iloc[s - start:e - start].mean() for s, e in zip(group.start, group.end)]
        assert np.allclose(group.nll, means, rtol=1e-4)
        assert group.cumulative_ppl.iloc[-1] == pytest.approx(math.exp(column.nll.mean()), rel=1e-4)
    by = {name: tokens[tokens.variant == name].set_index("position").nll for name in WINDOWS}
    # inside the first two chunks every variant attends exactly what the original does
    first = slice(0, 2 * CHUNK - 1)  # .loc: positions, both ends included
    assert (by["blocks"].loc[first] - by["original"].loc[first]).abs().max() < 1e-3
    assert (by["exact_region"].loc[first] - by["original"].loc[first]).abs().max() < 1e-3
    # later, retrieval changes the predictions, and the fresh original differs from the one with the whole past
    assert (by["blocks"].loc[3 * CHUNK:599] - by["exact_region"].loc[3 * CHUNK:599]).abs().max() > 1e-3
    assert (by["original_fresh"].loc[256:299] - by["original"].loc[256:299]).abs().max() > 1e-3


def test_goal_tables(smoke):
    out = smoke["out"]
    bins = pd.read_csv(out / "perplexity_bins.csv")
    flat = pd.read_csv(out / "flatness.csv").set_index("variant")
    blocks = bins[(bins.variant == "blocks") & (bins.tokens == 128)]
    reference = blocks[blocks.end <= 256].ppl.median()
    beyond = blocks[blocks.start >= 256]  # 256 and 384 (the bin at 512 is short)
    assert flat.loc["blocks", "reference_ppl"] == pytest.approx(reference, rel=1e-4)
    assert flat.loc["blocks", "bins_beyond"] == 2
    assert flat.loc["blocks", "max_beyond_ppl"] == pytest.approx(beyond.ppl.max(), rel=1e-4)
    assert bool(flat.loc["blocks", "met"]) == bool((beyond.ppl <= 1.5 * reference).all())
    assert flat.loc["original", "bins_beyond"] == 0 and pd.isna(flat.loc["original", "met"])
    latency = pd.read_csv(out / "decode_latency.csv")
    for name in ("blocks", "exact_region", "original"):
        group = latency[latency.variant == name]
        end = WINDOWS[name][1]
        assert group.context.tolist() == list(range(128, end, 128)) + [end] and (group.steps == 2).all()
        assert ((group.min_s <= group.median_s) & (group.median_s <= group.max_s)).all()
    memory = pd.read_csv(out / "memory.csv").set_index("variant")
    assert memory.loc["blocks", "cache_bytes"] == memory.loc["exact_region", "cache_bytes"] == blocks_bytes(600)
    assert memory.loc["original", "cache_bytes"] == kv_bytes(300)
    assert memory.loc["original", "bytes_per_token"] == kv_bytes(1)
    per_token = blocks_bytes(600) / 600 / kv_bytes(1)
    assert memory.loc["blocks", "vs_kv_cache"] == pytest.approx(per_token, rel=1e-5)  # the CSV keeps 6 digits
    assert (memory.capacity_bytes >= memory.cache_bytes).all()


def test_metrics_json_matches_the_data(smoke):
    metrics, out = smoke["metrics"], smoke["out"]
    plays = pd.read_csv(out / "held_out_plays.csv")
    assert set(plays.split) <= {"validation", "test"}  # never the calibration (train) split
    assert plays.tokens.max() < 65024  # no play is long enough: the text joins plays, validation first
    assert metrics["text"].split(" + ")[0] == plays[plays.split == "validation"].sort_values("doc_id").doc_id.iloc[0]
    assert metrics["text_tokens"] >= 65024 and metrics["tokens_streamed"] == 600
    assert metrics["windows"] == {k: list(v) for k, v in WINDOWS.items()}
    assert metrics["stream_max_abs_nll_diff"] <= 1e-3 and metrics["max_position_embeddings"] == 8192
    flat = pd.read_csv(out / "flatness.csv").set_index("variant")
    assert metrics["flatness"]["blocks"]["met"] == bool(flat.loc["blocks", "met"])
    assert metrics["flatness"]["original"]["met"] is None
    bins = pd.read_csv(out / "perplexity_bins.csv").set_index(["variant", "start"]).ppl
    before = [bins["original", s] for s in (0, 128)]  # the same rule inside the trained range: the text's own swing
    inside = metrics["flatness"]["original"]
    assert inside["max_before_ppl"] == pytest.approx(max(before), rel=1e-3)
    assert inside["max_before_start"] == (0, 128)[int(np.argmax(before))]
    assert inside["exceeding_before"] == sum(p > 1.5 * np.median(before) for p in before)
    paired = metrics["flatness_against_original"]["blocks"]  # blocks / original on the same tokens
    early = [bins["blocks", s] / bins["original", s] for s in (0, 128)]  # bins ending by flat_from = 256
    late = bins["blocks", 384] / bins["original_fresh", 384]  # the fresh original's first bin (256) is left out
    exceeding = int(late > 1.5 * np.median(early))
    assert (paired["bins_before"], paired["bins_beyond"], paired["exceeding"]) == (2, 1, exceeding)
    assert paired["reference_ratio"] == pytest.approx(np.median(early), rel=1e-3)
    assert paired["max_beyond_ratio"] == pytest.approx(late, rel=1e-3)
    assert paired["met"] == bool(late <= 1.5 * np.median(early))
    assert set(metrics["flatness_against_original"]) == {"blocks", "exact_region"}
    # every full bin's perplexity, the fresh original's late bins included (the paired goal's reference)
    full = pd.read_csv(out / "perplexity_bins.csv").query("tokens == 128")
    assert {v: set(b) for v, b in metrics["perplexity_bins"].items()} == {
        v: {str(s) for s in g.start} for v, g in full.groupby("variant")}
    assert metrics["perplexity_bins"]["original_fresh"]["384"] == pytest.approx(bins["original_fresh", 384], rel=1e-3)
    decode = metrics["decode"]
    last = pd.read_csv(out / "decode_latency.csv").query("variant == 'blocks'").iloc[-1]
    assert decode["context"] == 600 and decode["median_s"] == pytest.approx(last.median_s, rel=1e-3)
    assert decode["met"] == bool(last.max_s <= 1.5 * last.median_s)
    assert metrics["memory_bytes_per_token"]["original"] == kv_bytes(1)
    tokens = pd.read_csv(out / "token_nll.csv")
    original = tokens[(tokens.variant == "original") & (tokens.position < 256)].nll
    assert metrics["perplexity_original_range"]["original"] == pytest.approx(math.exp(original.mean()), rel=1e-3)
    late = tokens[(tokens.variant == "original_fresh") & (tokens.position >= 384) & (tokens.position < 512)].nll
    assert metrics["late_range"] == [384, 512]
    assert metrics["perplexity_late"]["original_fresh"] == pytest.approx(math.exp(late.mean()), rel=1e-3)
    assert set(metrics["seconds"]) == set(WINDOWS) | {"run"} and metrics["machine"]["threads"] == 1
    others = metrics["other_cores"]  # other processes' cores before and after the streams: busy when either > 0.5
    assert set(others) == {"before", "after"} and all(x is None or x >= 0 for x in others.values())
    assert metrics["busy"] is any(x is not None and x > 0.5 for x in others.values())


def test_executed_notebook_has_findings_provenance_and_no_errors(smoke):
    nb = nbformat.read(smoke["notebook"], as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "threads: 1", "CPU:", "max_tokens = 600", "blocks stream: 100%",
                 "original_fresh stream: 100%", "estimated stream seconds"):
        assert line in printed, line
    assert "IProgress" not in printed
    findings = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    for phrase in ("Goal 1, flat perplexity", "with the text held fixed", "Goal 2, no slow chunk-finishing step",
                   "The step itself is not constant in the context", "**Memory**", "Load average"):
        assert phrase in findings, phrase
    assert ("The machine was busy while the streams ran" in findings) is smoke["metrics"]["busy"]
    assert "<b>Memory per token of context</b>" in "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    appendix = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert appendix.count("<details>") == 9 and "Run log" in appendix and "git revision:" in appendix
    # the run's own lines go to stderr (the terminal and the run-log appendix), never before the findings
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stdout"]
    headings = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert headings[0].startswith("# 06") and "**Question.**" in headings[0] and headings[1] == "## What we found"
    assert (smoke["out"] / "long_documents.png").stat().st_size > 1000
