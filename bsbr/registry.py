"""Models by name, so experiments loop over architectures: ``build_model(name, **config)``."""

from __future__ import annotations

import inspect

from torch import nn

from bsbr.attention import BSBRAttention
from bsbr.baselines import (DeltaNet, GAU, HopfieldAttention, LinearAttention, SlidingWindowAttention,
                            StandardAttention)
from bsbr.model import AttentionModel, BSBRModel, StandardModel

__all__ = ["COMMON_CONFIG", "available_models", "build_attention", "build_model"]

#: Keys every architecture builds from; architecture-specific settings have defaults.
COMMON_CONFIG = ("vocab_size", "hidden_dim", "num_layers", "num_heads", "ff_dim", "dropout")

# name -> (class, defaults for its architecture-specific settings)
_MODELS: dict[str, tuple[type[nn.Module], dict]] = {
    "bsbr": (BSBRModel, {"chunk_size": 128, "compression_factor": None}),
    "standard": (StandardModel, {}),
}


# name -> attention layer class of the models in _MODELS
_MODEL_ATTENTION: dict[str, type[nn.Module]] = {"bsbr": BSBRAttention, "standard": StandardAttention}

# name -> (attention class of an AttentionModel, defaults for its architecture-specific settings)
_ATTENTION_MODELS: dict[str, tuple[type[nn.Module], dict]] = {
    "linear": (LinearAttention, {"chunk_size": 64}),
    "delta_net": (DeltaNet, {"chunk_size": 64}),
    "sliding_window": (SlidingWindowAttention, {"window_size": 128}),
    "hopfield": (HopfieldAttention, {"beta": None, "num_updates": 1}),
    "gau": (GAU, {"chunk_size": 128, "qk_dim": 128, "expansion": 2}),
}


def available_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted({*_MODELS, *_ATTENTION_MODELS})


def build_model(name: str, **config) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`available_models`.
        **config: ``vocab_size, hidden_dim, num_layers, num_heads, ff_dim`` (required), ``dropout`` (default 0.0),
            plus the architecture's own settings: ``bsbr``: ``chunk_size=128``, ``compression_factor=None``;
            ``linear``, ``delta_net``: ``chunk_size=64``; ``sliding_window``: ``window_size=128``; ``hopfield``:
            ``beta=None`` (1/sqrt(head_dim)), ``num_updates=1``; ``gau``: ``chunk_size=128, qk_dim=128,
            expansion=2``; ``standard``: none.
    Returns:
        a module with ``forward(input_ids[batch, seq_len], attention_mask=None) -> [batch, seq_len, hidden_dim]``.
    Raises:
        ValueError: unknown ``name``, a missing common key, or a key the architecture does not take.
    """
    if name not in available_models():
        raise ValueError(f"name must be one of {available_models()}, got {name!r}")
    missing = [key for key in COMMON_CONFIG if key != "dropout" and key not in config]
    if missing:
        raise ValueError(f"config is missing {missing} (every model needs {list(COMMON_CONFIG)})")
    if name in _MODELS:
        cls, defaults = _MODELS[name]
        accepted = set(inspect.signature(cls).parameters)
    else:
        attention_cls, defaults = _ATTENTION_MODELS[name]
        accepted = set(COMMON_CONFIG) | set(inspect.signature(attention_cls).parameters)
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"model {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
    if name in _MODELS:
        return cls(**{**defaults, **config})
    return AttentionModel(attention_cls, **{**defaults, **config})


def build_attention(name: str, hidden_dim: int, num_heads: int, dropout: float = 0.0, **settings) -> nn.Module:
    """The attention layer that :func:`build_model` puts in every layer of model ``name``, alone.

    Args:
        name: one of :func:`available_models`.
        hidden_dim, num_heads, dropout: as in :func:`build_model`.
        **settings: the architecture's own settings (defaults as in :func:`build_model`).
    Returns:
        a module with ``forward(hidden_states [batch, seq_len, hidden_dim], attention_mask=None, state=None,
        return_state=False) -> [batch, seq_len, hidden_dim]`` (and the state with ``return_state=True``).
    Raises:
        ValueError: unknown ``name`` or a setting the architecture does not take (and the layer's own errors).
    """
    if name not in available_models():
        raise ValueError(f"name must be one of {available_models()}, got {name!r}")
    if name in _MODELS:
        cls, defaults = _MODEL_ATTENTION[name], _MODELS[name][1]
    else:
        cls, defaults = _ATTENTION_MODELS[name]
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"attention {name!r} does not take {unknown}; its settings are {sorted(defaults)}")
    return cls(hidden_dim, num_heads, dropout=dropout, **{**defaults, **settings})
