"""BSBR: Block Sparse attention with Block Retrieval, its baselines, and pretrained-model conversion."""

from bsbr.attention import BSBRAttention, BSBRState, bsbr_attention
from bsbr.baselines import DeltaNet, GAU, HopfieldAttention, LinearAttention, SlidingWindowAttention
from bsbr.baselines.standard import KVCache, StandardAttention
from bsbr.layer import AttentionLayer
from bsbr.model import (AttentionModel, BSBRForCausalLM, BSBRLayer, BSBRModel, CausalLM, CausalLMOutput,
                        StandardModel, TransformerLayer, TransformerModel)
from bsbr.registry import Architecture, available_models, build_attention, build_model, get_architecture

__all__ = [
    "Architecture",
    "AttentionLayer",
    "AttentionModel",
    "BSBRAttention",
    "BSBRForCausalLM",
    "BSBRLayer",
    "BSBRModel",
    "BSBRState",
    "CausalLM",
    "CausalLMOutput",
    "DeltaNet",
    "GAU",
    "HopfieldAttention",
    "KVCache",
    "LinearAttention",
    "SlidingWindowAttention",
    "StandardAttention",
    "StandardModel",
    "TransformerLayer",
    "TransformerModel",
    "available_models",
    "bsbr_attention",
    "build_attention",
    "build_model",
    "get_architecture",
]
__version__ = "0.2.0"
