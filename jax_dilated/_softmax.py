"""Softmax attention that also returns its log-sum-exp, and the log-sum-exp merge of partial results.

These two functions are the numerical core that every variant (dilated, ring, block-sparse) calls.
Statistics are kept in float32 (float64 for float64 inputs); rows with no visible key give 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Score elements one sequential step of a chunked `attend` may hold (1 Mi float32 = 4 MiB). It bounds the
# fixed scratch of a call (scores and probabilities of one step), which is what keeps per-device memory of
# ring attention near 1/P at 8 devices; on the 2-core CPU 0.5 Mi to 4 Mi ran equally fast (docs/core.md).
CHUNK_ELEMENTS = 1 << 20
# Queries per block inside a chunk: short score rows of many small batched matrices.
QUERY_BLOCK = 128


def stats_dtype(dtype) -> jnp.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _attend_head_major(q, k, v, visible, keep, *, scale, dropout_rate):
    """Attention on ``(..., m, d)`` queries and ``(..., mk, d)`` keys/values (leading axes broadcast).

    ``visible``: None or boolean broadcastable to ``(B, h, m, mk)``; ``keep``: None or the dropout
    keep-mask of that shape. Returns out ``(B, h, m, d)`` and lse ``(B, h, m)`` in the stats dtype.
    """
    acc = stats_dtype(q.dtype)
    s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=acc) * jnp.asarray(scale, acc)
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.exp(s - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if keep is not None:
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    safe = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("...qk,...kd->...qd", p.astype(v.dtype), v, preferred_element_type=acc) / safe
    lse = jnp.where(denom > 0, jnp.log(safe) + row_max, -jnp.inf)[..., 0]
    return out, lse


def _keep_mask(keys, shape, dropout_rate):
    """Dropout keep-masks ``(B, *shape)``, row ``i`` drawn from ``keys[i]``; None when ``keys`` is None."""
    if keys is None:
        return None
    return jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - dropout_rate, shape))(keys)


def _attend_blocks(q, k, v, kv_valid, keep, first_block, *, scale, is_causal, dropout_rate):
    """Query blocks against whole key rows. q ``(B, h, nq, blk, d)``, k/v ``(B, h, mk, d)``.

    ``kv_valid``: None or ``(B, mk)``; ``keep``: None or ``(B, h, nq, blk, mk)``; ``first_block``: index of
    block 0 among the row's query blocks (positions for the causal mask). Returns ``(B, h, nq, blk, d)``
    and ``(B, h, nq, blk)``.
    """
    nq, blk = q.shape[2:4]
    mk = k.shape[2]
    visible = None
    if is_causal:
        rows = (first_block * blk + jnp.arange(nq * blk)).reshape(nq, blk)[:, :, None]
        visible = (rows >= jnp.arange(mk)[None, None, :])[None, None]
    if kv_valid is not None:
        valid = kv_valid[:, None, None, None, :]
        visible = valid if visible is None else visible & valid
    # Query blocks are a batch axis next to the heads: (B, h, nq, blk, d) against (B, h, 1, mk, d).
    return _attend_head_major(q, k[:, :, None], v[:, :, None], visible, keep, scale=scale, dropout_rate=dropout_rate)


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    is_causal: bool = False,
    kv_valid: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    chunked: bool = True,
) -> tuple[Array, Array]:
    """Softmax attention of every query over every key, with its log-sum-exp.

    Args:
      q: ``(B, m, h, d)`` queries.
      k, v: ``(B, mk, h, d)`` keys and values.
      scale: multiplies the scores ``q . k``.
      is_causal: query ``p`` sees key ``p' <= p`` (top-left aligned).
      kv_valid: optional ``(B, mk)`` boolean, False for keys nobody may see.
      dropout_rate: probability of dropping an attention weight (weights rescaled by
        ``1 / (1 - rate)``; the log-sum-exp is that of the undropped weights).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``. Row ``i`` of the batch draws its
        ``(h, m / blk, blk, mk)`` keep-mask from ``split(dropout_rng, B)[i]``, so every chunking of
        the same call drops the same weights.
      chunked: compute at most ``CHUNK_ELEMENTS`` scores at a time, each step rematerialised in the
        backward pass, so memory stays O(chunk) in both passes: queries go in blocks of
        ``QUERY_BLOCK``; batch rows are walked sequentially, several per step when they fit, and a row
        whose own scores exceed the chunk is walked a few query blocks at a time. False computes
        every score at once (the plain form).

    Returns:
      ``out`` ``(B, m, h, d)`` in the statistics dtype (0 for a row with no visible key) and
      ``lse`` ``(B, m, h)``, the log-sum-exp of the row's scaled scores (``-inf`` for such a row).
    """
    B, m, h, d = q.shape
    mk = k.shape[1]
    blk = QUERY_BLOCK if chunked and m > QUERY_BLOCK and m % QUERY_BLOCK == 0 else m
    nq = m // blk
    qb = q.reshape(B, nq, blk, h, d).transpose(0, 3, 1, 2, 4)  # (B, h, nq, blk, d)
    kh, vh = k.swapaxes(1, 2), v.swapaxes(1, 2)  # (B, h, mk, d)
    keys = jax.random.split(dropout_rng, B) if dropout_rate > 0.0 else None
    kw = dict(scale=scale, is_causal=is_causal, dropout_rate=dropout_rate)
    per_block = h * blk * max(mk, 1)
    if not chunked or B * nq * per_block <= CHUNK_ELEMENTS or B == 0:
        keep = _keep_mask(keys, (h, nq, blk, mk), dropout_rate)
        out, lse = _attend_blocks(qb, kh, vh, kv_valid, keep, 0, **kw)
    elif nq * per_block <= CHUNK_ELEMENTS:
        @jax.checkpoint
        def rows(row):  # lax.map vmaps this over `batch_size` rows per sequential step
            qr, kr, vr, valid, key = jax.tree.map(lambda x: x[None], row)
            out, lse = _attend_blocks(qr, kr, vr, valid, _keep_mask(key, (h, nq, blk, mk), dropout_rate), 0, **kw)
            return out[0], lse[0]

        out, lse = jax.lax.map(rows, (qb, kh, vh, kv_valid, keys), batch_size=max(1, CHUNK_ELEMENTS // (nq * per_block)))
    else:
        # Query blocks per sequential step: the largest divisor of nq whose scores fit in a chunk.
        steps = max(s for s in range(1, nq + 1) if nq % s == 0 and (s == 1 or s * per_block <= CHUNK_ELEMENTS))

        def row_blocks(row):  # one row, `steps` query blocks at a time
            qr, kr, vr, valid, key = jax.tree.map(lambda x: x[None], row)
            keep = _keep_mask(key, (h, nq, blk, mk), dropout_rate)

            @jax.checkpoint
            def blocks(j):  # query blocks [j * steps, (j + 1) * steps) of the row
                take = lambda x: jax.lax.dynamic_slice_in_dim(x, j * steps, steps, axis=2)
                return _attend_blocks(take(qr), kr, vr, valid, None if keep is None else take(keep), j * steps, **kw)

            out, lse = jax.lax.map(blocks, jnp.arange(nq // steps))  # (nq / steps, 1, h, steps, blk, ...)
            return out.transpose(1, 2, 0, 3, 4, 5).reshape(h, nq, blk, d), lse.transpose(1, 2, 0, 3, 4).reshape(h, nq, blk)

        # With dropout, a row's keep-mask is redrawn in the backward pass rather than stored for every row.
        out, lse = jax.lax.map(jax.checkpoint(row_blocks) if keys is not None else row_blocks,
                               (qb, kh, vh, kv_valid, keys))
    out = out.reshape(B, h, m, d).swapaxes(1, 2)
    lse = lse.reshape(B, h, m).swapaxes(1, 2)
    return out, lse


def merge_lse(outs: list[Array], lses: list[Array]) -> tuple[Array, Array]:
    """Mix partial attention results by their log-sum-exps (one softmax over their union of keys).

    This is the online-softmax merge: partial results over disjoint key sets combine into the result
    over all of them.

    Args:
      outs: each ``(..., d)``, a normalised partial output (0 where it saw no key).
      lses: each ``(...)``, its log-sum-exp (``-inf`` where it saw no key).

    Returns:
      ``sum_i w_i outs_i`` with ``w = softmax_i(lses_i)`` (0 where every ``lses_i`` is ``-inf``), and the
      log-sum-exp of the union, ``(...)`` (``-inf`` there).
    """
    lse = jnp.stack(lses)
    top = jnp.max(lse, axis=0)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    w = jnp.exp(lse - top)
    total = jnp.sum(w, axis=0)
    safe = jnp.where(total > 0, total, 1.0)
    w = w / safe
    merged = jnp.where(total > 0, jnp.log(safe) + top, -jnp.inf)
    return sum(wi[..., None] * oi for wi, oi in zip(w, outs)), merged
