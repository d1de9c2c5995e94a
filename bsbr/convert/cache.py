"""Incremental decoding and padding for BSBR-converted transformers models (:mod:`bsbr.convert.llama`, ``.gpt2``).

* :class:`BSBRCache` is a ``transformers`` ``Cache`` whose layers hold BSBR streaming states
  (:class:`bsbr.attention.BSBRState`: the current chunk's keys/values, the finished chunks' states ``F_j = K_jᵀV_j``
  and meta-keys; :class:`bsbr.normalized.NormalizedState` for the normalised retrieval) instead of every
  token's keys and values: O(chunks·head_dim²) per layer, not O(tokens).
  Feeding a sequence to a converted model in pieces with one cache gives the logits of one full forward.
* Padding: a converted model's 2-D ``attention_mask`` (1 = real token) is handed by a forward pre-hook on the
  base model (:func:`prepare_model_inputs`) to every BSBR attention layer as the keyword ``bsbr_attention_mask``.
  The base model still gets its ``attention_mask`` and builds HF's 4-D mask, which the BSBR layers then ignore (BSBR
  does its own chunked causal masking); an attention layer that does not know the keyword (e.g. a subclass with its
  own ``forward``) thus still sees the padded 4-D mask and rejects it. Each row's real tokens are processed as that
  sequence alone: chunks start at the row's first real token (:func:`packed_attention` for a full forward, one
  state per row in the cache).
  Positions: with padding and no ``position_ids``, the pre-hook counts them from each row's first real token
  (``(attention_mask.cumsum(-1) - 1).clamp_min(0)``, the last ``seq_len`` columns; what ``generate`` passes itself),
  so a padded row gets the positions it has alone. This matters: compressed chunk states (``compression_factor``) and
  the normalised retrieval's feature maps are not rotation-invariant under Llama's RoPE, and GPT-2's learned positions
  are absolute. ``position_ids`` given by the caller are used as given.
* ``generate``: the converters replace the model's ``_prepare_cache_for_generation`` (on the instance) by
  :func:`prepare_cache_for_generation`, which hands ``generate`` a fresh :class:`BSBRCache` (unless
  ``use_cache=False``); a user's ``cache=`` must be a :class:`BSBRCache`.

The cache keeps one state per batch row (batch size 1 each, as :class:`bsbr.attention.BSBRState` is batch-uniform and
left-padded rows hold different numbers of real tokens), and a cached forward loops over the rows: fine for the small
batches of evaluation and generation, not a serving engine.

Source: BSBR ("Block Sparse attention with Block Retrieval", this project); the chunk states are the linear-attention
state of Katharopoulos et al. 2020 (arXiv 2006.16236).
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from bsbr.attention import BSBRState, pack_padding

__all__ = ["BSBRCache", "BSBRCacheLayer", "attend_cached", "check_cache", "packed_attention",
           "prepare_cache_for_generation", "prepare_model_inputs"]

#: keyword under which the base model's pre-hook hands the 2-D padding mask to the BSBR attention layers
MASK_KEYWORD = "bsbr_attention_mask"


class BSBRCacheLayer(CacheLayerMixin):
    """One decoder layer's entry of a :class:`BSBRCache`: a :class:`bsbr.attention.BSBRState` per batch row.

    Attributes: ``rows`` (None before the first forward, then a list with one ``BSBRState`` or None per row: the
    row's real tokens so far; None = none yet), ``seen`` (positions fed so far, padding included: what
    ``get_seq_length`` returns and HF uses for default positions and mask sizes), ``retrieval`` (the mode the
    states were built in: True = BSBR, False = own-chunk attention only; None before the first forward).
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.rows: list[BSBRState | None] | None = None
        self.seen = 0
        self.retrieval: bool | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        raise _update_error()

    def update(self, key_states, value_states, *args, **kwargs):
        raise _update_error()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset) = (seen + query_length, 0)``: the width of the 2-D mask HF expects, as for
        ``DynamicLayer``."""
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Positions fed so far (tokens, padding included)."""
        return self.seen

    def get_max_length(self) -> int:
        return -1  # no maximum

    def offload(self):  # the states are small and stay where they are
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        self.rows, self.seen, self.retrieval = None, 0, None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BSBRCache cannot be cropped: finished chunks are summarised into states")

    def _select(self, indices) -> None:
        if self.rows is not None:
            self.rows = [self.rows[i] for i in indices]  # states are never changed in place: sharing is safe

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows is not None:
            self._select([row for row in range(len(self.rows)) for _ in range(repeats)])

    def nbytes(self) -> int:
        """Bytes held by the row states' tensors."""
        return sum(state.nbytes() for state in self.rows or () if state is not None)


def _update_error() -> TypeError:
    return TypeError("BSBRCache holds BSBR streaming states, not keys and values: only BSBR-converted attention layers "
                     "(bsbr.convert) can use it; a standard attention layer needs a DynamicCache")


class BSBRCache(Cache):
    """A ``transformers`` ``Cache`` of BSBR streaming states, one :class:`BSBRCacheLayer` per decoder layer.

    Pass it as ``cache=`` (or ``past_key_values=``) to a BSBR-converted model (``use_cache=True`` without a cache
    makes one; ``generate`` makes one itself): the new tokens continue the sequence, and the pieces together give the
    logits of one forward over the whole sequence.

    Args:
        num_layers: decoder layers (``config.num_hidden_layers``), >= 1.

    Size (:meth:`nbytes`), per layer and row after ``n`` real tokens (``p = n % chunk_size``,
    ``c = n // chunk_size``, ``H`` query heads, ``G`` key/value heads, ``d`` head_dim, ``D`` hidden size,
    ``F = d²`` or ``d²/compression_factor``): ``element_size · (2·G·p·d + D + H·c·(F + d) + H·d²)`` bytes with
    retrieval, ``element_size · 2·G·p·d`` bytes with retrieval off (own-chunk attention only) — O(chunks·d²), not
    O(tokens). The normalised retrieval's rows: see
    :class:`bsbr.normalized.NormalizedState`.

    Raises:
        ValueError: ``num_layers`` not a positive integer.
    """

    def __init__(self, num_layers: int):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        super().__init__(layers=[BSBRCacheLayer() for _ in range(num_layers)])

    def layer(self, layer_idx: int) -> BSBRCacheLayer:
        """The entry of decoder layer ``layer_idx``; ValueError if the cache has fewer layers."""
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"BSBRCache has {len(self.layers)} layers, got layer_idx={layer_idx}; build it with "
                             "BSBRCache(config.num_hidden_layers)")
        return self.layers[layer_idx]

    def nbytes(self) -> int:
        """Bytes held by all layers' states (see the class docstring for the formula)."""
        return sum(layer.nbytes() for layer in self.layers)


def check_cache(cache) -> BSBRCache:
    """``cache`` itself if it is a :class:`BSBRCache`; TypeError naming the accepted type otherwise."""
    if not isinstance(cache, BSBRCache):
        raise TypeError(
            f"BSBR-converted models keep BSBR streaming states, not keys and values: cache/past_key_values must be a "
            f"bsbr.convert.cache.BSBRCache (or None), got {type(cache).__name__}. Pass BSBRCache(config."
            "num_hidden_layers), or use_cache=True to get one; generate() makes one itself."
        )
    return cache


# --- the attention layers' two paths ------------------------------------------------------------------------------


def packed_attention(attend, mask: torch.Tensor, hidden_states, query, key, value) -> torch.Tensor:
    """Full forward of a padded batch: each row's real tokens moved to the front (:func:`bsbr.attention.pack_padding`),
    so its chunks start at its first real token; ``attend`` runs on the packed rows; outputs are moved back.

    Args:
        attend: ``attend(hidden_states, query, key, value) -> [batch, heads, seq_len, d]`` (causal, no padding).
        mask: ``[batch, seq_len]`` bool, True = real token.
        hidden_states: ``[batch, seq_len, hidden]``; query: ``[batch, heads, seq_len, d]``; key, value:
            ``[batch, kv_heads, seq_len, d]`` (positions already applied).
    Returns:
        ``[batch, heads, seq_len, d]``, zeros at padded positions. A real token sees only its row's earlier real
        tokens (trailing padding comes after every real token of the packed row, so causality hides it).
    """
    order = pack_padding(mask)  # [batch, seq_len]: real tokens first

    def pack(x, dim):  # gather along the sequence dim `dim`
        index = order.view(order.shape[0], *([1] * (dim - 1)), order.shape[1], *([1] * (x.dim() - dim - 1)))
        return x.gather(dim, index.expand(*x.shape[:dim], order.shape[1], *x.shape[dim + 1:]))

    output = attend(pack(hidden_states, 1), pack(query, 2), pack(key, 2), pack(value, 2))  # [batch, heads, seq, d]
    inverse = order.argsort(1)
    index = inverse[:, None, :, None].expand(-1, output.shape[1], -1, output.shape[3])
    output = output.gather(2, index)  # [batch, heads, seq_len, d], original order
    return output * mask[:, None, :, None].to(output.dtype)


def attend_cached(layer, entry: BSBRCacheLayer, hidden_states, query, key, value, new_mask, dropout_p: float):
    """Cached forward of a BSBR-converted attention ``layer``: each row's real new tokens continue its state.

    Args:
        layer: the attention module: ``retrieval`` and ``attend_step(hidden_states [1, n, D], query, key, value,
            state, dropout_p) -> (output [1, heads, n, d], new_state)`` for one row's ``n`` real new tokens
            (the retrieval mode's ``step``, :mod:`bsbr.convert.retrieval`).
        entry: the layer's :class:`BSBRCacheLayer` (updated in place).
        hidden_states: ``[batch, L, D]``; query ``[batch, heads, L, d]``; key, value ``[batch, kv_heads, L, d]``.
        new_mask: ``[batch, L]`` bool (True = real token) or None (all real).
    Returns:
        ``[batch, heads, L, d]``, zeros at padded positions.
    Raises:
        ValueError: a batch size other than the cache's, or retrieval switched on/off since the cache was started.
    """
    batch, length, _ = hidden_states.shape
    if entry.rows is None:
        entry.rows, entry.retrieval = [None] * batch, layer.retrieval
    if len(entry.rows) != batch:
        raise ValueError(f"the cache holds {len(entry.rows)} rows but the input has batch size {batch}; use a new "
                         "BSBRCache for a new batch")
    if entry.retrieval != layer.retrieval:
        raise ValueError(f"retrieval was switched to {layer.retrieval} (set_retrieval) after this cache was started "
                         f"with retrieval={entry.retrieval}; start a new BSBRCache")
    rows = []
    for row in range(batch):
        index = (torch.arange(length, device=query.device) if new_mask is None
                 else new_mask[row].nonzero()[:, 0])  # [n] real new tokens of this row
        zeros = query.new_zeros(1, *query.shape[1:])  # [1, heads, L, d]
        if index.numel() == 0:
            rows.append(zeros)
            continue
        q, k, v = (t[row: row + 1].index_select(2, index) for t in (query, key, value))  # [1, heads, n, d]
        out, new_state = layer.attend_step(hidden_states[row: row + 1].index_select(1, index), q, k, v,
                                           entry.rows[row], dropout_p)
        rows.append(zeros.index_copy(2, index, out.to(zeros.dtype)))
        entry.rows[row] = new_state
    entry.seen += length
    return torch.cat(rows) if batch > 1 else rows[0]


# --- the base model's pre-hook and generate -------------------------------------------------------------------------


def prepare_model_inputs(module, args, kwargs, max_positions_field: str | None = None):
    """Forward pre-hook (``with_kwargs=True``) on a converted ``LlamaModel``/``GPT2Model``, before any work.

    * ``cache``/``past_key_values``: must be a :class:`BSBRCache` or None (TypeError otherwise); ``use_cache=True``
      (argument or ``config.use_cache``) without one makes a new :class:`BSBRCache`.
    * ``attention_mask``: None or a ``[batch, past + seq_len]`` 0/1 tensor (``past`` = the cache's
      ``get_seq_length()``); handed to the BSBR layers as ``bsbr_attention_mask`` (bool, or None when all ones); the
      model's own ``attention_mask`` is left as given.
    * ``position_ids``: when the mask has padding and none are given, ``(attention_mask.cumsum(-1) - 1).clamp_min(0)
      [:, -seq_len:]`` (``[batch, seq_len]``, counted from each row's first real token, as ``generate`` does), so a
      padded row's real tokens get the positions they have alone.
    * ``max_positions_field``: None, or the config field bounding the family's learned positions (GPT-2:
      ``"n_positions"``, the rows of ``wpe``; the converters bind it with ``functools.partial``): ``past + seq_len``
      tokens past ``config.<field>`` are an error (a shape check; given or padding-derived ``position_ids`` are
      looked at only then, and their largest position decides).
    Returns ``((), kwargs)`` with every argument by name.

    Raises:
        ValueError: a mask of another shape or with values other than 0/1; both ``cache`` and ``past_key_values``; an
            input reaching past ``config.<max_positions_field>`` positions.
        TypeError: a cache that is not a :class:`BSBRCache`.
    """
    bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
    bound.pop("self", None)
    extra = dict(bound.pop("kwargs", {}))
    cache, legacy = bound.get("cache"), extra.pop("past_key_values", None)
    if legacy is not None:
        if cache is not None:
            raise ValueError("pass only one of cache and past_key_values (the deprecated name)")
        cache = legacy
    use_cache = bound.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(module.config, "use_cache", False))
    if cache is not None:
        check_cache(cache)
    elif use_cache:
        cache = BSBRCache(module.config.num_hidden_layers)
    bound["cache"] = cache

    inputs = bound.get("input_ids") if bound.get("input_ids") is not None else bound.get("inputs_embeds")
    mask = bound.get("attention_mask")
    padding = None
    if mask is not None:
        past = 0 if cache is None else cache.get_seq_length()
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or (
                inputs is not None and tuple(mask.shape) != (inputs.shape[0], past + inputs.shape[1])):
            shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            expected = "[batch, past + seq_len]" if inputs is None else [inputs.shape[0], past + inputs.shape[1]]
            raise ValueError(f"attention_mask must be None or a {expected} tensor of 0/1 (1 = real token; past = "
                             f"the cache's get_seq_length() = {past}), got {shape}")
        if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token)")
        padding = None if bool(mask.all()) else mask.bool()
        if padding is not None and inputs is not None and bound.get("position_ids") is None:
            bound["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -inputs.shape[1]:]
    if max_positions_field is not None and inputs is not None:
        _check_positions(module.config, max_positions_field, 0 if cache is None else cache.get_seq_length(),
                         inputs.shape[1], bound.get("position_ids"))
    extra[MASK_KEYWORD] = padding
    return (), {**bound, **extra}


def _check_positions(config, field: str, past: int, seq_len: int, position_ids) -> None:
    """ValueError if ``past + seq_len`` tokens reach past ``config.<field>`` learned positions (and so do the
    ``position_ids`` when given: a padded row's count from its first real token)."""
    limit = getattr(config, field)
    if past + seq_len <= limit:
        return
    if position_ids is None:
        raise ValueError(f"input length {past + seq_len} (cache {past} + input {seq_len} tokens) exceeds "
                         f"config.{field}={limit}, the positions the model has learned embeddings for")
    last = int(position_ids.max())
    if last >= limit:
        raise ValueError(f"position_ids reach {last} (input length {past + seq_len}: cache {past} + input {seq_len} "
                         f"tokens), past config.{field}={limit}, the positions the model has learned embeddings for")


def prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                 max_cache_length):
    """Replaces ``GenerationMixin._prepare_cache_for_generation`` on a converted model (the converters set
    ``functools.partial(prepare_cache_for_generation, model)`` on the instance): ``generate`` gets a new :class:`BSBRCache` in ``model_kwargs["cache"]``, unless
    ``use_cache=False`` (then every step is a full forward). A user's ``cache``/``past_key_values`` must be a
    :class:`BSBRCache` (TypeError otherwise); a ``cache_implementation`` other than None/"dynamic" is a ValueError."""
    user_cache = next((model_kwargs[name] for name in ("cache", "past_key_values")
                       if model_kwargs.get(name) is not None), None)
    if user_cache is not None:
        check_cache(user_cache)
        user_cache._is_user_defined = True
        return
    if generation_config.use_cache is False:
        return
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported by "
                         "BSBR-converted models: they use a BSBRCache (leave cache_implementation unset)")
    model_kwargs["cache"] = BSBRCache(self.config.get_text_config(decoder=True).num_hidden_layers)
