"""Pretrained Hugging Face models (Llama and GPT-2 families) -> BSBR attention (:func:`convert_to_bsbr`): model
loading, incremental decoding (:class:`BSBRCache`), calibration by attention transfer and safetensors checkpoints of
what conversion adds."""

from __future__ import annotations

import copy
import itertools

from bsbr.convert.cache import BSBRCache
from bsbr.convert.calibrate import calibrate_attention_transfer, capture_attention_io
from bsbr.convert.checkpoint import load_conversion, save_conversion
from bsbr.convert.gpt2 import BSBRGPT2Attention, convert_gpt2
from bsbr.convert.llama import BSBRLlamaAttention, chunk_local_attention, convert_llama, set_retrieval
from bsbr.convert.loading import default_model_path, load_pretrained

__all__ = [
    "SUPPORTED_FAMILIES",
    "BSBRCache",
    "BSBRGPT2Attention",
    "BSBRLlamaAttention",
    "calibrate_attention_transfer",
    "capture_attention_io",
    "chunk_local_attention",
    "convert_to_bsbr",
    "converted_copy",
    "default_model_path",
    "load_conversion",
    "load_pretrained",
    "save_conversion",
    "set_retrieval",
]

_CONVERTERS = {"llama": convert_llama, "gpt2": convert_gpt2}
SUPPORTED_FAMILIES = tuple(_CONVERTERS)  # config.model_type values convert_to_bsbr accepts


def convert_to_bsbr(model, chunk_size: int, compression_factor: int | None = None, retrieval: str = "seed",
                    **normalized_options):
    """Convert a pretrained transformers model to BSBR attention in place, keeping all its weights.

    Args:
        model: a transformers model whose ``config.model_type`` is in :data:`SUPPORTED_FAMILIES`: ``"llama"``
            (``LlamaForCausalLM`` such as SmolLM2; see :mod:`bsbr.convert.llama`) or ``"gpt2"`` (``GPT2LMHeadModel``;
            see :mod:`bsbr.convert.gpt2`).
        chunk_size: tokens per chunk (integer >= 1).
        compression_factor: None, or a positive integer: chunk-state compression; it divides ``head_dim**2`` for
            ``"seed"`` (a learned linear map of ``K_jᵀV_j``) and ``head_dim`` for ``"normalized"`` (fewer learned features).
        retrieval: ``"seed"`` (the seed's formula: local softmax output plus the unnormalised retrieved term) or
            ``"normalized"`` (Llama family: local softmax and retrieved part share one normaliser, see
            :mod:`bsbr.convert.normalized`); ``normalized_options`` go to the latter.
    Returns:
        ``model`` itself (same object and type), converted: ``model(input_ids).logits`` runs BSBR attention.
    Raises:
        ValueError: unsupported model family (the message lists the supported ones), bad ``chunk_size``,
            ``compression_factor``, ``retrieval`` or options, or a model that is already converted.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _CONVERTERS:
        raise ValueError(
            f"convert_to_bsbr supports the model families {list(SUPPORTED_FAMILIES)} (config.model_type); got "
            f"{type(model).__name__} with model_type={model_type!r}"
        )
    return _CONVERTERS[model_type](model, chunk_size, compression_factor, retrieval, **normalized_options)


def converted_copy(model, chunk_size: int, compression_factor: int | None = None, retrieval: str = "seed",
                   **normalized_options):
    """A BSBR-converted copy of ``model`` that shares every pretrained tensor with it; ``model`` is unchanged.

    Only the module tree is copied (``copy.deepcopy`` with the parameters and buffers pre-seeded in its memo), so
    the copy allocates just its new modules (``meta_q_proj``, ``meta_k_proj``, ``compression``). Comparing several
    chunk sizes against the original thus costs one set of weights. The shared tensors are the same objects:
    training the copy's pretrained weights would change the original's too.

    Args and Raises: as :func:`convert_to_bsbr`.
    Returns:
        the converted copy (same type as ``model``).
    """
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return convert_to_bsbr(copy.deepcopy(model, memo), chunk_size, compression_factor, retrieval, **normalized_options)
