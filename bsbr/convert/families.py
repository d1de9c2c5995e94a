"""Model families a pretrained transformers model converts from, and the conversion itself.

:data:`FAMILIES` maps ``config.model_type`` to the family's converted attention class (a
:class:`bsbr.convert.base.BSBRConvertedAttention` subclass naming the HF attention it replaces and the base model
that gets the padding/cache pre-hook): the one place a model family is dispatched. :func:`convert_to_bsbr` swaps
every such attention of a model for the converted one, keeping all pretrained weights.
"""

from __future__ import annotations

import copy
import functools
import itertools

from torch import nn

from bsbr.convert.base import BSBRConvertedAttention
from bsbr.convert.cache import prepare_cache_for_generation, prepare_model_inputs
from bsbr.convert.gpt2 import BSBRGPT2Attention
from bsbr.convert.llama import BSBRLlamaAttention

__all__ = ["FAMILIES", "SUPPORTED_FAMILIES", "convert_to_bsbr", "converted_copy", "replace_attention"]

#: ``config.model_type`` -> converted attention class: the one place a model family is dispatched.
FAMILIES: dict[str, type[BSBRConvertedAttention]] = {"llama": BSBRLlamaAttention, "gpt2": BSBRGPT2Attention}
SUPPORTED_FAMILIES = tuple(FAMILIES)  # config.model_type values convert_to_bsbr accepts


def replace_attention(model: nn.Module, converted_cls: type[BSBRConvertedAttention], **arguments) -> nn.Module:
    """Replace every ``converted_cls.source_class`` module of ``model`` by ``converted_cls(module, **arguments)``,
    in place.

    Every replacement is built before the model is touched, so an error (a bad argument raised by the constructor)
    leaves it unchanged. Then each ``converted_cls.base_model_class`` module (e.g. ``LlamaModel``) gets the forward
    pre-hook :func:`bsbr.convert.cache.prepare_model_inputs` (padding mask, positions from it and their bound
    ``converted_cls.max_positions_field``, and :class:`bsbr.convert.cache.BSBRCache` checks), ``generate`` is made
    to use a ``BSBRCache`` (the instance's ``_prepare_cache_for_generation`` becomes
    :func:`bsbr.convert.cache.prepare_cache_for_generation`, as a partial: it survives deepcopy and pickling), and
    ``model.config.use_cache`` is set to False (plain forwards build no cache).

    Returns:
        ``model``.
    Raises:
        ValueError: ``model`` already holds a converted attention, or no ``source_class`` module (and whatever the
            constructor raises).
    """
    if any(isinstance(m, BSBRConvertedAttention) for m in model.modules()):
        raise ValueError("model is already converted to BSBR; convert the original model (e.g. a deep copy of it)")
    source_cls = converted_cls.source_class
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, source_cls)]
    if not targets:
        raise ValueError(f"no {source_cls.__name__} module found in {type(model).__name__}")
    replacements = [(name, converted_cls(module, **arguments)) for name, module in targets]
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    hook = functools.partial(prepare_model_inputs, max_positions_field=converted_cls.max_positions_field)
    for module in model.modules():
        if isinstance(module, converted_cls.base_model_class):
            module.register_forward_pre_hook(hook, with_kwargs=True)
    if hasattr(model, "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = functools.partial(prepare_cache_for_generation, model)
    model.config.use_cache = False
    return model


def convert_to_bsbr(model, chunk_size: int, compression_factor: int | None = None, retrieval: str = "seed",
                    **options):
    """Convert a pretrained transformers model to BSBR attention in place, keeping all its weights.

    Args:
        model: a transformers model whose ``config.model_type`` is in :data:`SUPPORTED_FAMILIES`: ``"llama"``
            (``LlamaForCausalLM`` such as SmolLM2, ``LlamaModel``; see :mod:`bsbr.convert.llama`) or ``"gpt2"``
            (``GPT2LMHeadModel``, ``GPT2Model``; see :mod:`bsbr.convert.gpt2`).
        chunk_size: tokens per chunk (integer >= 1).
        compression_factor: None, or a positive integer: chunk-state compression; it divides ``head_dim**2`` for
            ``"seed"`` (a learned linear map of ``K_jᵀV_j``) and ``head_dim`` for ``"normalized"`` (fewer learned
            features).
        retrieval: a key of :data:`bsbr.convert.retrieval.RETRIEVAL_MODES`: ``"seed"`` (the seed's formula: local
            softmax output plus the unnormalised retrieved term), ``"normalized"`` (local softmax and retrieved part
            share one normaliser, :mod:`bsbr.normalized`), ``"terraced"`` (exact own + previous chunk + sinks, older
            chunks in GQA-shared states under the same normaliser, :mod:`bsbr.terraced`) or ``"blocks"`` (exact
            attention on the top-k blocks each query selects, :mod:`bsbr.blocks`); ``options`` go to the mode
            (e.g. ``sink_size``; the mode's class in :mod:`bsbr.convert.retrieval` lists them).
    Returns:
        ``model`` itself (same object and type), converted: ``model(input_ids).logits`` runs BSBR attention;
        ``model.config.use_cache`` is False; ``generate`` uses a :class:`bsbr.convert.cache.BSBRCache`.
    Raises:
        ValueError: unsupported model family (the message lists the supported ones), bad ``chunk_size``,
            ``compression_factor``, ``retrieval`` or options, a config BSBR cannot reproduce, or a model that is
            already converted; the model is then left unchanged.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"convert_to_bsbr supports the model families {list(FAMILIES)} (config.model_type); got "
            f"{type(model).__name__} with model_type={model_type!r}"
        )
    return replace_attention(model, FAMILIES[model_type], chunk_size=chunk_size,
                             compression_factor=compression_factor, retrieval=retrieval, **options)


def converted_copy(model, chunk_size: int, compression_factor: int | None = None, retrieval: str = "seed",
                   **options):
    """A BSBR-converted copy of ``model`` that shares every pretrained tensor with it; ``model`` is unchanged.

    Only the module tree is copied (``copy.deepcopy`` with the parameters and buffers pre-seeded in its memo), so
    the copy allocates just its new modules (``meta_q_proj``, ``meta_k_proj``, ``compression``, ``normalized``).
    Comparing several chunk sizes against the original thus costs one set of weights. The shared tensors are the same
    objects: training the copy's pretrained weights would change the original's too.

    Args and Raises: as :func:`convert_to_bsbr`.
    Returns:
        the converted copy (same type as ``model``).
    """
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return convert_to_bsbr(copy.deepcopy(model, memo), chunk_size, compression_factor, retrieval, **options)
