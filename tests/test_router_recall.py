"""bsbr.router_recall against written-out references on small random tensors (fixed seeds)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bsbr.analysis import causal_attention_probs, chunk_mass, retrieval_weights
from bsbr.blocks import block_attention
from bsbr.router_recall import (analysed_rows, block_router_scores, candidate_blocks, chance_recall,
                                chunk_router_scores, layer_query_key, recency_scores, t_interval, top_k_recall)
from tests.conftest import tiny_llama, tokens

N, CHUNK, BLOCK, SINKS = 24, 8, 2, 3  # 3 chunks of 8 tokens, 12 blocks of 2; sinks end inside block 1


def reference_candidates(n, chunk_size, block_size, sink_size):
    out = torch.zeros(n, n // block_size, dtype=torch.bool)
    for t in range(n):
        local_start = max(0, (t // chunk_size - 1) * chunk_size)
        for j in range(n // block_size):
            end = (j + 1) * block_size
            out[t, j] = end <= local_start and any(u >= sink_size for u in range(j * block_size, end))
    return out


def reference_recall(mass, scores, candidates, k):
    """Row by row: sort the candidates by score, keep the first k, divide their mass by the candidates' mass."""
    recall = torch.full(mass.shape[:-1], float("nan"), dtype=torch.float64)
    for index in itertools.product(*(range(s) for s in mass.shape[:-1])):
        row = candidates[index[-1]]
        js = [j for j in range(row.shape[0]) if row[j]]
        if not js:
            continue
        chosen = sorted(js, key=lambda j: -float(scores[index][j]))[:k]
        recall[index] = sum(float(mass[index][j]) for j in chosen) / sum(float(mass[index][j]) for j in js)
    return recall


def random_mass(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n, chunk, block, sinks", [(N, CHUNK, BLOCK, SINKS), (20, 8, 4, 0), (24, 4, 4, 4),
                                                    (24, 8, 2, 5)])
def test_candidates_match_the_written_out_rule(n, chunk, block, sinks):
    assert torch.equal(candidate_blocks(n, chunk, block, sinks), reference_candidates(n, chunk, block, sinks))


def test_candidates_by_hand():
    got = candidate_blocks(N, CHUNK, BLOCK, SINKS)  # chunk 2 (tokens 16..23): L = 8, blocks 0..3 end by 8
    assert not got[:16].any()  # chunks 0 and 1: nothing before the local region
    assert got[16:].tolist() == [[False, True, True, True] + [False] * 8] * 8  # block 0 = sinks 0, 1 only
    assert analysed_rows(got, 2).tolist() == [False] * 16 + [True] * 8
    assert not analysed_rows(got, 3).any()


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_recall_matches_reference_and_oracle_bounds_every_router(k):
    n, chunk, block = 32, 8, 2
    candidates = candidate_blocks(n, chunk, block, 1)
    mass = random_mass(2, 3, n, n // block)  # [batch, heads, n, blocks]
    scores = random_mass(2, 3, n, n // block, seed=1)
    got = top_k_recall(mass, scores, candidates, k)
    torch.testing.assert_close(got, reference_recall(mass, scores, candidates, k), rtol=1e-12, atol=1e-12, equal_nan=True)
    oracle = top_k_recall(mass, mass, candidates, k)
    torch.testing.assert_close(oracle, reference_recall(mass, mass, candidates, k), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isnan(got[..., :16]).all()  # chunks 0 and 1 have no candidates
    for seed in range(2, 6):
        router = top_k_recall(mass, random_mass(2, 3, n, n // block, seed=seed), candidates, k)
        assert (router[..., 16:] <= oracle[..., 16:] + 1e-12).all()
    rows = candidates.sum(-1) <= k
    assert (got[..., rows & candidates.any(-1)] == 1).all()  # m <= k: everything is recalled


def test_recency_recall_by_hand():
    candidates = candidate_blocks(N, CHUNK, BLOCK, SINKS)
    mass = torch.zeros(1, N, N // BLOCK, dtype=torch.float64)
    mass[0, 20, :6] = torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # blocks 4, 5 are no candidates (local region)
    recall = top_k_recall(mass, recency_scores(N // BLOCK), candidates, 2)
    assert recall[0, 20].item() == pytest.approx((2.0 + 3.0) / (1.0 + 2.0 + 3.0))  # blocks 3, 2 of 1..3
    assert top_k_recall(mass, mass, candidates, 2)[0, 20].item() == pytest.approx(5.0 / 6.0)  # oracle: blocks 3, 2
    assert top_k_recall(mass, -recency_scores(N // BLOCK), candidates, 2)[0, 20].item() == pytest.approx(3.0 / 6.0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_chance_is_the_exact_mean_over_all_k_subsets(k):
    candidates = candidate_blocks(40, 8, 2, 3)
    mass = random_mass(40, 20, seed=3)
    chance = chance_recall(candidates, k)
    for t in (17, 24, 31, 39):
        js = [j for j in range(20) if candidates[t, j]]
        subsets = list(itertools.combinations(js, min(k, len(js))))
        mean = sum(sum(float(mass[t, j]) for j in s) for s in subsets) / len(subsets) / float(mass[t, js].sum())
        assert chance[t].item() == pytest.approx(mean, rel=1e-12)
        assert chance[t].item() == pytest.approx(min(k, len(js)) / len(js), rel=1e-15)
    assert torch.isnan(chance[:16]).all()


def reference_block_scores(q, k, block_size, summary, selection, sink_size, page_size=None):
    """Loop over heads, tokens, blocks and pages; sinks left out of their page, a block scored by its best page, group
    scores summed over the group's heads."""
    batch, heads, n, d = q.shape
    group = heads // k.shape[1]
    page = page_size or block_size
    out = torch.zeros(batch, heads, n, n // block_size, dtype=q.dtype)
    for b, h, t, j in itertools.product(range(batch), range(heads), range(n), range(n // block_size)):
        kv = h // group
        if (j + 1) * block_size <= sink_size:
            continue  # a block of sinks only: never a candidate
        total = 0.0
        for hh in (range(kv * group, (kv + 1) * group) if selection == "group" else [h]):
            query, best = q[b, hh, t], float("-inf")
            for start in range(j * block_size, (j + 1) * block_size, page):
                keys = k[b, kv, max(start, sink_size): start + page]
                if keys.shape[0] == 0:
                    continue  # a page of sinks only does not count
                if summary == "minmax":
                    score = torch.maximum(query * keys.amin(0), query * keys.amax(0)).sum()
                else:
                    score = (query * keys.mean(0)).sum()
                best = max(best, float(score))
            total += best
        out[b, h, t, j] = total
    return out


@pytest.mark.parametrize("summary", ["minmax", "mean"])
@pytest.mark.parametrize("selection", ["head", "group"])
@pytest.mark.parametrize("sinks, page", [(0, None), (3, None), (0, 2), (3, 2), (5, 2)])
def test_block_router_scores_match_reference(summary, selection, sinks, page):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 13, 5, dtype=torch.float64), torch.randn(2, 2, 13, 5, dtype=torch.float64)
    got = block_router_scores(q, k, 4, summary, selection, sinks, page)  # 3 complete blocks, a partial one left out
    expected = reference_block_scores(q, k, 4, summary, selection, sinks, page)
    assert got.shape == (2, 4, 13, 3)
    candidates = reference_candidates(13, 4, 4, sinks)
    torch.testing.assert_close(got.masked_fill(~candidates, 0), expected.masked_fill(~candidates, 0))


def test_pages_bound_the_block_summary_from_below():
    """Quest's bound of a page is at most that of its block (a page's min/max lie inside the block's)."""
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 32, 6), torch.randn(1, 1, 32, 6)
    whole = block_router_scores(q, k, 8, "minmax", "head")
    paged = block_router_scores(q, k, 8, "minmax", "head", page_size=2)
    assert (paged <= whole + 1e-5).all() and not torch.allclose(paged, whole)


@pytest.mark.parametrize("summary, selection, page", [("minmax", "group", None), ("mean", "head", None),
                                                      ("minmax", "head", 2), ("mean", "group", 2)])
def test_the_router_selects_what_block_attention_attends(summary, selection, page):
    """block_attention's output equals exact attention over the local region, the sinks and the top-k candidates of
    block_router_scores: the analysis scores blocks as the operation does."""
    torch.manual_seed(5)
    n, chunk, block, k_top, sinks = 40, 8, 4, 2, 3
    q, k, v = (torch.randn(1, h, n, 6, dtype=torch.float64) for h in (4, 2, 2))
    got = block_attention(q, k, v, chunk, block, k_top, sinks, summary, selection, page_size=page)
    scores = block_router_scores(q, k, block, summary, selection, sinks, page)[0]  # [H, n, blocks]
    candidates = candidate_blocks(n, chunk, block, sinks)
    expected = torch.empty_like(q)
    for h, t in itertools.product(range(4), range(n)):
        local_start = max(0, (t // chunk - 1) * chunk)
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[local_start: t + 1] = True
        allowed[: min(sinks, t + 1)] = True
        js = [j for j in range(n // block) if candidates[t, j]]
        for j in sorted(js, key=lambda j: -float(scores[h, t, j]))[:k_top]:
            allowed[j * block: (j + 1) * block] = True
        logits = (k[0, h // 2] @ q[0, h, t]) / math.sqrt(6)
        expected[0, h, t] = torch.softmax(logits.masked_fill(~allowed, float("-inf")), 0) @ v[0, h // 2]
    torch.testing.assert_close(got, expected)


def test_group_selection_is_scored_per_query_head():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 32, 6), torch.randn(1, 2, 32, 6)
    candidates = candidate_blocks(32, 8, 4, 0)
    mass = random_mass(1, 4, 32, 8, seed=7)
    per_group = block_router_scores(q, k, 4, "minmax", "group")
    assert torch.equal(per_group[:, 0], per_group[:, 1]) and torch.equal(per_group[:, 2], per_group[:, 3])
    recall = top_k_recall(mass, per_group, candidates, 2)
    torch.testing.assert_close(recall, reference_recall(mass, per_group, candidates, 2), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert not torch.equal(recall[:, 0, 16:], recall[:, 1, 16:])  # one choice, each head's own mass


def test_chunk_router_scores_repeat_the_routing_row_of_each_chunk():
    torch.manual_seed(2)
    n, chunk = 20, 4  # 5 chunks
    weights = retrieval_weights(torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), 5)  # [1, 3, 4, 4]
    scores = chunk_router_scores(weights, n, chunk)
    assert scores.shape == (1, 3, n, 5)
    for t in range(n):
        c = t // chunk
        expected = torch.zeros(1, 3, 5)
        if c:
            expected[..., :4] = weights[:, :, c - 1]
        torch.testing.assert_close(scores[:, :, t], expected)
    # partial last chunk: 18 tokens = 4 complete chunks + 2 tokens
    partial = chunk_router_scores(weights, 18, chunk)
    assert partial.shape == (1, 3, 18, 4) and torch.equal(partial[:, :, 17], weights[:, :, 3])


def test_layer_query_key_reproduces_the_layers_attention_output():
    model = tiny_llama("eager")
    ids = tokens(2, 23)
    seen = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda module, args, i=i: seen.__setitem__(i, args[0])) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
        position_embeddings = model.model.rotary_emb(states[0], torch.arange(23)[None])
        for i, layer in enumerate(model.model.layers):
            q, k, v = layer_query_key(layer, states[i], position_embeddings)
            assert q.shape == (2, 4, 23, 16) and k.shape == v.shape == (2, 2, 23, 16)
            out = causal_attention_probs(q, k) @ v.repeat_interleave(2, dim=1)  # [2, 4, 23, 16]
            torch.testing.assert_close(out.transpose(1, 2).flatten(2), seen[i], atol=1e-5, rtol=1e-5)
    for handle in handles:
        handle.remove()


def test_recall_of_a_real_map_and_chunk_mass_blocks():
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 32, 4), torch.randn(1, 1, 32, 4)
    probs = causal_attention_probs(q, k)[0].double()  # [2, 32, 32]
    mass, _ = chunk_mass(probs, 4, 2)  # [2, 32, 8], sinks 0, 1 left out
    candidates = candidate_blocks(32, 8, 4, 2)
    oracle = top_k_recall(mass, mass, candidates, 8)
    assert (oracle[:, 16:] == 1).all()  # at most 4 candidates: all recalled
    full = top_k_recall(mass, mass, candidates, 1)
    by_hand = mass[:, 31, :4].max(-1).values / mass[:, 31, :4].sum(-1)  # token 31: L = 16, blocks 0..3
    torch.testing.assert_close(full[:, 31], by_hand)


def test_t_interval_matches_scipy():
    from scipy import stats

    values = [0.31, 0.42, 0.37, 0.29, 0.45]
    mean, low, high = t_interval(values, 0.9)
    expected = stats.t.interval(0.9, 4, loc=sum(values) / 5, scale=stats.sem(values))
    assert mean == pytest.approx(sum(values) / 5)
    assert (low, high) == pytest.approx(expected)
    single = t_interval([0.5])
    assert single[0] == 0.5 and math.isnan(single[1]) and math.isnan(single[2])


@pytest.mark.parametrize("call, match", [
    (lambda: candidate_blocks(16, 8, 3), "block_size=3 must divide chunk_size=8"),
    (lambda: candidate_blocks(16, 8, 0), "block_size must be an integer >= 1"),
    (lambda: candidate_blocks(16, 8, 2, -1), "sink_size must be an integer >= 0"),
    (lambda: top_k_recall(torch.ones(4, 2), torch.ones(4, 2), torch.ones(4, 2, dtype=torch.bool), 0),
     "k must be an integer >= 1"),
    (lambda: top_k_recall(torch.ones(3, 2), torch.ones(3, 2), torch.ones(4, 2, dtype=torch.bool), 1), "mass must be"),
    (lambda: block_router_scores(torch.ones(1, 2, 8, 4), torch.ones(1, 1, 8, 4), 4, "max"), "summary must be one of"),
    (lambda: block_router_scores(torch.ones(1, 2, 8, 4), torch.ones(1, 1, 8, 4), 4, "mean", "token"),
     "selection must be one of"),
    (lambda: block_router_scores(torch.ones(1, 3, 8, 4), torch.ones(1, 2, 8, 4), 4), "query \\[b, h, n, d\\]"),
    (lambda: block_router_scores(torch.ones(1, 2, 8, 4), torch.ones(1, 1, 8, 4), 4, page_size=3),
     "page_size=3 must divide block_size=4"),
    (lambda: chunk_router_scores(torch.ones(1, 2, 2), 16, 4), "weights must be"),
    (lambda: t_interval([]), "non-empty"),
    (lambda: t_interval([1.0, 2.0], 1.5), "confidence"),
])
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
