"""The Llama family (e.g. SmolLM2) of BSBR-converted attention: its projections and RoPE.

Each decoder layer's ``self_attn`` (``LlamaAttention``) is replaced by :class:`BSBRLlamaAttention`, which holds the
*same* ``q_proj/k_proj/v_proj/o_proj`` modules and computes BSBR attention (the retrieval mode's, see
:mod:`bsbr.convert.retrieval`) on the model's own RoPE'd queries and keys and its values, with grouped-query
attention (GQA). Everything else (cache, padding, the retrieval switch) is the family-agnostic
:class:`bsbr.convert.base.BSBRConvertedAttention`. Two new projections are initialised from the layer's own ones:

* meta-key ``h_j = meta_k_proj(mean of chunk j's hidden states)``, one per key/value head, no RoPE
  (``meta_k_proj`` starts as a copy of ``k_proj``);
* meta-query ``r_i = meta_q_proj(mean of chunk i-1's hidden states)``, one per query head, no RoPE
  (``meta_q_proj`` starts as a copy of ``q_proj``); chunk 0 retrieves nothing.

With ``chunk_size >= seq_len`` there is one chunk and the layer is exactly the pretrained causal attention.

Positions: RoPE from the model's ``position_ids``. With a padded ``attention_mask`` and no ``position_ids``, the
converted model counts them from each row's first real token (as ``generate`` does), so each row's real tokens get
the positions they would have alone (:func:`bsbr.convert.cache.prepare_model_inputs`).

Source: BSBR ("Block Sparse attention with Block Retrieval", this project); Llama: Touvron et al. 2023
(arXiv 2302.13971); RoPE: Su et al. 2021 (arXiv 2104.09864); GQA: Ainslie et al. 2023 (arXiv 2305.13245).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaModel, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

from bsbr.convert.base import BSBRConvertedAttention

__all__ = ["BSBRLlamaAttention"]


def _copy_linear(linear: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` with a copy (not a view) of ``linear``'s weight and bias, same device and dtype."""
    weight = linear.weight
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        copy.weight.copy_(weight)
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    return copy


class BSBRLlamaAttention(BSBRConvertedAttention):
    """BSBR attention in place of a ``LlamaAttention``, reusing its projections (same modules, same tensors).

    Args: as :class:`bsbr.convert.base.BSBRConvertedAttention` (``attention``: the pretrained ``LlamaAttention``).

    Modules: ``q_proj, k_proj, v_proj, o_proj`` (the pretrained ones), ``meta_q_proj`` (copy of ``q_proj``:
    ``hidden -> num_heads*head_dim``), ``meta_k_proj`` (copy of ``k_proj``: ``hidden -> num_key_value_heads*head_dim``),
    the retrieval mode's (``compression``; ``normalized``).

    ``forward(hidden_states [batch, seq_len, hidden], position_embeddings=(cos, sin), ...)``: see the base class.

    Raises (besides the base class's):
        ValueError: an attention scaling other than ``1/sqrt(head_dim)``; in forward, no ``position_embeddings``.
    """

    source_class = LlamaAttention
    base_model_class = LlamaModel

    def _adopt(self, attention: LlamaAttention) -> None:
        config = attention.config
        self.config = config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = attention.num_key_value_groups
        if abs(attention.scaling - self.head_dim**-0.5) > 1e-12:
            raise ValueError(f"attention scaling {attention.scaling} is not 1/sqrt(head_dim); BSBR uses "
                             "1/sqrt(head_dim)")
        self.attention_dropout = attention.attention_dropout
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.meta_q_proj = _copy_linear(attention.q_proj)
        self.meta_k_proj = _copy_linear(attention.k_proj)

    def _project(self, hidden_states, position_embeddings=None):
        """RoPE'd ``query [b, heads, n, d]``, ``key, value [b, kv_heads, n, d]`` of ``hidden_states [b, n, hidden]``;
        ``position_embeddings = (cos, sin)`` as the decoder layer passes them."""
        if position_embeddings is None:
            raise ValueError("position_embeddings=(cos, sin) is required (the decoder layer passes the model's RoPE)")
        batch, seq_len, _ = hidden_states.shape
        hidden_shape = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [batch, heads, seq_len, head_dim]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [batch, kv_heads, seq_len, head_dim]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [batch, kv_heads, seq_len, head_dim]
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        return query, key, value

    def rope_inverse_frequencies(self) -> torch.Tensor:
        """``[head_dim / 2]`` float32: the RoPE inverse frequencies of this model (what ``positions="compact"`` of
        block retrieval rotates keys and queries with).

        Raises:
            ValueError: a RoPE whose rotation is not a fixed rotation per position (``"dynamic"`` frequencies, or an
                attention scaling other than 1 as in YaRN/LongRoPE): moving a key by a shift would not be exact.
        """
        rotary = LlamaRotaryEmbedding(self.config)
        if rotary.rope_type == "dynamic" or abs(rotary.attention_scaling - 1.0) > 1e-12:
            raise ValueError(f"positions='compact' needs a fixed RoPE rotation; this model's rope_type "
                             f"{rotary.rope_type!r} (attention scaling {rotary.attention_scaling}) is not supported")
        return rotary.inv_freq.to(self.q_proj.weight.device)

    def _output(self, attention: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attention)
