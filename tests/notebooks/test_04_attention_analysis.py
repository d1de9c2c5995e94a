"""Notebook 04 (attention maps, original vs calibrated normalised BSBR) through the pipeline runner with smoke
parameters: 512 validation tokens, chunk 128 (an uncalibrated normalised conversion saved into tmp_path), 1 thread."""

from __future__ import annotations


import pandas as pd
import pytest

from tests.conftest import CHECKPOINT_CHUNK, CHECKPOINT_SINKS, run_notebook_smoke

CHUNK, SINKS, SEQ_LEN, TOP_K = CHECKPOINT_CHUNK, CHECKPOINT_SINKS, 512, 2
LAYERS, HEADS = 30, 9  # SmolLM2-135M
SMOKE = {"split": "validation", "seq_len": SEQ_LEN, "num_windows": 1, "top_k": TOP_K, "map_layers": [0, 29],
         "map_bin": 8, "threads": 1}
SHARES = ["own_chunk_share", "earlier_chunks_share", "sink_share"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, normalized_checkpoint):
    return run_notebook_smoke(tmp_path_factory.mktemp("attention_analysis"), "04_attention_analysis",
                              {**SMOKE, "calibrated_path": str(normalized_checkpoint)})


def test_per_head_and_per_layer_tables(smoke):
    per_head = pd.read_csv(smoke["out"] / "per_head.csv")
    assert list(zip(per_head.layer, per_head["head"])) == [(l, h) for l in range(LAYERS) for h in range(HEADS)]
    # the original's mass is split exactly between own chunk, earlier chunks and sinks; BSBR's too
    assert (per_head[SHARES].sum(axis=1) - 1).abs().max() < 1e-4
    bsbr = per_head[["bsbr_own_chunk_share", "bsbr_retrieved_share", "bsbr_sink_share"]].sum(axis=1)
    assert (bsbr - 1).abs().max() < 1e-4
    assert (per_head.first_token_share <= per_head.sink_share + 1e-6).all()
    assert (per_head.previous_chunk_share <= per_head.earlier_chunks_share + 1e-6).all()
    for column in ("map_tv", "chunk_tv", *SHARES, "bsbr_retrieved_share"):
        assert per_head[column].between(0, 1 + 1e-6).all(), column
    assert (per_head.chunk_tv <= per_head.map_tv + 1e-6).all()  # coarser partition, smaller total variation
    for predictor in ("routing", "effective", "recency"):
        assert per_head[f"spearman_{predictor}"].between(-1, 1).all()
        assert per_head[f"topk_overlap_{predictor}"].between(0, 1).all()
    # query chunks 2 and 3 have 2 and 3 earlier chunks: chance top-2 overlap (2/2 + 2/3) / 2
    assert per_head.topk_chance.to_numpy() == pytest.approx(5 / 6)
    per_layer = pd.read_csv(smoke["out"] / "per_layer.csv")
    assert per_layer.layer.tolist() == list(range(LAYERS))
    expected = per_head.drop(columns="head").groupby("layer").mean().reset_index()
    pd.testing.assert_frame_equal(per_layer, expected, check_exact=False, rtol=1e-9)


def test_chunk_ranking_rows_and_recency(smoke):
    ranks = pd.read_csv(smoke["out"] / "chunk_ranking.csv")
    expected = sorted((0, l, h, i, p) for l in range(LAYERS) for h in range(HEADS) for i in (2, 3)
                      for p in ("effective", "recency", "routing"))
    assert list(zip(ranks.window, ranks.layer, ranks["head"], ranks.query_chunk, ranks.predictor)) == expected
    assert (ranks.earlier_chunks == ranks.query_chunk).all()
    # with 2 earlier chunks Spearman is ±1 and top-2 overlap is 1 for every predictor
    two = ranks[ranks.query_chunk == 2]
    assert set(two.spearman.round(9)) <= {-1.0, 1.0} and (two.topk_overlap == 1).all()
    # uncalibrated conversion: meta projections are copies of q/k, still the routing weights are not recency
    assert ranks[ranks.predictor == "routing"].spearman.std() > 0


def test_maps_reproduce_the_layers_and_metrics_match_tables(smoke):
    metrics = smoke["metrics"]
    assert metrics["chunk_size"] == CHUNK and metrics["sink_size"] == SINKS and metrics["seq_len"] == SEQ_LEN
    assert max(metrics["max_abs_output_diff"].values()) <= 1e-3  # asserted in the notebook too
    per_layer = pd.read_csv(smoke["out"] / "per_layer.csv")
    mean = per_layer.mean()
    assert metrics["original"]["own_chunk"] == pytest.approx(mean.own_chunk_share, abs=1e-4)
    assert metrics["original"]["first_token"] == pytest.approx(mean.first_token_share, abs=1e-4)
    assert metrics["bsbr"]["retrieved"] == pytest.approx(mean.bsbr_retrieved_share, abs=1e-4)
    assert metrics["spearman"]["routing"] == pytest.approx(mean.spearman_routing, abs=1e-4)
    assert metrics["topk_overlap"]["recency"] == pytest.approx(mean.topk_overlap_recency, abs=1e-4)
    assert sum(metrics["original"][k] for k in ("own_chunk", "earlier_chunks", "sink")) == pytest.approx(1, abs=1e-3)
    # SmolLM2 parks much of its attention on the first token (attention sink)
    assert metrics["original"]["first_token"] > 0.2
    assert 0 <= metrics["layers_routing_beats_recency"] <= LAYERS


def test_executed_notebook_has_provenance_figures_and_no_errors(smoke):
    outputs = [o for c in smoke["notebook"].cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in ("git revision:", "threads: 1", "CPU:", "seq_len = 512", "window 0: layers: 100%"):
        assert line in printed
    assert "IProgress" not in printed  # importing bsbr.experiment first filters tqdm.auto's warning
    assert "model: SmolLM2-135M-Instruct.Q4_1.gguf" in printed and "loaded the model and " in printed
    for figure in ("attention_maps.png", "per_layer.png"):
        assert (smoke["out"] / figure).stat().st_size > 1000
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
