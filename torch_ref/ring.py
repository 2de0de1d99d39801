"""Ring dilated attention over a torch.distributed process group (semantics section 7).

The mirror of ``jax_dilated/ring.py``; :func:`dilated_plan.ring_layout` is the plan.

Every rank of the group holds a chunk of the positions and returns the same positions of the
output: rank ``p`` holds ``[p c, min((p + 1) c, n))`` (``load_balance=None``, any ``n``: chunk
lengths ``c, ..., c, t, 0, ..., 0``, padded by each rank to ``c`` and masked) or, with ``c = n / P``,
half-chunks ``p`` and ``2P - 1 - p`` (``"zigzag"``; reorder with :func:`to_zigzag`). Per attention branch:

* its segments fit in a part (a chunk, or a half-chunk under zigzag): the rank runs the improved
  branch locally;
* a segment spans several parts: each rank dilates its parts, then the dilated key/value blocks of
  the branch's key/value heads (never repeated grouped-query heads) move around the ring of ranks
  holding those segments with ``dist.batch_isend_irecv``; every tile the plan schedules is merged
  with an online softmax. The backward pass (:class:`_RingBlocks`) replays the ring: the key/value
  blocks travel with their gradient accumulators and, after a full turn, the accumulated ``dk, dv``
  take one more hop home.

Before the first message the ranks all-gather a small fingerprint of their shapes and
configuration (one ``int64`` vector each), so ranks that disagree raise a ValueError instead of
hanging. No rank ever holds another rank's whole chunk of ``k``/``v``, only one dilated block.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dilated_plan import Branch, DilatedConfig, default_scale
from dilated_plan.checks import check_is_causal, check_scale
from dilated_plan.config import stacked_buckets
from dilated_plan.ring import (
    CAUSAL,
    RingLayout,
    check_load_balance,
    ring_chunk_length,
    ring_layout,
    ring_padded_length,
)
from dilated_plan.ring import zigzag_inverse as _zigzag_inverse
from dilated_plan.ring import zigzag_order as _zigzag_order
from torch_ref.branches import _heads, branch_attention, combine_branches, dilate, merge_lse, undilate
from torch_ref.checks import check_document_ids, check_key_padding_mask, check_qkv
from torch_ref.dilated import improved_dilated_attention
from torch_ref.kernels import attend
from torch_ref.kernels.plain import finite_keys

Tensor = torch.Tensor


def to_zigzag(x: Tensor, num_devices: int) -> Tensor:
    """Reorder the sequence dim (dim 1) of ``x`` ``(b, n, ...)`` into the zigzag layout for ``num_devices`` ranks.

    Rank ``j`` then takes the contiguous chunk ``j`` of the result (half-chunks ``j`` and
    ``2P - 1 - j``). ``n`` must be a multiple of ``2 * num_devices``.

    >>> to_zigzag(torch.arange(8)[None], 2).tolist()
    [[0, 1, 6, 7, 2, 3, 4, 5]]
    """
    return x.index_select(1, torch.as_tensor(_zigzag_order(x.shape[1], num_devices), device=x.device))


def from_zigzag(x: Tensor, num_devices: int) -> Tensor:
    """Inverse of :func:`to_zigzag`: ``(b, n, ...)`` in zigzag order back to the original order."""
    return x.index_select(1, torch.as_tensor(_zigzag_inverse(x.shape[1], num_devices), device=x.device))


def _exchange(tensors: list[Tensor], *, send_to: int | None, recv_from: int | None, group) -> list[Tensor]:
    """One hop: send ``tensors`` to global rank ``send_to`` and receive same-shaped ones from ``recv_from``."""
    ops, received = [], []
    if send_to is not None:
        ops += [dist.P2POp(dist.isend, t.contiguous(), send_to, group, tag=i) for i, t in enumerate(tensors)]
    if recv_from is not None:
        received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, recv_from, group, tag=i) for i, t in enumerate(received)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of one spanning branch on one rank."""

    lay: RingLayout
    group_index: int  # the (segment, rate) group
    rank: int  # this rank's index in the process group
    ring: tuple[int, ...]  # global ranks of the ring, in send order
    position: int  # this rank's index in the ring
    q_offsets: tuple[int, ...]  # bucket boundaries on the query heads
    kv_offsets: tuple[int, ...]  # and on the key/value heads
    scale: float
    is_causal: bool
    process_group: Any

    @property
    def next(self) -> int:
        return self.ring[(self.position + 1) % len(self.ring)]

    @property
    def prev(self) -> int:
        return self.ring[(self.position - 1) % len(self.ring)]

    def schedule(self, hop: int) -> tuple[tuple[int, int, int], ...]:
        return self.lay.schedule(self.group_index, self.rank, hop, self.is_causal)


def _buckets(sp: _Spec):
    q, kv = sp.q_offsets, sp.kv_offsets
    return [(slice(q[u], q[u + 1]), slice(kv[u], kv[u + 1])) for u in range(len(q) - 1)]


def _tile(sp, qd: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, causal: bool, ids=None) -> tuple[Tensor, Tensor]:
    """Forward of one tile ``(b, L, Hq, d)`` against ``(b, L, Hkv, d)``: output and log-sum-exp.

    ``ids``: optional ``(q_ids, kv_ids)`` run ids ``(b, L)`` (packed documents: a query sees a key of its run).
    """
    q_ids, kv_ids = (None, None) if ids is None else ids
    outs, lses = [], []
    for qs, ks in _buckets(sp):
        o, l = attend(qd[:, :, qs], k[:, :, ks], v[:, :, ks], scale=sp.scale, is_causal=causal, kv_valid=valid,
                      q_ids=q_ids, kv_ids=kv_ids)  # fmt: skip
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _tile_grads(sp, qd, k, v, valid, causal, lse, dout, delta, ids=None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one tile from the merged log-sum-exp: ``P = exp(S - L)``, ``dS = P (dP - delta)``.

    Non-finite keys/values are zeroed first, as in the forward kernel (semantics section 11): one that
    no row sees gives exactly the gradients of a finite one (its own ``dk, dv`` are 0). A row that sees
    one keeps its NaN output and log-sum-exp (the forward's); the caller has zeroed its ``dout`` and
    ``delta`` (it passes no gradient back, as autograd through the forward kernel, which fills it with
    NaN), so ``P = 0`` and ``dS = 0`` there.
    """
    acc = lse.dtype
    dqs, dks, dvs = [], [], []
    for qs, ks in _buckets(sp):
        b, m, nq, d = qd[:, :, qs].shape
        mk, nk = k.shape[1], k[:, :, ks].shape[2]
        g = nq // nk
        qg = qd[:, :, qs].to(acc).reshape(b, m, nk, g, d)
        kb, vb, _ = finite_keys(k[:, :, ks], v[:, :, ks])  # as the forward kernel: no 0 * nan from unseen keys
        kb, vb = kb.to(acc), vb.to(acc)
        s = torch.einsum("bqhgd,bkhd->bhgqk", qg, kb) * sp.scale
        visible = torch.ones(b, 1, 1, m, mk, dtype=torch.bool, device=qd.device)
        if causal:
            visible = visible & torch.ones(m, mk, dtype=torch.bool, device=qd.device).tril()
        if valid is not None:
            visible = visible & valid[:, None, None, None, :]
        if ids is not None:
            visible = visible & (ids[0][:, None, None, :, None] == ids[1][:, None, None, None, :])
        lg = lse[:, :, qs].reshape(b, m, nk, g).permute(0, 2, 3, 1)[..., None]
        ok = visible & torch.isfinite(lg)
        p = torch.where(ok, torch.exp(s - torch.where(torch.isfinite(lg), lg, torch.zeros_like(lg))), 0.0)
        dog = dout[:, :, qs].to(acc).reshape(b, m, nk, g, d)
        dvs.append(torch.einsum("bhgqk,bqhgd->bkhd", p, dog))
        dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, vb)
        ds = p * (dp - delta[:, :, qs].reshape(b, m, nk, g).permute(0, 2, 3, 1)[..., None])
        dqs.append(torch.einsum("bhgqk,bkhd->bqhgd", ds, kb).reshape(b, m, nq, d) * sp.scale)
        dks.append(torch.einsum("bhgqk,bqhgd->bkhd", ds, qg) * sp.scale)
    return torch.cat(dqs, dim=2), torch.cat(dks, dim=2), torch.cat(dvs, dim=2)


def _merge(acc: tuple | None, o: Tensor, l: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Online-softmax merge of one tile into ``(out, lse, poisoned)``; ``poisoned``: rows that saw a non-finite key."""
    if acc is None:
        return o, l, torch.isnan(l)
    out, lse = merge_lse([acc[0], o], [acc[1], l])
    return out, lse, acc[2] | torch.isnan(l)


def _merged_lse(lse: Tensor, poisoned: Tensor) -> Tensor:
    """A row that saw a non-finite key keeps a NaN log-sum-exp, as in one kernel call (the merge would turn
    it into that of the row's other tiles)."""
    return lse.masked_fill(poisoned, float("nan"))


def _row_grads(out: Tensor, lse: Tensor, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor, Tensor]:
    """``dout`` and ``delta = rowsum(dO O) - dL`` in the statistics dtype, 0 in rows with a non-finite lse.

    Such rows pass no gradient back: no visible key (-inf: P = 0), or a non-finite key seen (NaN: the
    forward kernel fills the row with NaN, a constant, as autograd sees it).
    """
    acc = lse.dtype
    live = torch.isfinite(lse)
    dout = torch.zeros_like(out) if dout is None else torch.where(live[..., None], dout.to(acc), 0.0)
    delta = (dout * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    return dout, torch.where(live, delta, 0.0)


class _RingBlocks(torch.autograd.Function):
    """The ring of one spanning branch: ``(b, parts, L, H, d)`` dilated blocks in, merged output and lse out."""

    @staticmethod
    def forward(ctx, qd, kd, vd, valid, sp: _Spec):  # type: ignore[override]
        lay, m = sp.lay, len(sp.ring)
        wrap = lay.wraps(sp.is_causal)
        kv = torch.stack([kd, vd])
        held = None if valid is None else valid.to(torch.uint8)
        acc: list[Any] = [None] * lay.parts
        for hop in range(m):
            if hop:
                i = sp.position
                send = sp.next if wrap or (i < m - 1 and hop - 1 <= i) else None
                recv = sp.prev if wrap or hop <= i else None
                got = _exchange([kv] if held is None else [kv, held], send_to=send, recv_from=recv,
                                group=sp.process_group)  # fmt: skip
                if not got:
                    continue
                kv, held = got[0], (got[1] if held is not None else None)
            for qj, kj, mode in sp.schedule(hop):
                o, l = _tile(sp, qd[:, qj], kv[0][:, kj], kv[1][:, kj],
                             None if held is None else held[:, kj].bool(), mode == CAUSAL)  # fmt: skip
                acc[qj] = _merge(acc[qj], o, l)
        out = torch.stack([a[0] for a in acc], dim=1)
        lse = _merged_lse(torch.stack([a[1] for a in acc], dim=1), torch.stack([a[2] for a in acc], dim=1))
        ctx.sp = sp
        ctx.save_for_backward(qd, kd, vd, valid, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        sp: _Spec = ctx.sp
        qd, kd, vd, valid, out, lse = ctx.saved_tensors
        acc = lse.dtype
        dout, delta = _row_grads(out, lse, dout, dlse)
        m = len(sp.ring)
        kv = torch.stack([kd, vd])
        held = None if valid is None else valid.to(torch.uint8)
        dq = torch.zeros(qd.shape, dtype=acc, device=qd.device)
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        # The blocks go all the way round (also for a causal contiguous ring: the gradients must come
        # home); after m - 1 hops a rank holds its successor's block, whose dk, dv take one more hop.
        for hop in range(m):
            if hop:
                msg = [kv, dkv] + ([] if held is None else [held])
                got = _exchange(msg, send_to=sp.next, recv_from=sp.prev, group=sp.process_group)
                kv, dkv = got[0], got[1]
                held = got[2] if held is not None else None
            for qj, kj, mode in sp.schedule(hop):
                g_q, g_k, g_v = _tile_grads(sp, qd[:, qj], kv[0][:, kj], kv[1][:, kj],
                                            None if held is None else held[:, kj].bool(), mode == CAUSAL,
                                            lse[:, qj], dout[:, qj], delta[:, qj])  # fmt: skip
                dq[:, qj] += g_q
                dkv[0][:, kj] += g_k
                dkv[1][:, kj] += g_v
        if m > 1:
            dkv = _exchange([dkv], send_to=sp.next, recv_from=sp.prev, group=sp.process_group)[0]
        return dq.to(qd.dtype), dkv[0].to(kd.dtype), dkv[1].to(vd.dtype), None, None


def _spanning_branch(q, k, v, key_padding_mask, br: Branch, *, lay: RingLayout, rank: int, group, scale, is_causal):
    """One branch whose segments span several parts; this rank's tensors ``(b, chunk, ...)``."""
    b, h = q.shape[0], q.shape[2]
    q_heads, kv_heads, qo, ko, order, many = stacked_buckets(br.heads, h // k.shape[2])
    parts, length = lay.parts, lay.part // br.rate
    local = dataclasses.replace(br, segment=lay.part)

    def dil(x):
        return dilate(x, local).reshape(b, parts, length, *x.shape[2:])

    ring = lay.ring_of(br.group, rank)
    sp = _Spec(lay, br.group, rank, tuple(dist.get_global_rank(group, r) for r in ring), ring.index(rank),
               qo, ko, scale, is_causal, group)  # fmt: skip
    valid = None if key_padding_mask is None else ~dil(key_padding_mask)
    out, lse = _RingBlocks.apply(dil(_heads(q, q_heads)), dil(_heads(k, kv_heads)), dil(_heads(v, kv_heads)), valid, sp)
    out = out.reshape(b * parts, length, len(q_heads), -1)
    lse = lse.reshape(b * parts, length, len(q_heads))
    if many:
        index = torch.tensor(order, device=q.device)
        out, lse = out.index_select(2, index), lse.index_select(2, index)
    return undilate(out, local, b, 0.0), undilate(lse, local, b, float("-inf"))


# Packed documents (contiguous layout): the mirror of the document functions of jax_dilated/ring.py.


def _document_starts(ids: Tensor, rank: int, world: int, group) -> Tensor:
    """The global first position of each position's document, ``(b, c)``, from this rank's ``ids`` ``(b, c)``.

    A document is a maximal run of equal ids (semantics section 10). One all-gather of three integers
    per row and rank (first id, last id, the last document start after the chunk's first position)
    tells every rank where the documents of the ranks before it start.
    """
    b, c = ids.shape
    ids = ids.to(torch.int64)
    pos = rank * c + torch.arange(c, device=ids.device)
    new = torch.zeros_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    mine = torch.stack([ids[:, 0], ids[:, -1], torch.where(new, pos, -1).amax(dim=1)], dim=1)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    g = torch.stack(every)  # (P, b, 3)
    first_new = torch.ones(world, b, dtype=torch.bool, device=ids.device)
    first_new[1:] = g[1:, :, 0] != g[:-1, :, 1]
    chunk_start = torch.arange(world, device=ids.device)[:, None] * c
    last = torch.where(g[:, :, 2] >= 0, g[:, :, 2], torch.where(first_new, chunk_start, -1))  # (P, b)
    earlier = last[:rank].amax(dim=0) if rank else torch.full((b,), -1, dtype=torch.int64, device=ids.device)
    new[:, 0] = first_new[rank]
    own = torch.cummax(torch.where(new, pos, -1), dim=1).values  # -1 until a document starts in the chunk
    return torch.where(own >= 0, own, earlier[:, None])


def _edges(x: Tensor, halo: int, prev: int | None, nxt: int | None, right: bool, group) -> list[Tensor]:
    """The last ``halo`` positions of the rank before and, with ``right``, the first ``halo`` of the rank after.

    Zeros where there is no such rank (the ends of the sequence); ``prev``/``nxt`` are global ranks.
    """
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo sends no bool
    out = []
    for part, send, recv in [(wire[:, -halo:], nxt, prev)] + ([(wire[:, :halo], prev, nxt)] if right else []):
        got = _exchange([part], send_to=send, recv_from=recv, group=group)
        out.append((got[0] if got else torch.zeros_like(part)).to(x.dtype))
    return out


class _Window(torch.autograd.Function):
    """``(b, c, ...)`` -> ``(b, halo + c [+ halo], ...)``: the chunk between its neighbours' edges.

    The backward sends the gradients of the edges back to the ranks they came from.
    """

    @staticmethod
    def forward(ctx, x, halo: int, prev, nxt, right: bool, group):  # type: ignore[override]
        ctx.args = (halo, prev, nxt, right, group)
        left, *after = _edges(x, halo, prev, nxt, right, group)
        return torch.cat([left, x, *after], dim=1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        halo, prev, nxt, right, group = ctx.args
        c = grad.shape[1] - (2 if right else 1) * halo
        dx = grad[:, halo : halo + c].clone()
        got = _exchange([grad[:, :halo]], send_to=prev, recv_from=nxt, group=group)  # my tail, as the next rank saw it
        if got:
            dx[:, c - halo :] += got[0]
        if right:
            got = _exchange([grad[:, halo + c :]], send_to=nxt, recv_from=prev, group=group)
            if got:
                dx[:, :halo] += got[0]
        return dx, None, None, None, None, None


def _window_branch(q, k, v, valid, start, pos, br: Branch, *, scale: float, is_causal: bool, need_lse: bool):
    """:func:`branch_attention` of packed documents on a window ``(b, W, ...)`` of global positions ``pos``.

    Each document fragment of a row runs alone (boundaries read on the host, as
    :func:`torch_ref.dilated_attention` does), front-padded by ``(pos - start) mod s`` masked positions so
    that its segment grid is its document's. A run cut by the window's left edge is incomplete; the
    caller drops its rows.
    """
    b = q.shape[0]
    starts, where = start.tolist(), pos.tolist()
    rows_o: list[Tensor] = []
    rows_l: list[Tensor] = []
    for row in range(b):
        cuts = [0] + [i for i in range(1, len(where)) if starts[row][i] != starts[row][i - 1]] + [len(where)]
        outs: list[Tensor] = []
        lses: list[Tensor] = []
        for a, e in zip(cuts[:-1], cuts[1:], strict=True):
            lead = (where[a] - starts[row][a]) % br.segment

            def frag(x: Tensor, fill, row=row, a=a, e=e, lead=lead) -> Tensor:
                x = x[row : row + 1, a:e]
                return torch.cat([x.new_full((1, lead, *x.shape[2:]), fill), x], dim=1) if lead else x

            o, l = branch_attention(frag(q, 0.0), frag(k, 0.0), frag(v, 0.0), ~frag(valid, False), br, scale=scale,
                                    is_causal=is_causal, dropout_p=0.0, need_lse=need_lse)  # fmt: skip
            outs.append(o[:, lead:])
            if l is not None:
                lses.append(l[:, lead:])
        rows_o.append(torch.cat(outs, dim=1))
        if lses:
            rows_l.append(torch.cat(lses, dim=1))
    return torch.cat(rows_o), (torch.cat(rows_l) if rows_l else None)


def _document_local_group(q, k, v, valid, start, group_branches, *, lay: RingLayout, rank: int, group, scale,
                          is_causal, need_lse):  # fmt: skip
    """The branches of one group whose segments fit in a chunk, on packed documents.

    A (document, segment) run is at most ``s`` long, so every run that touches the chunk lies in the
    window of the chunk and ``s`` positions on each side (before it only under causal masking): the
    rank receives those edges of ``k``, ``v``, validity and document starts, runs the branches on the
    window and keeps its own rows. Positions outside ``[0, n)`` are invalid keys of a document of their
    own (one before 0, one from ``n``).
    """
    b, c = q.shape[:2]
    s, p = lay.cfg.segment_lengths[group_branches[0].group], lay.num_devices
    right = not is_causal
    prev = dist.get_global_rank(group, rank - 1) if rank else None
    nxt = dist.get_global_rank(group, rank + 1) if rank < p - 1 else None

    def wide(x: Tensor) -> Tensor:
        if x.is_floating_point():
            return _Window.apply(x, s, prev, nxt, right, group)
        left, *after = _edges(x, s, prev, nxt, right, group)
        return torch.cat([left, x, *after], dim=1)

    pos = rank * c - s + torch.arange(c + (2 if right else 1) * s, device=q.device)
    real = (pos >= 0) & (pos < lay.n)
    outside = torch.where(pos < 0, pos[0], lay.n)
    start_w = torch.where(real[None], wide(start), outside[None])
    valid_w = wide(valid) & real[None]
    zeros = q.new_zeros(b, s, *q.shape[2:])
    q_w = torch.cat([zeros, q] + ([zeros] if right else []), dim=1)
    k_w, v_w = wide(k), wide(v)
    outs, lses = [], []
    for br in group_branches:
        o, l = _window_branch(q_w, k_w, v_w, valid_w, start_w, pos, br, scale=scale, is_causal=is_causal,
                              need_lse=need_lse)  # fmt: skip
        outs.append(o[:, s : s + c])
        lses.append(None if l is None else l[:, s : s + c])
    return outs, lses


@dataclasses.dataclass(frozen=True)
class _DocSpec:
    """The static part of one document ring (a branch longer than a chunk) on one rank."""

    rank: int
    ranks: tuple[int, ...]  # the global rank of every rank of the group
    reach: int  # hops each way: a run spans at most s / c + 1 chunks
    q_offsets: tuple[int, ...]
    kv_offsets: tuple[int, ...]
    scale: float
    is_causal: bool
    process_group: Any

    def steps(self) -> tuple[int, ...]:
        """Directions the blocks travel: from the ranks before (+1), and after (-1) unless causal."""
        return (1,) if self.is_causal else (1, -1)

    def hop(self, step: int) -> tuple[int, int]:
        """``(send_to, recv_from)`` global ranks of one hop in direction ``step`` (a cycle over the group)."""
        p = len(self.ranks)
        return self.ranks[(self.rank + step) % p], self.ranks[(self.rank - step) % p]


def _run_span(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest and largest run id of the kept positions of a chunk, per row (run ids are non-negative)."""
    return torch.where(ids >= 0, ids, torch.iinfo(ids.dtype).max).amin(dim=1), ids.amax(dim=1)


def _meet(q_ids: Tensor, kv_ids: Tensor) -> bool:
    """Whether a query chunk and a key chunk can share a run (their run-id ranges overlap in some row)."""
    (q_lo, q_hi), (k_lo, k_hi) = _run_span(q_ids), _run_span(kv_ids)
    return bool(((q_lo <= k_hi) & (k_lo <= q_hi)).any())


class _DocumentRing(torch.autograd.Function):
    """One branch longer than a chunk, on packed documents: whole chunks ``(b, c, H, d)`` in, output and lse out.

    Forward: the stacked ``(k, v)`` chunk and its run ids hop ``reach`` times in each direction; a rank
    computes the tile of a block from a rank in range whose runs can meet its own. Backward: the same
    hops with a ``dk, dv`` accumulator travelling with each block, then one message home.
    """

    @staticmethod
    def forward(ctx, qd, kd, vd, q_ids, kv_ids, sp: _DocSpec):  # type: ignore[override]
        p = len(sp.ranks)
        kv = torch.stack([kd, vd])
        acc = _merge(None, *_tile(sp, qd, kv[0], kv[1], None, sp.is_causal, (q_ids, kv_ids)))
        used = []
        for step in sp.steps():
            block, ids = kv, kv_ids
            for hop in range(1, sp.reach + 1):
                send, recv = sp.hop(step)
                block, ids = _exchange([block, ids], send_to=send, recv_from=recv, group=sp.process_group)
                if 0 <= sp.rank - step * hop < p and _meet(q_ids, ids):
                    acc = _merge(acc, *_tile(sp, qd, block[0], block[1], None, False, (q_ids, ids)))
                    used.append((step, hop))
        out, lse = acc[0], _merged_lse(acc[1], acc[2])
        ctx.sp, ctx.used = sp, used
        ctx.save_for_backward(qd, kd, vd, q_ids, kv_ids, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        sp: _DocSpec = ctx.sp
        qd, kd, vd, q_ids, kv_ids, out, lse = ctx.saved_tensors
        dout, delta = _row_grads(out, lse, dout, dlse)
        kv = torch.stack([kd, vd])
        g_q, g_k, g_v = _tile_grads(sp, qd, kv[0], kv[1], None, sp.is_causal, lse, dout, delta, (q_ids, kv_ids))
        dq, dkv = g_q, torch.stack([g_k, g_v])
        p = len(sp.ranks)
        for step in sp.steps():
            block, ids = kv, kv_ids
            travelling = torch.zeros_like(dkv)
            for hop in range(1, sp.reach + 1):
                send, recv = sp.hop(step)
                block, ids, travelling = _exchange([block, ids, travelling], send_to=send, recv_from=recv,
                                                   group=sp.process_group)  # fmt: skip
                if (step, hop) in ctx.used:
                    g_q, g_k, g_v = _tile_grads(sp, qd, block[0], block[1], None, False, lse, dout, delta, (q_ids, ids))
                    dq = dq + g_q
                    travelling = travelling + torch.stack([g_k, g_v])
            # this rank holds the accumulator of the block of rank - step * reach: home it goes
            home = (sp.ranks[(sp.rank - step * sp.reach) % p], sp.ranks[(sp.rank + step * sp.reach) % p])
            dkv = dkv + _exchange([travelling], send_to=home[0], recv_from=home[1], group=sp.process_group)[0]
        return dq.to(qd.dtype), dkv[0].to(kd.dtype), dkv[1].to(vd.dtype), None, None, None


def _document_spanning_branch(q, k, v, valid, start, br: Branch, *, lay: RingLayout, rank: int, group, scale,
                              is_causal):  # fmt: skip
    """One branch whose segments are longer than a chunk, on packed documents (:class:`_DocumentRing`).

    Each position's id is the first position of its (document, segment) run where the branch keeps it
    (-1 for a query, -2 for a key it does not keep or that is padding), so a tile is masked by run.
    Returns ``(b, c, heads, d)`` and ``(b, c, heads)``, heads in ``br.heads`` order.
    """
    b, c, h = q.shape[:3]
    s = br.segment
    q_heads, kv_heads, qo, ko, order, many = stacked_buckets(br.heads, h // k.shape[2])
    rel = rank * c + torch.arange(c, device=q.device) - start
    run = start + torch.div(rel, s, rounding_mode="floor") * s
    kept = (rel % s) % br.rate == br.offset
    q_ids = torch.where(kept, run, -1)
    kv_ids = torch.where(kept & valid, run, -2)
    ranks = tuple(dist.get_global_rank(group, r) for r in range(lay.num_devices))
    sp = _DocSpec(rank, ranks, min(s // c, lay.num_devices - 1), qo, ko, scale, is_causal, group)
    out, lse = _DocumentRing.apply(_heads(q, q_heads), _heads(k, kv_heads), _heads(v, kv_heads), q_ids, kv_ids, sp)
    if many:
        index = torch.tensor(order, device=q.device)
        out, lse = out.index_select(2, index), lse.index_select(2, index)
    return out, lse


def _document_branches(q, k, v, key_padding_mask, document_ids, *, lay: RingLayout, rank: int, group, scale,
                       is_causal) -> tuple[list[Tensor], list[Tensor | None]]:  # fmt: skip
    """Every branch of a call with packed documents (contiguous layout): outputs and lses in branch order."""
    cfg = lay.cfg
    branches = cfg.branches(q.shape[2])
    start = _document_starts(document_ids, rank, lay.num_devices, group)
    valid = (
        torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
    )
    outs: list[Any] = [None] * len(branches)
    lses: list[Any] = [None] * len(branches)
    for g in range(cfg.num_groups):
        idx = [i for i, br in enumerate(branches) if br.group == g]
        if not idx:
            continue
        if cfg.segment_lengths[g] <= lay.chunk:
            o, l = _document_local_group(q, k, v, valid, start, [branches[i] for i in idx], lay=lay, rank=rank,
                                         group=group, scale=scale, is_causal=is_causal,
                                         need_lse=cfg.merge == "lse")  # fmt: skip
            for i, oi, li in zip(idx, o, l, strict=True):
                outs[i], lses[i] = oi, li
            continue
        for i in idx:
            outs[i], lses[i] = _document_spanning_branch(q, k, v, valid, start, branches[i], lay=lay, rank=rank,
                                                         group=group, scale=scale, is_causal=is_causal)  # fmt: skip
    return outs, lses


def ring_positions(batch: int, t: int, group=None, document_ids: Tensor | None = None, device=None) -> Tensor:
    """``(b, t)`` global position of every token of this rank's chunk, counted from its document's start.

    The chunks follow :func:`ring_dilated_attention`'s contiguous layout (rank ``p`` holds
    ``[p c, min((p + 1) c, n))``); one all-gather of the chunk lengths (and, with ``document_ids``
    ``(b, t)``, of the documents' edges) tells each rank where its chunk starts. For rotary embeddings
    of ring modules: every rank must call it. Without an initialised process group (or with a group
    of size 1) it is :func:`torch_ref.layers.positions` of the chunk.
    """
    world = _group_size(group)
    if world == 1:
        from torch_ref.layers import positions

        return positions(batch, t, document_ids, device=device)
    group = dist.group.WORLD if group is None else group
    mine = torch.tensor([t], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    rank, c = dist.get_rank(group), int(every[0].item())
    pos = rank * c + torch.arange(c, device=device)
    if document_ids is None:
        return pos[:t].expand(batch, t)
    last = document_ids[:, -1:] if t else document_ids.new_zeros(batch, 1)
    ids = torch.cat([document_ids, last.expand(batch, c - t)], dim=1)  # padded like the ring pads its chunk
    return (pos - _document_starts(ids, rank, world, group))[:, :t]


def _group_size(group) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


_FIELDS = ("q shape", "k shape", "v shape", "key_padding_mask shape", "document_ids shape", "dtype",
           "segment_lengths/dilation_rates", "merge", "is_causal", "scale", "load_balance", "autograd",
           "input check")  # fmt: skip
# dim 1: the rank's chunk length
_SEQUENCE_FIELDS = ("q shape", "k shape", "v shape", "key_padding_mask shape", "document_ids shape")


def _fingerprint(q, k, v, mask, docs, cfg_key, merge, is_causal, scale, load_balance, grad, error) -> list[list[int]]:
    def shape(x, size):
        s = list(x.shape) if isinstance(x, Tensor) and x.ndim == size else [-1] * size
        return s + [-1] * (size - len(s))

    return [shape(q, 4), shape(k, 4), shape(v, 4), [-2, -2] if mask is None else shape(mask, 2),
            [-2, -2] if docs is None else shape(docs, 2), [_code(getattr(q, "dtype", None))], [_code(cfg_key)],
            [_code(merge)], [int(bool(is_causal))], [_code(scale)], [_code(load_balance)], [int(grad)],
            [int(error is not None)]]  # fmt: skip


def _code(x) -> int:
    return zlib.crc32(repr(x).encode())


def _chunk_pattern_holds(lengths: list[int], contiguous: bool) -> bool:
    """Contiguous: ``c, ..., c, t, 0, ..., 0`` with ``0 < t <= c`` (or all 0); zigzag: all equal."""
    c = lengths[0]
    if not contiguous or c <= 0:
        return len(set(lengths)) == 1
    n = sum(lengths)
    return all(t == min(c, max(0, n - p * c)) for p, t in enumerate(lengths))


def _agree(group, device, fields: list[list[int]], error: Exception | None) -> list[int]:
    """All-gather every rank's fingerprint; raise the same ValueError on every rank when they differ.

    The sequence dim (the chunk length) of the shapes is not compared: the chunk lengths in rank order
    must be ``c, ..., c, t, 0, ..., 0`` (``0 < t <= c``) under ``load_balance=None`` and all equal under
    zigzag. Runs before the first message of a call, so a disagreement is an error, never a hang.

    Returns:
      The chunk lengths of the ranks, in rank order (``-1`` for a rank whose ``q`` is not 4-D).
    """
    flat = [x for f in fields for x in f]
    mine = torch.tensor(flat, dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    rows = [g.tolist() for g in gathered]
    bounds, start = {}, 0
    for name, f in zip(_FIELDS, fields, strict=True):
        bounds[name] = (start, start + len(f))
        start += len(f)

    def field(row: list[int], name: str, compared: bool = False) -> tuple[int, ...]:
        a, b = bounds[name]
        got = tuple(row[a:b])
        return got[:1] + got[2:] if compared and name in _SEQUENCE_FIELDS else got

    lengths = [field(row, "q shape")[1] for row in rows]
    failed = [r for r, row in enumerate(rows) if row[-1]]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"ring attention: the inputs of rank(s) {failed} of the process group failed their checks "
                         f"(their error names the fix); every rank must pass valid inputs.")  # fmt: skip
    bad = [name for name in _FIELDS if len({field(row, name, True) for row in rows}) > 1]
    contiguous = all(field(row, "load_balance") == (_code(None),) for row in rows)
    pattern = _chunk_pattern_holds(lengths, contiguous)
    if not pattern:
        given = [name for name in _SEQUENCE_FIELDS if field(rows[0], name) != (-2, -2)]
        seq = [name for name in _SEQUENCE_FIELDS if name in given]
        bad = [name for name in _FIELDS if name in bad or name in seq]
    if bad:
        detail = "; ".join(f"{name}: " + ", ".join(f"rank {r} {field(row, name)}" for r, row in enumerate(rows))
                           for name in bad)  # fmt: skip
        if pattern:
            why = "every rank must pass its chunk of the same shapes and the same configuration."
        elif contiguous:
            why = (
                f"the chunk lengths in rank order, {tuple(lengths)}, are not c, ..., c, t, 0, ..., 0 with "
                f"0 < t <= c (c = rank 0's chunk length): rank p must hold positions [p*c, min((p+1)*c, n)) of the "
                f"sequence (x.split(c, dim=1), empty chunks for the ranks past the end), with a c whose c*P the ring "
                f"plan accepts, e.g. c = dilated_plan.ring_chunk_length(n, P, cfg); the other dims must agree."
            )
        else:
            why = (
                f"under load_balance='zigzag' every rank holds n/P positions, but the chunk lengths in rank order "
                f"are {tuple(lengths)}; the other dims must agree too."
            )
        raise ValueError(f"ring attention: the ranks of the process group disagree on {', '.join(bad)} ({detail}); "
                         f"{why}")  # fmt: skip
    return lengths


def ring_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    group=None,
    is_causal: bool = False,
    scale: float | None = None,
    merge: str = "head_partition",
    key_padding_mask: Tensor | None = None,
    load_balance: str | None = None,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Dilated attention with the sequence split over the ranks of ``group`` (docs/semantics.md section 7).

    Computes exactly :func:`torch_ref.dilated_attention` on the whole sequence of ``n`` positions.

    * ``load_balance=None``, any ``n``: rank ``p`` holds positions ``[p c, min((p + 1) c, n))``, so
      the chunk lengths in rank order are ``c, ..., c, t, 0, ..., 0`` with ``0 < t <= c`` (what
      ``x.split(c, dim=1)`` gives, with empty chunks for the ranks past the end), ``c`` being rank
      0's chunk length. ``c * P`` must be a length the ring plan accepts
      (:func:`dilated_plan.ring_layout`); :func:`dilated_plan.ring_chunk_length` gives the smallest
      ``c`` for ``n``. Each rank pads its chunk at its end to ``c``, masks the padding as keys and
      returns its own ``t`` rows: exact (semantics section 10), since all padding lies after position
      ``n``.
    * ``"zigzag"``: every rank holds ``c = n / P`` positions, chunk ``p`` of :func:`to_zigzag` of the
      sequence (half-chunks ``p`` and ``2P - 1 - p``; causality and masks keep meaning original
      positions), and ``n`` must be a length the plan accepts (the error names the padded length).

    Differentiable: the backward of a spanning group replays the ring and sends ``dk, dv`` home, so
    every rank of the group must run the backward (a rank with an empty chunk too). Non-finite keys
    or values that no row sees have no effect on the values or the gradients (semantics section 11).

    Args:
      q: this rank's chunk of the queries, ``(b, t, h, d)``; under zigzag ``t = c = n / P``.
      k, v: this rank's chunks of the keys and values, ``(b, t, h_kv, d)``, ``h`` a multiple of ``h_kv``.
      segment_lengths, dilation_rates, is_causal, scale, merge: as in :func:`dilated_attention`.
      group: the ``torch.distributed`` process group; ``None`` uses the default group when
        ``torch.distributed`` is initialised and runs :func:`improved_dilated_attention` on the
        chunk (as the whole sequence) when it is not. A group of size 1 is improved as well.
      key_padding_mask: optional ``(b, t)`` boolean chunk of the mask, True = padding (every rank
        passes one, or none does).
      load_balance: ``None`` (contiguous chunks) or ``"zigzag"``.
      document_ids: optional ``(b, t)`` integer chunk of the packed documents (semantics section 10;
        every rank passes one, or none does); contiguous layout only. Groups whose segments fit in a
        chunk exchange ``s`` positions with the neighbouring ranks; longer groups pass whole chunks of
        their key/value heads up to ``s / c`` ranks each way, masked by run (docs/ring.md).

    Returns:
      This rank's chunk of the output, ``(b, t, h, d)`` in the dtype of ``q`` (the input chunk's length).

    Raises:
      ValueError: the checks of :func:`dilated_attention` on the chunk; chunk lengths that are not
        ``c, ..., c, t, 0, ..., 0`` (zigzag: not all equal) and ranks that disagree on the other
        shape dims or the configuration (all checked before any message, raised on every rank); a
        ``c`` whose ``c * P`` the plan refuses (the message names ``c``, ``n`` and the chunk length
        :func:`dilated_plan.ring_chunk_length` that works; zigzag: the padded length).
    """
    num = _group_size(group)
    if num == 1:
        kw: dict[str, Any] = dict(segment_lengths=segment_lengths, dilation_rates=dilation_rates)
        kw.update(is_causal=is_causal, scale=scale, merge=merge, key_padding_mask=key_padding_mask)
        return improved_dilated_attention(q, k, v, document_ids=document_ids, **kw)
    group = dist.group.WORLD if group is None else group
    grad = torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in (q, k, v))
    error: Exception | None = None
    try:
        load_balance = check_load_balance(load_balance)
        is_causal, scale = check_is_causal(is_causal), check_scale(scale)
        cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
        check_qkv(q, k, v)
        b, t, h, d = q.shape
        cfg.check_heads(h)
        check_key_padding_mask(key_padding_mask, b, t)
        check_document_ids(document_ids, b, t)
        if document_ids is not None and load_balance is not None:
            raise ValueError(
                f"document_ids with load_balance={load_balance!r}: the ring takes packed documents in the contiguous "
                f"layout only; pass load_balance=None (packed documents are already spread over the ranks)."
            )
    except (ValueError, TypeError) as e:
        error = e
    key = (tuple(segment_lengths) if isinstance(segment_lengths, Sequence) else segment_lengths,
           tuple(dilation_rates) if isinstance(dilation_rates, Sequence) else dilation_rates)  # fmt: skip
    fields = _fingerprint(q, k, v, key_padding_mask, document_ids, key, merge, is_causal, scale, load_balance, grad,
                          error)  # fmt: skip
    lengths = _agree(group, q.device if isinstance(q, Tensor) else torch.device("cpu"), fields, error)
    # Past here every rank has the same configuration and the same chunk lengths: what follows raises the
    # same error on every rank, before any message.
    n, c = sum(lengths), lengths[0]
    if n == 0:
        return torch.zeros_like(q)
    try:
        lay = ring_layout(c * num, num, cfg, load_balance, unit="ranks")
    except ValueError as e:
        if load_balance is not None:
            raise ValueError(
                f"{e} Or pad the whole sequence to n={ring_padded_length(n, num, cfg, load_balance)} "
                f"(dilated_plan.ring_padded_length) and mark the padding in key_padding_mask: the outputs at "
                f"real positions are exact."
            ) from None
        good = ring_chunk_length(n, num, cfg)
        raise ValueError(
            f"ring attention: the ranks hold chunks of c={c} positions (rank 0's chunk length; n={n} positions in "
            f"all over P={num} ranks), and c*P={c * num} is not a length the ring plan accepts ({e}) Use chunks of "
            f"c={good} positions: rank p holds positions [p*{good}, min((p+1)*{good}, n)) (x.split({good}, dim=1), "
            f"empty chunks for the ranks past the end); dilated_plan.ring_chunk_length(n={n}, {num}, cfg) = {good}."
        ) from None
    if c * num > n:  # the sequence ends before the last rank's chunk does: pad it at its end and mask the padding
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(b, t, dtype=torch.bool, device=q.device)
        if t < c:

            def extend(x: Tensor, fill) -> Tensor:
                return torch.cat([x, x.new_full((b, c - t, *x.shape[2:]), fill)], dim=1)

            q, k, v = extend(q, 0.0), extend(k, 0.0), extend(v, 0.0)
            key_padding_mask = extend(key_padding_mask, True)
            if document_ids is not None:  # the padding continues the last document (it is masked anyway)
                last = document_ids[:, -1:] if t else document_ids.new_zeros(b, 1)
                document_ids = torch.cat([document_ids, last.expand(b, c - t)], dim=1)
    scale = default_scale(d, scale)
    rank = dist.get_rank(group)
    branches = cfg.branches(h)
    if document_ids is not None:
        outs, lses = _document_branches(q, k, v, key_padding_mask, document_ids, lay=lay, rank=rank, group=group,
                                        scale=scale, is_causal=bool(is_causal))  # fmt: skip
        out = combine_branches(cfg, branches, outs, lses).to(q.dtype)
        return out if t == c else out[:, :t]
    outs, lses = [], []
    for br in branches:
        if lay.local(br.group):
            bkw: dict[str, Any] = dict(scale=scale, is_causal=bool(is_causal), dropout_p=0.0)
            bkw.update(need_lse=cfg.merge == "lse")
            if lay.parts == 1:
                o, l = branch_attention(q, k, v, key_padding_mask, br, **bkw)
            else:  # each half-chunk holds whole segments: run them as one batch of two

                def halves(x: Tensor) -> Tensor:
                    return x.reshape(b * 2, c // 2, *x.shape[2:])

                pad = None if key_padding_mask is None else halves(key_padding_mask)
                o, l = branch_attention(halves(q), halves(k), halves(v), pad, br, **bkw)
                o = o.reshape(b, c, *o.shape[2:])
                l = None if l is None else l.reshape(b, c, *l.shape[2:])
        else:
            o, l = _spanning_branch(q, k, v, key_padding_mask, br, lay=lay, rank=rank, group=group, scale=scale,
                                    is_causal=bool(is_causal))  # fmt: skip
        outs.append(o)
        lses.append(l)
    out = combine_branches(cfg, branches, outs, lses).to(q.dtype)
    return out if t == c else out[:, :t]


class RingDilatedAttention(nn.Module):
    """Module form of :func:`ring_dilated_attention` (no parameters).

    Args:
      segment_lengths, dilation_rates: the groups, validated on construction.
      group: the ``torch.distributed`` process group (``None``: the default group if initialised).
      scale: score scale, default ``1 / sqrt(head_dim)``.
      merge: ``"head_partition"`` or ``"lse"``.
      load_balance: ``None`` or ``"zigzag"`` (inputs in :func:`to_zigzag` order).

    ``forward(q, k, v, is_causal=False, key_padding_mask=None, document_ids=None)`` takes this rank's
    chunks, ``q`` ``(b, t, h, d)``, ``k, v`` ``(b, t, h_kv, d)``, ``key_padding_mask`` ``(b, t)`` (True
    = padding) and ``document_ids`` ``(b, t)`` integers (packed documents), and returns this rank's
    ``(b, t, h, d)`` chunk of the output. Under ``load_balance=None`` the sequence may have any length
    ``n``: rank ``p`` holds positions ``[p c, min((p + 1) c, n))`` (chunk lengths ``c, ..., c, t, 0,
    ..., 0``, as ``x.split(c, dim=1)``), with ``c * P`` a length the ring plan accepts, e.g. ``c =
    dilated_plan.ring_chunk_length(n, P, cfg)``; under zigzag every rank holds ``n / P`` positions. See
    :func:`ring_dilated_attention`.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        group=None,
        scale: float | None = None,
        merge: str = "head_partition",
        load_balance: str | None = None,
    ) -> None:
        super().__init__()
        cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
        self.segment_lengths = cfg.segment_lengths
        self.dilation_rates = cfg.dilation_rates
        self.merge = cfg.merge
        self.group = group
        self.scale = None if scale is None else float(scale)
        self.load_balance = check_load_balance(load_balance)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        return ring_dilated_attention(
            q,
            k,
            v,
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            group=self.group,
            is_causal=is_causal,
            scale=self.scale,
            merge=self.merge,
            key_padding_mask=key_padding_mask,
            load_balance=self.load_balance,
            document_ids=document_ids,
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"merge={self.merge!r}, scale={self.scale}, load_balance={self.load_balance!r}"
        )
