"""The family-agnostic BSBR-converted attention layer: forward dispatch, cache, padding, the retrieval switch.

:class:`BSBRConvertedAttention` holds everything a converted layer does whatever the model family; a family
(:mod:`bsbr.convert.llama`, :mod:`bsbr.convert.gpt2`) subclasses it with only its projections and positions:

* ``source_class`` / ``base_model_class``: the HF attention class it replaces and the base model that gets the
  padding/cache pre-hook (:func:`bsbr.convert.cache.prepare_model_inputs`); ``max_positions_field``: the config
  field bounding learned absolute positions, if any (the pre-hook rejects a longer input);
* ``_adopt(attention)``: take the pretrained projections and sizes (``head_dim``, ``num_heads``,
  ``num_key_value_heads``, ``attention_dropout``, ``config``, ``layer_idx``) and build ``meta_q_proj``
  (``hidden -> num_heads·head_dim``) and ``meta_k_proj`` (``hidden -> num_key_value_heads·head_dim``) from them;
* ``_project(hidden_states, position_embeddings)``: queries, keys and values with the family's positions applied;
* ``_output(attention)``: the output projection.

What the layer computes from the projected queries, keys and values is its retrieval mode
(:data:`bsbr.convert.retrieval.RETRIEVAL_MODES`, chosen by ``retrieval=``). A new family is one subclass plus one
entry in :data:`bsbr.convert.families.FAMILIES`.

Source: BSBR ("Block Sparse attention with Block Retrieval", this project).
"""

from __future__ import annotations

import torch
from torch import nn

from bsbr._checks import check_positive_int
from bsbr.convert.cache import MASK_KEYWORD, attend_cached, check_cache, packed_attention
from bsbr.convert.retrieval import RETRIEVAL_MODES, RetrievalMode

__all__ = ["BSBRConvertedAttention", "converted_layers", "set_retrieval"]


def _padding_error() -> NotImplementedError:
    return NotImplementedError(
        "this attention layer got a 4-D attention_mask that is not plain causal (padding): called directly it takes "
        "no padding. BSBR-converted attention layers take padding through the converted model's 2-D "
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
            f"BSBR-converted attention got an attention mask of type {type(attention_mask).__name__}; only the "
            "'sdpa' and 'eager' attention implementations (tensor masks) are supported"
        )
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (seq_len, seq_len):
        raise ValueError(f"expected a [batch, 1, {seq_len}, {seq_len}] causal mask, got {list(attention_mask.shape)}")
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=allowed.device).tril()
    if not torch.equal(allowed, causal.expand_as(allowed)):
        raise _padding_error()


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


class BSBRConvertedAttention(nn.Module):
    """BSBR attention in place of a pretrained attention layer, reusing its projections (same modules, same tensors).

    Args:
        attention: the pretrained attention module to replace (a ``source_class`` instance).
        chunk_size: tokens per chunk (>= 1).
        compression_factor: None or a positive integer: chunk-state compression of the retrieval mode (``"seed"``:
            dividing ``head_dim**2``; ``"normalized"``: dividing ``head_dim``).
        retrieval: a key of :data:`bsbr.convert.retrieval.RETRIEVAL_MODES` (``"seed"``, ``"normalized"``,
            ``"terraced"``, ``"blocks"``).
        **options: the retrieval mode's options (listed by its class in :mod:`bsbr.convert.retrieval`; e.g.
            ``"normalized"``: ``feature_dim``, ``mix_logit``, ``tie_qk``, ``sink_size``).

    Modules: the family's pretrained projections, ``meta_q_proj`` and ``meta_k_proj`` (new, initialised from the
    query and key projections: meta-query ``r_i`` from the mean hidden state of chunk ``i-1``, meta-key ``h_j`` from
    that of chunk ``j``, no positions), and the retrieval mode's modules (``compression``, ``normalized``).
    Attributes: ``chunk_size``, ``retrieval_mode`` (the mode's name), ``retrieval`` (default True; False = causal
    attention within each chunk only, a reference baseline, see :func:`set_retrieval`).
    With ``chunk_size >= seq_len`` there is one chunk and the layer is exactly the pretrained causal attention.

    ``forward(hidden_states [batch, seq_len, hidden], attention_mask=None, cache=None, position_embeddings=None,
    ...)`` returns ``(output [batch, seq_len, hidden], None)`` like the HF attention layers (no attention weights).
    ``cache`` (or ``past_key_values``): a :class:`bsbr.convert.cache.BSBRCache`, continued in place (one streaming
    state per row, the retrieval mode's ``step``). Padding reaches the layer as the keyword ``bsbr_attention_mask``
    (``[batch, past + seq_len]`` bool, from the model's pre-hook): each row's real tokens are processed as that
    sequence alone; outputs at padded positions are zeros.

    Raises:
        TypeError: ``attention`` not a ``source_class``; in forward, a cache that is not a ``BSBRCache``.
        ValueError: bad ``chunk_size``/``compression_factor``/``retrieval``/options; in forward,
            ``encoder_hidden_states`` (causal self-attention only) or a 4-D mask of the wrong shape.
        NotImplementedError: in forward, called directly with a 4-D mask that is not plain causal (padding goes
            through the model's 2-D ``attention_mask``).
    """

    #: the HF attention class a family's layer replaces, and the HF base model the pre-hook goes on
    source_class: type[nn.Module] = nn.Module
    base_model_class: type[nn.Module] = nn.Module
    #: the config field that bounds the family's positions (GPT-2's learned ``wpe``: ``"n_positions"``), checked by the
    #: pre-hook before any work; None: no bound (rotary positions run past the trained length)
    max_positions_field: str | None = None

    def __init__(self, attention: nn.Module, chunk_size: int, compression_factor: int | None = None,
                 retrieval: str = "seed", **options):
        super().__init__()
        check_positive_int(chunk_size=chunk_size)
        if not isinstance(retrieval, str) or retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval must be one of {list(RETRIEVAL_MODES)}, got {retrieval!r}")
        if not isinstance(attention, self.source_class):
            raise TypeError(f"attention must be a {self.source_class.__name__}, got {type(attention).__name__}")
        self.chunk_size = chunk_size
        self.retrieval = True
        self.retrieval_mode = retrieval
        self.is_causal = True
        self._adopt(attention)
        RETRIEVAL_MODES[retrieval].add_modules(self, compression_factor, **options)
        # A new module starts in training mode; take the replaced one's (dropout in GPT-2, for one).
        self.train(attention.training)

    # --- what a family provides ---------------------------------------------------------------------------------

    def _adopt(self, attention: nn.Module) -> None:
        """Take ``attention``'s pretrained projections and sizes; build ``meta_q_proj`` and ``meta_k_proj``."""
        raise NotImplementedError

    def _project(self, hidden_states: torch.Tensor, position_embeddings=None):
        """``query [b, heads, n, d]`` and ``key, value [b, kv_heads, n, d]`` of ``hidden_states [b, n, hidden]``,
        positions applied."""
        raise NotImplementedError

    def _output(self, attention: torch.Tensor) -> torch.Tensor:
        """The output projection of ``attention [b, n, heads·d]``: ``[b, n, hidden]``."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------------------------

    @property
    def mode(self) -> type[RetrievalMode]:
        """The retrieval mode (:data:`bsbr.convert.retrieval.RETRIEVAL_MODES` entry of ``retrieval_mode``)."""
        return RETRIEVAL_MODES[self.retrieval_mode]

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, retrieval_mode={self.retrieval_mode!r}, retrieval={self.retrieval}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if encoder_hidden_states is not None:
            raise ValueError(f"encoder_hidden_states must be None: {type(self).__name__} is causal self-attention only")
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            check_cache(cache)
        batch, seq_len, _ = hidden_states.shape
        padding = _padding_mask(kwargs, attention_mask, seq_len)
        query, key, value = self._project(hidden_states, position_embeddings)
        dropout_p = self.attention_dropout if self.training else 0.0

        if cache is not None:  # continue each row's streaming state
            new_mask = None if padding is None else padding[:, -seq_len:]
            output = attend_cached(self, cache.layer(self.layer_idx), hidden_states, query, key, value, new_mask,
                                   dropout_p)
        elif padding is not None:  # each row's real tokens alone, moved to the front
            output = packed_attention(lambda h, q, k, v: self._attend(h, q, k, v, dropout_p), padding,
                                      hidden_states, query, key, value)
        else:
            output = self._attend(hidden_states, query, key, value, dropout_p)
        output = output.transpose(1, 2).reshape(batch, seq_len, -1)  # [batch, seq_len, heads*head_dim]
        return self._output(output), None

    def meta_from_means(self, pooled: torch.Tensor):
        """Meta rows from chunk means ``pooled [b, rows, hidden]``: ``meta_query [b, heads, rows, d]`` and
        ``meta_key [b, kv_heads, rows, d]`` (row ``j`` from chunk ``j``: ``h_j``, and the meta-query of chunk
        ``j+1``)."""
        batch, rows, _ = pooled.shape
        meta_key = self.meta_k_proj(pooled).view(batch, rows, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        meta_query = self.meta_q_proj(pooled).view(batch, rows, self.num_heads, self.head_dim).transpose(1, 2)
        return meta_query, meta_key

    def _attend(self, hidden_states, query, key, value, dropout_p: float) -> torch.Tensor:
        """Full causal attention of unpadded rows with this layer's retrieval mode (own chunk only when
        ``retrieval`` is off): ``[batch, heads, seq_len, head_dim]``."""
        return self.mode.attend(self, hidden_states, query, key, value, dropout_p)

    def attend_step(self, hidden_states, query, key, value, state, dropout_p: float):
        """One row's cached step (:func:`bsbr.convert.cache.attend_cached`): the retrieval mode's ``step``."""
        return self.mode.step(self, hidden_states, query, key, value, state, dropout_p)


def converted_layers(model: nn.Module) -> list[tuple[str, BSBRConvertedAttention]]:
    """``(name, layer)`` of every BSBR-converted attention layer of ``model``, in module order.

    Raises:
        ValueError: ``model`` has none (it is not converted).
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BSBRConvertedAttention)]
    if not layers:
        raise ValueError("model has no BSBR-converted attention; convert it with bsbr.convert.convert_to_bsbr first")
    return layers


def set_retrieval(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the retrieval term of every BSBR-converted attention in ``model`` on or off; returns ``model``.

    Off = causal attention within each chunk only (the "no retrieval" reference; with the normalised retrieval's sink
    tokens, own chunk plus sinks).

    Raises:
        TypeError: ``enabled`` not a bool. ValueError: ``model`` has no BSBR attention.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    for _, layer in converted_layers(model):
        layer.retrieval = enabled
    return model
