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

Router: by default each token scores the blocks with its own query (above). With ``chunk_scores`` (the layer's
``router="meta"``) a chunk-level router scores them instead, one choice per query chunk, and the blocks are the chunks
(``block_size == chunk_size``): BSBR's own routing, the meta-query of chunk ``c`` (from the mean hidden state of chunk
``c - 1``) against the meta-key of each earlier chunk (from its own mean hidden state). The op does not see hidden
states: the caller computes the scores (:class:`bsbr.convert.retrieval.BlocksMode`), and the routing is causal when
they come from tokens before the chunk.

Selection granularity (``selection=``): ``"group"`` (default) makes one choice per token and key/value group — the
scores of the query heads sharing a key/value head are **summed**, so the group shares one set of blocks (and one
gathered copy of their keys/values), as grouped-query attention shares keys; ``"head"`` lets every query head choose
its own blocks. Selection is **per token**: no two tokens share a choice.

Causality, including the routing: a candidate block lies entirely before ``t``'s local region and its summary uses
only its own keys, so nothing at or after ``t + 1`` changes ``t``'s output or which blocks ``t`` retrieves.
With ``chunk_size >= n`` (one chunk), or ``top_k`` covering every candidate, this is full causal attention.

Memory: the op walks the query chunks; for a chunk it holds ``[chunk, 2·chunk]`` local scores and either the
``top_k·block_size`` gathered keys/values per token (per group, or per head with ``selection="head"``) or, when the
chunk's rows agree enough, one gathered union of the blocks they selected, scored by all of them and masked per row
(:data:`UNION_GATHER_RATIO` bounds its size): O(n·(2·chunk_size + sink_size + UNION_GATHER_RATIO·top_k·block_size))
in all, never an ``[n, n]`` tensor.

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

__all__ = ["POSITIONS", "ROUTERS", "SELECTIONS", "SUMMARIES", "BlocksState", "GrowingTensor", "block_attention",
           "best_page_scores", "block_attention_unchecked", "block_scores", "block_summaries", "check_block_settings",
           "rope_rotate"]

#: block summaries, name -> number of ``[d]`` vectors stored per block
SUMMARIES: dict[str, int] = {"minmax": 2, "mean": 1}
#: selection granularities: one choice per key/value group (scores summed over its query heads) or per query head
SELECTIONS = ("group", "head")
#: who scores the candidate blocks: each token's own query against the block summaries, or BSBR's meta-query/meta-key
#: router, one choice per chunk whose scores the caller passes (``chunk_scores``; blocks are chunks; module doc)
ROUTERS = ("query", "meta")
#: where retrieved blocks and sinks sit relative to the query: their own positions, or compact ones (module doc)
POSITIONS = ("original", "compact")
#: each slice of :data:`UNION_ROWS` rows of a query chunk gathers the union of the blocks its rows selected once (and
#: masks, per row, the union's blocks the row did not select) when the largest union ``U`` of the chunk has
#: ``U · heads_per_group <= UNION_GATHER_RATIO · top_k · choosers_per_group``; otherwise each row gathers its own
#: ``top_k`` blocks. Both give the same output. A union is one matmul over up to ``UNION_GATHER_RATIO · top_k ·
#: block_size / heads_per_group`` keys per row instead of a per-row gather of ``top_k · block_size`` (memory-bound);
#: on CPUs the matmul is the faster of the two while the bound holds, and the bound keeps the work per row constant
#: in n (the op stays linear in n; the softmax still covers only the row's own selection).
UNION_GATHER_RATIO = 32
#: rows per slice of a query chunk that share one gathered union (fewer rows: smaller unions, more matmuls; one slice
#: per chunk of up to 256 rows by default)
UNION_ROWS = 256


def check_block_settings(chunk_size, block_size, top_k, sink_size=0, summary="minmax", selection="group",
                         positions="original", rope_inv_freq=None, page_size=None, router="query") -> None:
    """Raise ValueError naming the argument unless: ``chunk_size``, ``block_size`` and ``top_k`` are integers >= 1,
    ``block_size`` divides ``chunk_size``, ``sink_size`` is an integer >= 0, ``summary`` is a key of
    :data:`SUMMARIES`, ``selection`` one of :data:`SELECTIONS`, ``positions`` one of :data:`POSITIONS`, and
    ``rope_inv_freq`` a 1-D tensor exactly when ``positions="compact"``, ``page_size`` None or an integer >= 1
    dividing ``block_size``, and ``router`` one of :data:`ROUTERS` (``"meta"``: ``block_size == chunk_size`` and no
    ``page_size``)."""
    check_positive_int(chunk_size=chunk_size, block_size=block_size, top_k=top_k)
    check_int_at_least(0, sink_size=sink_size)
    if chunk_size % block_size:
        raise ValueError(f"block_size={block_size} must divide chunk_size={chunk_size} (blocks may not straddle "
                         "chunks)")
    if not isinstance(router, str) or router not in ROUTERS:
        raise ValueError(f"router must be one of {list(ROUTERS)}, got {router!r}")
    if router == "meta" and (block_size != chunk_size or page_size is not None):
        raise ValueError(f"router='meta' selects whole chunks: block_size must equal chunk_size={chunk_size} (got "
                         f"{block_size}) and page_size must be None (got {page_size!r})")
    if page_size is not None:
        check_positive_int(page_size=page_size)
        if block_size % page_size:
            raise ValueError(f"page_size={page_size} must divide block_size={block_size} (a block is whole pages)")
    if not isinstance(summary, str) or summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {list(SUMMARIES)}, got {summary!r}")
    if not isinstance(selection, str) or selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")
    if not isinstance(positions, str) or positions not in POSITIONS:
        raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    if positions == "compact" and (not isinstance(rope_inv_freq, torch.Tensor) or rope_inv_freq.dim() != 1):
        raise ValueError("rope_inv_freq must be the RoPE inverse frequencies, a 1-D tensor [head_dim / 2], with "
                         f"positions='compact'; got {type(rope_inv_freq).__name__}")
    if positions == "original" and rope_inv_freq is not None:
        raise ValueError("rope_inv_freq is only used with positions='compact'; pass None with positions='original'")


def block_summaries(key: torch.Tensor, block_size: int, summary: str = "minmax", sink_size: int = 0,
                    start: int = 0) -> torch.Tensor:
    """Summaries of the complete blocks of ``key [batch, kv_heads, n, d]`` (token ``i`` at position ``start + i``;
    ``start`` a multiple of ``block_size``): ``[batch, kv_heads, n // block_size, parts, d]`` (``parts`` = 2 for
    ``"minmax"``: min then max per channel; 1 for ``"mean"``). A trailing partial block is left out (it is never a
    candidate). Sink tokens (positions ``< sink_size``, attended by every token anyway) are left out of their block's
    summary, so their large keys do not make the first block look relevant to every query; a block of sink tokens
    only gets a zero summary (:func:`block_attention` never selects it)."""
    batch, groups, n, d = key.shape
    nb = n // block_size
    blocks = key[:, :, : nb * block_size].unflatten(2, (nb, block_size))  # [b, G, nb, B, d]
    sinks = max(0, min(sink_size - start, nb * block_size))  # sink tokens among these keys (the first ones)
    if sinks:
        keep = (torch.arange(nb * block_size, device=key.device) >= sinks).view(nb, block_size, 1)
        any_kept = keep.any(1)  # [nb, 1]
    if summary == "minmax":
        if not sinks:
            return torch.stack([blocks.amin(3), blocks.amax(3)], dim=3)  # [b, G, nb, 2, d]
        low = blocks.masked_fill(~keep, float("inf")).amin(3)
        high = blocks.masked_fill(~keep, float("-inf")).amax(3)
        return torch.stack([low, high], dim=3).masked_fill(~any_kept[:, None], 0.0)
    if not sinks:
        return blocks.mean(3, keepdim=True)  # [b, G, nb, 1, d]
    total = (blocks * keep).sum(3, keepdim=True)
    return total / keep.sum(1).clamp(min=1).view(nb, 1, 1)


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


class GrowingTensor:
    """A tensor extended along dim 2 in a preallocated buffer whose capacity grows by :attr:`GROWTH` when full, so
    appending ``n`` rows costs O(n) amortised (no copy of what is already there), as a KV cache must for O(1) decode
    steps.

    Several :class:`BlocksState` objects may view one buffer (each its first ``length`` rows). Appending to a view
    that is not the buffer's newest (a state continued twice, e.g. one row's state shared by two beams) copies it into
    a new buffer first, so no view ever sees another's rows: states behave as if never changed in place.
    """

    #: capacity factor when a buffer is full: 1.5 (not 2) keeps the spare room, and the peak while copying, smaller
    GROWTH = 1.5

    def __init__(self, data: torch.Tensor, length: int):
        self.data, self.length = data, length

    @classmethod
    def capacity(cls, rows: int) -> int:
        """Rows allocated for a buffer that must hold ``rows``: ``max(16, ceil(GROWTH · rows))``."""
        return max(16, math.ceil(cls.GROWTH * rows))

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "GrowingTensor":
        """A buffer holding ``tensor`` (copied into :meth:`capacity` rows)."""
        grown = cls(tensor.new_empty(*tensor.shape[:2], cls.capacity(tensor.shape[2]), *tensor.shape[3:]), 0)
        return grown.extended(0, tensor)

    def view(self, length: int) -> torch.Tensor:
        """The first ``length`` rows (a view, no copy)."""
        return self.data[:, :, :length]

    def extended(self, length: int, new: torch.Tensor) -> "GrowingTensor":
        """The buffer holding the first ``length`` rows followed by ``new`` (this one, written in place, when
        ``length`` is its newest length and there is room; otherwise a new one of :meth:`capacity` rows)."""
        n = new.shape[2]
        grown = self
        if length != self.length or length + n > self.data.shape[2]:
            data = new.new_empty(*new.shape[:2], self.capacity(length + n), *new.shape[3:])
            data[:, :, :length] = self.data[:, :, :length]
            grown = GrowingTensor(data, length)
        grown.data[:, :, length: length + n] = new
        grown.length = length + n
        return grown

    def capacity_nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def best_page_scores(scores: torch.Tensor, pages_per_block: int, sink_pages: int = 0) -> torch.Tensor:
    """Block scores from page scores ``[..., pages]`` (consecutive ``pages_per_block`` pages form a block): each
    block scores its best page, the first ``sink_pages`` pages (sink tokens only) not counting. Returns
    ``[..., pages // pages_per_block]``."""
    if sink_pages > 0:
        scores = scores.masked_fill(torch.arange(scores.shape[-1], device=scores.device) < sink_pages, float("-inf"))
    return scores.unflatten(-1, (-1, pages_per_block)).amax(-1)


@dataclass
class BlocksState:
    """Streaming state of :func:`block_attention` after ``num_tokens`` tokens (a KV cache plus block summaries),
    kept in :class:`GrowingTensor` buffers so that appending a token costs O(1) amortised.

    * ``key, value``: ``[batch, kv_heads, num_tokens, d]`` — every token's keys and values (positions applied);
    * ``summaries``: ``[batch, kv_heads, num_tokens // page_size, parts, d]`` — the finished pages' summaries;
    * ``retrieved_key``: with ``positions="compact"``, ``[batch, kv_heads, num_tokens, d]`` — each key moved to the
      position it has when retrieved (its block starting at ``sink_size``); None otherwise.

    Size (:meth:`nbytes`, the rows in use): ``element_size · batch · kv_heads · d · (2·num_tokens (3· with compact
    positions) + parts·(num_tokens // page_size))`` bytes; the buffers hold up to 1.5 times that
    (:meth:`capacity_nbytes`). ``block_size``, ``page_size``, ``summary`` and ``positions`` are checked when the state
    is passed back.
    """

    block_size: int
    summary: str
    num_tokens: int
    buffers: dict
    positions: str = "original"
    page_size: int | None = None  # None: one page per block

    @property
    def key(self) -> torch.Tensor:
        return self.buffers["key"].view(self.num_tokens)

    @property
    def value(self) -> torch.Tensor:
        return self.buffers["value"].view(self.num_tokens)

    @property
    def summaries(self) -> torch.Tensor:
        return self.buffers["summaries"].view(self.num_tokens // (self.page_size or self.block_size))

    @property
    def retrieved_key(self) -> torch.Tensor | None:
        buffer = self.buffers.get("retrieved_key")
        return None if buffer is None else buffer.view(self.num_tokens)

    def nbytes(self) -> int:
        """Bytes of the rows in use (keys, values, summaries, compact-position keys)."""
        views = [self.key, self.value, self.summaries] + ([self.retrieved_key] if "retrieved_key" in self.buffers
                                                          else [])
        return sum(t.numel() * t.element_size() for t in views)

    def capacity_nbytes(self) -> int:
        """Bytes allocated by the buffers (at most about 1.5 times :meth:`nbytes`)."""
        return sum(buffer.capacity_nbytes() for buffer in self.buffers.values())


def rope_rotate(x: torch.Tensor, shift, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [..., n, d]`` (RoPE'd vectors) moved by ``shift`` positions (a number or a tensor broadcasting to
    ``x.shape[:-1]``), with RoPE's rotate-half layout (Su et al. 2021, arXiv 2104.09864; transformers'
    ``apply_rotary_pos_emb``): channel pairs ``(i, i + d/2)`` turn by ``shift · inv_freq[i]``. RoPE is relative, so
    rotating a RoPE'd query by ``δ`` is the same as having computed it at its position + ``δ``. Angles in float64."""
    shift = torch.as_tensor(shift, dtype=torch.float64, device=x.device)
    angle = shift[..., None] * inv_freq.to(device=x.device, dtype=torch.float64)  # [..., d/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def block_attention(query, key, value, chunk_size: int, block_size: int, top_k: int, sink_size: int = 0,
                    summary: str = "minmax", selection: str = "group", dropout_p: float = 0.0,
                    state: BlocksState | None = None, return_state: bool = False, *, positions: str = "original",
                    rope_inv_freq: torch.Tensor | None = None, page_size: int | None = None,
                    chunk_scores: torch.Tensor | None = None):
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
        positions: ``"original"`` (every key where it is) or ``"compact"`` (sinks and retrieved blocks moved close
            to the query, so no distance exceeds ``sink_size + block_size + 2·chunk_size``; module doc).
        rope_inv_freq: ``[d / 2]`` RoPE inverse frequencies of ``query`` and ``key`` (needed by ``"compact"``).
        page_size: tokens per summarised page (divides ``block_size``; None: the block is one page). A block's score
            is the best score of its pages (Quest scores 16-token pages), so one relevant token in a large block is
            not averaged away.
        chunk_scores: None (each token scores the blocks with its own query), or the scores of a chunk-level router
            (``router="meta"``: BSBR's meta-query of chunk ``c - 1`` against the meta-key of each chunk),
            ``[batch, heads, q_chunks, chunks]``: row ``i`` scores, for every query of the ``i``-th chunk this call
            touches (chunk ``state.num_tokens // chunk_size + i``), chunk ``j`` in column ``j``; only the columns of
            the candidates (``j <= c - 2``) are read, so ``chunks >= c_last - 1``. Every token of a chunk then
            retrieves the same ``top_k`` chunks (per group, scores summed over its heads, or per head). Needs
            ``block_size == chunk_size`` and no ``page_size``. Causal when row ``i`` depends only on tokens before
            its chunk and column ``j`` only on chunk ``j``.
    Returns:
        ``[batch, heads, n, d]``, or ``(output, new_state)`` with ``return_state``.
    Raises:
        ValueError: bad settings (:func:`check_block_settings`), shapes (``chunk_scores`` included), or a state of
            another block size, summary or positions.
    """
    check_block_settings(chunk_size, block_size, top_k, sink_size, summary, selection, positions, rope_inv_freq,
                         page_size, "query" if chunk_scores is None else "meta")
    return block_attention_unchecked(query, key, value, chunk_size, block_size, top_k, sink_size, summary,
                                     selection, dropout_p, state, return_state, positions=positions,
                                     rope_inv_freq=rope_inv_freq, page_size=page_size, chunk_scores=chunk_scores)


def _check_inputs(query, key, value, state, block_size, summary, positions, page_size):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, n, head_dim]")
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"key and value must be [batch, kv_heads, n, d] matching query {list(query.shape)}, got "
                         f"{list(key.shape)} and {list(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"key has {key.shape[1]} heads, which must divide the {query.shape[1]} query heads")
    if state is not None and (not isinstance(state, BlocksState) or state.block_size != block_size
                              or state.summary != summary or state.positions != positions
                              or state.page_size != page_size
                              or state.key.shape[:2] != key.shape[:2]):
        raise ValueError("state must be a BlocksState of the same batch, kv_heads, block_size, page_size, summary and "
                         "positions")


def _check_chunk_scores(chunk_scores, query, chunk_size, n_before: int) -> None:
    """Raise ValueError unless ``chunk_scores`` is ``[batch, heads, q_chunks, >= c_last - 1]`` for the chunks the
    call's queries fall in (:func:`block_attention`)."""
    batch, heads, n = query.shape[:3]
    if chunk_size is None:
        raise ValueError("chunk_scores needs chunks: chunk_size must not be None")
    first, last = n_before // chunk_size, (n_before + n - 1) // chunk_size
    if (not isinstance(chunk_scores, torch.Tensor) or chunk_scores.dim() != 4
            or chunk_scores.shape[:3] != (batch, heads, last - first + 1) or chunk_scores.shape[3] < last - 1):
        shape = list(chunk_scores.shape) if isinstance(chunk_scores, torch.Tensor) else type(chunk_scores).__name__
        raise ValueError(f"chunk_scores must be [batch, heads, q_chunks, chunks] = [{batch}, {heads}, "
                         f"{last - first + 1}, >= {max(0, last - 1)}] for query chunks {first}..{last}, got {shape}")


def _slice_unions(index, candidates: int, size: int):
    """The union of the blocks the rows of each slice of ``size`` rows selected.

    Args:
        index: ``[b, G, g', r, k]`` selected block ids in ``[0, candidates)``; size: rows per slice (the last slice is
            padded with copies of the last row).
    Returns:
        ``(blocks [S, U], member [b, G, g', S, size, U])``: slice ``j``'s union in ``blocks[j, :count_j]`` (the rest
        are blocks no row of the slice selected, never members), and whether a row selected each; ``S = ceil(r /
        size)``, ``U`` the largest union.
    """
    rows = index.shape[3]
    slices = -(-rows // size)
    padded = torch.cat([index, index[:, :, :, -1:].expand(*index.shape[:3], slices * size - rows, -1)], dim=3)
    padded = padded.unflatten(3, (slices, size))  # [b, G, g', S, s, k]
    used = torch.zeros(slices, candidates, dtype=torch.bool, device=index.device)
    used.scatter_(1, padded.movedim(3, 0).reshape(slices, -1), True)
    width = int(used.sum(1).max())
    blocks = torch.sort(used.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]  # [S, U]
    slot = torch.zeros(slices, candidates, dtype=torch.long, device=index.device)
    slot.scatter_(1, blocks, torch.arange(width, device=index.device).expand(slices, width))
    which = torch.arange(slices, device=index.device).view(slices, *(1,) * (padded.dim() - 1))
    where = slot[which, padded.movedim(3, 0)]  # [S, b, G, g', s, k]: each choice's place in its slice's union
    member = torch.zeros(*padded.shape[:-1], width, dtype=torch.bool, device=index.device)
    member.scatter_(-1, where.movedim(0, 3), True)
    return blocks, member


def _sliced_values(weights, values, size: int):
    """``weights [b, G, g, r, x]`` times one gathered value set per slice of ``size`` rows ``values [b, G, 1, S, x,
    d]`` (the rows padded to ``S·size``) -> ``[b, G, g, r, d]``."""
    rows, slices = weights.shape[3], values.shape[3]
    padded = F.pad(weights, (0, 0, 0, slices * size - rows)).unflatten(3, (slices, size))  # [b, G, g, S, s, x]
    return (padded @ values).flatten(3, 4)[:, :, :, :rows]


def _per_row(left, right):
    """Row-wise products: ``left [b, G, g, r, x]`` times ``right [b, G, g or 1, r, x, y]`` -> ``[b, G, g, r, y]``; a
    group's shared selection (``g`` = 1 in ``right``) is multiplied without copying it per head."""
    if right.shape[2] == 1:
        return (left.transpose(2, 3) @ right.squeeze(2)).transpose(2, 3)  # [b, G, r, g, x] @ [b, G, r, x, y]
    return (left[..., None, :] @ right).squeeze(-2)


def block_attention_unchecked(query, key, value, chunk_size: int | None, block_size: int, top_k: int,
                              sink_size: int, summary: str, selection: str, dropout_p: float,
                              state: BlocksState | None, return_state: bool, *, positions: str = "original",
                              rope_inv_freq: torch.Tensor | None = None, page_size: int | None = None,
                              chunk_scores: torch.Tensor | None = None):
    """:func:`block_attention` without its settings checks (the caller has made them, e.g. a converted layer at
    construction), and with two settings it refuses: ``top_k = 0`` (local region + sinks only: the retrieval-off
    reference) and ``chunk_size = None`` (one chunk: full causal attention over the cache, a dense layer).
    Shapes, returns and input errors as :func:`block_attention`."""
    _check_inputs(query, key, value, state, block_size, summary, positions, page_size)
    if chunk_scores is not None:
        _check_chunk_scores(chunk_scores, query, chunk_size, 0 if state is None else state.num_tokens)
    page = page_size or block_size
    pages_per_block = block_size // page
    batch, heads, n, d = query.shape
    groups = key.shape[1]
    group = heads // groups
    offset = 0 if state is None else state.num_tokens
    total = offset + n
    compact = positions == "compact"
    new = {"key": key, "value": value}
    if compact:  # each key as retrieved: its block moved to start at position sink_size
        pos = torch.arange(offset, total, device=key.device)
        new["retrieved_key"] = rope_rotate(key, sink_size - pos // block_size * block_size, rope_inv_freq)
    done = offset // page  # pages summarised so far
    if state is None:
        buffers = {name: GrowingTensor.of(t) if return_state else GrowingTensor(t.contiguous(), n) for name, t in new.items()}
    else:
        buffers = {name: state.buffers[name].extended(offset, t) for name, t in new.items()}
    key, value = buffers["key"].view(total), buffers["value"].view(total)  # [b, G, T, d]
    retrieved_key = buffers["retrieved_key"].view(total) if compact else key
    fresh = block_summaries(retrieved_key[:, :, done * page:], page, summary, sink_size,
                            done * page)  # the newly finished pages
    if state is None:
        buffers["summaries"] = GrowingTensor.of(fresh) if return_state else GrowingTensor(fresh, fresh.shape[2])
    else:
        buffers["summaries"] = state.buffers["summaries"].extended(done, fresh)
    summaries = buffers["summaries"].view(total // page)  # [b, G, T // page, parts, d]

    source = buffers["retrieved_key"] if compact else buffers["key"]
    capacity = source.data.shape[2]  # token rows of the (contiguous) buffers, gathered without copying them
    flat_key = source.data.view(batch * groups * capacity, d)
    flat_value = buffers["value"].data.view(batch * groups * capacity, d)
    token_base = torch.arange(batch * groups, device=query.device).view(batch, groups, 1, 1, 1) * capacity
    scale = 1.0 / math.sqrt(d)
    size = chunk_size or total
    q = query.unflatten(1, (groups, group))  # [b, G, g, n, d]
    outputs = []
    for chunk in range(offset // size, (total - 1) // size + 1):
        first, stop = max(offset, chunk * size), min(total, (chunk + 1) * size)  # query positions [first, stop)
        rows = q[:, :, :, first - offset: stop - offset]  # [b, G, g, r, d]
        local_start = 0 if chunk_size is None else max(0, (chunk - 1) * size)
        # the query as the sinks and retrieved blocks see it: with compact positions, at sink_size + block_size +
        # (its offset in the local region), so sinks and blocks lie at most sink_size + block_size + 2·chunk back
        far_rows = rope_rotate(rows, sink_size + block_size - local_start, rope_inv_freq) if compact else rows
        query_pos = torch.arange(first, stop, device=query.device)
        key_pos = torch.arange(local_start, stop, device=query.device)
        scores = [(rows @ key[:, :, None, local_start:stop].transpose(-1, -2)) * scale]  # [b, G, g, r, m]
        scores[0] = scores[0].masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
        values = [value[:, :, None, local_start:stop]]  # [b, G, 1, m, d]
        sinks = min(sink_size, local_start)
        if sinks:
            scores.append((far_rows @ key[:, :, None, :sinks].transpose(-1, -2)) * scale)  # [b, G, g, r, s]
            values.append(value[:, :, None, :sinks])
        candidates = local_start // block_size
        sink_blocks = min(sink_size // block_size, candidates)  # blocks of sink tokens only are never candidates
        k = min(top_k, candidates - sink_blocks)
        selected = None
        if k:
            if chunk_scores is not None:  # one choice per chunk: the chunk's row of scores for each of its tokens
                chosen = chunk_scores[:, :, chunk - offset // size, sink_blocks:candidates].unflatten(1, (groups, group))
                chosen = chosen[:, :, :, None].expand(-1, -1, -1, rows.shape[3], -1)  # [b, G, g, r, candidates]
            else:
                chosen = block_scores(far_rows, summaries[:, :, sink_blocks * pages_per_block:
                                                          candidates * pages_per_block], summary)  # [b, G, g, r, pages]
            if pages_per_block > 1:  # a block scores its best page; pages of sink tokens only do not count
                chosen = best_page_scores(chosen, pages_per_block,
                                          sink_size // page - sink_blocks * pages_per_block)  # [b, G, g, r, blocks]
            if selection == "group":
                chosen = chosen.sum(2, keepdim=True)  # [b, G, 1, r, candidates]: one choice per group
            index = chosen.topk(k, dim=-1).indices + sink_blocks  # [b, G, g or 1, r, k]
            union = _slice_unions(index, candidates, min(UNION_ROWS, rows.shape[3]))
            if union[0].shape[1] * group <= UNION_GATHER_RATIO * k * index.shape[2]:
                # per slice of rows, one gather of the union of their blocks and one matmul; each row masks the
                # union's blocks it did not select
                sliced, (blocks, member) = True, union  # [S, U] block ids, [b, G, g', S, s, U]
                pos = (blocks[..., None] * block_size + torch.arange(block_size, device=query.device)).flatten(-2)
                keep = member.repeat_interleave(block_size, dim=-1)  # [b, G, g', S, s, U·B]
                if sink_size:  # sink tokens inside a retrieved block are already attended as sinks
                    keep = keep & (pos >= sinks)[:, None]
                sel_k, sel_v = retrieved_key[:, :, None, pos], value[:, :, None, pos]  # [b, G, 1, S, U·B, d]
                slices, per_slice = member.shape[3:5]
                padded = F.pad(far_rows, (0, 0, 0, slices * per_slice - far_rows.shape[3])).unflatten(
                    3, (slices, per_slice))
                selected = (padded @ sel_k.transpose(-1, -2)) * scale  # [b, G, g, S, s, U·B]
                selected = selected.masked_fill(~keep, float("-inf")).flatten(3, 4)[:, :, :, : rows.shape[3]]
            else:  # rows disagree too much: gather each row's own k blocks
                sliced = False
                pos = (index[..., None] * block_size + torch.arange(block_size, device=query.device)).flatten(-2)
                flat = (pos + token_base).flatten()  # [b·G·g'·r·k·B] rows of flat_key: the selected blocks' tokens
                sel_k, sel_v = (t.index_select(0, flat).view(*pos.shape, d)
                                for t in (flat_key, flat_value))  # [b, G, g', r, k·B, d]
                selected = _per_row(far_rows, sel_k.transpose(-1, -2)) * scale  # [b, G, g, r, k·B]
                if sink_size:  # sink tokens inside a retrieved block are already attended as sinks
                    selected = selected.masked_fill(pos < sinks, float("-inf"))
            scores.append(selected)
        weights = torch.softmax(torch.cat(scores, dim=-1), dim=-1)  # [b, G, g, r, m + s + k·B]
        if dropout_p:
            weights = F.dropout(weights, dropout_p)
        parts = weights.split([s.shape[-1] for s in scores], dim=-1)
        out = sum(w @ v for w, v in zip(parts[: len(values)], values))  # [b, G, g, r, d]
        if selected is not None:
            out = out + (_sliced_values(parts[-1], sel_v, per_slice) if sliced else _per_row(parts[-1], sel_v))
        outputs.append(out)
    output = torch.cat(outputs, dim=3).flatten(1, 2)  # [b, H, n, d]
    if not return_state:
        return output
    return output, BlocksState(block_size, summary, total, buffers, positions, page_size)
