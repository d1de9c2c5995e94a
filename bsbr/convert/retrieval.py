"""Retrieval modes of a BSBR-converted attention layer: how a token reaches the chunks before its own.

A converted layer (:class:`bsbr.convert.base.BSBRConvertedAttention`, any model family) computes its queries, keys
and values, then hands them to its retrieval mode, named by ``retrieval=`` in :func:`bsbr.convert.convert_to_bsbr`:

* ``"seed"`` (:class:`SeedMode`): the seed formula, :func:`bsbr.attention.bsbr_attention` (local causal softmax
  within the chunk plus the unnormalised ``q·Σ_j w_ij K_jᵀV_j``), optional learned compression of ``K_jᵀV_j``;
* ``"normalized"`` (:class:`NormalizedMode`): the retrieved chunks share the local softmax's normaliser through
  positive feature maps, optional exact attention-sink tokens (:mod:`bsbr.normalized`);
* ``"terraced"`` (:class:`TerracedMode`): an exact region of the own and the previous chunk plus sink tokens, every
  older chunk summed into GQA-shared feature-space states under the same normaliser (:mod:`bsbr.terraced`);
* ``"blocks"`` (:class:`BlocksMode`): exact attention on the own and previous chunk, sink tokens and the top-k earlier
  blocks each token's own query selects against per-block key summaries (Quest's min/max bound or mean keys;
  :mod:`bsbr.blocks`); its cache keeps every token's keys and values.

A new mode is one class with the four static methods of :class:`RetrievalMode` and one entry in
:data:`RETRIEVAL_MODES`; every family, the cache, padding, checkpoints and ``set_retrieval`` then take it.

Every mode switches off with the layer's ``retrieval = False`` (:func:`bsbr.convert.base.set_retrieval`): causal
attention within each token's own chunk (the "no retrieval" reference; ``"terraced"`` keeps its whole exact region).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bsbr._checks import check_positive_int
from bsbr.attention import BSBRState, StateCompression, bsbr_attention, chunk_mean
from bsbr.blocks import BlocksState, GrowingTensor, block_attention_unchecked, check_block_settings
from bsbr.normalized import NormalizedRetrieval, chunk_local_softmax, normalized_step
from bsbr.terraced import DEFAULT_MIX_LOGIT, TerracedRetrieval, terraced_step
from bsbr.utils import check_sink_size

__all__ = ["RETRIEVAL_MODES", "BlocksMode", "MetaRoutedState", "NormalizedMode", "RetrievalMode", "SeedMode",
           "TerracedMode", "chunk_local_attention", "seed_step"]


def chunk_local_attention(query, key, value, chunk_size: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal softmax attention restricted to each token's own chunk (BSBR with retrieval switched off).

    A reference baseline, written with an explicit ``[seq_len, seq_len]`` mask.

    Args:
        query: ``[batch, heads, seq_len, head_dim]``; key, value: ``[batch, kv_heads, seq_len, head_dim]`` (GQA).
        chunk_size: tokens per chunk (>= 1).
        dropout_p: attention-probability dropout.
    Returns:
        ``[batch, heads, seq_len, head_dim]``.
    Raises:
        ValueError: bad ``chunk_size``.
    """
    check_positive_int(chunk_size=chunk_size)
    seq_len = query.shape[2]
    position = torch.arange(seq_len, device=query.device)
    chunk = position // chunk_size
    mask = (chunk[:, None] == chunk[None, :]) & (position[None, :] <= position[:, None])  # [seq_len, seq_len]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                          enable_gqa=key.shape[1] != query.shape[1])


# --- the seed formula's streaming step -------------------------------------------------------------------------------


def _call_chunk_means(hidden_states, state: BSBRState | None, chunk_size: int):
    """Mean hidden state of every chunk this call finishes, and the hidden-state sum of the unfinished one.

    ``hidden_states``: ``[1, n, D]`` continuing ``state`` (whose ``partial_sum`` holds its partial chunk's sum).
    Returns ``pooled [1, (p + n) // chunk_size, D]`` (row ``i`` from call chunk ``i``, as ``bsbr_attention`` wants
    its meta rows) and ``partial_sum [1, D]``. Mirrors :meth:`bsbr.attention.BSBRAttention._attend`.
    """
    length = hidden_states.shape[1]
    partial = 0 if state is None else state.num_tokens % chunk_size
    head = min(length, chunk_size - partial) if partial else 0
    full = (length - head) // chunk_size
    rest = length - head - full * chunk_size
    sums = []
    if head:
        sums.append(hidden_states[:, :head].sum(1, keepdim=True) + state.partial_sum[:, None])
    if full:
        sums.append(hidden_states[:, head: head + full * chunk_size].unflatten(1, (full, chunk_size)).sum(2))
    if rest:
        sums.append(hidden_states[:, head + full * chunk_size:].sum(1, keepdim=True))
    sums = torch.cat(sums, dim=1) if len(sums) > 1 else sums[0]  # [1, call chunks, D]
    total = partial + length
    pooled = sums[:, : total // chunk_size] / chunk_size
    partial_sum = sums[:, -1] if total % chunk_size else torch.zeros_like(sums[:, -1])
    return pooled, partial_sum


def _local_step(query, key, value, state: BSBRState | None, chunk_size: int, dropout_p: float):
    """Own-chunk causal attention (retrieval off) of ``n`` new tokens continuing ``state``: ``[1, H, n, d]`` and the
    new state (only its ``partial_key/partial_value`` and ``num_tokens`` are used)."""
    seen = 0 if state is None else state.num_tokens
    partial = seen % chunk_size
    if partial:
        key, value = torch.cat([state.partial_key, key], dim=2), torch.cat([state.partial_value, value], dim=2)
    length = query.shape[2]
    key_pos = seen - partial + torch.arange(partial + length, device=query.device)
    query_pos = seen + torch.arange(length, device=query.device)
    mask = ((query_pos[:, None] // chunk_size == key_pos[None, :] // chunk_size)
            & (key_pos[None, :] <= query_pos[:, None]))  # [n, partial + n]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                            enable_gqa=key.shape[1] != query.shape[1])
    rest = (seen + length) % chunk_size
    empty = query.new_zeros(1, query.shape[1], 0, 0)
    new_state = BSBRState(chunk_size, 1, 0, seen + length, key[:, :, key.shape[2] - rest:].clone(),
                          value[:, :, value.shape[2] - rest:].clone(), None, empty, empty, empty)
    return output, new_state


def seed_step(layer, hidden_states, query, key, value, state: BSBRState | None, dropout_p: float):
    """One row's cached step of a seed-formula BSBR layer (the ``step`` of :class:`bsbr.convert.retrieval.SeedMode`, any
    family).

    Args:
        layer: the attention module (``chunk_size``, ``compression``, ``retrieval``, ``meta_from_means``).
        hidden_states: ``[1, n, D]``; query ``[1, heads, n, d]``; key, value ``[1, kv_heads, n, d]``: the row's ``n``
            real new tokens, continuing ``state`` (None = none yet).
    Returns:
        ``(output [1, heads, n, d], new_state)``: BSBR attention (:func:`bsbr.attention.bsbr_attention`) with
        retrieval on, own-chunk attention (:func:`_local_step`) with it off.
    """
    if not layer.retrieval:
        return _local_step(query, key, value, state, layer.chunk_size, dropout_p)
    pooled, partial_sum = _call_chunk_means(hidden_states, state, layer.chunk_size)
    meta_query, meta_key = layer.meta_from_means(pooled)
    out, new_state = bsbr_attention(query, key, value, meta_query, meta_key, layer.chunk_size,
                                    compression=layer.compression, dropout_p=dropout_p, state=state, return_state=True)
    new_state.partial_sum = partial_sum
    return out, new_state


# --- the modes -----------------------------------------------------------------------------------------------------


def _feature_dim(head_dim: int, compression_factor, feature_dim, mode: str):
    """The Hedgehog features per half of a feature-map mode: ``head_dim / compression_factor`` when compressed (a
    contradicting ``feature_dim`` is an error), else ``feature_dim`` as given (None: the mode's default, ``head_dim``).

    Raises ValueError naming ``compression_factor`` (not a positive integer dividing ``head_dim``) or ``feature_dim``.
    """
    if compression_factor is None:
        return feature_dim
    if isinstance(compression_factor, bool) or not isinstance(compression_factor, int) \
            or compression_factor < 1 or head_dim % compression_factor:
        raise ValueError(f"compression_factor must be None or a positive integer dividing head_dim={head_dim} for "
                         f"{mode} retrieval, got {compression_factor!r}")
    compressed = head_dim // compression_factor
    if feature_dim is not None and feature_dim != compressed:
        raise ValueError(f"feature_dim={feature_dim} contradicts compression_factor={compression_factor} "
                         f"(which sets feature_dim = head_dim / compression_factor = {compressed}); pass one")
    return compressed


class RetrievalMode:
    """What a retrieval mode provides to a converted layer (all static: the layer holds the modules and flags).

    The ``layer`` argument is a :class:`bsbr.convert.base.BSBRConvertedAttention`: ``chunk_size``, ``num_heads``,
    ``num_key_value_heads``, ``head_dim``, ``retrieval`` (on/off), ``meta_from_means`` and its meta projections.
    """

    #: the layer's child modules this mode adds (checkpoints save exactly these, with the meta projections)
    new_modules: tuple[str, ...] = ()

    @staticmethod
    def add_modules(layer, compression_factor, **options) -> None:
        """Validate ``compression_factor`` and the options (ValueError naming them), then add the mode's modules to
        ``layer`` on its device and dtype."""
        raise NotImplementedError

    @staticmethod
    def attend(layer, hidden_states, query, key, value, dropout_p: float) -> torch.Tensor:
        """Full causal attention of unpadded rows: ``hidden_states [b, n, D]``, ``query [b, H, n, d]``, ``key,
        value [b, G, n, d]`` (positions applied) -> ``[b, H, n, d]``; own-chunk only when ``layer.retrieval`` is
        False."""
        raise NotImplementedError

    @staticmethod
    def step(layer, hidden_states, query, key, value, state, dropout_p: float):
        """One row's streaming step (batch size 1), continuing ``state`` (None = no tokens yet): ``(output [1, H,
        n, d], new_state)``, equal to the rows of one :meth:`attend` over the whole sequence; the new state has a
        ``nbytes()`` method (what :class:`bsbr.convert.cache.BSBRCache` reports)."""
        raise NotImplementedError

    @staticmethod
    def settings(layer) -> tuple[int | None, dict]:
        """``(compression_factor, options)`` that rebuild ``layer``'s mode through ``add_modules`` (checkpoints)."""
        raise NotImplementedError


class SeedMode(RetrievalMode):
    """``retrieval="seed"``: :func:`bsbr.attention.bsbr_attention` on the layer's queries, keys and values.

    ``compression_factor``: None or a positive integer dividing ``head_dim**2``: a learned linear map of each chunk
    state ``K_jᵀV_j`` (:class:`bsbr.attention.StateCompression`, shared by the heads of the layer). No options.
    Streaming state: :class:`bsbr.attention.BSBRState` (:func:`seed_step`).
    Source: BSBR (this project); chunk states are the linear-attention state of Katharopoulos et al. 2020
    (arXiv 2006.16236).
    """

    new_modules = ("compression",)

    @staticmethod
    def add_modules(layer, compression_factor, **options) -> None:
        if options:
            raise ValueError(f"retrieval='seed' takes no options, got {sorted(options)}; options belong to the other "
                             f"modes ({sorted(set(RETRIEVAL_MODES) - {'seed'})})")
        weight = layer.meta_q_proj.weight
        layer.compression = (None if compression_factor is None
                             else StateCompression(layer.head_dim, compression_factor).to(weight.device, weight.dtype))

    @staticmethod
    def attend(layer, hidden_states, query, key, value, dropout_p: float) -> torch.Tensor:
        if not layer.retrieval:
            return chunk_local_attention(query, key, value, layer.chunk_size, dropout_p)
        meta_query, meta_key = layer.meta_from_means(chunk_mean(hidden_states, layer.chunk_size))  # [b, *, chunks, d]
        return bsbr_attention(query, key, value, meta_query, meta_key, layer.chunk_size,
                              compression=layer.compression, dropout_p=dropout_p)

    step = staticmethod(seed_step)  # streaming state: bsbr.attention.BSBRState

    @staticmethod
    def settings(layer) -> tuple[int | None, dict]:
        return (None if layer.compression is None else layer.compression.compression_factor), {}


class NormalizedMode(RetrievalMode):
    """``retrieval="normalized"``: :func:`bsbr.normalized.normalized_bsbr_attention` (one normaliser shared by the
    local softmax and the retrieved chunks), module ``layer.normalized`` (:class:`bsbr.normalized.NormalizedRetrieval`).

    ``compression_factor = c``: None or a positive integer dividing ``head_dim``: the feature maps get ``feature_dim =
    head_dim / c`` learned features per half, so a chunk's ``F_j`` is ``[2·head_dim/c, head_dim]`` instead of
    ``[2·head_dim, head_dim]`` (``feature_dim`` must then be None or equal to it). Options: ``feature_dim`` (default
    ``head_dim``), ``mix_logit`` (0.0), ``tie_qk`` (False), ``sink_size`` (0, at most ``chunk_size``). Attention
    dropout is not applied; the streaming step needs ``dropout_p = 0``. Streaming state:
    :class:`bsbr.normalized.NormalizedState`. With ``layer.retrieval = False``: own chunk plus the sink tokens.
    Source: LoLCATs (Zhang et al. 2024, arXiv 2410.10254), Hedgehog (arXiv 2402.04347), attention sinks (Xiao et al.
    2023, arXiv 2309.17453).
    """

    new_modules = ("compression", "normalized")
    OPTIONS = ("feature_dim", "mix_logit", "tie_qk", "sink_size")

    @staticmethod
    def add_modules(layer, compression_factor, **options) -> None:
        unknown = sorted(set(options) - set(NormalizedMode.OPTIONS))
        if unknown:
            raise ValueError(f"unknown options {unknown} for retrieval='normalized'; accepted: "
                             f"{list(NormalizedMode.OPTIONS)}")
        feature_dim = _feature_dim(layer.head_dim, compression_factor, options.pop("feature_dim", None), "normalized")
        check_sink_size(options.get("sink_size", 0), layer.chunk_size)
        weight = layer.meta_q_proj.weight
        layer.compression = None
        layer.compression_factor = compression_factor
        layer.normalized = NormalizedRetrieval(layer.num_heads, layer.head_dim, feature_dim,
                                               **options).to(weight.device, weight.dtype)

    @staticmethod
    def attend(layer, hidden_states, query, key, value, dropout_p: float) -> torch.Tensor:
        if not layer.retrieval:
            return chunk_local_softmax(query, key, value, layer.chunk_size, layer.normalized.sink_size)[0]
        meta_query, meta_key = layer.meta_from_means(chunk_mean(hidden_states, layer.chunk_size))  # [b, *, chunks, d]
        return layer.normalized(query, key, value, meta_query, meta_key, layer.chunk_size)

    @staticmethod
    def step(layer, hidden_states, query, key, value, state, dropout_p: float):
        return normalized_step(layer.normalized, layer.chunk_size, layer.meta_from_means, hidden_states, query, key,
                               value, state, retrieve=layer.retrieval, dropout_p=dropout_p)

    @staticmethod
    def settings(layer) -> tuple[int | None, dict]:
        retrieval = layer.normalized
        options = {"tie_qk": retrieval.key_map is retrieval.query_map, "sink_size": retrieval.sink_size}
        if layer.compression_factor is None:  # else it sets feature_dim: stored once, as compression_factor
            options["feature_dim"] = retrieval.query_map.feature_dim
        return layer.compression_factor, options


class TerracedMode(RetrievalMode):
    """``retrieval="terraced"``: :func:`bsbr.terraced.terraced_attention`, module ``layer.terraced``
    (:class:`bsbr.terraced.TerracedRetrieval`): each token attends exactly to its chunk up to itself, the whole previous
    chunk and the sink tokens; all older chunks (sinks excluded) are summed into Hedgehog feature-space states per
    key/value head, read by every query head of the group inside the same softmax normaliser, weighted by a per-head
    gain ``exp(mix_logit)``. No chunk routing: the layer's meta projections are unused (and untrained).

    ``compression_factor = c``: None or a positive integer dividing ``head_dim``: ``feature_dim = head_dim / c``
    learned features per half (``feature_dim`` must then be None or equal to it). Options: ``feature_dim`` (default
    ``head_dim``), ``mix_logit`` (default ``-2.2``: LoLCATs' ``sigmoid(-2.2) ≈ 0.1``), ``sink_size`` (0, at most
    ``chunk_size``). Attention dropout is not applied; the streaming step needs ``dropout_p = 0``. Streaming state:
    :class:`bsbr.terraced.TerracedState` (O(C·d + f·d) per key/value head, constant in the length). With
    ``layer.retrieval = False``: the exact region alone (own + previous chunk + sinks).
    Source: LoLCATs (Zhang et al. 2024, arXiv 2410.10254), Hedgehog (arXiv 2402.04347), attention sinks (Xiao et al.
    2023, arXiv 2309.17453).
    """

    new_modules = ("terraced",)
    OPTIONS = ("feature_dim", "mix_logit", "sink_size")

    @staticmethod
    def add_modules(layer, compression_factor, **options) -> None:
        unknown = sorted(set(options) - set(TerracedMode.OPTIONS))
        if unknown:
            raise ValueError(f"unknown options {unknown} for retrieval='terraced'; accepted: {list(TerracedMode.OPTIONS)}")
        feature_dim = _feature_dim(layer.head_dim, compression_factor, options.pop("feature_dim", None), "terraced")
        if feature_dim is not None:
            check_positive_int(feature_dim=feature_dim)
        sink_size = options.get("sink_size", 0)
        check_sink_size(sink_size, layer.chunk_size)
        weight = layer.meta_q_proj.weight
        layer.compression = None
        layer.compression_factor = compression_factor
        layer.terraced = TerracedRetrieval(layer.num_heads, layer.num_key_value_heads, layer.head_dim, feature_dim,
                                           options.get("mix_logit", DEFAULT_MIX_LOGIT),
                                           sink_size).to(weight.device, weight.dtype)

    @staticmethod
    def attend(layer, hidden_states, query, key, value, dropout_p: float) -> torch.Tensor:
        return layer.terraced(query, key, value, layer.chunk_size, retrieve=layer.retrieval)

    @staticmethod
    def step(layer, hidden_states, query, key, value, state, dropout_p: float):
        return terraced_step(layer.terraced, layer.chunk_size, query, key, value, state, retrieve=layer.retrieval,
                             dropout_p=dropout_p)

    @staticmethod
    def settings(layer) -> tuple[int | None, dict]:
        options = {"sink_size": layer.terraced.sink_size}
        if layer.compression_factor is None:  # else it sets feature_dim: stored once, as compression_factor
            options["feature_dim"] = layer.terraced.key_map.feature_dim
        return layer.compression_factor, options


#: ``retrieval`` name -> mode: the one place a retrieval mode plugs in.
RETRIEVAL_MODES: dict[str, type[RetrievalMode]] = {"seed": SeedMode, "normalized": NormalizedMode,
                                                   "terraced": TerracedMode}


@dataclass
class MetaRoutedState:
    """Streaming state of a ``retrieval="blocks"`` layer with ``router="meta"`` after ``num_tokens`` tokens (one row,
    ``c = num_tokens // chunk_size`` finished chunks):

    * ``blocks``: the :class:`bsbr.blocks.BlocksState` (every token's keys and values, the block summaries);
    * ``partial_sum``: ``[1, D]`` — the hidden-state sum of the unfinished chunk (zeros when none);
    * ``meta_key``: :class:`bsbr.blocks.GrowingTensor` of ``[1, kv_heads, c, d]`` — each finished chunk's meta-key;
    * ``last_query``: ``[1, heads, 1, d]`` — the meta-query made from the last finished chunk (the one the current
      chunk routes with), None while ``c = 0``.

    Size: the blocks state plus ``element_size · (D + kv_heads·c·d + heads·d)`` bytes.
    """

    blocks: BlocksState
    num_tokens: int
    partial_sum: torch.Tensor
    meta_key: GrowingTensor
    last_query: torch.Tensor | None

    def _small_nbytes(self) -> int:  # the partial sum and the last meta-query
        return sum(t.numel() * t.element_size() for t in (self.partial_sum, self.last_query) if t is not None)

    def nbytes(self) -> int:
        """Bytes in use: the blocks state, the finished chunks' meta-keys, the partial sum and the last meta-query."""
        keys = self.meta_key.view(self.num_tokens // self.blocks.block_size)
        return self.blocks.nbytes() + keys.numel() * keys.element_size() + self._small_nbytes()

    def capacity_nbytes(self) -> int:
        """Bytes allocated (the growing buffers up to 1.5 times what they hold)."""
        return self.blocks.capacity_nbytes() + self.meta_key.capacity_nbytes() + self._small_nbytes()


def _meta_chunk_scores(layer, query_rows: torch.Tensor, meta_key: torch.Tensor) -> torch.Tensor:
    """BSBR's chunk routing as block scores: ``query_rows [b, H, q_chunks, d]`` (row ``i``: the meta-query the
    ``i``-th query chunk routes with) against ``meta_key [b, G, chunks, d]`` -> ``[b, H, q_chunks, chunks]``
    (unscaled dot products; only their order matters)."""
    return query_rows @ meta_key.repeat_interleave(layer.num_heads // meta_key.shape[1], dim=1).transpose(-1, -2)


class BlocksMode(RetrievalMode):
    """``retrieval="blocks"``: exact attention on the local region (own chunk up to the token plus the previous chunk),
    the sink tokens and the top-k earlier blocks each token selects with its own query (:mod:`bsbr.blocks`,
    :func:`bsbr.blocks.block_attention`). No learned parameters (the meta projections every converted layer has are
    unused).

    ``compression_factor`` must be None. Options: ``block_size`` (default ``chunk_size``; divides it), ``top_k`` (4;
    more than the candidate blocks means all), ``summary`` (``"minmax"``: Quest's bound, or ``"mean"``),
    ``sink_size`` (0), ``selection`` (``"group"``: one choice per key/value group, scores summed over its query
    heads; or ``"head"``), ``dense_layers`` (indices of the layers left as the original full causal attention,
    e.g. ``(0, 1)`` as Quest does), ``positions`` (``"original"``: every key at its own RoPE position; or
    ``"compact"``: sinks at 0..sink_size-1, each retrieved block at sink_size.., the local region right after, so no
    RoPE distance exceeds ``sink_size + block_size + 2·chunk_size`` however long the input — StreamingLLM's and
    InfLLM's answer to positions beyond the trained range; RoPE models only, no dense layers), ``page_size`` (None:
    one summary per block; or tokens per summarised page, dividing ``block_size``: a block scores its best page, as
    Quest scores 16-token pages), ``router`` (``"query"``: each token scores the blocks with its own query; or
    ``"meta"``: BSBR's routing chooses whole chunks (``block_size = chunk_size``, no ``page_size``), one choice per
    chunk, with the layer's meta projections: the meta-query from the mean hidden state of the previous chunk against
    each earlier chunk's meta-key from its own mean — the seed's chunk router, here retrieving exact keys and values
    instead of a chunk state). With ``layer.retrieval = False``: the local region and the sinks only.
    Streaming state: :class:`bsbr.blocks.BlocksState` (every token's keys/values and the block summaries: a KV
    cache, O(tokens)); with ``router="meta"`` a :class:`MetaRoutedState` around it. Attended tokens per query: at most
    ``2·chunk_size + sink_size + top_k·block_size``.
    Sources: Quest (arXiv 2406.10774), InfLLM (arXiv 2402.04617), MoBA (arXiv 2502.13189).
    """

    OPTIONS = ("block_size", "top_k", "summary", "sink_size", "selection", "dense_layers", "positions", "page_size",
               "router")

    @staticmethod
    def add_modules(layer, compression_factor, **options) -> None:
        unknown = sorted(set(options) - set(BlocksMode.OPTIONS))
        if unknown:
            raise ValueError(f"unknown options {unknown} for retrieval='blocks'; accepted: {list(BlocksMode.OPTIONS)}")
        if compression_factor is not None:
            raise ValueError(f"compression_factor must be None for retrieval='blocks' (it keeps exact keys and values), "
                             f"got {compression_factor!r}")
        settings = {"block_size": layer.chunk_size, "top_k": 4, "summary": "minmax", "sink_size": 0,
                    "selection": "group", "positions": "original", "page_size": None, "router": "query", **options}
        dense = settings.pop("dense_layers", ())
        num_layers = layer.config.num_hidden_layers
        if isinstance(dense, (str, bytes)) or not hasattr(dense, "__iter__") or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers for i in dense):
            raise ValueError(f"dense_layers must be layer indices in [0, {num_layers}), got {dense!r}")
        inv_freq = None
        if settings["positions"] == "compact":
            if not hasattr(layer, "rope_inverse_frequencies"):
                raise ValueError(f"positions='compact' needs a RoPE model; {type(layer).__name__} has none")
            if dense:
                raise ValueError(f"dense_layers={dense!r} attend at original positions; with positions='compact' "
                                 "every layer must be a block-retrieval layer (pass dense_layers=())")
            inv_freq = layer.rope_inverse_frequencies()
        check_block_settings(layer.chunk_size, **settings, rope_inv_freq=inv_freq)
        # float64 on the CPU and not a buffer: model.half()/.to(bfloat16) must not round the frequencies (a shift of
        # 60,000 positions would turn by wrong angles); block_attention moves them to the input's device per call
        object.__setattr__(layer, "rope_inv_freq", None if inv_freq is None else inv_freq.detach().double().cpu())
        layer.blocks_options = settings
        layer.dense_layers = tuple(sorted(set(dense)))
        layer.compression = None

    @staticmethod
    def _run(layer, query, key, value, dropout_p, state, return_state, chunk_scores=None):
        options = layer.blocks_options
        if layer.layer_idx in layer.dense_layers:  # the original full causal attention (over the cache)
            return block_attention_unchecked(query, key, value, None, options["block_size"], 0, 0,
                                             options["summary"], "group", dropout_p, state, return_state)
        return block_attention_unchecked(query, key, value, layer.chunk_size, options["block_size"],
                                         options["top_k"] if layer.retrieval else 0, options["sink_size"],
                                         options["summary"], options["selection"], dropout_p, state, return_state,
                                         positions=options["positions"], rope_inv_freq=layer.rope_inv_freq,
                                         page_size=options["page_size"], chunk_scores=chunk_scores)

    @staticmethod
    def _meta_routed(layer) -> bool:
        return layer.blocks_options["router"] == "meta" and layer.layer_idx not in layer.dense_layers

    @staticmethod
    def attend(layer, hidden_states, query, key, value, dropout_p: float) -> torch.Tensor:
        if layer.layer_idx in layer.dense_layers:
            return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True,
                                                  enable_gqa=key.shape[1] != query.shape[1])
        scores = None
        if BlocksMode._meta_routed(layer):  # chunk c routes with the meta-query of chunk c - 1 (row 0: no candidates)
            pooled, _ = _call_chunk_means(hidden_states, None, layer.chunk_size)  # [b, finished chunks, D]
            meta_query, meta_key = layer.meta_from_means(pooled)
            q_chunks = -(-query.shape[2] // layer.chunk_size)
            rows = torch.cat([meta_query.new_zeros(*meta_query.shape[:2], 1, meta_query.shape[3]),
                              meta_query[:, :, : q_chunks - 1]], dim=2)
            scores = _meta_chunk_scores(layer, rows, meta_key)
        return BlocksMode._run(layer, query, key, value, dropout_p, None, False, scores)

    @staticmethod
    def step(layer, hidden_states, query, key, value, state, dropout_p: float):
        if not BlocksMode._meta_routed(layer):
            return BlocksMode._run(layer, query, key, value, dropout_p, state, True)
        size = layer.chunk_size
        seen = 0 if state is None else state.num_tokens
        total = seen + query.shape[2]
        pooled, partial_sum = _call_chunk_means(hidden_states, state, size)  # the chunks this call finishes
        meta_query, meta_key = layer.meta_from_means(pooled)
        if state is None:
            keys = GrowingTensor.of(meta_key)
        else:
            keys = state.meta_key.extended(seen // size, meta_key)
        before = (state.last_query if state is not None and state.last_query is not None
                  else meta_query.new_zeros(*meta_query.shape[:2], 1, meta_query.shape[3]))  # chunk seen//size - 1
        q_chunks = (total - 1) // size - seen // size + 1
        rows = torch.cat([before, meta_query], dim=2)[:, :, :q_chunks]
        scores = _meta_chunk_scores(layer, rows, keys.view(total // size))
        out, blocks = BlocksMode._run(layer, query, key, value, dropout_p, None if state is None else state.blocks,
                                      True, scores)
        last = meta_query[:, :, -1:] if meta_query.shape[2] else (None if state is None else state.last_query)
        return out, MetaRoutedState(blocks, total, partial_sum, keys, last)

    @staticmethod
    def settings(layer) -> tuple[int | None, dict]:
        return None, {**layer.blocks_options, "dense_layers": list(layer.dense_layers)}


RETRIEVAL_MODES["blocks"] = BlocksMode
