"""Softmax attention that also returns its log-sum-exp, and the log-sum-exp merge of partial results.

These two functions are the numerical core that every variant (dilated, ring, block-sparse) calls.
Statistics are kept in float32 (float64 for float64 inputs); rows with no visible key give 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Score elements one sequential step of a chunked `attend` may hold (4 Mi float32 = 16 MiB): small
# enough to stay in cache-friendly sizes on a CPU, large enough to keep a GPU busy.
CHUNK_ELEMENTS = 1 << 22
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


def _attend_batch(q, k, v, kv_valid, keys, *, scale, is_causal, dropout_rate, query_block):
    """Head-major attention of one batch chunk. q ``(B, h, m, d)``; keys: per-row dropout keys or None."""
    B, h, m, d = q.shape
    mk = k.shape[2]
    blk = query_block if query_block and m > query_block and m % query_block == 0 else m
    nq = m // blk
    # Query blocks become a batch axis next to the heads: (B, h, nq, blk, d) against (B, h, 1, mk, d).
    qb = q.reshape(B, h, nq, blk, d)
    kb, vb = k[:, :, None], v[:, :, None]
    visible = None
    if is_causal:
        rows = jnp.arange(m).reshape(nq, blk)[:, :, None]
        visible = (rows >= jnp.arange(mk)[None, None, :])[None, None]
    if kv_valid is not None:
        valid = kv_valid[:, None, None, None, :]
        visible = valid if visible is None else visible & valid
    keep = None
    if dropout_rate > 0.0:
        shape = (h, nq, blk, mk)
        keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - dropout_rate, shape))(keys)
    out, lse = _attend_head_major(qb, kb, vb, visible, keep, scale=scale, dropout_rate=dropout_rate)
    return out.reshape(B, h, m, d), lse.reshape(B, h, m)


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
      dropout_rng: PRNG key, required when ``dropout_rate > 0``. Row ``i`` of the batch draws
        from ``split(dropout_rng, B)[i]``, so chunked and unchunked calls drop the same weights.
      chunked: walk the batch in sequential chunks of at most ``CHUNK_ELEMENTS`` scores (queries in
        blocks of ``QUERY_BLOCK``), each chunk rematerialised in the backward pass, so memory stays
        O(chunk) in both passes. False computes every score at once (the plain form).

    Returns:
      ``out`` ``(B, m, h, d)`` in the statistics dtype (0 for a row with no visible key) and
      ``lse`` ``(B, m, h)``, the log-sum-exp of the row's scaled scores (``-inf`` for such a row).
    """
    B, m, h, d = q.shape
    mk = k.shape[1]
    heads_first = (q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2))
    keys = jax.random.split(dropout_rng, B) if dropout_rate > 0.0 else None
    kw = dict(scale=scale, is_causal=is_causal, dropout_rate=dropout_rate)
    per_row = h * m * max(mk, 1)
    if not chunked or B * per_row <= CHUNK_ELEMENTS or B == 0:
        out, lse = _attend_batch(*heads_first, kv_valid, keys, query_block=None if not chunked else QUERY_BLOCK, **kw)
    else:
        batch_size = max(1, CHUNK_ELEMENTS // per_row)  # lax.map runs any remainder as one more step

        @jax.checkpoint
        def body(row):  # lax.map vmaps this over `batch_size` rows per sequential step
            out, lse = _attend_batch(*jax.tree.map(lambda x: x[None], row), query_block=QUERY_BLOCK, **kw)
            return out[0], lse[0]

        out, lse = jax.lax.map(body, (*heads_first, kv_valid, keys), batch_size=batch_size)
    return out.swapaxes(1, 2), lse.swapaxes(1, 2)


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
