"""BSBR attention: fast path == dense reference, causality (every chunk size, with compression), chunk_size >= seq_len
== standard attention, gradients, grouped-query heads and its own arguments; the same for ``retrieval="blocks"``
(against tests.reference.dense_block_attention in float64, causality through the selection, streaming, state size). Padding, streaming and the common
input checks are the contract every architecture keeps (tests/test_contract.py)."""

import pytest
import torch

import bsbr
from bsbr import BSBRAttention, StandardAttention
from bsbr.attention import bsbr_attention, chunk_mean
from tests.reference import dense_block_attention, dense_bsbr, dense_causal_attention, stream

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


# ------------------------------------------------------------------------ retrieval="blocks" (exact block retrieval)
# Padding, streaming in pieces, dtypes and the common checks: the contract's "bsbr_blocks" case (tests/test_contract.py).


def make_blocks(chunk_size=4, block_size=2, top_k=1, summary="minmax", sink_size=0, seed=0):
    torch.manual_seed(seed)
    return BSBRAttention(HIDDEN, HEADS, chunk_size, retrieval="blocks", block_size=block_size, top_k=top_k,
                         summary=summary, sink_size=sink_size).double().eval()


def blocks_reference(attn, x):
    """The layer written out: its projections around tests.reference.dense_block_attention (token by token)."""
    batch, n, _ = x.shape
    q, k, v = (getattr(attn, name)(x).view(batch, n, HEADS, -1).transpose(1, 2) for name in ("q_proj", "k_proj", "v_proj"))
    out = dense_block_attention(q, k, v, attn.chunk_size, attn.block_size, attn.top_k, attn.sink_size, attn.summary)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, n, HIDDEN))


def double_input(batch, n, seed=1):
    return torch.randn(batch, n, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("chunk_size,block_size,top_k,summary,sink_size",
                         [(4, 2, 1, "minmax", 0), (4, 2, 2, "mean", 1), (6, 3, 1, "minmax", 2), (4, 4, 1, "mean", 0)])
def test_blocks_match_the_written_out_reference(chunk_size, block_size, top_k, summary, sink_size):
    attn = make_blocks(chunk_size, block_size, top_k, summary, sink_size)
    x = double_input(2, 29)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), blocks_reference(attn, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_blocks_one_chunk_equals_standard_causal_attention(seq_len):
    attn = make_blocks(chunk_size=16, block_size=4, top_k=1)
    standard = StandardAttention(HIDDEN, HEADS).double().eval()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(standard, name).load_state_dict(getattr(attn, name).state_dict())
    x = double_input(3, seq_len)
    with torch.no_grad():
        out = attn(x)
        torch.testing.assert_close(out, standard(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(out, dense_causal_attention(attn, x), atol=1e-12, rtol=0)


def test_blocks_top_k_covering_every_block_is_full_causal_attention():
    attn = make_blocks(chunk_size=4, block_size=2, top_k=100, sink_size=1)
    x = double_input(2, 23)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), dense_causal_attention(attn, x), atol=1e-12, rtol=0)
    # with one block per token it is not: the selection is real
    selective = make_blocks(chunk_size=4, block_size=2, top_k=1)
    with torch.no_grad():
        assert (selective(x) - dense_causal_attention(selective, x)).abs().max() > 1e-3


def test_blocks_no_output_depends_on_a_later_token_even_through_the_selection():
    """Perturbing token p (large, so that later tokens' block choices change) leaves every output before p exactly as
    it was; p's own output moves. Token 8 sits in a block that is a candidate for tokens 12.. only."""
    attn = make_blocks(chunk_size=4, block_size=2, top_k=1)
    n = 23
    x = double_input(2, n)
    with torch.no_grad():
        base = attn(x)
        q = attn.q_proj(x).view(2, n, HEADS, -1).transpose(1, 2)
        k_base = attn.k_proj(x).view(2, n, HEADS, -1).transpose(1, 2)
        moved_selection = False
        for position in range(n):
            perturbed = x.clone()
            perturbed[:, position] += 5.0 * double_input(2, 1, seed=100 + position)[:, 0]
            out = attn(perturbed)
            torch.testing.assert_close(out[:, :position], base[:, :position], atol=1e-12, rtol=0)
            assert (out[:, position] - base[:, position]).abs().max() > 1e-6
            # the perturbation changes some later token's chosen block (so the test exercises the routing)
            k_new = attn.k_proj(perturbed).view(2, n, HEADS, -1).transpose(1, 2)
            moved_selection |= bool((chosen_blocks(q, k_new, 4, 2) != chosen_blocks(q, k_base, 4, 2)).any())
        assert moved_selection


def chosen_blocks(q, k, chunk_size, block_size):
    """Top-1 block per token and head by Quest's min/max bound (-1 where no block is a candidate yet)."""
    batch, heads, n, _ = q.shape
    chosen = torch.full((batch, heads, n), -1)
    for t in range(n):
        candidates = max(0, (t // chunk_size - 1) * chunk_size) // block_size
        if candidates:
            blocks = k[:, :, : candidates * block_size].unflatten(2, (candidates, block_size))  # [b, h, c, B, d]
            low, high = blocks.amin(3), blocks.amax(3)
            query = q[:, :, t, None]  # [b, h, 1, d]
            chosen[:, :, t] = torch.maximum(query * low, query * high).sum(-1).argmax(-1)
    return chosen


@pytest.mark.parametrize("pieces", [[1] * 21, [3, 2, 7, 1, 8], [4, 4, 13], [20, 1]])
def test_blocks_streaming_equals_the_full_forward(pieces):
    attn = make_blocks(chunk_size=4, block_size=2, top_k=1, summary="mean", sink_size=1)
    x = double_input(2, sum(pieces))
    with torch.no_grad():
        full, full_state = attn(x, return_state=True)
        streamed, state = stream(attn, x, pieces)
    torch.testing.assert_close(streamed, full, atol=1e-12, rtol=0)
    assert state.num_tokens == full_state.num_tokens == sum(pieces)
    # the state is a KV cache plus the block summaries: its bytes are the formula of state_nbytes
    assert state.nbytes() == full_state.nbytes() == attn.state_nbytes(sum(pieces), batch_size=2)
    assert state.nbytes() == 8 * 2 * HIDDEN * (2 * sum(pieces) + sum(pieces) // 2)  # float64, mean: 1 part per block


def test_blocks_have_no_meta_projections_and_gradients_reach_every_parameter():
    attn = make_blocks(chunk_size=4, block_size=2, top_k=1).train()
    names = sorted(name.split(".")[0] for name, _ in attn.named_parameters())
    assert sorted(set(names)) == ["k_proj", "out_proj", "q_proj", "v_proj"] and attn.compression is None
    assert not hasattr(attn, "meta_q_proj") and not hasattr(attn, "meta_k_proj")
    x = double_input(2, 17).requires_grad_()
    attn(x).square().mean().backward()
    for name, parameter in attn.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(retrieval="nope"), "retrieval"),
        (dict(retrieval=None), "retrieval"),
        (dict(block_size=2), "block_size"),  # a blocks setting with retrieval="state"
        (dict(top_k=1, summary="mean"), "top_k, summary"),
        (dict(retrieval="blocks", top_k=1), "block_size"),  # required
        (dict(retrieval="blocks", block_size=2), "top_k"),
        (dict(retrieval="blocks", block_size=3, top_k=1), "block_size"),  # does not divide chunk_size=4
        (dict(retrieval="blocks", block_size=0, top_k=1), "block_size"),
        (dict(retrieval="blocks", block_size=2, top_k=0), "top_k"),
        (dict(retrieval="blocks", block_size=2, top_k=1.5), "top_k"),
        (dict(retrieval="blocks", block_size=2, top_k=1, summary="max"), "summary"),
        (dict(retrieval="blocks", block_size=2, top_k=1, sink_size=-1), "sink_size"),
        (dict(retrieval="blocks", block_size=2, top_k=1, compression_factor=2), "compression_factor"),
    ],
)
def test_blocks_bad_configuration_raises_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BSBRAttention(HIDDEN, HEADS, 4, **kwargs)
    with pytest.raises(ValueError, match=match):
        bsbr.build_model("bsbr", vocab_size=10, hidden_dim=HIDDEN, num_layers=1, num_heads=HEADS, ff_dim=8,
                         chunk_size=4, **kwargs)


def test_blocks_model_builds_through_the_registry_with_the_standard_parameter_count():
    config = dict(vocab_size=10, hidden_dim=HIDDEN, num_layers=2, num_heads=HEADS, ff_dim=8)
    blocks = bsbr.build_model("bsbr", **config, chunk_size=4, retrieval="blocks", block_size=2, top_k=1)
    assert all(layer.attention.retrieval == "blocks" for layer in blocks.layers)
    count = lambda model: sum(p.numel() for p in model.parameters())
    assert count(blocks) == count(bsbr.build_model("standard", **config))
    assert count(bsbr.build_model("bsbr", **config, chunk_size=4)) == count(blocks) + 2 * 2 * (HIDDEN * HIDDEN + HIDDEN)
