"""The log-sum-exp merge of partial attention results (the scores themselves: ``jax_dilated.kernels``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_dilated.kernels.xla import stats_dtype  # noqa: F401  (re-exported for the modules)

Array = jax.Array


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
