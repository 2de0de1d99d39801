"""Attention kernels of the torch mirror: the plain autograd form and SDPA (see docs/torch_core.md)."""

from torch_ref.kernels.plain import attend, stats_dtype
from torch_ref.kernels.sdpa import sdpa_attention

__all__ = ["attend", "sdpa_attention", "stats_dtype"]
