"""The GPT-2 family of BSBR-converted attention: its fused ``c_attn``/``c_proj`` projections, no rotation.

Each block's ``attn`` (``GPT2Attention``) is replaced by :class:`BSBRGPT2Attention`, which holds the *same*
``c_attn`` and ``c_proj`` modules and computes BSBR attention (the retrieval mode's, :mod:`bsbr.convert.retrieval`:
``"seed"`` or ``"normalized"``) on the model's own queries, keys and values; everything else (cache, padding, the
retrieval switch) is the family-agnostic :class:`bsbr.convert.base.BSBRConvertedAttention`. GPT-2 has no rotary
embedding: the learned position embeddings ``wpe`` are added to the token embeddings by ``GPT2Model`` before the
first block and are left untouched.

``c_attn`` is a ``transformers.pytorch_utils.Conv1D``: ``y = x @ weight + bias`` with ``weight`` of shape
``[hidden, 3*hidden]`` (the transpose of an ``nn.Linear`` weight); its output splits into q, k, v in that order,
each ``[..., heads*head_dim]`` with the heads contiguous. Two new ``nn.Linear(hidden, hidden)`` projections are
initialised from those slices (``Linear.weight = Conv1D.weight[:, slice].T``, ``Linear.bias = Conv1D.bias[slice]``):

* meta-key ``h_j = meta_k_proj(mean of chunk j's hidden states)``, one per head (starts as the k projection);
* meta-query ``r_i = meta_q_proj(mean of chunk i-1's hidden states)``, one per head (starts as the q projection);
  chunk 0 retrieves nothing.

With ``chunk_size >= seq_len`` there is one chunk and the layer is exactly the pretrained causal attention.

BSBR scales scores by ``1/sqrt(head_dim)``, so configs that scale differently are rejected
(``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True``), as is cross-attention
(``add_cross_attention=True``). ``reorder_and_upcast_attn`` only changes the numerics of the eager path (fp32 scores)
and is accepted; BSBR computes in the model's dtype.

Incremental decoding and padding (:mod:`bsbr.convert.cache`): a :class:`bsbr.convert.cache.BSBRCache` (``cache=``,
``use_cache=True``, or made by ``generate``) continues a sequence; a 2-D ``attention_mask`` processes each row's real
tokens as that sequence alone. GPT-2's positions are absolute (``wpe``): with a padded ``attention_mask`` and no
``position_ids``, the converted model counts them from each row's first real token (``(attention_mask.cumsum(-1) -
1).clamp_min(0)``, as ``generate`` does), so each row's real tokens get the positions they would have alone.

Source: GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; BSBR ("Block Sparse
attention with Block Retrieval", this project); chunk states ``F_j = K_jᵀV_j`` are the linear-attention state of
Katharopoulos et al. 2020 (arXiv 2006.16236).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Model
from transformers.pytorch_utils import Conv1D

from bsbr.convert.base import BSBRConvertedAttention

__all__ = ["BSBRGPT2Attention"]


def _linear_from_conv1d(conv: Conv1D, start: int, stop: int) -> nn.Linear:
    """A new ``nn.Linear(in, stop - start)`` computing output features ``start:stop`` of ``conv``.

    A copy (not a view): ``weight = conv.weight[:, start:stop].T`` (``[stop - start, in]``),
    ``bias = conv.bias[start:stop]``.
    """
    weight = conv.weight  # [in, out]
    linear = nn.Linear(weight.shape[0], stop - start, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight[:, start:stop].t())
        linear.bias.copy_(conv.bias[start:stop])
    return linear


def _check_supported(attention: GPT2Attention) -> None:
    """ValueError, naming the config field, for GPT-2 variants BSBR cannot reproduce exactly."""
    if attention.is_cross_attention:
        raise ValueError("cross-attention (config.add_cross_attention=True, is_cross_attention) is not supported; "
                         "BSBR converts causal self-attention only")
    if not attention.scale_attn_weights:
        raise ValueError("config.scale_attn_weights=False is not supported: BSBR scales scores by 1/sqrt(head_dim)")
    if attention.scale_attn_by_inverse_layer_idx:
        raise ValueError("config.scale_attn_by_inverse_layer_idx=True is not supported: BSBR scales scores by "
                         "1/sqrt(head_dim) in every layer")
    if abs(attention.scaling - attention.head_dim**-0.5) > 1e-12:
        raise ValueError(f"attention scaling {attention.scaling} is not 1/sqrt(head_dim); BSBR uses 1/sqrt(head_dim)")


class BSBRGPT2Attention(BSBRConvertedAttention):
    """BSBR attention in place of a ``GPT2Attention``, reusing its ``c_attn``/``c_proj`` (same modules, same tensors).

    Args: as :class:`bsbr.convert.base.BSBRConvertedAttention` (``attention``: the pretrained self-attention
    ``GPT2Attention``).

    Modules: ``c_attn`` (Conv1D ``hidden -> 3*hidden``, q|k|v) and ``c_proj`` (the pretrained ones), ``meta_q_proj``
    and ``meta_k_proj`` (``nn.Linear(hidden, hidden)``, copies of the q and k slices of ``c_attn``),
    ``attn_dropout``/``resid_dropout`` (the pretrained dropout modules: attention-probability dropout with
    ``attn_pdrop`` in training, output dropout after ``c_proj``), the retrieval mode's (``compression``;
    ``normalized``). ``num_key_value_heads = num_heads`` (no GQA).

    ``forward(hidden_states [batch, seq_len, hidden], cache=None, attention_mask=None, ...)``: see the base class.

    Raises (besides the base class's):
        ValueError: a config BSBR cannot reproduce (``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=
            True``, cross-attention); in forward, ``position_embeddings`` (GPT-2's positions are added before the
            first block); in the converted model's forward, an input reaching past ``config.n_positions`` positions
            (cache + input tokens, or ``position_ids``), before any work.
    """

    source_class = GPT2Attention
    base_model_class = GPT2Model
    max_positions_field = "n_positions"  # wpe has n_positions rows: a longer input would be a bare IndexError

    def _adopt(self, attention: GPT2Attention) -> None:
        _check_supported(attention)
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.num_key_value_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.c_attn, self.c_proj = attention.c_attn, attention.c_proj
        self.attn_dropout, self.resid_dropout = attention.attn_dropout, attention.resid_dropout
        self.attention_dropout = attention.attn_dropout.p
        self.meta_q_proj = _linear_from_conv1d(attention.c_attn, 0, self.embed_dim)
        self.meta_k_proj = _linear_from_conv1d(attention.c_attn, self.embed_dim, 2 * self.embed_dim)

    def _project(self, hidden_states, position_embeddings=None):
        """``query, key, value [b, heads, n, d]`` of ``hidden_states [b, n, hidden]`` (positions are already in
        ``hidden_states``)."""
        if position_embeddings is not None:
            raise ValueError("position_embeddings must be None for GPT-2: its learned positions (wpe) are added to "
                             "the token embeddings before the first block")
        batch, seq_len, _ = hidden_states.shape
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)  # 3 x [batch, seq_len, hidden]
        head_shape = (batch, seq_len, self.num_heads, self.head_dim)
        query = query.view(head_shape).transpose(1, 2)  # [batch, heads, seq_len, head_dim]
        key = key.view(head_shape).transpose(1, 2)  # [batch, heads, seq_len, head_dim]
        value = value.view(head_shape).transpose(1, 2)  # [batch, heads, seq_len, head_dim]
        return query, key, value

    def _output(self, attention: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(attention))
