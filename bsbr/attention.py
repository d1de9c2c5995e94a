"""BSBR attention: Block Sparse attention with Block Retrieval.

The sequence is split into chunks of ``chunk_size`` tokens (the last chunk may be partial).

* Local part: causal softmax attention inside each chunk, scale ``1/sqrt(head_dim)``.
* Retrieval part: chunk ``j`` is summarised by its state ``F_j = K_jᵀ V_j`` (``[head_dim, head_dim]`` per head)
  and a meta-key ``h_j``. Chunk ``i`` has a meta-query ``r_i`` computed only from tokens *before* chunk ``i``
  and retrieves ``R_i = Σ_{j<i} softmax_j(r_i·h_j / sqrt(head_dim)) F_j``; the first chunk retrieves zeros.
* Output of token ``t`` in chunk ``i``: ``local_t + q_t R_i``.

Nothing of size ``seq_len × seq_len`` is built: the local part costs O(seq_len·chunk_size·head_dim) time and
O(seq_len·chunk_size) memory per head, the chunk states O(num_chunks·head_dim²) memory and the chunk mixing
O(num_chunks²·head_dim²) time per head.

Source: BSBR ("Block Sparse attention with Block Retrieval"), this project's definition; the chunk-state
(Kᵀ·V) retrieval is the linear-attention state of Katharopoulos et al. 2020 (arXiv 2006.16236) selected by
chunk-level softmax routing as in block-retrieval attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_dropout, check_heads, check_hidden_states, check_positive_int

__all__ = [
    "BSBRAttention",
    "StateCompression",
    "bsbr_attention",
    "chunk_mean",
    "previous_chunk",
    "validate_attention_mask",
]


def validate_attention_mask(attention_mask, batch_size: int, seq_len: int) -> torch.Tensor | None:
    """Check a padding mask and return it as a bool tensor (True = real token), or None.

    Args:
        attention_mask: ``[batch, seq_len]`` bool or integer tensor, 1/True = real token, 0/False = padding.
    Raises:
        ValueError: wrong shape, dtype (floating point) or values other than 0 and 1.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != (batch_size, seq_len):
        raise ValueError(
            f"attention_mask must have shape [batch, seq_len] = {[batch_size, seq_len]}, "
            f"got {list(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"attention_mask must be a bool or integer tensor of 0/1, got dtype {attention_mask.dtype}")
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token)")
    return attention_mask.bool()


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


def previous_chunk(x: torch.Tensor) -> torch.Tensor:
    """Shift per-chunk values by one chunk: row ``i`` of the result is row ``i-1`` of ``x``; row 0 is zeros.

    Args:
        x: ``[batch, num_chunks, ...]``.
    Returns:
        ``[batch, num_chunks, ...]``.
    """
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


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


def _repeat_heads(x: torch.Tensor, num_heads: int, name: str) -> torch.Tensor:
    """Expand ``[batch, kv_heads, ...]`` to ``[batch, num_heads, ...]`` (HF ``repeat_kv`` order: head ``i``
    uses kv head ``i // (num_heads // kv_heads)``)."""
    kv_heads = x.shape[1]
    if kv_heads == num_heads:
        return x
    if num_heads % kv_heads:
        raise ValueError(f"{name} has {kv_heads} heads, which must divide the {num_heads} query heads")
    return x.repeat_interleave(num_heads // kv_heads, dim=1)


def _causal_softmax(query, key, value, key_padding_mask, dropout_p):
    """Causal softmax attention inside each chunk of one sequence.

    ``query/key/value``: ``[chunks, heads, size, head_dim]`` (any strides with a contiguous last axis: views of the
    token-major projections, so torch's fused CPU kernel reads them without a copy); ``key_padding_mask``:
    ``[chunks, size]`` bool or None. Returns ``[chunks, heads, size, head_dim]``.
    """
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True)
    size = query.shape[2]
    eye = torch.eye(size, dtype=torch.bool, device=query.device)
    causal = torch.ones(size, size, dtype=torch.bool, device=query.device).tril()
    # Padded queries attend to themselves only (their output is zeroed later), so no softmax row is empty.
    mask = causal & (key_padding_mask[:, None, None, :] | eye)  # [chunks, 1, size, size]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)


def bsbr_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    meta_query: torch.Tensor,
    meta_key: torch.Tensor,
    chunk_size: int,
    compression: StateCompression | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """BSBR attention on per-head tensors (the fast chunked path).

    Args:
        query: ``[batch, heads, seq_len, head_dim]`` (RoPE already applied if the model uses it).
        key, value: ``[batch, kv_heads, seq_len, head_dim]``; ``kv_heads`` divides ``heads`` (GQA, HF order).
        meta_query: ``[batch, heads, num_chunks, head_dim]``; row ``i`` is ``r_i``, which the caller must compute
            only from tokens before chunk ``i`` (row 0 is ignored).
        meta_key: ``[batch, kv_heads or heads, num_chunks, head_dim]``; row ``j`` is ``h_j``.
        chunk_size: tokens per chunk (>= 1); ``num_chunks = ceil(seq_len / chunk_size)``.
        compression: optional :class:`StateCompression` applied to every chunk state.
        key_padding_mask: optional ``[batch, seq_len]`` bool, True = real token. Padded tokens are excluded from
            attention and from chunk states; outputs at padded positions are zeros.
        dropout_p: dropout on the local attention weights (pass 0 in eval mode).
    Returns:
        ``[batch, heads, seq_len, head_dim]``: ``local + q · R_i`` (before the output projection).
    Raises:
        ValueError: inconsistent shapes or ``chunk_size < 1``.
    """
    check_positive_int(chunk_size=chunk_size)
    if query.dim() != 4:
        raise ValueError(f"query must be [batch, heads, seq_len, head_dim], got shape {list(query.shape)}")
    batch, heads, seq_len, head_dim = query.shape
    num_chunks = -(-seq_len // chunk_size)
    if key.shape != value.shape or key.dim() != 4 or key.shape[0] != batch or key.shape[2:] != (seq_len, head_dim):
        raise ValueError(f"key/value must be [batch, kv_heads, seq_len, head_dim]; got {list(key.shape)}, {list(value.shape)}")
    if meta_query.shape != (batch, heads, num_chunks, head_dim):
        raise ValueError(
            f"meta_query must be [batch, heads, num_chunks, head_dim] = {[batch, heads, num_chunks, head_dim]}, "
            f"got {list(meta_query.shape)}"
        )
    if meta_key.dim() != 4 or meta_key.shape[0] != batch or meta_key.shape[2:] != (num_chunks, head_dim):
        raise ValueError(f"meta_key must be [batch, kv_heads, num_chunks, head_dim], got {list(meta_key.shape)}")
    key, value = _repeat_heads(key, heads, "key"), _repeat_heads(value, heads, "value")
    meta_key = _repeat_heads(meta_key, heads, "meta_key")
    if key_padding_mask is not None:
        key = key * key_padding_mask[:, None, :, None].to(key.dtype)  # padded keys add nothing to F_j

    full = seq_len // chunk_size  # complete chunks; a partial last chunk of `rest` tokens follows
    rest = seq_len - full * chunk_size
    retrieved = _retrieved_states(key, value, chunk_size, meta_query, meta_key, compression)  # [b, h, chunks, d, d]
    # Token-major result, [batch, seq_len, heads, head_dim]: the layout the output projection reads.
    output = query.new_empty(batch, seq_len, heads, head_dim)
    for start, chunks, size in ((0, full, chunk_size), (full * chunk_size, 1, rest)):
        if chunks == 0 or size == 0:
            continue
        stop, first = start + chunks * size, start // chunk_size
        for row in range(batch):  # one fused call per sequence keeps the blocks as views (no copies)
            q, k, v = (t[row, :, start:stop].unflatten(1, (chunks, size)).transpose(0, 1)
                       for t in (query, key, value))  # [chunks, heads, size, head_dim]
            mask = None if key_padding_mask is None else key_padding_mask[row, start:stop].view(chunks, size)
            local = _causal_softmax(q, k, v, mask, dropout_p)
            readout = q @ retrieved[row, :, first : first + chunks].transpose(0, 1)  # q_t · R_i
            out = local + readout if torch.is_grad_enabled() else local.add_(readout)
            output[row, start:stop] = out.transpose(1, 2).reshape(stop - start, heads, head_dim)
    return _zero_padded(output.transpose(1, 2), key_padding_mask)


def _retrieved_states(key, value, chunk_size, meta_query, meta_key, compression):
    """``R_i = Σ_{j<i} softmax_j(r_i·h_j/sqrt(d)) F_j`` for every chunk ``i`` (``R_0 = 0``).

    ``key/value``: ``[batch, heads, seq_len, d]``; ``meta_query/meta_key``: ``[batch, heads, num_chunks, d]``.
    Returns ``[batch, heads, num_chunks, d, d]``.
    """
    batch, heads, num_chunks, head_dim = meta_query.shape
    retrievable = num_chunks - 1
    retrieved = meta_query.new_zeros(batch, heads, num_chunks, head_dim * head_dim)
    if retrievable == 0:
        return retrieved.view(batch, heads, num_chunks, head_dim, head_dim)
    # Only chunks 0..num_chunks-2 are ever retrieved: [batch, heads, retrievable, chunk_size, d]
    keys, values = (t[:, :, : retrievable * chunk_size].unflatten(2, (retrievable, chunk_size)) for t in (key, value))
    states = (keys.transpose(-1, -2) @ values).flatten(-2)  # F_j: [batch, heads, retrievable, d²]
    if compression is not None:
        states = compression.encode(states)  # [batch, heads, retrievable, d²/c]
    # Row i-1 of the scores belongs to chunk i and may see chunks j <= i-1.
    scores = meta_query[:, :, 1:] @ meta_key[:, :, :retrievable].transpose(-1, -2) / math.sqrt(head_dim)
    allowed = torch.ones(retrievable, retrievable, dtype=torch.bool, device=scores.device).tril()
    weights = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
    mixed = weights @ states  # [batch, heads, retrievable, state features]
    if compression is not None:
        # Σ_j w_ij decode(z_j) = decode(Σ_j w_ij z_j), as every row of weights sums to 1.
        mixed = compression.decode(mixed)
    retrieved = torch.cat([retrieved[:, :, :1], mixed], dim=2)  # R_0 = 0 for the first chunk
    return retrieved.view(batch, heads, num_chunks, head_dim, head_dim)


def _zero_padded(output: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    if key_padding_mask is None:
        return output
    return output * key_padding_mask[:, None, :, None].to(output.dtype)


class BSBRAttention(nn.Module):
    """Multi-head BSBR attention layer (see the module docstring for the semantics).

    Args:
        hidden_dim: model width; must be divisible by ``num_heads`` (``head_dim = hidden_dim // num_heads``).
        num_heads: attention heads.
        chunk_size: tokens per chunk (>= 1). With ``chunk_size >= seq_len`` the layer equals standard causal
            multi-head softmax attention with the same ``q_proj/k_proj/v_proj/out_proj``.
        dropout: dropout probability on the local attention weights, in [0, 1).
        compression_factor: None, or a positive integer dividing ``head_dim**2``; chunk states are then stored as
            ``head_dim**2 / compression_factor`` values (:class:`StateCompression`).

    Parameters: ``q_proj, k_proj, v_proj, out_proj`` (``nn.Linear(hidden_dim, hidden_dim)``), and the
    meta-projections ``meta_q_proj, meta_k_proj``: the meta-key of chunk ``j`` is ``meta_k_proj`` of the mean
    hidden state of chunk ``j``; the meta-query of chunk ``i`` is ``meta_q_proj`` of the mean hidden state of
    chunk ``i-1`` (tokens before chunk ``i`` only), split into heads.

    Raises:
        ValueError: on any invalid argument above, and in ``forward`` for input that is not
            ``[batch, seq_len, hidden_dim]`` with ``seq_len >= 1`` or a malformed ``attention_mask``.
        TypeError: in ``forward``, ``hidden_states`` that is not a tensor of the parameters' dtype.
    """

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, dropout: float = 0.0,
                 compression_factor: int | None = None):
        super().__init__()
        check_heads(hidden_dim, num_heads)
        check_positive_int(chunk_size=chunk_size)
        check_dropout(dropout)
        self.hidden_dim, self.num_heads, self.chunk_size = hidden_dim, num_heads, chunk_size
        self.head_dim = hidden_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        self.meta_q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.meta_k_proj = nn.Linear(hidden_dim, hidden_dim)
        self.compression = None if compression_factor is None else StateCompression(self.head_dim, compression_factor)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [batch, heads, length, head_dim]

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states``: ``[batch, seq_len, hidden_dim]``; ``attention_mask``: optional ``[batch, seq_len]``
        (1 = real token, 0 = padding). Returns ``[batch, seq_len, hidden_dim]``."""
        batch, seq_len = check_hidden_states(hidden_states, self.hidden_dim, self.q_proj.weight.dtype)
        mask = validate_attention_mask(attention_mask, batch, seq_len)
        q = self._split_heads(self.q_proj(hidden_states))
        k = self._split_heads(self.k_proj(hidden_states))
        v = self._split_heads(self.v_proj(hidden_states))
        pooled = chunk_mean(hidden_states, self.chunk_size, mask)  # [batch, chunks, hidden_dim]
        meta_key = self._split_heads(self.meta_k_proj(pooled))  # [batch, heads, chunks, head_dim]
        meta_query = self._split_heads(self.meta_q_proj(previous_chunk(pooled)))
        out = bsbr_attention(q, k, v, meta_query, meta_key, self.chunk_size, self.compression, mask,
                             self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.hidden_dim)  # [batch, seq_len, hidden_dim]
        return self.out_proj(out)
