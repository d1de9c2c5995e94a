"""Incremental decoding (BSBRCache) and padding for BSBR-converted Llama and GPT-2 models (bsbr.convert.cache).

Tiny random models (tests.conftest.tiny_llama: GQA 4/2 heads, head_dim 16; tests.conftest.tiny_gpt2),
fp32, fixed seeds, odd lengths, chunk sizes 4 and 5. Families "normalized" and "gpt2_normalized" are the tiny Llama
and GPT-2 with ``retrieval="normalized"`` (one sink token; its new parameters moved away from their init so that
retrieval matters). Tolerance 1e-4 (absolute) on logits throughout.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from transformers import DynamicCache

from bsbr.convert import BSBRConvertedAttention, convert_to_bsbr, set_retrieval
from bsbr.convert.cache import BSBRCache
from tests.conftest import tiny_gpt2, tiny_llama

ATOL = 1e-4
VOCAB = 100
PIECES = [(1,) * 17, (3, 1, 6, 2, 5), (5, 5, 7), (17,)]  # each sums to 17; crosses chunk boundaries of 4 and 5


pytestmark = pytest.mark.usefixtures("one_thread")


def converted(family: str, chunk_size: int, compression_factor: int | None = None, seed: int = 0,
              attn_implementation: str = "sdpa"):
    model = (tiny_gpt2(attn_implementation, seed=seed) if family.startswith("gpt2")
             else tiny_llama(attn_implementation, seed=seed))
    if family.endswith("normalized"):
        model = convert_to_bsbr(model, chunk_size, compression_factor, retrieval="normalized", sink_size=1)
        generator = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, BSBRConvertedAttention)):
                for parameter in layer.normalized.parameters():
                    parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    else:
        model = convert_to_bsbr(model, chunk_size, compression_factor)
    model.generation_config.eos_token_id = None  # fixed-length generations, comparable row by row
    model.generation_config.pad_token_id = 0
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


CONFIGS = [("llama", 4, None), ("llama", 5, None), ("llama", 4, 4), ("llama", 5, 4), ("gpt2", 4, None),
           ("gpt2", 5, None), ("gpt2", 5, 4), ("normalized", 4, None), ("normalized", 5, 4),
           ("gpt2_normalized", 4, None), ("gpt2_normalized", 5, 4)]
FAMILIES = ["llama", "gpt2", "normalized", "gpt2_normalized"]


def feed_in_pieces(model, x, pieces, cache):
    logits, start = [], 0
    for size in pieces:
        logits.append(model(x[:, start: start + size], cache=cache).logits)
        start += size
    return torch.cat(logits, dim=1)


# --- pieces == one full forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "chunk_size", "compression"), CONFIGS)
@pytest.mark.parametrize("pieces", PIECES)
def test_pieces_with_cache_equal_full_forward(family, chunk_size, compression, pieces):
    model = converted(family, chunk_size, compression)
    x = tokens(2, sum(pieces))
    with torch.no_grad():
        full = model(x).logits
        cache = BSBRCache(model.config.num_hidden_layers)
        pieces_logits = feed_in_pieces(model, x, pieces, cache)
    torch.testing.assert_close(pieces_logits, full, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == sum(pieces)


@pytest.mark.parametrize("family", FAMILIES)
def test_use_cache_returns_a_bsbr_cache_that_continues(family):
    model = converted(family, 4)
    x = tokens(2, 11)
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :6], use_cache=True)
        assert isinstance(first.cache, BSBRCache) and first.cache.get_seq_length() == 6
        second = model(x[:, 6:], cache=first.cache, use_cache=True)
        assert model(x).cache is None  # config.use_cache stays False: plain forwards build no cache
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_retrieval_off_works_with_the_cache(family):
    model = set_retrieval(converted(family, 4), False)
    x = tokens(2, 13)
    with torch.no_grad():
        full = model(x).logits
        cache = BSBRCache(model.config.num_hidden_layers)
        pieces = feed_in_pieces(model, x, (1, 3, 6, 3), cache)
        torch.testing.assert_close(pieces, full, atol=ATOL, rtol=0)
        # only the current chunk's keys and values are kept: 13 % 4 = 1 token, 2 tensors, every layer and row;
        # the normalised retrieval also keeps its sink token's key and value, and the hidden-state sum (64 values)
        d, kv_heads = 16, (4 if family.startswith("gpt2") else 2)
        per_row = 2 * kv_heads * 1 * d + (2 * kv_heads * 1 * d + 64 if family.endswith("normalized") else 0)
        assert cache.nbytes() == 4 * 2 * model.config.num_hidden_layers * per_row
        set_retrieval(model, True)
        with pytest.raises(ValueError, match="retrieval was switched"):
            model(x[:, :1], cache=cache)


# --- generate --------------------------------------------------------------------------------------------------------


def greedy_reference(model, x, new_tokens):
    """Greedy decoding by repeated full forwards (no cache)."""
    with torch.no_grad():
        for _ in range(new_tokens):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


@pytest.mark.parametrize(("family", "chunk_size", "compression"), CONFIGS)
def test_generate_equals_repeated_argmax(family, chunk_size, compression):
    model = converted(family, chunk_size, compression)
    x = tokens(2, 7)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, BSBRCache)  # decoded with BSBR states, not full forwards
    assert out.cache.get_seq_length() == 7 + 9 - 1  # the last token is never fed
    torch.testing.assert_close(out.sequences, greedy_reference(model, x, 9), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_chunk_generation_equals_the_pretrained_model_with_its_kv_cache(family):
    """chunk_size >= every length: BSBR is the pretrained causal attention, cached or not."""
    original = tiny_gpt2() if family.startswith("gpt2") else tiny_llama()
    model = converted(family, 64)
    ids, mask, _ = padded_batch((7, 3, 11), 11, "left")
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = original.generate(ids, **settings)  # DynamicCache
        torch.testing.assert_close(model.generate(ids, **settings), expected, atol=0, rtol=0)


# --- padding ---------------------------------------------------------------------------------------------------------


def padded_batch(lengths, total, side, seed=2):
    """Rows of ``lengths`` real tokens padded (pad id 0) to ``total`` on ``side``; returns ids, mask, rows."""
    rows = [tokens(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), total, dtype=torch.long)
    mask = torch.zeros(len(rows), total, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(total - len(row), total) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask, rows


def positions(mask):
    """Each row's positions counted from its first real token (what generate passes)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize(("family", "chunk_size", "compression"), CONFIGS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(family, chunk_size, compression, side):
    """No position_ids: the converted model counts them from each row's first real token (GPT-2's positions are
    absolute, and under Llama's RoPE compressed chunk states and feature maps are not rotation-invariant: default
    positions would shift left-padded rows by up to ~3 in the logits). Given ones are the same here."""
    model = converted(family, chunk_size, compression)
    lengths = (13, 6, 17, 9)
    ids, mask, rows = padded_batch(lengths, 17, side)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        given = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            real = mask[i].bool()
            torch.testing.assert_close(logits[i, real], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(given, logits, atol=0, rtol=0)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("family", "compression"), [("llama", 4), ("normalized", 4), ("gpt2", None),
                                                     ("gpt2_normalized", None)])
def test_position_ids_given_by_the_caller_are_used_as_given(family, compression):
    """Default positions 0..n-1 given on a left-padded batch shift the short row: not the row alone. That was the
    fault when none were given (compressed states and feature maps are not rotation-invariant, GPT-2's positions are
    absolute); now they are derived from the mask, and the caller's are still used as given."""
    model = converted(family, 4, compression)
    ids, mask, rows = padded_batch((9, 17), 17, "left")
    with torch.no_grad():
        default = torch.arange(17).expand(2, 17)
        shifted = model(ids, attention_mask=mask, position_ids=default).logits[0, -9:]
        alone = model(rows[0][None]).logits[0]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[0, -9:], alone, atol=ATOL, rtol=0)
    assert (shifted - alone).abs().max() > 10 * ATOL


def test_padded_positions_give_zero_attention_output():
    model = converted("llama", 4)
    ids, mask, _ = padded_batch((5, 11), 11, "left")
    attention = model.model.layers[0].self_attn
    seen = {}
    hook = attention.register_forward_hook(lambda module, args, output: seen.setdefault("out", output[0]))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    hook.remove()
    # o_proj of a zero attention output: Llama's o_proj has no bias, so padded positions are exactly zero
    assert torch.equal(seen["out"][0, :6], torch.zeros_like(seen["out"][0, :6]))
    assert seen["out"][0, 6:].abs().amax() > 0


@pytest.mark.parametrize(("family", "chunk_size", "compression", "attn_implementation"),
                         [("llama", 4, None, "sdpa"), ("llama", 5, 4, "sdpa"), ("gpt2", 5, None, "sdpa"),
                          ("llama", 4, None, "eager"), ("gpt2", 4, None, "eager"), ("normalized", 5, 4, "sdpa"),
                          ("gpt2_normalized", 5, 4, "sdpa")])
def test_ragged_batched_generation_equals_each_prompt_alone(family, chunk_size, compression, attn_implementation):
    """Left-padded prompts of different lengths (one BSBR state per row) against each prompt generated alone; the
    4-D mask HF builds (sdpa or eager) is ignored by the BSBR layers."""
    model = converted(family, chunk_size, compression, attn_implementation=attn_implementation)
    ids, mask, rows = padded_batch((7, 3, 11), 11, "left")
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for i, row in enumerate(rows):
            alone = model.generate(row[None], max_new_tokens=8, do_sample=False)
            torch.testing.assert_close(batched[i, 11:], alone[0, len(row):], atol=0, rtol=0)
            torch.testing.assert_close(alone, greedy_reference(model, row[None], 8), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_generation_with_and_without_cache_agree_also_for_beam_search(family):
    model = converted(family, 4)
    ids, mask, _ = padded_batch((7, 3, 11), 11, "left")
    with torch.no_grad():
        for beams in (1, 3):  # beam search reorders the cache rows (BSBRCacheLayer.reorder_cache)
            cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False)
            full = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False,
                                  use_cache=False)  # full padded forwards every step
            torch.testing.assert_close(cached, full, atol=0, rtol=0)


def test_generate_uses_the_cache_after_deepcopy_and_pickling():
    model = converted("llama", 4)
    x = tokens(1, 6)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        expected = model.generate(x, max_new_tokens=4, do_sample=False)
        for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            out = other.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
            assert isinstance(out.cache, BSBRCache)
            torch.testing.assert_close(out.sequences, expected, atol=0, rtol=0)


def test_padded_prompt_fed_in_pieces_equals_rows_alone():
    """A left-padded prompt continued through the cache (mask growing with the fed positions; positions counted
    from each row's first real token, given as generate passes them, or derived from the mask when not given)."""
    model = converted("llama", 5, 4)
    ids, mask, rows = padded_batch((6, 13), 13, "left")
    cont = tokens(2, 6, seed=9)
    ids, mask = torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1)
    with torch.no_grad():
        for given in (True, False):
            cache = BSBRCache(model.config.num_hidden_layers)
            logits, start = [], 0
            for size in (4, 1, 9, 2, 3):
                stop = start + size
                extra = {"position_ids": positions(mask)[:, start:stop]} if given else {}
                logits.append(model(ids[:, start:stop], attention_mask=mask[:, :stop], cache=cache, **extra).logits)
                start = stop
            logits = torch.cat(logits, 1)
            for i, row in enumerate(rows):
                alone = model(torch.cat([row, cont[i]])[None]).logits[0]
                torch.testing.assert_close(logits[i, mask[i].bool()], alone, atol=ATOL, rtol=0)


# --- the cache object --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "compression"), [("llama", None), ("llama", 4), ("gpt2", None),
                                                     ("normalized", None), ("normalized", 4),
                                                     ("gpt2_normalized", None)])
def test_cache_length_and_bytes(family, compression):
    model = converted(family, 4, compression)
    cache = BSBRCache(model.config.num_hidden_layers)
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    ids, mask, _ = padded_batch((10, 7), 10, "left")
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    assert cache.get_seq_length() == 10  # positions fed, padding included (HF's mask width)
    heads, kv_heads, d, hidden = 4, (4 if family.startswith("gpt2") else 2), 16, 64
    features = d * d if compression is None else d * d // compression

    def row_bytes(n):  # fp32: 2·G·p·d + D + H·c·(F + d) + H·d², p = n % 4, c = n // 4
        p, c = n % 4, n // 4
        return 4 * (2 * kv_heads * p * d + hidden + heads * c * (features + d) + heads * d * d)

    if family.endswith("normalized"):  # 2·G·(p + k)·d + D + c·(H·2f·(d + 1) + G·d) + H·2f·(d + 1), k = 1 sink, f = d / c.f.
        f = d if compression is None else d // compression

        def row_bytes(n):
            p, c = n % 4, n // 4
            return 4 * (2 * kv_heads * (p + 1) * d + hidden + c * (heads * 2 * f * (d + 1) + kv_heads * d)
                        + heads * 2 * f * (d + 1))

    layers = model.config.num_hidden_layers
    assert cache.nbytes() == layers * (row_bytes(10) + row_bytes(7))
    assert [len(layer.rows) for layer in cache.layers] == [2] * layers
    assert [state.num_tokens for state in cache.layers[0].rows] == [10, 7]  # each row's real tokens


def test_cache_bad_uses_raise():
    with pytest.raises(ValueError, match="num_layers"):
        BSBRCache(0)
    cache = BSBRCache(2)
    with pytest.raises(TypeError, match="BSBR streaming states"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    model = converted("llama", 4)
    with torch.no_grad():
        model(tokens(2, 5), cache=cache)
        with pytest.raises(ValueError, match="batch size 3"):
            model(tokens(3, 1), cache=cache)
        with pytest.raises(ValueError, match="attention_mask must be"):
            model(tokens(2, 1), attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache)  # not past + 1 wide
        with pytest.raises(ValueError, match="only 0"):
            model(tokens(2, 1), attention_mask=torch.full((2, 6), 2), cache=cache)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_or_wrong_cache_is_rejected(family):
    model = converted(family, 4)
    x = tokens(2, 5)
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        with pytest.raises(TypeError, match="BSBRCache"):
            model(x, cache=dynamic)
        with pytest.raises(TypeError, match="BSBRCache"):
            model(x, past_key_values=dynamic)
        with pytest.raises(TypeError, match="BSBRCache"):
            model.generate(x, max_new_tokens=2, past_key_values=DynamicCache(config=model.config))
        with pytest.raises(TypeError, match="BSBRCache"):
            model(x, cache={"keys": None})
        gpt2 = family.startswith("gpt2")
        attention = model.transformer.h[0].attn if gpt2 else model.model.layers[0].self_attn
        extra = {} if gpt2 else {"position_embeddings": (torch.ones(1, 4, 16), torch.zeros(1, 4, 16))}
        with pytest.raises(TypeError, match="BSBRCache"):
            attention(torch.zeros(1, 4, 64), cache=dynamic, **extra)
