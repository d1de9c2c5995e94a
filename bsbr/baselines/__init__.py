"""Baseline attention architectures, one file each (sources in each module's docstring)."""

from bsbr.baselines.delta_net import DeltaNet
from bsbr.baselines.gau import GAU
from bsbr.baselines.hopfield import HopfieldAttention
from bsbr.baselines.linear import LinearAttention
from bsbr.baselines.sliding_window import SlidingWindowAttention
from bsbr.baselines.standard import StandardAttention

__all__ = ["DeltaNet", "GAU", "HopfieldAttention", "LinearAttention", "SlidingWindowAttention", "StandardAttention"]
