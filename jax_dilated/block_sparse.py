"""Block-sparse attention (docs/semantics.md section 5) on the shared block layouts.

:func:`block_layout` (from :mod:`dilated_plan.blocks`, re-exported) says which key blocks each query
block keeps; :func:`block_sparse_attention` gathers the kept key/value blocks of every query block
and runs one exact softmax over all their keys, so its cost is ``O(n * k * block_size)``, never
``O(n^2)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from dilated_plan import block_layout, block_tables, check_block_options, default_scale
from dilated_plan.blocks import chunk_blocks
from dilated_plan.checks import check_is_causal, check_scale
from jax_dilated.branches import merge_lse
from jax_dilated.checks import as_array, check_dropout, check_key_padding_mask, check_qkv
from jax_dilated.kernels import Backend, attend, resolve

Array = jax.Array

# Score elements (batch x heads x queries x keys) one step of the loop over query blocks may hold:
# small enough to stay near the cache, large enough to amortise the loop.
_CHUNK_SCORES = 1 << 23

__all__ = ["block_layout", "block_sparse_attention"]


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_size",
        "pattern",
        "sparsity_ratio",
        "global_blocks",
        "is_causal",
        "scale",
        "dropout_rate",
        "backend",
    ),
)
def _block_sparse(
    q,
    k,
    v,
    key_padding_mask,
    dropout_rng,
    *,
    block_size,
    pattern,
    sparsity_ratio,
    global_blocks,
    is_causal,
    scale,
    dropout_rate,
    backend,
):
    b, n, h, d = q.shape
    hk = k.shape[2]
    if n == 0:
        return jnp.zeros_like(q)
    scale = default_scale(d, scale)
    bs = block_size
    nb = -(-n // bs)  # any n: the last block is shorter (its missing positions are masked keys)
    extra = nb * bs - n
    tables = block_tables(nb, pattern, sparsity_ratio, global_blocks, is_causal)
    index, valid, diagonal, width = tables.index, tables.valid, tables.diagonal, tables.width
    c = chunk_blocks(nb, b * h * bs * bs * (width + int(is_causal)), _CHUNK_SCORES)
    steps = nb // c
    pad = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    qb = pad(q).reshape(b, nb, bs, h, d)
    kb, vb = (pad(x).reshape(b, nb, bs, hk, d) for x in (k, v))
    visible = pad(jnp.ones((b, n), bool) if key_padding_mask is None else ~key_padding_mask, False)
    visible = visible.reshape(b, nb, bs)
    xs = (
        jnp.arange(steps),
        jnp.asarray(index.reshape(steps, c, width)),
        jnp.asarray(valid.reshape(steps, c, width)),
        jnp.asarray(diagonal.reshape(steps, c)),
    )

    def step(args):  # query blocks [s * c, (s + 1) * c) -> (b, c, bs, h, d)
        s, idx, ok, diag = args
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, s)
        own = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=s * c, slice_size=c, axis=1)
        qi = own(qb).reshape(b * c, bs, h, d)
        outs, lses = [], []
        two = bool(width) and is_causal  # two parts merged by log-sum-exp
        common = dict(scale=scale, dropout_rate=dropout_rate, need_lse=two, implementation=backend)
        if width:

            def gather(x):  # the kept off-diagonal key blocks of each query block, concatenated
                return jnp.take(x, idx.reshape(-1), axis=1).reshape(b * c, width * bs, *x.shape[3:])

            kv_valid = (gather(visible).reshape(b, c, width, bs) & ok[None, :, :, None]).reshape(b * c, -1)
            key = None if rng is None else jax.random.fold_in(rng, 0)
            o, l = attend(qi, gather(kb), gather(vb), kv_valid=kv_valid, dropout_rng=key, **common)
            outs.append(o)
            lses.append(l)
        if is_causal:  # the diagonal block, element-wise causal
            kv_valid = (own(visible) & diag[None, :, None]).reshape(b * c, bs)
            key = None if rng is None else jax.random.fold_in(rng, 1)
            kd, vd = own(kb).reshape(b * c, bs, hk, d), own(vb).reshape(b * c, bs, hk, d)
            o, l = attend(qi, kd, vd, is_causal=True, kv_valid=kv_valid, dropout_rng=key, **common)
            outs.append(o)
            lses.append(l)
        out = outs[0] if len(outs) == 1 else merge_lse(outs, lses)[0]
        return out.astype(q.dtype).reshape(b, c, bs, h, d)

    out = jax.lax.map(jax.checkpoint(step), xs)  # (steps, b, c, bs, h, d); O(chunk) memory in backward
    return jnp.moveaxis(out, 0, 1).reshape(b, nb * bs, h, d)[:, :n]


def block_sparse_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    block_size: int = 128,
    pattern: str = "dilated_sparse",
    sparsity_ratio: float = 0.9,
    global_blocks: int = 1,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: ArrayLike | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: ArrayLike | None = None,
    implementation: str | Backend | None = None,
) -> Array:
    """Exact softmax attention restricted to a block layout (docs/semantics.md section 5).

    Each query attends to every key of the key blocks its row of :func:`block_layout` keeps, with
    one joint softmax; with ``is_causal`` also key ``<=`` query inside the diagonal block. Only the
    kept blocks are gathered and scored: time and memory are ``O(n * k * block_size)``.

    Args:
      q: ``(b, n, h, d)``; k, v: ``(b, n, h_kv, d)`` (grouped-query heads, as in
        :func:`jax_dilated.dilated_attention`), one floating dtype; any ``n`` (the last block is shorter).
      block_size: tokens per block.
      pattern: ``"local_window"``, ``"dilated_sparse"`` or ``"global_local"``.
      sparsity_ratio: fraction of key blocks each query block drops, in ``[0, 1)``.
      global_blocks: leading key blocks kept first under ``"global_local"`` (>= 0).
      is_causal: query ``p`` sees key ``p' <= p`` only (top-left aligned).
      scale: score scale, default ``1 / sqrt(d)``.
      key_padding_mask: optional ``(b, n)`` boolean, True where the key is padding.
      dropout_rate: dropout on the attention probabilities (0 disables it).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      implementation: the attention kernel (see :func:`jax_dilated.dilated_attention`).

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q``; a query with no visible key gets 0.

    >>> q = k = v = jnp.ones((1, 1024, 4, 32), jnp.float32)
    >>> block_sparse_attention(q, k, v, block_size=128, sparsity_ratio=0.75).shape
    (1, 1024, 4, 32)
    """
    qa, ka, va = (as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    mask = as_array("key_padding_mask", key_padding_mask)
    check_qkv(qa, ka, va)
    check_block_options(block_size, pattern, sparsity_ratio, global_blocks)
    check_key_padding_mask(mask, qa.shape[0], qa.shape[1])
    check_dropout(dropout_rate, dropout_rng)
    return _block_sparse(
        qa,
        ka,
        va,
        mask,
        dropout_rng,
        block_size=int(block_size),
        pattern=pattern,
        sparsity_ratio=float(sparsity_ratio),
        global_blocks=int(global_blocks),
        is_causal=check_is_causal(is_causal),
        scale=check_scale(scale),
        dropout_rate=float(dropout_rate),
        backend=resolve(implementation),
    )
