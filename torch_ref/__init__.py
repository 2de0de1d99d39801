"""torch_ref: the PyTorch mirror of jax_dilated (same functions and modules, same names).

Functions take ``(batch, seq, heads, head_dim)`` tensors; modules take ``(batch, seq, embed_dim)``.
docs/semantics.md says what each computes.
"""

from dilated_plan import block_layout
from torch_ref.block_sparse import BlockSparseDilatedAttention, block_sparse_attention
from torch_ref.convert import state_dict_from_numpy
from torch_ref.decode import KVCache, dilated_attention_decode
from torch_ref.dilated import DilatedAttention, ImprovedDilatedAttention, dilated_attention, improved_dilated_attention
from torch_ref.models import LongNetLM
from torch_ref.multihead import (
    BlockSparseMultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
)
from torch_ref.ring import RingDilatedAttention, from_zigzag, ring_dilated_attention, to_zigzag

__all__ = [
    "BlockSparseDilatedAttention",
    "BlockSparseMultiheadDilatedAttention",
    "DilatedAttention",
    "ImprovedDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "KVCache",
    "LongNetLM",
    "MultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "block_layout",
    "block_sparse_attention",
    "dilated_attention",
    "dilated_attention_decode",
    "from_zigzag",
    "improved_dilated_attention",
    "ring_dilated_attention",
    "to_zigzag",
    "state_dict_from_numpy",
]
