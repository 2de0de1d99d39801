"""The branch machinery of dilated attention: dilate, attend one branch, put back, merge.

A branch (:class:`dilated_plan.Branch`) is a set of heads that see the same dilated positions.
:func:`dilate` gathers a branch's kept positions of every segment as one batch of short sequences
(a strided reshape, no index gather), :func:`branch_attention` runs the kernel on them,
:func:`undilate` puts the result back (by padding, never by scatter), and :func:`combine_branches`
applies the merge rule (docs/semantics.md sections 1-2). The standard, improved and ring variants
all build on these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dilated_plan import Branch, DilatedConfig
from dilated_plan.config import branch_pieces, kv_buckets
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a piece's kept positions are gathered into rows and put back (static, hashable).

    ``strided`` (the improved form): a reshape and a strided slice, put back by padding. ``indexed``
    (the standard form): explicit position indices, an index gather and a scatter into zeros.
    """

    strided: bool = True

    def gather(self, x: Array, br: Branch) -> Array:
        """``(b, L, ...)`` with ``L`` a multiple of ``br.segment`` -> ``(b * L/s, s/r, ...)``."""
        if self.strided:
            return dilate(x, br)
        b, length = x.shape[:2]
        return x[:, _positions(length, br)].reshape(b * (length // br.segment), br.kept, *x.shape[2:])

    def scatter(self, x: Array, br: Branch, batch: int, length: int, fill: float) -> Array:
        """Inverse of :meth:`gather`: ``(b * L/s, s/r, ...)`` -> ``(b, L, ...)`` with ``fill`` elsewhere."""
        if self.strided:
            return undilate(x, br, batch, fill)
        rest = x.shape[2:]
        full = jnp.full((batch, length, *rest), fill, x.dtype)
        return full.at[:, _positions(length, br)].set(x.reshape(batch, -1, *rest))


def _positions(length: int, br: Branch) -> np.ndarray:
    """The kept positions of every segment of ``br`` in ``[0, length)``, in order."""
    starts = np.arange(0, length, br.segment)
    return (starts[:, None] + br.offset + br.rate * np.arange(br.kept)[None, :]).reshape(-1)


def _heads(x: Array, heads: tuple[int, ...]) -> Array:
    """The ``heads`` of ``x`` (axis 2): a strided slice when they are evenly spaced, else a gather."""
    steps = {b - a for a, b in zip(heads, heads[1:], strict=False)}
    if len(steps) <= 1:
        step = steps.pop() if steps else 1
        return x[:, :, heads[0] : heads[-1] + 1 : step]
    return jnp.take(x, np.asarray(heads), axis=2)


def _pad_positions(x: Array, extra: int, fill: Any = 0) -> Array:
    if not extra:
        return x
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


class Documents(NamedTuple):
    """Packed documents of a call, per position: ``start`` ``(b, n)``, the first position of its document.

    ``position`` ``(n,)``: the positions of the rows, ``0 .. n-1`` when None. A window of a longer
    sequence (a ring device's chunk with its neighbours' edges) passes its global positions and
    starts, and ``own``, the ``[from, to)`` row indices whose outputs it keeps: a (document, segment)
    run that begins before the window's first position (it is cut) or cannot reach a kept row (it
    starts after them or ends, at the latest ``s`` after its start, before them) is not laid out, so
    the kernel does no work for it; its rows are the caller's to drop.
    """

    start: Array
    position: Array | None = None
    own: tuple[int, int] | None = None

    @classmethod
    def from_ids(cls, document_ids: Array) -> Documents:
        """A document is a maximal run of equal ids (semantics section 10)."""
        n = document_ids.shape[1]
        new = jnp.concatenate(
            [jnp.ones_like(document_ids[:, :1], bool), document_ids[:, 1:] != document_ids[:, :-1]], axis=1
        )
        start = jax.lax.cummax(jnp.where(new, jnp.arange(n), 0), axis=1)
        return cls(start)


def _document_slots(docs: Documents, br: Branch, rows: int) -> tuple[Array, Array, Array]:
    """Where each position of ``br`` goes in a layout of ``rows`` rows of ``br.kept`` slots.

    Positions count from their document's start, so each (document, segment of it) is a run of kept
    positions, at most ``m = s / r`` of them. Runs are laid out in order, next-fit: a row takes runs
    while they fit, so no run is ever split and every row holds whole runs. Returns the flat slot
    ``(b, n)`` of each position (``rows * m`` for a position the branch does not keep), the run id of
    each position, and the kept mask. ``rows = 2 * ceil(n / m) + 1`` always suffices (any two
    consecutive next-fit rows hold more than ``m`` slots).
    """
    n = docs.start.shape[1]
    m = br.kept
    p = jnp.arange(n) if docs.position is None else docs.position
    rel = p - docs.start
    kept = (rel % br.segment) % br.rate == br.offset
    segment = rel // br.segment
    if docs.position is not None:  # a run cut by the window's left edge is not laid out
        run_start = docs.start + segment * br.segment
        kept = kept & (run_start >= p[0])
        if docs.own is not None:  # nor one that cannot reach the rows the caller keeps
            lo, hi = docs.own
            kept = kept & (run_start <= p[hi - 1]) & (run_start + br.segment > p[lo])
    first = jnp.concatenate(
        [jnp.ones_like(kept[:, :1]), (docs.start[:, 1:] != docs.start[:, :-1]) | (segment[:, 1:] != segment[:, :-1])],
        axis=1,
    )
    run = jnp.cumsum(first, axis=1) - 1
    ordinal = jnp.cumsum(kept, axis=1) - 1  # the position's index among the row's kept positions
    base = ordinal - (rel % br.segment) // br.rate  # the ordinal of its run's first kept position
    total = jnp.sum(kept, axis=1, keepdims=True)
    starts = jnp.where(kept, base, total)  # run starts, and the end

    def next_row(start, _):
        limit = start + m
        fits = jnp.where(starts <= limit, starts, -1)
        end = jnp.maximum(jnp.max(fits, axis=1, keepdims=True), jnp.where(total <= limit, total, -1))
        return end, start

    _, row_starts = jax.lax.scan(next_row, jnp.zeros_like(total), None, length=rows)  # (rows, b, 1)
    row_starts = jnp.moveaxis(row_starts[..., 0], 0, 1)  # (b, rows)
    row = jax.vmap(lambda rs, x: jnp.searchsorted(rs, x, side="right") - 1)(row_starts, base)
    col = ordinal - jnp.take_along_axis(row_starts, row, axis=1)
    slot = jnp.where(kept, row * m + col, rows * m)
    return slot, run, kept


def _document_branch(q, k, v, key_padding_mask, docs: Documents, br: Branch, buckets, order, kw: dict):
    """:func:`branch_attention` of packed documents: each (document, segment of it) is its own segment."""
    b, n = q.shape[:2]
    m = br.kept
    rows = 2 * (-(-n // m)) + 1
    slot, run, kept = _document_slots(docs, br, rows)
    batch = jnp.arange(b)[:, None]

    def lay(x, fill):  # (b, n, ...) -> (b * rows, m, ...): every kept position in its slot
        out = jnp.full((b, rows * m + 1, *x.shape[2:]), fill, x.dtype).at[batch, slot].set(x)
        return out[:, : rows * m].reshape(b * rows, m, *x.shape[2:])

    visible = jnp.ones((b, n), bool) if key_padding_mask is None else ~key_padding_mask
    valid, ids = lay(visible & kept, False), lay(run, -1)
    o_parts, l_parts = [], []
    for ui, bucket in enumerate(buckets):
        qd, kd, vd = (
            lay(_heads(x, heads), 0)
            for x, heads in ((q, bucket.query_heads), (k, bucket.kv_heads), (v, bucket.kv_heads))
        )
        rng = kw["dropout_rng"]
        rng = None if rng is None else jax.random.fold_in(rng, ui)
        o, l = attend(qd, kd, vd, kv_valid=valid, q_ids=ids, kv_ids=ids, **{**kw, "dropout_rng": rng})
        take = jnp.minimum(slot, rows * m - 1)
        o = jnp.take_along_axis(o.reshape(b, rows * m, *o.shape[2:]), take[:, :, None, None], axis=1)
        o_parts.append(jnp.where(kept[:, :, None, None], o, 0.0))
        if l is not None:
            l = jnp.take_along_axis(l.reshape(b, rows * m, l.shape[-1]), take[:, :, None], axis=1)
            l_parts.append(jnp.where(kept[:, :, None], l, -jnp.inf))
    out = jnp.take(jnp.concatenate(o_parts, axis=2), order, axis=2) if len(buckets) > 1 else o_parts[0]
    if not l_parts:
        return out, None
    lse = jnp.take(jnp.concatenate(l_parts, axis=2), order, axis=2) if len(buckets) > 1 else l_parts[0]
    return out, lse


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
    layout: Layout = Layout(),
    documents: Documents | None = None,
) -> tuple[Array, Array | None]:
    """One branch of dilated attention: its heads' output and log-sum-exp.

    ``q`` ``(b, n, h, d)``, ``k, v`` ``(b, n, h_kv, d)`` (query head ``j`` uses kv head
    ``j // (h / h_kv)``), any ``n``. The sequence is cut into the branch's whole segments and the
    shorter last segment (:func:`dilated_plan.branch_pieces`); the branch's query heads are split by
    the key/value heads they share (:func:`dilated_plan.kv_buckets`), so k and v are never repeated.
    Each (piece, bucket) is one kernel call, drawing dropout from
    ``fold_in(fold_in(dropout_rng, piece), bucket)``. With ``documents`` (packed documents, semantics
    section 10) positions count from their document's start instead, and each (document, segment of
    it) is laid out whole in rows of ``s / r`` slots (:func:`_document_slots`); the kernel sees only
    its own run (query/key ids) and skips empty rows.

    Returns ``(b, n, heads_of_branch, d)`` (0 off the branch's positions) and ``(b, n, heads_of_branch)``
    (``-inf`` there; None when ``need_lse`` is False and the kernel has none), in the kernel's
    statistics dtype, heads in the order of ``br.heads``.
    """
    b, n, h, _ = q.shape
    buckets = kv_buckets(br.heads, h // k.shape[2])
    order = np.argsort(np.concatenate([bucket.query_heads for bucket in buckets]))  # back to br.heads order
    if documents is not None:
        kw = dict(
            scale=scale,
            is_causal=is_causal,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            need_lse=need_lse,
            implementation=implementation,
        )
        return _document_branch(q, k, v, key_padding_mask, documents, br, buckets, order, kw)
    outs, lses = [], []
    for pi, piece in enumerate(branch_pieces(n, br)):
        extra, pbr = piece.padded - piece.length, piece.branch
        span = slice(piece.start, piece.start + piece.length)
        valid = None
        if key_padding_mask is not None or extra:
            visible = jnp.ones((b, piece.length), bool) if key_padding_mask is None else ~key_padding_mask[:, span]
            valid = layout.gather(_pad_positions(visible, extra, False), pbr)
        o_parts: list[Array] = []
        l_parts: list[Array] = []
        for ui, bucket in enumerate(buckets):
            qd, kd, vd = (
                layout.gather(_pad_positions(_heads(x[:, span], heads), extra), pbr)
                for x, heads in ((q, bucket.query_heads), (k, bucket.kv_heads), (v, bucket.kv_heads))
            )
            rng = None if dropout_rng is None else jax.random.fold_in(jax.random.fold_in(dropout_rng, pi), ui)
            o, l = attend(
                qd,
                kd,
                vd,
                scale=scale,
                is_causal=is_causal,
                kv_valid=valid,
                dropout_rate=dropout_rate,
                dropout_rng=rng,
                need_lse=need_lse,
                implementation=implementation,
            )
            o_parts.append(layout.scatter(o, pbr, b, piece.padded, 0.0)[:, : piece.length])
            if l is not None:
                l_parts.append(layout.scatter(l, pbr, b, piece.padded, -jnp.inf)[:, : piece.length])
        outs.append(jnp.take(jnp.concatenate(o_parts, axis=2), order, axis=2) if len(buckets) > 1 else o_parts[0])
        if l_parts:
            lse_all = jnp.concatenate(l_parts, axis=2) if len(buckets) > 1 else l_parts[0]
            lses.append(jnp.take(lse_all, order, axis=2) if len(buckets) > 1 else lse_all)
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    if not lses:
        return out, None
    return out, jnp.concatenate(lses, axis=1) if len(lses) > 1 else lses[0]


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
