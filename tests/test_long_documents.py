"""bsbr.long_documents: the tables and conclusion numbers of the long-document notebook, on a tiny random Llama and
hand-made runs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from bsbr.long_documents import (bytes_per_token, check_long_document_parameters, choose_play, decode_latency,
                                 held_out_plays, line_fit, perplexity_bins, predict, steps_table, stream_fits,
                                 stream_matches_full_forward, stream_summary, token_nll_table)
from bsbr.streaming_eval import kv_cache_nbytes, normalized_cache_nbytes

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_check_long_document_parameters_names_the_bad_one():
    good = dict(splits=["validation"], min_play_tokens=10, max_tokens=None, piece_size=4, decode_every=8,
                decode_steps=2, original_max_tokens=5, bin_size=4, threads=0)
    check_long_document_parameters(**good)
    for key, bad, match in (("splits", ["train"], "splits"), ("splits", ["nope"], "splits"),
                            ("piece_size", 0, "piece_size"), ("max_tokens", 0, "max_tokens"),
                            ("threads", -1, "threads"), ("decode_steps", 8, "decode_steps")):
        with pytest.raises(ValueError, match=match):
            check_long_document_parameters(**{**good, key: bad})


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
    assert choose_play(plays, ["validation", "test"], 9, eos_token_id=0).doc_ids == ["v2", "v3"]  # 5 + EOS + 3
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


def test_line_fit_exact_and_degenerate():
    assert line_fit([0, 1, 2], [1, 3, 5]) == pytest.approx((2.0, 1.0, 1.0))
    slope, intercept, r2 = line_fit([3, 3], [1.0, 2.0])
    assert math.isnan(slope) and intercept == 1.5 and math.isnan(r2)
    assert line_fit([0, 1], [2.0, 2.0])[2] == 1.0  # a flat line is fitted exactly


def fake_runs():
    """BSBR over 8 tokens, original over 4; two pieces of 2 tokens then single-token decode steps."""
    def run(nll, steps):
        return SimpleNamespace(nll=torch.tensor(nll), steps=steps)

    def step(kind, start, end, seconds, cache):
        return {"kind": kind, "start": start, "end": end, "tokens": end - start, "seconds": seconds,
                "seconds_per_token": seconds / (end - start), "cache_bytes": cache, "rss_bytes": 100 + end}

    bsbr = run([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0], [
        step("piece", 0, 2, 0.2, 10), step("piece", 2, 4, 0.4, 20), step("decode", 3, 4, 0.05, 20),
        step("decode", 4, 5, 0.01, 25), step("piece", 5, 7, 0.6, 30), step("decode", 7, 8, 0.07, 40)])
    original = run([1.0, 1.0, 1.0], [step("piece", 0, 2, 0.2, 8), step("decode", 3, 4, 0.02, 16)])
    return {"original": original, "bsbr": bsbr}


def test_tables_from_the_runs():
    runs = fake_runs()
    per_token = token_nll_table(runs, torch.arange(9)[None])
    assert per_token.position.tolist() == list(range(7)) and per_token.target_token.tolist() == list(range(1, 8))
    assert per_token.original_nll.iloc[:3].tolist() == [1.0] * 3 and per_token.original_nll.iloc[3:].isna().all()
    bins = perplexity_bins(runs, 4)
    assert list(zip(bins.model, bins.bin)) == [("bsbr", 0), ("bsbr", 1), ("original", 0)]
    assert bins.ppl.iloc[0] == pytest.approx(math.exp(1.5)) and bins.ppl.iloc[1] == pytest.approx(math.exp(3.0))
    steps = pd.DataFrame([{"model": name, **s} for name, run in runs.items() for s in run.steps])
    steps["finishes_chunk"] = (steps.model == "bsbr") & (steps.end % 4 == 0)
    latency = decode_latency(steps, decode_every=4)
    # a position whose only step finishes a chunk (bsbr at 7) has no ordinary step: no row
    assert list(zip(latency.model, latency.decode_position)) == [("bsbr", 3), ("original", 3)]
    bsbr3 = latency.iloc[0]
    assert (bsbr3.median_s, bsbr3.steps, bsbr3.chunk_finish_s) == (0.01, 1, 0.05)  # the step ending at 4 folds a chunk
    assert math.isnan(latency.iloc[1].chunk_finish_s)
    fits = stream_fits(["bsbr", "original"], steps, latency, piece_size=2)
    cache = fits[(fits.model == "bsbr") & (fits.quantity == "cache_bytes")].iloc[0]
    assert cache.points == 6 and cache.x_max == 8
    assert predict(fits, "bsbr", "cache_bytes", 0) == pytest.approx(cache.intercept)
    pieces = fits[(fits.model == "bsbr") & (fits.quantity == "piece_time_per_token")].iloc[0]
    assert (pieces.slope_per_token, pieces.intercept, pieces.r2) == pytest.approx(
        line_fit([0, 2, 5], [0.1, 0.2, 0.3]))  # the full pieces' seconds per token against their start


def test_steps_table_and_bytes_per_token_follow_the_formulas():
    config = tiny_llama().config
    runs = {"bsbr": SimpleNamespace(steps=[{"kind": "piece", "start": 0, "end": 8}]),
            "original": SimpleNamespace(steps=[{"kind": "piece", "start": 0, "end": 6}])}
    steps = steps_table(runs, config, chunk_size=4, sink_size=1, feature_dim=2)
    assert steps.model.tolist() == ["bsbr", "original"] and steps.finishes_chunk.tolist() == [True, False]
    assert steps.expected_cache_bytes.tolist() == [normalized_cache_nbytes(config, 8, 4, 1, 2),
                                                   kv_cache_nbytes(config, 6)]
    per_token = bytes_per_token(config, chunk_size=4, feature_dim=2)
    assert per_token["original"] == 4 * 2 * 2 * 4 * 2  # fp32 · (k, v) · kv heads · head_dim · layers
    assert per_token["bsbr"] == (normalized_cache_nbytes(config, 12, 4, 0, 2) - normalized_cache_nbytes(config, 8, 4, 0, 2)) / 4


def test_stream_summary_numbers():
    runs = fake_runs()
    config = tiny_llama().config
    steps = pd.DataFrame([{"model": name, **s} for name, run in runs.items() for s in run.steps])
    steps["finishes_chunk"] = (steps.model == "bsbr") & (steps.end % 4 == 0)
    latency = decode_latency(steps, 4)
    bins = perplexity_bins(runs, 2)
    fits = stream_fits(["bsbr", "original"], steps, latency, 2)
    s = stream_summary(runs, steps, bins, latency, fits, config, original_tokens=4, streamed=8, chunk_size=2,
                       sink_size=0, feature_dim=2, bin_size=2, piece_size=2)
    assert s.common == 4 and s.ppl_common == pytest.approx({"bsbr": math.exp(4 / 3), "original": math.e})
    assert s.ppl_after == pytest.approx({"bsbr": math.exp(2.0), "original": math.e})  # position 2 only
    assert s.reference_bin_ppl == pytest.approx((math.e + math.e**2) / 2)  # median of the bins ending by 4
    assert s.degrade_from == 4 and int(s.peak_bin.start) == 4 and s.last_bin_ppl == pytest.approx(math.exp(3.0))
    assert s.last_common == 3 and s.lat_common == {"original": 0.02, "bsbr": 0.01} and s.latency_wins
    assert (s.first_bsbr, s.last_bsbr) == (3, 3)  # the decode step at 7 finishes a chunk: no ordinary step there
    assert s.state_end == 40 and s.kv_common == 16 and s.kv_end == kv_cache_nbytes(config, 8)
    assert s.rss.to_dict() == {"bsbr": 108, "original": 104} and s.bsbr_ppl_loses
    assert (s.piece_early, s.piece_late) == pytest.approx((0.1, 0.3))  # quarter = 1 of three full pieces
    assert s.memory_ratio == pytest.approx(40 / kv_cache_nbytes(config, 8))
