"""The portable attention kernel: tiled softmax attention in plain XLA with a flash-attention VJP.

Every variant reaches scores through :func:`flash_attention`. It computes, for query heads grouped
over key/value heads (GQA), ``out = softmax(scale * q k^T) v`` and the natural-log log-sum-exp of the
scaled visible scores, walking the scores in tiles chosen by a :class:`Tiling`:

* **Unit steps.** A unit is one (batch row, key/value head): its ``g`` query heads against its keys.
  When a unit's scores fit ``Tiling.step_scores``, a ``lax.map`` walks several units per step; only
  one step's scores exist at a time.
* **Causal tiles.** Under ``is_causal`` a unit's queries are cut into ``Tiling.causal_tiles`` query
  tiles; tile ``[a, b)`` is scored against keys ``[0, b)`` only, so key tiles wholly in the future are
  never computed (about ``(t + 1) / 2t`` of the square for ``t`` tiles).
* **Long rows.** A unit whose scores exceed the step is walked one query tile of
  ``Tiling.query_tile`` at a time, with an online softmax over key tiles of ``Tiling.key_tile``; under
  ``is_causal`` the loop over key tiles stops at the query tile's last key.

The backward pass is the flash-attention backward: it saves only ``q, k, v, out`` and the float32
log-sum-exp, recomputes each tile's probabilities ``P = exp(S - lse)``, and forms
``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O) - dLSE``: folding the log-sum-exp cotangent
into ``delta`` makes the gradient through ``lse`` exact (the ``lse`` merge and ring attention
differentiate through it). See docs/kernels.md for the layout choices that keep XLA:CPU's matrix
products in their fast forms.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the XLA kernel walks the scores (hashable: a static argument of ``jax.jit``).

    Attributes:
      step_scores: score elements one sequential step may hold (per array: scores, probabilities).
        It bounds the kernel's scratch memory, which is what keeps ring attention's per-device memory
        near ``1/P``; on a CPU it also keeps a step's scores in the cache.
      causal_tiles: query tiles a causal unit is cut into (tile ``i`` sees keys up to its last query).
      causal_tile_min: a causal tile is never shorter than this many queries (short units are one tile:
        skipping a few scores is not worth the extra products and compile time).
      query_tile: queries per step for units whose scores exceed ``step_scores``.
      key_tile: keys per inner step for such units (online softmax over key tiles).
    """

    step_scores: int = 1 << 20
    causal_tiles: int = 8
    query_tile: int = 256
    key_tile: int = 512
    causal_tile_min: int = 64

    def __post_init__(self) -> None:
        for name in ("step_scores", "causal_tiles", "query_tile", "key_tile", "causal_tile_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Tiling.{name}={value!r} should be a positive integer.")

    @classmethod
    def for_platform(cls, platform: str) -> Tiling:
        """The default tiling of a JAX platform name (``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``, ...).

        CPU: steps of 1 Mi scores (4 MiB in float32) stay near the 2-core machine's caches and bound
        scratch memory; larger steps ran slower, smaller ones pay XLA's per-step overhead
        (docs/kernels.md). Accelerators: few large steps (256 Mi scores), since a GPU wants big
        fused kernels, not thousands of small sequential ones.
        """
        if platform == "cpu":
            return CPU_TILING
        return ACCELERATOR_TILING


CPU_TILING = Tiling()
ACCELERATOR_TILING = Tiling(step_scores=1 << 28, causal_tiles=8, query_tile=1024, key_tile=8192, causal_tile_min=256)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one kernel call (hashable; the ``nondiff_argnums`` of the custom VJP)."""

    scale: float
    is_causal: bool
    dropout_rate: float
    tiling: Tiling


def stats_dtype(dtype: Any) -> jnp.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _scores(q, k, scale: float, acc, keys_first: bool = False):
    """``scale * q k^T`` as ``(U, Q, K)`` (or ``(U, K, Q)`` with ``keys_first``) in the stats dtype.

    For float32/float64 inputs the scale multiplies ``q`` (``Q x d`` work) instead of the scores
    (``Q x K`` work); half-precision inputs keep ``q`` unrounded and scale the float32 scores.
    """
    if q.dtype in (jnp.float32, jnp.float64):
        q, post = q * jnp.asarray(scale, q.dtype), None
    else:
        post = jnp.asarray(scale, acc)
    if keys_first:
        s = jnp.einsum("ukd,uqd->ukq", k, q, preferred_element_type=acc)
    else:
        s = jnp.einsum("uqd,ukd->uqk", q, k, preferred_element_type=acc)
    return s if post is None else s * post


def _causal_bounds(m: int, tiling: Tiling) -> list[tuple[int, int]]:
    """The causal query tiles ``[a, b)`` of a unit of ``m`` queries, as equal as whole numbers allow.

    ``tiling.causal_tiles`` of them, fewer when that would make a tile shorter than
    ``tiling.causal_tile_min``.
    """
    t = max(1, min(tiling.causal_tiles, m // tiling.causal_tile_min))
    edges = sorted({(i * m) // t for i in range(t + 1)})
    return list(zip(edges[:-1], edges[1:], strict=True))


# ----------------------------------------------------------------------------------------------
# Dropout: a keep-mask that depends only on (batch row, query head, query position, key), so every
# tiling of a call drops the same weights and the backward pass redraws them instead of storing them.


def _keep(row_keys: Array, heads: Array, queries: Array, mk: int, rate: float) -> Array:
    """Keep-mask ``(U, g, T, mk)``: ``bernoulli(fold_in(fold_in(row_key, head), query), 1 - rate, (mk,))``.

    ``row_keys``: ``(U,)`` keys of the units' batch rows; ``heads``: ``(U, g)`` query head indices;
    ``queries``: ``(T,)`` query positions.
    """

    def one(key, head, query):
        return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, head), query), 1.0 - rate, (mk,))

    per_query = jax.vmap(one, in_axes=(None, None, 0))
    per_head = jax.vmap(per_query, in_axes=(None, 0, None))
    return jax.vmap(per_head, in_axes=(0, 0, None))(row_keys, heads, queries)


# ----------------------------------------------------------------------------------------------
# One block of scores, forward and backward. Shapes: q (U, g, T, d), k/v (U, K, d), keep (U, g, T, K)
# or None; q0 is the position of q's first query (causal masking).


class Mask(NamedTuple):
    """Who may see whom, besides causality (a pytree; every field may be None).

    Attributes:
      valid: ``(U, K)`` boolean, False for keys nobody may see.
      q_ids, k_ids: ``(U, T)`` and ``(U, K)`` integers: query ``i`` sees key ``j`` only when
        ``q_ids[i] == k_ids[j]`` (packed documents: one id per document segment). Both or neither.
    """

    valid: Array | None = None
    q_ids: Array | None = None
    k_ids: Array | None = None

    def block(self, a: int, b: int, e: int) -> Mask:
        """The mask of queries ``[a, b)`` against keys ``[0, e)``."""
        return Mask(
            None if self.valid is None else self.valid[:, :e],
            None if self.q_ids is None else self.q_ids[:, a:b],
            None if self.k_ids is None else self.k_ids[:, :e],
        )


def _visible(q0, t: int, kk: int, k0, mask: Mask, is_causal: bool, groups: int = 1):
    """Boolean ``(U or 1, groups * T, K)`` visibility of a block, or None when every key is visible.

    Query row ``j`` of the block is position ``q0 + j % T`` (the ``groups`` query heads of a key/value
    head are stacked along the query axis).
    """
    vis = None
    if is_causal:
        rows = q0 + jnp.arange(t)[:, None]
        cols = k0 + jnp.arange(kk)[None, :]
        vis = jnp.tile(cols <= rows, (groups, 1))[None]
    if mask.valid is not None:
        kv = mask.valid[:, None, :]
        vis = kv if vis is None else vis & kv
    if mask.q_ids is not None and mask.k_ids is not None:
        same = jnp.tile(mask.q_ids[:, :, None] == mask.k_ids[:, None, :], (1, groups, 1))
        vis = same if vis is None else vis & same
    return vis


def _finite_keys(k, v):
    """``(k, v)`` with non-finite keys/values zeroed, and the ``(U, K)`` mask of those keys.

    A non-finite key or value must reach exactly the rows that see it (semantics section 11): zeroing
    it first keeps ``0 * nan`` of the rows that do not see it (masked, future, padded) from poisoning
    them; :func:`_poisoned_rows` says which rows do see it (they become NaN).
    """
    bad = ~(jnp.all(jnp.isfinite(k), axis=-1) & jnp.all(jnp.isfinite(v), axis=-1))
    return jnp.where(bad[..., None], 0, k), jnp.where(bad[..., None], 0, v), bad


def _poisoned_rows(mask: Mask, bad, q0, t: int, g: int, is_causal: bool, vis):
    """``(U, g * T)`` boolean: the rows that see a key marked in ``bad`` ``(U, K)``, at ``O(K)`` cost.

    Without ids a row sees every valid key (non-causal) or every valid key up to itself (causal), so it
    is poisoned when a valid bad key exists (at or before it). With query/key ids the block's own
    visibility is reduced instead.
    """
    u = bad.shape[0]
    if mask.q_ids is not None:
        return jnp.any(vis & bad[:, None, :], axis=-1)
    seen = bad if mask.valid is None else bad & mask.valid
    if not is_causal:
        return jnp.broadcast_to(jnp.any(seen, axis=-1, keepdims=True), (u, g * t))
    first = jnp.min(jnp.where(seen, jnp.arange(bad.shape[1]), jnp.iinfo(jnp.int32).max), axis=-1, keepdims=True)
    rows = q0 + jnp.arange(t)
    return jnp.tile(rows[None, :] >= first, (1, g))


def _block_forward(q, k, v, mask: Mask, keep, q0, spec: _Spec):
    """Softmax attention of one block: out ``(U, g, T, d)`` (stats dtype) and lse ``(U, g, T)``.

    The ``g`` query heads of a key/value head are stacked into one query axis of ``g * T`` rows, so
    every product is a plain batched matrix product (XLA:CPU slows down several-fold on products
    whose contracted or free axes are split around another axis).
    """
    acc = stats_dtype(q.dtype)
    u, g, t, d = q.shape
    k, v, bad = _finite_keys(k, v)
    s = _scores(q.reshape(u, g * t, d), k, spec.scale, acc)
    vis = _visible(q0, t, k.shape[1], 0, mask, spec.is_causal, g)
    if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
    top = jnp.max(s, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.exp(s - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    if keep is not None:
        p = jnp.where(keep.reshape(u, g * t, -1), p * jnp.asarray(1.0 / (1.0 - spec.dropout_rate), acc), 0.0)
    safe = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("uqk,ukd->uqd", p.astype(v.dtype), v, preferred_element_type=acc) / safe
    lse = jnp.where(total > 0, jnp.log(safe) + top, -jnp.inf)[..., 0]
    poisoned = _poisoned_rows(mask, bad, q0, t, g, spec.is_causal, vis)
    out = jnp.where(poisoned[..., None], jnp.nan, out)
    lse = jnp.where(poisoned, jnp.nan, lse)
    return out.reshape(u, g, t, d), lse.reshape(u, g, t)


def _block_backward(q, k, v, mask: Mask, keep, q0, lse, delta, do, spec: _Spec):
    """Gradients of one block, all from the saved log-sum-exp.

    Computed key-major (``S^T`` is ``(U, K, g * T)``), so that every product contracts the minor axis
    of its left operand: ``dV = P^T dO``, ``dK = dS^T Q`` and ``dQ^T = K^T dS^T`` (returned as
    ``(U, d, g, T)``; the caller transposes it once, outside the loop). XLA:CPU runs a product that
    contracts a major axis of its left operand several times slower. Non-finite keys/values are
    zeroed as in the forward pass (their rows' saved log-sum-exp is NaN, which keeps those rows' own
    gradients NaN without touching anyone else's).
    """
    acc = stats_dtype(q.dtype)
    u, g, t, d = q.shape
    kk = k.shape[1]
    k, v, _ = _finite_keys(k, v)
    scale = jnp.asarray(spec.scale, acc)
    qf, dof = q.reshape(u, g * t, d), do.reshape(u, g * t, d)
    st = _scores(qf, k, spec.scale, acc, keys_first=True)
    safe_lse = jnp.where(jnp.isfinite(lse) | jnp.isnan(lse), lse, jnp.inf).reshape(u, 1, g * t)  # no key: P = 0
    pt = jnp.exp(st - safe_lse)
    vis = _visible(q0, t, kk, 0, mask, spec.is_causal, g)
    if vis is not None:
        pt = jnp.where(jnp.swapaxes(vis, 1, 2), pt, 0.0)
    dpt = jnp.einsum("ukd,uqd->ukq", v, dof, preferred_element_type=acc)
    pt_used = pt
    if keep is not None:
        kt = jnp.swapaxes(keep.reshape(u, g * t, kk), 1, 2)
        inv = jnp.asarray(1.0 / (1.0 - spec.dropout_rate), acc)
        pt_used = jnp.where(kt, pt * inv, 0.0)
        dpt = jnp.where(kt, dpt * inv, 0.0)
    dv = jnp.einsum("ukq,uqd->ukd", pt_used.astype(do.dtype), dof, preferred_element_type=acc)
    dst = pt * (dpt - delta.reshape(u, 1, g * t))
    dk = jnp.einsum("ukq,uqd->ukd", dst.astype(q.dtype), qf, preferred_element_type=acc) * scale
    kt_phys = jnp.swapaxes(k, 1, 2)  # (U, d, K): small; a physical transpose
    dqt = jnp.einsum("udk,ukq->udq", kt_phys, dst.astype(k.dtype), preferred_element_type=acc) * scale
    return dqt.reshape(u, d, g, t), dk, dv


# ----------------------------------------------------------------------------------------------
# The unit path: whole units per step.


def _unit_forward(q, k, v, mask: Mask, keys, heads, spec: _Spec):
    """One step of whole units. q (U, g, m, d), k/v (U, mk, d) -> out (U, g, m, d), lse (U, g, m).

    The step draws its dropout keep-mask once (one random-bits computation per step keeps compile
    time down) and every causal tile slices it.
    """
    m, mk = q.shape[2], k.shape[1]
    keep = None if keys is None else _keep(keys, heads, jnp.arange(m), mk, spec.dropout_rate)
    if not spec.is_causal:
        return _block_forward(q, k, v, mask, keep, 0, spec)
    outs, lses = [], []
    for a, b in _causal_bounds(m, spec.tiling):
        e = min(b, mk)
        tile_keep = None if keep is None else keep[:, :, a:b, :e]
        o, l = _block_forward(q[:, :, a:b], k[:, :e], v[:, :e], mask.block(a, b, e), tile_keep, a, spec)
        outs.append(o)
        lses.append(l)
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _unit_backward(q, k, v, mask: Mask, keys, heads, lse, delta, do, spec: _Spec):
    """Gradients of one step of whole units: dq^T (U, d, g, m), dk, dv (U, mk, d)."""
    m, mk = q.shape[2], k.shape[1]
    keep = None if keys is None else _keep(keys, heads, jnp.arange(m), mk, spec.dropout_rate)
    if not spec.is_causal:
        return _block_backward(q, k, v, mask, keep, 0, lse, delta, do, spec)
    dqts, dk, dv = [], None, None
    for a, b in _causal_bounds(m, spec.tiling):
        e = min(b, mk)
        tile_keep = None if keep is None else keep[:, :, a:b, :e]
        rows = (lse[:, :, a:b], delta[:, :, a:b], do[:, :, a:b])
        dqt, dki, dvi = _block_backward(
            q[:, :, a:b], k[:, :e], v[:, :e], mask.block(a, b, e), tile_keep, a, *rows, spec
        )
        pad = [(0, 0), (0, mk - e), (0, 0)]
        dki, dvi = jnp.pad(dki, pad), jnp.pad(dvi, pad)
        dk = dki if dk is None else dk + dki
        dv = dvi if dv is None else dv + dvi
        dqts.append(dqt)
    return jnp.concatenate(dqts, axis=3), dk, dv


def _skip_empty(fn, mask: Mask, zeros):
    """``fn`` guarded by a ``lax.cond``: a step whose units have no visible key returns ``zeros()``.

    Steps of wholly masked units (fully padded rows, the empty rows of packed documents) then cost
    nothing. Without a key mask every step has keys, and ``fn`` runs unguarded.
    """
    if mask.valid is None:
        return fn

    def guarded(*args):
        has_keys = jnp.any(args[3].valid)
        # `zeros` is offset by an exact 0 derived from the predicate, so that both branches carry the
        # same varying-ness under shard_map (ring attention): an output made from constants alone would not.
        zero = jnp.asarray(has_keys, jnp.float32) * 0
        empty = lambda a: jax.tree.map(lambda x: x + zero.astype(x.dtype), zeros(*a))  # noqa: E731
        return jax.lax.cond(has_keys, lambda a: fn(*a), empty, args)

    return guarded


# ----------------------------------------------------------------------------------------------
# The long-row path: one query tile per step, an online softmax over key tiles.


def _pad_to(x: Array, axis: int, size: int, value=0) -> Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def _long_plan(m: int, mk: int, tiling: Tiling) -> tuple[int, int, int, int]:
    """Query tile, key tile and their counts for the long-row path."""
    tq = min(tiling.query_tile, m)
    tk = min(tiling.key_tile, mk)
    return tq, tk, -(-m // tq), -(-mk // tk)


def _key_tiles_needed(i, tq: int, tk: int, nk: int, mk: int, is_causal: bool):
    """Key tiles query tile ``i`` needs: all, or (causal) up to the one holding its last query."""
    if not is_causal:
        return nk
    last = jnp.minimum((i + 1) * tq, mk) - 1
    return jnp.clip(last // tk + 1, 0, nk)


class _LongRow(NamedTuple):
    """One unit's keys, values and mask padded to whole key tiles (the long-row path's operands)."""

    k: Array  # (nk * tk, d), non-finite keys/values zeroed
    v: Array
    valid: Array  # (nk * tk,), False on the padding
    bad: Array  # (nk * tk,), the keys whose key or value is non-finite
    q_ids: Array | None  # (nq * tq,)
    k_ids: Array | None  # (nk * tk,)

    @classmethod
    def pad(cls, k, v, mask: Mask, nq: int, tq: int, nk: int, tk: int) -> _LongRow:
        mk = k.shape[0]
        k, v, bad = _finite_keys(k, v)
        valid = jnp.ones((mk,), bool) if mask.valid is None else mask.valid
        ids: tuple[Array | None, Array | None] = (None, None)
        if mask.q_ids is not None and mask.k_ids is not None:
            ids = (_pad_to(mask.q_ids, 0, nq * tq, -1), _pad_to(mask.k_ids, 0, nk * tk, -2))
        size = nk * tk
        return cls(
            _pad_to(k, 0, size), _pad_to(v, 0, size), _pad_to(valid, 0, size, False), _pad_to(bad, 0, size, False), *ids
        )

    def tile(self, i, tq: int, j, tk: int) -> tuple[Array, Array, Mask, Array]:
        """Key tile ``j`` (k, v, with a leading unit axis of 1), its mask against query tile ``i``, its bad keys."""
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, j * tk, tk)[None]
        q_ids = None if self.q_ids is None else jax.lax.dynamic_slice_in_dim(self.q_ids, i * tq, tq)[None]
        k_ids = None if self.k_ids is None else cut(self.k_ids)
        return cut(self.k), cut(self.v), Mask(cut(self.valid), q_ids, k_ids), cut(self.bad)


def _zero_like(*refs, dtype) -> Array:
    """A scalar 0 computed from ``refs``: added to a loop's initial carry, it gives the carry the
    ``shard_map`` varying axes of the values the loop body mixes in (a ring device's inputs), which
    a fresh ``jnp.zeros`` lacks. Never NaN: it sums ``zeros_like`` of the inputs."""
    refs = tuple(jax.random.key_data(r) if jnp.issubdtype(r.dtype, jax.dtypes.prng_key) else r
                 for r in refs if r is not None)  # fmt: skip
    return sum((jnp.zeros_like(r, dtype).sum() for r in refs), jnp.zeros((), dtype))


def _long_forward_row(q, k, v, mask: Mask, key, heads, spec: _Spec):
    """One unit walked in tiles. q (g, m, d), k/v (mk, d), mask of (mk,) keys -> out (g, m, d), lse (g, m)."""
    acc = stats_dtype(q.dtype)
    g, m, d = q.shape
    mk = k.shape[0]
    tq, tk, nq, nk = _long_plan(m, mk, spec.tiling)
    qp = _pad_to(q, 1, nq * tq)
    row = _LongRow.pad(k, v, mask, nq, tq, nk, tk)
    inv = jnp.asarray(1.0 / (1.0 - spec.dropout_rate), acc)

    def query_tile(i):
        qi = jax.lax.dynamic_slice_in_dim(qp, i * tq, tq, axis=1).reshape(1, g * tq, d)
        keep_row = None
        if key is not None:
            keep_row = _pad_to(
                _keep(key[None], heads[None], i * tq + jnp.arange(tq), mk, spec.dropout_rate), 3, nk * tk, False
            ).reshape(1, g * tq, nk * tk)

        def body(j, carry):
            o, top, total, poisoned = carry
            kj, vj, tile_mask, bad = row.tile(i, tq, j, tk)
            s = _scores(qi, kj, spec.scale, acc)
            vis = _visible(i * tq, tq, tk, j * tk, tile_mask, spec.is_causal, g)
            s = jnp.where(vis, s, -jnp.inf)
            poisoned = poisoned | jnp.any(vis & bad[:, None, :], axis=-1)
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
            p = jnp.exp(s - shift[..., None])
            fade = jnp.exp(jnp.where(jnp.isfinite(top), top, shift) - shift)
            total = total * fade + jnp.sum(p, axis=-1)
            if keep_row is not None:
                p = jnp.where(jax.lax.dynamic_slice_in_dim(keep_row, j * tk, tk, axis=2), p * inv, 0.0)
            o = o * fade[..., None] + jnp.einsum("uqk,ukd->uqd", p.astype(v.dtype), vj, preferred_element_type=acc)
            return o, new_top, total, poisoned

        rows = (1, g * tq)
        z = _zero_like(qi, k, v, *mask, key, dtype=acc)
        init = (jnp.zeros((*rows, d), acc) + z, jnp.full(rows, -jnp.inf, acc) + z, jnp.zeros(rows, acc) + z,
                jnp.zeros(rows, bool) | (z != 0))  # fmt: skip
        o, top, total, poisoned = jax.lax.fori_loop(0, _key_tiles_needed(i, tq, tk, nk, mk, spec.is_causal), body, init)
        safe = jnp.where(total > 0, total, 1.0)
        lse = jnp.where(poisoned, jnp.nan, jnp.where(total > 0, jnp.log(safe) + top, -jnp.inf))
        o = jnp.where(poisoned[..., None], jnp.nan, o / safe[..., None])
        return o.reshape(g, tq, d), lse.reshape(g, tq)

    out, lse = jax.lax.map(query_tile, jnp.arange(nq))  # (nq, g, tq, d), (nq, g, tq)
    out = jnp.moveaxis(out, 0, 1).reshape(g, nq * tq, d)[:, :m]
    lse = jnp.moveaxis(lse, 0, 1).reshape(g, nq * tq)[:, :m]
    return out, lse


def _long_backward_row(q, k, v, mask: Mask, key, heads, lse, delta, do, spec: _Spec):
    """Gradients of one unit walked in tiles: dq (g, m, d), dk, dv (mk, d).

    Two passes, each accumulating in its loop carry: key tiles outer for dK and dV (inner over the
    query tiles that see them), query tiles outer for dQ (inner over their key tiles). The dQ pass
    recomputes the scores once more, so no step ever adds into another step's output.
    """
    acc = stats_dtype(q.dtype)
    scale = jnp.asarray(spec.scale, acc)
    inv = jnp.asarray(1.0 / (1.0 - spec.dropout_rate), acc)
    g, m, d = q.shape
    mk = k.shape[0]
    tq, tk, nq, nk = _long_plan(m, mk, spec.tiling)
    qp, dop = _pad_to(q, 1, nq * tq), _pad_to(do, 1, nq * tq)
    lsep = _pad_to(jnp.where(jnp.isfinite(lse) | jnp.isnan(lse), lse, jnp.inf), 1, nq * tq, jnp.inf)
    deltap = _pad_to(delta, 1, nq * tq)
    row = _LongRow.pad(k, v, mask, nq, tq, nk, tk)

    def keep_row(i):
        """Query tile i's keep-mask over every key, ``(1, g * tq, nk * tk)`` (None without dropout)."""
        if key is None:
            return None
        bits = _keep(key[None], heads[None], i * tq + jnp.arange(tq), mk, spec.dropout_rate)
        return _pad_to(bits, 3, nk * tk, False).reshape(1, g * tq, nk * tk)

    def tiles(i, j, keep_i):
        """Query tile i (queries stacked over the g heads) and key tile j, each with a leading axis of 1."""
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * tq, tq, axis=1).reshape(1, g * tq, *x.shape[2:])
        kj, vj, tile_mask, _ = row.tile(i, tq, j, tk)
        vis = _visible(i * tq, tq, tk, j * tk, tile_mask, spec.is_causal, g)
        keep = None if keep_i is None else jax.lax.dynamic_slice_in_dim(keep_i, j * tk, tk, axis=2)
        return take(qp), take(dop), take(lsep), take(deltap), kj, vj, vis, keep

    def key_tile(j):  # dK, dV of key tile j
        first = (j * tk) // tq if spec.is_causal else 0

        def body(i, carry):  # redraws query tile i's keep bits for every key tile (dropout only)
            dk, dv = carry
            qi, doi, li, di, kj, vj, vis, keep = tiles(i, j, keep_row(i))
            st = _scores(qi, kj, spec.scale, acc, keys_first=True)
            pt = jnp.where(jnp.swapaxes(vis, 1, 2), jnp.exp(st - li[:, None]), 0.0)
            dpt = jnp.einsum("ukd,uqd->ukq", vj, doi, preferred_element_type=acc)
            pt_used = pt
            if keep is not None:
                kt = jnp.swapaxes(keep, 1, 2)
                pt_used = jnp.where(kt, pt * inv, 0.0)
                dpt = jnp.where(kt, dpt * inv, 0.0)
            dst = pt * (dpt - di[:, None])
            dv = dv + jnp.einsum("ukq,uqd->ukd", pt_used.astype(do.dtype), doi, preferred_element_type=acc)[0]
            dk = dk + jnp.einsum("ukq,uqd->ukd", dst.astype(q.dtype), qi, preferred_element_type=acc)[0] * scale
            return dk, dv

        z = _zero_like(q, k, v, do, lse, delta, *mask, key, dtype=acc)
        return jax.lax.fori_loop(first, nq, body, (jnp.zeros((tk, d), acc) + z, jnp.zeros((tk, d), acc) + z))

    def query_tile(i):  # dQ of query tile i
        keep_i = keep_row(i)

        def body(j, dq):
            qi, doi, li, di, kj, vj, vis, keep = tiles(i, j, keep_i)
            s = _scores(qi, kj, spec.scale, acc)
            p = jnp.where(vis, jnp.exp(s - li[..., None]), 0.0)
            dp = jnp.einsum("uqd,ukd->uqk", doi, vj, preferred_element_type=acc)
            if keep is not None:
                dp = jnp.where(keep, dp * inv, 0.0)
            ds = p * (dp - di[..., None])
            return dq + jnp.einsum("uqk,ukd->uqd", ds.astype(k.dtype), kj, preferred_element_type=acc)[0] * scale

        z = _zero_like(q, k, v, do, lse, delta, *mask, key, dtype=acc)
        dq = jax.lax.fori_loop(
            0, _key_tiles_needed(i, tq, tk, nk, mk, spec.is_causal), body, jnp.zeros((g * tq, d), acc) + z
        )
        return dq.reshape(g, tq, d)

    dk, dv = jax.lax.map(key_tile, jnp.arange(nk))  # (nk, tk, d)
    dq = jax.lax.map(query_tile, jnp.arange(nq))  # (nq, g, tq, d)
    dq = jnp.moveaxis(dq, 0, 1).reshape(g, nq * tq, d)[:, :m]
    return dq, dk.reshape(nk * tk, d)[:mk], dv.reshape(nk * tk, d)[:mk]


# ----------------------------------------------------------------------------------------------
# The walk over units, and the custom VJP.


def _units_per_step(g: int, m: int, mk: int, spec: _Spec) -> int:
    """Units per step of the unit path, or 0 when one unit's scores exceed the step (long-row path)."""
    per_unit = g * m * mk
    if spec.is_causal:
        per_unit = sum(g * (b - a) * min(b, mk) for a, b in _causal_bounds(m, spec.tiling))
    per_unit = max(per_unit, 1)
    return spec.tiling.step_scores // per_unit


def _walk(fn, per_step: int, args):
    """``fn`` (batched over units) on the leading unit axis of ``args``, ``per_step`` units per step.

    Whole steps go through one ``lax.map``; a last partial step runs after it.
    """
    units = jax.tree.leaves(args)[0].shape[0]
    if per_step >= units:
        return fn(*args)
    steps, rest = divmod(units, per_step)
    head = jax.tree.map(lambda x: x[: steps * per_step].reshape(steps, per_step, *x.shape[1:]), args)
    out = jax.lax.map(lambda a: fn(*a), head)
    out = jax.tree.map(lambda y: y.reshape(steps * per_step, *y.shape[2:]), out)
    if rest:
        tail = fn(*jax.tree.map(lambda x: x[steps * per_step :], args))
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
    return out


def _unit_keys(rng, batch: int, hk: int, g: int):
    """Per-unit dropout inputs: the batch row's key ``(U,)`` and its query heads ``(U, g)``."""
    keys = jax.random.split(rng, batch)[jnp.repeat(jnp.arange(batch), hk)]
    heads = jnp.tile(jnp.arange(hk * g).reshape(hk, g), (batch, 1))
    return keys, heads


def _unit_mask(mask: Mask, hk: int) -> Mask:
    """The ``(B, ...)`` mask repeated for the ``h_kv`` units of each batch row."""
    return Mask(*(None if x is None else jnp.repeat(x, hk, axis=0) for x in mask))


def _forward(q, k, v, mask: Mask, rng, spec: _Spec):
    b, hk, g, m, d = q.shape
    mk = k.shape[2]
    units = b * hk
    acc = stats_dtype(q.dtype)
    qu, ku, vu = q.reshape(units, g, m, d), k.reshape(units, mk, d), v.reshape(units, mk, d)
    keys, heads = (None, None) if rng is None else _unit_keys(rng, b, hk, g)
    args = (qu, ku, vu, _unit_mask(mask, hk), keys, heads)
    per_step = _units_per_step(g, m, mk, spec)
    if per_step:

        def empty(q, *_):
            return jnp.zeros(q.shape, acc), jnp.full(q.shape[:3], -jnp.inf, acc)

        fn = _skip_empty(functools.partial(_unit_forward, spec=spec), args[3], empty)
        out, lse = _walk(fn, per_step, args)
    else:
        row = functools.partial(_long_forward_row, spec=spec)
        out, lse = jax.lax.map(lambda a: row(*a), args)
    return out.reshape(b, hk, g, m, d), lse.reshape(b, hk, g, m)


def _backward(q, k, v, mask: Mask, rng, out, lse, dout, dlse, spec: _Spec):
    b, hk, g, m, d = q.shape
    mk = k.shape[2]
    acc = stats_dtype(q.dtype)
    units = b * hk
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse.astype(acc)
    do = dout.astype(q.dtype)  # the products run in the input dtype, accumulating in `acc`
    qu, ku, vu = q.reshape(units, g, m, d), k.reshape(units, mk, d), v.reshape(units, mk, d)
    keys, heads = (None, None) if rng is None else _unit_keys(rng, b, hk, g)
    rows = (lse.reshape(units, g, m), delta.reshape(units, g, m), do.reshape(units, g, m, d))
    args = (qu, ku, vu, _unit_mask(mask, hk), keys, heads, *rows)
    per_step = _units_per_step(g, m, mk, spec)
    if per_step:

        def empty(q, k, *_):
            u = q.shape[0]
            return jnp.zeros((u, d, g, m), acc), jnp.zeros(k.shape, acc), jnp.zeros(k.shape, acc)

        fn = _skip_empty(functools.partial(_unit_backward, spec=spec), args[3], empty)
        dqt, dk, dv = _walk(fn, per_step, args)
        dq = jnp.transpose(dqt, (0, 2, 3, 1))
    else:
        row = functools.partial(_long_backward_row, spec=spec)
        dq, dk, dv = jax.lax.map(lambda a: row(*a), args)
    return (
        dq.reshape(q.shape).astype(q.dtype),
        dk.reshape(k.shape).astype(k.dtype),
        dv.reshape(v.shape).astype(v.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, mask, rng, spec):
    return _forward(q, k, v, mask, rng, spec)


def _flash_fwd(q, k, v, mask, rng, spec):
    out, lse = _forward(q, k, v, mask, rng, spec)
    return (out, lse), (q, k, v, mask, rng, out, lse)


def _flash_bwd(spec, residuals, cotangents):
    q, k, v, mask, rng, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, mask, rng, out, lse, dout, dlse, spec)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    is_causal: bool = False,
    kv_valid: Array | None = None,
    q_ids: Array | None = None,
    kv_ids: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    tiling: Tiling | None = None,
) -> tuple[Array, Array]:
    """Softmax attention with its log-sum-exp, tiled in XLA, with the flash-attention VJP.

    Args:
      q: ``(B, m, h, d)`` queries.
      k, v: ``(B, mk, h_kv, d)`` keys and values; ``h % h_kv == 0`` and query head ``j`` uses key/value
        head ``j // (h / h_kv)`` (grouped-query attention; ``h_kv = h`` is ordinary attention).
      scale: multiplies the scores ``q . k``.
      is_causal: query ``p`` sees key ``p' <= p`` (top-left aligned).
      kv_valid: optional ``(B, mk)`` boolean, False for keys nobody may see.
      q_ids, kv_ids: optional ``(B, m)`` and ``(B, mk)`` integers, given together: query ``i`` sees
        key ``j`` only when ``q_ids[i] == kv_ids[j]`` (several packed sequences in one row).
      dropout_rate: probability of dropping an attention weight (kept weights scaled by
        ``1 / (1 - rate)``; the log-sum-exp is that of the undropped weights).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``. The weight of query ``p`` of head
        ``j`` on key ``p'`` in batch row ``i`` is kept when element ``p'`` of
        ``bernoulli(fold_in(fold_in(split(dropout_rng, B)[i], j), p), 1 - rate, (mk,))`` is True,
        whatever the tiling.
      tiling: how scores are walked; default ``Tiling.for_platform`` of the default backend.

    Returns:
      ``out`` ``(B, m, h, d)`` in the statistics dtype (float32, float64 for float64 inputs; 0 for a
      row with no visible key) and ``lse`` ``(B, m, h)``, the natural-log log-sum-exp of the row's
      scaled visible scores (``-inf`` for such a row).
    """
    b, m, h, d = q.shape
    mk, hk = k.shape[1], k.shape[2]
    g = h // hk
    if tiling is None:
        tiling = Tiling.for_platform(jax.default_backend())
    spec = _Spec(float(scale), bool(is_causal), float(dropout_rate), tiling)
    acc = stats_dtype(q.dtype)
    if b == 0 or m == 0 or h == 0 or d == 0 or mk == 0:
        return jnp.zeros((b, m, h, d), acc), jnp.full((b, m, h), -jnp.inf, acc)
    qh = q.reshape(b, m, hk, g, d).transpose(0, 2, 3, 1, 4)  # (b, h_kv, g, m, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, h_kv, mk, d)
    rng = dropout_rng if dropout_rate > 0.0 else None
    out, lse = _flash(qh, kh, vh, Mask(kv_valid, q_ids, kv_ids), rng, spec)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, m, h, d)
    lse = lse.transpose(0, 3, 1, 2).reshape(b, m, h)
    return out, lse


def reference_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    is_causal: bool = False,
    kv_valid: Array | None = None,
    q_ids: Array | None = None,
    kv_ids: Array | None = None,
) -> tuple[Array, Array]:
    """The plain unblocked form of :func:`flash_attention` (every score at once, plain autodiff).

    Same arguments and results, without dropout or tiling; tests hold the kernel's values and custom
    gradients to it.
    """
    b, m, h, d = q.shape
    mk, hk = k.shape[1], k.shape[2]
    acc = stats_dtype(q.dtype)
    kr, vr = jnp.repeat(k, h // hk, axis=2), jnp.repeat(v, h // hk, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=acc) * scale
    vis = jnp.ones((m, mk), bool)
    if is_causal:
        vis = jnp.arange(mk)[None, :] <= jnp.arange(m)[:, None]
    vis = vis[None, None]
    if kv_valid is not None:
        vis = vis & kv_valid[:, None, None, :]
    if q_ids is not None and kv_ids is not None:
        vis = vis & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    s = jnp.where(vis, s, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.exp(s - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p / safe, vr.astype(acc))
    lse = jnp.where(total > 0, jnp.log(safe) + top, -jnp.inf)[..., 0].transpose(0, 2, 1)
    return out, lse
