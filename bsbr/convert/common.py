"""What every family's converter does around its attention class: swap the modules, wire padding, caches and
``generate`` (:func:`replace_attention`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from bsbr.convert.cache import prepare_cache_for_generation, prepare_model_inputs

__all__ = ["replace_attention"]


def replace_attention(model: nn.Module, source_cls: type, converted_cls: type, base_model_cls: type,
                      build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Replace every ``source_cls`` module of ``model`` by ``build(module)`` (a ``converted_cls``), in place.

    Every replacement is built before the model is touched, so an error (a bad argument raised by ``build``) leaves
    it unchanged. Then each ``base_model_cls`` module (e.g. ``LlamaModel``) gets the forward pre-hook
    :func:`bsbr.convert.cache.prepare_model_inputs` (padding mask and :class:`bsbr.convert.cache.BSBRCache` checks),
    ``generate`` is made to use a ``BSBRCache`` (the instance's ``_prepare_cache_for_generation`` becomes
    :func:`bsbr.convert.cache.prepare_cache_for_generation`, as a partial: it survives deepcopy and pickling), and
    ``model.config.use_cache`` is set to False (plain forwards build no cache).

    Returns:
        ``model``.
    Raises:
        ValueError: ``model`` already holds a ``converted_cls`` or no ``source_cls`` (and whatever ``build`` raises).
    """
    if any(isinstance(m, converted_cls) for m in model.modules()):
        raise ValueError("model is already converted to BSBR; convert the original model (e.g. a deep copy of it)")
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, source_cls)]
    if not targets:
        raise ValueError(f"no {source_cls.__name__} module found in {type(model).__name__}")
    replacements = [(name, build(module)) for name, module in targets]
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    for module in model.modules():
        if isinstance(module, base_model_cls):
            module.register_forward_pre_hook(prepare_model_inputs, with_kwargs=True)
    if hasattr(model, "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = functools.partial(prepare_cache_for_generation, model)
    model.config.use_cache = False
    return model
