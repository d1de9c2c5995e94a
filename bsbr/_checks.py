"""Argument checks shared by the layers, models and converters: each raises ValueError naming the argument."""

from __future__ import annotations


def check_positive_int(**values) -> None:
    """Raise ValueError unless every keyword value is an ``int`` >= 1 (``bool`` is rejected)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_heads(hidden_dim, num_heads) -> None:
    """``hidden_dim`` and ``num_heads`` positive integers with ``hidden_dim % num_heads == 0``."""
    check_positive_int(hidden_dim=hidden_dim, num_heads=num_heads)
    if hidden_dim % num_heads:
        raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")


def check_dropout(dropout) -> None:
    """``dropout`` a probability in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
