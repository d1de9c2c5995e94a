"""bsbr.streaming_eval: streamed NLL equals one full forward's, cache bytes equal their formulas, the schedule tiles
the text. Tiny random Llama (tests.conftest.tiny_llama: 2 layers, 4 query / 2 kv heads, head_dim 16), fp32."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from bsbr import metrics as M
from bsbr.convert import BSBRCache, convert_to_bsbr
from bsbr.convert import set_retrieval
from bsbr.streaming_eval import (binned_nll, blocks_cache_nbytes, cache_capacity_nbytes, cache_nbytes, kv_cache_nbytes,
                                 normalized_cache_nbytes, stream_nll, stream_schedule)
from tests.conftest import tiny_llama

CHUNK, SINKS, LENGTH = 5, 2, 37


pytestmark = pytest.mark.usefixtures("one_thread")


def normalized_model():
    model = convert_to_bsbr(tiny_llama(seed=3), CHUNK, retrieval="normalized", sink_size=SINKS)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move the new parameters off their init so retrieval matters
        for layer in model.model.layers:
            for parameter in layer.self_attn.normalized.parameters():
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def text(length=LENGTH, seed=1):
    return torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(seed))


def test_schedule_tiles_the_text_once_with_single_token_decodes():
    calls = stream_schedule(20, 6, decode_positions=[4, 11, 19, 25], decode_steps=3)
    assert calls == [(0, 4, "piece"), (4, 5, "decode"), (5, 6, "decode"), (6, 7, "decode"), (7, 11, "piece"),
                     (11, 12, "decode"), (12, 13, "decode"), (13, 14, "decode"), (14, 19, "piece"),
                     (19, 20, "decode")]  # 19: cut at the end; 25: beyond the text
    assert stream_schedule(13, 5) == [(0, 5, "piece"), (5, 10, "piece"), (10, 13, "piece")]
    assert stream_schedule(13, 5, decode_positions=[3], decode_steps=0) == stream_schedule(13, 5)
    for bad in (dict(decode_positions=[4, 5], decode_steps=2), dict(decode_positions=[3, 3]),
                dict(decode_positions=[-1], decode_steps=1), dict(decode_steps=-1)):
        with pytest.raises(ValueError):
            stream_schedule(20, 6, **bad)
    with pytest.raises(ValueError, match="piece_size"):
        stream_schedule(20, 0)


@pytest.mark.parametrize("kind", ["bsbr", "original"])
def test_streamed_nll_equals_one_full_forward(kind):
    model = normalized_model() if kind == "bsbr" else tiny_llama(seed=3)
    ids = text()
    with torch.inference_mode():
        reference = M.token_nll(model(ids).logits, ids)[0]  # [LENGTH - 1]
    cache = BSBRCache(model.config.num_hidden_layers) if kind == "bsbr" else DynamicCache()
    run = stream_nll(model, ids, cache, piece_size=7, decode_positions=[9, 23], decode_steps=3)
    assert run.tokens_fed == LENGTH and run.nll.shape == (LENGTH - 1,)
    torch.testing.assert_close(run.nll, reference, atol=2e-5, rtol=1e-5)
    assert [(s["start"], s["end"], s["kind"]) for s in run.steps] == stream_schedule(LENGTH, 7, [9, 23], 3)
    assert all(s["seconds"] > 0 and s["seconds_per_token"] == s["seconds"] / s["tokens"] for s in run.steps)
    assert all(s["rss_bytes"] is None or s["rss_bytes"] > 2**20 for s in run.steps)


def test_cache_bytes_follow_the_formulas_after_every_call():
    config = tiny_llama().config
    model = normalized_model()
    feature_dim = model.model.layers[0].self_attn.normalized.query_map.feature_dim
    run = stream_nll(model, text(), BSBRCache(config.num_hidden_layers), piece_size=4, decode_positions=[10],
                     decode_steps=6)
    for step in run.steps:
        assert step["cache_bytes"] == normalized_cache_nbytes(config, step["end"], CHUNK, SINKS, feature_dim), step
    original = stream_nll(tiny_llama(seed=3), text(), DynamicCache(), piece_size=6, max_tokens=20)
    assert original.tokens_fed == 20 and original.nll.shape == (20,)  # position 19 predicts token 20
    assert [s["end"] for s in original.steps] == [6, 12, 18, 20]
    for step in original.steps:  # 2 layers · (keys + values) · 2 kv heads · head_dim 16 · tokens · 4 bytes
        assert step["cache_bytes"] == kv_cache_nbytes(config, step["end"]) == 2 * 2 * 2 * 16 * step["end"] * 4
    # the formula's growth per chunk: H·2f·(d + 1) + G·d values per layer
    growth = normalized_cache_nbytes(config, 3 * CHUNK, CHUNK, SINKS, feature_dim) \
        - normalized_cache_nbytes(config, 2 * CHUNK, CHUNK, SINKS, feature_dim)
    assert growth == 4 * 2 * (4 * 2 * feature_dim * 17 + 2 * 16)
    assert normalized_cache_nbytes(config, 0, CHUNK, SINKS, feature_dim) == 0 == cache_nbytes(DynamicCache())


@pytest.mark.parametrize(("summary", "positions", "retrieval", "page_size"),
                         [("mean", "compact", True, None), ("minmax", "original", True, None),
                          ("mean", "compact", False, None), ("minmax", "compact", True, 2)])
def test_block_retrieval_cache_bytes_follow_the_formula(summary, positions, retrieval, page_size):
    config = tiny_llama().config
    model = set_retrieval(convert_to_bsbr(tiny_llama(seed=3), 8, retrieval="blocks", block_size=4, top_k=2,
                                          summary=summary, sink_size=2, positions=positions, page_size=page_size),
                          retrieval)
    ids = text(45)
    with torch.inference_mode():
        reference = M.token_nll(model(ids).logits, ids)[0]  # [44]
    cache = BSBRCache(config.num_hidden_layers)
    run = stream_nll(model, ids, cache, piece_size=6, decode_positions=[15, 31], decode_steps=3)
    torch.testing.assert_close(run.nll, reference, atol=2e-5, rtol=1e-5)
    rows = 3 if positions == "compact" else 2
    parts = 1 if summary == "mean" else 2
    page = page_size or 4
    for step in run.steps:  # 2 layers · 2 kv heads · head_dim 16 · 4 bytes · (rows per token, summaries per page)
        end = step["end"]
        assert step["cache_bytes"] == blocks_cache_nbytes(config, end, 4, summary, positions, page_size=page_size) \
            == 2 * 2 * 16 * 4 * (rows * end + parts * (end // page)), step
    # the buffers double when full: at least what is in use, at most about twice it (and 16 rows at the start)
    used, allocated = cache_nbytes(cache), cache_capacity_nbytes(cache)
    assert used <= allocated <= 2 * used + 2 * 2 * 16 * 4 * 16 * (rows + parts)
    assert cache_capacity_nbytes(DynamicCache()) == 0
    with pytest.raises(ValueError, match="summary"):
        blocks_cache_nbytes(config, 4, 4, "max")
    with pytest.raises(ValueError, match="positions"):
        blocks_cache_nbytes(config, 4, 4, positions="near")
    with pytest.raises(ValueError, match="block_size"):
        blocks_cache_nbytes(config, 4, 0)
    with pytest.raises(TypeError, match="cache must be"):
        cache_capacity_nbytes(object())


def test_max_tokens_prefix_matches_the_full_stream():
    model = tiny_llama(seed=3)
    full = stream_nll(model, text(), DynamicCache(), piece_size=8)
    part = stream_nll(model, text(), DynamicCache(), piece_size=5, max_tokens=13)
    torch.testing.assert_close(part.nll, full.nll[:13], atol=2e-5, rtol=1e-5)


def test_bad_inputs_raise_before_work():
    model = tiny_llama()
    with pytest.raises(ValueError, match="input_ids"):
        stream_nll(model, text()[0], DynamicCache(), 4)
    with pytest.raises(ValueError, match="input_ids"):
        stream_nll(model, text().float(), DynamicCache(), 4)
    with pytest.raises(TypeError, match="cache must be"):
        stream_nll(model, text(), object(), 4)
    with pytest.raises(ValueError, match="max_tokens"):
        stream_nll(model, text(), DynamicCache(), 4, max_tokens=0)
    used = DynamicCache()
    with torch.inference_mode():
        model(text(5), cache=used, use_cache=True)
    with pytest.raises(ValueError, match="empty"):
        stream_nll(model, text(), used, 4)


def test_binned_nll_means_and_cumulative():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    rows = binned_nll(nll, 2)
    assert [(r["start"], r["end"], r["tokens"]) for r in rows] == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]
    assert [r["nll"] for r in rows] == [1.5, 3.5, 5.0]
    assert [r["cumulative_nll"] for r in rows] == [1.5, 2.5, 3.0]
    assert rows[1]["ppl"] == pytest.approx(math.exp(3.5)) and rows[2]["cumulative_ppl"] == pytest.approx(math.exp(3))
    with pytest.raises(ValueError, match="bin_size"):
        binned_nll(nll, 0)
