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
from torch_ref.kernels import flex, sdpa_attention

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
) -> tuple[Tensor, Tensor | None]:
    """One branch of dilated attention on ``(b, n, h, d)`` tensors: its heads' output and log-sum-exp.

    Returns ``(b, n, heads_of_branch, d)`` (0 off the branch's positions) and, with ``need_lse``,
    ``(b, n, heads_of_branch)`` (``-inf`` there), else None. SDPA serves the output; the log-sum-exp
    comes, on CUDA without dropout, from flex attention's one fused pass, else from a chunked second
    pass (docs/torch_core.md).
    """
    b = q.shape[0]
    hs = br.head_slice
    qd, kd, vd = (dilate(x[:, :, hs], br) for x in (q, k, v))  # (B, m, hg, d) strided views
    valid = None if key_padding_mask is None else ~dilate(key_padding_mask, br)
    kw: dict[str, Any] = dict(scale=scale, is_causal=is_causal, kv_valid=valid)
    lse: Tensor | None
    if need_lse and q.is_cuda and dropout_p == 0.0 and flex.available():
        o, lse = flex.flex_attention(qd, kd, vd, **kw)
    else:
        o, lse = sdpa_attention(qd, kd, vd, dropout_p=dropout_p, need_lse=need_lse, **kw)
    return undilate(o, br, b, 0.0), None if lse is None else undilate(lse, br, b, float("-inf"))


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
    """Join per-branch results ``(b, n, heads_of_branch, d)`` into ``(b, n, h, d)`` per SPEC's merge rule."""
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
