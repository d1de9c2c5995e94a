"""Block retrieval (bsbr.blocks): against the written-out reference (tests.reference.dense_block_attention, float64,
<= 1e-10), full causal attention when everything is reachable, causality through the routing, streaming == one call,
bad input. Every test runs twice: with each query chunk gathering the union of its rows' blocks once, and with every
row gathering its own blocks (bsbr.blocks.UNION_GATHER_RATIO forced either way)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bsbr.blocks
from bsbr.blocks import BlocksState, block_attention, block_scores, block_summaries, rope_rotate
from tests.reference import dense_block_attention, dense_block_attention_compact, rope_at

pytestmark = pytest.mark.usefixtures("one_thread", "gather")

#: UNION_GATHER_RATIO values forcing each path: every slice of rows gathers its union / every row its own blocks. The
#: union path runs with slices of 3 rows, so a chunk has several slices and the last one is padded.
GATHERS = {"union": 10**9, "per_row": 0}
DEFAULT_UNION_GATHER_RATIO = bsbr.blocks.UNION_GATHER_RATIO


@pytest.fixture(params=sorted(GATHERS))
def gather(request, monkeypatch):
    monkeypatch.setattr(bsbr.blocks, "UNION_GATHER_RATIO", GATHERS[request.param])
    monkeypatch.setattr(bsbr.blocks, "UNION_ROWS", 3)
    return request.param


def test_the_forced_path_is_the_path_taken(gather, monkeypatch):
    calls = []
    per_row = bsbr.blocks._per_row
    monkeypatch.setattr(bsbr.blocks, "_per_row", lambda *a: calls.append(1) or per_row(*a))
    q, k, v = qkv(n=37)
    out = block_attention(q, k, v, chunk_size=8, block_size=2, top_k=2)
    assert torch.allclose(out, dense_block_attention(q, k, v, 8, 2, 2), atol=1e-10, rtol=0)
    assert bool(calls) == (gather == "per_row")


def qkv(batch=2, heads=4, kv_heads=2, n=37, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, d, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, d, generator=g, dtype=dtype)
    return q, k, v


# (heads, kv_heads, n, chunk_size, block_size, top_k, sink_size)
SHAPES = [(4, 2, 37, 8, 2, 2, 0), (4, 2, 37, 8, 4, 1, 3), (4, 2, 41, 6, 3, 3, 2), (3, 3, 29, 4, 2, 2, 1),
          (4, 1, 33, 8, 8, 2, 5), (4, 2, 37, 8, 2, 100, 1)]


@pytest.mark.parametrize("summary", ["minmax", "mean"])
@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize(("heads", "kv_heads", "n", "chunk_size", "block_size", "top_k", "sink_size"), SHAPES)
def test_matches_the_written_out_reference(heads, kv_heads, n, chunk_size, block_size, top_k, sink_size, summary,
                                           selection):
    q, k, v = qkv(heads=heads, kv_heads=kv_heads, n=n, seed=n + top_k)
    got = block_attention(q, k, v, chunk_size, block_size, top_k, sink_size, summary, selection)
    expected = dense_block_attention(q, k, v, chunk_size, block_size, top_k, sink_size, summary, selection)
    assert (got - expected).abs().max() <= 1e-10


@pytest.mark.parametrize("summary", ["minmax", "mean"])
@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize(("n", "chunk_size", "block_size", "page_size", "top_k", "sink_size"),
                         [(37, 8, 4, 2, 1, 3), (41, 12, 6, 2, 2, 5), (33, 8, 8, 1, 2, 0), (45, 8, 4, 4, 2, 4)])
def test_pages_match_the_written_out_reference(n, chunk_size, block_size, page_size, top_k, sink_size, summary,
                                               selection):
    q, k, v = qkv(n=n, seed=n + page_size)
    got = block_attention(q, k, v, chunk_size, block_size, top_k, sink_size, summary, selection, page_size=page_size)
    expected = dense_block_attention(q, k, v, chunk_size, block_size, top_k, sink_size, summary, selection,
                                     page_size)
    assert (got - expected).abs().max() <= 1e-10
    if page_size < block_size:  # pages change which blocks win
        whole = block_attention(q, k, v, chunk_size, block_size, top_k, sink_size, summary, selection)
        assert (got - whole).abs().max() > 1e-6


def test_selection_differs_between_tokens_and_between_heads_of_a_group():
    """Per-token selection is exercised: tokens of one chunk pick different blocks; head-wise choices differ from the
    group's pooled one (so the reference comparisons above cover distinct rules)."""
    q, k, _ = qkv(n=64)
    summaries = block_summaries(k, 4)[:, :, :12]  # the candidates of chunk 2 (chunk 8)
    rows = q[:, :, 16:24].unflatten(1, (2, 2))  # [b, G, g, r, d]
    per_head = block_scores(rows, summaries).topk(2, dim=-1).indices
    pooled = block_scores(rows, summaries).sum(2).topk(2, dim=-1).indices
    assert len({tuple(sorted(x)) for x in pooled[0, 0].tolist()}) > 1  # tokens differ
    assert not torch.equal(per_head.sort(-1).values, pooled[:, :, None].expand_as(per_head).sort(-1).values)


def test_quest_bound_is_an_upper_bound_on_every_key_in_the_block_and_mean_is_the_mean_score():
    q, k, _ = qkv(n=32)
    scores = block_scores(q[:, :2], block_summaries(k, 8, "minmax"))  # [b, G=2, n, blocks]: heads 0, 1 vs G 0, 1
    exact = (q[:, :2] @ k.transpose(-1, -2)).unflatten(-1, (4, 8)).amax(-1)  # per-head max q·k per block
    assert (scores >= exact - 1e-12).all()
    mean = block_scores(q[:, :2], block_summaries(k, 8, "mean"), "mean")
    torch.testing.assert_close(mean, (q[:, :2] @ k.transpose(-1, -2)).unflatten(-1, (4, 8)).mean(-1))


@pytest.mark.parametrize("summary", ["minmax", "mean"])
def test_everything_reachable_is_full_causal_attention(summary):
    q, k, v = qkv(n=37)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for chunk_size, top_k in ((40, 1), (20, 1), (8, 100), (4, 9)):  # local covers all, or top_k does
        got = block_attention(q, k, v, chunk_size, 4, top_k, summary=summary)
        assert (got - full).abs().max() <= 1e-12, (chunk_size, top_k)


@pytest.mark.parametrize("selection", ["group", "head"])
def test_causal_including_the_routing(selection):
    """Changing token t (its query, key and value) changes nothing before t; it does change later tokens' choices."""
    q, k, v = qkv(n=48)
    args = (8, 4, 2, 1, "minmax", selection)
    base = block_attention(q, k, v, *args)
    for t in (0, 5, 17, 30, 47):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t] += 5.0
        k2[:, :, t] += 5.0
        v2[:, :, t] -= 3.0
        out = block_attention(q2, k2, v2, *args)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], atol=1e-12, rtol=0)
        assert (out[:, :, t:] - base[:, :, t:]).abs().max() > 1e-3
    # a key far back moves its block's summary: later tokens retrieve it, earlier ones cannot see the difference
    k2 = k.clone()
    k2[:, :, 5] = 50 * q[:, :, 40].unflatten(1, (2, 2)).sum(2)
    scores = block_scores(q[:, :, 40:41].unflatten(1, (2, 2)), block_summaries(k2, 4)[:, :, :6]).sum(2)
    assert bool((scores.argmax(-1) == 1).all())  # token 40 now picks block 1 (positions 4..7)
    out = block_attention(q, k2, v, *args)
    torch.testing.assert_close(out[:, :, :5], base[:, :, :5], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pieces", [(1,) * 29, (5, 1, 9, 3, 11), (8, 8, 13), (29,)])
def test_streaming_in_pieces_equals_one_call(pieces, dtype):
    q, k, v = qkv(n=29, dtype=dtype)
    args = (8, 2, 2, 3, "minmax", "group")
    full = block_attention(q, k, v, *args)
    outs, state, start = [], None, 0
    for size in pieces:
        out, state = block_attention(q[:, :, start: start + size], k[:, :, start: start + size],
                                     v[:, :, start: start + size], *args, state=state, return_state=True)
        outs.append(out)
        start += size
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert (torch.cat(outs, 2) - full).abs().max() <= tolerance
    assert isinstance(state, BlocksState) and state.num_tokens == 29
    assert state.summaries.shape == (2, 2, 14, 2, 8)
    assert state.nbytes() == (2 * 2 * 29 * 8 * 2 + 2 * 2 * 14 * 2 * 8) * q.element_size()


def test_bad_input_raises_naming_the_argument():
    q, k, v = qkv(n=8)
    with pytest.raises(ValueError, match="top_k"):
        block_attention(q, k, v, 4, 2, 0)
    with pytest.raises(ValueError, match="block_size"):
        block_attention(q, k, v, 4, 3, 1)
    with pytest.raises(ValueError, match="summary"):
        block_attention(q, k, v, 4, 2, 1, summary="median")
    with pytest.raises(ValueError, match="selection"):
        block_attention(q, k, v, 4, 2, 1, selection="layer")
    with pytest.raises(ValueError, match="sink_size"):
        block_attention(q, k, v, 4, 2, 1, sink_size=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        block_attention(q, k, v, 0, 2, 1)
    with pytest.raises(ValueError, match="divide"):
        block_attention(q, k[:, :1].expand(2, 3, 8, 8), v[:, :1].expand(2, 3, 8, 8), 4, 2, 1)
    _, state = block_attention(q, k, v, 4, 2, 1, return_state=True)
    with pytest.raises(ValueError, match="state"):
        block_attention(q, k, v, 4, 2, 1, summary="mean", state=state)


def test_no_tensor_grows_with_n_squared(gather, monkeypatch):
    """Every tensor the op creates (recorded at dispatch) is far smaller than an [n, n] score matrix: at n = 4,096 none
    exceeds the output [1, 2, n, 4], and from n = 1,024 to 4,096 the largest grows at most linearly (the cache), not
    16× as n². The union path runs at its default bound (a union allowed to grow to every candidate block would grow
    with n)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if gather == "union":
        monkeypatch.setattr(bsbr.blocks, "UNION_GATHER_RATIO", DEFAULT_UNION_GATHER_RATIO)

    def largest(n):
        sizes = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                sizes.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,))
                             if isinstance(t, torch.Tensor))
                return out

        q, k, v = qkv(batch=1, heads=2, kv_heads=1, n=n, d=4, dtype=torch.float32)
        with Record():
            block_attention(q, k, v, 32, 8, 2, sink_size=4)
        return max(sizes)

    small, large = largest(1024), largest(4096)
    assert large == 2 * 4096 * 4  # the output: nothing near n² = 16,777,216
    assert large <= 4 * small  # linear growth at most


def rope_inputs(n=37, heads=4, kv_heads=2, d=8, seed=0):
    """Raw q, k, v, inverse frequencies (base 10,000) and the RoPE'd q, k at positions 0..n-1."""
    q, k, v = qkv(heads=heads, kv_heads=kv_heads, n=n, d=d, seed=seed)
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    positions = torch.arange(n)
    return q, k, v, inv_freq, rope_at(q, positions, inv_freq), rope_at(k, positions, inv_freq)


def test_rope_rotate_moves_a_rope_vector_by_the_shift():
    q, _, _, inv_freq, q_rot, _ = rope_inputs(n=12)
    moved = rope_rotate(q_rot, torch.tensor(-7.0), inv_freq)  # every position 7 back: positions -7..4
    torch.testing.assert_close(moved, rope_at(q, torch.arange(12) - 7, inv_freq), atol=1e-12, rtol=0)
    per_token = rope_rotate(q_rot, torch.arange(12) * 3, inv_freq)  # token i to position 4·i
    torch.testing.assert_close(per_token, rope_at(q, torch.arange(12) * 4, inv_freq), atol=1e-12, rtol=0)


@pytest.mark.parametrize("summary", ["minmax", "mean"])
@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize(("n", "chunk_size", "block_size", "top_k", "sink_size"),
                         [(37, 8, 4, 1, 3), (41, 6, 3, 2, 2), (33, 8, 2, 3, 5), (37, 8, 4, 100, 0)])
def test_compact_positions_match_the_written_out_reference(n, chunk_size, block_size, top_k, sink_size, summary,
                                                           selection):
    q, k, v, inv_freq, q_rot, k_rot = rope_inputs(n=n, seed=n + top_k)
    got = block_attention(q_rot, k_rot, v, chunk_size, block_size, top_k, sink_size, summary, selection,
                          positions="compact", rope_inv_freq=inv_freq)
    expected = dense_block_attention_compact(q, k, v, inv_freq, chunk_size, block_size, top_k, sink_size, summary,
                                             selection)
    assert (got - expected).abs().max() <= 1e-10
    original = block_attention(q_rot, k_rot, v, chunk_size, block_size, top_k, sink_size, summary, selection)
    assert (got - original)[:, :, 2 * chunk_size:].abs().max() > 1e-3  # compact positions do change the result
    torch.testing.assert_close(got[:, :, :chunk_size], original[:, :, :chunk_size], atol=1e-12, rtol=0)  # chunk 0


@pytest.mark.parametrize("pieces", [(1,) * 29, (5, 1, 9, 3, 11), (29,)])
def test_compact_streaming_in_pieces_equals_one_call(pieces):
    q, k, v, inv_freq, q_rot, k_rot = rope_inputs(n=29)
    args = (8, 2, 2, 3, "minmax", "group")
    kwargs = {"positions": "compact", "rope_inv_freq": inv_freq}
    full = block_attention(q_rot, k_rot, v, *args, **kwargs)
    outs, state, start = [], None, 0
    for size in pieces:
        piece = slice(start, start + size)
        out, state = block_attention(q_rot[:, :, piece], k_rot[:, :, piece], v[:, :, piece], *args, state=state,
                                     return_state=True, **kwargs)
        outs.append(out)
        start += size
    assert (torch.cat(outs, 2) - full).abs().max() <= 1e-12
    assert state.positions == "compact" and state.retrieved_key.shape == k.shape
    with pytest.raises(ValueError, match="positions"):
        block_attention(q_rot[:, :, :1], k_rot[:, :, :1], v[:, :, :1], *args, state=state)


def test_state_appends_in_place_and_a_state_continued_twice_is_not_corrupted():
    q, k, v = qkv(n=40)
    args = (8, 2, 2, 3, "mean", "group")
    _, state = block_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], *args, return_state=True)
    buffer = state.buffers["key"].data
    assert buffer.shape[2] == 30  # room for half as many tokens again (GrowingTensor.GROWTH = 1.5)
    _, longer = block_attention(q[:, :, 20:30], k[:, :, 20:30], v[:, :, 20:30], *args, state=state,
                                return_state=True)
    assert longer.buffers["key"].data is buffer  # appended in place: no copy of the first 20 tokens
    assert state.key.shape[2] == 20 and state.nbytes() < longer.nbytes() <= longer.capacity_nbytes()
    # continue the older state again with different tokens: it must not see (or overwrite) the first continuation
    other, forked = block_attention(-q[:, :, 20:30], -k[:, :, 20:30], -v[:, :, 20:30], *args, state=state,
                                    return_state=True)
    assert forked.buffers["key"].data is not buffer
    expected = block_attention(torch.cat([q[:, :, :20], -q[:, :, 20:30]], 2), torch.cat([k[:, :, :20], -k[:, :, 20:30]], 2),
                               torch.cat([v[:, :, :20], -v[:, :, 20:30]], 2), *args)[:, :, 20:]
    assert (other - expected).abs().max() <= 1e-12
    last, _ = block_attention(q[:, :, 30:40], k[:, :, 30:40], v[:, :, 30:40], *args, state=longer, return_state=True)
    assert (last - block_attention(q, k, v, *args)[:, :, 30:]).abs().max() <= 1e-12


def test_pages_stream_in_pieces_and_are_checked():
    q, k, v, inv_freq, q_rot, k_rot = rope_inputs(n=29)
    args = (8, 4, 2, 3, "minmax", "head")
    kwargs = {"positions": "compact", "rope_inv_freq": inv_freq, "page_size": 2}
    full = block_attention(q_rot, k_rot, v, *args, **kwargs)
    outs, state, start = [], None, 0
    for size in (5, 1, 9, 3, 11):
        piece = slice(start, start + size)
        out, state = block_attention(q_rot[:, :, piece], k_rot[:, :, piece], v[:, :, piece], *args, state=state,
                                     return_state=True, **kwargs)
        outs.append(out)
        start += size
    assert (torch.cat(outs, 2) - full).abs().max() <= 1e-12
    assert state.summaries.shape == (2, 2, 14, 2, 8)  # one summary per 2-token page
    with pytest.raises(ValueError, match="page_size"):
        block_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], 8, 4, 1, page_size=3)
    with pytest.raises(ValueError, match="page_size"):
        block_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], 8, 4, 1, page_size=0)
    with pytest.raises(ValueError, match="state"):
        block_attention(q_rot[:, :, :1], k_rot[:, :, :1], v[:, :, :1], *args, state=state,
                        **{**kwargs, "page_size": None})


def test_compact_settings_are_checked():
    q, k, v = qkv(n=8)
    with pytest.raises(ValueError, match="positions"):
        block_attention(q, k, v, 4, 2, 1, positions="relative")
    with pytest.raises(ValueError, match="rope_inv_freq"):
        block_attention(q, k, v, 4, 2, 1, positions="compact")
    with pytest.raises(ValueError, match="rope_inv_freq"):
        block_attention(q, k, v, 4, 2, 1, rope_inv_freq=torch.ones(4))


# --- a chunk-level router (router="meta": the caller's scores, one choice per query chunk) ----------------------------


def chunk_scores_for(batch=2, heads=4, n=37, chunk_size=4, seed=1):
    """Random chunk-router scores ``[batch, heads, chunks, chunks]`` (row: the query's chunk; column: a chunk)."""
    chunks = -(-n // chunk_size)
    return torch.randn(batch, heads, chunks, chunks, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize(("n", "chunk_size", "top_k", "sink_size"), [(37, 4, 2, 0), (41, 4, 3, 2), (33, 8, 1, 9)])
def test_chunk_router_matches_the_written_out_reference(n, chunk_size, top_k, sink_size, selection):
    q, k, v = qkv(n=n, seed=n)
    scores = chunk_scores_for(n=n, chunk_size=chunk_size, seed=top_k)
    got = block_attention(q, k, v, chunk_size, chunk_size, top_k, sink_size, "mean", selection, chunk_scores=scores)
    expected = dense_block_attention(q, k, v, chunk_size, chunk_size, top_k, sink_size, "mean", selection,
                                     chunk_scores=scores)
    assert (got - expected).abs().max() <= 1e-10
    by_query = block_attention(q, k, v, chunk_size, chunk_size, top_k, sink_size, "mean", selection)
    assert (got - by_query)[:, :, 3 * chunk_size:].abs().max() > 1e-3  # the router decides which chunks are read


def test_chunk_router_is_one_choice_per_chunk_and_its_scores_alone_decide():
    """The tokens of a chunk retrieve what the chunk's row of scores says, whatever their own queries: swapping two
    chunks' scores in row c swaps which of them chunk c reads (the output equals the run with those chunks chosen)."""
    q, k, v = qkv(n=32, seed=3)
    scores = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    scores[:, :, 6, 1] = 1.0  # chunk 6 (tokens 24..27) reads chunk 1 (tokens 4..7)
    out = block_attention(q, k, v, 4, 4, 1, chunk_scores=scores)
    scores[:, :, 6, 1], scores[:, :, 6, 3] = 0.0, 1.0  # now chunk 3 (tokens 12..15)
    moved = block_attention(q, k, v, 4, 4, 1, chunk_scores=scores)
    torch.testing.assert_close(out[:, :, :24], moved[:, :, :24], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[:, :, 28:], moved[:, :, 28:], atol=1e-12, rtol=0)
    for chosen, got in ((1, out), (3, moved)):
        for t in range(24, 28):  # local region 20..t, plus the chosen chunk
            allowed = torch.zeros(32, dtype=torch.bool)
            allowed[20: t + 1] = True
            allowed[4 * chosen: 4 * chosen + 4] = True
            k_full, v_full = (x.repeat_interleave(2, dim=1)[:, :, allowed] for x in (k, v))
            weights = torch.softmax(q[:, :, t: t + 1] @ k_full.transpose(-1, -2) / 8 ** 0.5, dim=-1)
            torch.testing.assert_close(got[:, :, t: t + 1], weights @ v_full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pieces", [(1,) * 29, (5, 1, 9, 3, 11), (8, 8, 13)])
def test_chunk_router_streams_in_pieces_equal_to_one_call(pieces):
    q, k, v = qkv(n=29)
    scores = chunk_scores_for(n=29, chunk_size=4)
    args = (4, 4, 2, 1, "minmax", "group")
    full = block_attention(q, k, v, *args, chunk_scores=scores)
    outs, state, start = [], None, 0
    for size in pieces:
        rows = scores[:, :, start // 4: (start + size - 1) // 4 + 1]  # the chunks this piece's queries fall in
        out, state = block_attention(q[:, :, start: start + size], k[:, :, start: start + size],
                                     v[:, :, start: start + size], *args, state=state, return_state=True,
                                     chunk_scores=rows)
        outs.append(out)
        start += size
    assert (torch.cat(outs, 2) - full).abs().max() <= 1e-12


def test_chunk_router_settings_are_checked():
    q, k, v = qkv(n=16)
    scores = chunk_scores_for(n=16, chunk_size=4)
    with pytest.raises(ValueError, match="router='meta'.*block_size"):
        block_attention(q, k, v, 4, 2, 1, chunk_scores=scores)
    with pytest.raises(ValueError, match="page_size"):
        block_attention(q, k, v, 4, 4, 1, page_size=2, chunk_scores=scores)
    with pytest.raises(ValueError, match="chunk_scores"):
        block_attention(q, k, v, 4, 4, 1, chunk_scores=scores[:, :, :3])  # 4 query chunks
    with pytest.raises(ValueError, match="chunk_scores"):
        block_attention(q, k, v, 4, 4, 1, chunk_scores=scores[:, :2])  # heads
    with pytest.raises(ValueError, match="chunk_scores"):
        block_attention(q, k, v, 4, 4, 1, chunk_scores=scores[..., :1])  # chunk 3 reads chunks 0..1
    with pytest.raises(ValueError, match="router"):
        bsbr.blocks.check_block_settings(4, 4, 1, router="summary")
