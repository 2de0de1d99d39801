"""jax-dilated: LongNet-style dilated attention for JAX and Flax NNX."""

from jax_dilated.dilated import dilated_attention, improved_dilated_attention

__all__ = ["dilated_attention", "improved_dilated_attention"]
