"""Architectures by name, so experiments loop over them: one :class:`Architecture` record each in
:data:`ARCHITECTURES`, read by :func:`build_model`, :func:`build_attention`, the benchmark CLI, training, the
pipeline's ``null = all`` and the contract test (``tests/test_contract.py``).

Adding an architecture is one record here (and its layer file, an :class:`bsbr.layer.AttentionLayer`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from bsbr.attention import BSBRAttention
from bsbr.baselines import (DeltaNet, GAU, HopfieldAttention, LinearAttention, SlidingWindowAttention,
                            StandardAttention)
from bsbr.model import AttentionModel, BSBRModel, StandardModel

__all__ = ["ARCHITECTURES", "COMMON_CONFIG", "Architecture", "available_models", "build_attention", "build_model",
           "get_architecture"]

#: Keys every architecture builds from; architecture-specific settings have defaults.
COMMON_CONFIG = ("vocab_size", "hidden_dim", "num_layers", "num_heads", "ff_dim", "dropout")

#: Floating dtypes every layer's forward supports on CPU (checked against float32 by tests/test_contract.py).
_ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    Attributes:
        name: its name in :func:`available_models`, ``params.yaml`` and the reports.
        attention: the attention layer class, built as ``attention(hidden_dim, num_heads, dropout=..., **settings)``.
        model: a dedicated trunk class (``BSBRModel``, ``StandardModel``) taking the common config and the settings,
            or None: :class:`bsbr.model.AttentionModel` around ``attention``.
        defaults: the architecture's own settings with their defaults, e.g. ``{"chunk_size": 128,
            "compression_factor": None}`` (read-only: copy before changing).
        span_setting: the setting that plays chunk/window size (``"chunk_size"``, ``"window_size"``), or None.
        dtypes: floating dtypes its forward supports on CPU.
    Raises:
        ValueError: ``span_setting`` not among ``defaults``, or a default the classes do not take.
    """

    name: str
    attention: type[nn.Module]
    model: type[nn.Module] | None
    defaults: dict = field(hash=False)
    span_setting: str | None
    dtypes: tuple

    def __post_init__(self):
        if self.span_setting is not None and self.span_setting not in self.defaults:
            raise ValueError(f"span_setting {self.span_setting!r} of {self.name!r} must be one of its defaults "
                             f"{sorted(self.defaults)}")
        taken = set(inspect.signature(self.attention).parameters)
        if self.model is not None:
            taken &= set(inspect.signature(self.model).parameters)
        unknown = sorted(set(self.defaults) - taken)
        if unknown:
            raise ValueError(f"defaults {unknown} of {self.name!r} are not arguments of its classes")

    def accepted_config(self) -> set[str]:
        """Keys :func:`build_model` accepts for this architecture (the common config and its settings)."""
        if self.model is not None:
            return set(inspect.signature(self.model).parameters)
        return set(COMMON_CONFIG) | set(inspect.signature(self.attention).parameters)


ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (
    # retrieval="blocks" (exact block retrieval) is a setting of bsbr, not an eighth architecture: its block settings
    # are None with the default retrieval="state" (tests/test_contract.py runs the contract on both retrievals)
    Architecture("bsbr", BSBRAttention, BSBRModel, {"chunk_size": 128, "compression_factor": None,
                                                    "retrieval": "state", "block_size": None, "top_k": None,
                                                    "summary": None, "sink_size": None}, "chunk_size", _ALL_DTYPES),
    Architecture("standard", StandardAttention, StandardModel, {}, None, _ALL_DTYPES),
    Architecture("linear", LinearAttention, None, {"chunk_size": 64}, "chunk_size", _ALL_DTYPES),
    Architecture("delta_net", DeltaNet, None, {"chunk_size": 64}, "chunk_size", _ALL_DTYPES),
    Architecture("sliding_window", SlidingWindowAttention, None, {"window_size": 128}, "window_size", _ALL_DTYPES),
    Architecture("hopfield", HopfieldAttention, None, {"beta": None, "num_updates": 1}, None, _ALL_DTYPES),
    Architecture("gau", GAU, None, {"chunk_size": 128, "qk_dim": 128, "expansion": 2}, "chunk_size", _ALL_DTYPES),
)}


def available_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    """The :class:`Architecture` record of ``name``. Raises ValueError naming ``name`` and the choices."""
    if name not in ARCHITECTURES:
        raise ValueError(f"name must be one of {available_models()}, got {name!r}")
    return ARCHITECTURES[name]


def build_model(name: str, **config) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`available_models`.
        **config: ``vocab_size, hidden_dim, num_layers, num_heads, ff_dim`` (required), ``dropout`` (default 0.0),
            plus the architecture's own settings, defaults in ``get_architecture(name).defaults`` (e.g. ``bsbr``:
            ``chunk_size=128, compression_factor=None, retrieval="state"`` (``retrieval="blocks"`` with
            ``block_size``, ``top_k``, ``summary``, ``sink_size``: exact block retrieval); ``hopfield``:
            ``beta=None`` meaning 1/sqrt(head_dim)).
    Returns:
        a module with ``forward(input_ids[batch, seq_len], attention_mask=None) -> [batch, seq_len, hidden_dim]``.
    Raises:
        ValueError: unknown ``name``, a missing common key, or a key the architecture does not take.
    """
    arch = get_architecture(name)
    missing = [key for key in COMMON_CONFIG if key != "dropout" and key not in config]
    if missing:
        raise ValueError(f"config is missing {missing} (every model needs {list(COMMON_CONFIG)})")
    accepted = arch.accepted_config()
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"model {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
    if arch.model is not None:
        return arch.model(**{**arch.defaults, **config})
    return AttentionModel(arch.attention, **{**arch.defaults, **config})


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
    arch = get_architecture(name)
    unknown = sorted(set(settings) - set(arch.defaults))
    if unknown:
        raise ValueError(f"attention {name!r} does not take {unknown}; its settings are {sorted(arch.defaults)}")
    return arch.attention(hidden_dim, num_heads, dropout=dropout, **{**arch.defaults, **settings})
