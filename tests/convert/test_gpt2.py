"""bsbr.convert.gpt2: pretrained GPT-2 -> BSBR. Tiny random GPT-2 configs (nothing downloaded), compared with the
original model and with BSBR written out densely (explicit [n, n] mask, loops over chunks, q/k/v from c_attn)."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import DynamicCache, GPT2LMHeadModel, GPT2Model
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from bsbr.convert import (
    SUPPORTED_FAMILIES,
    BSBRCache,
    BSBRGPT2Attention,
    convert_to_bsbr,
    converted_copy,
    set_retrieval,
)
from tests.conftest import tiny_gpt2
from tests.reference import dense_bsbr_gpt2, dense_gpt2_logits

SEQ_LEN = 23  # odd on purpose: the last chunk is partial for every chunk size below
SPLITTING_CHUNK_SIZES = [4, 5, 8]
HIDDEN, HEADS, HEAD_DIM = 64, 4, 16


def tokens(batch: int = 2, length: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- exactness ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attn_implementation", "overrides"),
                         [("sdpa", {}), ("eager", {}), ("eager", {"reorder_and_upcast_attn": True})])
@pytest.mark.parametrize("chunk_size", [SEQ_LEN, 64])
def test_one_chunk_equals_original(attn_implementation, overrides, chunk_size):
    model = tiny_gpt2(attn_implementation, **overrides)
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        got = convert_to_bsbr(model, chunk_size)(x).logits
    assert isinstance(model.transformer.h[0].attn, BSBRGPT2Attention)
    assert expected.abs().max() > 0.1  # not trivially small logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("compression_factor", [None, 4])
@pytest.mark.parametrize("chunk_size", SPLITTING_CHUNK_SIZES)
def test_logits_match_dense_reference(chunk_size, compression_factor):
    model = convert_to_bsbr(tiny_gpt2(), chunk_size, compression_factor)
    x = tokens()
    with torch.no_grad():
        got = model(x).logits
        expected = dense_gpt2_logits(model, x)
        hidden = torch.randn(2, SEQ_LEN, HIDDEN, generator=torch.Generator().manual_seed(2))
        layer_out, weights = model.transformer.h[1].attn(hidden)  # one layer on a larger-scale input
        layer_expected = dense_bsbr_gpt2(model.transformer.h[1].attn, hidden)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer_out, layer_expected, atol=1e-5, rtol=1e-4)


def normalized_gpt2(chunk_size: int, compression_factor: int | None = None, sink_size: int = 1, model=None):
    """The tiny GPT-2 converted with ``retrieval="normalized"``, its new parameters moved off their init (as
    calibration would) so that retrieval matters."""
    model = convert_to_bsbr(tiny_gpt2() if model is None else model, chunk_size, compression_factor,
                            retrieval="normalized", sink_size=sink_size)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in model.transformer.h:
            for parameter in block.attn.normalized.parameters():
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("chunk_size", [SEQ_LEN, 64])
def test_normalized_one_chunk_equals_original(chunk_size):
    model = tiny_gpt2()
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        got = normalized_gpt2(chunk_size, model=model)(x).logits
    assert all(block.attn.retrieval_mode == "normalized" for block in model.transformer.h)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("chunk_size", "compression_factor", "sink_size"),
                         [(4, None, 0), (5, None, 1), (8, None, 3), (5, 4, 1)])
def test_normalized_logits_match_dense_reference(chunk_size, compression_factor, sink_size):
    model = normalized_gpt2(chunk_size, compression_factor, sink_size)
    x = tokens()
    with torch.no_grad():
        got = model(x).logits
        expected = dense_gpt2_logits(model, x)
        seed = convert_to_bsbr(tiny_gpt2(), chunk_size, compression_factor)(x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[:, :chunk_size], seed[:, :chunk_size], atol=1e-5, rtol=0)  # chunk 0: original
    assert (got[:, chunk_size:] - seed[:, chunk_size:]).abs().max() > 1e-3  # not the seed formula


def test_normalized_retrieval_off_is_own_chunk_and_sinks():
    model = normalized_gpt2(5, sink_size=0)
    x = tokens()
    with torch.no_grad():
        own = set_retrieval(model, False)(x).logits
        reference = set_retrieval(convert_to_bsbr(tiny_gpt2(), 5), False)(x).logits
        retrieving = set_retrieval(model, True)(x).logits
    torch.testing.assert_close(own, reference, atol=1e-5, rtol=0)
    assert (retrieving[:, 5:] - own[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk_size", SPLITTING_CHUNK_SIZES)
def test_first_chunk_is_original_and_retrieval_changes_the_rest(chunk_size):
    model = tiny_gpt2()
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        got = convert_to_bsbr(model, chunk_size)(x).logits
    torch.testing.assert_close(got[:, :chunk_size], expected[:, :chunk_size], atol=1e-5, rtol=0)
    assert (got[:, chunk_size:] - expected[:, chunk_size:]).abs().amax(-1).min() > 1e-5


@pytest.mark.parametrize("chunk_size", SPLITTING_CHUNK_SIZES)
def test_converted_model_is_causal(chunk_size):
    model = convert_to_bsbr(tiny_gpt2(), chunk_size)
    x = tokens()
    with torch.no_grad():
        a = model(x).logits
        for t in (3, chunk_size, 2 * chunk_size, 13, SEQ_LEN - 1):  # inside chunk 0, chunk starts, middle, last
            changed = x.clone()
            changed[:, t:] = (changed[:, t:] + 1) % 100
            b = model(changed).logits
            torch.testing.assert_close(b[:, :t], a[:, :t], atol=1e-6, rtol=0)
            assert (b[:, t:] - a[:, t:]).abs().max() > 1e-3  # the change does reach later positions


def test_retrieval_off_is_chunk_local_attention():
    model = convert_to_bsbr(tiny_gpt2(), 8)
    x = tokens()
    with torch.no_grad():
        local = set_retrieval(model, False)(x).logits
        expected_local = dense_gpt2_logits(model, x, retrieval=False)
        retrieving = set_retrieval(model, True)(x).logits
    assert all(block.attn.retrieval for block in model.transformer.h)  # switched back on
    torch.testing.assert_close(local, expected_local, atol=1e-5, rtol=0)
    torch.testing.assert_close(local[:, :8], retrieving[:, :8], atol=1e-6, rtol=0)  # chunk 0 retrieves nothing
    assert (retrieving[:, 8:] - local[:, 8:]).abs().max() > 1e-3


# --- weights --------------------------------------------------------------------------------------------------


def test_pretrained_weights_are_shared_and_meta_projections_copied():
    model = tiny_gpt2()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    old_attention = [block.attn for block in model.transformer.h]
    old_weights = [(a.c_attn.weight, a.c_attn.bias, a.c_proj.weight, a.c_proj.bias) for a in old_attention]
    assert convert_to_bsbr(model, 8) is model and type(model) is GPT2LMHeadModel
    assert not any(isinstance(m, GPT2Attention) for m in model.modules())
    assert model.config.use_cache is False
    after = model.state_dict()
    for name, tensor in before.items():  # every pretrained tensor kept, under its old name, same values
        assert torch.equal(after[name], tensor), name
    assert set(after) - set(before) == {f"transformer.h.{i}.attn.{p}.{w}" for i in range(2)
                                        for p in ("meta_q_proj", "meta_k_proj") for w in ("weight", "bias")}
    for old, tensors, block in zip(old_attention, old_weights, model.transformer.h):
        new = block.attn
        assert new.c_attn is old.c_attn and new.c_proj is old.c_proj
        assert new.resid_dropout is old.resid_dropout and new.attn_dropout is old.attn_dropout
        assert all(a is b for a, b in zip((new.c_attn.weight, new.c_attn.bias, new.c_proj.weight, new.c_proj.bias),
                                          tensors))
        weight, bias = old.c_attn.weight, old.c_attn.bias  # Conv1D: [hidden, 3*hidden], q|k|v
        assert new.meta_q_proj.weight.shape == (HIDDEN, HIDDEN) == new.meta_k_proj.weight.shape
        assert torch.equal(new.meta_q_proj.weight, weight[:, :HIDDEN].T)
        assert torch.equal(new.meta_k_proj.weight, weight[:, HIDDEN : 2 * HIDDEN].T)
        assert torch.equal(new.meta_q_proj.bias, bias[:HIDDEN])
        assert torch.equal(new.meta_k_proj.bias, bias[HIDDEN : 2 * HIDDEN])
        assert new.meta_q_proj.weight.data_ptr() != weight.data_ptr()  # copies, separate storage, trainable
        assert new.meta_q_proj.weight.requires_grad and new.compression is None


def test_bare_gpt2_model_and_converted_copy():
    model = tiny_gpt2()
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        copy8 = converted_copy(model, 8)
        got = copy8(x).logits
        assert torch.equal(model(x).logits, expected)  # original untouched
        base = convert_to_bsbr(copy.deepcopy(model.transformer), 8)  # GPT2Model without the LM head
        assert type(base) is GPT2Model
        torch.testing.assert_close(model.lm_head(base(x).last_hidden_state), got, atol=1e-6, rtol=0)
    assert isinstance(model.transformer.h[0].attn, GPT2Attention)
    assert copy8.transformer.h[0].attn.c_attn.weight is model.transformer.h[0].attn.c_attn.weight


def test_meta_projections_receive_gradients_in_training_mode():
    model = convert_to_bsbr(tiny_gpt2(), 8).train()
    loss = model(tokens(), labels=tokens()).loss
    loss.backward()
    for block in model.transformer.h:
        for module in (block.attn.meta_q_proj, block.attn.meta_k_proj, block.attn.c_attn):
            assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


# --- rejected inputs and configs ------------------------------------------------------------------------------


def test_all_ones_mask_equals_no_mask():
    model = convert_to_bsbr(tiny_gpt2(), 8)
    x = tokens()
    mask = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=mask).logits, model(x).logits, atol=0, rtol=0)
    # padded batches: tests/convert/test_cache.py (each row equals the row alone)


def test_eager_padding_mask_reaching_the_layer_is_rejected():
    attn = convert_to_bsbr(tiny_gpt2("eager"), 8).transformer.h[0].attn
    mask = torch.zeros(1, 1, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    with torch.no_grad():
        attn(torch.randn(1, 6, HIDDEN), attention_mask=mask)  # plain causal: accepted
        mask[..., 0] = float("-inf")  # first token padded
        with pytest.raises(NotImplementedError, match="padding"):
            attn(torch.randn(1, 6, HIDDEN), attention_mask=mask)


def test_input_past_n_positions_is_named_before_any_work():
    """wpe has n_positions (64) rows: the original raises a bare IndexError past them, the converted model a
    ValueError naming the length and n_positions; up to 64 (or padded rows whose real tokens fit) it runs."""
    original = tiny_gpt2()
    model = converted_copy(original, 64)
    x = tokens(2, 66)
    with torch.no_grad():
        with pytest.raises(IndexError):
            original(x)
        with pytest.raises(ValueError) as error:
            model(x)
        assert str(error.value) == ("input length 66 (cache 0 + input 66 tokens) exceeds config.n_positions=64, the "
                                    "positions the model has learned embeddings for")
        cache = BSBRCache(2)
        model(x[:, :60], cache=cache)
        with pytest.raises(ValueError, match=r"^input length 66 \(cache 60 \+ input 6 tokens\) exceeds "
                                             r"config.n_positions=64"):
            model(x[:, 60:], cache=cache)
        with pytest.raises(ValueError, match=r"^position_ids reach 65 \(input length 66: cache 0 \+ input 66 "
                                             r"tokens\), past config.n_positions=64"):
            model(x, position_ids=torch.arange(66).expand(2, 66))
        # two pad tokens in each row: the positions count from each row's first real token, 0..63, and fit
        mask = torch.ones(2, 66, dtype=torch.long)
        mask[0, :2] = mask[1, :2] = 0
        padded = model(x, attention_mask=mask).logits[:, 2:]
        torch.testing.assert_close(model(x[:, 2:]).logits, original(x[:, 2:]).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(padded, original(x[:, 2:]).logits, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_a_kv_cache_other_than_bsbrcache_is_rejected():
    model = convert_to_bsbr(tiny_gpt2(), 8)
    x = tokens()
    with torch.no_grad():
        with pytest.raises(TypeError, match="BSBRCache"):
            model(x, past_key_values=DynamicCache(config=model.config))
        with pytest.raises(TypeError, match="BSBRCache"):
            model(x, cache=DynamicCache(config=model.config))
        with pytest.raises(TypeError, match="BSBRCache"):
            model.transformer.h[0].attn(torch.zeros(1, 4, HIDDEN), cache=DynamicCache(config=model.config))


@pytest.mark.parametrize(("field", "value"), [("scale_attn_by_inverse_layer_idx", True),
                                              ("scale_attn_weights", False),
                                              ("add_cross_attention", True)])
def test_unsupported_config_is_rejected_before_any_change(field, value):
    model = tiny_gpt2(**{field: value})
    with pytest.raises(ValueError, match=field if field != "add_cross_attention" else "cross-attention"):
        convert_to_bsbr(model, 8)
    assert all(type(block.attn) is GPT2Attention for block in model.transformer.h)


def test_reorder_and_upcast_attn_is_accepted():
    model = convert_to_bsbr(tiny_gpt2("eager", reorder_and_upcast_attn=True), 8)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, dense_gpt2_logits(model, tokens()), atol=1e-5, rtol=0)


def test_unsupported_family_lists_llama_and_gpt2():
    assert SUPPORTED_FAMILIES == ("llama", "gpt2")
    other = torch.nn.Linear(4, 4)
    other.config = types.SimpleNamespace(model_type="opt")
    with pytest.raises(ValueError, match=r"\['llama', 'gpt2'\].*model_type='opt'"):
        convert_to_bsbr(other, 8)
    no_attention = torch.nn.Linear(4, 4)
    no_attention.config = types.SimpleNamespace(model_type="gpt2")
    with pytest.raises(ValueError, match="no GPT2Attention"):
        convert_to_bsbr(no_attention, 8)


@pytest.mark.parametrize("chunk_size", [0, 2.5, True, None])
def test_bad_arguments_are_rejected_before_any_change(chunk_size):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="chunk_size"):
        convert_to_bsbr(model, chunk_size)
    with pytest.raises(ValueError, match="compression_factor"):
        convert_to_bsbr(model, 8, compression_factor=7)  # does not divide head_dim² = 256
    assert all(type(block.attn) is GPT2Attention for block in model.transformer.h)
    with pytest.raises(TypeError, match="GPT2Attention"):
        BSBRGPT2Attention(torch.nn.Linear(4, 4), 8)
    with pytest.raises(ValueError, match="no BSBR-converted attention"):
        set_retrieval(model, False)


def test_converting_twice_is_rejected():
    model = convert_to_bsbr(tiny_gpt2(), 8)
    with pytest.raises(ValueError, match="already converted"):
        convert_to_bsbr(model, 4)
