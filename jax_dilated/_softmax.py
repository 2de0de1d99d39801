"""Softmax attention that also returns its log-sum-exp, and the log-sum-exp merge of partial results.

These two functions are the numerical core that every variant (dilated, ring, block-sparse) calls.
Statistics are kept in float32 (float64 for float64 inputs), rows with no visible key give 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def stats_dtype(dtype) -> jnp.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


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
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.

    Returns:
      ``out`` ``(B, m, h, d)`` in the statistics dtype (0 for a row with no visible key) and
      ``lse`` ``(B, m, h)``, the log-sum-exp of the row's scaled scores (``-inf`` for such a row).
    """
    acc = stats_dtype(q.dtype)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * jnp.asarray(scale, acc)
    m, mk = q.shape[1], k.shape[1]
    visible = None
    if is_causal:
        visible = jnp.arange(m)[:, None] >= jnp.arange(mk)[None, :]
        visible = visible[None, None]
    if kv_valid is not None:
        kv = kv_valid[:, None, None, :]
        visible = kv if visible is None else visible & kv
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    row_max = jax.lax.stop_gradient(row_max)
    p = jnp.exp(s - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p.shape)
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    safe = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", (p / safe).astype(v.dtype), v, preferred_element_type=acc)
    lse = jnp.where(denom > 0, jnp.log(safe) + row_max, -jnp.inf)[..., 0]
    return out, jnp.swapaxes(lse, 1, 2)


def merge_lse(outs: list[Array], lses: list[Array]) -> Array:
    """Mix partial attention results by their log-sum-exps (one softmax over their union of keys).

    Args:
      outs: each ``(..., d)``, a normalised partial output (0 where it saw no key).
      lses: each ``(...)``, its log-sum-exp (``-inf`` where it saw no key).

    Returns:
      ``sum_i w_i outs_i`` with ``w = softmax_i(lses_i)``; 0 where every ``lses_i`` is ``-inf``.
    """
    lse = jnp.stack(lses)
    top = jnp.max(lse, axis=0)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    w = jnp.exp(lse - top)
    total = jnp.sum(w, axis=0)
    w = w / jnp.where(total > 0, total, 1.0)
    return sum(wi[..., None] * oi for wi, oi in zip(w, outs))
