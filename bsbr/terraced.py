"""Terraced retrieval: an exact region of the own and the previous chunk (plus sinks), linear attention for the rest.

As in LoLCATs (Zhang et al. 2024, arXiv 2410.10254, its "terraced" sliding window), each token attends exactly to a
region that never shrinks below one chunk, and everything older is reached through Hedgehog feature-space states
(arXiv 2402.04347) *inside the same normaliser*. For token ``t`` of chunk ``i`` (``C = chunk_size``, ``d = head_dim``,
``k = sink_size``, ``2f`` features, query head ``h`` reading key/value head ``g = h // (H / G)``):

* exact region ``E_t``: the own chunk up to ``t``, the whole previous chunk ``i-1``, and the sink tokens ``0..k-1``;
  scores ``a_tu = q_t·k_u / sqrt(d)``, ``l_t = logsumexp_{u∈E_t} a_tu``, ``o_t = Σ_{u∈E_t} softmax(a)_tu v_u``;
* retrieved region ``R_t``: every token of the chunks ``0..i-2`` except the sinks (all older chunks summed, the LoLCATs
  way; no chunk routing, so the meta projections of a converted layer are unused). Its state is one running sum per
  *key/value head* (GQA-shared):
  ``S_i = Σ_{u∈R} φ_k(k_u) v_uᵀ`` ``[2f, d]`` and ``z_i = Σ_{u∈R} φ_k(k_u)`` ``[2f]``;
* features ``φ(x) = [softmax(x̂ W), softmax(-x̂ W)]``, ``x̂ = x·d^(-1/4)`` (:class:`bsbr.normalized.HedgehogFeatureMap`):
  the key map ``φ_k`` has one ``W`` per key/value head (so the states are ``G`` heads' worth, not ``H``), the query map
  ``φ_q`` one per query head — it costs parameters, not state, and keeps each query head free to read the shared
  state its own way, as each has its own ``q_proj`` rows;
* ``N_t = φ_q(q_t)ᵀ S_i``, ``Z_t = φ_q(q_t)·z_i``; output ``(e^l o_t + g N_t) / (e^l + g Z_t)``, one normaliser for the
  exact scores and the retrieved mass, computed stably as ``s = sigmoid(mix_logit + log Z_t - l_t)``,
  ``output = (1 - s) o_t + s N_t / Z_t``.

The gain: ``g_h = exp(mix_logit_h)`` per query head. Writing ``σ = sigmoid(mix_logit)``, this is exactly LoLCATs'
mixture with weight ``σ`` on the linear-attention term and ``1 - σ`` on the softmax term (the ratio
``σ / (1 - σ) = exp(mix_logit)`` is all a shared normaliser sees). ``mix_logit`` starts at
:data:`DEFAULT_MIX_LOGIT` ``= -2.2``: a token whose retrieved mass equals its exact mass (``Z_t = e^l``) gives the
retrieved part the share ``sigmoid(-2.2) ≈ 0.0998``; in general ``s = sigmoid(-2.2 + log Z_t - l_t)``.

Chunks 0 and 1 retrieve nothing: with ``n <= 2·C`` (in particular ``chunk_size >= seq_len``) the op is exactly causal
softmax attention. Nothing of size ``seq_len²`` is built: the own chunk goes through
:func:`bsbr.normalized.chunk_local_softmax` (``[chunks, C, C]`` blocks), the previous chunk through
``[chunks - 1, C, C]`` blocks, the sinks through ``[n - 2C, k]`` scores: O(n·(2C + k)) per head.
Streaming (:func:`terraced_step`) keeps per row the current chunk's and the previous chunk's keys and values, the
sinks and ``S, z`` (:class:`TerracedState`): O(C·d + f·d) per key/value head, constant in the sequence length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bsbr._checks import check_int_at_least, check_positive_int
from bsbr.normalized import HedgehogFeatureMap, chunk_local_softmax, split_chunks
from bsbr.utils import check_sink_size, repeat_kv

__all__ = ["DEFAULT_MIX_LOGIT", "TerracedRetrieval", "TerracedState", "terraced_attention", "terraced_exact",
           "terraced_step"]

#: initial ``mix_logit`` (LoLCATs' ``sigmoid(-2.2) ≈ 0.1``): see the module docstring
DEFAULT_MIX_LOGIT = -2.2


def _merge(parts):
    """Softmax parts ``(output [..., d], lse [...])`` over disjoint key sets of the same queries -> their union."""
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    output = sum(torch.exp(part_lse - lse)[..., None] * part for part, part_lse in parts)
    return output, lse


def _softmax_part(scores, value):
    """``(softmax(scores) @ value, logsumexp(scores))`` of ``scores [..., q, m]``, ``value [..., m, d]``."""
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ value, lse


def terraced_exact(query, key, value, chunk_size: int, sink_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the terraced exact region, with its log-normaliser.

    Token ``t`` of chunk ``i`` attends to its chunk up to ``t``, the whole chunk ``i-1`` and tokens ``0..sink_size-1``.

    Args:
        query: ``[batch, heads, n, d]``; key, value: ``[batch, kv_heads, n, d]`` (``kv_heads`` divides ``heads``).
        chunk_size: tokens per chunk (>= 1); sink_size: ``0 <= sink_size <= chunk_size``.
    Returns:
        ``(output [batch, heads, n, d], lse [batch, heads, n])``, ``lse_t = logsumexp_{u∈E_t} q_t·k_u/sqrt(d)``.
    Memory: O(n·(2C + k)) per head (the own chunk by :func:`bsbr.normalized.chunk_local_softmax`).
    Raises:
        ValueError: bad ``chunk_size`` or ``sink_size``.
    """
    check_positive_int(chunk_size=chunk_size)
    check_sink_size(sink_size, chunk_size)
    batch, heads, n, d = query.shape
    own = chunk_local_softmax(query, key, value, chunk_size)  # own chunk, causal: [b, H, n, d], [b, H, n]
    if n <= chunk_size:
        return own
    size, later = chunk_size, n - chunk_size  # tokens of chunks >= 1 also see all of chunk i - 1
    key, value = repeat_kv(key, heads, "key"), repeat_kv(value, heads, "value")
    q = split_chunks(query[:, :, size:], size)  # [batch, heads, m, C, d], m = chunks - 1
    m = q.shape[2]
    previous_k = key[:, :, : m * size].unflatten(2, (m, size))  # [batch, heads, m, C, d]: whole chunks 0..m-1
    previous_v = value[:, :, : m * size].unflatten(2, (m, size))
    out, lse = _softmax_part(q @ previous_k.transpose(-1, -2) / math.sqrt(d), previous_v)  # [b, H, m, C, (d)]
    previous = out.flatten(2, 3)[:, :, :later], lse.flatten(2, 3)[:, :, :later]
    tail = _merge([(own[0][:, :, size:], own[1][:, :, size:]), previous])
    if sink_size and n > 2 * size:  # chunks >= 2: the sinks (in chunk 0) are outside the two chunks
        sink_scores = query[:, :, 2 * size:] @ key[:, :, :sink_size].transpose(-1, -2) / math.sqrt(d)  # [b,H,n-2C,k]
        sinks = _softmax_part(sink_scores, value[:, :, :sink_size])
        far = _merge([(tail[0][:, :, size:], tail[1][:, :, size:]), sinks])
        tail = torch.cat([tail[0][:, :, :size], far[0]], 2), torch.cat([tail[1][:, :, :size], far[1]], 2)
    return torch.cat([own[0][:, :, :size], tail[0]], 2), torch.cat([own[1][:, :, :size], tail[1]], 2)


def _grouped(query_features, kv_heads):
    """``[batch, H, ...]`` -> ``[batch, G, H/G, ...]`` (query head ``h`` -> key/value head ``h // (H/G)``)."""
    return query_features.unflatten(1, (kv_heads, query_features.shape[1] // kv_heads))


def _readout(query_features, state, normalizer):
    """``N = φ_q(q)ᵀ S`` and ``Z = φ_q(q)·z`` with ``S, z`` shared by the query heads of each key/value head.

    ``query_features [b, H, ..., F]``; ``state [b, G, ..., F, d]`` and ``normalizer [b, G, ..., F]`` (``...``: none,
    or the chunk axis of blocked features). Returns ``N [b, H, ..., d]``, ``Z [b, H, ...]``."""
    features = _grouped(query_features, state.shape[1])  # [b, G, H/G, ..., F]
    numerator = (features @ state.unsqueeze(2)).flatten(1, 2)  # [b, H, ..., d]
    denominator = (features @ normalizer.unsqueeze(2)[..., None]).squeeze(-1).flatten(1, 2)  # [b, H, ...]
    return numerator, denominator


def terraced_attention(query, key, value, chunk_size: int, query_map, key_map, mix_logit: torch.Tensor,
                       sink_size: int = 0, local=None, return_mix: bool = False, retrieve: bool = True):
    """Terraced exact region plus GQA-shared linear retrieval of the older chunks (formula: module docstring).

    Args:
        query: ``[batch, heads, n, d]`` (positions applied); key, value: ``[batch, kv_heads, n, d]``, ``kv_heads``
            dividing ``heads`` (HF ``repeat_kv`` order).
        chunk_size: tokens per chunk (>= 1).
        query_map: callable ``[batch, heads, ..., d] -> [batch, heads, ..., F]``, positive values; key_map: callable
            ``[batch, kv_heads, ..., d] -> [batch, kv_heads, ..., F]`` (e.g. :class:`bsbr.normalized.HedgehogFeatureMap`
            with ``heads`` and ``kv_heads`` heads).
        mix_logit: ``[heads]``, ``log g``.
        sink_size: exact sink tokens, ``0 <= sink_size <= chunk_size``; left out of the retrieved state.
        local: optional precomputed :func:`terraced_exact` ``(output, lse)`` of the same inputs and sizes.
        return_mix: also return the retrieved share ``s`` ``[batch, heads, n]`` (0 in chunks 0 and 1).
        retrieve: False = the exact region alone (no retrieval).
    Returns:
        ``[batch, heads, n, d]`` (and ``s`` with ``return_mix=True``).
    Raises:
        ValueError: bad ``chunk_size``/``sink_size``, inconsistent shapes or ``mix_logit`` not ``[heads]``.
    """
    check_positive_int(chunk_size=chunk_size)
    check_sink_size(sink_size, chunk_size)
    if query.dim() != 4:
        raise ValueError(f"query must be [batch, heads, n, head_dim], got {list(query.shape)}")
    batch, heads, n, d = query.shape
    if key.shape != value.shape or key.dim() != 4 or key.shape[0] != batch or key.shape[2:] != (n, d) \
            or heads % key.shape[1]:
        raise ValueError(f"key/value must be [batch, kv_heads dividing {heads}, {n}, {d}], got {list(key.shape)}, "
                         f"{list(value.shape)}")
    if mix_logit.shape != (heads,):
        raise ValueError(f"mix_logit must be [{heads}], got {list(mix_logit.shape)}")
    local_out, lse = terraced_exact(query, key, value, chunk_size, sink_size) if local is None else local
    stored = -(-n // chunk_size) - 2  # chunks 2.. read chunks 0..i-2; chunks 0..stored-1 enter a state
    if stored <= 0 or not retrieve:
        return (local_out, torch.zeros_like(lse)) if return_mix else local_out
    size, start = chunk_size, 2 * chunk_size
    key_features = key_map(key[:, :, : stored * size])  # [batch, G, stored·C, F]
    if sink_size:  # the sinks are attended exactly: not in the state
        kept = (torch.arange(key_features.shape[2], device=query.device) >= sink_size).to(key_features.dtype)
        key_features = key_features * kept[:, None]
    key_features = key_features.unflatten(2, (stored, size))  # [batch, G, stored, C, F]
    values = value[:, :, : stored * size].unflatten(2, (stored, size))  # [batch, G, stored, C, d]
    states = (key_features.transpose(-1, -2) @ values).cumsum(2)  # [batch, G, stored, F, d]: row i-2 = S_i
    normalizers = key_features.sum(3).cumsum(2)  # [batch, G, stored, F]

    query_features = split_chunks(query_map(query[:, :, start:]), size)  # [batch, H, stored, C, F]
    numerator, denominator = _readout(query_features, states, normalizers)  # [b, H, stored, C, (d)]
    numerator, denominator = numerator.flatten(2, 3)[:, :, : n - start], denominator.flatten(2, 3)[:, :, : n - start]
    # Z = 0 only when every retrievable token is a sink (chunk 2 with sink_size = chunk_size): N = 0 too.
    denominator = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    share = torch.sigmoid(mix_logit.to(lse.dtype)[:, None] + torch.log(denominator) - lse[:, :, start:])  # [b,H,n-2C]
    near = local_out[:, :, start:]
    output = torch.cat([local_out[:, :, :start], near + share[..., None] * (numerator / denominator[..., None] - near)],
                       dim=2)  # [batch, heads, n, d]
    if not return_mix:
        return output
    return output, torch.cat([torch.zeros_like(lse[:, :, :start]), share], dim=2)


@dataclass
class TerracedState:
    """Streaming state of one row of a terraced layer after ``num_tokens`` tokens (batch size 1).

    With ``p = num_tokens % chunk_size`` tokens in the current chunk (``G`` key/value heads, ``d`` head_dim, ``2f``
    features):

    * ``partial_key, partial_value`` ``[1, G, p, d]``: the current chunk's keys (positions applied) and values;
    * ``previous_key, previous_value`` ``[1, G, C or 0, d]``: the previous (finished) chunk's, empty in chunk 0;
    * ``sink_key, sink_value`` ``[1, G, min(sink_size, num_tokens), d]``: the sink tokens;
    * ``state`` ``[1, G, 2f, d]``, ``normalizer`` ``[1, G, 2f]``: ``S`` and ``z`` of every chunk before the previous
      one (zeros until chunk 2; None with retrieval off) — one per key/value head, whatever the sequence length.

    Size (:meth:`nbytes`): ``element_size · G · (2·(p + P + k)·d + 2f·(d + 1))`` bytes with ``P = C`` once a chunk
    has finished (else 0) and ``k = min(sink_size, num_tokens)`` (without the ``2f·(d + 1)`` term with retrieval off):
    O(C·d + f·d) per key/value head, constant in the sequence length
    (:func:`bsbr.streaming_eval.terraced_cache_nbytes`). The tensors are never changed in place (beam search shares
    states between beams).
    """

    chunk_size: int
    num_tokens: int
    partial_key: torch.Tensor
    partial_value: torch.Tensor
    previous_key: torch.Tensor
    previous_value: torch.Tensor
    sink_key: torch.Tensor
    sink_value: torch.Tensor
    state: torch.Tensor | None
    normalizer: torch.Tensor | None

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        tensors = (self.partial_key, self.partial_value, self.previous_key, self.previous_value, self.sink_key,
                   self.sink_value, self.state, self.normalizer)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def terraced_step(retrieval: TerracedRetrieval, chunk_size: int, query, key, value, state: TerracedState | None,
                  retrieve: bool = True, dropout_p: float = 0.0):
    """One row's streaming step: the ``n`` new tokens continue ``state``; the outputs equal those of one full forward
    over the whole sequence (:func:`terraced_attention`, ``retrieve`` as given).

    Args:
        retrieval: the layer's :class:`TerracedRetrieval` (feature maps, mix logits, ``sink_size``).
        chunk_size: tokens per chunk.
        query: ``[1, H, n, d]`` (positions applied); key, value: ``[1, G, n, d]``.
        state: :class:`TerracedState` of the tokens so far, or None (none yet).
        retrieve: False = the exact region only; no ``S, z`` kept.
        dropout_p: must be 0 (attention dropout is not applied).
    Returns:
        ``(output [1, H, n, d], new_state)``. Cost per token O((2C + k)·d + f·d) per head; a finished chunk folds the
        previous one into ``S, z`` (O(C·f·d) per key/value head).
    Raises:
        ValueError: a batch size other than 1 or ``dropout_p != 0``.
    """
    if query.shape[0] != 1:
        raise ValueError(f"terraced_step takes one row (batch size 1), got {query.shape[0]}")
    if dropout_p:
        raise ValueError(f"dropout_p must be 0 for the terraced retrieval's cached step, got {dropout_p}")
    size, sink_size = chunk_size, retrieval.sink_size
    heads, kv_heads, d = query.shape[1], key.shape[1], query.shape[3]
    if state is None:
        empty = key.new_zeros(1, kv_heads, 0, d)
        features = 2 * retrieval.key_map.feature_dim
        state = TerracedState(size, 0, empty, empty, empty, empty, empty, empty,
                              key.new_zeros(1, kv_heads, features, d) if retrieve else None,
                              key.new_zeros(1, kv_heads, features) if retrieve else None)
    outputs, start, length = [], 0, query.shape[2]
    while start < length:
        position = state.num_tokens
        chunk, offset = position // size, position % size
        span = min(length - start, size - offset)  # new tokens of this chunk
        q = query[:, :, start:start + span]  # [1, H, span, d]
        keys = torch.cat([state.partial_key, key[:, :, start:start + span]], dim=2)  # [1, G, offset + span, d]
        values = torch.cat([state.partial_value, value[:, :, start:start + span]], dim=2)
        causal = (torch.arange(offset + span, device=q.device)[None, :]
                  <= offset + torch.arange(span, device=q.device)[:, None])  # [span, offset + span]
        own_scores = (q @ repeat_kv(keys, heads, "key").transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal,
                                                                                                      float("-inf"))
        sinks = state.sink_key.shape[2] if chunk >= 2 else 0  # chunks 0, 1 hold the sinks in their two chunks
        region_k = torch.cat([state.sink_key[:, :, :sinks], state.previous_key, keys], dim=2)  # [1, G, k+P+o+s, d]
        region_v = torch.cat([state.sink_value[:, :, :sinks], state.previous_value, values], dim=2)
        far_scores = q @ repeat_kv(region_k[:, :, :-keys.shape[2]], heads, "key").transpose(-1, -2) / math.sqrt(d)
        scores = torch.cat([far_scores, own_scores], dim=-1)  # [1, H, span, k + P + offset + span]
        output, lse = _softmax_part(scores, repeat_kv(region_v, heads, "value"))  # [1, H, span, d]
        if retrieve and chunk >= 2:
            numerator, denominator = _readout(retrieval.query_map(q), state.state, state.normalizer)
            denominator = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
            share = torch.sigmoid(retrieval.mix_logit.to(lse.dtype)[:, None] + torch.log(denominator) - lse)
            output = output + share[..., None] * (numerator / denominator[..., None] - output)
        outputs.append(output)

        new_sinks = max(0, min(sink_size - position, span))
        state = TerracedState(size, position + span, keys, values, state.previous_key, state.previous_value,
                              torch.cat([state.sink_key, key[:, :, start:start + new_sinks]], dim=2),
                              torch.cat([state.sink_value, value[:, :, start:start + new_sinks]], dim=2),
                              state.state, state.normalizer)
        start += span
        if state.num_tokens % size == 0:  # the chunk is finished: fold the previous one into S, z
            folded, normalizer = state.state, state.normalizer
            if retrieve and chunk >= 1:
                key_features = retrieval.key_map(state.previous_key)  # [1, G, C, 2f]
                if chunk == 1 and sink_size:  # chunk 0's sinks are attended exactly: not in S
                    kept = torch.arange(size, device=key.device) >= sink_size
                    key_features = key_features * kept[:, None].to(key_features.dtype)
                folded = folded + key_features.transpose(-1, -2) @ state.previous_value  # [1, G, 2f, d]
                normalizer = normalizer + key_features.sum(2)  # [1, G, 2f]
            empty = keys[:, :, :0]
            state = TerracedState(size, state.num_tokens, empty, empty, keys, values, state.sink_key,
                                  state.sink_value, folded, normalizer)
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0], state


class TerracedRetrieval(nn.Module):
    """The new parameters of one layer's terraced retrieval: GQA-shared Hedgehog maps and per-head mix logits.

    Args:
        num_heads, num_key_value_heads, head_dim: the layer's query heads, key/value heads (dividing ``num_heads``)
            and head size.
        feature_dim: Hedgehog features per half ``f`` (default ``head_dim``).
        mix_logit: initial ``log g`` of every query head (default :data:`DEFAULT_MIX_LOGIT` = -2.2: LoLCATs'
            ``sigmoid(-2.2) ≈ 0.1``, see the module docstring).
        sink_size: exact sink tokens (attribute ``sink_size``).

    Modules: ``query_map`` (:class:`bsbr.normalized.HedgehogFeatureMap`, ``num_heads`` heads), ``key_map`` (one,
    ``num_key_value_heads`` heads: the chunk states are per key/value head); parameter ``mix_logit`` ``[num_heads]``.
    Raises:
        ValueError: a size not a positive integer, ``num_key_value_heads`` not dividing ``num_heads``, a negative
            ``sink_size`` or a ``mix_logit`` that is not a finite number.
    """

    def __init__(self, num_heads: int, num_key_value_heads: int, head_dim: int, feature_dim: int | None = None,
                 mix_logit: float = DEFAULT_MIX_LOGIT, sink_size: int = 0):
        super().__init__()
        check_positive_int(num_heads=num_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim)
        if num_heads % num_key_value_heads:
            raise ValueError(f"num_key_value_heads={num_key_value_heads} must divide num_heads={num_heads}")
        check_int_at_least(0, sink_size=sink_size)
        if isinstance(mix_logit, bool) or not isinstance(mix_logit, (int, float)) or not math.isfinite(mix_logit):
            raise ValueError(f"mix_logit must be a finite number, got {mix_logit!r}")
        self.sink_size = sink_size
        self.query_map = HedgehogFeatureMap(num_heads, head_dim, feature_dim)
        self.key_map = HedgehogFeatureMap(num_key_value_heads, head_dim, feature_dim)
        self.mix_logit = nn.Parameter(torch.full((num_heads,), float(mix_logit)))

    def forward(self, query, key, value, chunk_size, local=None, return_mix=False, retrieve=True):
        """:func:`terraced_attention` with this module's feature maps, mix logits and sinks."""
        return terraced_attention(query, key, value, chunk_size, self.query_map, self.key_map, self.mix_logit,
                                  self.sink_size, local, return_mix, retrieve)
