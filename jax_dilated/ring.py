"""Ring dilated attention: the standard function with the sequence sharded over a mesh axis (semantics 7).

Every device holds ``c = n / P`` positions of ``q``, ``k`` and ``v``: one contiguous chunk
(``load_balance=None``) or, under ``load_balance="zigzag"``, half-chunks ``j`` and ``2P - 1 - j``
(the caller reorders with :func:`to_zigzag` once per batch). :func:`dilated_plan.ring_layout` is the
plan: its *parts* (one chunk, or two half-chunks per device), its rings and its tile schedule. Each
attention branch (a group's heads and offset) is handled on its own:

* the branch's segments fit in a part: the device runs the improved branch on its positions and
  sends nothing;
* a segment spans several parts: each device dilates each of its parts (the branch keeps every
  ``r``-th position from the same offset, because parts are multiples of ``r``), then the dilated
  key/value blocks of the branch's *key/value heads* (grouped-query heads are never repeated) travel
  around the devices of the ring (``lax.ppermute``), and each (query part, key part) tile the plan
  schedules is merged into the queries' result with an online softmax. Tiles that are wholly in the
  future or in another segment are skipped (``lax.cond`` on the device index), not computed and
  masked.

Nothing is ever all-gathered: a device holds its own block and one received block of one branch.
A sequence whose length does not fit the contiguous plan is padded at its end
(:func:`dilated_plan.ring_padded_length`), its padding masked as keys and dropped from the output:
exactly the any-length rule of semantics section 10.

Packed documents (``document_ids``, contiguous layout): segments restart at every document, so runs
no longer line up with chunks. The devices first agree on each position's document start (one id
from the device before, one start per device all-gathered). A group whose segments fit in a chunk
then exchanges only the ``s`` positions next to each chunk edge and runs the single-device packed
branch on the widened window; a longer group passes whole chunks of its key/value heads to the
``s / c`` devices on each side, masking every tile by (document, segment) run and skipping tiles
whose runs cannot meet. Exact; the longer groups lose the dilation's compaction (docs/ring.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from dilated_plan import Branch, default_scale
from dilated_plan.checks import check_is_causal, check_scale
from dilated_plan.config import kv_buckets, stacked_buckets
from dilated_plan.ring import CAUSAL, SKIP, RingLayout, check_load_balance, ring_layout, ring_padded_length
from dilated_plan.ring import zigzag_inverse as _zigzag_inverse
from dilated_plan.ring import zigzag_order as _zigzag_order
from jax_dilated.branches import (
    Documents,
    _document_branch,
    _heads,
    branch_attention,
    combine_branches,
    dilate,
    merge_lse,
    undilate,
)
from jax_dilated.checks import as_array, check_document_ids
from jax_dilated.dilated import improved_dilated_attention, validate
from jax_dilated.kernels import Backend, attend, resolve

Array = jax.Array


def to_zigzag(x: ArrayLike, num_devices: int) -> Array:
    """Reorder the sequence axis (axis 1) into the zigzag layout for ``num_devices`` devices.

    ``x`` ``(b, n, ...)`` with ``n`` a multiple of ``2 * num_devices``; the result's contiguous chunk
    ``j`` holds half-chunks ``j`` and ``2P - 1 - j`` of ``x``. Reorder ``q``, ``k``, ``v``, the key
    padding mask (every per-position input) once per batch, run :func:`ring_dilated_attention` with
    ``load_balance="zigzag"``, and put the output back with :func:`from_zigzag`.

    >>> to_zigzag(jnp.arange(8)[None], 2).tolist()
    [[0, 1, 6, 7, 2, 3, 4, 5]]
    """
    x = jnp.asarray(x)
    return jnp.take(x, jnp.asarray(_zigzag_order(x.shape[1], num_devices)), axis=1)


def from_zigzag(x: ArrayLike, num_devices: int) -> Array:
    """Inverse of :func:`to_zigzag`: ``(b, n, ...)`` in zigzag order back to the original order."""
    x = jnp.asarray(x)
    return jnp.take(x, jnp.asarray(_zigzag_inverse(x.shape[1], num_devices)), axis=1)


def _spanning_branch(q, k, v, key_padding_mask, br: Branch, *, lay: RingLayout, axis_name, scale, is_causal, backend):
    """One branch whose segments span several parts; per-device arrays ``(b, chunk, ...)``.

    Returns the branch's output ``(b, chunk, heads_of_branch, d)``, log-sum-exp and the number of
    tiles this device computed (an int32 scalar; the plan's :meth:`RingLayout.tiles`).
    """
    b, h = q.shape[0], q.shape[2]
    q_heads, kv_heads, qo, ko, order, many = stacked_buckets(br.heads, h // k.shape[2])
    parts, length = lay.parts, lay.part // br.rate
    local = dataclasses.replace(br, segment=lay.part)

    def dil(x):  # (b, chunk, ...) -> (b, parts, part / r, ...): each part dilated as one segment
        return dilate(x, local).reshape(b, parts, length, *x.shape[2:])

    qd = dil(_heads(q, q_heads))
    kv = jnp.stack([dil(_heads(k, kv_heads)), dil(_heads(v, kv_heads))])  # one array: one permute per hop
    valid = None if key_padding_mask is None else ~dil(key_padding_mask)

    def tile(qj, kv, valid, kj, causal):
        outs, lses = [], []
        for u in range(len(qo) - 1):
            o, l = attend(
                qd[:, qj, :, qo[u] : qo[u + 1]],
                kv[0][:, kj, :, ko[u] : ko[u + 1]],
                kv[1][:, kj, :, ko[u] : ko[u + 1]],
                scale=scale,
                is_causal=causal,
                kv_valid=None if valid is None else valid[:, kj],
                implementation=backend,
            )
            assert l is not None  # need_lse defaults to True: the tiles merge by log-sum-exp
            outs.append(o)
            lses.append(l)
        return (jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)) if many else (o, l)

    group = br.group
    table = lay.mode_table(group, is_causal)  # (P, hops + 1, parts, parts), static
    device = jax.lax.axis_index(axis_name)
    modes = jnp.asarray(table)[device]
    acc: list[Any] = [None] * parts
    count = jax.lax.pcast(jnp.zeros((), jnp.int32), axis_name, to="varying")
    perm = list(lay.perm(group, is_causal))
    for hop in range(lay.hops(group) + 1):
        if hop:
            kv = jax.lax.ppermute(kv, axis_name, perm)
            if valid is not None:
                valid = jax.lax.ppermute(valid, axis_name, perm)
        for qj in range(parts):
            for kj in range(parts):
                column = table[:, hop, qj, kj]
                if not column.any():
                    continue  # no device computes this tile: nothing traced
                if (column == column[0]).all():  # every device computes it the same way: no cond
                    o, l = tile(qj, kv, valid, kj, bool(column[0] == CAUSAL))
                    acc[qj] = (o, l) if acc[qj] is None else merge_lse([acc[qj][0], o], [acc[qj][1], l])
                    count = count + 1
                    continue
                assert not (column == CAUSAL).any()  # a causal tile is a part against itself: hop 0, every device
                if acc[qj] is None:
                    shape = (b, length, len(q_heads))
                    dt = jnp.promote_types(q.dtype, jnp.float32)
                    empty = (jnp.zeros((*shape, q.shape[3]), dt), jnp.full(shape, -jnp.inf, dt))
                    acc[qj] = tuple(jax.lax.pcast(x, axis_name, to="varying") for x in empty)

                def step(carry, qj=qj, kj=kj, kv=kv, valid=valid):
                    o, l = tile(qj, kv, valid, kj, False)
                    out, lse = merge_lse([carry[0], o], [carry[1], l])
                    return out.astype(carry[0].dtype), lse.astype(carry[1].dtype), carry[2] + 1

                computed = modes[hop, qj, kj] != SKIP
                *acc_qj, count = jax.lax.cond(computed, step, lambda carry: carry, (*acc[qj], count))
                acc[qj] = tuple(acc_qj)
    assert all(a is not None for a in acc)  # every part sees itself at hop 0
    out = jnp.stack([a[0] for a in acc], axis=1).reshape(b * parts, length, len(q_heads), -1)
    lse = jnp.stack([a[1] for a in acc], axis=1).reshape(b * parts, length, len(q_heads))
    if many:
        out, lse = jnp.take(out, np.asarray(order), axis=2), jnp.take(lse, np.asarray(order), axis=2)
    return undilate(out, local, b, 0.0), undilate(lse, local, b, -jnp.inf), count


def _document_starts(ids: Array, *, axis_name, num_devices: int) -> Array:
    """The global first position of each position's document, ``(b, c)``, from one device's ``ids`` ``(b, c)``.

    A document is a maximal run of equal ids (semantics section 10): the device compares its first
    id with the last id of the device before it (one ``ppermute`` of ``(b, 1)``), and a chunk in
    which no document starts takes the latest start of the devices before it (an ``all_gather`` of
    one position per row and device).
    """
    c = ids.shape[1]
    device = jax.lax.axis_index(axis_name)
    pos = device * c + jnp.arange(c)
    before = jax.lax.ppermute(ids[:, -1:], axis_name, [(i, i + 1) for i in range(num_devices - 1)])
    new = (ids != jnp.concatenate([before, ids[:, :-1]], axis=1)) | (pos == 0)[None]
    own = jax.lax.cummax(jnp.where(new, pos, -1), axis=1)  # -1 until a document starts in the chunk
    last = jax.lax.all_gather(own[:, -1], axis_name)  # (P, b)
    earlier = jnp.where((jnp.arange(num_devices) < device)[:, None], last, -1).max(axis=0)
    return jnp.where(own >= 0, own, earlier[:, None])


def _window(x: Array, halo: int, *, axis_name, num_devices: int, right: bool) -> Array:
    """``(b, c, ...)`` -> ``(b, halo + c [+ halo], ...)``: the chunk between its neighbours' edges.

    The last ``halo`` positions of the device before (zeros on device 0) and, with ``right``, the
    first ``halo`` of the device after (zeros on the last device).
    """
    after = [(i, i + 1) for i in range(num_devices - 1)]
    parts = [jax.lax.ppermute(x[:, -halo:], axis_name, after), x]
    if right:
        parts.append(jax.lax.ppermute(x[:, :halo], axis_name, [(j, i) for i, j in after]))
    return jnp.concatenate(parts, axis=1)


def _document_local_group(q, k, v, valid, start, group_branches, *, lay: RingLayout, axis_name, kw: dict):
    """The branches of one group whose segments fit in a chunk, on packed documents.

    Segments restart at every document, so a (document, segment) run may cross a chunk boundary,
    but it is at most ``s`` long: every run that touches the chunk lies inside the window of the
    chunk and ``s`` positions on each side (``s`` before it only, under causal masking). The device
    receives those edges (keys, values, validity and document starts; its own queries only), runs
    the single-device packed-documents branch on the window and keeps its own rows. Positions
    outside ``[0, n)`` are invalid keys of a document of their own (one before 0, one from ``n``).
    """
    b, c = q.shape[:2]
    s, p = lay.cfg.segment_lengths[group_branches[0].group], lay.num_devices
    right = not kw["is_causal"]
    wide = functools.partial(_window, halo=s, axis_name=axis_name, num_devices=p, right=right)
    device = jax.lax.axis_index(axis_name)
    pos = device * c - s + jnp.arange(c + (2 if right else 1) * s)
    real = (pos >= 0) & (pos < lay.n)
    start_w = jnp.where(real[None], wide(start), jnp.where(pos < 0, pos[0], lay.n)[None])
    valid_w = wide(valid) & real[None]
    zeros = jnp.zeros((b, s, *q.shape[2:]), q.dtype)
    q_w = jnp.concatenate([zeros, q] + ([zeros] if right else []), axis=1)
    k_w, v_w = wide(k), wide(v)
    docs = Documents(start_w, pos, own=(s, s + c))  # runs that cannot reach the chunk are not computed
    outs, lses = [], []
    for br in group_branches:
        buckets = kv_buckets(br.heads, q.shape[2] // k.shape[2])
        order = np.argsort(np.concatenate([u.query_heads for u in buckets]))
        o, l = _document_branch(q_w, k_w, v_w, ~valid_w, docs, br, buckets, order, kw)
        outs.append(o[:, s : s + c])
        lses.append(None if l is None else l[:, s : s + c])
    return outs, lses


def _document_spanning_branch(q, k, v, valid, start, br: Branch, *, lay: RingLayout, axis_name, scale, is_causal,
                              backend):  # fmt: skip
    """One branch whose segments are longer than a chunk, on packed documents.

    A (document, segment) run starts wherever its document does, so the dilation grid is not the
    chunk's: each device passes its whole chunk of the branch's ``h_kv`` key/value heads with one id
    per position (the run's first position where the branch keeps it, else -2) to its neighbours,
    up to ``s / c`` devices each way (only from the devices before under causal masking; a run
    spans at most ``s / c + 1`` chunks), and every query/key chunk tile is masked by run id. A tile
    whose run ids cannot meet (their ranges per row are disjoint) is skipped by ``lax.cond``.
    Returns ``(b, c, heads, d)``, ``(b, c, heads)`` and the tiles computed.
    """
    b, c, h = q.shape[:3]
    p, s = lay.num_devices, br.segment
    q_heads, kv_heads, qo, ko, order, many = stacked_buckets(br.heads, h // k.shape[2])
    device = jax.lax.axis_index(axis_name)
    rel = device * c + jnp.arange(c) - start
    run = start + (rel // s) * s
    kept = (rel % s) % br.rate == br.offset
    q_ids = jnp.where(kept, run, -1)
    kv_ids = jnp.where(kept & valid, run, -2)
    qh = _heads(q, q_heads)
    kv = jnp.stack([_heads(k, kv_heads), _heads(v, kv_heads)])

    def span(ids):  # (b,) smallest and largest run id of the kept positions of a chunk, per row
        return jnp.where(ids >= 0, ids, jnp.iinfo(ids.dtype).max).min(axis=1), ids.max(axis=1)

    q_lo, q_hi = span(q_ids)

    def tile(kv, ids, causal):
        outs, lses = [], []
        for u in range(len(qo) - 1):
            o, l = attend(qh[:, :, qo[u] : qo[u + 1]], kv[0][:, :, ko[u] : ko[u + 1]], kv[1][:, :, ko[u] : ko[u + 1]],
                          scale=scale, is_causal=causal, q_ids=q_ids, kv_ids=ids, implementation=backend)  # fmt: skip
            assert l is not None
            outs.append(o)
            lses.append(l)
        return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)

    out, lse = tile(kv, kv_ids, is_causal)
    count = jax.lax.pcast(jnp.ones((), jnp.int32), axis_name, to="varying")
    reach = min(s // c, p - 1)
    for step in (1,) if is_causal else (1, -1):  # blocks from the devices before, then (bidirectional) after
        perm = [(i, i + step) for i in range(p) if 0 <= i + step < p]
        block, ids = kv, kv_ids
        for hop in range(1, reach + 1):
            block, ids = jax.lax.ppermute((block, ids), axis_name, perm)
            k_lo, k_hi = span(ids)
            src = device - step * hop
            meet = (src >= 0) & (src < p) & jnp.any((q_lo <= k_hi) & (k_lo <= q_hi))

            def merge(carry, block=block, ids=ids):
                o, l = tile(block, ids, False)
                o, l = merge_lse([carry[0], o], [carry[1], l])
                return o.astype(carry[0].dtype), l.astype(carry[1].dtype), carry[2] + 1

            out, lse, count = jax.lax.cond(meet, merge, lambda carry: carry, (out, lse, count))
    if many:
        out, lse = jnp.take(out, np.asarray(order), axis=2), jnp.take(lse, np.asarray(order), axis=2)
    return out, lse, count


def _document_body(q, k, v, key_padding_mask, document_ids, *, lay: RingLayout, axis_name, is_causal, scale,
                   backend):  # fmt: skip
    """:func:`_device_body` of packed documents (contiguous layout): the branches' outputs, lses and tiles."""
    cfg, p = lay.cfg, lay.num_devices
    branches = cfg.branches(q.shape[2])
    start = _document_starts(document_ids, axis_name=axis_name, num_devices=p)
    valid = jnp.ones(q.shape[:2], bool) if key_padding_mask is None else ~key_padding_mask
    outs: list[Any] = [None] * len(branches)
    lses: list[Any] = [None] * len(branches)
    count = jnp.zeros((), jnp.int32)
    kw = dict(scale=scale, is_causal=is_causal, dropout_rate=0.0, dropout_rng=None, need_lse=cfg.merge == "lse",
              implementation=backend)  # fmt: skip
    for g in range(cfg.num_groups):
        idx = [i for i, br in enumerate(branches) if br.group == g]
        if not idx:
            continue
        if cfg.segment_lengths[g] <= lay.chunk:
            o, l = _document_local_group(q, k, v, valid, start, [branches[i] for i in idx], lay=lay,
                                         axis_name=axis_name, kw=kw)  # fmt: skip
            for i, oi, li in zip(idx, o, l, strict=True):
                outs[i], lses[i] = oi, li
            continue
        for i in idx:
            outs[i], lses[i], tiles = _document_spanning_branch(q, k, v, valid, start, branches[i], lay=lay,
                                                                axis_name=axis_name, scale=scale, is_causal=is_causal,
                                                                backend=backend)  # fmt: skip
            count = count + tiles
    return combine_branches(cfg, branches, outs, lses).astype(q.dtype), count[None]


def _device_body(q, k, v, key_padding_mask=None, document_ids=None, *, lay: RingLayout, axis_name, is_causal, scale,
                 backend):  # fmt: skip
    """Per-device program: ``(b, chunk, h, d)`` in, ``(b, chunk, h, d)`` out and the tiles computed ``(1,)``."""
    cfg = lay.cfg
    h = q.shape[2]
    scale = default_scale(q.shape[3], scale)
    if document_ids is not None:
        kw = dict(lay=lay, axis_name=axis_name, is_causal=is_causal, scale=scale, backend=backend)
        return _document_body(q, k, v, key_padding_mask, document_ids, **kw)
    branches = cfg.branches(h)
    outs, lses = [], []
    count = jnp.zeros((), jnp.int32)
    b, c = q.shape[:2]

    def halves(x):  # (b, c, ...) -> (2b, c / 2, ...): the two half-chunks of the zigzag layout
        return None if x is None else x.reshape(b * 2, c // 2, *x.shape[2:])

    for br in branches:
        if lay.local(br.group):
            kw = dict(scale=scale, is_causal=is_causal, need_lse=cfg.merge == "lse", implementation=backend)
            if lay.parts == 1:
                o, l = branch_attention(q, k, v, key_padding_mask, br, **kw)
            else:  # each half-chunk holds whole segments: run them as one batch of two
                o, l = branch_attention(halves(q), halves(k), halves(v), halves(key_padding_mask), br, **kw)
                o = o.reshape(b, c, *o.shape[2:])
                l = None if l is None else l.reshape(b, c, *l.shape[2:])
        else:
            o, l, tiles = _spanning_branch(
                q,
                k,
                v,
                key_padding_mask,
                br,
                lay=lay,
                axis_name=axis_name,
                scale=scale,
                is_causal=is_causal,
                backend=backend,
            )
            count = count + tiles
        outs.append(o)
        lses.append(l)
    return combine_branches(cfg, branches, outs, lses).astype(q.dtype), count[None]


@functools.partial(jax.jit, static_argnames=("lay", "mesh", "axis_name", "is_causal", "scale", "backend"))
def _ring(q, k, v, key_padding_mask, document_ids, *, lay, mesh, axis_name, is_causal, scale, backend):
    seq = PartitionSpec(None, axis_name)
    body = functools.partial(
        _device_body, lay=lay, axis_name=axis_name, is_causal=is_causal, scale=scale, backend=backend
    )
    extra = {"key_padding_mask": key_padding_mask, "document_ids": document_ids}
    given = {name: x for name, x in extra.items() if x is not None}

    def per_device(q, k, v, *rest):
        return body(q, k, v, **dict(zip(given, rest, strict=True)))

    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(seq,) * (3 + len(given)),
                       out_specs=(seq, PartitionSpec(axis_name)))  # fmt: skip
    return fn(q, k, v, *given.values())


def _prepare(q, k, v, segment_lengths, dilation_rates, merge, key_padding_mask, document_ids, mesh, axis_name,
             load_balance):  # fmt: skip
    """Validate a call; returns the arrays, the configuration and the plan (None: run improved)."""
    q, k, v = (as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    mask = as_array("key_padding_mask", key_padding_mask)
    docs = as_array("document_ids", document_ids)
    cfg = validate(q, k, v, segment_lengths, dilation_rates, merge, mask)
    check_document_ids(docs, q.shape[0], q.shape[1])
    load_balance = check_load_balance(load_balance)
    if docs is not None and load_balance is not None:
        raise ValueError(
            f"document_ids with load_balance={load_balance!r}: the ring takes packed documents in the contiguous "
            f"layout only; pass load_balance=None (packed documents are already spread over the devices)."
        )
    if mesh is None:
        return q, k, v, mask, docs, cfg, None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh={mesh!r} should be a jax.sharding.Mesh (e.g. jax.make_mesh((P,), ('seq',))) or None.")
    if axis_name not in mesh.shape:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}; pass one of {tuple(mesh.shape)}."
        )
    n, num_devices = q.shape[1], mesh.shape[axis_name]
    if num_devices == 1 or n == 0:
        return q, k, v, mask, docs, cfg, None
    if load_balance is None:
        padded = ring_padded_length(n, num_devices, cfg)
        if padded > n:  # the any-length rule: the padding is masked as keys and dropped as queries
            extra = [(0, 0), (0, padded - n)]
            q, k, v = (jnp.pad(x, extra + [(0, 0)] * 2) for x in (q, k, v))
            mask = jnp.zeros(q.shape[:1] + (n,), bool) if mask is None else mask
            mask = jnp.pad(mask, extra, constant_values=True)
            docs = None if docs is None else jnp.pad(docs, extra, mode="edge")  # the last document goes on
        n = padded
    lay = ring_layout(n, num_devices, cfg, load_balance)  # raise before tracing, with the sharding named
    return q, k, v, mask, docs, cfg, lay


def ring_dilated_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mesh: Mesh | None = None,
    axis_name: str = "seq",
    is_causal: bool = False,
    scale: float | None = None,
    merge: str = "head_partition",
    key_padding_mask: ArrayLike | None = None,
    implementation: str | Backend | None = None,
    load_balance: str | None = None,
    document_ids: ArrayLike | None = None,
) -> Array:
    """Dilated attention with the sequence sharded over the ``axis_name`` axis of ``mesh`` (semantics 7).

    Computes exactly :func:`jax_dilated.dilated_attention`. With ``load_balance=None`` device ``p``
    of the axis holds positions ``[p * c, (p + 1) * c)``, ``c = n / P``; with ``"zigzag"`` the
    arrays are in the order of :func:`to_zigzag` (device ``j`` holds half-chunks ``j`` and
    ``2P - 1 - j``), causality and masks keep meaning original positions, and
    ``from_zigzag(ring(to_zigzag(q), to_zigzag(k), to_zigzag(v), load_balance="zigzag"))`` equals
    ``dilated_attention(q, k, v)``. Zigzag balances causal work over the devices of a spanning
    segment; bidirectional calls compute the same tiles either way (docs/ring.md). Groups whose
    segments fit in a part communicate nothing; spanning groups pass the dilated key/value blocks
    of their ``h_kv`` key/value heads around their devices (online-softmax merge). Other mesh axes
    see replicated data.

    Args:
      q: ``(b, n, h, d)``; k, v: ``(b, n, h_kv, d)`` with ``h`` a multiple of ``h_kv`` (grouped-query
        heads), sharded along ``n`` over ``axis_name`` (arrays sharded otherwise, or not at all, are
        resharded). Any ``n`` under ``load_balance=None``: a length that does not fit the plan is
        padded at its end to :func:`dilated_plan.ring_padded_length` (masked, dropped: exact).
      segment_lengths, dilation_rates, is_causal, scale, merge: as in :func:`dilated_attention`.
      mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name``; ``None`` (or an axis of size 1) runs
        :func:`improved_dilated_attention` on the arrays as they are (in their order: under zigzag,
        pass ``mesh=None`` only with arrays in original order).
      axis_name: the mesh axis the sequence is sharded over.
      key_padding_mask: optional ``(b, n)`` boolean, True = padding; sharded (and, under zigzag,
        ordered) like the sequence and passed around with the key/value blocks.
      implementation: the attention kernel of every local block (see :func:`dilated_attention`).
      load_balance: ``None`` (contiguous chunks) or ``"zigzag"``.
      document_ids: optional ``(b, n)`` integers, packed documents (semantics section 10: segments
        and the dilation grid restart at every document; nothing is seen across documents), sharded
        like the sequence; contiguous layout only. A group whose segments fit in a chunk exchanges
        ``s`` positions with each neighbouring device; a longer group passes whole chunks of its
        key/value heads to up to ``s / c`` devices each way and masks each tile by run (docs/ring.md).

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q`` (in zigzag order under zigzag), sharded as
      ``PartitionSpec(None, axis_name)`` on ``mesh`` when no padding was needed, replicated when it was.

    Raises:
      ValueError: the checks of :func:`dilated_attention`, an unknown ``axis_name`` or
        ``load_balance``, ``document_ids`` with ``load_balance="zigzag"``, and the sharding
        constraints of :func:`dilated_plan.ring_layout` (under zigzag: ``n % 2P``, segments against
        the half-chunk, rates dividing it).

    >>> q = k = v = jnp.ones((1, 64, 2, 8), jnp.float32)
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> ring_dilated_attention(q, k, v, segment_lengths=(16, 64), dilation_rates=(1, 4), mesh=mesh).shape
    (1, 64, 2, 8)
    """
    n = jnp.shape(q)[1]
    out, _ = _call(q, k, v, segment_lengths, dilation_rates, mesh, axis_name, is_causal, scale, merge,
                   key_padding_mask, document_ids, implementation, load_balance)  # fmt: skip
    if out.shape[1] == n:
        return out
    # n positions do not split evenly over the devices: the cut output is replicated (a mesh with
    # explicit axes cannot hold it sharded along the sequence).
    assert mesh is not None
    return jax.sharding.reshard(out, NamedSharding(mesh, PartitionSpec()))[:, :n]


def ring_tile_counts(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mesh: Mesh,
    axis_name: str = "seq",
    is_causal: bool = False,
    merge: str = "head_partition",
    key_padding_mask: ArrayLike | None = None,
    load_balance: str | None = None,
    document_ids: ArrayLike | None = None,
) -> np.ndarray:
    """Tiles each device of ``axis_name`` computed in one call, counted by the program itself, ``(P,)``.

    Same arguments as :func:`ring_dilated_attention`; the count is incremented inside the branch of
    the ``lax.cond`` that computes a tile, so it measures the program, not the plan
    (:func:`dilated_plan.ring_tiles` is the plan's prediction).
    """
    _, counts = _call(q, k, v, segment_lengths, dilation_rates, mesh, axis_name, is_causal, None, merge,
                      key_padding_mask, document_ids, None, load_balance)  # fmt: skip
    return np.asarray(counts)


def _call(q, k, v, segment_lengths, dilation_rates, mesh, axis_name, is_causal, scale, merge, mask, docs, impl,
          balance):  # fmt: skip
    q, k, v, mask, docs, cfg, lay = _prepare(q, k, v, segment_lengths, dilation_rates, merge, mask, docs, mesh,
                                             axis_name, balance)  # fmt: skip
    backend = resolve(impl)
    if lay is None:
        kw: dict[str, Any] = dict(segment_lengths=cfg.segment_lengths, dilation_rates=cfg.dilation_rates)
        kw.update(is_causal=is_causal, scale=scale, merge=merge, key_padding_mask=mask, implementation=backend)
        return improved_dilated_attention(q, k, v, document_ids=docs, **kw), np.zeros(1, np.int32)
    assert mesh is not None
    seq = NamedSharding(mesh, PartitionSpec(None, axis_name))
    # Onto the mesh, sharded along the sequence: a no-op when already so; under jit it is traced as a
    # transfer, so arrays committed to other devices are accepted too.
    q, k, v, mask, docs = (None if x is None else jax.device_put(x, seq) for x in (q, k, v, mask, docs))
    return _ring(q, k, v, mask, docs, lay=lay, mesh=mesh, axis_name=axis_name, is_causal=check_is_causal(is_causal),
                 scale=check_scale(scale), backend=backend)  # fmt: skip
