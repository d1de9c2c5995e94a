"""Variants of one converted model compared on common positions, state sizes, and converted-vs-original layer timings.

Notebook 03 (chunk size × state compression of the terraced conversion) is built from these steps:

    scores = score_variants(base, {"exact c256": lm_a, "terraced c256": lm_b}, windows, start=2048,
                            exact_until={"exact c256": 512, "terraced c256": 512})
    scores.nll["terraced c256"]         # [windows, positions] next-token NLL (nats) of the positions start .. n - 2
    scores.state_bytes["terraced c256"]  # BSBRCache.nbytes() after streaming the first window (n tokens)
    table = state_table(config, [64, 256], [None, 4], sink_size=4, tokens=[2048, 40960])   # formula, vs KV cache
    rows = layer_timings(config, [8192], [128, 256], sink_size=4, repeats=3)   # fresh process per point
    range_verdict(rows[1]["times_s"], rows[0]["times_s"])                     # "faster" / "slower" / "tie"

Scoring: every variant and the original run on the same windows ``[windows, n]``; the logits at position ``t`` score
token ``t + 1``, and only the positions ``start .. n - 2`` are scored, so every variant is compared on the same tokens.
Per scored token: NLL, KL(original ‖ variant) (nats) and whether the greedy tokens agree (top-1). Two exactness checks
ride along on the first window: the positions a variant computes exactly (``exact_until``: for the terraced retrieval
its first two chunks, where every token attends to everything before it) must give the original's logits, and the
first variant streamed in pieces through a :class:`bsbr.convert.BSBRCache` must give its full forward's logits.

Timing: one SmolLM2-shaped attention layer, original (torch's fused causal SDPA) and terraced (``llama_terraced`` of
:mod:`bsbr.benchmarks`, uncompressed), each point in a fresh process (:func:`bsbr.benchmarks.measure_attention`): the
peak memory of a point is the RSS high-water mark that process's calls added over its own baseline, never a mark left
by an earlier, bigger point. The machine's 1-minute load average (:func:`bsbr.provenance.load_average`) is read right
before each point. A timing comparison is decided by the ranges of the repeats (:func:`range_verdict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F

from bsbr._checks import check_positive_int
from bsbr.benchmarks import measure_attention
from bsbr.convert import BSBRCache
from bsbr.provenance import load_average
from bsbr.streaming_eval import kv_cache_nbytes, terraced_cache_nbytes

__all__ = ["VariantScores", "layer_timings", "range_verdict", "score_variants", "state_table"]


@dataclass
class VariantScores:
    """What :func:`score_variants` measured; per-token tensors are ``[windows, positions]`` over the scored positions.

    Attributes:
        nll: variant -> next-token NLL (nats), ``"original"`` included.
        kl: variant -> KL(original ‖ variant) of the next-token distributions (nats).
        top1: variant -> 1.0 where the variant's greedy token is the original's.
        state_bytes: variant -> ``BSBRCache.nbytes()`` after streaming the first window (all ``n`` tokens).
        exact_diff: variant -> max |logit − original logit| over positions ``< exact_until[variant]``, first window.
        stream_diff: max |logit| difference between the first variant streamed and its full forward, first window.
    """

    nll: dict[str, torch.Tensor] = field(default_factory=dict)
    kl: dict[str, torch.Tensor] = field(default_factory=dict)
    top1: dict[str, torch.Tensor] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)
    exact_diff: dict[str, float] = field(default_factory=dict)
    stream_diff: float = float("nan")


def _streamed_hidden(lm, input_ids: torch.Tensor, piece_size: int) -> tuple[torch.Tensor, int]:
    """Final hidden states ``[1, n, hidden]`` of ``lm`` fed ``input_ids [1, n]`` in pieces with one BSBRCache, and the
    cache's bytes at the end."""
    cache = BSBRCache(lm.config.num_hidden_layers)
    pieces = [lm.model(input_ids=input_ids[:, i : i + piece_size], cache=cache, use_cache=True).last_hidden_state
              for i in range(0, input_ids.shape[1], piece_size)]
    return torch.cat(pieces, dim=1), int(cache.nbytes())


def score_variants(base, variants: Mapping[str, object], windows: torch.Tensor, start: int,
                   exact_until: Mapping[str, int], piece_size: int | None = None) -> VariantScores:
    """Score the original causal LM ``base`` and each converted variant on the positions ``start .. n - 2`` of every
    window (module docstring).

    The first window is streamed through each variant in pieces of ``piece_size`` tokens (a fresh
    :class:`bsbr.convert.BSBRCache` each: its bytes are the variant's measured state), the other windows run as one
    full forward. Runs under ``torch.inference_mode()``, one window and one variant at a time: memory holds two
    ``[positions, vocab]`` logit tensors, not one per variant.

    Args:
        base: the original Llama-family causal LM (``model``, ``lm_head``).
        variants: name -> a converted model of ``base`` (``"original"`` is reserved); at least one.
        windows: ``[windows, n]`` token ids.
        start: first scored position, in ``[0, n - 1)``.
        exact_until: name -> how many leading positions the variant computes exactly (compared with the original
            on the first window); every variant needs one, in ``[0, n]``.
        piece_size: tokens per streamed piece; None = ``n // 2 + 1`` (two pieces, the first ending mid-chunk).
    Returns:
        :class:`VariantScores`.
    Raises:
        ValueError: no variants, a variant named ``"original"``, ``start``, ``exact_until`` or ``piece_size`` out of
            range, ``windows`` not 2-D.
    """
    if windows.ndim != 2:
        raise ValueError(f"windows must be [windows, n] token ids, got shape {tuple(windows.shape)}")
    n = windows.shape[1]
    if not variants or "original" in variants:
        raise ValueError(f"variants must name at least one converted model and none 'original', got {list(variants)}")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < n - 1:
        raise ValueError(f"start must be an integer in [0, n - 1 = {n - 1}), got {start!r}")
    if set(exact_until) != set(variants) or not all(0 <= int(v) <= n for v in exact_until.values()):
        raise ValueError(f"exact_until must give every variant ({list(variants)}) a position count in [0, {n}], "
                         f"got {dict(exact_until)}")
    piece_size = n // 2 + 1 if piece_size is None else piece_size
    check_positive_int(piece_size=piece_size)
    head_len = max(exact_until.values())
    scores = VariantScores()
    parts: dict[str, dict[str, list]] = {name: {"nll": [], "kl": [], "top1": []} for name in ["original", *variants]}
    with torch.inference_mode():
        for w in range(windows.shape[0]):
            x = windows[w : w + 1]  # [1, n]
            target = x[0, start + 1 :]  # [positions]: the tokens the scored positions predict
            hidden = base.model(input_ids=x).last_hidden_state  # [1, n, hidden]
            reference = base.lm_head(hidden[0, start : n - 1]).log_softmax(-1)  # [positions, vocab]
            reference_top = reference.argmax(-1)
            parts["original"]["nll"].append(-reference.gather(-1, target[:, None])[:, 0])
            parts["original"]["kl"].append(torch.zeros_like(target, dtype=reference.dtype))
            parts["original"]["top1"].append(torch.ones_like(target, dtype=reference.dtype))
            reference_head = base.lm_head(hidden[0, :head_len]) if w == 0 else None  # [head_len, vocab]
            for index, (name, lm) in enumerate(variants.items()):
                if w == 0:
                    variant_hidden, scores.state_bytes[name] = _streamed_hidden(lm, x, piece_size)
                    if index == 0:
                        full = lm.model(input_ids=x).last_hidden_state
                        scores.stream_diff = (lm.lm_head(full[0, start:]) - lm.lm_head(variant_hidden[0, start:])
                                              ).abs().max().item()
                    until = int(exact_until[name])
                    scores.exact_diff[name] = (lm.lm_head(variant_hidden[0, :until]) - reference_head[:until]
                                               ).abs().max().item() if until else 0.0
                else:
                    variant_hidden = lm.model(input_ids=x).last_hidden_state
                log_probs = lm.lm_head(variant_hidden[0, start : n - 1]).log_softmax(-1)  # [positions, vocab]
                parts[name]["nll"].append(-log_probs.gather(-1, target[:, None])[:, 0])
                parts[name]["kl"].append(F.kl_div(log_probs, reference, log_target=True, reduction="none").sum(-1))
                parts[name]["top1"].append((log_probs.argmax(-1) == reference_top).to(reference.dtype))
    for name, metrics in parts.items():
        scores.nll[name], scores.kl[name], scores.top1[name] = (torch.stack(metrics[m]) for m in ("nll", "kl", "top1"))
    return scores


def state_table(config, chunk_sizes: Iterable[int], compression_factors: Iterable[int | None], sink_size: int,
                tokens: Iterable[int], element_size: int = 4) -> pd.DataFrame:
    """Terraced state bytes by formula (:func:`bsbr.streaming_eval.terraced_cache_nbytes`) against the original's KV
    cache (:func:`bsbr.streaming_eval.kv_cache_nbytes`), both ``element_size`` bytes per value.

    One row per ``(tokens, chunk_size, compression_factor)``: ``compression_factor`` 1 = uncompressed (``None``),
    ``feature_dim = head_dim / compression_factor``, ``state_bytes``, ``kv_cache_bytes``, ``state_vs_kv_cache``; plus
    one row per ``(tokens, chunk_size)`` with ``variant = "exact_region"`` (retrieval off: no feature-space state,
    ``compression_factor`` 0, ``feature_dim`` 0); the others have ``variant = "terraced"``. Sorted by tokens, chunk
    size, variant, compression factor.

    Raises:
        ValueError: a compression factor that does not divide ``head_dim``; as ``terraced_cache_nbytes`` otherwise.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factors = [factor or 1 for factor in compression_factors]
    bad = [factor for factor in factors if head_dim % factor]
    if bad:
        raise ValueError(f"compression_factors: {bad} do not divide head_dim={head_dim}")
    rows = []
    for n in tokens:
        kv = kv_cache_nbytes(config, n, element_size)
        for chunk_size in chunk_sizes:
            exact = terraced_cache_nbytes(config, n, chunk_size, sink_size, head_dim, element_size, retrieve=False)
            rows.append({"tokens": n, "chunk_size": chunk_size, "variant": "exact_region", "compression_factor": 0,
                         "feature_dim": 0, "state_bytes": exact})
            for factor in factors:
                rows.append({"tokens": n, "chunk_size": chunk_size, "variant": "terraced", "compression_factor": factor,
                             "feature_dim": head_dim // factor, "state_bytes": terraced_cache_nbytes(
                                 config, n, chunk_size, sink_size, head_dim // factor, element_size)})
        for row in rows:
            row.setdefault("kv_cache_bytes", kv)
    table = pd.DataFrame(rows)
    table["state_vs_kv_cache"] = table.state_bytes / table.kv_cache_bytes
    return table.sort_values(["tokens", "chunk_size", "variant", "compression_factor"]).reset_index(drop=True)


def layer_timings(config, seq_lens: Sequence[int], chunk_sizes: Sequence[int], sink_size: int, repeats: int,
                  warmup: int = 1, threads: int | None = None, seed: int = 0, timeout: float | None = None) -> list[dict]:
    """One SmolLM2-shaped attention layer at each length: the original (``llama_original``) and the terraced conversion
    at each chunk size (``llama_terraced``, uncompressed), each point in a fresh process.

    Args:
        config: the model's Llama-family config (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``).
        seq_lens: tokens per call; chunk_sizes: the terraced layer's chunk sizes (each >= ``sink_size``).
        sink_size, repeats, warmup, threads, seed, timeout: as :func:`bsbr.benchmarks.measure_attention`.
    Returns:
        one dict per point, for each length the original first: :func:`bsbr.benchmarks.measure_attention`'s result
        (``median_s``, ``min_s``, ``max_s``, ``times_s``, ``peak_bytes``, ...) with ``variant`` (``"original"`` or
        ``"terraced"``), ``chunk_size`` 0 for the original, and ``load_1min`` (the 1-minute load average read right
        before the point; None where the platform has none).
    Raises:
        ValueError, RuntimeError: as :func:`bsbr.benchmarks.measure_attention`.
    """
    shape = dict(hidden_dim=config.hidden_size, num_heads=config.num_attention_heads,
                 num_key_value_heads=config.num_key_value_heads, sink_size=sink_size, repeats=repeats,
                 warmup=warmup, threads=threads, seed=seed, timeout=timeout)
    rows = []
    for n in seq_lens:
        for variant, chunk_size in [("original", 0)] + [("terraced", c) for c in chunk_sizes]:
            load = load_average()
            impl = "llama_original" if variant == "original" else "llama_terraced"
            result = measure_attention(impl, n, chunk_size=chunk_size or max(chunk_sizes), **shape)
            rows.append({**result, "variant": variant, "chunk_size": chunk_size,
                         "load_1min": None if load is None else load[0]})
    return rows


def range_verdict(candidate: Sequence[float], reference: Sequence[float]) -> str:
    """``"faster"`` if every ``candidate`` time is below every ``reference`` time (seconds), ``"slower"`` if every one
    is above, else ``"tie"`` (the ranges overlap: the repeats cannot tell them apart).

    Raises:
        ValueError: an empty sequence.
    """
    if not len(candidate) or not len(reference):
        raise ValueError("candidate and reference need at least one time each")
    if max(candidate) < min(reference):
        return "faster"
    if min(candidate) > max(reference):
        return "slower"
    return "tie"
