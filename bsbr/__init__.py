"""BSBR: Block Sparse attention with Block Retrieval, its baselines, and pretrained-model conversion."""

from bsbr.attention import BSBRAttention, bsbr_attention
from bsbr.baselines.standard import StandardAttention
from bsbr.model import BSBRLayer, BSBRModel, StandardModel, TransformerLayer, TransformerModel
from bsbr.registry import available_models, build_model

__all__ = [
    "BSBRAttention",
    "BSBRLayer",
    "BSBRModel",
    "StandardAttention",
    "StandardModel",
    "TransformerLayer",
    "TransformerModel",
    "available_models",
    "bsbr_attention",
    "build_model",
]
__version__ = "0.2.0"
