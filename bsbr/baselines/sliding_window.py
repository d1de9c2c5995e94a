"""Causal sliding-window attention (Longformer's local attention, Beltagy et al. 2020, arXiv 2004.05150; the causal
window of Mistral 7B, Jiang et al. 2023, arXiv 2310.06825): each token sees itself and the ``window_size - 1``
tokens before it, with standard multi-head softmax attention (scale ``1/sqrt(head_dim)``) over that window.

Nothing of size ``seq_len × seq_len`` is built: queries are split into blocks of ``window_size`` tokens and block
``i`` attends to the keys of blocks ``i - 1`` and ``i`` under a fixed ``[window_size, 2·window_size]`` band mask,
all blocks in one ``scaled_dot_product_attention`` call: O(seq_len·window_size·head_dim) time and
O(seq_len·window_size) memory per head. A call of at most ``window_size`` new tokens (decoding) attends to its
``<= 2·window_size - 1`` keys directly, without block padding.
Decoding keeps a rolling cache of the last ``window_size - 1`` keys and
values (:class:`WindowCache`), so a step costs O(window_size·head_dim) per head whatever the position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bsbr._checks import check_positive_int
from bsbr.layer import AttentionLayer

__all__ = ["SlidingWindowAttention", "WindowCache", "sliding_window_attention"]

#: Query blocks per fused call: bounds the temporaries to ~GROUP·heads·window·(2·window + head_dim) values.
_GROUP = 32


@dataclass
class WindowCache:
    """Rolling KV cache of a :class:`SlidingWindowAttention` after ``num_tokens`` tokens.

    ``key, value``: ``[batch, heads, min(num_tokens, window_size - 1), head_dim]`` — the last keys and values, the
    only ones a later token can see. Size: ``2 · element_size · batch · heads · min(num_tokens, window_size - 1) ·
    head_dim`` bytes, bounded whatever the position. ``window_size``, ``batch_size`` and ``owner`` (``id`` of the
    producing module) are checked when the cache is passed back.
    """

    window_size: int
    batch_size: int
    owner: int
    num_tokens: int
    key: torch.Tensor
    value: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.key, self.value))


def sliding_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window_size: int,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Blocked causal sliding-window softmax attention, scale ``1/sqrt(head_dim)``.

    Args:
        query: ``[batch, heads, L, d]`` — the last ``L`` positions of the key sequence.
        key: ``[batch, heads, c + L, d]`` with ``0 <= c <= window_size - 1`` cached positions first.
        value: ``[batch, heads, c + L, d_v]`` (``d_v`` may differ from ``d``).
        window_size: query ``t`` (key position ``c + t``) sees key positions ``c + t - window_size + 1 .. c + t``
            (those that exist).
        dropout_p: dropout on the attention weights.
    Returns:
        ``[batch, heads, L, d_v]``.
    Raises:
        ValueError: ``window_size < 1``, ``query``/``key``/``value`` not 4-D or of inconsistent shapes, or more than
            ``window_size - 1`` cached positions.
    """
    check_positive_int(window_size=window_size)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq_len, head_dim]")
    if key.shape[:2] != query.shape[:2] or key.shape[3] != query.shape[3]:
        raise ValueError(f"key must be [batch, heads, c + L, d] like query {list(query.shape)}, got {list(key.shape)}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must be [batch, heads, c + L, d_v] with the batch, heads and positions of key "
                         f"{list(key.shape)}, got {list(value.shape)}")
    batch, heads, length, _ = query.shape
    head_dim = value.shape[3]  # d_v: the output's head size
    cached = key.shape[2] - length
    w = window_size
    if not 0 <= cached <= w - 1:
        raise ValueError(f"key must hold the L query positions plus 0..window_size-1={w - 1} cached ones, got {cached}")
    if length <= w:  # one block (decoding, short calls): all c + L <= 2w - 1 keys directly, no padding
        mask = None
        if length > 1 or cached + length > w:
            offset = (cached + torch.arange(length, device=query.device)[:, None]
                      - torch.arange(cached + length, device=query.device)[None, :])  # query - key position
            mask = (offset >= 0) & (offset < w)  # [L, c + L]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)
    device, grad = query.device, torch.is_grad_enabled()
    rows = torch.arange(w, device=device)[:, None]
    cols = torch.arange(2 * w, device=device)[None, :]
    band = (cols > rows) & (cols <= rows + w)  # [w, 2w]: local query r (key position w + r) sees r + 1 .. r + w
    full = length // w  # whole query blocks; block j >= 1 sees the 2w keys c + (j-1)·w .. c + (j+1)·w - 1
    rest = length - full * w
    # Block 0: its c + w keys directly (query t at key position c + t sees c + t - w + 1 .. c + t).
    offset = cached + rows - torch.arange(cached + w, device=device)[None, :]
    first = F.scaled_dot_product_attention(query[:, :, :w], key[:, :, : cached + w], value[:, :, : cached + w],
                                           attn_mask=(offset >= 0) & (offset < w), dropout_p=dropout_p)
    tail = None
    if rest:  # a partial last block: its `rest` queries against the previous block and themselves
        tail = F.scaled_dot_product_attention(query[:, :, full * w :], key[:, :, cached + full * w - w :],
                                              value[:, :, cached + full * w - w :], attn_mask=band[:rest, : w + rest],
                                              dropout_p=dropout_p)
    # Whole blocks 1 .. full-1 in groups of _GROUP: [blocks, heads, w, d] queries against [blocks, heads, 2w, d]
    # overlapping key/value windows, both strided views of the token-major sequence (unfold: no copies).
    output = None if grad else query.new_empty(batch, length, heads, head_dim)  # token-major, written once
    row_pieces = []
    for row in range(batch):
        q_row = query[row].transpose(0, 1)  # [L, heads, d]
        pieces = [first[row].transpose(0, 1)]
        if full > 1:
            k_win, v_win = (t[row].transpose(0, 1)[cached : cached + full * w].unfold(0, 2 * w, w)
                            for t in (key, value))  # [full - 1, heads, d, 2w]
            for start in range(0, full - 1, _GROUP):
                stop = min(start + _GROUP, full - 1)
                q = q_row[(start + 1) * w : (stop + 1) * w].unflatten(0, (stop - start, w)).transpose(1, 2)
                out = F.scaled_dot_product_attention(q, k_win[start:stop].transpose(2, 3),
                                                     v_win[start:stop].transpose(2, 3), attn_mask=band,
                                                     dropout_p=dropout_p)  # [blocks, heads, w, d]
                if grad:
                    pieces.append(out.transpose(1, 2).reshape((stop - start) * w, heads, head_dim))
                else:
                    output[row, (start + 1) * w : (stop + 1) * w].view(stop - start, w, heads, head_dim).copy_(
                        out.transpose(1, 2))
        if tail is not None:
            pieces.append(tail[row].transpose(0, 1))
        if grad:
            row_pieces.append(torch.cat(pieces))  # [L, heads, d]
        else:
            output[row, :w].copy_(pieces[0])
            if tail is not None:
                output[row, full * w :].copy_(pieces[-1])
    if grad:
        output = torch.stack(row_pieces) if batch > 1 else row_pieces[0][None]
    return output.transpose(1, 2)  # [batch, heads, L, d], a view of token-major [batch, L, heads, d]


class SlidingWindowAttention(AttentionLayer):
    """Causal multi-head sliding-window attention with ``q_proj, k_proj, v_proj, out_proj``
    (``nn.Linear(hidden_dim, hidden_dim)``); see the module docstring for the window semantics.

    Args:
        hidden_dim: model width, divisible by ``num_heads``.
        num_heads: attention heads; ``head_dim = hidden_dim // num_heads``, scale ``1/sqrt(head_dim)``.
        dropout: dropout on the attention weights during training, in [0, 1).
        window_size: tokens each token sees, itself included (>= 1); ``window_size >= seq_len`` is standard causal
            attention, ``window_size = 1`` lets each token see only itself.
    ``forward(hidden_states, attention_mask=None, state=None, return_state=False)`` as
    :meth:`bsbr.layer.AttentionLayer.forward` (the window counts real tokens only); the streaming state is a
    :class:`WindowCache`, which must come from a module with the same ``window_size``.

    Raises:
        ValueError: invalid arguments (see :meth:`forward` for its own).
    """

    state_type = WindowCache
    span_settings = state_settings = ("window_size",)

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, window_size: int = 128):
        super().__init__(hidden_dim, num_heads, dropout)
        check_positive_int(window_size=window_size)
        self.window_size = window_size
        self._add_projections("q_proj", "k_proj", "v_proj", "out_proj")

    def _empty_state(self, batch: int, like: torch.Tensor) -> WindowCache:
        none = like.new_zeros(batch, self.num_heads, 0, self.head_dim)
        return WindowCache(self.window_size, batch, id(self), 0, none, none.clone())

    def _attend(self, hidden_states: torch.Tensor, state: WindowCache | None, return_state: bool):
        batch, length, _ = hidden_states.shape
        q, k, v = (self.split_heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        seen = 0 if state is None else state.num_tokens
        if state is not None and state.key.shape[2]:
            k, v = torch.cat([state.key, k], dim=2), torch.cat([state.value, v], dim=2)  # [batch, heads, c + L, d]
        out = sliding_window_attention(q, k, v, self.window_size, self.dropout if self.training else 0.0)
        out = self.out_proj(self.merge_heads(out))
        if not return_state:
            return out
        keep = min(k.shape[2], self.window_size - 1)
        # clone: the cache must not keep the whole call's keys alive through a view
        tail_k, tail_v = k[:, :, k.shape[2] - keep:].clone(), v[:, :, v.shape[2] - keep:].clone()
        return out, WindowCache(self.window_size, batch, id(self), seen + length, tail_k, tail_v)
