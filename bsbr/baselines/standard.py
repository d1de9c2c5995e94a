"""Standard causal multi-head softmax attention (Vaswani et al. 2017, arXiv 1706.03762) on torch's fused
``scaled_dot_product_attention``: the full-attention baseline, O(seq_len²) time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_dropout, check_heads, check_hidden_states
from bsbr.attention import validate_attention_mask

__all__ = ["StandardAttention"]


class StandardAttention(nn.Module):
    """Causal multi-head softmax attention with ``q_proj, k_proj, v_proj, out_proj`` (``nn.Linear(hidden_dim, hidden_dim)``).

    Args:
        hidden_dim: model width, divisible by ``num_heads``.
        num_heads: attention heads; ``head_dim = hidden_dim // num_heads``, scale ``1/sqrt(head_dim)``.
        dropout: dropout on the attention weights during training, in [0, 1).
    Raises:
        ValueError: invalid arguments; in ``forward``, input not ``[batch, seq_len, hidden_dim]`` or a malformed mask.
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

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states``: ``[batch, seq_len, hidden_dim]``; ``attention_mask``: optional ``[batch, seq_len]``,
        1 = real token, 0 = padding (padded keys are ignored, outputs at padded positions are zeros).
        Returns ``[batch, seq_len, hidden_dim]``."""
        batch, seq_len = check_hidden_states(hidden_states, self.hidden_dim, self.q_proj.weight.dtype)
        mask = validate_attention_mask(attention_mask, batch, seq_len)
        q, k, v = (
            proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )  # [batch, heads, seq_len, head_dim]
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
            eye = torch.eye(seq_len, dtype=torch.bool, device=q.device)
            # Padded queries attend to themselves only, so no softmax row is empty; their outputs are zeroed.
            attn_mask = causal & (mask[:, None, None, :] | eye)  # [batch, 1, seq_len, seq_len]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
            out = out * mask[:, None, :, None].to(out.dtype)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, self.hidden_dim))
