"""jax-dilated: LongNet-style dilated attention for JAX and Flax NNX."""

from jax_dilated.dilated import dilated_attention, improved_dilated_attention
from jax_dilated.block_sparse import block_layout, block_sparse_attention
from jax_dilated.ring import ring_dilated_attention
from jax_dilated.convert import load_torch_checkpoint, load_torch_state_dict, to_torch_state_dict
from jax_dilated.multihead import (
    BlockSparseMultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
    dilated_attention_fn,
)
from jax_dilated.models import LongNetLM

__all__ = [
    "dilated_attention", "improved_dilated_attention",
    "ring_dilated_attention",
    "block_layout", "block_sparse_attention",
    "MultiheadDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "BlockSparseMultiheadDilatedAttention",
    "RingMultiheadDilatedAttention",
    "dilated_attention_fn",
    "load_torch_state_dict",
    "to_torch_state_dict",
    "load_torch_checkpoint",
    "LongNetLM",
]
