"""Ring dilated attention over a torch.distributed process group (semantics section 7).

The mirror of ``jax_dilated/ring.py``.

Every rank of the group holds one contiguous chunk of ``c = n / P`` positions (rank ``p`` holds
``[p * c, (p + 1) * c)``) and returns the same chunk of the output. Per attention branch:

* ``c % s == 0``: the segments lie inside the chunk; the rank runs the improved branch locally.
* ``s % c == 0``: a segment spans ``m = s / c`` consecutive ranks. Each rank dilates its chunk, then
  the dilated key/value blocks move ``m - 1`` hops between the ranks of the segment with
  ``dist.batch_isend_irecv``, merged with an online softmax. Under ``is_causal`` a rank neither
  receives nor computes blocks from later ranks.

No rank ever holds another rank's whole chunk of ``k``/``v``, only one dilated block in flight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dilated_plan import Branch, DilatedConfig, default_scale, ring_plan
from torch_ref.branches import branch_attention, combine_branches, dilate, merge_lse, undilate
from torch_ref.checks import check_key_padding_mask, check_qkv
from torch_ref.dilated import improved_dilated_attention
from torch_ref.kernels import attend

Tensor = torch.Tensor


def _exchange(tensors: list[Tensor], *, send_to: int | None, recv_from: int | None, group) -> list[Tensor]:
    """One hop: send ``tensors`` to global rank ``send_to`` and receive same-shaped ones from ``recv_from``."""
    ops, received = [], []
    if send_to is not None:
        ops += [dist.P2POp(dist.isend, t, send_to, group, tag=i) for i, t in enumerate(tensors)]
    if recv_from is not None:
        received = [torch.empty_like(t) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, recv_from, group, tag=i) for i, t in enumerate(received)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received


def _spanning_branch(
    q, k, v, key_padding_mask, br: Branch, *, chunk: int, span: int, group, scale: float, is_causal: bool
):
    """One branch whose segments span ``span`` ranks; this rank's tensors ``(b, chunk, ...)``.

    A segment starts on a chunk boundary and ``chunk % r == 0``, so the branch's kept positions in this
    chunk are local positions ``offset, offset + r, ...``: dilating the chunk as one segment of
    length ``chunk`` selects them in order.
    """
    b = q.shape[0]
    local = dataclasses.replace(br, segment=chunk)
    hs = br.head_slice
    qd = dilate(q[:, :, hs], local)
    kv = torch.stack([dilate(k[:, :, hs], local), dilate(v[:, :, hs], local)]).contiguous()  # one message per hop
    valid = None if key_padding_mask is None else (~dilate(key_padding_mask, local)).to(torch.uint8).contiguous()
    out, lse = attend(
        qd, kv[0], kv[1], scale=scale, is_causal=is_causal, kv_valid=None if valid is None else valid.bool()
    )
    me = dist.get_rank(group)
    rank, base = me % span, me - me % span
    nxt = dist.get_global_rank(group, base + (rank + 1) % span)
    prv = dist.get_global_rank(group, base + (rank - 1) % span)
    for hop in range(1, span):
        if is_causal:
            # Blocks only travel forward: this rank receives the block of rank - hop while hop <= rank
            # and passes on what it held while its successor still needs it. No future block arrives.
            send = nxt if rank < span - 1 and hop - 1 <= rank else None
            recv = prv if hop <= rank else None
        else:
            send, recv = nxt, prv
        got = _exchange([kv] if valid is None else [kv, valid], send_to=send, recv_from=recv, group=group)
        if not got:
            continue
        kv = got[0]
        valid = got[1] if valid is not None else None
        o, l = attend(qd, kv[0], kv[1], scale=scale, kv_valid=None if valid is None else valid.bool())
        out, lse = merge_lse([out, o], [lse, l])
    return undilate(out, local, b, 0.0), undilate(lse, local, b, float("-inf"))


def _group_size(group) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


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
) -> Tensor:
    """Dilated attention with the sequence split over the ranks of ``group`` (docs/semantics.md section 7).

    Computes exactly :func:`torch_ref.dilated_attention` on the whole sequence of ``n = c * P``
    positions, where rank ``p`` holds positions ``[p * c, (p + 1) * c)``.

    Args:
      q, k, v: this rank's chunk, ``(b, c, h, d)``.
      segment_lengths, dilation_rates, is_causal, scale, merge: as in :func:`dilated_attention`.
      group: the ``torch.distributed`` process group; ``None`` uses the default group when
        ``torch.distributed`` is initialised and runs :func:`improved_dilated_attention` on the
        chunk (as the whole sequence) when it is not. A group of size 1 is improved as well.
      key_padding_mask: optional ``(b, c)`` boolean chunk of the mask, True = padding.

    Returns:
      This rank's chunk of the output, ``(b, c, h, d)`` in the dtype of ``q``.

    Raises:
      ValueError: the checks of :func:`dilated_attention` on the whole sequence, and the SPEC 7
        sharding constraints (see :func:`dilated_plan.ring_plan`).
      NotImplementedError: autograd through a group whose segments span ranks (the exchange has no
        backward pass); local groups differentiate normally.
    """
    num = _group_size(group)
    kw: dict[str, Any] = dict(
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        is_causal=is_causal,
        scale=scale,
        merge=merge,
        key_padding_mask=key_padding_mask,
    )
    if num == 1:
        return improved_dilated_attention(q, k, v, **kw)
    group = dist.group.WORLD if group is None else group
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    check_qkv(q, k, v)
    b, c, h, d = q.shape
    n = c * num
    cfg.check_sequence(n)
    cfg.check_heads(h)
    check_key_padding_mask(key_padding_mask, b, c)
    if n == 0:
        return torch.zeros_like(q)
    chunk, spans = ring_plan(n, num, cfg, unit="ranks")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)) and max(spans) > 1:
        raise NotImplementedError(
            f"ring attention has no backward pass for segments spanning ranks (segment_lengths={cfg.segment_lengths}, "
            f"chunk c={chunk}); run it under torch.no_grad(), or use segments that fit in a chunk."
        )
    scale = default_scale(d, scale)
    branches = cfg.branches(h)
    outs, lses = [], []
    for br in branches:
        span = spans[br.group]
        if span == 1:
            o, l = branch_attention(
                q,
                k,
                v,
                key_padding_mask,
                br,
                scale=scale,
                is_causal=bool(is_causal),
                dropout_p=0.0,
                need_lse=cfg.merge == "lse",
            )
        else:
            o, l = _spanning_branch(
                q,
                k,
                v,
                key_padding_mask,
                br,
                chunk=chunk,
                span=span,
                group=group,
                scale=scale,
                is_causal=bool(is_causal),
            )
        outs.append(o)
        lses.append(l)
    return combine_branches(cfg, branches, outs, lses).to(q.dtype)


class RingDilatedAttention(nn.Module):
    """Module form of :func:`ring_dilated_attention` (no parameters).

    Args:
      segment_lengths, dilation_rates: the groups, validated on construction.
      group: the ``torch.distributed`` process group (``None``: the default group if initialised).
      scale: score scale, default ``1 / sqrt(head_dim)``.
      merge: ``"head_partition"`` or ``"lse"``.

    ``forward(q, k, v, is_causal=False, key_padding_mask=None)`` takes this rank's ``(b, c, h, d)``
    chunks and returns this rank's ``(b, c, h, d)`` chunk of the output.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        group=None,
        scale: float | None = None,
        merge: str = "head_partition",
    ) -> None:
        super().__init__()
        cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
        self.segment_lengths = cfg.segment_lengths
        self.dilation_rates = cfg.dilation_rates
        self.merge = cfg.merge
        self.group = group
        self.scale = None if scale is None else float(scale)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Tensor | None = None
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
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"merge={self.merge!r}, scale={self.scale}"
        )
