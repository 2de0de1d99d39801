"""Block layouts and block-sparse attention (SPEC.md section 5).

The sequence is cut into ``nb = n / block_size`` blocks. Every query block keeps a budget of
``k = max(1, nb - floor(sparsity_ratio * nb))`` key blocks, chosen by a pattern's ordering of the
candidate key blocks. :func:`block_layout` returns that choice as an ``(nb, nb)`` boolean matrix;
it is plain Python, evaluated at trace time. :func:`block_sparse_attention` gathers the kept
key/value blocks of every query block and runs one exact softmax over all their keys, so its cost
is ``O(n * k * block_size)``, never ``O(n^2)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_dilated._config import check_dropout, check_key_padding_mask, check_qkv, default_scale
from jax_dilated._softmax import merge_lse
from jax_dilated.kernels import attend

Array = jax.Array

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
    """The ``(nb, nb)`` boolean block layout: ``layout[i, j]`` iff query block ``i`` keeps key block ``j``.

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
    """Static gather tables: ``(index (nb, w), valid (nb, w), diagonal (nb,) or None)``.

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
    index = np.zeros((nb, width), dtype=np.int32)
    valid = np.zeros((nb, width), dtype=bool)
    for i, r in enumerate(rows):
        index[i, : len(r)] = r
        valid[i, : len(r)] = True
    return index, valid, diagonal


# Score elements (batch x heads x queries x keys) one step of the loop over query blocks may hold:
# small enough to stay near the cache, large enough to amortise the loop.
_CHUNK_SCORES = 1 << 23


def _chunk_blocks(num_blocks: int, scores_per_block: int) -> int:
    """Query blocks per loop step: the largest divisor of ``num_blocks`` within ``_CHUNK_SCORES`` (>= 1)."""
    fits = [c for c in range(1, num_blocks + 1) if num_blocks % c == 0 and c * scores_per_block <= _CHUNK_SCORES]
    return max(fits, default=1)


@functools.partial(jax.jit, static_argnames=("block_size", "pattern", "sparsity_ratio", "global_blocks",
                                             "is_causal", "scale", "dropout_rate"))
def _block_sparse(q, k, v, key_padding_mask, dropout_rng, *, block_size, pattern, sparsity_ratio, global_blocks,
                  is_causal, scale, dropout_rate):
    b, n, h, d = q.shape
    if n == 0:
        return jnp.zeros_like(q)
    scale = default_scale(d, scale)
    nb, bs = n // block_size, block_size
    index, valid, diagonal = _tables(n, block_size, pattern, sparsity_ratio, global_blocks, is_causal)
    width = index.shape[1]
    c = _chunk_blocks(nb, b * h * bs * bs * (width + int(is_causal)))
    steps = nb // c
    qb, kb, vb = (x.reshape(b, nb, bs, h, d) for x in (q, k, v))
    visible = (jnp.ones((b, n), bool) if key_padding_mask is None else ~key_padding_mask).reshape(b, nb, bs)
    if diagonal is None:
        diagonal = np.zeros(nb, dtype=bool)
    tables = (jnp.arange(steps), jnp.asarray(index.reshape(steps, c, width)),
              jnp.asarray(valid.reshape(steps, c, width)), jnp.asarray(diagonal.reshape(steps, c)))

    def step(args):  # query blocks [s * c, (s + 1) * c) -> (b, c, bs, h, d)
        s, idx, ok, diag = args
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, s)
        own = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=s * c, slice_size=c, axis=1)
        qi = own(qb).reshape(b * c, bs, h, d)
        outs, lses = [], []
        if width:
            def gather(x):  # the kept off-diagonal key blocks of each query block, concatenated
                return jnp.take(x, idx.reshape(-1), axis=1).reshape(b * c, width * bs, *x.shape[3:])

            kv_valid = (gather(visible).reshape(b, c, width, bs) & ok[None, :, :, None]).reshape(b * c, -1)
            o, l = attend(qi, gather(kb), gather(vb), scale=scale, kv_valid=kv_valid, dropout_rate=dropout_rate,
                          dropout_rng=None if rng is None else jax.random.fold_in(rng, 0))
            outs.append(o)
            lses.append(l)
        if is_causal:  # the diagonal block, element-wise causal
            kv_valid = (own(visible) & diag[None, :, None]).reshape(b * c, bs)
            o, l = attend(qi, own(kb).reshape(b * c, bs, h, d), own(vb).reshape(b * c, bs, h, d), scale=scale,
                          is_causal=True, kv_valid=kv_valid, dropout_rate=dropout_rate,
                          dropout_rng=None if rng is None else jax.random.fold_in(rng, 1))
            outs.append(o)
            lses.append(l)
        out = outs[0] if len(outs) == 1 else merge_lse(outs, lses)[0]
        return out.astype(q.dtype).reshape(b, c, bs, h, d)

    out = jax.lax.map(jax.checkpoint(step), tables)  # (steps, b, c, bs, h, d); O(chunk) memory in backward
    return jnp.moveaxis(out, 0, 1).reshape(b, n, h, d)


def block_sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_size: int = 128,
    pattern: str = "dilated_sparse",
    sparsity_ratio: float = 0.9,
    global_blocks: int = 1,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
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
      dropout_rate: dropout on the attention probabilities (0 disables it).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q``; a query with no visible key gets 0.

    Example::

        q = k = v = jnp.ones((1, 1024, 4, 32))
        out = block_sparse_attention(q, k, v, block_size=128, sparsity_ratio=0.75)
    """
    check_qkv(q, k, v)
    check_block_options(q.shape[1], block_size, pattern, sparsity_ratio, global_blocks)
    check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[1])
    check_dropout(dropout_rate, dropout_rng)
    return _block_sparse(q, k, v, key_padding_mask, dropout_rng, block_size=int(block_size), pattern=pattern,
                         sparsity_ratio=float(sparsity_ratio), global_blocks=int(global_blocks),
                         is_causal=bool(is_causal), scale=None if scale is None else float(scale),
                         dropout_rate=float(dropout_rate))
