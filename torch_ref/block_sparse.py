"""Block layouts and block-sparse attention (SPEC.md section 5), the torch mirror of ``jax_dilated.block_sparse``.

The sequence is cut into ``nb = n / block_size`` blocks. Every query block keeps a budget of
``k = max(1, nb - floor(sparsity_ratio * nb))`` key blocks, chosen by a pattern's ordering of the
candidate key blocks. :func:`block_layout` returns that choice as an ``(nb, nb)`` boolean matrix.
:func:`block_sparse_attention` gathers the kept key/value blocks of every query block and runs one
exact softmax over all their keys, so its cost is ``O(n * k * block_size)``, never ``O(n^2)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_ref._config import check_dropout, check_key_padding_mask, check_qkv, default_scale

Tensor = torch.Tensor

PATTERNS = ("local_window", "dilated_sparse", "global_local")


def check_block_options(n: int, block_size: Any, pattern: Any, sparsity_ratio: Any, global_blocks: Any) -> None:
    """Raise ValueError unless the block-sparse options are valid for sequence length ``n``."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive integer, e.g. 128.")
    if n % block_size:
        raise ValueError(
            f"sequence length {n} is not divisible by block_size {block_size}; pad the sequence to a "
            f"multiple of {block_size} or choose a block_size that divides {n}."
        )
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r} is unknown; use one of {PATTERNS}.")
    if (isinstance(sparsity_ratio, bool) or not isinstance(sparsity_ratio, (int, float, np.integer, np.floating))
            or not 0.0 <= float(sparsity_ratio) < 1.0):
        raise ValueError(
            f"sparsity_ratio={sparsity_ratio!r} is outside [0, 1); pass the fraction of key blocks each "
            f"query block drops, e.g. 0.9."
        )
    if isinstance(global_blocks, bool) or not isinstance(global_blocks, (int, np.integer)) or global_blocks < 0:
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
def _layout(n: int, block_size: int, pattern: str, sparsity_ratio: float, global_blocks: int,
            is_causal: bool) -> np.ndarray:
    nb = n // block_size
    budget = block_budget(nb, sparsity_ratio)
    layout = np.zeros((nb, nb), dtype=bool)
    for i in range(nb):
        layout[i, _candidate_order(i, nb, pattern, global_blocks, is_causal)[:budget]] = True
    layout.setflags(write=False)
    return layout


def block_layout(n: int, block_size: int, pattern: str, sparsity_ratio: float, global_blocks: int = 1,
                 is_causal: bool = False) -> np.ndarray:
    """The ``(nb, nb)`` boolean block layout (NumPy): ``layout[i, j]`` iff query block ``i`` keeps key block ``j``.

    Every row keeps ``min(k, #candidates)`` blocks, ``k = max(1, nb - floor(sparsity_ratio * nb))``;
    with ``is_causal`` the candidates of row ``i`` are ``j <= i``. Patterns order the candidates:
    ``local_window`` nearest first (smaller ``j`` on ties); ``dilated_sparse`` ``i``, then
    ``i -+ 1, 2, 4, ...``, then nearest first; ``global_local`` blocks ``0 .. global_blocks-1``, then
    nearest first (``global_blocks`` only changes ``global_local``; it is validated for every pattern).

    Example::

        block_layout(8, 2, "local_window", 0.5)   # 4x4, a band of 2 blocks per row
    """
    check_block_options(n, block_size, pattern, sparsity_ratio, global_blocks)
    return _layout(int(n), int(block_size), pattern, float(sparsity_ratio), int(global_blocks),
                   bool(is_causal)).copy()


@functools.lru_cache(maxsize=128)
def _tables(n: int, block_size: int, pattern: str, sparsity_ratio: float, global_blocks: int,
            is_causal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gather tables: ``(index (nb, w), valid (nb, w), diagonal (nb,) or None)``.

    Without ``is_causal`` row ``i`` lists all its kept key blocks. With ``is_causal`` the diagonal
    block is left out of the list (it needs the element-wise causal mask) and ``diagonal[i]`` says
    whether row ``i`` keeps it. Rows shorter than ``w`` are padded with block 0, marked invalid.
    """
    layout = _layout(n, block_size, pattern, sparsity_ratio, global_blocks, is_causal)
    nb = layout.shape[0]
    diagonal = layout.diagonal().copy() if is_causal else None
    rows = [np.flatnonzero(layout[i]) for i in range(nb)]
    if is_causal:
        rows = [r[r != i] for i, r in enumerate(rows)]
    width = max((len(r) for r in rows), default=0)
    index = np.zeros((nb, width), dtype=np.int64)
    valid = np.zeros((nb, width), dtype=bool)
    for i, r in enumerate(rows):
        index[i, : len(r)] = r
        valid[i, : len(r)] = True
    return index, valid, diagonal


# Score elements (batch x heads x queries x keys) one step of the loop over query blocks may hold.
_CHUNK_SCORES = 1 << 23


def _chunk_blocks(num_blocks: int, scores_per_block: int) -> int:
    """Query blocks per loop step: the largest divisor of ``num_blocks`` within ``_CHUNK_SCORES`` (>= 1)."""
    fits = [c for c in range(1, num_blocks + 1) if num_blocks % c == 0 and c * scores_per_block <= _CHUNK_SCORES]
    return max(fits, default=1)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 128,
    pattern: str = "dilated_sparse",
    sparsity_ratio: float = 0.9,
    global_blocks: int = 1,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact softmax attention restricted to a block layout (SPEC.md section 5).

    Each query attends to every key of the key blocks its row of :func:`block_layout` keeps, with
    one joint softmax; with ``is_causal`` also key ``<=`` query inside the diagonal block. Only the
    kept blocks are gathered and scored: time and memory are ``O(n * k * block_size)``.

    Args:
      q, k, v: ``(b, n, h, d)``, one floating dtype; ``n`` a multiple of ``block_size``.
      block_size: tokens per block.
      pattern: ``"local_window"``, ``"dilated_sparse"`` or ``"global_local"``.
      sparsity_ratio: fraction of key blocks each query block drops, in ``[0, 1)``.
      global_blocks: leading key blocks kept first under ``"global_local"`` (>= 0).
      is_causal: query ``p`` sees key ``p' <= p`` only (top-left aligned).
      scale: score scale, default ``1 / sqrt(d)``.
      key_padding_mask: optional ``(b, n)`` boolean, True where the key is padding.
      dropout_p: dropout on the attention probabilities (torch's default generator; 0 disables it).

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q``; a query with no visible key gets 0.

    Example::

        q = k = v = torch.ones(1, 1024, 4, 32)
        out = block_sparse_attention(q, k, v, block_size=128, sparsity_ratio=0.75)
    """
    check_qkv(q, k, v)
    check_block_options(q.shape[1], block_size, pattern, sparsity_ratio, global_blocks)
    check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[1])
    check_dropout(dropout_p)
    b, n, h, d = q.shape
    if n == 0:
        return torch.zeros_like(q)
    scale = default_scale(d, scale)
    bs = int(block_size)
    nb = n // bs
    index, valid, diagonal = _tables(n, bs, pattern, float(sparsity_ratio), int(global_blocks), bool(is_causal))
    width = index.shape[1]
    c = _chunk_blocks(nb, b * h * bs * bs * (width + int(bool(is_causal))))
    dev = q.device
    index_t = torch.as_tensor(index, device=dev)
    kept_t = torch.as_tensor(np.repeat(valid, bs, axis=1), device=dev)  # (nb, width * bs)
    causal_t = None
    if is_causal:  # (nb, bs, bs): element-wise causal inside the diagonal block, if the row keeps it
        tril = torch.ones(bs, bs, dtype=torch.bool, device=dev).tril()
        causal_t = tril[None] & torch.as_tensor(diagonal, device=dev)[:, None, None]
    qb, kb, vb = (x.reshape(b, nb, bs, h, d) for x in (q, k, v))
    visible = None if key_padding_mask is None else ~key_padding_mask.reshape(b, nb, bs)
    out = q.new_empty((b, nb, bs, h, d))
    for start in range(0, nb, c):  # query blocks [start, start + c)
        own = slice(start, start + c)
        idx = index_t[own].reshape(-1)

        def gather(x):  # the kept (off-diagonal when causal) key blocks of each query block, concatenated
            return x.index_select(1, idx).reshape(b * c, width * bs, *x.shape[3:])

        keys, values = gather(kb), gather(vb)
        mask = None
        if visible is not None or not valid[own].all():  # (b * c, 1, 1, width * bs)
            mask = kept_t[own][None].expand(b, c, width * bs)
            if visible is not None:
                mask = mask & gather(visible).reshape(b, c, width * bs)
            mask = mask.reshape(b * c, 1, 1, width * bs)
        if is_causal:  # append the diagonal block with its element mask (b * c, 1, bs, bs)
            keys = torch.cat([keys, kb[:, own].reshape(b * c, bs, h, d)], dim=1)
            values = torch.cat([values, vb[:, own].reshape(b * c, bs, h, d)], dim=1)
            diag = causal_t[own][None].expand(b, c, bs, bs)
            if visible is not None:
                diag = diag & visible[:, own, None, :]
            off = torch.ones(b * c, 1, 1, width * bs, dtype=torch.bool, device=dev) if mask is None else mask
            mask = torch.cat([off.expand(b * c, 1, bs, width * bs), diag.reshape(b * c, 1, bs, bs)], dim=-1)
        empty = None
        if mask is not None:  # rows with no visible key are opened to all keys, then set to 0
            empty = ~mask.any(dim=-1, keepdim=True)
            mask = mask | empty
        queries = qb[:, own].reshape(b * c, bs, h, d)
        o = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=mask, dropout_p=dropout_p, scale=scale)  # (b * c, h, bs, d)
        if empty is not None:
            o = o.masked_fill(empty.expand(b * c, 1, bs, 1), 0.0)
        out[:, own] = o.transpose(1, 2).reshape(b, c, bs, h, d)
    return out.reshape(b, n, h, d)


class BlockSparseDilatedAttention(nn.Module):
    """Module form of :func:`block_sparse_attention` (no parameters).

    Args:
      block_size, pattern, sparsity_ratio, global_blocks: the layout options, validated on construction
        (the sequence length is checked against ``block_size`` on each call).
      scale: score scale, default ``1 / sqrt(head_dim)``.
      dropout: dropout on the attention probabilities, applied only in training mode.

    ``forward(q, k, v, is_causal=False, key_padding_mask=None)`` takes ``(b, n, h, d)`` tensors and
    returns ``(b, n, h, d)``.
    """

    def __init__(self, block_size: int = 128, pattern: str = "dilated_sparse", sparsity_ratio: float = 0.9,
                 global_blocks: int = 1, *, scale: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        check_block_options(0, block_size, pattern, sparsity_ratio, global_blocks)
        check_dropout(dropout)
        self.block_size = int(block_size)
        self.pattern = pattern
        self.sparsity_ratio = float(sparsity_ratio)
        self.global_blocks = int(global_blocks)
        self.scale = None if scale is None else float(scale)
        self.dropout = float(dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                key_padding_mask: Tensor | None = None) -> Tensor:
        return block_sparse_attention(q, k, v, block_size=self.block_size, pattern=self.pattern,
                                      sparsity_ratio=self.sparsity_ratio, global_blocks=self.global_blocks,
                                      is_causal=is_causal, scale=self.scale, key_padding_mask=key_padding_mask,
                                      dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, pattern={self.pattern!r}, sparsity_ratio={self.sparsity_ratio}, "
                f"global_blocks={self.global_blocks}, scale={self.scale}, dropout={self.dropout}")
