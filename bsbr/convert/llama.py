"""Convert a pretrained Llama-family model (e.g. SmolLM2) to BSBR attention, keeping every pretrained weight.

Each decoder layer's ``self_attn`` (``LlamaAttention``) is replaced by :class:`BSBRLlamaAttention`, which holds
the *same* ``q_proj/k_proj/v_proj/o_proj`` modules and computes BSBR attention (:func:`bsbr.attention.bsbr_attention`)
on the model's own RoPE'd queries and keys and its values, with grouped-query attention (GQA). Two new projections
are initialised from the layer's own ones:

* meta-key ``h_j = meta_k_proj(mean of chunk j's hidden states)``, one per key/value head, no RoPE
  (``meta_k_proj`` starts as a copy of ``k_proj``);
* meta-query ``r_i = meta_q_proj(mean of chunk i-1's hidden states)``, one per query head, no RoPE
  (``meta_q_proj`` starts as a copy of ``q_proj``); chunk 0 retrieves nothing.

With ``chunk_size >= seq_len`` there is one chunk and the layer is exactly the pretrained causal attention.

Incremental decoding and padding (:mod:`bsbr.convert.cache`): a :class:`bsbr.convert.cache.BSBRCache` (``cache=``,
``use_cache=True``, or made by ``generate``) holds BSBR streaming states, so feeding a sequence in pieces gives the
logits of one full forward (RoPE positions: the model's ``position_ids``, by default ``cache.get_seq_length()`` on);
a 2-D ``attention_mask`` (left or right padding) processes each row's real tokens as that sequence alone.

Source: BSBR ("Block Sparse attention with Block Retrieval", this project); chunk states ``F_j = K_jᵀV_j`` are the
linear-attention state of Katharopoulos et al. 2020 (arXiv 2006.16236); Llama: Touvron et al. 2023
(arXiv 2302.13971); RoPE: Su et al. 2021 (arXiv 2104.09864); GQA: Ainslie et al. 2023 (arXiv 2305.13245).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel, apply_rotary_pos_emb

from bsbr._checks import check_positive_int
from bsbr.attention import StateCompression, bsbr_attention, chunk_mean
from bsbr.convert.cache import MASK_KEYWORD, attend_cached, check_cache, packed_attention, seed_step
from bsbr.convert.common import replace_attention

__all__ = ["BSBRLlamaAttention", "convert_llama", "set_retrieval"]


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


def _padding_error() -> NotImplementedError:
    return NotImplementedError(
        "this attention layer got a 4-D attention_mask that is not plain causal (padding): called directly it takes "
        "no padding. BSBRLlamaAttention/BSBRGPT2Attention take padding through the converted model's 2-D "
        "attention_mask (the model hands it to them)."
    )


def _check_causal_mask(attention_mask, seq_len: int) -> None:
    """The mask HF builds for the attention layers must be plain causal (BSBR does its own causal masking).

    ``attention_mask``: None (sdpa skips a plain causal mask), or ``[batch, 1 or heads, seq_len, seq_len]``
    bool (True = attend) or float (0 = attend) tensor.
    """
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f"BSBRLlamaAttention got an attention mask of type {type(attention_mask).__name__}; only the "
            "'sdpa' and 'eager' attention implementations (tensor masks) are supported"
        )
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (seq_len, seq_len):
        raise ValueError(f"expected a [batch, 1, {seq_len}, {seq_len}] causal mask, got {list(attention_mask.shape)}")
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=allowed.device).tril()
    if not torch.equal(allowed, causal.expand_as(allowed)):
        raise _padding_error()


def chunk_local_attention(query, key, value, chunk_size: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal softmax attention restricted to each token's own chunk (BSBR with retrieval switched off).

    A reference baseline, written with an explicit ``[seq_len, seq_len]`` mask.

    Args:
        query: ``[batch, heads, seq_len, head_dim]``; key, value: ``[batch, kv_heads, seq_len, head_dim]`` (GQA).
        chunk_size: tokens per chunk (>= 1).
    Returns:
        ``[batch, heads, seq_len, head_dim]``.
    """
    check_positive_int(chunk_size=chunk_size)
    seq_len = query.shape[2]
    position = torch.arange(seq_len, device=query.device)
    chunk = position // chunk_size
    mask = (chunk[:, None] == chunk[None, :]) & (position[None, :] <= position[:, None])  # [seq_len, seq_len]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                          enable_gqa=key.shape[1] != query.shape[1])


class BSBRLlamaAttention(nn.Module):
    """BSBR attention in place of a ``LlamaAttention``, reusing its projections (same modules, same tensors).

    Args:
        attention: the pretrained ``LlamaAttention`` to replace.
        chunk_size: tokens per chunk (>= 1).
        compression_factor: None, or a positive integer dividing ``head_dim**2`` (a new
            :class:`bsbr.attention.StateCompression`, shared by the heads of this layer).

    Modules: ``q_proj, k_proj, v_proj, o_proj`` (the pretrained ones), ``meta_q_proj`` (copy of ``q_proj``:
    ``hidden -> num_heads*head_dim``), ``meta_k_proj`` (copy of ``k_proj``: ``hidden -> num_key_value_heads*head_dim``),
    ``compression`` (or None). Attribute ``retrieval`` (default True): False drops the retrieval term, leaving causal
    attention within each chunk only (a reference baseline).

    ``forward(hidden_states [batch, seq_len, hidden], position_embeddings=(cos, sin), attention_mask=None,
    cache=None, ...)`` returns ``(output [batch, seq_len, hidden], None)`` like ``LlamaAttention`` (no attention
    weights). ``cache``: a :class:`bsbr.convert.cache.BSBRCache`, continued in place. Padding reaches the layer as
    the keyword ``bsbr_attention_mask`` (``[batch, past + seq_len]`` bool, from the model's pre-hook); outputs at
    padded positions are zeros.

    Raises:
        ValueError: bad ``chunk_size``/``compression_factor``; in forward, a 4-D mask of the wrong shape.
        TypeError: in forward, a cache that is not a ``BSBRCache``.
        NotImplementedError: in forward, called directly with a 4-D mask that is not plain causal (padding goes
            through the model's 2-D ``attention_mask``).
    """

    def __init__(self, attention: LlamaAttention, chunk_size: int, compression_factor: int | None = None):
        super().__init__()
        check_positive_int(chunk_size=chunk_size)
        if not isinstance(attention, LlamaAttention):
            raise TypeError(f"attention must be a LlamaAttention, got {type(attention).__name__}")
        config = attention.config
        self.config = config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = attention.num_key_value_groups
        if abs(attention.scaling - self.head_dim**-0.5) > 1e-12:
            raise ValueError(f"attention scaling {attention.scaling} is not 1/sqrt(head_dim); BSBR uses 1/sqrt(head_dim)")
        self.attention_dropout = attention.attention_dropout
        self.is_causal = True
        self.chunk_size = chunk_size
        self.retrieval = True

        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.meta_q_proj = _copy_linear(attention.q_proj)
        self.meta_k_proj = _copy_linear(attention.k_proj)
        weight = attention.q_proj.weight
        self.compression = (None if compression_factor is None
                            else StateCompression(self.head_dim, compression_factor).to(weight.device, weight.dtype))

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, retrieval={self.retrieval}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if position_embeddings is None:
            raise ValueError("position_embeddings=(cos, sin) is required (the decoder layer passes the model's RoPE)")
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            check_cache(cache)
        batch, seq_len, _ = hidden_states.shape
        padding = _padding_mask(kwargs, attention_mask, seq_len)
        query, key, value = self._project(hidden_states, position_embeddings)
        dropout_p = self.attention_dropout if self.training else 0.0

        if cache is not None:  # continue each row's BSBR state
            new_mask = None if padding is None else padding[:, -seq_len:]
            output = attend_cached(self, cache.layer(self.layer_idx), hidden_states, query, key, value, new_mask,
                                   dropout_p)
        elif padding is not None:  # each row's real tokens alone, moved to the front
            output = packed_attention(lambda h, q, k, v: self._attend(h, q, k, v, dropout_p), padding,
                                      hidden_states, query, key, value)
        else:
            output = self._attend(hidden_states, query, key, value, dropout_p)
        output = output.transpose(1, 2).reshape(batch, seq_len, -1)  # [batch, seq_len, heads*head_dim]
        return self.o_proj(output), None

    def _project(self, hidden_states, position_embeddings):
        """RoPE'd ``query [b, heads, n, d]``, ``key, value [b, kv_heads, n, d]`` of ``hidden_states [b, n, hidden]``."""
        batch, seq_len, _ = hidden_states.shape
        hidden_shape = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [batch, heads, seq_len, head_dim]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [batch, kv_heads, seq_len, head_dim]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [batch, kv_heads, seq_len, head_dim]
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        return query, key, value

    attend_step = seed_step  # one row's cached step (bsbr.convert.cache.attend_cached)

    def meta_from_means(self, pooled: torch.Tensor):
        """Meta rows from chunk means ``pooled [b, rows, hidden]``: ``meta_query [b, heads, rows, d]`` and
        ``meta_key [b, kv_heads, rows, d]`` (row ``j`` from chunk ``j``: ``h_j``, and the meta-query of chunk
        ``j+1``)."""
        batch, rows, _ = pooled.shape
        meta_key = self.meta_k_proj(pooled).view(batch, rows, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        meta_query = self.meta_q_proj(pooled).view(batch, rows, self.num_heads, self.head_dim).transpose(1, 2)
        return meta_query, meta_key

    def _attend(self, hidden_states, query, key, value, dropout_p: float) -> torch.Tensor:
        """Full causal BSBR (or own-chunk) attention of unpadded rows: ``[batch, heads, seq_len, head_dim]``."""
        if not self.retrieval:
            return chunk_local_attention(query, key, value, self.chunk_size, dropout_p)
        meta_query, meta_key = self.meta_from_means(chunk_mean(hidden_states, self.chunk_size))  # [b, *, chunks, d]
        return bsbr_attention(query, key, value, meta_query, meta_key, self.chunk_size,
                              compression=self.compression, dropout_p=dropout_p)


def _padding_mask(kwargs: dict, attention_mask, seq_len: int):
    """The 2-D padding mask (``[batch, past + seq_len]`` bool, or None) of a converted layer's forward.

    Called through the converted base model, the pre-hook :func:`bsbr.convert.cache.prepare_model_inputs` hands it
    over as ``kwargs["bsbr_attention_mask"]`` (the 4-D ``attention_mask`` HF builds from it is then ignored). Called
    directly, the layer takes only a plain causal 4-D mask (``_check_causal_mask``) and no padding.
    """
    if MASK_KEYWORD in kwargs:
        return kwargs.pop(MASK_KEYWORD)
    _check_causal_mask(attention_mask, seq_len)
    return None


#: ``retrieval`` values of :func:`convert_llama`: the seed formula, and the normalised retrieval.
RETRIEVALS = ("seed", "normalized")


def convert_llama(model: nn.Module, chunk_size: int, compression_factor: int | None = None, retrieval: str = "seed",
                  **normalized_options) -> nn.Module:
    """Replace every ``LlamaAttention`` in ``model`` by :class:`BSBRLlamaAttention`, in place; returns ``model``.

    Args:
        model: a Llama-family transformers model (``LlamaForCausalLM``, ``LlamaModel``, ...).
        chunk_size: tokens per chunk (>= 1).
        compression_factor: None or a positive integer: for ``"seed"`` dividing ``head_dim**2`` (a learned linear map
            of each ``K_jᵀV_j``), for ``"normalized"`` dividing ``head_dim`` (``head_dim / compression_factor``
            learned features per half, see :class:`bsbr.convert.normalized.NormalizedBSBRLlamaAttention`).
        retrieval: ``"seed"`` (:func:`bsbr.attention.bsbr_attention`: the local softmax output plus the unnormalised
            ``q·Σ_j w_ij F_j``) or ``"normalized"`` (:class:`bsbr.convert.normalized.NormalizedBSBRLlamaAttention`:
            one normaliser shared by the local softmax and the retrieved part).
        **normalized_options: for ``"normalized"`` only: ``feature_dim``, ``mix_logit``, ``tie_qk``, ``sink_size``
            (see :class:`bsbr.convert.normalized.NormalizedRetrieval`).
    Returns:
        the same object, converted; ``model.config.use_cache`` is set to False (plain forwards build no cache);
        ``generate`` uses a :class:`bsbr.convert.cache.BSBRCache` (the instance's ``_prepare_cache_for_generation``
        is replaced, see :func:`bsbr.convert.cache.prepare_cache_for_generation`).
    Raises:
        ValueError: bad ``chunk_size``/``compression_factor``/``retrieval``, options with ``retrieval="seed"``, no
            ``LlamaAttention`` found, or already converted.
    """
    check_positive_int(chunk_size=chunk_size)
    if retrieval not in RETRIEVALS:
        raise ValueError(f"retrieval must be one of {list(RETRIEVALS)}, got {retrieval!r}")
    if retrieval == "seed":
        if normalized_options:
            raise ValueError(f"options {sorted(normalized_options)} apply to retrieval='normalized' only")
        return replace_attention(model, LlamaAttention, BSBRLlamaAttention, LlamaModel,
                                 lambda attention: BSBRLlamaAttention(attention, chunk_size, compression_factor))
    from bsbr.convert.normalized import NormalizedBSBRLlamaAttention  # it imports this module

    return replace_attention(model, LlamaAttention, BSBRLlamaAttention, LlamaModel,
                             lambda attention: NormalizedBSBRLlamaAttention(attention, chunk_size, compression_factor,
                                                                            **normalized_options))


def set_retrieval(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the retrieval term of every BSBR-converted attention in ``model`` on or off; returns ``model``.

    Converted attentions: :class:`BSBRLlamaAttention` and :class:`bsbr.convert.gpt2.BSBRGPT2Attention`.
    Off = causal attention within each chunk only (the "no retrieval" reference).

    Raises:
        TypeError: ``enabled`` not a bool. ValueError: ``model`` has no BSBR attention.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    from bsbr.convert.gpt2 import BSBRGPT2Attention  # here, not at the top: gpt2.py imports this module

    layers = [m for m in model.modules() if isinstance(m, (BSBRLlamaAttention, BSBRGPT2Attention))]
    if not layers:
        raise ValueError("model has no BSBRLlamaAttention; convert it with bsbr.convert.convert_to_bsbr first")
    for layer in layers:
        layer.retrieval = enabled
    return model
