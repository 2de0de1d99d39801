"""The plain attention kernel of the torch mirror: scores, softmax and log-sum-exp, differentiable by autograd.

The readable form (every score of a call at once). The standard variant, ring attention and
block-sparse merges call it; statistics are kept in float32 (float64 for float64 inputs); rows
with no visible key give 0 and a log-sum-exp of ``-inf``.
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
