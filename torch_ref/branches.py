"""The branch machinery of the torch mirror: dilate, attend one branch, put back, merge.

Mirror of ``jax_dilated/branches.py``: :func:`dilate` gathers a branch's kept positions of every
segment as one batch of short sequences (a strided view), :func:`branch_attention` runs SDPA on
them, :func:`undilate` puts the result back by padding, and :func:`combine_branches` applies the
merge rule (docs/semantics.md sections 1-2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dilated_plan import Branch, DilatedConfig
from dilated_plan.config import Piece, branch_pieces, kv_buckets
from torch_ref.kernels import attend, flex, sdpa_attention

Tensor = torch.Tensor


def dilate(x: Tensor, br: Branch) -> Tensor:
    """``(b, n, ...)`` -> ``(b * n/s, s/r, ...)``: the kept positions of every segment (a view, no copy)."""
    b, n = x.shape[:2]
    x = x.unflatten(1, (n // br.rate, br.rate))[:, :, br.offset]
    return x.reshape(b * (n // br.segment), br.segment // br.rate, *x.shape[2:])


def undilate(x: Tensor, br: Branch, batch: int, fill: float) -> Tensor:
    """Inverse of :func:`dilate`: ``(b * n/s, s/r, ...)`` -> ``(b, n, ...)`` with ``fill`` elsewhere."""
    rest = x.shape[2:]
    x = x.reshape(batch, -1, 1, *rest)
    if br.rate > 1:
        # F.pad pads trailing dimensions first: (last dim..., dim 2) pairs.
        x = F.pad(x, (0, 0) * len(rest) + (br.offset, br.rate - 1 - br.offset), value=fill)
    return x.reshape(batch, -1, *rest)


def _positions(length: int, br: Branch, device) -> Tensor:
    """The kept positions of every segment of ``br`` in ``[0, length)``, in order."""
    starts = torch.arange(0, length, br.segment, device=device)
    return (starts[:, None] + br.offset + br.rate * torch.arange(br.kept, device=device)[None, :]).reshape(-1)


def _heads(x: Tensor, heads: tuple[int, ...]) -> Tensor:
    """The ``heads`` of ``x`` (dim 2): a strided view when they are evenly spaced, else an index_select."""
    steps = {b - a for a, b in zip(heads, heads[1:], strict=False)}
    if len(steps) <= 1:
        step = steps.pop() if steps else 1
        return x[:, :, heads[0] : heads[-1] + 1 : step]
    return x.index_select(2, torch.tensor(heads, device=x.device))


class _PieceLayout:
    """How one piece's kept positions become rows (``gather``) and go back (``scatter``)."""

    def __init__(self, piece: Piece, batch: int, plain: bool, device):
        self.piece, self.batch, self.plain = piece, batch, plain
        self.pos = _positions(piece.padded, piece.branch, device) if plain else None

    def gather(self, x: Tensor, fill: float | bool = 0.0) -> Tensor:
        """``(b, length, ...)`` -> ``(b * L/s, s/r, ...)``, the shorter last segment padded with ``fill``."""
        piece, br = self.piece, self.piece.branch
        extra = piece.padded - piece.length
        if extra:
            x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, extra), value=fill)
        if self.pos is None:
            return dilate(x, br)
        return x.index_select(1, self.pos).reshape(self.batch * (piece.padded // br.segment), br.kept, *x.shape[2:])

    def scatter(self, x: Tensor, fill: float) -> Tensor:
        """Inverse of :meth:`gather`, cut back to the piece's length; ``fill`` off the kept positions."""
        piece, rest = self.piece, x.shape[2:]
        if self.pos is None:
            return undilate(x, piece.branch, self.batch, fill)[:, : piece.length]
        full = x.new_full((self.batch, piece.padded, *rest), fill)
        return full.index_copy(1, self.pos, x.reshape(self.batch, -1, *rest))[:, : piece.length]


def branch_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    br: Branch,
    *,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    need_lse: bool,
    plain: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One branch of dilated attention: its heads' output and log-sum-exp (mirror of the JAX one).

    ``q`` ``(b, n, h, d)``, ``k, v`` ``(b, n, h_kv, d)``, any ``n``: the branch's whole segments and the
    shorter last one (:func:`dilated_plan.branch_pieces`), its query heads split by the key/value heads
    they share (:func:`dilated_plan.kv_buckets`). ``plain`` (the standard form): index gathers and the
    plain kernel (:func:`torch_ref.kernels.attend`); else (improved) strided views and SDPA, the
    log-sum-exp coming, on CUDA without dropout, from flex attention's one fused pass, else from a
    chunked second pass (docs/torch_core.md).

    Returns ``(b, n, heads_of_branch, d)`` (0 off the branch's positions) and, with ``need_lse`` (always
    with ``plain``), ``(b, n, heads_of_branch)`` (``-inf`` there), else None; heads in ``br.heads`` order.
    """
    b, n, h, _ = q.shape
    buckets = kv_buckets(br.heads, h // k.shape[2])
    order = torch.argsort(torch.tensor([j for bucket in buckets for j in bucket.query_heads], device=q.device))
    outs, lses = [], []
    for piece in branch_pieces(n, br):
        extra, length = piece.padded - piece.length, piece.length
        span = slice(piece.start, piece.start + length)
        lay = _PieceLayout(piece, b, plain, q.device)
        valid = None
        if key_padding_mask is not None or extra:
            visible = torch.ones(b, length, dtype=torch.bool, device=q.device)
            if key_padding_mask is not None:
                visible = ~key_padding_mask[:, span]
            valid = lay.gather(visible, fill=False)
        o_parts, l_parts = [], []
        for bucket in buckets:
            qd, kd, vd = (
                lay.gather(_heads(x[:, span], heads))
                for x, heads in ((q, bucket.query_heads), (k, bucket.kv_heads), (v, bucket.kv_heads))
            )
            kw: dict[str, Any] = dict(scale=scale, is_causal=is_causal, kv_valid=valid)
            lse: Tensor | None
            if plain:
                o, lse = attend(qd, kd, vd, dropout_p=dropout_p, **kw)
            elif need_lse and q.is_cuda and dropout_p == 0.0 and flex.available():
                o, lse = flex.flex_attention(qd, kd, vd, **kw)
            else:
                o, lse = sdpa_attention(qd, kd, vd, dropout_p=dropout_p, need_lse=need_lse, **kw)
            o_parts.append(lay.scatter(o, 0.0))
            if lse is not None:
                l_parts.append(lay.scatter(lse, float("-inf")))
        outs.append(torch.cat(o_parts, dim=2).index_select(2, order) if len(buckets) > 1 else o_parts[0])
        if l_parts:
            lses.append(torch.cat(l_parts, dim=2).index_select(2, order) if len(buckets) > 1 else l_parts[0])
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return out, (torch.cat(lses, dim=1) if len(lses) > 1 else lses[0]) if lses else None


def merge_lse(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
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
    lse = torch.stack(lses)
    top = lse.amax(dim=0).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=top.dtype, device=top.device))
    w = torch.exp(lse - top)
    total = w.sum(dim=0)
    safe = torch.where(total > 0, total, torch.ones((), dtype=total.dtype, device=total.device))
    w = w / safe
    merged = torch.where(total > 0, torch.log(safe) + top, torch.full_like(safe, float("-inf")))
    return sum(wi[..., None] * oi for wi, oi in zip(w, outs, strict=True)), merged


def combine_branches(
    cfg: DilatedConfig, branches: tuple[Branch, ...], outs: list[Tensor], lses: list[Tensor | None]
) -> Tensor:
    """Join per-branch results ``(b, n, heads_of_branch, d)`` into ``(b, n, h, d)`` (semantics section 2)."""
    if cfg.merge == "head_partition":
        return torch.cat(outs, dim=2).div_(cfg.num_groups)  # in place: cat's backward keeps no output
    group_outs, group_lses = [], []
    for i in range(cfg.num_groups):
        idx = [j for j, br in enumerate(branches) if br.group == i]
        heads = torch.tensor([hd for j in idx for hd in branches[j].heads])
        order = torch.argsort(heads).to(outs[0].device)
        group_outs.append(torch.cat([outs[j] for j in idx], dim=2).index_select(2, order))
        group_lses.append(torch.cat([_needed(lses[j]) for j in idx], dim=2).index_select(2, order))
    return merge_lse(group_outs, group_lses)[0]


def _needed(lse: Tensor | None) -> Tensor:
    """A branch's log-sum-exp, which ``merge="lse"`` always asks for (``need_lse``)."""
    if lse is None:
        raise RuntimeError("merge='lse' needs every branch's log-sum-exp; a branch was run with need_lse=False.")
    return lse
