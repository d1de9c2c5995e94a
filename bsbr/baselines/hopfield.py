"""Causal Hopfield attention: retrieval from a modern (continuous) Hopfield network with ``num_updates`` update steps
(Ramsauer et al. 2020, "Hopfield Networks is All You Need", arXiv 2008.02217, the ``Hopfield`` layer of Sec. 3).

Per head (``d = head_dim``), the stored patterns of token ``s`` are its key ``k_s = W_K x_s`` and value
``v_s = W_V x_s``; the state pattern of token ``t`` starts at its query ``ξ⁰_t = W_Q x_t``. With inverse temperature
``β`` and only the patterns ``s <= t`` stored for token ``t`` (causal):

* inner updates ``k = 1 .. num_updates - 1``: ``ξᵏ_t = Σ_{s<=t} softmax_s(β ξᵏ⁻¹_t · k_s) k_s`` — the paper's update
  rule ``ξ ← Yᵀ softmax(β Y ξ)`` with the key projections ``Y = K`` as the stored patterns, so ``ξ`` stays in key
  space and the iteration is well defined without tying ``W_V`` to ``W_K``;
* final retrieval: ``o_t = Σ_{s<=t} softmax_s(β ξ_t · k_s) v_s`` with ``ξ_t = ξ^{num_updates - 1}_t``, then
  ``out_proj`` over the concatenated heads. The values are projected from the tokens (``W_V x_s``) as in standard
  attention, not from the keys (the paper's layer uses ``W_K W_V``); dropout applies to this retrieval only.

With ``num_updates = 1`` and ``β = 1/sqrt(head_dim)`` (the defaults) this *is* causal softmax multi-head attention
(:class:`bsbr.StandardAttention` with its own ``q/k/v/out`` projections): the Hopfield view adds the free
inverse temperature ``β`` and the extra update steps, each of which moves the query towards a fixed point (a stored
pattern or a metastable mixture of patterns) before the read-out. Every step is one causal
``scaled_dot_product_attention`` call: O(num_updates·seq_len²·head_dim) time; a call without a cache uses
``is_causal`` (fused kernels, O(seq_len·head_dim) memory per head), a call continuing a cache an explicit
``[L, seen + L]`` mask as :class:`bsbr.StandardAttention` does.
Streaming keeps every key and value (:class:`bsbr.baselines.standard.KVCache`): token ``t``'s
updates read only patterns ``s <= t``, so no query state needs to be kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bsbr._checks import check_positive_int
from bsbr.baselines.standard import KVCache
from bsbr.layer import AttentionLayer

__all__ = ["HopfieldAttention"]


class HopfieldAttention(AttentionLayer):
    """Causal multi-head Hopfield retrieval with ``q_proj, k_proj, v_proj, out_proj`` (``nn.Linear(hidden_dim,
    hidden_dim)``); see the module docstring for the update rule.

    Args:
        hidden_dim: model width, divisible by ``num_heads``.
        num_heads: attention heads; ``head_dim = hidden_dim // num_heads``.
        dropout: dropout on the final retrieval's attention weights during training, in [0, 1) (the inner updates
            are not dropped out).
        beta: inverse temperature ``β > 0`` of every softmax; None means ``1/sqrt(head_dim)``.
        num_updates: softmax retrievals per token (>= 1): ``num_updates - 1`` inner updates in key space, then the
            read-out through the values. 1 is softmax attention with scale ``β``.
    ``forward(hidden_states, attention_mask=None, state=None, return_state=False)`` as
    :meth:`bsbr.layer.AttentionLayer.forward`; the streaming state is a :class:`~bsbr.baselines.standard.KVCache`.

    Raises:
        ValueError: invalid arguments (see :meth:`forward` for its own).
    """

    state_type = KVCache

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, beta: float | None = None,
                 num_updates: int = 1):
        super().__init__(hidden_dim, num_heads, dropout)
        check_positive_int(num_updates=num_updates)
        if beta is None:
            beta = 1.0 / math.sqrt(self.head_dim)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a finite number > 0 (or None for 1/sqrt(head_dim)), got {beta!r}")
        self.beta, self.num_updates = float(beta), num_updates
        self._add_projections("q_proj", "k_proj", "v_proj", "out_proj")

    def _empty_state(self, batch: int, like: torch.Tensor) -> KVCache:
        return KVCache.empty(batch, id(self), self.num_heads, self.head_dim, like)

    def _attend(self, hidden_states: torch.Tensor, state: KVCache | None, return_state: bool):
        batch, length, _ = hidden_states.shape
        xi, k, v = (self.split_heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        seen = 0 if state is None else state.num_tokens
        if seen:
            k, v = torch.cat([state.key, k], dim=2), torch.cat([state.value, v], dim=2)  # [batch, heads, seen + L, d]
        # new token t (position seen + t) retrieves from patterns 0 .. seen + t
        causal = {"is_causal": True}
        if seen:  # [L, seen + L]; a single query sees every pattern
            keys, queries = torch.arange(seen + length, device=k.device), seen + torch.arange(length, device=k.device)
            causal = {"attn_mask": None if length == 1 else keys[None, :] <= queries[:, None]}
        for _ in range(self.num_updates - 1):  # ξ ← softmax(β ξ Kᵀ) K
            xi = F.scaled_dot_product_attention(xi, k, k, scale=self.beta, **causal)
        out = F.scaled_dot_product_attention(xi, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.beta, **causal)  # [batch, heads, L, head_dim]
        out = self.out_proj(self.merge_heads(out))
        if not return_state:
            return out
        return out, KVCache(batch, id(self), seen + length, k, v)
