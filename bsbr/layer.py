"""The plumbing every attention layer needs, written once (as fla's ``layers/utils.py``): padding masks, running
each row's real tokens alone, streaming-state checks, and :class:`AttentionLayer`, the base of the seven attention
layers (:class:`bsbr.BSBRAttention` and the baselines in :mod:`bsbr.baselines`).

A layer brings only its maths: :meth:`AttentionLayer._attend` on unpadded rows and
:meth:`AttentionLayer._empty_state`; the base owns ``forward`` (input, mask and state checks, padding).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_dropout, check_heads, check_hidden_states, check_positive_int, check_state

__all__ = ["AttentionLayer", "attend_packed", "pack_padding", "validate_attention_mask"]


def validate_attention_mask(attention_mask, batch_size: int, seq_len: int) -> torch.Tensor | None:
    """Check a padding mask and return it as a bool tensor (True = real token), or None.

    Args:
        attention_mask: ``[batch, seq_len]`` bool or integer tensor, 1/True = real token, 0/False = padding.
    Raises:
        TypeError: not a tensor. ValueError: wrong shape, dtype (floating point) or values other than 0 and 1.
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


def pack_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Permutation per row that moves the real tokens to the front, in order (padding after them).

    Args:
        attention_mask: ``[batch, seq_len]`` bool, True = real token.
    Returns:
        ``[batch, seq_len]`` int64 ``order``: ``x.gather(1, order)`` packs a row; ``order.argsort(1)`` undoes it.
    """
    return torch.argsort((~attention_mask).to(torch.int8), dim=1, stable=True)


def attend_packed(attend, hidden_states: torch.Tensor, mask: torch.Tensor | None, state, return_state: bool,
                  empty_state):
    """Run ``attend(hidden_states, state, return_state)`` on each row's real tokens only.

    ``attend`` is an attention core without padding support; ``mask``: ``[batch, seq_len]`` bool (True = real) or
    None. Real tokens are moved to the front of their row (:func:`pack_padding`), so every row is processed as
    its sequence alone; outputs are moved back and zeroed at padded positions (zero gradient there too). In a
    streaming call (``state`` given or ``return_state``) every row must have the same number of real tokens;
    ``empty_state()`` is the state returned when a streaming call has none. Returns what ``attend`` returns.
    Raises ValueError (naming ``attention_mask``) for unequal real-token counts in a streaming call.
    """
    if mask is None or bool(mask.all()):
        return attend(hidden_states, state, return_state)
    batch, seq_len, width = hidden_states.shape
    order = pack_padding(mask)
    # Padded positions are zeroed first: whatever they hold (even inf/NaN) never reaches a real token.
    hidden_states = hidden_states.masked_fill(~mask[:, :, None], 0.0)
    packed = hidden_states.gather(1, order[:, :, None].expand(-1, -1, width))  # [batch, seq_len, width], real first
    new_state = None
    if state is not None or return_state:
        counts = mask.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError("attention_mask must give every row the same number of real tokens in a streaming "
                             f"call (state or return_state): the state is batch-uniform; got {counts.tolist()}")
        real = int(counts[0])
        if real == 0:  # nothing joins the sequence
            output = hidden_states.new_zeros(batch, seq_len, width)
            return (output, state if state is not None else empty_state()) if return_state else output
        result = attend(packed[:, :real], state, return_state)
        packed_out, new_state = result if return_state else (result, None)
        packed_out = F.pad(packed_out, (0, 0, 0, seq_len - real))
    else:
        packed_out = attend(packed, None, False)
    output = packed_out.gather(1, order.argsort(1)[:, :, None].expand(-1, -1, packed_out.shape[-1]))
    output = output.masked_fill(~mask[:, :, None], 0.0)  # padded positions: zeros (zero gradient there too)
    return (output, new_state) if return_state else output


class AttentionLayer(nn.Module):
    """Base of the causal attention layers: ``forward`` and its checks written once; a layer adds its maths.

    A subclass sets ``state_type`` (the dataclass of its streaming state, with ``batch_size``, ``owner`` (the
    producing module's ``id``) and ``num_tokens`` fields and an ``nbytes()`` method), implements :meth:`_attend`
    and :meth:`_empty_state`, and may name settings in ``span_settings`` (re-checked as positive integers on every
    call, e.g. ``chunk_size`` after a user changed it) and ``state_settings`` (settings the state records, e.g.
    ``window_size``, that must still match). Its
    ``__init__`` calls ``super().__init__(hidden_dim, num_heads, dropout)`` (which validates them and sets
    ``hidden_dim, num_heads, head_dim, dropout``) and builds its parameters; :meth:`_add_projections`,
    :meth:`split_heads` and :meth:`merge_heads` serve layers with per-head projections (GAU has none and uses
    none of them).

    Args:
        hidden_dim: model width, divisible by ``num_heads`` (``head_dim = hidden_dim // num_heads``).
        num_heads: attention heads.
        dropout: dropout probability, in [0, 1) (where it applies: each layer's docstring).
    Raises:
        ValueError: invalid arguments, naming them.
    """

    #: the dataclass of the layer's streaming state
    state_type: ClassVar[type]
    #: settings re-checked as positive integers at every call
    span_settings: ClassVar[tuple[str, ...]] = ()
    #: settings recorded in the state that must equal the layer's when the state is passed back
    state_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        check_heads(hidden_dim, num_heads)
        check_dropout(dropout)
        self.hidden_dim, self.num_heads, self.head_dim = hidden_dim, num_heads, hidden_dim // num_heads
        self.dropout = dropout

    def _add_projections(self, *names: str) -> None:
        """``nn.Linear(hidden_dim, hidden_dim)`` attributes ``names``, created (and randomly initialised) in order."""
        for name in names:
            setattr(self, name, nn.Linear(self.hidden_dim, self.hidden_dim))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, L, hidden_dim]`` -> ``[batch, heads, L, head_dim]`` (a view)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, heads, L, head_dim]`` -> ``[batch, L, hidden_dim]``."""
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.hidden_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, state=None,
                return_state: bool = False):
        """Causal attention over ``hidden_states``, optionally continuing a streaming ``state``.

        Args:
            hidden_states: ``[batch, seq_len, hidden_dim]``, ``seq_len >= 1``, the parameters' dtype.
            attention_mask: optional ``[batch, seq_len]`` bool or integer 0/1, 1 = real token, 0 = padding (left,
                right or anywhere). Each row's real tokens are processed as that sequence alone (chunks and windows
                counted from its first real token); outputs at padded positions are zeros.
            state: a ``state_type`` this module returned (``return_state=True``): the new tokens continue that
                sequence. Feeding a sequence in any pieces gives the outputs of one full forward.
            return_state: also return the state after these tokens.
        Returns:
            ``[batch, seq_len, hidden_dim]``, or ``(output, state)`` with ``return_state=True``.
        Raises:
            TypeError: ``hidden_states`` not a tensor of the parameters' dtype, ``attention_mask`` not a tensor.
            ValueError: ``hidden_states`` not ``[batch, seq_len >= 1, hidden_dim]``; a malformed ``attention_mask``
                (shape, float dtype, values other than 0/1) or, in a streaming call (``state`` given or
                ``return_state``), rows with different numbers of real tokens (the state is batch-uniform); a
                ``state`` of another type, module or batch size, or one made before a setting changed.
        """
        batch, seq_len = check_hidden_states(hidden_states, self.hidden_dim, next(self.parameters()).dtype)
        mask = validate_attention_mask(attention_mask, batch, seq_len)
        if self.span_settings:
            check_positive_int(**{name: getattr(self, name) for name in self.span_settings})
        if state is not None:
            self._check_state(state, batch, hidden_states)
        return attend_packed(self._attend, hidden_states, mask, state, return_state,
                             lambda: self._empty_state(batch, hidden_states))

    def _check_state(self, state, batch_size: int, like: torch.Tensor) -> None:
        """Raise ValueError naming ``state`` unless this call can continue it (type, owner, batch, dtype/device of
        ``like``, ``state_settings``)."""
        check_state(state, self.state_type, batch_size, id(self), like)
        for name in self.state_settings:
            if getattr(state, name) != getattr(self, name):
                raise ValueError(f"state was built with {name}={getattr(state, name)}, this module uses "
                                 f"{name}={getattr(self, name)}; start a fresh sequence (state=None)")

    def _attend(self, hidden_states: torch.Tensor, state, return_state: bool):
        """The layer's maths on unpadded rows: ``[batch, L, hidden_dim]`` continuing ``state`` (None: a fresh
        sequence) -> ``[batch, L, hidden_dim]``, or ``(output, new state)`` with ``return_state``."""
        raise NotImplementedError

    def _empty_state(self, batch_size: int, like: torch.Tensor):
        """The ``state_type`` after zero tokens (tensors of ``like``'s dtype and device)."""
        raise NotImplementedError

