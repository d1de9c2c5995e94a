"""Argument checks shared by the layers, models and converters: each raises ValueError naming the argument."""

from __future__ import annotations

import math


def check_int_at_least(minimum: int, **values) -> None:
    """Raise ValueError unless every keyword value is an ``int`` >= ``minimum`` (``bool`` is rejected)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_positive_int(**values) -> None:
    """Raise ValueError unless every keyword value is an ``int`` >= 1 (``bool`` is rejected)."""
    check_int_at_least(1, **values)


def check_positive_number(**values) -> None:
    """Raise ValueError unless every keyword value is a finite ``int``/``float`` > 0 (``bool`` is rejected)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def check_heads(hidden_dim, num_heads) -> None:
    """``hidden_dim`` and ``num_heads`` positive integers with ``hidden_dim % num_heads == 0``."""
    check_positive_int(hidden_dim=hidden_dim, num_heads=num_heads)
    if hidden_dim % num_heads:
        raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")


def check_dropout(dropout) -> None:
    """``dropout`` a probability in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def check_hidden_states(hidden_states, hidden_dim: int, dtype) -> tuple[int, int]:
    """``hidden_states`` a floating ``[batch, seq_len >= 1, hidden_dim]`` tensor of the layer's parameter ``dtype``.

    Returns ``(batch, seq_len)``. Raises TypeError (not a tensor, wrong dtype) or ValueError (shape).
    """
    import torch

    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be 3-D [batch, seq_len, hidden_dim], got shape {list(hidden_states.shape)}")
    batch, seq_len, width = hidden_states.shape
    if width != hidden_dim:
        raise ValueError(f"hidden_states last dimension must be hidden_dim={hidden_dim}, got {width}")
    if seq_len < 1:
        raise ValueError("hidden_states must have seq_len >= 1")
    if hidden_states.dtype != dtype:
        raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the layer's parameters are {dtype}; "
                        "cast one of them (e.g. layer.to(hidden_states.dtype))")
    return batch, seq_len


def check_per_head_qkv(q, k, v) -> None:
    """Per-head operator inputs: ``q, k`` 4-D ``[batch, heads, seq_len >= 1, d_k]`` of one shape, ``v``
    ``[batch, heads, seq_len, d_v]``. Raises ValueError naming the tensor otherwise."""
    import torch

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq_len, head_dim]")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q and k must share a shape and v its first three dimensions; got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[2] < 1:
        raise ValueError("q, k, v must hold at least one token (seq_len >= 1)")


def check_state(state, expected_type: type, batch_size: int, owner: int | None, like=None) -> None:
    """A streaming ``state`` passed back to a layer: an ``expected_type`` (a dataclass with ``batch_size`` and
    ``owner`` fields) for ``batch_size`` rows, produced by the module whose ``id`` is ``owner`` (None: any), whose
    tensors have the dtype and device of the tensor ``like`` (None: not checked).

    Raises ValueError naming ``state`` otherwise.
    """
    import dataclasses

    import torch

    if not isinstance(state, expected_type):
        raise ValueError(f"state must be a {expected_type.__name__} returned with return_state=True, "
                         f"got {type(state).__name__}")
    if state.batch_size != batch_size:
        raise ValueError(f"state holds batch size {state.batch_size} but the input has batch size {batch_size}")
    if owner is not None and state.owner != owner:
        raise ValueError("state was produced by a different module; pass the state this module returned")
    if like is not None:
        for field in dataclasses.fields(state):
            value = getattr(state, field.name)
            if isinstance(value, torch.Tensor) and (value.dtype != like.dtype or value.device != like.device):
                raise ValueError(f"state.{field.name} is {value.dtype} on {value.device} but the input is "
                                 f"{like.dtype} on {like.device}; start a fresh sequence (state=None) after .to()")
