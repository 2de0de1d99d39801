"""Useful floating-point operations (the GFLOP/s column), as plain formulas of the shapes.

"Useful" counts the multiply-adds of the two attention matmuls (``Q K^T`` and ``P V``, 2 FLOPs per
multiply-add each, hence the 4) over the query/key pairs the variant is *defined* to compare, not
what an implementation happens to compute (zero-filled or masked work is not useful):

- dilated, group ``i`` with ``h_i`` heads (semantics section 2.1 head partition), segment ``s_i``, rate
  ``r_i``: ``4 * b * h_i * (n / s_i) * (s_i / r_i)**2 * d``, summed over the groups;
- dense attention: ``4 * b * h * n**2 * d``;
- block-sparse: ``4 * b * h * kept * B**2 * d`` with ``kept = density * (n / B)**2`` kept blocks;
- multi-head modules add their four ``E x E`` projections, ``4 * 2 * b * n * E**2``;
- the peak-measuring matmul of two ``n x n`` matrices: ``2 * n**3``.

Causal masking halves the attention terms (for block-sparse: the diagonal blocks count half, the
layout already drops future blocks). Forward + backward is 3 times the forward: the backward pass
does two matmuls for each forward one (:func:`with_backward`).

This module imports nothing from ``benchmarks``; :mod:`benchmarks.variants` says which formula each
variant uses.
"""

from __future__ import annotations

from collections.abc import Sequence


def head_groups(num_heads: int, num_groups: int) -> list[int]:
    """Heads per group under ``head_partition``: ``h // G`` each, one more for the first ``h % G``."""
    return [num_heads // num_groups + (1 if i < num_heads % num_groups else 0) for i in range(num_groups)]


def dilated_flops(batch: int, seq_len: int, heads: int, head_dim: int, segment_lengths: Sequence[int],
                  dilation_rates: Sequence[int], causal: bool = False) -> float:
    """Useful forward FLOPs of dilated attention (head partition), summed over the groups."""
    total = 0.0
    for h_i, s, r in zip(head_groups(heads, len(segment_lengths)), segment_lengths, dilation_rates, strict=True):
        total += 4.0 * batch * h_i * (seq_len / s) * (s / r) ** 2 * head_dim
    return total / 2 if causal else total


def dense_flops(batch: int, seq_len: int, heads: int, head_dim: int, causal: bool = False) -> float:
    """Useful forward FLOPs of dense softmax attention: ``4 b h n^2 d`` (halved when causal)."""
    total = 4.0 * batch * heads * seq_len**2 * head_dim
    return total / 2 if causal else total


def block_sparse_flops(batch: int, seq_len: int, heads: int, head_dim: int, block_size: int, density: float,
                       causal: bool = False) -> float:
    """Useful forward FLOPs of block-sparse attention: ``4 b h kept B^2 d``, ``kept = density nb^2``.

    Under ``causal`` each of the ``nb`` diagonal blocks is half used.
    """
    nb = seq_len // block_size
    kept = density * nb * nb
    if causal:
        kept -= nb / 2
    return 4.0 * batch * heads * kept * block_size**2 * head_dim


def projection_flops(batch: int, seq_len: int, embed_dim: int) -> float:
    """The four ``E x E`` projections of a multi-head module: ``8 b n E^2``."""
    return 8.0 * batch * seq_len * embed_dim**2


def matmul_flops(n: int) -> float:
    """One ``(n, n) @ (n, n)`` matrix product: ``2 n^3``."""
    return 2.0 * n**3


def with_backward(forward: float, backward: bool) -> float:
    """Forward FLOPs, or forward + backward (3 times the forward) when ``backward``."""
    return 3 * forward if backward else forward
