"""The plain float64 rendering of docs/semantics.md section 5 (block layouts, block-sparse attention). Tests only.

The layout follows the ordering rules word for word with explicit loops; the attention is dense
softmax attention with the layout expanded to an element mask.
"""

from __future__ import annotations

import math

import numpy as np

from parity_tests.reference import dense_attention


def budget(nb: int, sparsity_ratio: float) -> int:
    """``k = max(1, nb - floor(sparsity_ratio * nb))`` in Python float arithmetic."""
    return max(1, nb - math.floor(sparsity_ratio * nb))


def ordered_candidates(i: int, nb: int, pattern: str, global_blocks: int, is_causal: bool) -> list[int]:
    """The candidate key blocks of query block ``i`` in the pattern's order (semantics 5)."""
    candidates = [j for j in range(nb) if not (is_causal and j > i)]
    order: list[int] = []

    def push(j):
        if j in candidates and j not in order:
            order.append(j)

    def nearest_first():
        for dist in range(nb):
            for j in (i - dist, i + dist):  # the smaller j first on ties
                push(j)

    if pattern == "local_window":
        nearest_first()
    elif pattern == "dilated_sparse":
        push(i)
        dist = 1
        while dist < nb:
            push(i - dist)
            push(i + dist)
            dist *= 2
        nearest_first()
    elif pattern == "global_local":
        for j in range(global_blocks):
            push(j)
        nearest_first()
    else:
        raise ValueError(pattern)
    assert sorted(order) == candidates
    return order


def block_layout(n: int, block_size: int, pattern: str, sparsity_ratio: float, global_blocks: int = 1,
                 is_causal: bool = False) -> np.ndarray:
    """``(nb, nb)`` bool, ``nb = ceil(n / block_size)``: each row keeps the first ``k`` of its ordered candidates."""
    nb = -(-n // block_size)
    k = budget(nb, sparsity_ratio)
    layout = np.zeros((nb, nb), dtype=bool)
    for i in range(nb):
        for j in ordered_candidates(i, nb, pattern, global_blocks, is_causal)[:k]:
            layout[i, j] = True
    return layout


def block_sparse_attention(q, k, v, block_size, pattern, sparsity_ratio, global_blocks=1, is_causal=False,
                           scale=None, key_padding_mask=None):
    """Dense float64 attention under the expanded layout (and causal, and key padding). q ``(b, n, h, d)``,
    k, v ``(b, n, h_kv, d)`` (query head ``j`` uses kv head ``j // (h / h_kv)``); any ``n``: position ``p``
    is in block ``p // block_size``."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, n, h = q.shape[:3]
    k, v = np.repeat(k, h // k.shape[2], axis=2), np.repeat(v, h // v.shape[2], axis=2)
    layout = block_layout(n, block_size, pattern, sparsity_ratio, global_blocks, is_causal)
    blocks = np.arange(n) // block_size
    allowed = layout[blocks[:, None], blocks[None, :]]
    if key_padding_mask is None:
        return dense_attention(q, k, v, is_causal=is_causal, scale=scale, allowed=allowed)
    pad = np.asarray(key_padding_mask, dtype=bool)
    return np.concatenate([
        dense_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], is_causal=is_causal, scale=scale,
                        allowed=allowed & ~pad[i][None, :])
        for i in range(b)
    ])
