"""Router recall: how much of the original model's attention mass the blocks a router selects hold, at equal budget.

Block retrieval (:mod:`bsbr.blocks`) lets query token ``t`` (chunk ``c = t // chunk_size``) attend exactly to its
local region (from ``L_c = max(0, (c - 1)·chunk_size)`` to ``t``), the sink tokens and the ``k`` earlier blocks a
*router* selects. Retrieval can only supply the mass the original model puts on the **candidate** blocks: the complete
blocks of ``block_size`` tokens ending at or before ``L_c``, sink tokens excluded (a block of sink tokens only is no
candidate). For every query token and head, with ``mass[t, j]`` the original attention weight on the non-sink keys of
block ``j``:

    recall(t) = Σ_{j selected} mass[t, j] / Σ_{j candidate} mass[t, j]

References at the same budget ``k`` (blocks; ``k·block_size`` tokens):

* **oracle**: the ``k`` candidates with most true mass — the ceiling of any router (:func:`top_k_recall` with
  ``scores = mass``);
* **recency**: the ``k`` most recent candidates (:func:`recency_scores`);
* **chance**: ``k`` candidates drawn uniformly; its expected recall is exactly ``min(k, m) / m`` for ``m`` candidates
  (each block is drawn with probability ``k/m``) — :func:`chance_recall`.

Routers: :func:`block_router_scores` (a token's own RoPE'd query against per-block key summaries, Quest's
``"minmax"`` bound or ``"mean"`` keys, :func:`bsbr.blocks.block_scores`, optionally a block's best page; per query
head or per key/value group, the group's scores summed as ``selection="group"`` in :mod:`bsbr.blocks`, its one choice
then scored per query head — the blocks :func:`bsbr.blocks.block_attention` attends, a test checks it) and
:func:`chunk_router_scores` (the seed's meta-query/meta-key routing of a normalised BSBR conversion, one choice per
chunk from the previous chunk's mean hidden state, :func:`bsbr.analysis.retrieval_weights`; its blocks are chunks).

A row with ``m <= k`` candidates recalls everything whatever the router; :func:`analysed_rows` gives the rows with
``m > k``, where routers can differ. :func:`layer_query_key` recomputes a Llama-family layer's RoPE'd queries and
keys from its input hidden state (``output_hidden_states``); :func:`t_interval` is the interval across windows.

Sources: Quest (Tang et al. 2024, arXiv 2406.10774), MoBA (Lu et al. 2025, arXiv 2502.13189), InfLLM (Xiao et al.
2024, arXiv 2402.04617).
"""

from __future__ import annotations

import math

import torch

from bsbr._checks import check_int_at_least, check_positive_int
from bsbr.blocks import SELECTIONS, SUMMARIES, best_page_scores, block_scores, block_summaries

__all__ = ["analysed_rows", "block_router_scores", "candidate_blocks", "chance_recall", "chunk_router_scores",
           "layer_query_key", "recency_scores", "t_interval", "top_k_recall"]


def candidate_blocks(n: int, chunk_size: int, block_size: int, sink_size: int = 0) -> torch.Tensor:
    """Which blocks each query token may retrieve: ``[n, n // block_size]`` bool, True where block ``j`` (tokens
    ``j·B .. (j+1)·B - 1``) ends at or before the query's local-region start ``L_c = max(0, (c-1)·chunk_size)`` and
    holds at least one non-sink token (``(j+1)·B > sink_size``).

    Raises:
        ValueError: ``n``, ``chunk_size``, ``block_size`` not integers >= 1, ``sink_size`` not >= 0, or
            ``block_size`` not dividing ``chunk_size``.
    """
    check_positive_int(n=n, chunk_size=chunk_size, block_size=block_size)
    check_int_at_least(0, sink_size=sink_size)
    if chunk_size % block_size:
        raise ValueError(f"block_size={block_size} must divide chunk_size={chunk_size}")
    local_start = ((torch.arange(n) // chunk_size - 1) * chunk_size).clamp(min=0)  # [n]: L_c
    block_end = (torch.arange(n // block_size) + 1) * block_size  # [blocks]
    return (block_end[None, :] <= local_start[:, None]) & (block_end[None, :] > sink_size)


def analysed_rows(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """``[n]`` bool: the query rows of ``candidates [n, blocks]`` with more than ``k`` candidates (elsewhere every
    router recalls all the mass)."""
    check_positive_int(k=k)
    return candidates.sum(-1) > k


def recency_scores(num_blocks: int) -> torch.Tensor:
    """``[num_blocks]`` scores that rank later blocks first (block index as float): the recency router."""
    check_positive_int(num_blocks=num_blocks)
    return torch.arange(num_blocks, dtype=torch.float64)


def top_k_recall(mass: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the candidate mass in the ``min(k, m)`` candidates with the highest ``scores``, per query row.

    Args:
        mass: ``[..., n, blocks]`` non-negative attention mass per block (e.g. :func:`bsbr.analysis.chunk_mass` of the
            original map with ``chunk_size=block_size``, sinks excluded; extra trailing blocks are ignored).
        scores: broadcastable to ``mass`` (e.g. ``[..., n, blocks]`` router scores, ``[blocks]`` recency, ``mass`` for
            the oracle); higher = preferred. A group's shared choice is a score repeated over its heads.
        candidates: ``[n, blocks]`` bool (:func:`candidate_blocks`).
        k: blocks selected per row (>= 1).
    Returns:
        ``[..., n]`` float64 in [0, 1]: NaN where a row has no candidate or no candidate mass; 1 where ``m <= k``.
    Raises:
        ValueError: ``k`` not an integer >= 1, or shapes that do not match.
    """
    check_positive_int(k=k)
    n, blocks = candidates.shape
    if mass.dim() < 2 or mass.shape[-2] != n or mass.shape[-1] < blocks:
        raise ValueError(f"mass must be [..., {n}, >= {blocks}] to match candidates, got {list(mass.shape)}")
    mass = mass[..., :blocks].double()
    scores = torch.broadcast_to(torch.as_tensor(scores), mass.shape[:-1] + (scores.shape[-1],))[..., :blocks]
    if scores.shape != mass.shape:
        raise ValueError(f"scores must broadcast to [..., {n}, >= {blocks}], got {list(scores.shape)}")
    kept = min(k, blocks)
    if kept == 0:
        return torch.full(mass.shape[:-1], float("nan"), dtype=torch.float64)
    ranked = scores.double().masked_fill(~candidates, float("-inf"))
    index = ranked.topk(kept, dim=-1).indices  # [..., n, kept]; non-candidates only when m < kept
    chosen = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, index, True) & candidates
    total = (mass * candidates).sum(-1)
    recall = (mass * chosen).sum(-1) / total
    return recall.masked_fill(total <= 0, float("nan"))


def chance_recall(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Expected recall of ``k`` candidates drawn uniformly without replacement: ``min(k, m) / m`` per row of
    ``candidates [n, blocks]`` (``m`` its candidates; NaN where ``m = 0``), ``[n]`` float64."""
    check_positive_int(k=k)
    m = candidates.sum(-1).double()
    return (m.clamp(max=k) / m).masked_fill(m == 0, float("nan"))


def block_router_scores(query: torch.Tensor, key: torch.Tensor, block_size: int, summary: str = "minmax",
                        selection: str = "head", sink_size: int = 0, page_size: int | None = None) -> torch.Tensor:
    """Scores of every query token against every complete block, as block retrieval ranks them
    (:func:`bsbr.blocks.block_attention_unchecked`).

    Args:
        query: ``[batch, heads, n, d]``; key: ``[batch, kv_heads, n, d]`` (RoPE'd; ``kv_heads`` divides ``heads``).
        block_size: tokens per block (>= 1).
        summary: ``"minmax"`` (Quest's bound) or ``"mean"`` (:data:`bsbr.blocks.SUMMARIES`); the sink tokens
            (positions ``< sink_size``) are left out of the summaries (:func:`bsbr.blocks.block_summaries`).
        selection: ``"head"`` (every query head its own scores) or ``"group"`` (the scores of a key/value group's
            query heads summed, and repeated to each of them: one shared choice).
        page_size: None (one summary per block), or tokens per summarised page (divides ``block_size``): a block
            scores its best page (Quest scores 16-token pages); pages of sink tokens only do not count.
    Returns:
        ``[batch, heads, n, n // block_size]``; a block of sink tokens only scores ``-inf`` with pages (it is never a
        candidate).
    Raises:
        ValueError: bad ``block_size``/``sink_size``/``page_size``, an unknown ``summary``/``selection``, or shapes.
    """
    check_positive_int(block_size=block_size)
    check_int_at_least(0, sink_size=sink_size)
    if page_size is not None:
        check_positive_int(page_size=page_size)
        if block_size % page_size:
            raise ValueError(f"page_size={page_size} must divide block_size={block_size}")
    if not isinstance(summary, str) or summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {list(SUMMARIES)}, got {summary!r}")
    if not isinstance(selection, str) or selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")
    if query.dim() != 4 or key.dim() != 4 or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:] \
            or query.shape[1] % key.shape[1]:
        raise ValueError(f"query [b, h, n, d] and key [b, kv_h, n, d] (kv_h dividing h) expected, got "
                         f"{list(query.shape)}, {list(key.shape)}")
    batch, heads, n, d = query.shape
    groups = key.shape[1]
    page = page_size or block_size
    blocks = n // block_size
    summaries = block_summaries(key[:, :, : blocks * block_size], page, summary, sink_size)  # [b, G, pages, parts, d]
    scores = block_scores(query.unflatten(1, (groups, heads // groups)), summaries, summary)  # [b, G, g, n, pages]
    if page < block_size:  # a block scores its best page; pages of sink tokens only do not count
        scores = best_page_scores(scores, block_size // page, sink_size // page)
    if selection == "group":
        scores = scores.sum(2, keepdim=True).expand_as(scores)  # one choice per group, repeated to its heads
    return scores.flatten(1, 2)  # [b, H, n, blocks]


def chunk_router_scores(weights: torch.Tensor, n: int, chunk_size: int) -> torch.Tensor:
    """The chunk routing of a normalised BSBR layer as per-token scores over chunks (blocks of ``chunk_size``).

    Args:
        weights: ``[..., chunks-1, chunks-1]`` (:func:`bsbr.analysis.retrieval_weights`: row ``r`` = query chunk
            ``r+1``, column ``j`` = earlier chunk ``j``), ``chunks = ceil(n / chunk_size)``.
        n: tokens; chunk_size: tokens per chunk.
    Returns:
        ``[..., n, n // chunk_size]``: token ``t`` of chunk ``c >= 1`` gets row ``c-1`` (the same choice for the whole
        chunk); chunk-0 tokens (no candidates) get zeros.
    Raises:
        ValueError: bad ``n``/``chunk_size`` or ``weights`` of another number of chunks.
    """
    check_positive_int(n=n, chunk_size=chunk_size)
    chunks = -(-n // chunk_size)
    if weights.dim() < 2 or weights.shape[-2:] != (chunks - 1, chunks - 1):
        raise ValueError(f"weights must be [..., {chunks - 1}, {chunks - 1}] for n={n}, chunk_size={chunk_size}, "
                         f"got {list(weights.shape)}")
    blocks = n // chunk_size
    rows = torch.nn.functional.pad(weights, (0, 1, 1, 0))  # [..., chunks, chunks]: row c = query chunk c
    per_token = rows.repeat_interleave(chunk_size, dim=-2)[..., :n, :]  # [..., n, chunks]
    return per_token[..., :blocks]


def layer_query_key(layer, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """RoPE'd ``query [b, heads, n, d]`` and ``key, value [b, kv_heads, n, d]`` of a Hugging Face Llama-family
    decoder ``layer`` (``input_layernorm``, ``self_attn.{q,k,v}_proj``, ``head_dim``) from its input
    ``hidden_states [b, n, hidden]`` (``output_hidden_states[l]`` for layer ``l``) and the model's
    ``position_embeddings = rotary_emb(hidden, positions)``: what the layer's attention computes internally."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    shape = (*hidden_states.shape[:2], -1, attn.head_dim)
    query, key, value = (proj(normed).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    return query, key, value


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` (one number per independent unit, e.g. per window) and its Student-t interval:
    ``(mean, low, high)``; ``(value, nan, nan)`` for a single value.

    Raises:
        ValueError: no values, a non-finite value, or ``confidence`` outside (0, 1).
    """
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"values must be a non-empty set of finite numbers, got {x.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half
