"""Standard causal multi-head softmax attention (Vaswani et al. 2017, arXiv 1706.03762) on torch's fused
``scaled_dot_product_attention``: the full-attention baseline, O(seq_len²) time, with a KV cache for decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_dropout, check_heads, check_hidden_states, check_state
from bsbr.attention import attend_packed, validate_attention_mask

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


class StandardAttention(nn.Module):
    """Causal multi-head softmax attention with ``q_proj, k_proj, v_proj, out_proj`` (``nn.Linear(hidden_dim, hidden_dim)``).

    Args:
        hidden_dim: model width, divisible by ``num_heads``.
        num_heads: attention heads; ``head_dim = hidden_dim // num_heads``, scale ``1/sqrt(head_dim)``.
        dropout: dropout on the attention weights during training, in [0, 1).
    Raises:
        ValueError: invalid arguments (see :meth:`forward` for its own).
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        check_heads(hidden_dim, num_heads)
        check_dropout(dropout)
        self.hidden_dim, self.num_heads, self.head_dim = hidden_dim, num_heads, hidden_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                state: KVCache | None = None, return_state: bool = False):
        """Causal attention over ``hidden_states``, optionally continuing a KV cache.

        Args:
            hidden_states: ``[batch, seq_len, hidden_dim]``, ``seq_len >= 1``, the parameters' dtype.
            attention_mask: optional ``[batch, seq_len]`` bool or integer 0/1, 1 = real token, 0 = padding; each row's
                real tokens are processed as that sequence alone, padded positions output zeros.
            state: a :class:`KVCache` this module returned; the new tokens continue that sequence.
            return_state: also return the cache after these tokens.
        Returns:
            ``[batch, seq_len, hidden_dim]``, or ``(output, KVCache)`` with ``return_state=True``.
        Raises:
            TypeError: ``hidden_states`` not a tensor of the parameters' dtype.
            ValueError: bad ``hidden_states`` shape, malformed ``attention_mask`` (or unequal real-token counts in a
                streaming call), a ``state`` from another module or batch size.
        """
        batch, seq_len = check_hidden_states(hidden_states, self.hidden_dim, self.q_proj.weight.dtype)
        mask = validate_attention_mask(attention_mask, batch, seq_len)
        if state is not None:
            check_state(state, KVCache, batch, id(self), hidden_states)

        def empty():
            none = hidden_states.new_zeros(batch, self.num_heads, 0, self.head_dim)
            return KVCache(batch, id(self), 0, none, none.clone())

        return attend_packed(self._attend, hidden_states, mask, state, return_state, empty)

    def _attend(self, hidden_states: torch.Tensor, state: KVCache | None, return_state: bool):
        batch, length, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )  # [batch, heads, L, head_dim]
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
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.hidden_dim))
        if not return_state:
            return out
        return out, KVCache(batch, id(self), seen + length, k, v)
