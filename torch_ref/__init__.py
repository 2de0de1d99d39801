"""torch_ref: the PyTorch mirror of jax_dilated (same functions and modules, same names)."""

from torch_ref.dilated import DilatedAttention, ImprovedDilatedAttention, dilated_attention, improved_dilated_attention
from torch_ref.ring import RingDilatedAttention, ring_dilated_attention
from torch_ref.block_sparse import BlockSparseDilatedAttention, block_layout, block_sparse_attention
from torch_ref.multihead import (
    BlockSparseMultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
)
from torch_ref.models import LongNetLM

__all__ = ["dilated_attention", "improved_dilated_attention", "DilatedAttention", "ImprovedDilatedAttention",
           "ring_dilated_attention", "RingDilatedAttention",
           "block_layout", "block_sparse_attention", "BlockSparseDilatedAttention",
           "MultiheadDilatedAttention", "ImprovedMultiheadDilatedAttention", "BlockSparseMultiheadDilatedAttention", "RingMultiheadDilatedAttention",
           "LongNetLM"]
