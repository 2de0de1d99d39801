"""Ring dilated attention: the standard function with the sequence sharded over a mesh axis (semantics 7).

Every device holds one contiguous chunk of ``c = n / P`` positions of ``q``, ``k`` and ``v``. Each
attention branch (a group's heads and offset) is handled on its own:

* ``c % s == 0``: the branch's segments lie inside the chunk; the device runs the improved branch on
  its chunk and sends nothing.
* ``s % c == 0``: a segment covers ``m = s / c`` consecutive devices. Each device dilates its own chunk
  (the branch keeps every ``r``-th position from the same offset, because ``c % r == 0``), then the
  dilated key/value blocks travel ``m - 1`` hops around the ``m`` devices of the segment
  (``lax.ppermute`` inside each segment group), merged into the queries' result with an online
  softmax. Under ``is_causal`` a device skips (``lax.cond``) every block from a later device.

Nothing is ever all-gathered: a device holds at most two key/value blocks of one branch at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from dilated_plan import Branch, default_scale, ring_plan
from jax_dilated.branches import branch_attention, combine_branches, dilate, merge_lse, undilate
from jax_dilated.dilated import improved_dilated_attention, validate
from jax_dilated.kernels import Backend, attend, resolve

Array = jax.Array


def _spanning_branch(
    q,
    k,
    v,
    key_padding_mask,
    br: Branch,
    *,
    chunk: int,
    span: int,
    num_devices: int,
    axis_name: str,
    scale: float,
    is_causal: bool,
    backend: Backend,
):
    """One branch whose segments span ``span`` devices; per-device arrays ``(b, chunk, ...)``.

    A segment starts on a chunk boundary, so the branch's kept positions inside this chunk are the
    local positions ``offset, offset + r, ...`` (``chunk % r == 0``): dilating the chunk as one segment
    of length ``chunk`` selects exactly them, in order. Device ``j`` of a segment group holds the kept
    positions ``[j * chunk / r, (j + 1) * chunk / r)`` of the segment.
    """
    b = q.shape[0]
    local = dataclasses.replace(br, segment=chunk)
    hs = br.head_slice
    qd = dilate(q[:, :, hs], local)  # (b, chunk/r, heads_of_branch, d)
    kv = jnp.stack([dilate(k[:, :, hs], local), dilate(v[:, :, hs], local)])  # one array: one permute per hop
    valid = None if key_padding_mask is None else ~dilate(key_padding_mask, local)
    out, first = attend(qd, kv[0], kv[1], scale=scale, is_causal=is_causal, kv_valid=valid, implementation=backend)
    assert first is not None  # need_lse defaults to True: the hops merge by log-sum-exp
    lse: Array = first
    # Send to the next device of the same segment group. Without causality the blocks wrap around the
    # group (a ring); under causality a wrapped block would only ever reach devices it lies in the future
    # of, so the last device of a group sends nothing (a shift) and its neighbour receives zeros it skips.
    last = span if not is_causal else span - 1
    perm = [(g * span + j, g * span + (j + 1) % span) for g in range(num_devices // span) for j in range(last)]
    rank = jax.lax.axis_index(axis_name) % span
    for hop in range(1, span):
        kv = jax.lax.ppermute(kv, axis_name, perm)
        if valid is not None:
            valid = jax.lax.ppermute(valid, axis_name, perm)

        def step(acc, kv=kv, valid=valid):
            o, l = attend(qd, kv[0], kv[1], scale=scale, is_causal=False, kv_valid=valid, implementation=backend)
            return merge_lse([acc[0], o], [acc[1], l])

        if is_causal:
            # After `hop` hops this device holds the block of device rank - hop of its group when
            # hop <= rank (a past block), and nothing useful otherwise: skipped, not computed and masked.
            out, lse = jax.lax.cond(hop <= rank, step, lambda acc: acc, (out, lse))
        else:
            out, lse = step((out, lse))
    return undilate(out, local, b, 0.0), undilate(lse, local, b, -jnp.inf)


def _device_body(q, k, v, key_padding_mask, *, cfg, chunk, spans, num_devices, axis_name, is_causal, scale, backend):
    """Per-device program: ``(b, chunk, h, d)`` in, ``(b, chunk, h, d)`` out."""
    h = q.shape[2]
    scale = default_scale(q.shape[3], scale)
    branches = cfg.branches(h)
    outs, lses = [], []
    for br in branches:
        span = spans[br.group]
        if span == 1:
            kw = dict(scale=scale, is_causal=is_causal, need_lse=cfg.merge == "lse", implementation=backend)
            o, l = branch_attention(q, k, v, key_padding_mask, br, **kw)
        else:
            o, l = _spanning_branch(
                q,
                k,
                v,
                key_padding_mask,
                br,
                chunk=chunk,
                span=span,
                num_devices=num_devices,
                axis_name=axis_name,
                scale=scale,
                is_causal=is_causal,
                backend=backend,
            )
        outs.append(o)
        lses.append(l)
    return combine_branches(cfg, branches, outs, lses).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "axis_name", "is_causal", "scale", "backend"))
def _ring(q, k, v, key_padding_mask, *, cfg, mesh, axis_name, is_causal, scale, backend):
    num_devices = mesh.shape[axis_name]
    chunk, spans = ring_plan(q.shape[1], num_devices, cfg)
    seq = PartitionSpec(None, axis_name)
    body = functools.partial(
        _device_body,
        cfg=cfg,
        chunk=chunk,
        spans=spans,
        num_devices=num_devices,
        axis_name=axis_name,
        is_causal=is_causal,
        scale=scale,
        backend=backend,
    )
    if key_padding_mask is None:
        fn = jax.shard_map(
            lambda q, k, v: body(q, k, v, None), mesh=mesh, in_specs=(seq, seq, seq), out_specs=seq, check_vma=True
        )
        return fn(q, k, v)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(seq, seq, seq, seq), out_specs=seq, check_vma=True)
    return fn(q, k, v, key_padding_mask)


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
) -> Array:
    """Dilated attention with the sequence sharded over the ``axis_name`` axis of ``mesh`` (semantics 7).

    Computes exactly :func:`jax_dilated.dilated_attention`. Device ``p`` of the axis holds positions
    ``[p * c, (p + 1) * c)`` with ``c = n / P``. Groups whose segments fit in a chunk communicate
    nothing; a group whose segments span ``m = s / c`` devices passes its dilated key/value blocks
    ``m - 1`` hops around those devices (online-softmax merge). Other mesh axes see replicated data.

    Args:
      q, k, v: ``(b, n, h, d)``, sharded along ``n`` over ``axis_name`` (arrays sharded otherwise, or
        not at all, are resharded).
      segment_lengths, dilation_rates, is_causal, scale, merge: as in :func:`dilated_attention`.
      mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name``; ``None`` (or an axis of size 1) runs
        :func:`improved_dilated_attention` on the arrays as they are.
      axis_name: the mesh axis the sequence is sharded over.
      key_padding_mask: optional ``(b, n)`` boolean, True = padding; sharded like the sequence and
        passed around with the key/value blocks.
      implementation: the attention kernel of every local block (see :func:`dilated_attention`).

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q``, sharded as ``PartitionSpec(None, axis_name)`` on ``mesh``.

    Raises:
      ValueError: the checks of :func:`dilated_attention`, an unknown ``axis_name``, and the
        sharding constraints of :func:`dilated_plan.ring_plan`.

    >>> q = k = v = jnp.ones((1, 64, 2, 8), jnp.float32)
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> ring_dilated_attention(q, k, v, segment_lengths=(16, 64), dilation_rates=(1, 4), mesh=mesh).shape
    (1, 64, 2, 8)
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    mask = None if key_padding_mask is None else jnp.asarray(key_padding_mask)
    cfg = validate(q, k, v, segment_lengths, dilation_rates, merge, mask)
    backend = resolve(implementation)
    kw: dict[str, Any] = dict(
        segment_lengths=cfg.segment_lengths,
        dilation_rates=cfg.dilation_rates,
        is_causal=is_causal,
        scale=scale,
        merge=merge,
        key_padding_mask=mask,
        implementation=backend,
    )
    if mesh is None:
        return improved_dilated_attention(q, k, v, **kw)
    if axis_name not in mesh.shape:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}; pass one of {tuple(mesh.shape)}."
        )
    n = q.shape[1]
    num_devices = mesh.shape[axis_name]
    if num_devices == 1 or n == 0:
        return improved_dilated_attention(q, k, v, **kw)
    ring_plan(n, num_devices, cfg)  # raise before tracing, with the sharding named
    seq = NamedSharding(mesh, PartitionSpec(None, axis_name))
    args = [q, k, v] + ([] if mask is None else [mask])
    # Onto the mesh, sharded along the sequence: a no-op when already so; under jit it is traced as a
    # transfer, so arrays committed to other devices are accepted too.
    args = [jax.device_put(x, seq) for x in args]
    q, k, v = args[:3]
    mask = args[3] if mask is not None else None
    return _ring(
        q,
        k,
        v,
        mask,
        cfg=cfg,
        mesh=mesh,
        axis_name=axis_name,
        is_causal=bool(is_causal),
        scale=None if scale is None else float(scale),
        backend=backend,
    )
