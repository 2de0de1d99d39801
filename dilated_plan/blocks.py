"""Block-sparse layouts (docs/semantics.md section 5): which key blocks each query block keeps.

The sequence is cut into ``nb = ceil(n / block_size)`` blocks (the last one shorter when ``n`` is not a
multiple of the block size). Every query block keeps a budget of
``k = max(1, nb - floor(sparsity_ratio * nb))`` key blocks, chosen by a pattern's ordering of the
candidate key blocks. Both frameworks gather the kept key/value blocks from the same tables.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import numpy as np

from dilated_plan.checks import check_is_causal

PATTERNS = ("local_window", "dilated_sparse", "global_local")


def check_block_options(block_size: Any, pattern: Any, sparsity_ratio: Any, global_blocks: Any) -> None:
    """Raise ValueError unless the block-sparse options are valid (whatever the sequence length)."""
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive integer, e.g. 128.")
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r} is unknown; use one of {PATTERNS}.")
    if (
        isinstance(sparsity_ratio, (bool, np.bool_))
        or not isinstance(sparsity_ratio, numbers.Real)
        or not 0.0 <= float(sparsity_ratio) < 1.0
    ):
        raise ValueError(
            f"sparsity_ratio={sparsity_ratio!r} is outside [0, 1); pass the fraction of key blocks each "
            f"query block drops, e.g. 0.9."
        )
    if (
        isinstance(global_blocks, (bool, np.bool_))
        or not isinstance(global_blocks, (int, np.integer))
        or global_blocks < 0
    ):
        raise ValueError(
            f"global_blocks={global_blocks!r} must be an integer >= 0 (the number of leading key blocks "
            f"every query block sees first under pattern='global_local')."
        )


def block_budget(num_blocks: int, sparsity_ratio: float) -> int:
    """Key blocks kept per query block: ``max(1, nb - floor(sparsity_ratio * nb))``."""
    return max(1, num_blocks - math.floor(float(sparsity_ratio) * num_blocks))


def _candidate_order(i: int, num_blocks: int, pattern: str, global_blocks: int, is_causal: bool) -> list[int]:
    """The candidate key blocks of query block ``i``, most wanted first."""
    last = i if is_causal else num_blocks - 1
    nearest = sorted(range(last + 1), key=lambda j: (abs(i - j), j))
    if pattern == "dilated_sparse":
        first, dist = [i], 1
        while dist <= max(i, last - i):
            first += [j for j in (i - dist, i + dist) if 0 <= j <= last]
            dist *= 2
    elif pattern == "global_local":
        first = list(range(min(global_blocks, last + 1)))
    else:
        first = []
    return list(dict.fromkeys(first + nearest))


@functools.lru_cache(maxsize=128)
def _layout(num_blocks: int, pattern: str, sparsity_ratio: float, global_blocks: int, is_causal: bool) -> np.ndarray:
    budget = block_budget(num_blocks, sparsity_ratio)
    layout = np.zeros((num_blocks, num_blocks), dtype=bool)
    for i in range(num_blocks):
        layout[i, _candidate_order(i, num_blocks, pattern, global_blocks, is_causal)[:budget]] = True
    layout.setflags(write=False)
    return layout


def block_layout(
    n: int,
    block_size: int,
    pattern: str = "dilated_sparse",
    sparsity_ratio: float = 0.9,
    global_blocks: int = 1,
    is_causal: bool = False,
) -> np.ndarray:
    """The ``(nb, nb)`` boolean block layout: ``layout[i, j]`` iff query block ``i`` keeps key block ``j``.

    ``nb = ceil(n / block_size)``: a sequence that is not a multiple of the block size has a shorter
    last block.

    Every row keeps ``min(k, #candidates)`` blocks, ``k = max(1, nb - floor(sparsity_ratio * nb))``;
    with ``is_causal`` the candidates of row ``i`` are ``j <= i``. Patterns order the candidates:
    ``local_window`` nearest first (smaller ``j`` on ties); ``dilated_sparse`` ``i``, then
    ``i -+ 1, 2, 4, ...``, then nearest first; ``global_local`` blocks ``0 .. global_blocks-1``, then
    nearest first (``global_blocks`` only changes ``global_local``; it is validated for every pattern).

    >>> block_layout(8, 2, "local_window", 0.5).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 1, 1, 0],
           [0, 0, 1, 1]])
    """
    check_block_options(block_size, pattern, sparsity_ratio, global_blocks)
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n={n!r} must be a sequence length, an integer >= 0.")
    return _layout(
        -(-int(n) // int(block_size)), pattern, float(sparsity_ratio), int(global_blocks), check_is_causal(is_causal)
    ).copy()


@dataclasses.dataclass(frozen=True)
class BlockTables:
    """Static gather tables of a layout.

    Attributes:
      index: ``(nb, w)`` int32, the kept key blocks of each query block (off-diagonal ones when causal),
        padded with block 0.
      valid: ``(nb, w)`` bool, False on the padding.
      diagonal: ``(nb,)`` bool, whether a causal row keeps its own (element-wise masked) block; all
        False without ``is_causal``.
    """

    index: np.ndarray
    valid: np.ndarray
    diagonal: np.ndarray

    @property
    def width(self) -> int:
        """Kept off-diagonal key blocks per query block, ``w``."""
        return self.index.shape[1]


@functools.lru_cache(maxsize=128)
def block_tables(
    num_blocks: int, pattern: str, sparsity_ratio: float, global_blocks: int, is_causal: bool
) -> BlockTables:
    """The :class:`BlockTables` of a layout of ``num_blocks`` blocks (arguments already validated).

    Without ``is_causal`` row ``i`` lists all its kept key blocks. With ``is_causal`` the diagonal
    block is left out of the list (it needs the element-wise causal mask) and ``diagonal[i]`` says
    whether row ``i`` keeps it.
    """
    layout = _layout(num_blocks, pattern, sparsity_ratio, global_blocks, is_causal)
    diagonal = layout.diagonal().copy() if is_causal else np.zeros(num_blocks, dtype=bool)
    rows = [np.flatnonzero(layout[i]) for i in range(num_blocks)]
    if is_causal:
        rows = [r[r != i] for i, r in enumerate(rows)]
    width = max((len(r) for r in rows), default=0)
    index = np.zeros((num_blocks, width), dtype=np.int32)
    valid = np.zeros((num_blocks, width), dtype=bool)
    for i, r in enumerate(rows):
        index[i, : len(r)] = r
        valid[i, : len(r)] = True
    for a in (index, valid, diagonal):
        a.setflags(write=False)
    return BlockTables(index, valid, diagonal)


def chunk_blocks(num_blocks: int, scores_per_block: int, budget: int) -> int:
    """Query blocks per loop step: the largest divisor of ``num_blocks`` whose scores fit ``budget`` (>= 1)."""
    fits = [c for c in range(1, num_blocks + 1) if num_blocks % c == 0 and c * scores_per_block <= budget]
    return max(fits, default=1)
