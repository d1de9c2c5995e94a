"""Block retrieval: exact softmax attention on the earlier blocks each query token selects with its own query.

Every query token ``t`` (chunk ``c = t // chunk_size``) attends in **one** exact softmax (scale ``1/sqrt(d)``) to

* its **local** region: tokens ``L_c .. t`` with ``L_c = max(0, (c - 1)·chunk_size)`` — its own chunk up to itself and
  the whole previous chunk (the "terraced" window of LoLCATs, arXiv 2410.10254);
* the **sink** tokens ``0 .. sink_size-1`` (those before ``L_c``; attention sinks, Xiao et al. 2023, arXiv 2309.17453);
* the **top-k retrieved blocks**: the sequence is cut into blocks of ``block_size`` tokens (``block_size`` divides
  ``chunk_size``, so blocks never straddle a chunk). A block is a *candidate* for ``t`` when it ends at or before
  ``L_c`` (complete before ``t``'s local region); ``t`` scores every candidate with its own query against the
  block's key summary and keeps the ``min(top_k, candidates)`` best (all candidates when ``top_k`` exceeds them).
  Sink tokens inside a retrieved block are counted once.

Summaries of a block's keys ``K_j`` (``summary=``), and the score of a query ``q`` against them:

* ``"minmax"``: per-channel ``m = min K_j``, ``M = max K_j``; score ``Σᵢ max(qᵢ·mᵢ, qᵢ·Mᵢ)``, an upper bound on
  ``max_u q·k_u`` over the block (Quest, Tang et al. 2024, arXiv 2406.10774; mit-han-lab/Quest);
* ``"mean"``: ``q·mean(K_j)`` (the block routing of MoBA, Lu et al. 2025, arXiv 2502.13189).

Selection granularity (``selection=``): ``"group"`` (default) makes one choice per token and key/value group — the
scores of the query heads sharing a key/value head are **summed**, so the group shares one set of blocks (and one
gathered copy of their keys/values), as grouped-query attention shares keys; ``"head"`` lets every query head choose
its own blocks. Selection is **per token**: no two tokens share a choice.

Causality, including the routing: a candidate block lies entirely before ``t``'s local region and its summary uses
only its own keys, so nothing at or after ``t + 1`` changes ``t``'s output or which blocks ``t`` retrieves.
With ``chunk_size >= n`` (one chunk), or ``top_k`` covering every candidate, this is full causal attention.

Memory: the op walks the query chunks; for a chunk it holds ``[chunk, 2·chunk]`` local scores and the
``top_k·block_size`` gathered keys/values per token (per group, or per head with ``selection="head"``):
O(n·(2·chunk_size + sink_size + top_k·block_size)) in all, never an ``[n, n]`` tensor.

Streaming: :class:`BlocksState` keeps every token's keys and values (exact retrieval needs them: a KV cache) plus the
summaries of the finished blocks; :func:`block_attention` with ``state=`` continues it, each new token selecting from
the cache, and equals one call over the whole sequence.

Sources: Quest (arXiv 2406.10774), InfLLM (Xiao et al. 2024, arXiv 2402.04617: top-k blocks + initial tokens + local
window in one softmax), MoBA (arXiv 2502.13189), LoLCATs (arXiv 2410.10254).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bsbr._checks import check_int_at_least, check_positive_int

__all__ = ["SELECTIONS", "SUMMARIES", "BlocksState", "block_attention", "block_attention_unchecked", "block_scores",
           "block_summaries", "check_block_settings"]

#: block summaries, name -> number of ``[d]`` vectors stored per block
SUMMARIES: dict[str, int] = {"minmax": 2, "mean": 1}
#: selection granularities: one choice per key/value group (scores summed over its query heads) or per query head
SELECTIONS = ("group", "head")


def check_block_settings(chunk_size, block_size, top_k, sink_size=0, summary="minmax", selection="group") -> None:
    """Raise ValueError naming the argument unless: ``chunk_size``, ``block_size`` and ``top_k`` are integers >= 1,
    ``block_size`` divides ``chunk_size``, ``sink_size`` is an integer >= 0, ``summary`` is a key of
    :data:`SUMMARIES` and ``selection`` one of :data:`SELECTIONS`."""
    check_positive_int(chunk_size=chunk_size, block_size=block_size, top_k=top_k)
    check_int_at_least(0, sink_size=sink_size)
    if chunk_size % block_size:
        raise ValueError(f"block_size={block_size} must divide chunk_size={chunk_size} (blocks may not straddle "
                         "chunks)")
    if not isinstance(summary, str) or summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {list(SUMMARIES)}, got {summary!r}")
    if not isinstance(selection, str) or selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")


def block_summaries(key: torch.Tensor, block_size: int, summary: str = "minmax") -> torch.Tensor:
    """Summaries of the complete blocks of ``key [batch, kv_heads, n, d]``: ``[batch, kv_heads, n // block_size,
    parts, d]`` (``parts`` = 2 for ``"minmax"``: min then max per channel; 1 for ``"mean"``). A trailing partial
    block is left out (it is never a candidate)."""
    batch, groups, n, d = key.shape
    blocks = key[:, :, : n // block_size * block_size].unflatten(2, (n // block_size, block_size))  # [b, G, nb, B, d]
    if summary == "minmax":
        return torch.stack([blocks.amin(3), blocks.amax(3)], dim=3)  # [b, G, nb, 2, d]
    return blocks.mean(3, keepdim=True)  # [b, G, nb, 1, d]


def block_scores(query: torch.Tensor, summaries: torch.Tensor, summary: str = "minmax") -> torch.Tensor:
    """Scores of ``query [batch, kv_heads, ..., rows, d]`` against ``summaries [batch, kv_heads, blocks, parts, d]``
    (:func:`block_summaries`): ``[batch, kv_heads, ..., rows, blocks]`` (unscaled; only their order matters)."""
    extra = query.dim() - 4  # query dims between kv_heads and rows

    def keys(part):  # [b, G, (1,)*extra, d, blocks]
        s = summaries[:, :, :, part].transpose(-1, -2)
        return s.view(s.shape[0], s.shape[1], *([1] * extra), *s.shape[2:])

    if summary == "minmax":  # Σᵢ max(qᵢ mᵢ, qᵢ Mᵢ) = q⁺·M + q⁻·m
        return query.clamp(min=0) @ keys(1) + query.clamp(max=0) @ keys(0)
    return query @ keys(0)


@dataclass
class BlocksState:
    """Streaming state of :func:`block_attention` after ``num_tokens`` tokens (a KV cache plus block summaries).

    * ``key, value``: ``[batch, kv_heads, num_tokens, d]`` — every token's keys and values (positions applied);
    * ``summaries``: ``[batch, kv_heads, num_tokens // block_size, parts, d]`` — the finished blocks' summaries.

    Size: ``element_size · batch · kv_heads · d · (2·num_tokens + parts·(num_tokens // block_size))`` bytes.
    ``block_size`` and ``summary`` are checked when the state is passed back.
    """

    block_size: int
    summary: str
    num_tokens: int
    key: torch.Tensor
    value: torch.Tensor
    summaries: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.key, self.value, self.summaries))


def block_attention(query, key, value, chunk_size: int, block_size: int, top_k: int, sink_size: int = 0,
                    summary: str = "minmax", selection: str = "group", dropout_p: float = 0.0,
                    state: BlocksState | None = None, return_state: bool = False):
    """Exact attention on the local region, the sinks and the top-k earlier blocks each token selects (module doc).

    Args:
        query: ``[batch, heads, n, d]``; key, value: ``[batch, kv_heads, n, d]`` (``kv_heads`` divides ``heads``,
            GQA: query head ``h`` uses key/value head ``h // (heads // kv_heads)``), positions already applied.
        chunk_size: tokens per chunk (>= 1): the local region is the own chunk up to the token plus the previous one.
        block_size: tokens per retrievable block (>= 1, divides ``chunk_size``).
        top_k: blocks retrieved per token (>= 1); more than the candidates means all of them.
        sink_size: first tokens every token attends (>= 0).
        summary: ``"minmax"`` (Quest's bound) or ``"mean"``.
        selection: ``"group"`` (one choice per key/value group, scores summed over its query heads) or ``"head"``.
        dropout_p: dropout on the attention probabilities.
        state: None, or a :class:`BlocksState` the ``n`` tokens continue (they are positions ``state.num_tokens
            ..``).
        return_state: also return the new :class:`BlocksState`.
    Returns:
        ``[batch, heads, n, d]``, or ``(output, new_state)`` with ``return_state``.
    Raises:
        ValueError: bad settings (:func:`check_block_settings`), shapes, or a state of another block size/summary.
    """
    check_block_settings(chunk_size, block_size, top_k, sink_size, summary, selection)
    return block_attention_unchecked(query, key, value, chunk_size, block_size, top_k, sink_size, summary,
                                     selection, dropout_p, state, return_state)


def _check_inputs(query, key, value, state, block_size, summary):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, n, head_dim]")
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"key and value must be [batch, kv_heads, n, d] matching query {list(query.shape)}, got "
                         f"{list(key.shape)} and {list(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"key has {key.shape[1]} heads, which must divide the {query.shape[1]} query heads")
    if state is not None and (not isinstance(state, BlocksState) or state.block_size != block_size
                              or state.summary != summary or state.key.shape[:2] != key.shape[:2]):
        raise ValueError("state must be a BlocksState of the same batch, kv_heads, block_size and summary")


def _per_row(left, right):
    """Row-wise products: ``left [b, G, g, r, x]`` times ``right [b, G, g or 1, r, x, y]`` -> ``[b, G, g, r, y]``; a
    group's shared selection (``g`` = 1 in ``right``) is multiplied without copying it per head."""
    if right.shape[2] == 1:
        return (left.transpose(2, 3) @ right.squeeze(2)).transpose(2, 3)  # [b, G, r, g, x] @ [b, G, r, x, y]
    return (left[..., None, :] @ right).squeeze(-2)


def block_attention_unchecked(query, key, value, chunk_size: int | None, block_size: int, top_k: int,
                              sink_size: int, summary: str, selection: str, dropout_p: float,
                              state: BlocksState | None, return_state: bool):
    """:func:`block_attention` without its settings checks (the caller has made them, e.g. a converted layer at
    construction), and with two settings it refuses: ``top_k = 0`` (local region + sinks only: the retrieval-off
    reference) and ``chunk_size = None`` (one chunk: full causal attention over the cache, a dense layer).
    Shapes, returns and input errors as :func:`block_attention`."""
    _check_inputs(query, key, value, state, block_size, summary)
    batch, heads, n, d = query.shape
    groups = key.shape[1]
    group = heads // groups
    offset = 0 if state is None else state.num_tokens
    if state is not None:
        key, value = torch.cat([state.key, key], dim=2), torch.cat([state.value, value], dim=2)  # [b, G, T, d]
    total = offset + n
    done = 0 if state is None else state.summaries.shape[2]
    summaries = block_summaries(key[:, :, done * block_size:], block_size, summary)  # the newly finished blocks
    if state is not None:
        summaries = torch.cat([state.summaries, summaries], dim=2)  # [b, G, T // B, parts, d]

    flat_key, flat_value = (t.contiguous().view(batch * groups * total, d) for t in (key, value))  # token rows
    token_base = torch.arange(batch * groups, device=query.device).view(batch, groups, 1, 1, 1) * total
    scale = 1.0 / math.sqrt(d)
    size = chunk_size or total
    q = query.unflatten(1, (groups, group))  # [b, G, g, n, d]
    outputs = []
    for chunk in range(offset // size, (total - 1) // size + 1):
        first, stop = max(offset, chunk * size), min(total, (chunk + 1) * size)  # query positions [first, stop)
        rows = q[:, :, :, first - offset: stop - offset]  # [b, G, g, r, d]
        local_start = 0 if chunk_size is None else max(0, (chunk - 1) * size)
        query_pos = torch.arange(first, stop, device=query.device)
        key_pos = torch.arange(local_start, stop, device=query.device)
        scores = [(rows @ key[:, :, None, local_start:stop].transpose(-1, -2)) * scale]  # [b, G, g, r, m]
        scores[0] = scores[0].masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
        values = [value[:, :, None, local_start:stop]]  # [b, G, 1, m, d]
        sinks = min(sink_size, local_start)
        if sinks:
            scores.append((rows @ key[:, :, None, :sinks].transpose(-1, -2)) * scale)  # [b, G, g, r, s]
            values.append(value[:, :, None, :sinks])
        candidates = local_start // block_size
        k = min(top_k, candidates)
        selected = None
        if k:
            chosen = block_scores(rows, summaries[:, :, :candidates], summary)  # [b, G, g, r, candidates]
            if selection == "group":
                chosen = chosen.sum(2, keepdim=True)  # [b, G, 1, r, candidates]: one choice per group
            index = chosen.topk(k, dim=-1).indices  # [b, G, g or 1, r, k]
            pos = (index[..., None] * block_size + torch.arange(block_size, device=query.device)).flatten(-2)
            flat = (pos + token_base).flatten()  # [b·G·g'·r·k·B] rows of flat_key: the selected blocks' tokens
            sel_k, sel_v = (t.index_select(0, flat).view(*pos.shape, d)
                            for t in (flat_key, flat_value))  # [b, G, g', r, k·B, d]
            selected = _per_row(rows, sel_k.transpose(-1, -2)) * scale  # [b, G, g, r, k·B]
            if sink_size:  # sink tokens inside a retrieved block are already attended as sinks
                selected = selected.masked_fill(pos < sinks, float("-inf"))
            scores.append(selected)
        weights = torch.softmax(torch.cat(scores, dim=-1), dim=-1)  # [b, G, g, r, m + s + k·B]
        if dropout_p:
            weights = F.dropout(weights, dropout_p)
        parts = weights.split([s.shape[-1] for s in scores], dim=-1)
        out = sum(w @ v for w, v in zip(parts[: len(values)], values))  # [b, G, g, r, d]
        if selected is not None:
            out = out + _per_row(parts[-1], sel_v)
        outputs.append(out)
    output = torch.cat(outputs, dim=3).flatten(1, 2)  # [b, H, n, d]
    if not return_state:
        return output
    return output, BlocksState(block_size, summary, total, key, value, summaries)
