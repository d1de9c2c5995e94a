"""Baseline attention architectures, one file each."""

from bsbr.baselines.standard import StandardAttention

__all__ = ["StandardAttention"]
