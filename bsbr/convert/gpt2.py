"""Convert a pretrained GPT-2-family model to BSBR attention, keeping every pretrained weight.

Each block's ``attn`` (``GPT2Attention``) is replaced by :class:`BSBRGPT2Attention`, which holds the *same*
``c_attn`` and ``c_proj`` modules and computes BSBR attention (:func:`bsbr.attention.bsbr_attention`) on the model's
own queries, keys and values. GPT-2 has no rotary embedding: the learned position embeddings ``wpe`` are added to the
token embeddings by ``GPT2Model`` before the first block and are left untouched.

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
tokens as that sequence alone. GPT-2's positions are absolute (``wpe``): with left padding pass
``position_ids = attention_mask.cumsum(-1) - 1`` (clamped at 0), as ``generate`` does, so each row's real tokens
get the positions they would have alone.

Source: GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; BSBR ("Block Sparse
attention with Block Retrieval", this project); chunk states ``F_j = K_jᵀV_j`` are the linear-attention state of
Katharopoulos et al. 2020 (arXiv 2006.16236).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Model
from transformers.pytorch_utils import Conv1D

from bsbr._checks import check_positive_int
from bsbr.attention import StateCompression, bsbr_attention, chunk_mean
from bsbr.convert.cache import attend_cached, check_cache, packed_attention, seed_step
from bsbr.convert.common import replace_attention
from bsbr.convert.llama import _padding_mask, chunk_local_attention

__all__ = ["BSBRGPT2Attention", "convert_gpt2"]


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


class BSBRGPT2Attention(nn.Module):
    """BSBR attention in place of a ``GPT2Attention``, reusing its ``c_attn``/``c_proj`` (same modules, same tensors).

    Args:
        attention: the pretrained (self-attention) ``GPT2Attention`` to replace.
        chunk_size: tokens per chunk (>= 1).
        compression_factor: None, or a positive integer dividing ``head_dim**2`` (a new
            :class:`bsbr.attention.StateCompression`, shared by the heads of this layer).

    Modules: ``c_attn`` (Conv1D ``hidden -> 3*hidden``, q|k|v) and ``c_proj`` (the pretrained ones), ``meta_q_proj``
    and ``meta_k_proj`` (``nn.Linear(hidden, hidden)``, copies of the q and k slices of ``c_attn``), ``compression``
    (or None), ``attn_dropout``/``resid_dropout`` (the pretrained dropout modules: attention-probability dropout
    with ``attn_pdrop`` in training, output dropout after ``c_proj``). Attribute ``retrieval`` (default True):
    False drops the retrieval term, leaving causal attention within each chunk only (a reference baseline).

    ``forward(hidden_states [batch, seq_len, hidden], cache=None, attention_mask=None, ...)`` returns
    ``(output [batch, seq_len, hidden], None)`` like ``GPT2Attention`` (no attention weights). ``cache``: a
    :class:`bsbr.convert.cache.BSBRCache`, continued in place. Padding reaches the layer as the keyword
    ``bsbr_attention_mask`` (``[batch, past + seq_len]`` bool, from the model's pre-hook); outputs at padded
    positions are zeros.

    Raises:
        TypeError: ``attention`` not a ``GPT2Attention``.
        ValueError: bad ``chunk_size``/``compression_factor``; a config BSBR cannot reproduce
            (``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True``, cross-attention); in forward,
            ``encoder_hidden_states``, or a 4-D mask of the wrong shape.
        TypeError: in forward, a cache that is not a ``BSBRCache``.
        NotImplementedError: in forward, called directly with a 4-D mask that is not plain causal (padding goes
            through the model's 2-D ``attention_mask``).
    """

    def __init__(self, attention: GPT2Attention, chunk_size: int, compression_factor: int | None = None):
        super().__init__()
        check_positive_int(chunk_size=chunk_size)
        if not isinstance(attention, GPT2Attention):
            raise TypeError(f"attention must be a GPT2Attention, got {type(attention).__name__}")
        _check_supported(attention)
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.is_causal = True
        self.chunk_size = chunk_size
        self.retrieval = True

        self.c_attn, self.c_proj = attention.c_attn, attention.c_proj
        self.attn_dropout, self.resid_dropout = attention.attn_dropout, attention.resid_dropout
        self.meta_q_proj = _linear_from_conv1d(attention.c_attn, 0, self.embed_dim)
        self.meta_k_proj = _linear_from_conv1d(attention.c_attn, self.embed_dim, 2 * self.embed_dim)
        weight = attention.c_attn.weight
        self.compression = (None if compression_factor is None
                            else StateCompression(self.head_dim, compression_factor).to(weight.device, weight.dtype))
        # A new module starts in training mode; take the replaced one's (GPT-2 has dropout, so this matters).
        self.train(attention.training)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, retrieval={self.retrieval}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        past_key_values=None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states must be None: BSBRGPT2Attention is causal self-attention only")
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            check_cache(cache)
        batch, seq_len, _ = hidden_states.shape
        padding = _padding_mask(kwargs, attention_mask, seq_len)

        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)  # 3 x [batch, seq_len, hidden]
        head_shape = (batch, seq_len, self.num_heads, self.head_dim)
        query = query.view(head_shape).transpose(1, 2)  # [batch, heads, seq_len, head_dim]
        key = key.view(head_shape).transpose(1, 2)  # [batch, heads, seq_len, head_dim]
        value = value.view(head_shape).transpose(1, 2)  # [batch, heads, seq_len, head_dim]
        dropout_p = self.attn_dropout.p if self.training else 0.0

        if cache is not None:  # continue each row's BSBR state
            new_mask = None if padding is None else padding[:, -seq_len:]
            output = attend_cached(self, cache.layer(self.layer_idx), hidden_states, query, key, value, new_mask,
                                   dropout_p)
        elif padding is not None:  # each row's real tokens alone, moved to the front
            output = packed_attention(lambda h, q, k, v: self._attend(h, q, k, v, dropout_p), padding,
                                      hidden_states, query, key, value)
        else:
            output = self._attend(hidden_states, query, key, value, dropout_p)
        output = output.transpose(1, 2).reshape(batch, seq_len, self.embed_dim)  # [batch, seq_len, hidden]
        return self.resid_dropout(self.c_proj(output)), None

    attend_step = seed_step  # one row's cached step (bsbr.convert.cache.attend_cached)

    def meta_from_means(self, pooled: torch.Tensor):
        """Meta rows from chunk means ``pooled [b, rows, hidden]``: ``meta_query, meta_key [b, heads, rows, d]``
        (row ``j`` from chunk ``j``: ``h_j``, and the meta-query of chunk ``j+1``)."""
        batch, rows, _ = pooled.shape
        chunk_shape = (batch, rows, self.num_heads, self.head_dim)
        meta_key = self.meta_k_proj(pooled).view(chunk_shape).transpose(1, 2)  # [batch, heads, rows, head_dim]
        meta_query = self.meta_q_proj(pooled).view(chunk_shape).transpose(1, 2)  # [batch, heads, rows, head_dim]
        return meta_query, meta_key

    def _attend(self, hidden_states, query, key, value, dropout_p: float) -> torch.Tensor:
        """Full causal BSBR (or own-chunk) attention of unpadded rows: ``[batch, heads, seq_len, head_dim]``."""
        if not self.retrieval:
            return chunk_local_attention(query, key, value, self.chunk_size, dropout_p)
        meta_query, meta_key = self.meta_from_means(chunk_mean(hidden_states, self.chunk_size))  # [b, h, chunks, d]
        return bsbr_attention(query, key, value, meta_query, meta_key, self.chunk_size,
                              compression=self.compression, dropout_p=dropout_p)


def convert_gpt2(model: nn.Module, chunk_size: int, compression_factor: int | None = None, retrieval: str = "seed",
                 **normalized_options) -> nn.Module:
    """Replace every ``GPT2Attention`` in ``model`` by :class:`BSBRGPT2Attention`, in place; returns ``model``.

    Args:
        model: a GPT-2-family transformers model (``GPT2LMHeadModel``, ``GPT2Model``, ...).
        chunk_size: tokens per chunk (>= 1).
        compression_factor: None or a positive integer dividing ``head_dim**2``.
        retrieval: ``"seed"`` only (the normalised retrieval exists for the Llama family only).
    Returns:
        the same object, converted; ``model.config.use_cache`` is set to False (plain forwards build no cache);
        ``generate`` uses a :class:`bsbr.convert.cache.BSBRCache` (see :func:`bsbr.convert.llama.convert_llama`).
    Raises:
        ValueError: bad ``chunk_size``/``compression_factor``, no ``GPT2Attention`` found, already converted, or a
            config BSBR cannot reproduce (``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True``,
            ``add_cross_attention=True``); the model is left unchanged.
    """
    check_positive_int(chunk_size=chunk_size)
    if retrieval != "seed" or normalized_options:
        raise ValueError(f"retrieval must be 'seed' (without options) for GPT-2 models: the normalized retrieval is "
                         f"implemented for the Llama family only; got retrieval={retrieval!r}")
    return replace_attention(model, GPT2Attention, BSBRGPT2Attention, GPT2Model,
                             lambda attention: BSBRGPT2Attention(attention, chunk_size, compression_factor))
