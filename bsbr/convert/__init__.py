"""Pretrained Hugging Face models (Llama and GPT-2 families) -> BSBR attention (:func:`convert_to_bsbr`): model
loading, incremental decoding (:class:`BSBRCache`), calibration (attention transfer, then LoRA distillation) and
safetensors checkpoints of what conversion and LoRA add.

Where things live: :mod:`bsbr.convert.base` (the family-agnostic converted attention layer),
:mod:`bsbr.convert.llama` / :mod:`bsbr.convert.gpt2` (a family's projections and positions),
:mod:`bsbr.convert.families` (``FAMILIES``: model type -> layer class, and the conversion),
:mod:`bsbr.convert.retrieval` (``RETRIEVAL_MODES``: ``retrieval=`` name -> mode), :mod:`bsbr.convert.cache`
(``BSBRCache``, padding, positions, ``generate``), :mod:`bsbr.convert.checkpoint`, :mod:`bsbr.convert.calibrate`,
:mod:`bsbr.convert.lora` (the second calibration stage: LoRA distillation), :mod:`bsbr.convert.loading`; the
normalised retrieval's maths is :mod:`bsbr.normalized`.
"""

from __future__ import annotations

from bsbr.convert.base import BSBRConvertedAttention, set_retrieval
from bsbr.convert.cache import BSBRCache
from bsbr.convert.calibrate import calibrate_attention_transfer, capture_attention_io
from bsbr.convert.checkpoint import base_model_fingerprint, load_conversion, load_meta_router, save_conversion
from bsbr.convert.families import FAMILIES, SUPPORTED_FAMILIES, convert_to_bsbr, converted_copy
from bsbr.convert.gpt2 import BSBRGPT2Attention
from bsbr.convert.llama import BSBRLlamaAttention
from bsbr.convert.loading import default_model_path, dequantize_gguf, load_pretrained
from bsbr.convert.lora import (LORA_TARGET_MODULES, add_lora, load_lora, lora_parameters, lora_settings, save_lora,
                               train_lora_distillation)
from bsbr.convert.retrieval import RETRIEVAL_MODES, chunk_local_attention

__all__ = [
    "FAMILIES",
    "LORA_TARGET_MODULES",
    "RETRIEVAL_MODES",
    "SUPPORTED_FAMILIES",
    "BSBRCache",
    "BSBRConvertedAttention",
    "BSBRGPT2Attention",
    "BSBRLlamaAttention",
    "add_lora",
    "base_model_fingerprint",
    "calibrate_attention_transfer",
    "capture_attention_io",
    "chunk_local_attention",
    "convert_to_bsbr",
    "converted_copy",
    "default_model_path",
    "dequantize_gguf",
    "load_conversion",
    "load_lora",
    "load_meta_router",
    "load_pretrained",
    "lora_parameters",
    "lora_settings",
    "save_conversion",
    "save_lora",
    "set_retrieval",
    "train_lora_distillation",
]
