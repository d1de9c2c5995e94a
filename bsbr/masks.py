"""Attention masks that make a pretrained model attend like a restricted one, for reference variants.

transformers (5.x) uses a 4-D boolean ``attention_mask`` as given, so the original model with :func:`band_mask` runs as
sliding-window attention (with attention sinks) — the training-free baselines the converted models are compared with.
"""

from __future__ import annotations

import torch

from bsbr._checks import check_int_at_least, check_positive_int

__all__ = ["band_mask"]


def band_mask(seq_len: int, window: int, sinks: int = 0) -> torch.Tensor:
    """A sliding window with attention sinks (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453) as a boolean mask.

    Token ``t`` may attend to tokens ``t - window + 1 … t`` and to the first ``sinks`` tokens of the sequence
    (never to a later token).

    Args:
        seq_len: tokens (>= 1).
        window: tokens each query sees, itself included (>= 1).
        sinks: first tokens every query also sees (>= 0).
    Returns:
        ``[1, 1, seq_len, seq_len]`` bool, True = may attend (query rows, key columns).
    Raises:
        ValueError: an argument out of range, named.
    """
    check_positive_int(seq_len=seq_len, window=window)
    check_int_at_least(0, sinks=sinks)
    position = torch.arange(seq_len)
    offset = position[:, None] - position[None, :]  # [seq_len, seq_len] query position minus key position
    allowed = (offset >= 0) & ((offset < window) | (position[None, :] < sinks))
    return allowed[None, None]
