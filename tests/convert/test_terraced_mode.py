"""retrieval="terraced" in converted models (bsbr.convert.retrieval.TerracedMode): the layer against the written-out
reference, one or two chunks == the original model, causality, the cache (pieces, generate, padding, beams, bytes),
checkpoints, bad options and calibration. Tiny random Llama (GQA 4/2 heads, head_dim 16) and GPT-2, fp32 unless
stated; the new parameters are moved off their init so that retrieval matters. Logits tolerance 1e-4 (absolute)."""

from __future__ import annotations

import pytest
import torch

from bsbr.convert import (BSBRCache, BSBRConvertedAttention, convert_to_bsbr, converted_copy, load_conversion,
                          save_conversion, set_retrieval)
from bsbr.convert.checkpoint import conversion_settings, new_parameters
from bsbr.streaming_eval import terraced_cache_nbytes
from tests.conftest import tiny_gpt2, tiny_llama
from tests.convert.test_cache import padded_batch
from tests.reference import dense_terraced

ATOL = 1e-4
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def terraced(family="llama", chunk_size=4, sink_size=1, seed=0, **options):
    model = convert_to_bsbr(BUILDERS[family](seed=seed), chunk_size, retrieval="terraced", sink_size=sink_size,
                            **options)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in layers(model):
            for parameter in layer.terraced.parameters():
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
            layer.terraced.mix_logit.add_(2.0)  # retrieval clearly visible in the logits
    model.generation_config.eos_token_id = None  # fixed-length generations
    model.generation_config.pad_token_id = 0
    return model


def layers(model):
    return [m for m in model.modules() if isinstance(m, BSBRConvertedAttention)]


# --- the maths ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size,sink_size", [(4, 0), (5, 2), (3, 3)])
def test_llama_layer_matches_written_out_reference_float64(chunk_size, sink_size):
    model = terraced("llama", chunk_size, sink_size).double()
    layer = model.model.layers[0].self_attn
    hidden = torch.randn(2, 23, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(23)[None])
    with torch.no_grad():
        query, key, value = layer._project(hidden, (cos, sin))
        expected = dense_terraced(query, key, value, chunk_size, layer.terraced, sink_size)
        got = layer.terraced(query, key, value, chunk_size)
        out, _ = layer(hidden, position_embeddings=(cos, sin))
    assert (got - expected).abs().max().item() <= 1e-10
    assert (out - layer.o_proj(expected.transpose(1, 2).reshape(2, 23, 64))).abs().max().item() <= 1e-10
    assert layer.terraced.key_map.weight.shape == (2, 16, 16)  # per key/value head: GQA-shared states
    assert layer.terraced.query_map.weight.shape == (4, 16, 16) and layer.terraced.mix_logit.shape == (4,)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk_size", [23, 40, 12])  # one chunk, one chunk, two chunks: the exact region is all
def test_one_or_two_chunks_equal_the_original_model(family, chunk_size):
    original = BUILDERS[family]()
    x = ids(2, 23)
    with torch.no_grad():
        expected = original(x).logits
        got = terraced(family, chunk_size, sink_size=2)(x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_retrieval_changes_chunks_from_two_on_and_switches_off(family):
    model = terraced(family, 4)
    x = ids(2, 23)
    with torch.no_grad():
        on = model(x).logits
        off = set_retrieval(model, False)(x).logits
        for layer in layers(model):
            layer.terraced.mix_logit.fill_(-300.0)
        muted = set_retrieval(model, True)(x).logits
    torch.testing.assert_close(on[:, :8], off[:, :8], atol=1e-6, rtol=0)  # chunks 0, 1 retrieve nothing
    assert (on[:, 8:] - off[:, 8:]).abs().max() > 1e-3
    torch.testing.assert_close(muted, off, atol=1e-6, rtol=0)


def test_default_gain_is_lolcats_init():
    model = convert_to_bsbr(tiny_llama(), 4, retrieval="terraced")
    for layer in layers(model):
        assert torch.equal(layer.terraced.mix_logit, torch.full((4,), -2.2)) and layer.terraced.sink_size == 0
    model = convert_to_bsbr(tiny_llama(), 4, retrieval="terraced", mix_logit=-1.0, compression_factor=4)
    assert layers(model)[0].terraced.mix_logit[0].item() == -1.0
    assert layers(model)[0].terraced.key_map.weight.shape == (2, 16, 4)


def test_converted_model_is_causal():
    model = terraced("llama", 4, sink_size=1)
    x = ids(1, 23)
    y = x.clone()
    y[0, 14:] = (y[0, 14:] + 5) % 100
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :14], b[:, :14], atol=0, rtol=0)
    assert (a[:, 14:] - b[:, 14:]).abs().max() > 1e-3


# --- cache, generate, padding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pieces", [(1,) * 17, (3, 1, 6, 2, 5), (17,)])
def test_pieces_with_cache_equal_full_forward(family, pieces):
    model = terraced(family, 4, sink_size=2)
    x = ids(2, 17)
    with torch.no_grad():
        full = model(x).logits
        cache, logits, start = BSBRCache(2), [], 0
        for size in pieces:
            logits.append(model(x[:, start:start + size], cache=cache).logits)
            start += size
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=ATOL, rtol=0)
    state = cache.layers[0].rows[0]
    assert state.num_tokens == 17 and state.state.shape[1] == (2 if family == "llama" else 4)


@pytest.mark.parametrize("retrieve", [True, False])
@pytest.mark.parametrize("compression,sink", [(None, 1), (4, 3)])
def test_cache_bytes_measured_equal_formula(retrieve, compression, sink):
    model = set_retrieval(terraced("llama", 4, sink_size=sink, compression_factor=compression), retrieve)
    mask_ids, mask, _ = padded_batch((10, 3), 10, "left")
    cache = BSBRCache(2)
    with torch.no_grad():
        model(mask_ids, attention_mask=mask, cache=cache)
    f = 16 if compression is None else 4
    expected = sum(terraced_cache_nbytes(model.config, n, 4, sink, f, retrieve=retrieve) for n in (10, 3))
    assert cache.nbytes() == expected
    # per layer and row of 10 tokens: G=2 · (2·(2 + 4 + k)·16 + 2f·17) fp32 values
    assert terraced_cache_nbytes(model.config, 10, 4, sink, f) == 4 * 2 * 2 * (2 * (2 + 4 + sink) * 16 + 2 * f * 17)


def greedy_reference(model, x, new_tokens):
    with torch.no_grad():
        for _ in range(new_tokens):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_equals_repeated_argmax(family):
    model = terraced(family, 4)
    x = ids(2, 7)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, BSBRCache)
    torch.testing.assert_close(out.sequences, greedy_reference(model, x, 9), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(family, side):
    model = terraced(family, 4, sink_size=2)
    padded, mask, rows = padded_batch((13, 6, 17, 9), 17, side)
    with torch.no_grad():
        logits = model(padded, attention_mask=mask).logits
        for i, row in enumerate(rows):
            torch.testing.assert_close(logits[i, mask[i].bool()], model(row[None]).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ragged_batched_generation_equals_each_prompt_alone(family):
    model = terraced(family, 5, compression_factor=4)
    padded, mask, rows = padded_batch((7, 3, 11), 11, "left")
    with torch.no_grad():
        batched = model.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for i, row in enumerate(rows):
            alone = model.generate(row[None], max_new_tokens=8, do_sample=False)
            torch.testing.assert_close(batched[i, 11:], alone[0, len(row):], atol=0, rtol=0)
            torch.testing.assert_close(alone, greedy_reference(model, row[None], 8), atol=0, rtol=0)


def test_padded_generation_with_and_without_cache_agree_also_for_beam_search():
    model = terraced("llama", 4)
    padded, mask, _ = padded_batch((7, 3, 11), 11, "left")
    with torch.no_grad():
        for beams in (1, 3):
            cached = model.generate(padded, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False)
            full = model.generate(padded, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False,
                                  use_cache=False)
            torch.testing.assert_close(cached, full, atol=0, rtol=0)


def test_one_chunk_generation_equals_the_pretrained_model_with_its_kv_cache():
    original = tiny_llama()
    padded, mask, _ = padded_batch((7, 3, 11), 11, "left")
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = original.generate(padded, **settings)
        torch.testing.assert_close(terraced("llama", 64).generate(padded, **settings), expected, atol=0, rtol=0)


# --- checkpoints, bad input, calibration ----------------------------------------------------------------------------


@pytest.mark.parametrize("family,settings", [("llama", dict(sink_size=2)), ("llama", dict(compression_factor=4)),
                                             ("gpt2", dict(sink_size=1, feature_dim=8))])
def test_save_and_load_round_trip(tmp_path, family, settings):
    model = terraced(family, 4, **{"sink_size": 0, **settings})
    path = tmp_path / "terraced.safetensors"
    save_conversion(model, path)
    rebuilt = load_conversion(BUILDERS[family](), path)
    assert conversion_settings(rebuilt) == conversion_settings(model)
    assert conversion_settings(model)["retrieval"] == "terraced"
    assert all(".terraced." in name or ".meta_" in name for name in new_parameters(model))
    x = ids(2, 23)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, model(x).logits, atol=0, rtol=0)
        fresh = converted_copy(BUILDERS[family](), 4, retrieval="terraced", **settings)(x).logits
    assert (fresh - model(x).logits).abs().max() > 1e-4  # the saved parameters were not the initial ones


@pytest.mark.parametrize("kwargs, match", [
    (dict(sink_size=9), r"sink_size must be an integer in \[0, chunk_size=8\], got 9"),
    (dict(sink_size=-1), r"sink_size must be an integer in \[0, chunk_size=8\], got -1"),
    (dict(sinks=2), r"unknown options \['sinks'\] for retrieval='terraced'"),
    (dict(tie_qk=True), r"unknown options \['tie_qk'\] for retrieval='terraced'"),
    (dict(compression_factor=3), "compression_factor must be None or a positive integer dividing head_dim=16"),
    (dict(compression_factor=4, feature_dim=8), "feature_dim=8 contradicts compression_factor=4"),
    (dict(feature_dim=0), "feature_dim must be an integer >= 1"),
    (dict(mix_logit=float("inf")), "mix_logit must be a finite number"),
])
def test_bad_options_raise_before_any_change(kwargs, match):
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        convert_to_bsbr(model, 8, retrieval="terraced", **kwargs)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("student", [False, True])
def test_calibration_lowers_the_layer_output_mse(student):
    from bsbr.convert.calibrate import calibrate_attention_transfer, capture_attention_io

    base = tiny_llama()
    x = ids(2, 40, seed=2)
    captured = capture_attention_io(base, x)
    model = converted_copy(base, 8, retrieval="terraced", sink_size=1)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    meta = {name: p.detach().clone() for name, p in model.named_parameters() if ".meta_" in name}
    stats = calibrate_attention_transfer(model, captured, steps=30, progress=False,
                                         student_input_ids=x if student else None)
    assert [row["layer"] for row in stats] == [0, 1]
    for row in stats:
        assert row["final_rel_mse"] < 0.7 * row["initial_rel_mse"]
        assert 0.0 < row["mean_share"] < 1.0
    for name, p in base.named_parameters():  # pretrained weights unchanged
        assert torch.equal(p, before[name]) and p.grad is None, name
    for name, p in model.named_parameters():  # meta projections: unused by the terraced mode, untouched
        if name in meta:
            assert torch.equal(p, meta[name]), name
    if student:
        return
    layer = model.model.layers[0].self_attn  # the reported loss is the layer's own output on tokens >= 2C
    with torch.no_grad():
        out, _ = layer(captured[0].hidden, position_embeddings=(captured[0].cos, captured[0].sin))
    target = captured[0].output[:, 16:]
    rel = ((out[:, 16:] - target).pow(2).mean() / target.pow(2).mean()).item()
    assert rel == pytest.approx(stats[0]["final_rel_mse"], rel=1e-4)
