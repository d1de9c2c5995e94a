"""Notebook 04 (router recall per layer) through the pipeline runner with smoke parameters: one 640-token validation
window per source, chunk 128 (an uncalibrated normalised conversion saved into tmp_path), blocks of 64, 1 thread."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.conftest import CHECKPOINT_CHUNK, CHECKPOINT_SINKS, run_notebook_smoke

CHUNK, SINKS, SEQ_LEN, BLOCK, BUDGETS = CHECKPOINT_CHUNK, CHECKPOINT_SINKS, 640, 64, [128, 256]
LAYERS, HEADS = 30, 9  # SmolLM2-135M
SMOKE = {"split": "validation", "seq_len": SEQ_LEN, "windows_per_source": 1, "block_size": BLOCK, "budgets": BUDGETS,
         "summaries": ["minmax", "mean"], "page_size": 16, "paged_summaries": ["minmax"], "confidence": 0.95,
         "threads": 1}
ROUTERS = ["minmax_head", "minmax_group", "mean_head", "mean_group", "minmax_p16_head", "minmax_p16_group"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, normalized_checkpoint):
    return run_notebook_smoke(tmp_path_factory.mktemp("attention_analysis"), "04_attention_analysis",
                              {**SMOKE, "calibrated_path": str(normalized_checkpoint)})


def test_per_layer_table_covers_every_configuration_and_orders_the_references(smoke):
    per_layer = pd.read_csv(smoke["out"] / "recall_per_layer.csv")
    configs = {(64, 128, 2), (64, 256, 4), (128, 128, 1), (128, 256, 2)}  # (block, budget, k)
    assert set(zip(per_layer.block_size, per_layer.budget, per_layer.k)) == configs
    for (block, budget), part in per_layer.groupby(["block_size", "budget"]):
        methods = ROUTERS + (["meta"] if block == CHUNK else []) + ["recency", "chance", "oracle", "candidate_share"]
        assert sorted(part.method) == sorted(methods * LAYERS)
        wide = part.pivot(index="layer", columns="method", values="recall")
        assert wide.index.tolist() == list(range(LAYERS))
        for name in methods:
            assert wide[name].between(0, 1 + 1e-9).all(), name
            if name != "candidate_share":  # the oracle bounds every router and recency, per query and so on average
                assert (wide[name] <= wide.oracle + 1e-6).all(), name
    assert (per_layer.windows == 2).all()
    # chance is exact: block 64, budget 128 (k = 2): chunk 3 has 4 candidates, chunk 4 has 6 (128 queries each)
    chance = per_layer[(per_layer.method == "chance") & (per_layer.block_size == 64) & (per_layer.budget == 128)]
    assert chance.recall.to_numpy() == pytest.approx((2 / 4 + 2 / 6) / 2, rel=1e-5)
    assert (chance.queries == 2 * 256).all()
    # block 128, budget 256 (k = 2): only chunk 4 (3 candidates) has more than 2
    chance = per_layer[(per_layer.method == "chance") & (per_layer.block_size == 128) & (per_layer.budget == 256)]
    assert chance.recall.to_numpy() == pytest.approx(2 / 3, rel=1e-5) and (chance.queries == 2 * 128).all()
    # the interval brackets the mean; a verdict follows its interval
    assert (per_layer.low <= per_layer.recall + 1e-9).all() and (per_layer.recall <= per_layer.high + 1e-9).all()
    routers = per_layer[per_layer.method.isin(ROUTERS + ["meta"])]
    assert ((routers.verdict == "beats") == (routers.vs_recency_low > 0)).all()
    assert ((routers.verdict == "loses") == (routers.vs_recency_high < 0)).all()


def test_candidate_share_is_the_same_at_both_block_sizes(smoke):
    per_layer = pd.read_csv(smoke["out"] / "recall_per_layer.csv")
    share = per_layer[(per_layer.method == "candidate_share") & (per_layer.budget == 128)]
    wide = share.pivot(index="layer", columns="block_size", values="recall")  # same queries, same candidate tokens
    assert wide[64].to_numpy() == pytest.approx(wide[128].to_numpy(), abs=1e-5)


def test_per_window_rows_and_metrics_match_the_tables(smoke):
    per_window = pd.read_csv(smoke["out"] / "recall_per_window.csv")
    assert sorted(set(zip(per_window.window, per_window.source))) == [(0, "pydoc"), (1, "shakespeare")]
    per_layer = pd.read_csv(smoke["out"] / "recall_per_layer.csv")
    mean = per_window.groupby(["layer", "block_size", "budget", "method"]).recall.mean().reset_index()
    merged = per_layer.merge(mean, on=["layer", "block_size", "budget", "method"], suffixes=("", "_windows"))
    assert len(merged) == len(per_layer)
    assert (merged.recall - merged.recall_windows).abs().max() < 1e-5
    metrics = smoke["metrics"]
    assert metrics["chunk_size"] == CHUNK and metrics["sink_size"] == SINKS and metrics["seq_len"] == SEQ_LEN
    assert metrics["windows"] == 2 and metrics["layers"] == LAYERS and metrics["headline_budget"] == BUDGETS[0]
    assert metrics["max_abs_output_diff"] <= 1e-3  # asserted in the notebook too
    best = metrics["best_router"]
    headline = per_layer[(per_layer.budget == BUDGETS[0]) & per_layer.method.isin(ROUTERS + ["meta"])]
    by_router = headline.groupby(["method", "block_size"]).recall.mean()
    assert (best["method"], best["block_size"]) == by_router.idxmax()
    rows = headline[(headline.method == best["method"]) & (headline.block_size == best["block_size"])]
    assert best["layers_beats_recency"] == int((rows.verdict == "beats").sum())
    assert best["recall"] == pytest.approx(rows.recall.mean(), abs=1e-4)
    assert metrics["goal_met"] == (best["layers_beats_recency"] >= metrics["goal_layers"])
    assert metrics["best_router_by_budget"]["128"] == best
    second = metrics["best_router_by_budget"]["256"]
    by_router = per_layer[(per_layer.budget == 256) & per_layer.method.isin(ROUTERS + ["meta"])].groupby(
        ["method", "block_size"]).recall.mean()
    assert (second["method"], second["block_size"]) == by_router.idxmax()
    assert metrics["layers_beating_recency"][f"{best['method']}_b{best['block_size']}"] == best["layers_beats_recency"]
    assert len(metrics["recall"]) == len(ROUTERS) * 2 + 1  # the query routers at blocks 64 and 128, meta at 128


def test_report_opens_with_the_findings_and_has_no_errors_or_stderr(smoke):
    cells = [c for c in smoke["notebook"].cells if c.cell_type == "code"]
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]  # no warnings, no bars
    first = outputs[0]  # the setup and measurement cells print nothing: the findings come first
    assert "What is analysed" in first["data"]["text/markdown"] and "Goal:" in first["data"]["text/markdown"]
    # the best router in words, its method name beside them (minmax_p16_head: min/max keys, 16-token pages, per head)
    method = smoke["metrics"]["best_router"]["method"]
    words = {"minmax": "min/max keys", "mean": "mean keys"}.get(method.split("_")[0], "meta router")
    assert f"Best router: **{words}" in first["data"]["text/markdown"] and f"(`{method}`)" in first["data"]["text/markdown"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    for line in ("git revision:", "threads: 1", "CPU:", "seq_len = 640", "window 1 (shakespeare): 30 layers",
                 "model: SmolLM2-135M-Instruct.Q4_1.gguf"):
        assert line in html, line
    assert "IProgress" not in html and "de-quantizing" not in html
    assert (smoke["out"] / "recall_per_layer.png").stat().st_size > 1000
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
