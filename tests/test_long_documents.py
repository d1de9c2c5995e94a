"""bsbr.long_documents: windows, tables and goal verdicts of the long-document notebook, on a tiny random Llama and
hand-made runs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from bsbr.long_documents import (STREAM_COST, check_long_document_parameters, choose_play, decode_goal, decode_latency,
                                 decode_positions, estimate_stream_seconds, flatness, flatness_against_original,
                                 held_out_plays, late_perplexity, memory_table, perplexity_bins, steps_table,
                                 stream_matches_full_forward, stream_windows)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


GOOD = dict(splits=["validation"], min_stream_tokens=10, max_tokens=None, variants=["blocks", "original"],
            blocks={"block_size": 4, "top_k": 2}, chunk_size=8, piece_size=4, decode_every=8, decode_steps=2,
            original_max_tokens=5, fresh_tokens=4, bin_size=4, flat_from=8, threads=0)


def test_check_long_document_parameters_names_the_bad_one():
    check_long_document_parameters(**GOOD)
    for key, bad, match in (("splits", ["train"], "splits"), ("splits", ["nope"], "splits"),
                            ("piece_size", 0, "piece_size"), ("max_tokens", 0, "max_tokens"),
                            ("threads", -1, "threads"), ("decode_steps", 8, "decode_steps"),
                            ("flat_from", 6, "flat_from"), ("variants", ["original"], "variants"),
                            ("variants", ["blocks", "blocks"], "variants"), ("variants", ["blocks", "x"], "variants"),
                            ("blocks", {"top": 2}, "blocks"), ("blocks", [("top_k", 2)], "blocks"),
                            ("fresh_tokens", 0, "fresh_tokens")):
        with pytest.raises(ValueError, match=match):
            check_long_document_parameters(**{**GOOD, key: bad})


class WordTokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [len(word) for word in text.split()]


def test_held_out_plays_and_the_shortest_long_enough_play(tmp_path):
    docs = {"validation": [("v2", "shakespeare", "B", "a b c d e"), ("v1", "pydoc", "x", "a b c d e f g"),
                           ("v3", "shakespeare", "C", "a b c")],
            "test": [("t1", "shakespeare", "A", "a b c d e f")]}
    for split, rows in docs.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(dict(zip(("doc_id", "source", "title", "text"), r)))
                                                         + "\n" for r in rows))
    plays, catalogue = held_out_plays(WordTokenizer(), tmp_path, ["validation", "test"])
    assert [(s, d["doc_id"], len(t)) for s, d, t in plays] == [("validation", "v2", 5), ("validation", "v3", 3),
                                                              ("test", "t1", 6)]
    assert catalogue.doc_id.tolist() == ["t1", "v2", "v3"]  # sorted by split, then doc_id
    play = choose_play(plays, ["validation", "test"], 5, eos_token_id=0)
    assert (play.split, play.title, play.doc_ids, len(play.tokens)) == ("validation", "B", ["v2"], 5)
    two = choose_play(plays, ["validation", "test"], 9, eos_token_id=0)
    assert two.doc_ids == ["v2", "v3"] and two.split == "validation"  # 5 + EOS + 3, both from validation
    joined = choose_play(plays, ["validation", "test"], 10, eos_token_id=0)
    assert joined.doc_ids == ["v2", "v3", "t1"] and joined.tokens == [1] * 5 + [0] + [1] * 3 + [0] + [1] * 6
    assert joined.split == "validation+test" and joined.note.startswith("no held-out play has 10 tokens: 3 plays")
    with pytest.raises(ValueError, match="no Shakespeare"):
        held_out_plays(WordTokenizer(), tmp_path, [])


def test_stream_matches_one_full_forward_on_a_tiny_llama():
    from transformers import DynamicCache

    model = tiny_llama()
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert stream_matches_full_forward(model, DynamicCache(), ids, chunk_size=16) < 1e-4


def test_windows_decode_positions_and_the_time_estimate():
    windows = stream_windows(1000, ["blocks", "exact_region", "original", "original_fresh"], 300, 250, 64)
    assert windows == {"blocks": (0, 1000), "exact_region": (0, 1000), "original": (0, 300),
                       "original_fresh": (704, 1000)}  # 1000 − 250 = 750, down to a multiple of 64
    assert stream_windows(200, ["original", "original_fresh"], None, 500, 64) == {"original": (0, 200),
                                                                                 "original_fresh": (0, 200)}
    # groups end at 8, 16 and at the end of the stream (20)
    assert decode_positions(20, 8, 3) == [5, 13, 17]
    assert decode_positions(16, 8, 3) == [5, 13]  # the end is a multiple: no second group there
    assert decode_positions(2, 8, 3) == []
    estimate = estimate_stream_seconds({"blocks": (0, 100), "original_fresh": (50, 150)},
                                       cost={"blocks": (0.01, 0.0), "original_fresh": (0.001, 1e-5)})
    assert estimate == pytest.approx({"blocks": 1.0, "original_fresh": 0.1 + 1e-5 * 100 * 100 / 2})
    with_steps = estimate_stream_seconds({"blocks": (0, 100)}, {"blocks": 8}, {"blocks": (0.01, 0.0)}, 0.5)
    assert with_steps == pytest.approx({"blocks": 5.0})
    assert set(STREAM_COST) >= {"blocks", "exact_region", "original", "original_fresh", "normalized"}


def fake_runs():
    """blocks over 8 tokens in two pieces and two decode steps; original_fresh over positions 4..8."""
    def step(kind, start, end, seconds, cache):
        return {"kind": kind, "start": start, "end": end, "tokens": end - start, "seconds": seconds,
                "seconds_per_token": seconds / (end - start), "cache_bytes": cache, "rss_bytes": 100 + end}

    blocks = SimpleNamespace(nll=torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]), steps=[
        step("piece", 0, 3, 0.3, 10), step("decode", 3, 4, 0.05, 20), step("decode", 4, 5, 0.01, 25),
        step("piece", 5, 6, 0.1, 30), step("decode", 6, 7, 0.02, 35), step("decode", 7, 8, 0.04, 40)])
    fresh = SimpleNamespace(nll=torch.tensor([2.0, 2.0, 2.0, 2.0]), steps=[step("piece", 0, 4, 0.4, 8)])
    return {"blocks": blocks, "original_fresh": fresh}, {"blocks": (0, 8), "original_fresh": (4, 8)}


def test_tables_from_the_runs():
    runs, windows = fake_runs()
    steps = steps_table(runs, windows)
    assert steps.variant.tolist() == ["blocks"] * 6 + ["original_fresh"]
    assert steps[steps.variant == "original_fresh"][["start", "end"]].values.tolist() == [[4, 8]]  # absolute
    bins = perplexity_bins(runs, windows, 2)
    assert list(zip(bins.variant, bins.bin, bins.start)) == [("blocks", i, 2 * i) for i in range(4)] + [
        ("original_fresh", 2, 4), ("original_fresh", 3, 6)]
    assert bins.ppl.iloc[:4].tolist() == pytest.approx([math.e, math.exp(2), math.exp(3), math.exp(3)])
    with pytest.raises(ValueError, match="multiple of bin_size"):
        perplexity_bins(runs, windows, 3)
    assert late_perplexity(bins, 4, 8) == pytest.approx({"blocks": math.exp(3), "original_fresh": math.exp(2)})
    latency = decode_latency(steps)
    # two groups: steps 3..5 (ending at 5) and 6..8 (ending at 8); the fresh run has none
    assert latency[["context", "steps"]].values.tolist() == [[5, 2], [8, 2]]
    assert latency.median_s.tolist() == pytest.approx([0.03, 0.03]) and latency.max_s.tolist() == [0.05, 0.04]
    assert latency.max_over_median.tolist() == pytest.approx([0.05 / 0.03, 0.04 / 0.03])
    goal = decode_goal(latency)
    assert goal == pytest.approx({"variant": "blocks", "context": 8, "steps": 2, "median_s": 0.03, "max_s": 0.04,
                                  "max_over_median": 0.04 / 0.03, "met": True, "first_context": 5,
                                  "first_median_s": 0.03})
    assert not decode_goal(latency, ratio=1.2)["met"] and decode_goal(latency, "original")["met"] is None


def test_flatness_verdicts():
    rows = [("blocks", 0, 1024, 30.0), ("blocks", 1024, 1024, 20.0), ("blocks", 2048, 1024, 22.0),
            ("blocks", 3072, 1024, 34.0), ("blocks", 4096, 1024, 29.0), ("blocks", 5120, 10, 900.0),
            ("exact_region", 0, 1024, 30.0), ("exact_region", 1024, 1024, 20.0), ("exact_region", 2048, 1024, 20.0),
            ("exact_region", 3072, 1024, 40.0), ("original", 0, 1024, 10.0)]
    bins = pd.DataFrame([{"variant": v, "start": s, "end": s + n, "tokens": n, "ppl": p} for v, s, n, p in rows])
    table = flatness(bins, flat_from=2048, bin_size=1024).set_index("variant")
    blocks = table.loc["blocks"]  # reference: median(30, 20) = 25; beyond: 22, 34, 29 (the short last bin ignored)
    assert (blocks.bins_before, blocks.reference_ppl, blocks.bins_beyond) == (2, 25.0, 3)
    assert (blocks.max_beyond_ppl, blocks.max_beyond_start, blocks.exceeding) == (34.0, 3072, 0)
    assert blocks.met and blocks.max_over_reference == pytest.approx(34 / 25)
    exact = table.loc["exact_region"]  # reference 25: 40 > 1.5 × 25
    assert not exact.met and exact.exceeding == 1 and exact.first_exceeding_start == 3072
    strict = flatness(bins, flat_from=2048, bin_size=1024, ratio=1.3).set_index("variant")
    assert not strict.loc["blocks"].met and strict.loc["blocks"].exceeding == 1
    assert strict.loc["blocks"].first_exceeding_start == 3072
    assert table.loc["original"].met is None and table.loc["original"].bins_beyond == 0
    # the same rule inside the range before flat_from: blocks' highest bin there is 30 at 0 (1.2× its median 25)
    assert (blocks.max_before_ppl, blocks.max_before_start, blocks.exceeding_before) == (30.0, 0, 0)
    assert blocks.max_before_over_reference == pytest.approx(30 / 25)
    text = pd.DataFrame([{"variant": "original", "start": s, "end": s + 1024, "tokens": 1024, "ppl": p}
                         for s, p in ((0, 10.0), (1024, 12.0), (2048, 40.0), (3072, 20.0))])
    within = flatness(text, flat_from=4096, bin_size=1024).loc[0]  # median 16; 40 > 1.5 × 16, nothing beyond
    assert within.met is None and within.exceeding_before == 1 and within.max_before_start == 2048
    assert within.max_before_over_reference == pytest.approx(40 / 16)
    assert flatness(text, flat_from=4096, bin_size=1024, ratio=2.5).loc[0].exceeding_before == 0


def test_flatness_against_original_holds_the_text_fixed():
    rows = [("original", 0, 1024, 20.0), ("original", 1024, 1024, 40.0),  # early reference, positions < 2048
            ("original_fresh", 2048, 1024, 99.0),  # the late reference's first bin: little context, left out
            ("original_fresh", 3072, 1024, 60.0), ("original_fresh", 4096, 1024, 30.0),  # late reference
            ("blocks", 0, 1024, 22.0), ("blocks", 1024, 1024, 40.0),  # ratios 1.1, 1.0: median 1.05
            ("blocks", 2048, 1024, 500.0),  # no reference bin: not compared
            ("blocks", 3072, 1024, 66.0), ("blocks", 4096, 1024, 36.0), ("blocks", 5120, 10, 900.0),  # 1.1, 1.2
            ("exact_region", 0, 1024, 20.0), ("exact_region", 1024, 1024, 40.0),  # median 1.0
            ("exact_region", 3072, 1024, 60.0), ("exact_region", 4096, 1024, 48.0),  # 1.0, 1.6
            ("normalized", 0, 1024, 30.0)]  # no late bin
    bins = pd.DataFrame([{"variant": v, "start": s, "end": s + n, "tokens": n, "ppl": p} for v, s, n, p in rows])
    table = flatness_against_original(bins, flat_from=2048, bin_size=1024).set_index("variant")
    assert table.index.tolist() == ["blocks", "exact_region", "normalized"]
    blocks = table.loc["blocks"]  # a late bin of 66 is 2.1× its early median (31), but 1.1× the original's there
    assert not flatness(bins, flat_from=2048, bin_size=1024).set_index("variant").loc["blocks"].met  # the plain goal
    assert (blocks.bins_before, blocks.bins_beyond, blocks.max_beyond_start, blocks.exceeding) == (2, 2, 4096, 0)
    assert blocks.reference_ratio == pytest.approx(1.05) and blocks.max_beyond_ratio == pytest.approx(1.2)
    assert blocks.max_over_reference == pytest.approx(1.2 / 1.05) and blocks.met
    exact = table.loc["exact_region"]  # 1.6 > 1.5 × 1.0
    assert exact.exceeding == 1 and not exact.met and exact.max_beyond_start == 4096
    assert table.loc["normalized"].met is None and table.loc["normalized"].bins_beyond == 0
    assert flatness_against_original(bins, 2048, 1024, ratio=1.1).set_index("variant").loc["blocks"].exceeding == 1
    for bad in (dict(ratio=0), dict(bin_size=0), dict(flat_from=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            flatness_against_original(bins, **{"flat_from": 2048, "bin_size": 1024, **bad})


def test_memory_table_per_token():
    table = memory_table({"original": {"tokens": 100, "cache_bytes": 4600, "capacity_bytes": 4600},
                          "blocks": {"tokens": 200, "cache_bytes": 13800, "capacity_bytes": 20000}},
                         {"original": 4600, "blocks": 13800}, kv_bytes_per_token=46.0)
    assert table.variant.tolist() == ["blocks", "original"]  # VARIANTS order
    assert table.bytes_per_token.tolist() == [69.0, 46.0] and table.vs_kv_cache.tolist() == pytest.approx([1.5, 1.0])
    assert table.capacity_per_token.tolist() == [100.0, 46.0]
