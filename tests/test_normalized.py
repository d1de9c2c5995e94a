"""bsbr.normalized: BSBR with normalised retrieval against a dense written-out reference, exactness with
one chunk, causality, gradients, and the converted tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bsbr.convert import BSBRConvertedAttention, converted_copy, set_retrieval
from bsbr.normalized import HedgehogFeatureMap, NormalizedRetrieval, chunk_local_softmax, normalized_bsbr_attention
from tests.conftest import tiny_llama
from tests.reference import dense_normalized_bsbr

HEADS, KV_HEADS, D = 4, 2, 8


def inputs(n, chunk_size, dtype=torch.float64, seed=0, kv_heads=KV_HEADS):
    g = torch.Generator().manual_seed(seed)
    chunks = -(-n // chunk_size)
    q = torch.randn(2, HEADS, n, D, generator=g, dtype=dtype)
    k = torch.randn(2, kv_heads, n, D, generator=g, dtype=dtype)
    v = torch.randn(2, kv_heads, n, D, generator=g, dtype=dtype)
    mq = torch.randn(2, HEADS, chunks, D, generator=g, dtype=dtype)
    mk = torch.randn(2, kv_heads, chunks, D, generator=g, dtype=dtype)
    return q, k, v, mq, mk


def retrieval_module(feature_dim=6, seed=0, dtype=torch.float64, mix=0.3):
    torch.manual_seed(seed)
    module = NormalizedRetrieval(HEADS, D, feature_dim, mix_logit=mix).to(dtype)
    with torch.no_grad():  # away from the identity init, different per head and for q/k
        module.query_map.weight.add_(0.5 * torch.randn_like(module.query_map.weight))
        module.key_map.weight.add_(0.5 * torch.randn_like(module.key_map.weight))
        module.mix_logit.copy_(torch.linspace(-1.0, 1.0, HEADS))
    return module


@pytest.mark.parametrize("n,chunk_size", [(23, 4), (23, 5), (23, 8), (23, 23), (17, 16), (9, 1)])
@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS])
@pytest.mark.parametrize("sink", [0, 1])
def test_matches_dense_reference_float64(n, chunk_size, kv_heads, sink):
    q, k, v, mq, mk = inputs(n, chunk_size, kv_heads=kv_heads)
    module = retrieval_module()
    module.sink_size = sink
    with torch.no_grad():
        fast = module(q, k, v, mq, mk, chunk_size)
        ref = dense_normalized_bsbr(q, k, v, mq, mk, chunk_size, module, sink)
    assert fast.shape == (2, HEADS, n, D)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sink", [0, 2, 5])
def test_local_softmax_and_lse(sink):
    q, k, v, _, _ = inputs(23, 5)
    out, lse = chunk_local_softmax(q, k, v, 5, sink)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    position = torch.arange(23)
    mask = ((position[:, None] // 5 == position[None, :] // 5) | (position[None, :] < sink)) \
        & (position[None, :] <= position[:, None])
    scores = (q @ kr.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ vr, rtol=0, atol=1e-12)


def test_sink_of_several_tokens_matches_dense_reference():
    q, k, v, mq, mk = inputs(23, 5)
    module = retrieval_module()
    module.sink_size = 3
    with torch.no_grad():
        torch.testing.assert_close(module(q, k, v, mq, mk, 5), dense_normalized_bsbr(q, k, v, mq, mk, 5, module, 3),
                                   rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="sink_size"):
        chunk_local_softmax(q, k, v, 5, 6)


def test_one_chunk_is_causal_softmax_attention_fp32():
    q, k, v, mq, mk = inputs(19, 19, dtype=torch.float32)
    module = retrieval_module(dtype=torch.float32)
    out = module(q, k, v, mq, mk, 32)  # chunk_size > n: one chunk as well
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(module(q, k, v, mq, mk, 19), expected, rtol=0, atol=1e-6)


def test_very_negative_mix_logit_gives_own_chunk_attention():
    q, k, v, mq, mk = inputs(23, 5)
    module = retrieval_module()
    with torch.no_grad():
        module.mix_logit.fill_(-200.0)
        out, share = module(q, k, v, mq, mk, 5, return_mix=True)
    own, _ = chunk_local_softmax(q, k, v, 5)
    torch.testing.assert_close(out, own, rtol=0, atol=1e-12)
    assert share.max().item() < 1e-60
    with torch.no_grad():
        module.mix_logit.fill_(0.0)
        _, share = module(q, k, v, mq, mk, 5, return_mix=True)
    assert share[:, :, :5].abs().max().item() == 0.0  # chunk 0 retrieves nothing
    assert share[:, :, 5:].min().item() > 0.0 and share.max().item() < 1.0


def test_causal_by_perturbation():
    n, size, t = 23, 5, 12  # token 12 is in chunk 2
    q, k, v, mq, mk = inputs(n, size)
    module = retrieval_module()
    with torch.no_grad():
        base = module(q, k, v, mq, mk, size)
        for tensor in (q, k, v):
            tensor[:, :, t + 1 :] += 3.0
        mq[:, :, 2:] += 3.0  # meta rows from chunk 2 on only route chunks 3+
        mk[:, :, 2:] += 3.0
        moved = module(q, k, v, mq, mk, size)
    torch.testing.assert_close(moved[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=1e-12)
    assert (moved[:, :, t + 1 :] - base[:, :, t + 1 :]).abs().max() > 1e-3


def test_gradcheck_float64():
    n, size = 11, 4
    q, k, v, mq, mk = inputs(n, size)
    module = retrieval_module(feature_dim=3)
    wq, wk, mix = module.query_map.weight, module.key_map.weight, module.mix_logit
    mq, mk = mq[:1].clone().requires_grad_(), mk[:1].clone().requires_grad_()

    def f(wq_, wk_, mix_, mq_, mk_):
        qmap, kmap = HedgehogFeatureMap(HEADS, D, 3).double(), HedgehogFeatureMap(HEADS, D, 3).double()
        del qmap.weight, kmap.weight
        qmap.weight, kmap.weight = wq_, wk_
        return normalized_bsbr_attention(q[:1], k[:1], v[:1], mq_[:1], mk_[:1], size, (qmap, kmap), mix_)

    assert torch.autograd.gradcheck(f, (wq.detach().clone().requires_grad_(), wk.detach().clone().requires_grad_(),
                                        mix.detach().clone().requires_grad_(), mq, mk), fast_mode=True)
    out = module(q[:1], k[:1], v[:1], mq, mk, size)
    out.square().sum().backward()
    for grad in (wq.grad, wk.grad, mix.grad, mq.grad, mk.grad):
        assert grad is not None and grad.abs().sum() > 0
    assert mq.grad[:, :, -1].abs().max() == 0  # the last chunk's meta-query routes nothing


def test_bad_arguments():
    q, k, v, mq, mk = inputs(10, 4)
    module = retrieval_module()
    with pytest.raises(ValueError, match="chunk_size"):
        module(q, k, v, mq, mk, 0)
    with pytest.raises(ValueError, match="meta_query"):
        module(q, k, v, mq[:, :, :1], mk, 4)
    with pytest.raises(ValueError, match="mix_logit"):
        normalized_bsbr_attention(q, k, v, mq, mk, 4, module.query_map, torch.zeros(3, dtype=q.dtype))
    with pytest.raises(TypeError, match="feature_map"):
        normalized_bsbr_attention(q, k, v, mq, mk, 4, "phi", module.mix_logit)


def test_converted_tiny_llama():
    base = tiny_llama()
    ids = torch.randint(0, 100, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = base(ids).logits
        one_chunk = converted_copy(base, 32, retrieval="normalized")(ids).logits
        model = converted_copy(base, 5, retrieval="normalized", mix_logit=-1.0)
        layers = [m for m in model.modules() if isinstance(m, BSBRConvertedAttention)]
        bsbr = model(ids).logits
        set_retrieval(model, False)
        own = model(ids).logits
        for layer in layers:
            layer.normalized.mix_logit.fill_(-300.0)
        set_retrieval(model, True)
        muted = model(ids).logits
    assert len(layers) == 2 and all(layer.retrieval_mode == "normalized" for layer in layers)
    assert all(layer.normalized.mix_logit.shape == (4,) for layer in layers)
    torch.testing.assert_close(one_chunk, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(bsbr[:, :5], reference[:, :5], rtol=0, atol=1e-5)  # chunk 0 unchanged
    assert (bsbr[:, 5:] - own[:, 5:]).abs().max() > 1e-4  # retrieval changes later chunks
    torch.testing.assert_close(muted, own, rtol=0, atol=1e-5)


@pytest.mark.parametrize("student", [False, True])
def test_calibration_fits_only_new_parameters(student):
    from bsbr.convert.calibrate import capture_attention_io, calibrate_attention_transfer

    base = tiny_llama()
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(2))
    captured = capture_attention_io(base, ids)
    assert len(captured) == 2 and captured[0].hidden.shape == (2, 40, 64) and captured[1].output.shape == (2, 40, 64)
    model = converted_copy(base, 8, retrieval="normalized", sink_size=1)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    stats = calibrate_attention_transfer(model, captured, steps=30, progress=False,
                                         student_input_ids=ids if student else None)
    assert [row["layer"] for row in stats] == [0, 1]
    for row in stats:
        assert row["final_rel_mse"] < 0.5 * row["initial_rel_mse"]
        assert 0.0 < row["mean_share"] < 1.0
    for name, p in base.named_parameters():  # pretrained weights: unchanged, no gradient kept
        assert torch.equal(p, before[name]) and p.grad is None, name
    if not student:  # teacher forcing on layer 0 is what the first converted layer sees: the loss is reproducible
        layer = model.model.layers[0].self_attn
        with torch.no_grad():
            out, _ = layer(captured[0].hidden, position_embeddings=(captured[0].cos, captured[0].sin))
        target = captured[0].output[:, 8:]
        rel = ((out[:, 8:] - target).pow(2).mean() / target.pow(2).mean()).item()
        assert rel == pytest.approx(stats[0]["final_rel_mse"], rel=1e-4)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": 0.0}, {"lr": float("nan")}, {"meta_lr": -1e-4},
                                 {"mix_lr": float("inf")}, {"lr": True}])
def test_calibration_refuses_a_setting_out_of_range_before_any_work(bad):
    from bsbr.convert.calibrate import capture_attention_io, calibrate_attention_transfer

    base = tiny_llama()
    captured = capture_attention_io(base, torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0)))
    model = converted_copy(base, 8, retrieval="normalized", sink_size=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=next(iter(bad))):
        calibrate_attention_transfer(model, captured, progress=False, **bad)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
