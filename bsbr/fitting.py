"""Power-law fits of measurements against sequence length: ``time = prefactor * seq_len ** exponent``.

    exponent, prefactor, r2 = fit_power_law([1024, 2048, 4096], [0.011, 0.023, 0.047])

A straight-line least-squares fit in log-log space (``log time = exponent · log seq_len + log prefactor``), the
usual way to read an empirical scaling exponent off a timing or memory curve.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fit_power_law"]


def fit_power_law(seq_lens, times) -> tuple[float, float, float]:
    """Least-squares fit of ``time = prefactor * seq_len ** exponent`` in log-log space.

    Args:
        seq_lens: at least two distinct positive lengths (tokens).
        times: positive values (any unit, e.g. seconds or bytes), one per length.
    Returns:
        ``(exponent, prefactor, r2)``; ``prefactor`` is in the unit of ``times``, ``r2`` is the coefficient of
        determination of the log-log fit (1.0 for an exact power law).
    Raises:
        ValueError: different lengths, fewer than two distinct lengths, or non-positive/non-finite values.
    """
    x = np.asarray(seq_lens, dtype=float)
    y = np.asarray(times, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"seq_lens and times must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("seq_lens and times must be finite and positive")
    if np.unique(x).size < 2:
        raise ValueError("fit_power_law needs at least two distinct seq_lens")
    log_x, log_y = np.log(x), np.log(y)
    exponent, intercept = np.polyfit(log_x, log_y, 1)
    residual = log_y - (exponent * log_x + intercept)
    total = np.sum((log_y - log_y.mean()) ** 2)
    r2 = 1.0 - float(np.sum(residual**2)) / float(total) if total > 0 else 1.0
    return float(exponent), float(math.exp(intercept)), float(r2)
