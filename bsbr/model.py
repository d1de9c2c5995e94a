"""Pre-norm transformer layer and model shared by every attention architecture.

A model is token embedding -> ``num_layers`` pre-norm layers -> final LayerNorm. There are no position
embeddings: causal attention carries order itself (NoPE; Haviv et al. 2022, arXiv 2203.16634), and every
architecture here is compared under the same rule.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bsbr._checks import check_dropout, check_positive_int
from bsbr.attention import BSBRAttention, validate_attention_mask
from bsbr.baselines.standard import StandardAttention

__all__ = ["TransformerLayer", "TransformerModel", "BSBRLayer", "BSBRModel", "StandardModel"]


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ff(norm(x))`` with a GELU feed-forward of width ``ff_dim``.

    ``attention`` is any module with ``forward(hidden_states[batch, seq_len, hidden_dim], attention_mask=None)``.
    """

    def __init__(self, attention: nn.Module, hidden_dim: int, ff_dim: int, dropout: float = 0.0):
        super().__init__()
        check_positive_int(hidden_dim=hidden_dim, ff_dim=ff_dim)
        self.attention = attention
        self.attention_norm = nn.LayerNorm(hidden_dim)
        self.ff_norm = nn.LayerNorm(hidden_dim)
        self.ff = nn.Sequential(nn.Linear(hidden_dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, hidden_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, seq_len, hidden_dim]`` -> ``[batch, seq_len, hidden_dim]``."""
        hidden_states = hidden_states + self.dropout(self.attention(self.attention_norm(hidden_states), attention_mask))
        return hidden_states + self.dropout(self.ff(self.ff_norm(hidden_states)))


class TransformerModel(nn.Module):
    """Embedding, ``num_layers`` :class:`TransformerLayer` built by ``make_attention()``, final LayerNorm.

    ``forward(input_ids[batch, seq_len], attention_mask=None[batch, seq_len]) -> [batch, seq_len, hidden_dim]``.
    Raises ValueError for non-positive sizes, ``dropout`` outside [0, 1), ``input_ids`` that is not a 2-D integer
    tensor with ``seq_len >= 1``, ids outside ``[0, vocab_size)`` or a malformed ``attention_mask``.
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, ff_dim: int, dropout: float,
                 make_attention: Callable[[], nn.Module]):
        super().__init__()
        check_positive_int(vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers, ff_dim=ff_dim)
        check_dropout(dropout)
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.embed_tokens = nn.Embedding(vocab_size, hidden_dim)
        self.layers = nn.ModuleList(
            TransformerLayer(make_attention(), hidden_dim, ff_dim, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be a 2-D integer tensor [batch, seq_len]")
        if input_ids.shape[1] < 1:
            raise ValueError("input_ids must have seq_len >= 1")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.vocab_size})")
        attention_mask = validate_attention_mask(attention_mask, *input_ids.shape)
        hidden_states = self.dropout(self.embed_tokens(input_ids))  # [batch, seq_len, hidden_dim]
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return self.norm(hidden_states)


class BSBRLayer(TransformerLayer):
    """Pre-norm layer with :class:`bsbr.BSBRAttention` (arguments as in :class:`BSBRModel`)."""

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, ff_dim: int, dropout: float = 0.0,
                 compression_factor: int | None = None):
        super().__init__(BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor),
                         hidden_dim, ff_dim, dropout)


class BSBRModel(TransformerModel):
    """Language-model trunk with BSBR attention in every layer.

    Args:
        vocab_size, hidden_dim, num_layers, num_heads, ff_dim: sizes (positive integers).
        chunk_size: BSBR chunk length in tokens.
        dropout: in [0, 1).
        compression_factor: None or a divisor of ``head_dim**2`` (see :class:`bsbr.BSBRAttention`).
    ``forward(input_ids[batch, seq_len], attention_mask=None) -> hidden states [batch, seq_len, hidden_dim]``.
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, chunk_size: int,
                 ff_dim: int, dropout: float = 0.0, compression_factor: int | None = None):
        # Validate once up front so errors name the argument before any layer is built.
        BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor)
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         lambda: BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor))


class StandardModel(TransformerModel):
    """Language-model trunk with standard causal softmax attention (:class:`bsbr.baselines.StandardAttention`)."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.0):
        StandardAttention(hidden_dim, num_heads, dropout)
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         lambda: StandardAttention(hidden_dim, num_heads, dropout))
