"""BSBR attention: Block Sparse attention with Block Retrieval.

The sequence is split into chunks of ``chunk_size`` tokens (the last chunk may be partial).

* Local part: causal softmax attention inside each chunk, scale ``1/sqrt(head_dim)``.
* Retrieval part: chunk ``j`` is summarised by its state ``F_j = K_jᵀ V_j`` (``[head_dim, head_dim]`` per head)
  and a meta-key ``h_j``. Chunk ``i`` has a meta-query ``r_i`` computed only from tokens *before* chunk ``i``
  and retrieves ``R_i = Σ_{j<i} softmax_j(r_i·h_j / sqrt(head_dim)) F_j``; the first chunk retrieves zeros.
* Output of token ``t`` in chunk ``i``: ``local_t + q_t R_i``.

Streaming: ``R_i`` depends only on chunks before ``i``, so a :class:`BSBRState` (the current chunk's keys and
values, the finished chunks' states and meta-keys, and ``R`` of the current chunk) continues a sequence token by
token at a cost independent of the position. Padding (``attention_mask``) is handled by moving each row's real
tokens to the front, so chunks always start at the row's first real token.

**Block retrieval** (``retrieval="blocks"`` on :class:`BSBRAttention`): instead of chunk states, every token attends
in one exact softmax to its local region (own chunk up to itself plus the previous chunk), ``sink_size`` sink tokens
and the ``top_k`` earlier blocks of ``block_size`` tokens that its own query selects against per-block key summaries
(:func:`bsbr.blocks.block_attention`, no positions: ``positions="original"``, no RoPE). Its streaming state is a KV
cache of every token plus the block summaries (:class:`BSBRBlocksState`).

Nothing of size ``seq_len × seq_len`` is built: the local part costs O(seq_len·chunk_size·head_dim) time and
O(seq_len·chunk_size) memory per head, the chunk states O(num_chunks·head_dim²) memory and the chunk mixing
O(num_chunks²·head_dim²) time per head.

Source: BSBR ("Block Sparse attention with Block Retrieval"), this project's definition; the chunk-state
(Kᵀ·V) retrieval is the linear-attention state of Katharopoulos et al. 2020 (arXiv 2006.16236) selected by
chunk-level softmax routing as in block-retrieval attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_int_at_least, check_positive_int, check_state
from bsbr.blocks import SUMMARIES, BlocksState, block_attention, check_block_settings
from bsbr.layer import AttentionLayer, attend_packed, pack_padding, validate_attention_mask
from bsbr.utils import repeat_kv

__all__ = [
    "RETRIEVALS",
    "BSBRAttention",
    "BSBRBlocksState",
    "BSBRState",
    "StateCompression",
    "bsbr_attention",
    "chunk_mean",
    "attend_packed",  # re-exported from bsbr.layer, where the padding plumbing of every layer lives
    "pack_padding",
    "validate_attention_mask",
]


#: ``retrieval`` of :class:`BSBRAttention`: chunk-state retrieval (BSBR's own) or exact block retrieval
RETRIEVALS = ("state", "blocks")
#: the settings of ``retrieval="blocks"`` (None with ``retrieval="state"``)
BLOCK_SETTINGS = ("block_size", "top_k", "summary", "sink_size")


def chunk_mean(x: torch.Tensor, chunk_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over the tokens of each chunk.

    Args:
        x: ``[batch, seq_len, ...]``.
        chunk_size: tokens per chunk; the last chunk may be partial.
        mask: optional ``[batch, seq_len]`` bool, True = real token; padded tokens are left out of the mean
            (a chunk with no real token gives zeros).
    Returns:
        ``[batch, num_chunks, ...]`` with ``num_chunks = ceil(seq_len / chunk_size)``.
    """
    check_positive_int(chunk_size=chunk_size)
    batch, seq_len = x.shape[:2]
    rest = x.shape[2:]
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len
    weight = torch.ones(batch, seq_len, dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    # Zero rows appended internally only to reshape; they carry weight 0 and never reach the result.
    x = F.pad(x.reshape(batch, seq_len, -1), (0, 0, 0, pad))
    weight = F.pad(weight, (0, pad))
    x = x.view(batch, num_chunks, chunk_size, -1)  # [batch, chunks, chunk_size, features]
    weight = weight.view(batch, num_chunks, chunk_size, 1)
    total = (x * weight).sum(2)
    count = weight.sum(2).clamp_min(1.0)
    return (total / count).view(batch, num_chunks, *rest)


class StateCompression(nn.Module):
    """Learned linear compression of a chunk state ``F_j`` (``head_dim²`` values) to ``head_dim²/compression_factor``.

    ``encode``: ``[..., head_dim²] -> [..., head_dim²/c]``; ``decode``: back to ``[..., head_dim²]``.
    Initialised as an orthogonal projection (decoder = encoder transposed, zero biases), so ``decode(encode(F))``
    starts as the projection of ``F`` onto a random ``head_dim²/c``-dimensional subspace. Shared by all heads.

    Raises:
        ValueError: ``compression_factor`` not a positive integer dividing ``head_dim**2``.
    """

    def __init__(self, head_dim: int, compression_factor: int):
        super().__init__()
        state_dim = head_dim * head_dim
        check_positive_int(compression_factor=compression_factor)
        if state_dim % compression_factor:
            raise ValueError(
                f"compression_factor must divide head_dim**2 = {state_dim}, got {compression_factor}"
            )
        self.head_dim = head_dim
        self.compression_factor = compression_factor
        self.encoder = nn.Linear(state_dim, state_dim // compression_factor)
        self.decoder = nn.Linear(state_dim // compression_factor, state_dim)
        with torch.no_grad():
            nn.init.orthogonal_(self.encoder.weight)
            self.decoder.weight.copy_(self.encoder.weight.t())
            self.encoder.bias.zero_()
            self.decoder.bias.zero_()

    def encode(self, state: torch.Tensor) -> torch.Tensor:
        return self.encoder(state)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)


@dataclass
class BSBRState:
    """Streaming state of one :class:`BSBRAttention` (or :func:`bsbr_attention`) after ``num_tokens`` tokens.

    With ``p = num_tokens % chunk_size`` tokens in the current, unfinished chunk and ``c = num_tokens // chunk_size``
    finished chunks, it holds only what the next tokens need (``H`` heads, ``d = head_dim``, ``D`` hidden width,
    ``F = d²`` or ``d²/compression_factor`` state features):

    * ``partial_key, partial_value``: ``[batch, kv_heads, p, d]`` — the current chunk's keys and values (local part);
    * ``partial_sum``: ``[batch, D]`` — sum of the current chunk's hidden states (its meta-key/meta-query source);
    * ``states``: ``[batch, H, c, F]`` — the finished chunks' (compressed) states ``F_j = K_jᵀ V_j``;
    * ``meta_keys``: ``[batch, H, c, d]`` — their meta-keys ``h_j``;
    * ``retrieved``: ``[batch, H, d, d]`` — ``R`` of the current chunk (fixed once the chunk starts: it depends only
      on earlier chunks), so a decode step costs O(chunk_size·d + d²) per head whatever the position.

    Size in bytes (see :meth:`BSBRAttention.state_nbytes`): ``element_size · batch · (2·kv_heads·p·d + D + H·c·(F + d)
    + H·d²)`` — O(num_chunks·d² + chunk_size·d) per head, not a cache of every token.
    ``chunk_size``, ``batch_size`` and ``owner`` (``id`` of the producing module, 0 for the functional core) are
    checked when the state is passed back.
    """

    chunk_size: int
    batch_size: int
    owner: int
    num_tokens: int
    partial_key: torch.Tensor
    partial_value: torch.Tensor
    partial_sum: torch.Tensor | None
    states: torch.Tensor
    meta_keys: torch.Tensor
    retrieved: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        tensors = (self.partial_key, self.partial_value, self.partial_sum, self.states, self.meta_keys, self.retrieved)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class BSBRBlocksState:
    """Streaming state of a :class:`BSBRAttention` with ``retrieval="blocks"`` after ``num_tokens`` tokens: ``blocks``,
    the :class:`bsbr.blocks.BlocksState` of :func:`bsbr.blocks.block_attention` (every token's keys and values
    ``[batch, heads, num_tokens, d]`` and the finished blocks' summaries ``[batch, heads, num_tokens // block_size,
    parts, d]``; None before the first token). Size: ``element_size · batch · H · d · (2·num_tokens + parts ·
    (num_tokens // block_size))`` bytes (``parts`` = 2 for ``"minmax"``, 1 for ``"mean"``) — a KV cache, O(num_tokens).
    ``chunk_size``, ``batch_size`` and ``owner`` are checked when the state is passed back."""

    chunk_size: int
    batch_size: int
    owner: int
    num_tokens: int
    blocks: BlocksState | None

    def nbytes(self) -> int:
        """Bytes of the cached keys, values and summaries (the rows in use)."""
        return 0 if self.blocks is None else self.blocks.nbytes()


def bsbr_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    meta_query: torch.Tensor,
    meta_key: torch.Tensor,
    chunk_size: int,
    compression: StateCompression | None = None,
    dropout_p: float = 0.0,
    state: BSBRState | None = None,
    return_state: bool = False,
):
    """BSBR attention on per-head tensors (the fast chunked path), optionally continuing a streaming state.

    The ``L`` new tokens continue a sequence of ``n = state.num_tokens`` tokens (0 without a state). Let
    ``p = n % chunk_size``. The new tokens and the state's ``p`` partial-chunk tokens form ``m = ceil((p + L) /
    chunk_size)`` "call chunks"; call chunk ``i`` is global chunk ``n // chunk_size + i``.

    Args:
        query: ``[batch, heads, L, head_dim]`` (RoPE already applied if the model uses it).
        key, value: ``[batch, kv_heads, L, head_dim]``; ``kv_heads`` divides ``heads`` (GQA, HF ``repeat_kv`` order).
        meta_query: ``[batch, heads, rows, head_dim]``; row ``i`` is the meta-query computed from call chunk ``i``
            (mean hidden state of its tokens, partial-chunk tokens included): it is the query ``r`` of the *next*
            chunk. Only the ``(p + L) // chunk_size`` call chunks this call finishes are used, so ``rows`` is
            either that number or ``m`` (the rest ignored).
        meta_key: ``[batch, kv_heads or heads, rows, head_dim]``; row ``i`` is the meta-key ``h`` of call chunk
            ``i`` (``rows`` as for ``meta_query``).
        chunk_size: tokens per chunk (>= 1).
        compression: optional :class:`StateCompression` applied to every chunk state.
        dropout_p: dropout on the local attention weights (pass 0 in eval mode).
        state: a :class:`BSBRState` returned by an earlier call on the same sequence, or None (a fresh sequence).
        return_state: also return the state after these tokens.
    Returns:
        ``[batch, heads, L, head_dim]``: ``local + q · R_i`` (before the output projection); with
        ``return_state=True`` the tuple ``(output, BSBRState)`` (its ``partial_sum`` is None: hidden states are the
        caller's, see :class:`BSBRAttention`).
    Raises:
        ValueError: inconsistent shapes, ``chunk_size < 1`` or a state of another chunk_size or batch size.
    """
    check_positive_int(chunk_size=chunk_size)
    if query.dim() != 4:
        raise ValueError(f"query must be [batch, heads, seq_len, head_dim], got shape {list(query.shape)}")
    batch, heads, length, head_dim = query.shape
    if length < 1:
        raise ValueError("query must hold at least one token (seq_len >= 1)")
    if key.shape != value.shape or key.dim() != 4 or key.shape[0] != batch or key.shape[2:] != (length, head_dim):
        raise ValueError(f"key/value must be [batch, kv_heads, seq_len, head_dim]; got {list(key.shape)}, {list(value.shape)}")
    if state is not None:
        _check_state(state, chunk_size, batch, None, query)
    seen = 0 if state is None else state.num_tokens
    partial = seen % chunk_size  # tokens of the current chunk already in the state
    finished = seen // chunk_size  # chunks already in the state
    total = partial + length  # tokens of the call chunks
    num_chunks = -(-total // chunk_size)
    done = total // chunk_size  # call chunks finished by this call
    if meta_query.dim() != 4 or meta_query.shape[:2] != (batch, heads) or meta_query.shape[3] != head_dim \
            or meta_query.shape[2] not in (done, num_chunks):
        raise ValueError(f"meta_query must be [batch, heads, rows, head_dim] = {[batch, heads, num_chunks, head_dim]} "
                         f"(or {done} rows, the finished call chunks), got {list(meta_query.shape)}")
    if meta_key.dim() != 4 or meta_key.shape[0] != batch or meta_key.shape[3] != head_dim \
            or meta_key.shape[2] not in (done, num_chunks):
        raise ValueError(f"meta_key must be [batch, kv_heads, rows, head_dim] with {num_chunks} (or {done}) rows, "
                         f"got {list(meta_key.shape)}")

    if partial:  # the current chunk's earlier tokens lead the call's keys and values
        key, value = torch.cat([state.partial_key, key], dim=2), torch.cat([state.partial_value, value], dim=2)
    key_kv, value_kv = key, value  # [batch, kv_heads, total, head_dim]
    key, value = repeat_kv(key, heads, "key"), repeat_kv(value, heads, "value")
    meta_key = repeat_kv(meta_key, heads, "meta_key")

    # Chunk states of the finished call chunks, then the retrieval matrix R of every chunk this call needs.
    new_states = _chunk_states(key[:, :, : done * chunk_size], value[:, :, : done * chunk_size], done, compression)
    if state is None:
        all_states, all_keys = new_states, meta_key[:, :, :done]
        first = query.new_zeros(batch, heads, head_dim, head_dim)  # the first chunk retrieves nothing
    elif done == 0:  # no chunk finishes: the state's chunks stand (no copy, so a decode step stays O(1))
        all_states, all_keys, first = state.states, state.meta_keys, state.retrieved
    else:
        all_states = torch.cat([state.states, new_states], dim=2)  # [batch, heads, finished + done, F]
        all_keys = torch.cat([state.meta_keys, meta_key[:, :, :done]], dim=2)  # [batch, heads, finished + done, d]
        first = state.retrieved
    # R of call chunks 1..m-1, plus R of the next chunk when the call ends on a chunk boundary.
    later = _mixed_states(meta_query[:, :, :done], all_keys, all_states, finished, compression)  # [b, h, done, d, d]

    output = _local_plus_readout(query, key, value, first, later, partial, chunk_size, dropout_p)
    if not return_state:
        return output
    rest = total - done * chunk_size
    new_state = BSBRState(
        chunk_size=chunk_size, batch_size=batch, owner=0 if state is None else state.owner, num_tokens=seen + length,
        partial_key=key_kv[:, :, total - rest:].clone(), partial_value=value_kv[:, :, total - rest:].clone(),
        partial_sum=None, states=all_states, meta_keys=all_keys, retrieved=(later[:, :, -1] if done else first).clone(),
    )
    return output, new_state


def _chunk_states(key, value, num_chunks, compression):
    """``F_j = K_jᵀ V_j`` of ``num_chunks`` whole chunks: ``key/value`` ``[batch, heads, num_chunks·size, d]`` ->
    ``[batch, heads, num_chunks, F]`` (``F = d²``, or ``d²/c`` after ``compression.encode``)."""
    batch, heads, _, head_dim = key.shape
    if num_chunks == 0:
        features = head_dim * head_dim if compression is None else compression.encoder.out_features
        return key.new_zeros(batch, heads, 0, features)
    keys, values = (t.unflatten(2, (num_chunks, -1)) for t in (key, value))  # [batch, heads, chunks, size, d]
    # Per (row, head) the blocks are [chunks, size, d] views with a single batch stride, which bmm reads in place
    # (one batched call over [batch, heads, chunks] would first copy keys and values).
    if torch.is_grad_enabled():  # unbind, not indexing: its backward stacks once instead of zero-filling per head
        states = torch.stack([torch.stack([torch.bmm(k.transpose(1, 2), v) for k, v in zip(row_k.unbind(0),
                                                                                         row_v.unbind(0))])
                              for row_k, row_v in zip(keys.unbind(0), values.unbind(0))])
    else:  # written in place: no stacking copy
        states = key.new_empty(batch, heads, num_chunks, head_dim, head_dim)
        for row in range(batch):
            for index in range(heads):
                torch.bmm(keys[row, index].transpose(1, 2), values[row, index], out=states[row, index])
    states = states.flatten(-2)  # [batch, heads, chunks, d²]
    return states if compression is None else compression.encode(states)


def _mixed_states(meta_query, meta_keys, states, finished, compression):
    """Retrieval matrices of the chunks after call chunks ``0..k-1``.

    ``meta_query``: ``[batch, heads, k, d]`` (row ``i`` from call chunk ``i``, so it queries for call chunk ``i+1``);
    ``meta_keys/states``: ``[batch, heads, finished + k, d / F]`` for every finished chunk. Call chunk ``i+1`` may
    retrieve global chunks ``j < finished + i + 1``: ``R = Σ_j softmax_j(r·h_j/sqrt(d)) F_j``.
    Returns ``[batch, heads, k, d, d]``.
    """
    batch, heads, rows, head_dim = meta_query.shape
    if rows == 0:
        return meta_query.new_zeros(batch, heads, 0, head_dim, head_dim)
    scores = meta_query @ meta_keys.transpose(-1, -2) / math.sqrt(head_dim)  # [batch, heads, k, finished + k]
    visible = torch.arange(meta_keys.shape[2], device=scores.device)[None, :] <= (
        finished + torch.arange(rows, device=scores.device)[:, None])
    weights = torch.softmax(scores.masked_fill(~visible, torch.finfo(scores.dtype).min), dim=-1)
    mixed = weights @ states  # [batch, heads, k, F]
    if compression is not None:
        # Σ_j w_ij decode(z_j) = decode(Σ_j w_ij z_j), as every row of weights sums to 1.
        mixed = compression.decode(mixed)
    return mixed.unflatten(-1, (head_dim, head_dim))


#: Chunks per fused local-attention call: bounds the temporaries to ~GROUP·heads·chunk_size·head_dim values.
_GROUP = 32


def _local_plus_readout(query, key, value, first, later, partial, chunk_size, dropout_p):
    """``softmax_local(q, k) v + q · R`` for every new token.

    ``query``: ``[batch, heads, L, d]``; ``key/value``: ``[batch, heads, partial + L, d]`` (the state's partial
    chunk first); ``first``: ``[batch, heads, d, d]``, ``R`` of call chunk 0; ``later``: ``[batch, heads, k, d, d]``,
    ``R`` of call chunks ``1..k``. Returns the ``[batch, heads, L, d]`` view of a token-major ``[batch, L, heads, d]``
    tensor (the layout ``out_proj`` reads).

    Without autograd the blocks are written into one preallocated output; with autograd the pieces come from
    ``split`` and are joined with ``cat``, so the backward pass never zero-fills sequence-long gradients per block.
    """
    batch, heads, length, head_dim = query.shape
    grad = torch.is_grad_enabled()
    head = min(length, chunk_size - partial) if partial else 0
    pieces = []  # per block: (first token, [batch or 1, tokens, heads, d] token-major values) or written in place
    output = None if grad else query.new_empty(batch, length, heads, head_dim)
    if head:  # new tokens that finish the state's partial chunk: query t sees keys 0..partial + t
        q = query[:, :, :head]
        k, v = key[:, :, : partial + head], value[:, :, : partial + head]
        mask = None
        if head > 1:
            mask = (torch.arange(partial + head, device=q.device)[None, :]
                    <= partial + torch.arange(head, device=q.device)[:, None])  # [head, partial + head]
        out = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p) + q @ first)
        if grad:
            pieces.append(out.transpose(1, 2))  # [batch, head, heads, d]
        else:
            output[:, :head].copy_(out.transpose(1, 2))
    # Whole chunks in groups of up to _GROUP (call chunk 0 alone: its R is `first`), then a partial last chunk.
    full = (length - head) // chunk_size
    rest = length - head - full * chunk_size
    spans, index, remaining = [], (1 if head else 0), full  # (call chunk, chunks, chunk length)
    while remaining:
        chunks = 1 if index == 0 else min(_GROUP, remaining)
        spans.append((index, chunks, chunk_size))
        index, remaining = index + chunks, remaining - chunks
    if rest:
        spans.append((index, 1, rest))
    sizes = [chunks * size for _, chunks, size in spans]
    if not sizes:
        return (torch.cat(pieces, dim=1) if grad else output).transpose(1, 2)
    # R per span: call chunk 0 uses `first`, the others consecutive slices of `later`.
    later_sizes = [chunks for index, chunks, _ in spans if index > 0]
    if later.shape[2] > sum(later_sizes):  # R of the next chunk (a call ending on a boundary): not read here
        later_sizes.append(later.shape[2] - sum(later_sizes))
    rows = []
    # One fused call per sequence and block group keeps the blocks as views (no copies); rows, blocks and R come
    # from unbind/split, whose backward joins the gradients once.
    for row, (q_row, k_row, v_row, first_row, later_row) in enumerate(zip(
            query.unbind(0), key.unbind(0), value.unbind(0), first.unbind(0), later.unbind(0))):
        blocks = zip(spans, *(t[:, skip:].split(sizes, dim=1) for t, skip in
                              ((q_row, head), (k_row, partial + head), (v_row, partial + head))))
        later_blocks = iter(later_row.split(later_sizes, dim=1) if later_sizes else ())
        row_pieces, start = [], head
        for (index, chunks, size), q, k, v in blocks:
            q, k, v = (t.unflatten(1, (chunks, size)).transpose(0, 1) for t in (q, k, v))  # [chunks, heads, size, d]
            local = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            retrieved = first_row[:, None] if index == 0 else next(later_blocks)  # [heads, chunks, d, d]
            if grad:
                out = local + q @ retrieved.transpose(0, 1)  # q_t · R_i
                row_pieces.append(out.transpose(1, 2).reshape(chunks * size, heads, head_dim))
            else:
                for h in range(heads):  # [chunks, size, d] per head: bmm reads q in place
                    local[:, h] += torch.bmm(q[:, h], retrieved[h])
                output[row, start : start + chunks * size].view(chunks, size, heads, head_dim).copy_(local.transpose(1, 2))
            start += chunks * size
        if grad:
            rows.append(torch.cat(row_pieces) if len(row_pieces) > 1 else row_pieces[0])
    if not grad:
        return output.transpose(1, 2)
    body = torch.stack(rows) if batch > 1 else rows[0][None]  # [batch, L - head, heads, d]
    return (torch.cat([pieces[0], body], dim=1) if head else body).transpose(1, 2)


def _check_state(state, chunk_size: int, batch_size: int, owner: int | None, like: torch.Tensor) -> None:
    """Raise ValueError unless ``state`` is a :class:`BSBRState` this call can continue (dtype/device of ``like``)."""
    check_state(state, BSBRState, batch_size, owner, like)
    if state.chunk_size != chunk_size:
        raise ValueError(f"chunk_size changed between calls: the state was built with chunk_size={state.chunk_size}, "
                         f"this call uses chunk_size={chunk_size}; start a fresh sequence (state=None)")


class BSBRAttention(AttentionLayer):
    """Multi-head BSBR attention layer (see the module docstring for the semantics).

    Args:
        hidden_dim: model width; must be divisible by ``num_heads`` (``head_dim = hidden_dim // num_heads``).
        num_heads: attention heads.
        chunk_size: tokens per chunk (>= 1). With ``chunk_size >= seq_len`` the layer equals standard causal
            multi-head softmax attention with the same ``q_proj/k_proj/v_proj/out_proj``.
        dropout: dropout probability on the local attention weights, in [0, 1).
        compression_factor: None, or a positive integer dividing ``head_dim**2``; chunk states are then stored as
            ``head_dim**2 / compression_factor`` values (:class:`StateCompression`). ``retrieval="state"`` only.
        retrieval: ``"state"`` (default: the chunk-state retrieval of the module docstring) or ``"blocks"``: exact
            softmax attention over the local region (own chunk up to the token and the whole previous chunk), the
            first ``sink_size`` tokens and the ``top_k`` earlier blocks each token selects with its own query
            (:func:`bsbr.blocks.block_attention`; no positions, as every model here is NoPE). With ``chunk_size >=
            seq_len``, or ``top_k`` covering every earlier block, it is standard causal attention. The selection
            (a top-k) passes no gradient: the router is the query and key projections themselves, trained through
            the attention on what was selected (as in Quest and MoBA).
        block_size: tokens per retrievable block, dividing ``chunk_size`` (``"blocks"``: required).
        top_k: blocks each token retrieves, >= 1; more than the earlier blocks means all of them (``"blocks"``:
            required).
        summary: a block's key summary the query scores, ``"minmax"`` (Quest's bound) or ``"mean"``
            (``"blocks"``: default ``"minmax"``).
        sink_size: first tokens every token attends, >= 0 (``"blocks"``: default 0).
            The four block settings are for ``retrieval="blocks"`` only: with ``"state"`` they must be None.

    Parameters: ``q_proj, k_proj, v_proj, out_proj`` (``nn.Linear(hidden_dim, hidden_dim)``), and, with
    ``retrieval="state"``, the meta-projections ``meta_q_proj, meta_k_proj``: the meta-key of chunk ``j`` is
    ``meta_k_proj`` of the mean hidden state of chunk ``j``; the meta-query of chunk ``i`` is ``meta_q_proj`` of the
    mean hidden state of chunk ``i-1`` (tokens before chunk ``i`` only), split into heads. With ``retrieval="blocks"``
    the layer has no meta-projections and no compression (the attributes are absent / None): each token routes with
    its own query, so a blocks layer has exactly the parameters of standard attention.

    Streaming state: :class:`BSBRState` (``"state"``) or :class:`BSBRBlocksState` (``"blocks"``, a KV cache).

    Raises:
        ValueError: on any invalid argument above, naming it (see :meth:`forward` for its own: those of
            :meth:`bsbr.layer.AttentionLayer.forward`, and ``chunk_size`` changed since the state was made).
    Sources: BSBR (module docstring); block retrieval: Quest (arXiv 2406.10774), InfLLM (arXiv 2402.04617), MoBA
    (arXiv 2502.13189).
    """

    state_type = BSBRState
    span_settings = ("chunk_size",)

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, dropout: float = 0.0,
                 compression_factor: int | None = None, retrieval: str = "state", block_size: int | None = None,
                 top_k: int | None = None, summary: str | None = None, sink_size: int | None = None):
        super().__init__(hidden_dim, num_heads, dropout)
        check_positive_int(chunk_size=chunk_size)
        if not isinstance(retrieval, str) or retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {list(RETRIEVALS)}, got {retrieval!r}")
        self.chunk_size, self.retrieval = chunk_size, retrieval
        settings = dict(block_size=block_size, top_k=top_k, summary=summary, sink_size=sink_size)
        if retrieval == "state":
            given = [name for name, value in settings.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: settings of retrieval='blocks'; with retrieval='state' they "
                                 "must be None")
            self._add_projections("q_proj", "k_proj", "v_proj", "out_proj", "meta_q_proj", "meta_k_proj")
            self.compression = (None if compression_factor is None
                                else StateCompression(self.head_dim, compression_factor))
            return
        if compression_factor is not None:
            raise ValueError(f"compression_factor must be None with retrieval='blocks' (it keeps exact keys and "
                             f"values), got {compression_factor!r}")
        for name in ("block_size", "top_k"):
            if settings[name] is None:
                raise ValueError(f"{name} is required with retrieval='blocks' (an integer >= 1)")
        settings["summary"] = "minmax" if summary is None else summary
        settings["sink_size"] = 0 if sink_size is None else sink_size
        check_block_settings(chunk_size, **settings)
        self.block_size, self.top_k, self.summary, self.sink_size = (settings[name] for name in BLOCK_SETTINGS)
        self.state_type = BSBRBlocksState
        self._add_projections("q_proj", "k_proj", "v_proj", "out_proj")
        self.compression = None

    def state_nbytes(self, num_tokens: int, batch_size: int = 1) -> int:
        """Bytes of the :class:`BSBRState` after ``num_tokens`` tokens (parameters' dtype):
        ``element_size · batch · (2·H·p·d + D + H·c·(F + d) + H·d²)`` with ``p = num_tokens % chunk_size``,
        ``c = num_tokens // chunk_size``, ``H`` heads, ``d`` head_dim, ``D`` hidden_dim, ``F = d²`` (or
        ``d²/compression_factor``); with ``retrieval="blocks"`` (:class:`BSBRBlocksState`) ``element_size · batch · H ·
        d · (2·num_tokens + parts·(num_tokens // block_size))``. Raises ValueError for negative ``num_tokens`` or
        ``batch_size < 1``."""
        check_int_at_least(0, num_tokens=num_tokens)
        check_positive_int(batch_size=batch_size)
        heads, d = self.num_heads, self.head_dim
        if self.retrieval == "blocks":  # BSBRBlocksState: every key and value, and the finished blocks' summaries
            values = heads * d * (2 * num_tokens + SUMMARIES[self.summary] * (num_tokens // self.block_size))
            return self.q_proj.weight.element_size() * batch_size * values
        features = d * d if self.compression is None else self.compression.encoder.out_features
        partial, finished = num_tokens % self.chunk_size, num_tokens // self.chunk_size
        values = 2 * heads * partial * d + self.hidden_dim + heads * finished * (features + d) + heads * d * d
        return self.q_proj.weight.element_size() * batch_size * values

    def _check_state(self, state, batch_size: int, like: torch.Tensor) -> None:
        if self.retrieval == "state":
            _check_state(state, self.chunk_size, batch_size, id(self), like)  # the functional core's check and message
            return
        check_state(state, BSBRBlocksState, batch_size, id(self), like)
        if state.chunk_size != self.chunk_size:
            raise ValueError(f"chunk_size changed between calls: the state was built with chunk_size="
                             f"{state.chunk_size}, this module uses chunk_size={self.chunk_size}; start a fresh "
                             "sequence (state=None)")
        if state.blocks is not None and (state.blocks.key.dtype != like.dtype or state.blocks.key.device != like.device):
            raise ValueError(f"state holds {state.blocks.key.dtype} on {state.blocks.key.device} but the input is "
                             f"{like.dtype} on {like.device}; start a fresh sequence (state=None) after .to()")

    def _empty_state(self, batch: int, like: torch.Tensor):
        if self.retrieval == "blocks":
            return BSBRBlocksState(self.chunk_size, batch, id(self), 0, None)
        heads, d = self.num_heads, self.head_dim
        features = d * d if self.compression is None else self.compression.encoder.out_features
        empty = like.new_zeros(batch, heads, 0, d)
        return BSBRState(self.chunk_size, batch, id(self), 0, empty, empty.clone(), like.new_zeros(batch, self.hidden_dim),
                         like.new_zeros(batch, heads, 0, features), like.new_zeros(batch, heads, 0, d),
                         like.new_zeros(batch, heads, d, d))

    def _attend(self, hidden_states: torch.Tensor, state: BSBRState | None, return_state: bool):
        """Unpadded core: ``[batch, L, hidden_dim]`` (continuing ``state``) -> output (and the new state)."""
        if self.retrieval == "blocks":
            return self._attend_blocks(hidden_states, state, return_state)
        batch, length, _ = hidden_states.shape
        size = self.chunk_size
        seen = 0 if state is None else state.num_tokens
        partial = seen % size
        q = self.split_heads(self.q_proj(hidden_states))  # [batch, heads, L, head_dim]
        k = self.split_heads(self.k_proj(hidden_states))
        v = self.split_heads(self.v_proj(hidden_states))
        # Hidden-state sum of every call chunk (the state's partial chunk continues with the first new tokens).
        head = min(length, size - partial) if partial else 0
        full = (length - head) // size
        rest = length - head - full * size
        sums = []
        if head:
            sums.append(hidden_states[:, :head].sum(1, keepdim=True) + state.partial_sum[:, None])
        if full:
            sums.append(hidden_states[:, head : head + full * size].unflatten(1, (full, size)).sum(2))
        if rest:
            sums.append(hidden_states[:, head + full * size :].sum(1, keepdim=True))
        sums = torch.cat(sums, dim=1) if len(sums) > 1 else sums[0]  # [batch, call chunks, hidden_dim]
        total = partial + length
        pooled = sums[:, : total // size] / size  # mean hidden state of every call chunk this call finishes
        meta_key = self.split_heads(self.meta_k_proj(pooled))  # [batch, heads, finished call chunks, head_dim]
        meta_query = self.split_heads(self.meta_q_proj(pooled))  # row i queries for the chunk after call chunk i
        result = bsbr_attention(q, k, v, meta_query, meta_key, size, self.compression,
                                self.dropout if self.training else 0.0, state=state, return_state=return_state)
        out = result[0] if return_state else result
        out = self.out_proj(self.merge_heads(out))  # [batch, L, hidden_dim]
        if not return_state:
            return out
        new_state = result[1]
        new_state.owner = id(self)
        new_state.partial_sum = sums[:, -1] if total % size else torch.zeros_like(sums[:, -1])
        return out, new_state

    def _attend_blocks(self, hidden_states: torch.Tensor, state: BSBRBlocksState | None, return_state: bool):
        """``retrieval="blocks"``: :func:`bsbr.blocks.block_attention` on the projected heads (one key/value head per
        query head, so each head selects its own blocks), continuing ``state.blocks``."""
        q = self.split_heads(self.q_proj(hidden_states))  # [batch, heads, L, head_dim]
        k = self.split_heads(self.k_proj(hidden_states))
        v = self.split_heads(self.v_proj(hidden_states))
        result = block_attention(q, k, v, self.chunk_size, self.block_size, self.top_k, self.sink_size, self.summary,
                                 "group", self.dropout if self.training else 0.0,
                                 state=None if state is None else state.blocks, return_state=return_state)
        out = self.out_proj(self.merge_heads(result[0] if return_state else result))  # [batch, L, hidden_dim]
        if not return_state:
            return out
        blocks = result[1]
        return out, BSBRBlocksState(self.chunk_size, hidden_states.shape[0], id(self), blocks.num_tokens, blocks)
