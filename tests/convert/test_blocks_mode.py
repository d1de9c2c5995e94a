"""retrieval="blocks" for converted models (bsbr.convert.retrieval.BlocksMode over bsbr.blocks): tiny random Llama
(GQA 4/2 heads, head_dim 16) and GPT-2, chunk 4, block 2, top-2, one sink unless stated. Logit tolerance 1e-4 (float32)
for cached/padded paths and 1e-5 against the original model; the layer's maths against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from bsbr.convert import BSBRCache, convert_to_bsbr, converted_copy, load_conversion, save_conversion, set_retrieval
from bsbr.convert.checkpoint import conversion_settings
from bsbr.convert.retrieval import BlocksMode
from tests.conftest import tiny_gpt2, tiny_llama
from tests.convert.test_cache import feed_in_pieces, greedy_reference, padded_batch, tokens
from tests.reference import dense_block_attention

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
SETTINGS = dict(block_size=2, top_k=2, summary="minmax", sink_size=1)


def blocks_model(family="llama", chunk_size=4, seed=0, attn_implementation="sdpa", **options):
    model = tiny_gpt2(attn_implementation, seed=seed) if family == "gpt2" else tiny_llama(attn_implementation, seed)
    model = convert_to_bsbr(model, chunk_size, retrieval="blocks", **{**SETTINGS, **options})
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def first_attention(model):
    return model.transformer.h[0].attn if model.config.model_type == "gpt2" else model.model.layers[0].self_attn


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_everything_reachable_equals_the_original(family):
    original = tiny_gpt2() if family == "gpt2" else tiny_llama()
    x = tokens(2, 23)
    with torch.no_grad():
        expected = original(x).logits
        for options in ({"block_size": 4}, {"top_k": 100}, {"dense_layers": [0, 1]}):
            chunk = 32 if "block_size" in options else 4  # one chunk; every block retrieved; every layer dense
            got = converted_copy(original, chunk, retrieval="blocks", **{**SETTINGS, **options})(x).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        partial = converted_copy(original, 4, retrieval="blocks", **SETTINGS)(x).logits
    assert (partial - expected).abs().max() > 1e-3  # with 4-token chunks and top-2 it is not the original


@pytest.mark.parametrize(("summary", "selection", "retrieval"), [("minmax", "group", True), ("mean", "head", True),
                                                                 ("minmax", "group", False)])
def test_layer_maths_is_the_reference(summary, selection, retrieval):
    model = blocks_model(summary=summary, selection=selection)
    layer = first_attention(model).double()
    set_retrieval(model, retrieval)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 31, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    got = BlocksMode.attend(layer, None, q, k, v, 0.0)
    expected = dense_block_attention(q, k, v, 4, 2, 2 if retrieval else 0, 1, summary, selection)
    assert (got - expected).abs().max() <= 1e-10


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_through_the_model(family):
    model = blocks_model(family)
    x = tokens(1, 29)
    with torch.no_grad():
        base = model(x).logits
        for t in (3, 12, 20):
            y = x.clone()
            y[0, t] = (y[0, t] + 37) % 100
            out = model(y).logits
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert (out[:, t:] - base[:, t:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pieces", [(1,) * 23, (3, 1, 6, 2, 11), (5, 5, 13)])
def test_pieces_with_cache_equal_full_forward(family, pieces):
    model = blocks_model(family, dense_layers=[1])
    x = tokens(2, 23)
    with torch.no_grad():
        full = model(x).logits
        cache = BSBRCache(model.config.num_hidden_layers)
        torch.testing.assert_close(feed_in_pieces(model, x, pieces, cache), full, atol=ATOL, rtol=0)
    # every token's keys and values (2 rows, 2 layers, G·d = 32 or 64 values each) plus 11 blocks' min and max
    width = 64 if family == "gpt2" else 32
    assert cache.nbytes() == 4 * 2 * 2 * width * (2 * 23 + 2 * 11)


def test_pieces_in_float64_are_tighter():
    model = blocks_model(summary="mean").double()
    x = tokens(1, 27)
    with torch.no_grad():
        full = model(x).logits
        pieces = feed_in_pieces(model, x, (1, 4, 2, 7, 13), BSBRCache(2))
    assert (pieces - full).abs().max() <= 1e-10


def test_retrieval_off_is_local_and_sinks_with_the_cache():
    model = set_retrieval(blocks_model(), False)
    x = tokens(2, 19)
    with torch.no_grad():
        full = model(x).logits
        torch.testing.assert_close(feed_in_pieces(model, x, (2, 9, 8), BSBRCache(2)), full, atol=ATOL, rtol=0)
        assert (full - set_retrieval(model, True)(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(family, side):
    model = blocks_model(family)
    ids, mask, rows = padded_batch((13, 6, 17, 9), 17, side)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            torch.testing.assert_close(logits[i, mask[i].bool()], model(row[None]).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("family", "attn_implementation"), [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_ragged_batched_generation_equals_each_prompt_alone(family, attn_implementation):
    model = blocks_model(family, attn_implementation=attn_implementation)
    ids, mask, rows = padded_batch((7, 3, 11), 11, "left")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True)
        assert isinstance(out.cache, BSBRCache)
        for i, row in enumerate(rows):
            alone = model.generate(row[None], max_new_tokens=8, do_sample=False)
            torch.testing.assert_close(out.sequences[i, 11:], alone[0, len(row):], atol=0, rtol=0)
            torch.testing.assert_close(alone, greedy_reference(model, row[None], 8), atol=0, rtol=0)


def test_settings_round_trip_through_a_checkpoint(tmp_path):
    options = dict(block_size=2, top_k=3, summary="mean", sink_size=2, selection="head", dense_layers=[1])
    model = convert_to_bsbr(tiny_llama(), 4, retrieval="blocks", **options)
    path = tmp_path / "blocks.safetensors"
    save_conversion(model, path)
    loaded = load_conversion(tiny_llama(), path)
    assert conversion_settings(loaded) == conversion_settings(model)
    assert conversion_settings(model)["normalized_options"] == {**options, "positions": "original", "page_size": None,
                                                                "router": "query"}
    x = tokens(1, 21)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize(("options", "match"), [
    ({"summary": "median"}, "summary"), ({"block_size": 3}, "block_size"), ({"top_k": 0}, "top_k"),
    ({"sink_size": -1}, "sink_size"), ({"selection": "layer"}, "selection"), ({"dense_layers": [2]}, "dense_layers"),
    ({"dense_layers": "0"}, "dense_layers"), ({"window": 3}, "unknown options"), ({"compression_factor": 4},
                                                                                  "compression_factor"),
    ({"router": "summary"}, "router"), ({"router": "meta", "block_size": 2}, "router='meta'.*block_size"),
    ({"router": "meta", "block_size": 4, "page_size": 2}, "page_size")])
def test_bad_settings_raise_naming_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        convert_to_bsbr(tiny_llama(), 4, retrieval="blocks", **options)


def test_padded_generation_with_and_without_cache_agree_also_for_beam_search():
    model = blocks_model(top_k=1)
    ids, mask, _ = padded_batch((7, 3, 11), 11, "left")
    with torch.no_grad():
        for beams in (1, 3):  # beam search reorders the cache rows
            cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False)
            full = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False,
                                  use_cache=False)
            torch.testing.assert_close(cached, full, atol=0, rtol=0)


def test_compact_positions_layer_maths_is_the_reference():
    """positions="compact" in a converted Llama: the layer's RoPE frequencies and the written-out reference, which
    applies RoPE to raw queries/keys at the scheme's explicit positions."""
    from tests.reference import dense_block_attention_compact, rope_at

    model = blocks_model(positions="compact", summary="mean", selection="head")
    layer = first_attention(model).double()
    inv_freq = layer.rope_inv_freq.double()
    torch.testing.assert_close(inv_freq, model.model.rotary_emb.inv_freq.double(), atol=0, rtol=0)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 29, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    positions = torch.arange(29)
    got = BlocksMode.attend(layer, None, rope_at(q, positions, inv_freq), rope_at(k, positions, inv_freq), v, 0.0)
    expected = dense_block_attention_compact(q, k, v, inv_freq, 4, 2, 2, 1, "mean", "head")
    assert (got - expected).abs().max() <= 1e-10


def test_compact_positions_through_the_model_cache_padding_and_generation():
    original = tiny_llama()
    x = tokens(2, 23)
    model = blocks_model(positions="compact")
    with torch.no_grad():
        one_chunk = converted_copy(original, 32, retrieval="blocks", **SETTINGS, positions="compact")(x).logits
        torch.testing.assert_close(one_chunk, original(x).logits, atol=1e-5, rtol=0)
        full = model(x).logits
        assert (full - blocks_model()(x).logits).abs().max() > 1e-3  # the positions matter
        torch.testing.assert_close(feed_in_pieces(model, x, (3, 1, 6, 2, 11), BSBRCache(2)), full, atol=ATOL,
                                   rtol=0)
        y = x.clone()
        y[:, 12] = (y[:, 12] + 37) % 100
        torch.testing.assert_close(model(y).logits[:, :12], full[:, :12], atol=1e-6, rtol=0)  # causal
        ids, mask, _ = padded_batch((7, 3, 11), 11, "left")
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(cached, model.generate(ids, attention_mask=mask, max_new_tokens=6,
                                                          do_sample=False, use_cache=False), atol=0, rtol=0)


def test_compact_positions_keep_float64_frequencies_when_the_model_is_cast():
    model = blocks_model(positions="compact").to(torch.bfloat16)
    inv_freq = first_attention(model).rope_inv_freq
    assert inv_freq.dtype == torch.float64  # not rounded to bfloat16 with the weights
    torch.testing.assert_close(inv_freq, tiny_llama().model.rotary_emb.inv_freq.double(), atol=0, rtol=0)


def test_compact_positions_need_rope_and_no_dense_layers():
    with pytest.raises(ValueError, match="RoPE"):
        convert_to_bsbr(tiny_gpt2(), 4, retrieval="blocks", positions="compact")
    with pytest.raises(ValueError, match="dense_layers"):
        convert_to_bsbr(tiny_llama(), 4, retrieval="blocks", positions="compact", dense_layers=[0])
    with pytest.raises(ValueError, match="positions"):
        convert_to_bsbr(tiny_llama(), 4, retrieval="blocks", positions="relative")


# --- router="meta": BSBR's chunk routing choosing whole chunks, retrieved exactly ---------------------------------------

META = dict(block_size=4, top_k=1, router="meta")


def meta_scores_written_out(layer, hidden, chunk_size):
    """For every query chunk c: head h's score of chunk j = meta_q(mean hidden of chunk c - 1)_h · meta_k(mean hidden
    of chunk j)_{h's key/value head}; row 0 zeros (chunk 0 has no candidates). ``[b, H, chunks, chunks]``."""
    batch, n, _ = hidden.shape
    chunks = -(-n // chunk_size)
    heads, groups, d = layer.num_heads, layer.num_key_value_heads, layer.head_dim
    scores = torch.zeros(batch, heads, chunks, chunks, dtype=hidden.dtype)
    means = [hidden[:, j * chunk_size: (j + 1) * chunk_size].mean(1) for j in range(n // chunk_size)]
    for c in range(1, chunks):
        meta_q = layer.meta_q_proj(means[c - 1]).view(batch, heads, d)
        for j in range(min(c - 1, len(means))):
            meta_k = layer.meta_k_proj(means[j]).view(batch, groups, d)
            for h in range(heads):
                scores[:, h, c, j] = (meta_q[:, h] * meta_k[:, h // (heads // groups)]).sum(-1)
    return scores


@pytest.mark.parametrize("selection", ["group", "head"])
def test_meta_router_layer_maths_is_the_reference(selection):
    model = blocks_model(**META, selection=selection)
    layer = first_attention(model).double()
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 31, model.config.hidden_size, generator=g, dtype=torch.float64)
    q, k, v = (torch.randn(2, h, 31, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    with torch.no_grad():
        got = BlocksMode.attend(layer, hidden, q, k, v, 0.0)
        scores = meta_scores_written_out(layer, hidden, 4)
    expected = dense_block_attention(q, k, v, 4, 4, 1, 1, "minmax", selection, chunk_scores=scores)
    assert (got - expected).abs().max() <= 1e-10
    by_query = BlocksMode.attend(first_attention(blocks_model(block_size=4, top_k=1)).double(), hidden, q, k, v, 0.0)
    assert (got - by_query).abs().max() > 1e-3  # the meta router chooses other chunks than the queries do


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_meta_router_causal_cached_padded_and_generating(family):
    """Causal through the routing (a token changes nothing before it: neither outputs nor which chunks earlier tokens
    read); pieces with the cache equal one forward (a dense layer included); padded rows equal rows alone; cached and
    uncached greedy and beam generation agree; its cache reports the router's bytes."""
    model = blocks_model(family, **META, dense_layers=[1])
    x = tokens(2, 27)
    with torch.no_grad():
        full = model(x).logits
        for t in (5, 13, 22):
            y = x.clone()
            y[:, t] = (y[:, t] + 37) % 100
            out = model(y).logits
            torch.testing.assert_close(out[:, :t], full[:, :t], atol=1e-6, rtol=0)
            assert (out[:, t:] - full[:, t:]).abs().max() > 1e-3
        for pieces in ((1,) * 27, (3, 1, 6, 2, 15), (8, 19)):
            cache = BSBRCache(2)
            torch.testing.assert_close(feed_in_pieces(model, x, pieces, cache), full, atol=ATOL, rtol=0)
        # per row, both layers: keys and values of 27 tokens and 6 blocks' min and max (G·d = width values each);
        # layer 0 (routed) also 6 meta-keys, the partial chunk's hidden sum and the last meta-query (H·d = 64)
        width = 64 if family == "gpt2" else 32
        kv_cache = 2 * 27 * width + 2 * 6 * width
        assert cache.nbytes() == 4 * 2 * (2 * kv_cache + 6 * width + model.config.hidden_size + 64)
        ids, mask, rows = padded_batch((13, 6, 17, 9), 17, "left")
        logits = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            torch.testing.assert_close(logits[i, mask[i].bool()], model(row[None]).logits[0], atol=ATOL, rtol=0)
        ids, mask, _ = padded_batch((7, 3, 11), 11, "left")
        for beams in (1, 3):
            cached = model.generate(ids, attention_mask=mask, max_new_tokens=14, num_beams=beams, do_sample=False)
            uncached = model.generate(ids, attention_mask=mask, max_new_tokens=14, num_beams=beams, do_sample=False,
                                      use_cache=False)
            torch.testing.assert_close(cached, uncached, atol=0, rtol=0)


def test_meta_router_pieces_in_float64_are_tighter_and_it_round_trips(tmp_path):
    model = blocks_model(**META, summary="mean").double()
    x = tokens(1, 30)
    with torch.no_grad():
        full = model(x).logits
        assert (feed_in_pieces(model, x, (1, 4, 2, 7, 16), BSBRCache(2)) - full).abs().max() <= 1e-10
        torch.nn.init.normal_(first_attention(model).meta_k_proj.weight)  # the meta projections are its router
        moved = model(x).logits
        assert (moved - full).abs().max() > 1e-3
        path = tmp_path / "meta.safetensors"
        save_conversion(model, path)
        loaded = load_conversion(tiny_llama().double(), path)
        assert conversion_settings(loaded)["normalized_options"]["router"] == "meta"
        torch.testing.assert_close(loaded(x).logits, moved, atol=0, rtol=0)
