"""Streaming evaluation of a causal LM over a long text: per-token NLL, time and cache size as the context grows.

    cache = BSBRCache(config.num_hidden_layers)            # BSBR-converted model (bsbr.convert)
    # cache = DynamicCache()                               # original transformers model: KV cache
    run = stream_nll(model, ids, cache, piece_size=256, decode_positions=[4096, 8192], decode_steps=4)
    run.nll            # [tokens scored] next-token NLL (nats), position t predicts token t + 1
    run.steps          # one dict per forward call: start/end position, seconds, cache bytes, process RSS

The text is fed left to right in pieces with one cache (``model(piece, cache=cache, use_cache=True)``), so
every token sees the whole text before it, as in one full forward (for a BSBR model the pieces give exactly the logits
of one full forward, :class:`bsbr.convert.BSBRCache`; for the original model the KV cache makes them exact too).
At each of ``decode_positions`` the stream goes on with ``decode_steps`` single-token calls (the text's own next
tokens, so nothing is skipped or repeated): their times are the per-token decoding latency at that context length.
After every call the cache size (:func:`cache_nbytes`) and the process's resident memory (``VmRSS``) are recorded.

Source: BSBR ("Block Sparse attention with Block Retrieval", this project); the KV-cache baseline is
transformers' ``DynamicCache``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from bsbr._checks import check_positive_int
from bsbr.blocks import POSITIONS, SUMMARIES
from bsbr.convert.cache import BSBRCache
from bsbr.measure import proc_status_bytes

__all__ = ["StreamResult", "binned_nll", "blocks_cache_nbytes", "cache_capacity_nbytes", "cache_nbytes",
           "kv_cache_nbytes", "normalized_cache_nbytes", "stream_nll", "stream_schedule", "terraced_cache_nbytes"]


def cache_nbytes(cache) -> int:
    """Bytes held by a decoding cache's tensors.

    Args:
        cache: a :class:`bsbr.convert.BSBRCache` (its :meth:`~bsbr.convert.BSBRCache.nbytes`: chunk states, current
            chunk, sink tokens) or a transformers ``DynamicCache`` (every layer's ``keys`` and ``values``:
            ``element_size · 2 · kv_heads · tokens · head_dim`` per layer).
    Returns:
        bytes (int); 0 for a cache that has seen no token.
    Raises:
        TypeError: any other cache type.
    """
    if isinstance(cache, BSBRCache):
        return int(cache.nbytes())
    if isinstance(cache, DynamicCache):
        total = 0
        for layer in cache.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
    raise TypeError(f"cache must be a bsbr.convert.BSBRCache or a transformers DynamicCache, got {type(cache).__name__}")


def cache_capacity_nbytes(cache) -> int:
    """Bytes *allocated* by a decoding cache's tensors, which may exceed :func:`cache_nbytes` (the rows in use): the
    block-retrieval state (:class:`bsbr.blocks.BlocksState`) grows in buffers that grow by 1.5× when full, so up to
    about 1.5 times its rows are allocated; every other state (and a ``DynamicCache``, which concatenates) allocates what it
    uses.

    Raises:
        TypeError: a cache that is neither a :class:`bsbr.convert.BSBRCache` nor a ``DynamicCache``.
    """
    if isinstance(cache, BSBRCache):
        return sum(state.capacity_nbytes() if hasattr(state, "capacity_nbytes") else state.nbytes()
                   for layer in cache.layers for state in layer.rows or () if state is not None)
    return cache_nbytes(cache)


def kv_cache_nbytes(config, tokens: int, element_size: int = 4) -> int:
    """Bytes of a transformers KV cache (``DynamicCache``) after ``tokens`` tokens of one row:
    ``element_size · 2 · num_key_value_heads · head_dim · tokens`` per layer, times ``num_hidden_layers``.

    Args:
        config: a Llama-family config (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim`` or
            ``hidden_size / num_attention_heads``); tokens: >= 0; element_size: bytes per value (4 for fp32).
    Raises:
        ValueError: ``tokens`` negative.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return element_size * config.num_hidden_layers * 2 * config.num_key_value_heads * d * int(tokens)


def _check_state_args(tokens: int, chunk_size: int, sink_size: int, feature_dim: int) -> None:
    """ValueError for negative ``tokens``/``sink_size`` or non-positive ``chunk_size``/``feature_dim``."""
    check_positive_int(chunk_size=chunk_size, feature_dim=feature_dim)
    if tokens < 0 or sink_size < 0:
        raise ValueError(f"tokens and sink_size must be >= 0, got {tokens} and {sink_size}")


def normalized_cache_nbytes(config, tokens: int, chunk_size: int, sink_size: int, feature_dim: int,
                            element_size: int = 4) -> int:
    """Bytes of a :class:`bsbr.convert.BSBRCache` of a normalised-retrieval BSBR model (retrieval on) after ``tokens``
    tokens of one row: the :class:`bsbr.normalized.NormalizedState` formula summed over the layers.

    Per layer, with ``p = tokens % chunk_size``, ``c = tokens // chunk_size``, ``k = min(sink_size, tokens)``, ``H``
    query / ``G`` key-value heads, head_dim ``d``, hidden size ``D``, ``2f`` features:
    ``element_size · (2·G·(p + k)·d + D + c·(H·2f·(d + 1) + G·d) + [c >= 1]·H·2f·(d + 1))`` (the last term: the
    current chunk's mixed state), 0 before the first token. It grows by ``H·2f·(d + 1) + G·d`` values per layer and
    chunk, i.e. ``(H·2f·(d + 1) + G·d) / chunk_size`` per token, against ``2·G·d`` per token for a KV cache.

    Args:
        config: the model's Llama-family config; tokens: >= 0; chunk_size: >= 1; sink_size: >= 0; feature_dim:
            ``f`` (features per half of the Hedgehog map); element_size: bytes per value (4 for fp32).
    Raises:
        ValueError: negative ``tokens``/``sink_size`` or non-positive ``chunk_size``/``feature_dim``.
    """
    _check_state_args(tokens, chunk_size, sink_size, feature_dim)
    if tokens == 0:
        return 0
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    p, c, k = tokens % chunk_size, tokens // chunk_size, min(sink_size, tokens)
    chunk_values = heads * 2 * feature_dim * (d + 1)
    per_layer = 2 * kv_heads * (p + k) * d + config.hidden_size + c * (chunk_values + kv_heads * d) \
        + (chunk_values if c >= 1 else 0)
    return element_size * config.num_hidden_layers * per_layer


def terraced_cache_nbytes(config, tokens: int, chunk_size: int, sink_size: int, feature_dim: int,
                          element_size: int = 4, retrieve: bool = True) -> int:
    """Bytes of a :class:`bsbr.convert.BSBRCache` of a terraced-retrieval model (:mod:`bsbr.terraced`) after
    ``tokens`` tokens of one row: the :class:`bsbr.terraced.TerracedState` formula summed over the layers.

    Per layer, with ``p = tokens % chunk_size``, ``P = chunk_size`` once a chunk has finished (``tokens >=
    chunk_size``, else 0), ``k = min(sink_size, tokens)``, ``G`` key/value heads, head_dim ``d``, ``2f`` features:
    ``element_size · G · (2·(p + P + k)·d + 2f·(d + 1))`` (the current and previous chunk's keys and values, the sinks,
    and the GQA-shared ``S [2f, d]``, ``z [2f]`` of all older chunks; without the ``2f·(d + 1)`` term when
    ``retrieve`` is False), 0 before the first token. Bounded by ``element_size · G · (2·(2C - 1 + k)·d + 2f·(d + 1))``
    whatever the length, against ``element_size · 2·G·d`` per token for a KV cache.

    Args:
        config: the model's Llama-family config; tokens: >= 0; chunk_size: >= 1; sink_size: >= 0; feature_dim:
            ``f`` (features per half of the Hedgehog map); element_size: bytes per value (4 for fp32); retrieve: the
            layers' retrieval switch.
    Raises:
        ValueError: negative ``tokens``/``sink_size`` or non-positive ``chunk_size``/``feature_dim``.
    """
    _check_state_args(tokens, chunk_size, sink_size, feature_dim)
    if tokens == 0:
        return 0
    kv_heads = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    p, previous, k = tokens % chunk_size, (chunk_size if tokens >= chunk_size else 0), min(sink_size, tokens)
    per_layer = kv_heads * (2 * (p + previous + k) * d + (2 * feature_dim * (d + 1) if retrieve else 0))
    return element_size * config.num_hidden_layers * per_layer


def blocks_cache_nbytes(config, tokens: int, block_size: int, summary: str = "minmax", positions: str = "original",
                        element_size: int = 4, page_size: int | None = None) -> int:
    """Bytes in use (:meth:`bsbr.convert.BSBRCache.nbytes`) of a block-retrieval model (``retrieval="blocks"``,
    :class:`bsbr.blocks.BlocksState`) after ``tokens`` tokens of one row, retrieval on or off alike (the state keeps
    every token either way).

    Per layer, with ``G`` key/value heads and head_dim ``d``: ``element_size · G · d · (r·tokens + parts·(tokens //
    page))`` — every token's key and value (``r = 2``; ``r = 3`` with ``positions="compact"``, which also keeps
    each key rotated to its retrieved position) and ``parts`` summary vectors per finished page (2 for ``"minmax"``,
    1 for ``"mean"``; ``page = page_size or block_size``). Per token that is ``r/2`` times a KV cache's ``2·G·d``
    values, plus the summaries.

    Args:
        config: the model's Llama-family config; tokens: >= 0; block_size: >= 1; summary: a key of
            :data:`bsbr.blocks.SUMMARIES`; positions: one of :data:`bsbr.blocks.POSITIONS`; element_size: bytes per
            value (4 for fp32); page_size: tokens per summarised page (None: one per block).
    Raises:
        ValueError: negative ``tokens``, ``block_size``/``page_size`` not a positive integer, an unknown ``summary``
            or ``positions``.
    """
    check_positive_int(block_size=block_size, page_size=page_size or block_size)
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    if summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {list(SUMMARIES)}, got {summary!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pages = int(tokens) // (page_size or block_size)
    rows = (3 if positions == "compact" else 2) * int(tokens) + SUMMARIES[summary] * pages
    return element_size * config.num_hidden_layers * config.num_key_value_heads * d * rows


def stream_schedule(num_tokens: int, piece_size: int, decode_positions=(), decode_steps: int = 0) -> list[tuple]:
    """The forward calls of a stream: ``(start, end, kind)`` with ``kind`` ``"piece"`` or ``"decode"``.

    Pieces of ``piece_size`` tokens cover ``[0, num_tokens)`` left to right; at each position ``p`` of
    ``decode_positions`` (below ``num_tokens``) the stream runs ``decode_steps`` single-token calls ``p, p+1, ...``
    (cut at ``num_tokens``), and the pieces restart after them. The calls tile ``[0, num_tokens)`` exactly once.

    Raises:
        ValueError: ``num_tokens``/``piece_size`` not positive integers, ``decode_steps`` negative, or
            ``decode_positions`` not strictly increasing non-negative integers at least ``decode_steps`` apart.
    """
    check_positive_int(num_tokens=num_tokens, piece_size=piece_size)
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 0:
        raise ValueError(f"decode_steps must be an integer >= 0, got {decode_steps!r}")
    positions = [int(p) for p in decode_positions]
    if any(p < 0 for p in positions) or any(b < a + max(decode_steps, 1) for a, b in zip(positions, positions[1:])):
        raise ValueError(f"decode_positions must be increasing non-negative integers at least decode_steps="
                         f"{decode_steps} apart, got {list(decode_positions)}")
    calls, start = [], 0
    for stop in [p for p in positions if p < num_tokens and decode_steps] + [num_tokens]:
        while start < stop:
            end = min(start + piece_size, stop)
            calls.append((start, end, "piece"))
            start = end
        if stop < num_tokens:
            for position in range(stop, min(stop + decode_steps, num_tokens)):
                calls.append((position, position + 1, "decode"))
            start = min(stop + decode_steps, num_tokens)
    return calls


@dataclass
class StreamResult:
    """What :func:`stream_nll` measured.

    Attributes:
        nll: ``[scored]`` float32, nats: ``nll[t] = -log p(token t+1 | tokens 0..t)`` for every fed position ``t``
            that has a next token in the text (``scored = min(tokens_fed, num_tokens - 1)``).
        steps: one dict per forward call, in order: ``kind`` ("piece"/"decode"), ``start``, ``end`` (positions,
            tokens), ``tokens``, ``seconds`` (wall time of the model call alone), ``seconds_per_token``,
            ``cache_bytes`` (:func:`cache_nbytes` after the call), ``rss_bytes`` (process ``VmRSS`` after the call,
            None where /proc is unavailable).
        tokens_fed: positions fed (``min(num_tokens, max_tokens)``).
    """

    nll: torch.Tensor
    steps: list = field(default_factory=list)
    tokens_fed: int = 0


def stream_nll(model, input_ids: torch.Tensor, cache, piece_size: int, *, decode_positions=(), decode_steps: int = 0,
               max_tokens: int | None = None, progress=None) -> StreamResult:
    """Feed ``input_ids`` through ``model`` in pieces with one ``cache``; per-token NLL, call times, cache bytes.

    Args:
        model: a causal LM (``model(input_ids=[1, n], cache=cache, use_cache=True).logits`` ``[1, n, vocab]``):
            a BSBR-converted model with a :class:`bsbr.convert.BSBRCache`, or the original with a ``DynamicCache``.
        input_ids: ``[1, num_tokens]`` integer token ids (one row).
        cache: an empty :class:`bsbr.convert.BSBRCache` or ``DynamicCache``; it holds the whole stream afterwards.
        piece_size: tokens per call (>= 1); the pieces' logits equal a full forward's, so this changes speed only.
        decode_positions, decode_steps: single-token calls at these positions (:func:`stream_schedule`).
        max_tokens: stop after this many positions (None: the whole text); e.g. where the original model's KV cache
            gets too slow or leaves its trained context.
        progress: None, or a callable ``progress(tokens)`` called after each call with the tokens it fed (e.g. a
            ``tqdm`` bar's ``update``).
    Returns:
        :class:`StreamResult`. Runs under ``torch.inference_mode``; the model should be in eval mode.
    Raises:
        ValueError: ``input_ids`` not ``[1, n]`` integers with ``n >= 2``, a non-empty cache, ``max_tokens`` < 1 or
            a bad schedule (:func:`stream_schedule`).
        TypeError: a cache of another type (:func:`cache_nbytes`).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
            or input_ids.shape[1] < 2 or input_ids.is_floating_point() or input_ids.is_complex():
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [1, num_tokens >= 2] integer tensor, got {shape}")
    cache_nbytes(cache)  # TypeError for other caches
    if cache.get_seq_length() != 0:
        raise ValueError(f"cache must be empty (it has seen {cache.get_seq_length()} tokens): use a new cache")
    num_tokens = input_ids.shape[1]
    if max_tokens is not None:
        check_positive_int(max_tokens=max_tokens)
    fed = num_tokens if max_tokens is None else min(num_tokens, max_tokens)
    calls = stream_schedule(fed, piece_size, decode_positions, decode_steps)

    nll_parts, steps = [], []
    with torch.inference_mode():
        for start, end, kind in calls:
            piece = input_ids[:, start:end]  # [1, end - start]
            began = time.perf_counter()
            logits = model(input_ids=piece, cache=cache, use_cache=True).logits  # [1, end - start, vocab]
            seconds = time.perf_counter() - began
            scored = min(end, num_tokens - 1) - start  # positions of this call with a next token in the text
            if scored > 0:
                log_probs = F.log_softmax(logits[0, :scored].float(), dim=-1)  # [scored, vocab]
                targets = input_ids[0, start + 1:start + 1 + scored]  # [scored]
                nll_parts.append(-log_probs.gather(-1, targets[:, None].long())[:, 0])
            del logits
            steps.append({"kind": kind, "start": start, "end": end, "tokens": end - start, "seconds": seconds,
                          "seconds_per_token": seconds / (end - start), "cache_bytes": cache_nbytes(cache),
                          "rss_bytes": proc_status_bytes("VmRSS")})
            if progress is not None:
                progress(end - start)
    nll = torch.cat(nll_parts) if nll_parts else torch.zeros(0)
    return StreamResult(nll=nll.float(), steps=steps, tokens_fed=fed)


def binned_nll(nll: torch.Tensor, bin_size: int) -> list[dict]:
    """Mean NLL and perplexity per bin of positions, and cumulative up to each bin's end.

    Args:
        nll: ``[scored]`` per-position NLL in nats (``nll[t]`` predicts token ``t + 1``, as :attr:`StreamResult.nll`).
        bin_size: positions per bin (>= 1); the last bin may be shorter.
    Returns:
        one dict per bin, in order: ``bin`` (index), ``start``, ``end`` (positions ``[start, end)``), ``tokens``,
        ``nll`` (mean, nats), ``ppl`` (``exp`` of it), ``cumulative_nll``, ``cumulative_ppl`` (positions ``[0, end)``).
    Raises:
        ValueError: ``bin_size`` not a positive integer, or ``nll`` not 1-D.
    """
    check_positive_int(bin_size=bin_size)
    if nll.dim() != 1:
        raise ValueError(f"nll must be 1-D [scored], got shape {list(nll.shape)}")
    values = nll.double()
    cumulative = torch.cumsum(values, 0)
    rows = []
    for index, start in enumerate(range(0, values.shape[0], bin_size)):
        end = min(start + bin_size, values.shape[0])
        mean = values[start:end].mean().item()
        total = cumulative[end - 1].item() / end
        rows.append({"bin": index, "start": start, "end": end, "tokens": end - start, "nll": mean,
                     "ppl": math.exp(mean), "cumulative_nll": total, "cumulative_ppl": math.exp(total)})
    return rows
