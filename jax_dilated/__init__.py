"""jax-dilated: LongNet-style dilated attention for JAX and Flax NNX.

Functions take ``(batch, seq, heads, head_dim)`` arrays (the ``jax.nn.dot_product_attention``
layout); modules take ``(batch, seq, embed_dim)``. docs/semantics.md says what each computes.
"""

from dilated_plan import block_layout
from jax_dilated.block_sparse import block_sparse_attention
from jax_dilated.convert import load_torch_checkpoint, load_torch_state_dict, to_torch_state_dict
from jax_dilated.decode import dilated_attention_decode
from jax_dilated.dilated import dilated_attention, improved_dilated_attention
from jax_dilated.flax_interop import dilated_attention_fn
from jax_dilated.models import LongNetLM
from jax_dilated.multihead import (
    BlockSparseMultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
)
from jax_dilated.ring import from_zigzag, ring_dilated_attention, to_zigzag

__all__ = [
    "BlockSparseMultiheadDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "LongNetLM",
    "MultiheadDilatedAttention",
    "RingMultiheadDilatedAttention",
    "block_layout",
    "block_sparse_attention",
    "dilated_attention",
    "dilated_attention_decode",
    "dilated_attention_fn",
    "from_zigzag",
    "improved_dilated_attention",
    "load_torch_checkpoint",
    "load_torch_state_dict",
    "ring_dilated_attention",
    "to_zigzag",
    "to_torch_state_dict",
]
