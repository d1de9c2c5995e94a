"""bsbr.ablation: variants scored on common positions (against hand computations on a tiny random Llama), the state
table against the formula, layer timings in fresh processes, and the range verdict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bsbr.ablation import layer_timings, range_verdict, score_variants, state_table
from bsbr.convert import converted_copy, set_retrieval
from bsbr.streaming_eval import kv_cache_nbytes, terraced_cache_nbytes
from tests.conftest import tiny_llama, tokens

pytestmark = pytest.mark.usefixtures("one_thread")
CHUNK, SINKS, N, START = 8, 2, 37, 16  # tiny_llama: head_dim 16, 2 key/value heads, 2 layers


@pytest.fixture(scope="module")
def scored():
    base = tiny_llama()
    variants = {"exact": set_retrieval(converted_copy(base, CHUNK, retrieval="terraced", sink_size=SINKS), False),
                "terraced": converted_copy(base, CHUNK, 4, retrieval="terraced", sink_size=SINKS)}
    with torch.no_grad():  # a retrieval that matters: larger gains than the initial exp(-2.2)
        for layer in variants["terraced"].model.layers:
            layer.self_attn.terraced.mix_logit.fill_(1.0)
    windows = tokens(2, N)
    scores = score_variants(base, variants, windows, START, {"exact": 2 * CHUNK, "terraced": 2 * CHUNK}, piece_size=5)
    return base, variants, windows, scores


def test_scores_match_hand_computations_on_the_scored_positions(scored):
    base, variants, windows, scores = scored
    with torch.no_grad():
        reference = base(windows).logits[:, START : N - 1].log_softmax(-1)  # [2, positions, vocab]
        target = windows[:, START + 1 :]
        for name, lm in [("original", base), *variants.items()]:
            log_probs = lm(windows).logits[:, START : N - 1].log_softmax(-1)
            nll = -log_probs.gather(-1, target[..., None])[..., 0]
            assert scores.nll[name].shape == (2, N - 1 - START)
            torch.testing.assert_close(scores.nll[name], nll, atol=1e-4, rtol=1e-4)
            kl = (reference.exp() * (reference - log_probs)).sum(-1)
            torch.testing.assert_close(scores.kl[name], kl, atol=1e-5, rtol=1e-4)
            assert torch.equal(scores.top1[name], (log_probs.argmax(-1) == reference.argmax(-1)).float())
    assert (scores.kl["original"] == 0).all() and (scores.top1["original"] == 1).all()
    # both differ from the original after two chunks (a random tiny model: near-uniform predictions, small KL)
    assert scores.kl["terraced"].mean() > 1e-6 and scores.kl["exact"].mean() > 1e-6
    assert not torch.equal(scores.nll["terraced"], scores.nll["exact"])


def test_exactness_checks_and_measured_state_bytes(scored):
    base, _, _, scores = scored
    assert scores.exact_diff["exact"] < 1e-5 and scores.exact_diff["terraced"] < 1e-5  # first two chunks: exact
    assert scores.stream_diff < 1e-5  # pieces of 5 tokens through a BSBRCache = one full forward
    config = base.config
    assert scores.state_bytes == {"exact": terraced_cache_nbytes(config, N, CHUNK, SINKS, 16, retrieve=False),
                                  "terraced": terraced_cache_nbytes(config, N, CHUNK, SINKS, 4)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(start=36), "start"),
    (dict(exact_until={"a": 1}), "exact_until"),
    (dict(variants={"original": None}), "original"),
    (dict(piece_size=0), "piece_size"),
    (dict(windows=torch.zeros(5, dtype=torch.long)), "windows"),
])
def test_score_variants_rejects_bad_arguments(kwargs, match):
    args = dict(base=None, variants={"a": None, "b": None}, windows=tokens(1, N), start=START,
                exact_until={"a": 1, "b": 2}) | kwargs
    with pytest.raises(ValueError, match=match):
        score_variants(**args)


def test_state_table_follows_the_formula_and_the_kv_cache():
    config = tiny_llama().config
    table = state_table(config, [4, 8], [None, 4], sink_size=2, tokens=[8, 100])
    assert len(table) == 2 * 2 * 3
    row = table[(table.tokens == 100) & (table.chunk_size == 8) & (table.compression_factor == 4)].iloc[0]
    # layers · G · (2·(p + C + k)·d + 2f·(d + 1)) fp32 values: p = 100 % 8 = 4, f = 16 / 4
    assert row.state_bytes == 4 * 2 * 2 * (2 * (4 + 8 + 2) * 16 + 2 * 4 * 17) and row.feature_dim == 4
    assert row.kv_cache_bytes == kv_cache_nbytes(config, 100) == 4 * 2 * 2 * 2 * 16 * 100
    assert math.isclose(row.state_vs_kv_cache, row.state_bytes / row.kv_cache_bytes)
    exact = table[(table.variant == "exact_region")]
    assert list(exact.state_bytes) == [terraced_cache_nbytes(config, n, c, 2, 16, retrieve=False)
                                       for n in (8, 100) for c in (4, 8)]
    with pytest.raises(ValueError, match="compression_factors"):
        state_table(config, [8], [3], sink_size=2, tokens=[8])


def test_layer_timings_one_fresh_process_per_point():
    config = tiny_llama().config
    rows = layer_timings(config, [24], [4, 8], sink_size=2, repeats=2, threads=1)
    assert [(r["variant"], r["chunk_size"], r["impl"], r["seq_len"]) for r in rows] == [
        ("original", 0, "llama_original", 24), ("terraced", 4, "llama_terraced", 24),
        ("terraced", 8, "llama_terraced", 24)]
    for row in rows:
        assert len(row["times_s"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["peak_bytes"] == row["peak_rss_bytes"] - row["baseline_rss_bytes"]
        assert row["load_1min"] is None or row["load_1min"] >= 0


@pytest.mark.parametrize("candidate, reference, verdict", [
    ([1.0, 2.0], [2.5, 3.0], "faster"), ([3.1, 4.0], [2.5, 3.0], "slower"), ([2.0, 2.6], [2.5, 3.0], "tie"),
    ([2.5], [2.5], "tie")])
def test_range_verdict(candidate, reference, verdict):
    assert range_verdict(candidate, reference) == verdict


def test_range_verdict_needs_times():
    with pytest.raises(ValueError, match="at least one"):
        range_verdict([], [1.0])
