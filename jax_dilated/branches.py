"""The branch machinery of dilated attention: dilate, attend one branch, put back, merge.

A branch (:class:`dilated_plan.Branch`) is a set of heads that see the same dilated positions.
:func:`dilate` gathers a branch's kept positions of every segment as one batch of short sequences
(a strided reshape, no index gather), :func:`branch_attention` runs the kernel on them,
:func:`undilate` puts the result back (by padding, never by scatter), and :func:`combine_branches`
applies the merge rule (docs/semantics.md sections 1-2). The standard, improved and ring variants
all build on these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dilated_plan import Branch, DilatedConfig
from jax_dilated.kernels import Backend, attend

Array = jax.Array


def dilate(x: Array, br: Branch) -> Array:
    """``(b, n, ...)`` -> ``(b * n/s, s/r, ...)``: the kept positions of every segment of a branch."""
    b, n = x.shape[:2]
    x = x.reshape(b, n // br.rate, br.rate, *x.shape[2:])[:, :, br.offset]
    return x.reshape(b * (n // br.segment), br.segment // br.rate, *x.shape[2:])


def undilate(x: Array, br: Branch, batch: int, fill: float) -> Array:
    """Inverse of :func:`dilate`: ``(b * n/s, s/r, ...)`` -> ``(b, n, ...)`` with ``fill`` elsewhere."""
    rest = x.shape[2:]
    x = x.reshape(batch, -1, 1, *rest)
    pad = [(0, 0), (0, 0), (br.offset, br.rate - 1 - br.offset)] + [(0, 0)] * len(rest)
    x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(batch, -1, *rest)


def branch_attention(
    q: Array,
    k: Array,
    v: Array,
    key_padding_mask: Array | None,
    br: Branch,
    *,
    scale: float,
    is_causal: bool,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    need_lse: bool = True,
    implementation: Backend | None = None,
) -> tuple[Array, Array | None]:
    """One branch of dilated attention on ``(b, n, h, d)`` inputs: its heads' output and log-sum-exp.

    Returns ``(b, n, heads_of_branch, d)`` (0 off the branch's positions) and ``(b, n, heads_of_branch)``
    (``-inf`` there; None when ``need_lse`` is False and the kernel has none), in the kernel's
    statistics dtype.
    """
    b = q.shape[0]
    hs = br.head_slice
    valid = None if key_padding_mask is None else ~dilate(key_padding_mask, br)
    qd, kd, vd = (dilate(x[:, :, hs], br) for x in (q, k, v))
    o, l = attend(
        qd,
        kd,
        vd,
        scale=scale,
        is_causal=is_causal,
        kv_valid=valid,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        need_lse=need_lse,
        implementation=implementation,
    )
    return undilate(o, br, b, 0.0), None if l is None else undilate(l, br, b, -jnp.inf)


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
    return sum(wi[..., None] * oi for wi, oi in zip(w, outs, strict=True)), merged


def combine_branches(
    cfg: DilatedConfig, branches: tuple[Branch, ...], outs: list[Array], lses: list[Array | None]
) -> Array:
    """Join per-branch results ``(b, n, heads_of_branch, d)`` into ``(b, n, h, d)`` by the merge rule."""
    if cfg.merge == "head_partition":
        return jnp.concatenate(outs, axis=2) / cfg.num_groups
    group_outs, group_lses = [], []
    for i in range(cfg.num_groups):
        idx = [j for j, br in enumerate(branches) if br.group == i]
        order = np.argsort(np.concatenate([branches[j].heads for j in idx]))
        group_outs.append(jnp.take(jnp.concatenate([outs[j] for j in idx], axis=2), order, axis=2))
        group_lses.append(jnp.take(jnp.concatenate([_needed(lses[j]) for j in idx], axis=2), order, axis=2))
    return merge_lse(group_outs, group_lses)[0]


def _needed(lse: Array | None) -> Array:
    """A branch's log-sum-exp, which ``merge="lse"`` always asks for (``need_lse``)."""
    if lse is None:
        raise RuntimeError("merge='lse' needs every branch's log-sum-exp; a branch was run with need_lse=False.")
    return lse
