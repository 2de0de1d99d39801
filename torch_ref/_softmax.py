"""Softmax attention that also returns its log-sum-exp, and the log-sum-exp merge of partial results.

The torch mirror of ``jax_dilated/_softmax.py`` (same shapes and semantics; dropout draws from
torch's default generator, like ``F.scaled_dot_product_attention``). Statistics are kept in float32
(float64 for float64 inputs); rows with no visible key give 0 and a log-sum-exp of ``-inf``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    kv_valid: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of every query over every key, with its log-sum-exp.

    Args:
      q: ``(B, m, h, d)`` queries.
      k, v: ``(B, mk, h, d)`` keys and values.
      scale: multiplies the scores ``q . k``.
      is_causal: query ``p`` sees key ``p' <= p`` (top-left aligned).
      kv_valid: optional ``(B, mk)`` boolean, False for keys nobody may see.
      dropout_p: probability of dropping an attention weight (weights rescaled by
        ``1 / (1 - dropout_p)``; the log-sum-exp is that of the undropped weights).

    Returns:
      ``out`` ``(B, m, h, d)`` in the statistics dtype (0 for a row with no visible key) and
      ``lse`` ``(B, m, h)``, the log-sum-exp of the row's scaled scores (``-inf`` for such a row).
    """
    acc = stats_dtype(q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    m, mk = q.shape[1], k.shape[1]
    visible = None
    if is_causal:
        visible = torch.ones(m, mk, dtype=torch.bool, device=q.device).tril()[None, None]
    if kv_valid is not None:
        kv = kv_valid[:, None, None, :]
        visible = kv if visible is None else visible & kv
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros((), dtype=acc, device=q.device))
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    has_key = denom > 0
    safe = torch.where(has_key, denom, torch.ones((), dtype=acc, device=q.device))
    out = torch.einsum("bhqk,bkhd->bqhd", p / safe, v.to(acc))
    lse = torch.where(has_key, torch.log(safe) + row_max, torch.full((), float("-inf"), dtype=acc, device=q.device))
    return out, lse[..., 0].transpose(1, 2)


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
    return sum(wi[..., None] * oi for wi, oi in zip(w, outs)), merged
