"""bsbr.terraced: the terraced exact region with GQA-shared linear retrieval against the written-out reference
(float64, <= 1e-10), exactness with one or two chunks, causality, no n×n tensor, gradients, and the streaming state
(pieces == one forward; its bytes by formula). Random tensors, 4 query / 2 key-value heads, head_dim 8."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bsbr.normalized import HedgehogFeatureMap
from bsbr.streaming_eval import terraced_cache_nbytes
from bsbr.terraced import DEFAULT_MIX_LOGIT, TerracedRetrieval, terraced_attention, terraced_exact, terraced_step
from tests.reference import dense_terraced

HEADS, KV_HEADS, D = 4, 2, 8

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(n, dtype=torch.float64, seed=0, kv_heads=KV_HEADS, batch=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, n, D, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, D, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, D, generator=g, dtype=dtype)
    return q, k, v


def module_for(kv_heads=KV_HEADS, feature_dim=6, sink=0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    module = TerracedRetrieval(HEADS, kv_heads, D, feature_dim, sink_size=sink).to(dtype)
    with torch.no_grad():  # away from the identity init, different per head and for q/k
        module.query_map.weight.add_(0.5 * torch.randn_like(module.query_map.weight))
        module.key_map.weight.add_(0.5 * torch.randn_like(module.key_map.weight))
        module.mix_logit.copy_(torch.linspace(-1.0, 1.0, HEADS))
    return module


@pytest.mark.parametrize("n,chunk_size", [(23, 4), (23, 5), (23, 7), (23, 12), (23, 23), (9, 1), (16, 4)])
@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS, 1])
@pytest.mark.parametrize("sink", [0, 1, 3])
def test_matches_written_out_reference_float64(n, chunk_size, kv_heads, sink):
    sink = min(sink, chunk_size)
    q, k, v = inputs(n, kv_heads=kv_heads)
    module = module_for(kv_heads, sink=sink)
    with torch.no_grad():
        fast = module(q, k, v, chunk_size)
        exact_only = module(q, k, v, chunk_size, retrieve=False)
        ref = dense_terraced(q, k, v, chunk_size, module, sink)
        ref_exact = dense_terraced(q, k, v, chunk_size, module, sink, retrieve=False)
    assert fast.shape == (2, HEADS, n, D)
    assert (fast - ref).abs().max().item() <= 1e-10
    assert (exact_only - ref_exact).abs().max().item() <= 1e-10
    if n > 2 * chunk_size:  # retrieval reaches chunks >= 2 only
        assert (fast[:, :, 2 * chunk_size:] - exact_only[:, :, 2 * chunk_size:]).abs().max() > 1e-3
    torch.testing.assert_close(fast[:, :, : 2 * chunk_size], exact_only[:, :, : 2 * chunk_size], rtol=0, atol=0)


@pytest.mark.parametrize("sink", [0, 2, 5])
def test_exact_region_lse_against_explicit_mask(sink):
    q, k, v = inputs(23)
    out, lse = terraced_exact(q, k, v, 5, sink)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    position = torch.arange(23)
    chunk = position // 5
    mask = ((chunk[:, None] - chunk[None, :] <= 1) | (position[None, :] < sink)) & (position[None, :] <= position[:, None])
    scores = (q @ kr.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ vr, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [19, 32, 10])  # one chunk, one chunk, two chunks: no retrieval
def test_one_or_two_chunks_are_causal_softmax_attention_fp32(chunk_size):
    q, k, v = inputs(19, dtype=torch.float32)
    module = module_for(sink=2, dtype=torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(module(q, k, v, chunk_size), expected, rtol=0, atol=1e-6)


def test_gain_parametrisation_and_initial_share():
    module = TerracedRetrieval(HEADS, KV_HEADS, D)
    assert DEFAULT_MIX_LOGIT == -2.2 and torch.equal(module.mix_logit, torch.full((HEADS,), -2.2))
    assert module.key_map.weight.shape == (KV_HEADS, D, D) and module.query_map.weight.shape == (HEADS, D, D)
    # the share is sigmoid(mix_logit + log Z - l): with Z = e^l (keys of equal retrieved and exact mass) it is
    # sigmoid(-2.2) ~ 0.0998, LoLCATs' initial linear-attention weight
    q, k, v = inputs(12, seed=3)
    k = torch.zeros_like(k)  # every score 0: e^l = #exact keys; φ(0) = uniform: φq·φk = 2/f per key -> Z known
    q = torch.zeros_like(q)
    module.double().mix_logit.data.fill_(DEFAULT_MIX_LOGIT)  # exactly -2.2 in float64
    _, share = module(q, k, v, 3, return_mix=True)
    exact, older = 3 + 3, 3  # token 8 (chunk 2, offset 2): own 3 + previous 3 keys; chunks <= 0: 3 keys
    z = older * 2 / D
    assert share[0, 0, 8].item() == pytest.approx(1 / (1 + math.exp(2.2) * exact / z), rel=1e-12)
    module.mix_logit.data.fill_(-2.2 - math.log(z / exact))  # Z·g = e^l·e^-2.2
    _, share = module(q, k, v, 3, return_mix=True)
    assert share[0, 0, 8].item() == pytest.approx(1 / (1 + math.exp(2.2)), rel=1e-12)


def test_causal_by_perturbation():
    n, size, t = 23, 4, 13  # token 13 is in chunk 3
    q, k, v = inputs(n)
    module = module_for(sink=1)
    with torch.no_grad():
        base = module(q, k, v, size)
        for tensor in (q, k, v):
            tensor[:, :, t + 1:] += 3.0
        moved = module(q, k, v, size)
    torch.testing.assert_close(moved[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=1e-12)
    assert (moved[:, :, t + 1:] - base[:, :, t + 1:]).abs().max() > 1e-3


def test_no_tensor_of_seq_len_squared():
    """Every tensor an op sees is O(n·(2C + k)), far below n² (the profiler records every op's input shapes)."""
    n, size = 512, 8
    q, k, v = inputs(n, dtype=torch.float32, batch=1)
    module = module_for(sink=2, dtype=torch.float32)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        module(q, k, v, size)
    largest = max(math.prod(shape) for event in prof.key_averages(group_by_input_shape=True)
                  for shape in event.input_shapes if shape)
    assert largest <= HEADS * n * 2 * size  # [1, H, chunks, C, C] blocks are H·n·C; n² alone is 262,144
    assert largest < n * n / 4


def test_gradcheck_float64():
    n, size, feature_dim = 14, 3, 3
    q, k, v = (t[:1].clone().requires_grad_() for t in inputs(n))
    module = module_for(feature_dim=feature_dim, sink=1)
    wq, wk, mix = (p.detach().clone().requires_grad_() for p in (module.query_map.weight, module.key_map.weight,
                                                                module.mix_logit))

    def f(q_, k_, v_, wq_, wk_, mix_):
        qmap, kmap = HedgehogFeatureMap(HEADS, D, feature_dim).double(), HedgehogFeatureMap(KV_HEADS, D, feature_dim).double()
        del qmap.weight, kmap.weight
        qmap.weight, kmap.weight = wq_, wk_
        return terraced_attention(q_, k_, v_, size, qmap, kmap, mix_, sink_size=1)

    assert torch.autograd.gradcheck(f, (q, k, v, wq, wk, mix), fast_mode=True)
    module(q.detach(), k.detach(), v.detach(), size).square().sum().backward()
    for p in (module.query_map.weight, module.key_map.weight, module.mix_logit):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("pieces", [(1,) * 23, (3, 1, 6, 2, 5, 6), (7, 9, 7), (23,)])
@pytest.mark.parametrize("sink,retrieve", [(0, True), (2, True), (4, True), (2, False)])
def test_streaming_state_equals_full_forward(pieces, sink, retrieve):
    size = 4
    q, k, v = inputs(23, batch=1)
    module = module_for(sink=sink)
    with torch.no_grad():
        full = module(q, k, v, size, retrieve=retrieve)
        outputs, state, start = [], None, 0
        for piece in pieces:
            out, state = terraced_step(module, size, q[:, :, start:start + piece], k[:, :, start:start + piece],
                                       v[:, :, start:start + piece], state, retrieve=retrieve)
            outputs.append(out)
            start += piece
    assert (torch.cat(outputs, 2) - full).abs().max().item() <= 1e-12
    # 23 tokens: 3 in the current chunk, chunk 4 as the previous one, chunks 0..3 (less the sinks) summed into S, z
    assert state.num_tokens == 23 and state.partial_key.shape == (1, KV_HEADS, 3, D)
    assert state.previous_key.shape == (1, KV_HEADS, size, D) and state.sink_key.shape == (1, KV_HEADS, sink, D)
    if retrieve:
        assert state.state.shape == (1, KV_HEADS, 12, D) and state.normalizer.shape == (1, KV_HEADS, 12)
        features = module.key_map(k[:, :, sink:16])  # [1, G, 16 - sink, 2f]
        torch.testing.assert_close(state.state, features.transpose(-1, -2) @ v[:, :, sink:16], rtol=0, atol=1e-12)
    else:
        assert state.state is None and state.normalizer is None


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9, 23, 40])
@pytest.mark.parametrize("sink", [0, 3])
def test_state_bytes_measured_equal_formula(tokens, sink):
    """``TerracedState.nbytes()`` == :func:`terraced_cache_nbytes` for one layer (a one-layer config stand-in)."""
    size, feature_dim = 4, 6
    config = type("Config", (), dict(num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                     head_dim=D, hidden_size=HEADS * D))()
    q, k, v = inputs(tokens, dtype=torch.float32, batch=1)
    module = module_for(feature_dim=feature_dim, sink=min(sink, size), dtype=torch.float32)
    with torch.no_grad():
        _, state = terraced_step(module, size, q, k, v, None)
    assert state.nbytes() == terraced_cache_nbytes(config, tokens, size, sink, feature_dim)


def test_bad_arguments():
    q, k, v = inputs(10)
    module = module_for()
    with pytest.raises(ValueError, match="chunk_size"):
        module(q, k, v, 0)
    with pytest.raises(ValueError, match="sink_size"):
        terraced_exact(q, k, v, 4, 5)
    with pytest.raises(ValueError, match="mix_logit"):
        terraced_attention(q, k, v, 4, module.query_map, module.key_map, torch.zeros(3, dtype=q.dtype))
    with pytest.raises(ValueError, match="key/value"):
        module(q, k[:, :, :9], v[:, :, :9], 4)
    with pytest.raises(ValueError, match="num_key_value_heads=3 must divide num_heads=4"):
        TerracedRetrieval(4, 3, D)
    with pytest.raises(ValueError, match="mix_logit must be a finite number"):
        TerracedRetrieval(4, 2, D, mix_logit=float("nan"))
    with pytest.raises(ValueError, match="one row"):
        terraced_step(module, 4, q, k, v, None)
    with pytest.raises(ValueError, match="dropout_p"):
        terraced_step(module, 4, q[:1], k[:1], v[:1], None, dropout_p=0.1)


def test_smollm2_state_against_its_kv_cache():
    """SmolLM2-135M's shapes (30 layers, 9 query / 3 key-value heads, head_dim 64), chunk 256, 4 sinks, f = 64: the
    GQA-shared state streamed over 40,960 random tokens measures what the formula says, and is <= 0.3x the KV cache
    (it is constant: 14,976,000 bytes at 2,048 and at 40,960 tokens, 0.159x and 0.0079x the fp32 KV cache)."""
    from bsbr.streaming_eval import kv_cache_nbytes

    config = type("Config", (), dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                     hidden_size=576))()
    module = TerracedRetrieval(9, 3, 64, sink_size=4)
    generator = torch.Generator().manual_seed(0)
    state, fed = None, 0
    with torch.no_grad():
        for stop in (2048, 40960):
            q = torch.randn(1, 9, stop - fed, 64, generator=generator)
            k, v = torch.randn(2, 1, 3, stop - fed, 64, generator=generator)
            _, state = terraced_step(module, 256, q, k, v, state)
            fed = stop
            measured = 30 * state.nbytes()
            assert measured == terraced_cache_nbytes(config, stop, 256, 4, 64) == 14_976_000
            assert state.state.shape == (1, 3, 128, 64)  # 3 key/value heads' worth, not 9
    assert measured / kv_cache_nbytes(config, 2048) == pytest.approx(0.1587, abs=1e-4)
    assert measured / kv_cache_nbytes(config, 40960) < 0.3
    assert terraced_cache_nbytes(config, 40960 + 255, 256, 4, 64) / kv_cache_nbytes(config, 40960 + 255) < 0.015
