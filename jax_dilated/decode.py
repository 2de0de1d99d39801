"""Exact key/value-cache decoding of dilated attention (docs/semantics.md section 12).

The row decoded at absolute position ``t`` equals row ``t`` of the full causal forward over the tokens
seen so far. Under causal masking a branch's query at ``t`` sees only kept keys of its own segment up to
``t``, so a step needs one window of the cache per branch, never the whole context:

- one new position (``T = 1``): per branch, the ``s`` cached positions of the segment holding ``t``,
  dilated to their ``s / r`` kept keys; the cost is ``O(sum_i s_i / r_i)`` whatever ``t`` is;
- a chunk of ``T > 1`` positions (a prompt): the causal forward over a window that starts at a
  multiple of ``lcm(s_i)`` (a segment boundary of every group, so no earlier key is visible to the
  chunk) and covers the chunk; its length ``min(roundup(T + lcm - 1, lcm), max_length)`` is static.

Shapes never depend on the position ``index``: the cache is updated with ``dynamic_update_slice`` and
read with ``dynamic_slice``, so one compiled step serves every position of a given ``T``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dilated_plan import Branch, DilatedConfig, default_scale
from dilated_plan.checks import check_scale
from dilated_plan.config import kv_buckets
from jax_dilated.branches import Layout, _heads, combine_branches
from jax_dilated.dilated import Call, run
from jax_dilated.kernels import Backend, attend, resolve

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Step:
    """The static part of a decode step (hashable: one compiled program per value and shape)."""

    cfg: DilatedConfig
    scale: float | None
    backend: Any


def _kept_window(cache: Array, start: Array, br: Branch) -> Array:
    """The kept positions of ``br`` in the segment ``[start, start + s)`` of ``cache``: ``(b, s / r, h_kv, d)``."""
    w = jax.lax.dynamic_slice_in_dim(cache, start, br.segment, axis=1)
    return w.reshape(w.shape[0], br.kept, br.rate, *w.shape[2:])[:, :, br.offset]


def _one_position(q: Array, cached_key: Array, cached_value: Array, index: Array, step: _Step) -> Array:
    """``q`` ``(b, 1, h, d)`` at position ``index``: one dilated window of the cache per branch."""
    b, _, h, d = q.shape
    cfg, scale = step.cfg, default_scale(d, step.scale)
    group = h // cached_key.shape[2]
    branches = cfg.branches(h)
    outs, lses = [], []
    for br in branches:
        s, r, m = br.segment, br.rate, br.kept
        start = index - index % s
        keys, values = _kept_window(cached_key, start, br), _kept_window(cached_value, start, br)
        kept_pos = start + br.offset + r * jnp.arange(m)
        on_grid = (index % s) % r == br.offset  # off the grid the row sees nothing: 0 and lse -inf
        valid = jnp.broadcast_to((kept_pos <= index) & on_grid, (b, m))
        buckets = kv_buckets(br.heads, group)
        parts = [
            attend(
                _heads(q, bucket.query_heads),
                _heads(keys, bucket.kv_heads),
                _heads(values, bucket.kv_heads),
                scale=scale,
                kv_valid=valid,
                need_lse=cfg.merge == "lse",
                implementation=step.backend,
            )
            for bucket in buckets
        ]
        back = np.argsort([j for bucket in buckets for j in bucket.query_heads])  # to the order of br.heads
        outs.append(jnp.take(jnp.concatenate([o for o, _ in parts], axis=2), back, axis=2))
        lse_parts = [l for _, l in parts if l is not None]
        lses.append(
            jnp.take(jnp.concatenate(lse_parts, axis=2), back, axis=2) if len(lse_parts) == len(parts) else None
        )
    return combine_branches(cfg, branches, outs, lses)


def _chunk(q: Array, cached_key: Array, cached_value: Array, index: Array, step: _Step) -> Array:
    """``q`` ``(b, T, h, d)`` at ``[index, index + T)``: the causal forward over an aligned window."""
    b, t, h, d = q.shape
    length, period = cached_key.shape[1], step.cfg.period
    width = min(-(-(t + period - 1) // period) * period, length)
    start = jnp.minimum(index - index % period, length - width)  # a multiple of period: length is one
    keys = jax.lax.dynamic_slice_in_dim(cached_key, start, width, axis=1)
    values = jax.lax.dynamic_slice_in_dim(cached_value, start, width, axis=1)
    queries = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((b, width, h, d), q.dtype), q, index - start, axis=1)
    call = Call(step.cfg, True, step.scale, 0.0, step.backend)
    out = run(queries, keys, values, None, None, None, call, Layout(strided=True))
    return jax.lax.dynamic_slice_in_dim(out, index - start, t, axis=1)


@functools.partial(jax.jit, static_argnames=("step",))
def _decode(q, k, v, cached_key, cached_value, index, step: _Step):
    t, length = q.shape[1], cached_key.shape[1]
    index = jnp.asarray(index, jnp.int32)
    cached_key = jax.lax.dynamic_update_slice_in_dim(cached_key, k.astype(cached_key.dtype), index, axis=1)
    cached_value = jax.lax.dynamic_update_slice_in_dim(cached_value, v.astype(cached_value.dtype), index, axis=1)
    qc = q.astype(cached_key.dtype)
    out = (_one_position if t == 1 else _chunk)(qc, cached_key, cached_value, index, step)
    # XLA clamps an out-of-range slice start: past the cache's end the rows would be silently wrong.
    out = jnp.where((index >= 0) & (index + t <= length), out, jnp.nan)
    return out.astype(q.dtype), cached_key, cached_value


def _check(q: Array, k: Array, v: Array, cached_key: Array, cached_value: Array, cfg: DilatedConfig) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("cached_key", cached_key), ("cached_value", cached_value)):
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} and dtype {x.dtype}; pass a floating (b, n, h, d) array."
            )
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit: k and v should be "
            f"(b, T, h_kv, d) = ({b}, {t}, h_kv, {d}) with h_kv dividing h = {h}."
        )
    if cached_key.shape != cached_value.shape or cached_key.shape[::2] != (b, k.shape[2]) or cached_key.shape[3] != d:
        raise ValueError(
            f"cached_key {tuple(cached_key.shape)} and cached_value {tuple(cached_value.shape)} should both be "
            f"(b, max_length, h_kv, d) = ({b}, max_length, {k.shape[2]}, {d})."
        )
    cfg.check_heads(h)
    cfg.check_cache_length(cached_key.shape[1])
    if t == 0 or t > cached_key.shape[1]:
        raise ValueError(f"q holds {t} new positions; decode 1 to max_length={cached_key.shape[1]} at a time.")


def dilated_attention_decode(
    q: Array,
    k: Array,
    v: Array,
    cached_key: Array,
    cached_value: Array,
    index: int | Array,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    scale: float | None = None,
    merge: str = "head_partition",
    implementation: str | Backend | None = None,
) -> tuple[Array, Array, Array]:
    """One decoding step of causal dilated attention with a key/value cache.

    Writes ``k``/``v`` into the cache at ``[index, index + T)`` and returns the rows of those positions,
    equal to rows ``index .. index+T-1`` of the causal :func:`jax_dilated.dilated_attention` over
    everything cached (semantics section 12). ``T = 1`` costs one dilated segment window per branch,
    independent of ``index``; ``T > 1`` (a prompt or a chunk of one) runs the causal forward over a window
    of about ``T + lcm(segment_lengths)`` positions. One compiled program per ``T`` serves every ``index``.

    Args:
      q: ``(b, T, h, d)`` queries of positions ``index .. index + T - 1``.
      k, v: ``(b, T, h_kv, d)``, their keys and values (``h_kv`` dividing ``h``, grouped-query heads).
      cached_key, cached_value: ``(b, max_length, h_kv, d)``, the cache; ``max_length`` a multiple of
        ``lcm(segment_lengths)``. Positions ``< index`` must hold earlier keys; later ones are ignored.
        The arrays passed in are not changed (a new cache is returned); inside a ``jax.jit`` that
        donates the cache, XLA updates it in place.
      index: position of the first new query, an int or an int32 scalar array (traced under jit). If
        ``index + T > max_length`` the rows returned are NaN (a concrete ``index`` raises instead).
      segment_lengths, dilation_rates, scale, merge, implementation: as in
        :func:`jax_dilated.dilated_attention`.

    Returns:
      ``(out, cached_key, cached_value)``: ``out`` ``(b, T, h, d)`` in the dtype of ``q``, and the
      updated cache.

    >>> cache = jnp.zeros((1, 16, 2, 8))
    >>> x = jnp.ones((1, 1, 2, 8))
    >>> out, ck, cv = dilated_attention_decode(x, x, x, cache, cache, 0, segment_lengths=(4, 8), dilation_rates=(1, 2))
    >>> out.shape, float(ck[0, 0, 0, 0])
    ((1, 1, 2, 8), 1.0)
    """
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    q, k, v, cached_key, cached_value = (jnp.asarray(x) for x in (q, k, v, cached_key, cached_value))
    _check(q, k, v, cached_key, cached_value, cfg)
    if not isinstance(index, jax.core.Tracer):
        i, t, length = int(index), q.shape[1], cached_key.shape[1]
        if i < 0 or i + t > length:
            raise ValueError(
                f"index={i} with {t} new positions overflows the cache of max_length={length}; "
                f"use a longer cache (init_cache) or index <= {length - t}."
            )
    step = _Step(cfg, check_scale(scale), resolve(implementation))
    return _decode(q, k, v, cached_key, cached_value, index, step)
