"""Normalised block retrieval: BSBR whose retrieved part shares the local softmax's normaliser.

The seed BSBR output ``local_t + q_t · Σ_j w_ij K_jᵀV_j`` adds an unnormalised linear-attention term to a convex
combination of values, which a pretrained softmax model cannot absorb. Here, as in hybrid softmax/linear attention
(LoLCATs, Zhang et al. 2024, arXiv 2410.10254), the retrieved chunks enter the *same* normaliser as the local
softmax, through positive Hedgehog features (Zhang et al. 2024, arXiv 2402.04347). For token ``t`` of chunk ``i``
(``C = chunk_size``, ``d = head_dim``, ``f = feature_dim``):

* local: scores ``a_tu = q_t·k_u / sqrt(d)`` for ``u`` in chunk ``i``, ``u <= t``; ``l_t = logsumexp_u a_tu``,
  ``o_t = Σ_u softmax(a)_tu v_u``;
* features: ``φ(x) = [softmax(x̂ W), softmax(-x̂ W)]`` (``2f`` values, all > 0) with ``x̂ = x · d^(-1/4)`` (the
  softmax temperature split between query and key as in ``q·k/sqrt(d)``), ``W`` ``[d, f]`` per query head,
  initialised to the identity (``f = d``);
* chunk states of the finished chunks ``F_j = Σ_{u∈j} φ(k_u) v_uᵀ`` ``[2f, d]`` and ``z_j = Σ_{u∈j} φ(k_u)``;
* chunk routing ``w_ij = softmax_{j<i}(r_{i-1}·h_j / sqrt(d))`` with the BSBR meta-queries/meta-keys (row ``j`` of
  both from chunk ``j``; chunk ``i`` uses meta-query row ``i-1``);
* ``N_t = φ(q_t)ᵀ Σ_j w_ij F_j``, ``Z_t = φ(q_t)·Σ_j w_ij z_j``;
* output ``(e^l o_t + g N_t) / (e^l + g Z_t)`` with ``g = exp(mix_logit)`` per head, computed stably as
  ``s = sigmoid(mix_logit + log Z_t - l_t)``, ``output = (1 - s) o_t + s N_t / Z_t``.

Option ``sink_size = k``: the first ``k`` tokens of the sequence are attention sinks (Xiao et al. 2023, arXiv
2309.17453); every token after chunk 0 attends to them exactly, inside the local softmax (their scores join
``l_t`` and ``o_t``), and they are left out of ``F_0, z_0``. Pretrained models park much of their attention mass on
the first token; without it, own-chunk attention in later chunks is far off in several layers.

Chunk 0 retrieves nothing (output = its causal softmax attention), so with one chunk the op is exactly causal
softmax attention. Nothing of size ``seq_len²`` is built: the local part uses ``[chunks, C, C]`` score blocks.
State compression (``compression_factor = c``) is a smaller learned feature map: ``f = d / c`` features per half, so
the ``[2f, d]`` chunk states shrink by ``c`` against ``f = d``. Incremental decoding keeps a
:class:`NormalizedState` per row (:func:`normalized_step`): the current chunk's keys/values, the sink tokens and the
finished chunks' ``F_j, z_j, h_j``.

Nothing here knows a model family: the converter's retrieval mode ``"normalized"``
(:class:`bsbr.convert.retrieval.NormalizedMode`) runs it on the queries, keys and values of any converted layer
(Llama with RoPE and GQA, GPT-2 with learned positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bsbr._checks import check_int_at_least, check_positive_int
from bsbr.local_attention import local_softmax_attention
from bsbr.utils import check_sink_size, repeat_kv

__all__ = [
    "HedgehogFeatureMap",
    "NormalizedRetrieval",
    "NormalizedState",
    "chunk_local_softmax",
    "normalized_bsbr_attention",
    "normalized_step",
    "split_chunks",
]


class HedgehogFeatureMap(nn.Module):
    """Hedgehog feature map per head: ``φ(x) = concat(softmax(x̂ W_h), softmax(-x̂ W_h))``, ``x̂ = x · scale``.

    Args:
        num_heads: heads (one ``W_h`` each); head_dim: ``d``; feature_dim: ``f`` (default ``d``).
        scale: input scale, default ``d^(-1/4)`` (so that ``x̂_q·x̂_k = q·k/sqrt(d)``).
    Parameter ``weight`` ``[num_heads, d, f]``, initialised to the identity (its first ``min(d, f)`` columns).
    ``forward(x [batch, num_heads, ..., d]) -> [batch, num_heads, ..., 2f]``, every value in (0, 1).

    Source: Zhang et al. 2024, "The Hedgehog & the Porcupine", arXiv 2402.04347.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None, scale: float | None = None):
        super().__init__()
        feature_dim = head_dim if feature_dim is None else feature_dim
        check_positive_int(num_heads=num_heads, head_dim=head_dim, feature_dim=feature_dim)
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.scale = head_dim**-0.25 if scale is None else float(scale)
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(num_heads, 1, 1))  # [heads, d, f]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(f"expected [batch, {self.num_heads}, ..., {self.head_dim}], got {list(x.shape)}")
        weight = self.weight.view(self.num_heads, *([1] * (x.dim() - 4)), self.head_dim, self.feature_dim)
        projected = (x * self.scale) @ weight.to(x.dtype)  # [batch, heads, ..., f]
        return torch.cat([torch.softmax(projected, dim=-1), torch.softmax(-projected, dim=-1)], dim=-1)



def split_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[batch, heads, n, ...]`` -> ``[batch, heads, chunks, chunk_size, ...]`` with ``chunks = ceil(n / chunk_size)``;
    zero rows are appended to the last chunk (callers mask or drop them)."""
    n = x.shape[2]
    chunks = -(-n // chunk_size)
    pad = chunks * chunk_size - n
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
    return x.unflatten(2, (chunks, chunk_size))


def chunk_local_softmax(query, key, value, chunk_size: int, sink_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention inside each chunk (plus ``sink_size`` sink tokens), with its log-normaliser.

    Args:
        query: ``[batch, heads, n, d]``; key, value: ``[batch, kv_heads, n, d]`` (``kv_heads`` divides ``heads``).
        chunk_size: tokens per chunk (>= 1); the last chunk may be partial.
        sink_size: tokens ``0..sink_size-1`` of the sequence are attended exactly (softmax, same normaliser) by every
            token after chunk 0 too (attention sinks, Xiao et al. 2023, arXiv 2309.17453); ``0 <= sink_size <=
            chunk_size``.
    Returns:
        ``(output [batch, heads, n, d], lse [batch, heads, n])``: ``lse_t = logsumexp_u q_t·k_u/sqrt(d)`` over the
        keys ``u`` token ``t`` sees (its chunk up to ``t``, and the sink tokens).
    Runs on torch's fused CPU attention kernel, differentiable in both outputs
    (:func:`bsbr.local_attention.local_softmax_attention`); where that kernel cannot run (not CPU, a dtype other
    than float32/float64) it writes the softmax out in ``[batch, heads, chunks, C, C]`` score blocks, O(n·C) per head
    (:func:`bsbr.local_attention.local_softmax_attention_naive`).
    Raises:
        ValueError: bad ``chunk_size`` or ``sink_size``.
    """
    return local_softmax_attention(query, key, value, chunk_size, sink_size)


def _feature_maps(feature_map):
    if isinstance(feature_map, (tuple, list)):
        if len(feature_map) != 2 or not all(callable(f) for f in feature_map):
            raise TypeError("feature_map must be a callable or a pair (query_map, key_map) of callables")
        return feature_map
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a callable or a pair of callables, got {type(feature_map).__name__}")
    return feature_map, feature_map


def normalized_bsbr_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    meta_query: torch.Tensor,
    meta_key: torch.Tensor,
    chunk_size: int,
    feature_map,
    mix_logit: torch.Tensor,
    local: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_mix: bool = False,
    sink_size: int = 0,
):
    """BSBR attention with normalised retrieval (see the module docstring for the formula).

    Args:
        query: ``[batch, heads, n, d]`` (RoPE applied); key, value: ``[batch, kv_heads, n, d]``, ``kv_heads``
            dividing ``heads`` (GQA, HF ``repeat_kv`` order).
        meta_query: ``[batch, heads, rows, d]``, row ``j`` computed from chunk ``j`` (it routes chunk ``j+1``);
            meta_key: ``[batch, kv_heads or heads, rows, d]``, row ``j`` = ``h_j``. ``rows >= chunks - 1``
            (``chunks = ceil(n / chunk_size)``); extra rows are ignored.
        chunk_size: tokens per chunk (>= 1).
        feature_map: callable ``[batch, heads, ..., d] -> [batch, heads, ..., F]`` with positive values (e.g.
            :class:`HedgehogFeatureMap`), or a pair ``(query_map, key_map)``; keys are repeated to ``heads``
            before the map.
        mix_logit: ``[heads]`` log of the retrieval gain ``g``.
        local: optional precomputed :func:`chunk_local_softmax` ``(output, lse)`` of these query/key/value with
            the same ``chunk_size``/``sink_size`` (calibration reuses it: it does not depend on trained parameters).
        return_mix: also return ``s`` ``[batch, heads, n]``, the retrieved share of each token's mass (0 in chunk 0).
        sink_size: tokens ``0..sink_size-1`` are attended exactly by every token (see :func:`chunk_local_softmax`)
            and left out of chunk 0's state ``F_0, z_0``.
    Returns:
        ``[batch, heads, n, d]`` (and ``s`` with ``return_mix=True``).
    Raises:
        ValueError: bad ``chunk_size``/``sink_size`` or inconsistent shapes. TypeError: ``feature_map`` not callable.
    """
    check_positive_int(chunk_size=chunk_size)
    query_map, key_map = _feature_maps(feature_map)
    if query.dim() != 4:
        raise ValueError(f"query must be [batch, heads, n, head_dim], got {list(query.shape)}")
    batch, heads, n, d = query.shape
    if key.shape != value.shape or key.dim() != 4 or key.shape[0] != batch or key.shape[2:] != (n, d):
        raise ValueError(f"key/value must be [batch, kv_heads, {n}, {d}], got {list(key.shape)}, {list(value.shape)}")
    chunks = -(-n // chunk_size)
    retrieving = chunks - 1  # chunks 1..chunks-1 retrieve from chunks 0..i-1
    for name, t, head_counts in (("meta_query", meta_query, (heads,)), ("meta_key", meta_key, (key.shape[1], heads))):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[1] not in head_counts or t.shape[3] != d \
                or t.shape[2] < retrieving:
            raise ValueError(f"{name} must be [batch, {' or '.join(map(str, head_counts))}, >= {retrieving}, {d}], "
                             f"got {list(t.shape)}")
    if mix_logit.shape != (heads,):
        raise ValueError(f"mix_logit must be [{heads}], got {list(mix_logit.shape)}")
    check_sink_size(sink_size, chunk_size)

    local_out, lse = chunk_local_softmax(query, key, value, chunk_size, sink_size) if local is None else local
    if retrieving == 0:
        return (local_out, torch.zeros_like(lse)) if return_mix else local_out
    key, value = repeat_kv(key, heads, "key"), repeat_kv(value, heads, "value")
    start = chunk_size  # first retrieving token

    # Chunk states of the retrievable (whole) chunks 0..chunks-2.
    key_features = key_map(key[:, :, : retrieving * chunk_size])  # [batch, heads, (chunks-1)·C, F]
    if sink_size:  # the sink tokens are attended exactly: not in F_0
        kept = (torch.arange(key_features.shape[2], device=query.device) >= sink_size).to(key_features.dtype)
        key_features = key_features * kept[:, None]
    key_features = key_features.unflatten(2, (retrieving, chunk_size))  # [batch, heads, chunks-1, C, F]
    values = value[:, :, : retrieving * chunk_size].unflatten(2, (retrieving, chunk_size))  # [.., chunks-1, C, d]
    states = key_features.transpose(-1, -2) @ values  # [batch, heads, chunks-1, F, d]
    normalizers = key_features.sum(3)  # [batch, heads, chunks-1, F]

    # Chunk routing: row r (chunk r+1) softmax over chunks j <= r.
    meta_key = repeat_kv(meta_key[:, :, :retrieving], heads, "meta_key")
    scores = meta_query[:, :, :retrieving] @ meta_key.transpose(-1, -2) / math.sqrt(d)  # [b, h, chunks-1, chunks-1]
    visible = torch.ones(retrieving, retrieving, dtype=torch.bool, device=query.device).tril()
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    mixed_states = torch.einsum("bhij,bhjfd->bhifd", weights, states)  # [batch, heads, chunks-1, F, d]
    mixed_norms = weights @ normalizers  # [batch, heads, chunks-1, F]

    query_features = split_chunks(query_map(query[:, :, start:]), chunk_size)  # [batch, heads, chunks-1, C, F]
    numerator = query_features @ mixed_states  # [batch, heads, chunks-1, C, d]
    denominator = (query_features @ mixed_norms[..., None]).squeeze(-1)  # [batch, heads, chunks-1, C], > 0
    numerator, denominator = numerator.flatten(2, 3)[:, :, : n - start], denominator.flatten(2, 3)[:, :, : n - start]
    # Z = 0 only when every retrievable token is a sink token (chunk 1 with sink_size = chunk_size): N = 0 too,
    # and the clamp turns that into share ~0 instead of 0/0.
    denominator = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    share = torch.sigmoid(mix_logit.to(lse.dtype)[:, None] + torch.log(denominator) - lse[:, :, start:])  # [b, h, n-C]
    retrieved = local_out[:, :, start:] + share[..., None] * (numerator / denominator[..., None] - local_out[:, :, start:])
    output = torch.cat([local_out[:, :, :start], retrieved], dim=2)  # [batch, heads, n, d]
    if not return_mix:
        return output
    return output, torch.cat([torch.zeros_like(lse[:, :, :start]), share], dim=2)


@dataclass
class NormalizedState:
    """Streaming state of one row of a normalised-retrieval layer after ``num_tokens`` tokens (batch size 1).

    With ``p = num_tokens % chunk_size`` tokens in the current chunk and ``c = num_tokens // chunk_size`` finished
    chunks (``H`` query heads, ``G`` key/value heads, ``d`` head_dim, ``D`` hidden size, ``2f`` features):

    * ``partial_key, partial_value`` ``[1, G, p, d]``: the current chunk's keys (RoPE'd) and values;
    * ``partial_sum`` ``[1, D]``: the sum of its hidden states (source of its meta-key and the next meta-query);
    * ``sink_key, sink_value`` ``[1, G, min(sink_size, num_tokens), d]``: the attention-sink tokens;
    * ``states`` ``[1, H, c, 2f, d]``, ``normalizers`` ``[1, H, c, 2f]``, ``meta_keys`` ``[1, G, c, d]``: the finished
      chunks' ``F_j``, ``z_j`` and ``h_j`` (empty with retrieval off: own-chunk attention keeps no chunk states);
    * ``mixed_state`` ``[1, H, 2f, d]`` and ``mixed_norm`` ``[1, H, 2f]``: ``Σ_j w_ij F_j`` and ``Σ_j w_ij z_j`` of the
      current chunk ``i`` (fixed once it starts), None in chunk 0 or with retrieval off.

    Size (:meth:`nbytes`): ``element_size · (2·G·(p + k)·d + D + c·(H·2f·(d + 1) + G·d) + H·2f·(d + 1))`` bytes with
    ``k = min(sink_size, num_tokens)`` — O(chunks·f·d) per head. The tensors are never changed in place (beam search
    shares states between beams).
    """

    chunk_size: int
    num_tokens: int
    partial_key: torch.Tensor
    partial_value: torch.Tensor
    partial_sum: torch.Tensor
    sink_key: torch.Tensor
    sink_value: torch.Tensor
    states: torch.Tensor
    normalizers: torch.Tensor
    meta_keys: torch.Tensor
    mixed_state: torch.Tensor | None = None
    mixed_norm: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        tensors = (self.partial_key, self.partial_value, self.partial_sum, self.sink_key, self.sink_value,
                   self.states, self.normalizers, self.meta_keys, self.mixed_state, self.mixed_norm)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _empty_state(retrieval, chunk_size: int, hidden_states, query, key) -> NormalizedState:
    """The state before the first token (``hidden_states [1, n, D]``, ``query [1, H, n, d]``, ``key [1, G, n, d]``
    give sizes, dtype and device)."""
    heads, kv_heads, d = query.shape[1], key.shape[1], query.shape[3]
    features = 2 * retrieval.query_map.feature_dim
    empty_kv = key.new_zeros(1, kv_heads, 0, d)
    return NormalizedState(chunk_size, 0, empty_kv, empty_kv, hidden_states.new_zeros(1, hidden_states.shape[2]),
                           empty_kv, empty_kv, query.new_zeros(1, heads, 0, features, d),
                           query.new_zeros(1, heads, 0, features), key.new_zeros(1, kv_heads, 0, d))


def normalized_step(retrieval: NormalizedRetrieval, chunk_size: int, meta_from_means, hidden_states, query, key,
                    value, state: NormalizedState | None, retrieve: bool = True, dropout_p: float = 0.0):
    """One row's streaming step of the normalised retrieval: the ``n`` new tokens continue ``state``, and the outputs
    equal those of one full forward over the whole sequence (:func:`normalized_bsbr_attention`, or
    :func:`chunk_local_softmax` with ``retrieve=False``).

    Args:
        retrieval: the layer's :class:`NormalizedRetrieval` (feature maps, mix logits, ``sink_size``).
        chunk_size: tokens per chunk.
        meta_from_means: ``meta_from_means(pooled [1, 1, D]) -> (meta_query [1, H, 1, d], meta_key [1, G, 1, d])``:
            the meta rows of a finished chunk from the mean of its hidden states (a converted layer's own method).
        hidden_states: ``[1, n, D]``; query: ``[1, H, n, d]`` (positions applied); key, value: ``[1, G, n, d]``.
        state: :class:`NormalizedState` of the tokens so far, or None (none yet).
        retrieve: False = own-chunk attention (plus the sink tokens) only; no chunk states are kept.
        dropout_p: must be 0 (attention dropout is not applied by the normalised retrieval).
    Returns:
        ``(output [1, H, n, d], new_state)``. The new tokens are processed chunk segment by chunk segment: a
        segment's local softmax covers the current chunk's earlier tokens (and the sink tokens after chunk 0); a
        finished chunk adds ``F_j, z_j, h_j`` and fixes the next chunk's mixed state. Cost per token O(C·d + f·d) per
        head, plus O(c·f·d) per head when a chunk finishes.
    Raises:
        ValueError: a batch size other than 1 or ``dropout_p != 0``.
    """
    if hidden_states.shape[0] != 1 or query.shape[0] != 1:
        raise ValueError(f"normalized_step takes one row (batch size 1), got {hidden_states.shape[0]}")
    if dropout_p:
        raise ValueError(f"dropout_p must be 0 for the normalised retrieval's cached step, got {dropout_p}")
    size, sink_size = chunk_size, retrieval.sink_size
    state = _empty_state(retrieval, size, hidden_states, query, key) if state is None else state
    heads, d = query.shape[1], query.shape[3]
    outputs, start, length = [], 0, query.shape[2]
    while start < length:
        position, chunk = state.num_tokens, state.num_tokens // size
        offset = position % size
        span = min(length - start, size - offset)  # new tokens of this chunk
        q = query[:, :, start:start + span]  # [1, H, span, d]
        keys = torch.cat([state.partial_key, key[:, :, start:start + span]], dim=2)  # [1, G, offset + span, d]
        values = torch.cat([state.partial_value, value[:, :, start:start + span]], dim=2)
        scores = q @ repeat_kv(keys, heads, "key").transpose(-1, -2) / math.sqrt(d)  # [1, H, span, offset+span]
        causal = (torch.arange(offset + span, device=q.device)[None, :]
                  <= offset + torch.arange(span, device=q.device)[:, None])
        scores = scores.masked_fill(~causal, float("-inf"))
        local_values = values
        if chunk > 0 and sink_size:  # later chunks see the sink tokens too, in the same softmax
            sink_scores = q @ repeat_kv(state.sink_key, heads, "key").transpose(-1, -2) / math.sqrt(d)
            scores = torch.cat([sink_scores, scores], dim=-1)  # [1, H, span, k + offset + span]
            local_values = torch.cat([state.sink_value, values], dim=2)
        lse = torch.logsumexp(scores, dim=-1)  # [1, H, span]
        output = torch.exp(scores - lse[..., None]) @ repeat_kv(local_values, heads, "value")  # [1, H, span, d]
        if state.mixed_state is not None:
            query_features = retrieval.query_map(q)  # [1, H, span, 2f]
            numerator = query_features @ state.mixed_state  # [1, H, span, d]
            denominator = (query_features @ state.mixed_norm[..., None]).squeeze(-1)  # [1, H, span]
            denominator = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
            share = torch.sigmoid(retrieval.mix_logit.to(lse.dtype)[:, None] + torch.log(denominator) - lse)
            output = output + share[..., None] * (numerator / denominator[..., None] - output)
        outputs.append(output)

        new_sinks = max(0, min(sink_size - position, span))
        partial_sum = state.partial_sum + hidden_states[:, start:start + span].sum(1)  # [1, D]
        state = NormalizedState(
            size, position + span, keys, values, partial_sum,
            torch.cat([state.sink_key, key[:, :, start:start + new_sinks]], dim=2),
            torch.cat([state.sink_value, value[:, :, start:start + new_sinks]], dim=2),
            state.states, state.normalizers, state.meta_keys, state.mixed_state, state.mixed_norm)
        start += span
        if state.num_tokens % size == 0:
            state = _finish_chunk(retrieval, meta_from_means, retrieve, state, chunk)
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0], state


def _finish_chunk(retrieval, meta_from_means, retrieve: bool, state: NormalizedState, chunk: int) -> NormalizedState:
    """``state`` whose current chunk (index ``chunk``) just filled up: its ``F, z, h`` appended (``retrieve``) and the
    next chunk's mixed state computed; the partial chunk emptied."""
    keys, values = state.partial_key, state.partial_value
    heads = state.states.shape[1]
    empty_kv = keys[:, :, :0]
    done = NormalizedState(state.chunk_size, state.num_tokens, empty_kv, empty_kv, torch.zeros_like(state.partial_sum),
                           state.sink_key, state.sink_value, state.states, state.normalizers, state.meta_keys)
    if not retrieve:
        return done
    key_features = retrieval.key_map(repeat_kv(keys, heads, "key"))  # [1, H, C, 2f]
    if chunk == 0 and retrieval.sink_size:  # the sink tokens are attended exactly: not in F_0
        kept = torch.arange(keys.shape[2], device=keys.device) >= retrieval.sink_size
        key_features = key_features * kept[:, None].to(key_features.dtype)
    chunk_state = key_features.transpose(-1, -2) @ repeat_kv(values, heads, "value")  # [1, H, 2f, d]
    meta_query, meta_key = meta_from_means(state.partial_sum[:, None] / state.chunk_size)  # [1, *, 1, d]
    done.states = torch.cat([state.states, chunk_state[:, :, None]], dim=2)  # [1, H, c + 1, 2f, d]
    done.normalizers = torch.cat([state.normalizers, key_features.sum(2)[:, :, None]], dim=2)  # [1, H, c + 1, 2f]
    done.meta_keys = torch.cat([state.meta_keys, meta_key], dim=2)  # [1, G, c + 1, d]
    scores = meta_query @ repeat_kv(done.meta_keys, heads, "meta_key").transpose(-1, -2)  # [1, H, 1, c + 1]
    weights = torch.softmax(scores / math.sqrt(keys.shape[3]), dim=-1)
    done.mixed_state = torch.einsum("bhj,bhjfd->bhfd", weights[:, :, 0], done.states)  # [1, H, 2f, d]
    done.mixed_norm = (weights @ done.normalizers)[:, :, 0]  # [1, H, 2f]
    return done


class NormalizedRetrieval(nn.Module):
    """The new parameters of one layer's normalised retrieval: Hedgehog feature maps and per-head mix logits.

    Args:
        num_heads, head_dim: the layer's query heads and head size.
        feature_dim: Hedgehog features per half (default ``head_dim``).
        mix_logit: initial ``log g`` for every head (default 0: ``g = 1``).
        tie_qk: one feature map for queries and keys (Hedgehog) instead of two (LoLCATs' default keeps two).
        sink_size: exact sink tokens (see :func:`chunk_local_softmax`), attribute ``sink_size``.

    Modules: ``query_map``, ``key_map`` (:class:`HedgehogFeatureMap`; the same object when ``tie_qk``);
    parameter ``mix_logit`` ``[num_heads]``.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None, mix_logit: float = 0.0,
                 tie_qk: bool = False, sink_size: int = 0):
        super().__init__()
        check_int_at_least(0, sink_size=sink_size)
        self.sink_size = sink_size
        self.query_map = HedgehogFeatureMap(num_heads, head_dim, feature_dim)
        self.key_map = self.query_map if tie_qk else HedgehogFeatureMap(num_heads, head_dim, feature_dim)
        self.mix_logit = nn.Parameter(torch.full((num_heads,), float(mix_logit)))

    def forward(self, query, key, value, meta_query, meta_key, chunk_size, local=None, return_mix=False):
        """:func:`normalized_bsbr_attention` with this module's feature maps and mix logits."""
        return normalized_bsbr_attention(query, key, value, meta_query, meta_key, chunk_size,
                                         (self.query_map, self.key_map), self.mix_logit, local, return_mix,
                                         self.sink_size)
