"""bsbr.local_attention: the fused chunked softmax with its log-normaliser against the written-out form and a dense
reference (forward and backward, odd shapes, partial chunks, sinks, GQA), gradcheck, the fallback and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from bsbr.local_attention import (fused_kernel_supports, local_softmax_attention, local_softmax_attention_naive,
                                  softmax_attention_with_lse)
from bsbr.normalized import chunk_local_softmax
from tests.reference import dense_local_softmax

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}

# (batch, heads, kv_heads, n, head_dim, chunk_size, sink_size): partial last chunks, n < C, n == C, sinks 0/1/3 and
# == chunk_size, GQA groups of 1, 2 and 3.
SHAPES = [
    (2, 4, 2, 23, 8, 5, 3),
    (1, 3, 3, 16, 4, 4, 0),
    (2, 6, 2, 17, 8, 4, 1),
    (1, 4, 1, 7, 4, 8, 3),
    (1, 2, 2, 8, 4, 8, 2),
    (1, 3, 1, 13, 4, 3, 3),
    (3, 2, 1, 1, 4, 3, 1),
]


def tensors(batch, heads, kv_heads, n, d, dtype=torch.float64, seed=0, token_major=False):
    g = torch.Generator().manual_seed(seed)

    def one(h):
        if token_major:  # a projection's layout: [batch, n, h, d] viewed as [batch, h, n, d]
            return torch.randn(batch, n, h, d, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
        return torch.randn(batch, h, n, d, generator=g, dtype=dtype).requires_grad_()

    return one(heads), one(kv_heads), one(kv_heads)


def forward_backward(fn, q, k, v, seed=1):
    """``(output, lse, dq, dk, dv)`` with random incoming gradients for both outputs."""
    output, lse = fn(q, k, v)
    g = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(output.shape, generator=g, dtype=output.dtype)
    grad_lse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    grads = torch.autograd.grad((output, lse), (q, k, v), (grad_output, grad_lse))
    return (output, lse, *grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, heads, kv_heads, n, d, chunk, sink", SHAPES)
def test_fused_equals_written_out_and_dense_forward_and_backward(dtype, batch, heads, kv_heads, n, d, chunk, sink):
    q, k, v = tensors(batch, heads, kv_heads, n, d, dtype)
    fused = forward_backward(lambda *x: local_softmax_attention(*x, chunk, sink), q, k, v)
    naive = forward_backward(lambda *x: local_softmax_attention_naive(*x, chunk, sink), q, k, v)
    dense = forward_backward(lambda *x: dense_local_softmax(*x, chunk, sink), q, k, v)
    for name, a, b, c in zip(("output", "lse", "dq", "dk", "dv"), fused, naive, dense):
        assert a.shape == b.shape == c.shape and a.dtype == dtype, name
        assert (a - b).abs().max() <= TOLERANCE[dtype], name
        assert (a - c).abs().max() <= TOLERANCE[dtype], name


def test_chunk_local_softmax_is_the_fused_op_and_takes_the_projection_layout():
    q, k, v = tensors(2, 6, 3, 29, 8, token_major=True)
    output, lse = chunk_local_softmax(q, k, v, 8, 4)
    fused = local_softmax_attention(q, k, v, 8, 4)
    assert torch.equal(output, fused[0]) and torch.equal(lse, fused[1])
    reference = dense_local_softmax(q, k, v, 8, 4)
    assert (output - reference[0]).abs().max() < 1e-12 and (lse - reference[1]).abs().max() < 1e-12


@pytest.fixture
def one_thread():
    """gradcheck makes thousands of tiny kernel calls; on a busy 2-core machine thread hand-offs dominate them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("batch, heads, kv_heads, n, d, chunk, sink", [
    (1, 2, 1, 7, 4, 3, 0), (2, 2, 2, 9, 4, 4, 1), (1, 3, 1, 11, 4, 4, 3), (1, 4, 2, 5, 4, 5, 2),
])
def test_gradcheck_float64_both_outputs(batch, heads, kv_heads, n, d, chunk, sink):
    q, k, v = tensors(batch, heads, kv_heads, n, d, seed=n)
    assert torch.autograd.gradcheck(lambda *x: local_softmax_attention(*x, chunk, sink), (q, k, v))
    # each output alone: the other one's incoming gradient is None and its backward call is skipped
    assert torch.autograd.gradcheck(lambda *x: local_softmax_attention(*x, chunk, sink)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda *x: local_softmax_attention(*x, chunk, sink)[1], (q, k, v))


@pytest.mark.parametrize("is_causal", [True, False])
def test_kernel_call_with_lse_gradient_formulas(is_causal):
    """One kernel call (GQA, fewer keys than queries when not causal) against the written-out gradients of lse:
    ∂q_t = s·γ_t Σ_u p_tu k_u (attention with keys as values), ∂k_u = s·Σ_t γ_t p_tu q_t."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    length = 6 if is_causal else 4
    k = torch.randn(2, 2, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
    output, lse = softmax_attention_with_lse(q, k, v, is_causal)
    gamma = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad(lse, (q, k, v), gamma, allow_unused=True)
    keys, values = k.detach().repeat_interleave(2, 1), v.detach().repeat_interleave(2, 1)
    scores = q.detach() @ keys.transpose(-1, -2) / math.sqrt(8)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(scores, dim=-1)  # [2, 4, 6, length]
    assert (output - p @ values).abs().max() < 1e-12 and (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-12
    assert (dq - gamma[..., None] * (p @ keys) / math.sqrt(8)).abs().max() < 1e-12
    scatter = (p * gamma[..., None]).transpose(-1, -2) @ q.detach() / math.sqrt(8)  # [2, 4, length, 8]
    assert (dk - scatter.unflatten(1, (2, 2)).sum(2)).abs().max() < 1e-12
    assert dv is None  # lse does not depend on the values


def test_fallback_where_the_kernel_cannot_run():
    q, k, v = (t.detach().to(torch.bfloat16) for t in tensors(1, 4, 2, 11, 8))
    assert not fused_kernel_supports(q, k, v)
    assert fused_kernel_supports(*(t.float() for t in (q, k, v)))
    fallback, naive = local_softmax_attention(q, k, v, 4, 2), local_softmax_attention_naive(q, k, v, 4, 2)
    assert fallback[0].dtype == fallback[1].dtype == torch.bfloat16
    assert torch.equal(fallback[0], naive[0]) and torch.equal(fallback[1], naive[1])
    empty = local_softmax_attention(*(t[:, :, :0].float() for t in (q, k, v)), 4, 2)
    assert empty[0].shape == (1, 4, 0, 8) and empty[1].shape == (1, 4, 0)
    with pytest.raises(ValueError, match="fused CPU kernel"):
        softmax_attention_with_lse(q, k, v)


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(sink_size=5), "sink_size"),
    (dict(sink_size=-1), "sink_size"),
    (dict(key_heads=3), "divide"),
    (dict(key_length=5), "key/value"),
])
def test_bad_input_raises_before_work(kwargs, match):
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, kwargs.get("key_heads", 2), kwargs.get("key_length", 6), 8)
    for fn in (local_softmax_attention, local_softmax_attention_naive):
        with pytest.raises(ValueError, match=match):
            fn(q, k, k, kwargs.get("chunk_size", 4), kwargs.get("sink_size", 0))
