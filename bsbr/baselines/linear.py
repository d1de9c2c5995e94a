"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236).

Softmax is replaced by the feature map ``φ(x) = elu(x) + 1`` (strictly positive), so with ``S_t = Σ_{s≤t} φ(k_s) v_sᵀ``
(``[head_dim, head_dim]`` per head) and ``z_t = Σ_{s≤t} φ(k_s)`` (``[head_dim]``) the output of token ``t`` is

    o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps),   eps = LINEAR_ATTENTION_EPS = 1e-6.

``φ > 0`` makes the denominator positive in exact arithmetic, but ``elu(x) + 1`` underflows to 0 in fp32 for
``x`` below about −17, and ``eps`` then keeps 0/0 away. ``eps`` is not free: when ``φ(q_t)ᵀ z_t`` is below about
``1e-4`` (queries far in elu's negative range) it shrinks the output noticeably. Every form here (and the test
references) adds the same ``eps``, so they agree exactly in exact arithmetic.

Two forms on per-head tensors, both continuing a carried ``(S, z)``:

* :func:`linear_attention_recurrent`: the token loop, the obviously-correct reference, O(n·d²), sequential.
* :func:`linear_attention_chunkwise`: chunks of ``chunk_size`` tokens: causal masked quadratic attention inside a
  chunk plus the readout of the state of all earlier chunks, O(n·chunk_size·d + n·d²) time, parallel over chunks.

:class:`LinearAttention` is the multi-head layer (same interface as :class:`bsbr.StandardAttention`); its
streaming state holds only ``S`` and ``z``: ``element_size · batch · heads · (d² + d)`` bytes, whatever the length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bsbr._checks import check_per_head_qkv, check_positive_int
from bsbr.layer import AttentionLayer

__all__ = [
    "LINEAR_ATTENTION_EPS",
    "LinearAttention",
    "LinearAttentionState",
    "elu_feature_map",
    "linear_attention_chunkwise",
    "linear_attention_recurrent",
]

#: Added to the normaliser ``φ(q_t)ᵀ z_t`` (only guards 0/0 when ``φ`` underflows; see the module docstring).
LINEAR_ATTENTION_EPS = 1e-6


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1`` elementwise (Katharopoulos et al. 2020, arXiv 2006.16236): positive, any shape."""
    return F.elu(x) + 1.0


def _check_qkv(q, k, v, state):
    """Shapes of per-head ``q, k, v`` ``[batch, heads, seq_len, head_dim]`` and of a carried ``(S, z)``."""
    check_per_head_qkv(q, k, v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, _, d_k = q.shape
    d_v = v.shape[-1]
    if state is None:
        return q.new_zeros(batch, heads, d_k, d_v), q.new_zeros(batch, heads, d_k)
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError("state must be None or a tuple (S [batch, heads, d_k, d_v], z [batch, heads, d_k])")
    key_value, key_sum = state
    if tuple(key_value.shape) != (batch, heads, d_k, d_v) or tuple(key_sum.shape) != (batch, heads, d_k):
        raise ValueError(f"state must be (S {[batch, heads, d_k, d_v]}, z {[batch, heads, d_k]}), got "
                         f"({list(key_value.shape)}, {list(key_sum.shape)})")
    if key_value.dtype != q.dtype or key_sum.dtype != q.dtype:
        raise ValueError(f"state must have the dtype of q ({q.dtype}), got {key_value.dtype} and {key_sum.dtype}")
    return key_value, key_sum


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               state: tuple[torch.Tensor, torch.Tensor] | None = None,
                               eps: float = LINEAR_ATTENTION_EPS):
    """Causal linear attention as a token loop (the reference form).

    Args:
        q, k: ``[batch, heads, seq_len, d_k]`` *after* the feature map (non-negative, e.g. :func:`elu_feature_map`).
        v: ``[batch, heads, seq_len, d_v]``.
        state: None (a fresh sequence) or ``(S, z)`` returned by an earlier call: ``S`` ``[batch, heads, d_k, d_v]``
            = ``Σ φ(k_s) v_sᵀ``, ``z`` ``[batch, heads, d_k]`` = ``Σ φ(k_s)`` over the tokens seen so far.
        eps: added to the normaliser ``φ(q_t)ᵀ z_t``.
    Returns:
        ``(out [batch, heads, seq_len, d_v], S, z)`` with ``S, z`` after the last token.
    Raises:
        ValueError: inconsistent shapes of ``q, k, v`` or ``state``.
    """
    key_value, key_sum = _check_qkv(q, k, v, state)
    outputs = []
    for t in range(q.shape[2]):
        key_value = key_value + k[:, :, t, :, None] * v[:, :, t, None, :]  # [batch, heads, d_k, d_v]
        key_sum = key_sum + k[:, :, t]  # [batch, heads, d_k]
        numerator = (q[:, :, t, :, None] * key_value).sum(-2)  # [batch, heads, d_v]
        denominator = (q[:, :, t] * key_sum).sum(-1, keepdim=True) + eps  # [batch, heads, 1]
        outputs.append(numerator / denominator)
    return torch.stack(outputs, dim=2), key_value, key_sum


def linear_attention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64,
                               state: tuple[torch.Tensor, torch.Tensor] | None = None,
                               eps: float = LINEAR_ATTENTION_EPS):
    """Causal linear attention in chunks: equal to :func:`linear_attention_recurrent` (up to rounding).

    Inside a chunk ``c``: the masked quadratic form ``tril(Q_c K_cᵀ) V_c`` (normaliser ``tril(Q_c K_cᵀ)·1``); across
    chunks: ``Q_c S_{<c}`` (normaliser ``Q_c z_{<c}``) with ``S_{<c}`` the carried state plus the exclusive prefix sum
    of the chunk states ``K_cᵀ V_c``. Time O(seq_len·chunk_size·d + seq_len·d²), memory O(seq_len·chunk_size +
    num_chunks·d²) per head. The last chunk may be partial (zero keys are appended internally; they add nothing).

    Args:
        q, k, v, state, eps: as in :func:`linear_attention_recurrent`.
        chunk_size: tokens per chunk (>= 1); any value gives the same result.
    Returns:
        ``(out [batch, heads, seq_len, d_v], S, z)``.
    Raises:
        ValueError: ``chunk_size`` not a positive integer, inconsistent shapes of ``q, k, v`` or ``state``.
    """
    check_positive_int(chunk_size=chunk_size)
    key_value, key_sum = _check_qkv(q, k, v, state)
    batch, heads, length, d_k = q.shape
    d_v = v.shape[-1]
    chunk_size = min(chunk_size, length)  # a short call (a decode step) is one chunk of its own length, not padded
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    groups = batch * heads  # one head-major contiguous layout: [batch * heads * chunks, chunk_size, dim]
    # v gets a column of ones, so one product gives the numerator and the normaliser (and K_cᵀ [V_c | 1] gives
    # both chunk states); padded tokens have zero keys and queries, so their ones add nothing.
    q, k = (F.pad(t, (0, 0, 0, pad)).reshape(groups * num_chunks, chunk_size, d_k) for t in (q, k))
    v = F.pad(v, (0, 1, 0, pad), value=1.0).reshape(groups * num_chunks, chunk_size, d_v + 1)
    scores = torch.bmm(q, k.transpose(1, 2)).tril_()  # tril(Q_c K_cᵀ): [groups * chunks, chunk_size, chunk_size]
    chunk_state = torch.bmm(k.transpose(1, 2), v).view(groups, num_chunks, d_k * (d_v + 1))  # K_cᵀ [V_c | 1]
    carried = torch.cat([key_value, key_sum[..., None]], dim=-1).reshape(groups, 1, d_k * (d_v + 1))  # [S | z]
    # [S | z] before each chunk: the exclusive prefix sum of the chunk states, started at the carried state.
    before = torch.cat([carried, chunk_state[:, :-1]], dim=1).cumsum(1)  # [groups, chunks, d_k * (d_v + 1)]
    final = (before[:, -1] + chunk_state[:, -1]).view(batch, heads, d_k, d_v + 1)
    ext = torch.baddbmm(torch.bmm(scores, v), q, before.view(groups * num_chunks, d_k, d_v + 1))
    out = ext[..., :d_v] / (ext[..., d_v:] + eps)  # [groups * chunks, chunk_size, d_v]
    out = out.view(batch, heads, num_chunks * chunk_size, d_v)[:, :, :length]  # [batch, heads, seq_len, d_v]
    return out, final[..., :d_v], final[..., d_v]


@dataclass
class LinearAttentionState:
    """Streaming state of one :class:`LinearAttention` after ``num_tokens`` tokens.

    ``key_value``: ``[batch, heads, head_dim, head_dim]`` = ``S = Σ φ(k_s) v_sᵀ``; ``key_sum``: ``[batch, heads,
    head_dim]`` = ``z = Σ φ(k_s)``. Size ``element_size · batch · heads · (head_dim² + head_dim)`` bytes, constant in
    ``num_tokens``. ``batch_size`` and ``owner`` (``id`` of the producing module) are checked when it is passed back.
    """

    batch_size: int
    owner: int
    num_tokens: int
    key_value: torch.Tensor
    key_sum: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.key_value, self.key_sum))


class LinearAttention(AttentionLayer):
    """Multi-head causal linear attention (Katharopoulos et al. 2020, arXiv 2006.16236), chunkwise form.

    ``q, k = elu(q_proj(x)) + 1, elu(k_proj(x)) + 1`` per head, ``v = v_proj(x)``, then
    :func:`linear_attention_chunkwise`, dropout on the per-head outputs (training only), ``out_proj``.

    Args:
        hidden_dim: model width, divisible by ``num_heads``.
        num_heads: heads; ``head_dim = hidden_dim // num_heads``.
        dropout: dropout probability on the attention output before ``out_proj`` (training only), in [0, 1).
        chunk_size: tokens per chunk of the chunkwise form (>= 1); it changes speed and memory, not the result.
    ``forward(hidden_states, attention_mask=None, state=None, return_state=False)`` as
    :meth:`bsbr.layer.AttentionLayer.forward`; the streaming state is a :class:`LinearAttentionState`.

    Raises:
        ValueError: invalid arguments (see :meth:`forward` for its own).
    """

    state_type = LinearAttentionState
    span_settings = ("chunk_size",)

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, chunk_size: int = 64):
        super().__init__(hidden_dim, num_heads, dropout)
        check_positive_int(chunk_size=chunk_size)
        self.chunk_size = chunk_size
        self._add_projections("q_proj", "k_proj", "v_proj", "out_proj")

    def state_nbytes(self, batch_size: int = 1) -> int:
        """Bytes of a :class:`LinearAttentionState` (any length): ``element_size · batch · heads · (d² + d)``."""
        check_positive_int(batch_size=batch_size)
        d = self.head_dim
        return self.q_proj.weight.element_size() * batch_size * self.num_heads * (d * d + d)

    def _empty_state(self, batch: int, like: torch.Tensor) -> LinearAttentionState:
        d = self.head_dim
        return LinearAttentionState(batch, id(self), 0, like.new_zeros(batch, self.num_heads, d, d),
                                    like.new_zeros(batch, self.num_heads, d))

    def _attend(self, hidden_states: torch.Tensor, state: LinearAttentionState | None, return_state: bool):
        """Unpadded core: ``[batch, L, hidden_dim]`` (continuing ``state``) -> output (and the new state)."""
        batch, length, _ = hidden_states.shape
        q, k, v = (self.split_heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        carried = None if state is None else (state.key_value, state.key_sum)
        out, key_value, key_sum = linear_attention_chunkwise(elu_feature_map(q), elu_feature_map(k), v,
                                                             self.chunk_size, carried)
        out = F.dropout(out, self.dropout, self.training)
        out = self.out_proj(self.merge_heads(out))  # [batch, L, hidden_dim]
        if not return_state:
            return out
        seen = 0 if state is None else state.num_tokens
        return out, LinearAttentionState(batch, id(self), seen + length, key_value, key_sum)
