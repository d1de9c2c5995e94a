"""Perplexity with a 95% interval, and paired perplexity ratios between variants, by a block bootstrap.

Next-token losses of neighbouring tokens are correlated (a hard passage is hard for many tokens), so resampling single
tokens understates the noise. Here each window's scored positions are cut into contiguous blocks of ``block_size``
tokens and whole blocks are resampled with replacement (the moving-block bootstrap without overlap: Künsch 1989,
Ann. Statist. 17(3); Efron & Tibshirani 1993, ch. 8). A *paired* comparison resamples the same blocks for both
variants, so the noise both share (the text) cancels: the interval of ``ppl_a / ppl_b`` is much narrower than the two
perplexity intervals suggest.

    nll = {"original": nll_0, "terraced": nll_1}            # each [windows, positions], the same tokens
    table = bootstrap_table(nll, reference="original")     # ppl, interval, ratio to the reference, interval

Statistic: ``ppl = exp(Σ nll / Σ tokens)`` over the resampled blocks (a partial last block per window is kept, with
its own token count). Percentile intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from bsbr._checks import check_positive_int

__all__ = ["BLOCK_SIZE", "RESAMPLES", "block_sums", "bootstrap_table", "paired_ratio", "perplexity_interval"]

BLOCK_SIZE = 64  # tokens per resampled block
RESAMPLES = 2000


def _as_array(nll, name: str) -> np.ndarray:
    array = nll.detach().double().cpu().numpy() if isinstance(nll, torch.Tensor) else np.asarray(nll, dtype=float)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name}: per-token losses must be [windows, positions] with at least one token, got shape "
                         f"{array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: per-token losses hold NaN or inf")
    return array


def block_sums(nll, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``nll`` ``[windows, positions]`` (nats per token) into blocks of ``block_size`` contiguous positions per
    window. Returns ``(sums, counts)``, each ``[blocks]`` (``windows · ceil(positions / block_size)`` blocks; a
    partial last block per window keeps its smaller count).

    Raises:
        ValueError: ``nll`` not 2-D, empty or not finite; ``block_size`` not a positive integer.
    """
    check_positive_int(block_size=block_size)
    array = _as_array(nll, "nll")
    windows, positions = array.shape
    starts = np.arange(0, positions, block_size)
    sums = np.add.reduceat(array, starts, axis=1).reshape(-1)  # [windows · blocks per window]
    counts = np.tile(np.minimum(block_size, positions - starts), windows).astype(float)
    return sums, counts


def _resampled_means(nll: Mapping[str, object], block_size: int, resamples: int, seed: int):
    """Mean nll per variant on the data and on ``resamples`` paired block resamples: ``({name: float},
    {name: [resamples]})``."""
    check_positive_int(resamples=resamples)
    if not nll:
        raise ValueError("nll: no variants given")
    arrays = {name: _as_array(values, name) for name, values in nll.items()}
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"nll: every variant must be scored on the same positions, got shapes {shapes}")
    blocks = {name: block_sums(a, block_size) for name, a in arrays.items()}
    counts = next(iter(blocks.values()))[1]
    index = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))  # [resamples, blocks]
    tokens = counts[index].sum(axis=1)  # [resamples]
    point = {name: float(s.sum() / counts.sum()) for name, (s, _) in blocks.items()}
    boot = {name: s[index].sum(axis=1) / tokens for name, (s, _) in blocks.items()}
    return point, boot


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def perplexity_interval(nll, block_size: int = BLOCK_SIZE, resamples: int = RESAMPLES, confidence: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """Perplexity of ``nll`` ``[windows, positions]`` (nats per token) and its block-bootstrap interval:
    ``(ppl, low, high)``.

    Raises:
        ValueError: ``nll`` not 2-D, empty or not finite; ``block_size``/``resamples`` not positive integers;
            ``confidence`` outside (0, 1).
    """
    point, boot = _resampled_means({"nll": nll}, block_size, resamples, seed)
    low, high = _interval(np.exp(boot["nll"]), confidence)
    return math.exp(point["nll"]), low, high


def paired_ratio(nll_a, nll_b, block_size: int = BLOCK_SIZE, resamples: int = RESAMPLES, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``ppl_a / ppl_b`` (= ``exp(mean nll_a − mean nll_b)``) of two variants scored on the same positions, and its
    paired block-bootstrap interval (the same blocks resampled for both): ``(ratio, low, high)``. An interval that
    excludes 1 separates the variants at that confidence.

    Raises:
        ValueError: as :func:`perplexity_interval`, or ``nll_a`` and ``nll_b`` of different shapes.
    """
    point, boot = _resampled_means({"a": nll_a, "b": nll_b}, block_size, resamples, seed)
    low, high = _interval(np.exp(boot["a"] - boot["b"]), confidence)
    return math.exp(point["a"] - point["b"]), low, high


def bootstrap_table(nll: Mapping[str, object], reference: str, block_size: int = BLOCK_SIZE,
                    resamples: int = RESAMPLES, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per variant of ``nll`` (name -> ``[windows, positions]`` nats per token, every variant on the same
    positions), in the given order: ``variant``, ``tokens``, ``ppl``, ``ppl_low``, ``ppl_high`` and ``ratio``,
    ``ratio_low``, ``ratio_high`` (``ppl / ppl[reference]``, paired interval). One set of block resamples serves every
    variant, so the rows are comparable.

    Raises:
        ValueError: ``reference`` not in ``nll``; otherwise as :func:`paired_ratio`.
    """
    if reference not in nll:
        raise ValueError(f"reference {reference!r} is not a variant of nll ({list(nll)})")
    point, boot = _resampled_means(nll, block_size, resamples, seed)
    tokens = int(_as_array(nll[reference], reference).size)
    rows = []
    for name in nll:
        ppl_low, ppl_high = _interval(np.exp(boot[name]), confidence)
        ratio_low, ratio_high = _interval(np.exp(boot[name] - boot[reference]), confidence)
        rows.append({"variant": name, "tokens": tokens, "ppl": math.exp(point[name]), "ppl_low": ppl_low,
                     "ppl_high": ppl_high, "ratio": math.exp(point[name] - point[reference]),
                     "ratio_low": ratio_low, "ratio_high": ratio_high})
    return pd.DataFrame(rows)
