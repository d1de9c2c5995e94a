"""BSBR attention: fast path == dense reference, causality (every chunk size, with compression), chunk_size >= seq_len
== standard attention, gradients, grouped-query heads and its own arguments. Padding, streaming and the common
input checks are the contract every architecture keeps (tests/test_contract.py)."""

import pytest
import torch

from bsbr import BSBRAttention, StandardAttention
from bsbr.attention import bsbr_attention, chunk_mean
from tests.reference import dense_bsbr, dense_causal_attention

HIDDEN, HEADS = 32, 4


def make_attention(chunk_size, compression_factor=None, seed=0):
    torch.manual_seed(seed)
    return BSBRAttention(HIDDEN, HEADS, chunk_size, compression_factor=compression_factor).eval()


def seq_lens_for(chunk_size):
    return sorted({1, max(chunk_size - 1, 1), chunk_size, chunk_size + 1, 3 * chunk_size + 5})


CASES = [
    (chunk_size, seq_len, batch, compression)
    for chunk_size in (1, 4, 16)
    for seq_len in seq_lens_for(chunk_size)
    for batch in (1, 3)
    for compression in (None, 4)
]


@pytest.mark.parametrize("chunk_size,seq_len,batch,compression", CASES)
def test_fast_path_matches_dense_reference(chunk_size, seq_len, batch, compression):
    attn = make_attention(chunk_size, compression)
    x = torch.randn(batch, seq_len, HIDDEN, generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        fast, reference = attn(x), dense_bsbr(attn, x)
    assert fast.shape == (batch, seq_len, HIDDEN)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compression", [None, 2])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_no_output_depends_on_a_later_token(chunk_size, compression):
    attn = make_attention(chunk_size, compression)
    seq_len = 3 * chunk_size + 5
    x = torch.randn(2, seq_len, HIDDEN)
    with torch.no_grad():
        base = attn(x)
        # first token, the first and last token of every chunk boundary, the last token
        positions = {0, seq_len - 1} | {p for b in range(chunk_size, seq_len, chunk_size) for p in (b - 1, b)}
        for position in sorted(positions):
            perturbed = x.clone()
            perturbed[:, position] += 3.0 * torch.randn(HIDDEN)
            out = attn(perturbed)
            torch.testing.assert_close(out[:, :position], base[:, :position], atol=1e-6, rtol=0)
            assert (out[:, position] - base[:, position]).abs().max() > 1e-3  # the perturbation is visible


@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_one_chunk_equals_standard_causal_attention(seq_len):
    attn = make_attention(chunk_size=16)
    standard = StandardAttention(HIDDEN, HEADS).eval()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(standard, name).load_state_dict(getattr(attn, name).state_dict())
    x = torch.randn(3, seq_len, HIDDEN)
    with torch.no_grad():
        out = attn(x)
        torch.testing.assert_close(out, standard(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, dense_causal_attention(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compression", [None, 4])
def test_gradients_reach_every_parameter(compression):
    attn = make_attention(chunk_size=4, compression_factor=compression).train()
    x = torch.randn(2, 17, HIDDEN, requires_grad=True)
    attn(x).square().mean().backward()
    for name, parameter in attn.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
        assert torch.isfinite(parameter.grad).all(), name
    assert x.grad.abs().sum() > 0


def test_first_chunk_retrieves_nothing_and_is_finite():
    attn = make_attention(chunk_size=4)
    x = torch.randn(1, 9, HIDDEN)
    with torch.no_grad():
        out = attn(x)
        # The first chunk is pure local attention, so it equals the standard layer on those tokens alone.
        torch.testing.assert_close(out[:, :4], dense_causal_attention(attn, x[:, :4]), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(out).all()


def test_chunk_mean_values():
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1)  # chunks [0,1,2] [3,4,5] [6]
    torch.testing.assert_close(chunk_mean(x, 3), torch.tensor([[[1.0], [4.0], [6.0]]]))
    mask = torch.tensor([[True, False, True, True, True, False, False]])
    torch.testing.assert_close(chunk_mean(x, 3, mask), torch.tensor([[[1.0], [3.5], [0.0]]]))


def test_functional_core_supports_grouped_query_heads():
    torch.manual_seed(0)
    batch, heads, kv_heads, n, d, size = 2, 6, 2, 11, 8, 4
    chunks = 3
    q = torch.randn(batch, heads, n, d)
    k, v = torch.randn(batch, kv_heads, n, d), torch.randn(batch, kv_heads, n, d)
    meta_q, meta_k = torch.randn(batch, heads, chunks, d), torch.randn(batch, kv_heads, chunks, d)
    grouped = bsbr_attention(q, k, v, meta_q, meta_k, size)
    expanded = bsbr_attention(q, *(t.repeat_interleave(3, dim=1) for t in (k, v)), meta_q,
                              meta_k.repeat_interleave(3, dim=1), size)
    torch.testing.assert_close(grouped, expanded)
    # head 4 uses kv head 1 (HF repeat_kv order)
    single = bsbr_attention(q[:, 4:5], k[:, 1:2], v[:, 1:2], meta_q[:, 4:5], meta_k[:, 1:2], size)
    torch.testing.assert_close(grouped[:, 4:5], single)


@pytest.mark.parametrize(
    "kwargs,match",
    [  # the common arguments and chunk_size: tests/test_contract.py
        (dict(hidden_dim=32, num_heads=4, chunk_size=4, compression_factor=3), "compression_factor"),
        (dict(hidden_dim=32, num_heads=4, chunk_size=4, compression_factor=0), "compression_factor"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BSBRAttention(**kwargs)


@pytest.mark.parametrize("compression", [None, 4])
def test_autograd_path_equals_inference_path_over_many_block_groups(compression):
    """The forward has a preallocated-output path (no autograd) and a split/cat path (autograd); over > 2 groups of
    32 chunks, a partial last chunk and a streamed continuation they give the same values, and both match the
    dense reference."""
    attn = make_attention(chunk_size=2, compression_factor=compression)
    x = torch.randn(2, 151, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        inference = attn(x)
        reference = dense_bsbr(attn, x)
        _, state = attn(x[:, :3], return_state=True)
        streamed_inference = attn(x[:, 3:], state=state)
    with_grad = attn(x)
    streamed_grad = attn(x[:, 3:], state=state)
    torch.testing.assert_close(inference, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_grad.detach(), inference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(streamed_grad.detach(), streamed_inference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(streamed_inference, inference[:, 3:], atol=1e-5, rtol=1e-5)
