"""Small tensor and argument helpers shared by the attention maths, the converter and the analysis code."""

from __future__ import annotations

import torch

__all__ = ["check_sink_size", "repeat_kv"]


def repeat_kv(x: torch.Tensor, num_heads: int, name: str = "x") -> torch.Tensor:
    """Expand grouped key/value heads to the query heads (grouped-query attention), in HF ``repeat_kv`` order.

    Query head ``i`` uses key/value head ``i // (num_heads // kv_heads)`` (Ainslie et al. 2023, GQA, arXiv 2305.13245;
    the order of ``transformers.models.llama.modeling_llama.repeat_kv``).

    Args:
        x: ``[batch, kv_heads, ...]``.
        num_heads: query heads; ``kv_heads`` must divide it.
        name: the argument's name in the error message.
    Returns:
        ``[batch, num_heads, ...]``: ``x`` itself when ``kv_heads == num_heads``, else a new tensor.
    Raises:
        ValueError: ``kv_heads`` does not divide ``num_heads`` (the message names ``name``).
    """
    kv_heads = x.shape[1]
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"{name} has {kv_heads} heads, which must divide the {num_heads} query heads")
    if kv_heads == num_heads:
        return x
    return x.repeat_interleave(num_heads // kv_heads, dim=1)


def check_sink_size(sink_size, chunk_size: int) -> None:
    """Raise ValueError unless ``sink_size`` (exact attention-sink tokens, Xiao et al. 2023, arXiv 2309.17453) is an
    ``int`` in ``[0, chunk_size]`` (``bool`` is rejected)."""
    if isinstance(sink_size, bool) or not isinstance(sink_size, int) or not 0 <= sink_size <= chunk_size:
        raise ValueError(f"sink_size must be an integer in [0, chunk_size={chunk_size}], got {sink_size!r}")
