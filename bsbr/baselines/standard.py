"""Standard causal multi-head softmax attention (Vaswani et al. 2017, arXiv 1706.03762) on torch's fused
``scaled_dot_product_attention``: the full-attention baseline, O(seq_len²) time, with a KV cache for decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bsbr.layer import AttentionLayer

__all__ = ["KVCache", "StandardAttention"]


@dataclass
class KVCache:
    """Keys and values of every token seen so far: ``key, value`` ``[batch, heads, num_tokens, head_dim]``.

    Size: ``2 · element_size · batch · heads · num_tokens · head_dim`` bytes, growing with every token (compare
    :class:`bsbr.attention.BSBRState`). ``owner`` is the ``id`` of the producing module.
    """

    batch_size: int
    owner: int
    num_tokens: int
    key: torch.Tensor
    value: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.key, self.value))

    @classmethod
    def empty(cls, batch_size: int, owner: int, num_heads: int, head_dim: int, like: torch.Tensor) -> KVCache:
        """The cache after zero tokens (``like``'s dtype and device)."""
        none = like.new_zeros(batch_size, num_heads, 0, head_dim)
        return cls(batch_size, owner, 0, none, none.clone())


class StandardAttention(AttentionLayer):
    """Causal multi-head softmax attention with ``q_proj, k_proj, v_proj, out_proj`` (``nn.Linear(hidden_dim, hidden_dim)``).

    ``forward(hidden_states, attention_mask=None, state=None, return_state=False)`` as
    :meth:`bsbr.layer.AttentionLayer.forward`; the streaming state is a :class:`KVCache`.

    Args:
        hidden_dim: model width, divisible by ``num_heads``.
        num_heads: attention heads; ``head_dim = hidden_dim // num_heads``, scale ``1/sqrt(head_dim)``.
        dropout: dropout on the attention weights during training, in [0, 1).
    Raises:
        ValueError: invalid arguments (see :meth:`forward` for its own).
    """

    state_type = KVCache

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__(hidden_dim, num_heads, dropout)
        self._add_projections("q_proj", "k_proj", "v_proj", "out_proj")

    def _empty_state(self, batch: int, like: torch.Tensor) -> KVCache:
        return KVCache.empty(batch, id(self), self.num_heads, self.head_dim, like)

    def _attend(self, hidden_states: torch.Tensor, state: KVCache | None, return_state: bool):
        batch, length, _ = hidden_states.shape
        q, k, v = (self.split_heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        seen = 0 if state is None else state.num_tokens
        if seen:
            k, v = torch.cat([state.key, k], dim=2), torch.cat([state.value, v], dim=2)  # [batch, heads, seen + L, d]
        dropout_p = self.dropout if self.training else 0.0
        if seen == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # query t sees keys 0..seen + t (a single query sees them all)
            mask = None if length == 1 else (
                torch.arange(seen + length, device=q.device)[None, :] <= seen + torch.arange(length, device=q.device)[:, None])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = self.out_proj(self.merge_heads(out))
        if not return_state:
            return out
        return out, KVCache(batch, id(self), seen + length, k, v)
