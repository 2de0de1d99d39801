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


def finite_keys(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(k, v)`` with non-finite keys/values zeroed, and the ``(B, mk, h_kv)`` mask of those keys.

    The mirror of the JAX kernel's rule (semantics section 11): a non-finite key or value reaches
    exactly the rows that see it; zeroing it first keeps it from any row that does not.
    """
    bad = ~(torch.isfinite(k).all(dim=-1) & torch.isfinite(v).all(dim=-1))
    return k.masked_fill(bad[..., None], 0.0), v.masked_fill(bad[..., None], 0.0), bad


def poison(out: Tensor, lse: Tensor | None, visible: Tensor | None, bad: Tensor) -> tuple[Tensor, Tensor | None]:
    """NaN in the rows of ``out`` ``(B, m, h, d)`` (and ``lse`` ``(B, m, h)``) that see a key marked in ``bad``.

    ``visible`` broadcasts to ``(B, 1, m, mk)`` (None: every key visible); ``bad`` is ``(B, mk, h_kv)``;
    query head ``j`` uses kv head ``j // (h / h_kv)``.
    """
    if not bool(bad.any()):
        return out, lse
    b, m, h, _ = out.shape
    bad_h = bad.repeat_interleave(h // bad.shape[2], dim=2).permute(0, 2, 1)[:, :, None, :]  # (B, h, 1, mk)
    seen = bad_h if visible is None else visible & bad_h
    rows = seen.any(dim=-1).transpose(1, 2)  # (B, m, h)
    out = out.masked_fill(rows[..., None], float("nan"))
    return out, None if lse is None else lse.masked_fill(rows, float("nan"))


def poison_masked(
    out: Tensor, lse: Tensor | None, bad: Tensor, kv_valid: Tensor | None, is_causal: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`poison` for a call whose visibility is causal and/or ``(B, mk)`` valid keys (SDPA, flex)."""
    if not bool(bad.any()):
        return out, lse
    m, mk = out.shape[1], bad.shape[1]
    visible = torch.ones(m, mk, dtype=torch.bool, device=out.device).tril()[None, None] if is_causal else None
    if kv_valid is not None:
        visible = kv_valid[:, None, None, :] if visible is None else visible & kv_valid[:, None, None, :]
    return poison(out, lse, visible, bad)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    kv_valid: Tensor | None = None,
    dropout_p: float = 0.0,
    q_ids: Tensor | None = None,
    kv_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of every query over every key, with its log-sum-exp.

    Args:
      q: ``(B, m, h, d)`` queries.
      k, v: ``(B, mk, h_kv, d)`` keys and values, ``h`` a multiple of ``h_kv`` (query head ``j`` uses
        kv head ``j // (h / h_kv)``; k and v are not repeated).
      scale: multiplies the scores ``q . k``.
      is_causal: query ``p`` sees key ``p' <= p`` (top-left aligned).
      kv_valid: optional ``(B, mk)`` boolean, False for keys nobody may see.
      dropout_p: probability of dropping an attention weight (weights rescaled by
        ``1 / (1 - dropout_p)``; the log-sum-exp is that of the undropped weights).
      q_ids, kv_ids: optional ``(B, m)`` and ``(B, mk)`` integers, given together: query ``i`` sees
        key ``j`` only when ``q_ids[i] == kv_ids[j]`` (runs of packed documents in one row).

    Returns:
      ``out`` ``(B, m, h, d)`` in the statistics dtype (0 for a row with no visible key) and
      ``lse`` ``(B, m, h)``, the log-sum-exp of the row's scaled scores (``-inf`` for such a row).
    """
    acc = stats_dtype(q.dtype)
    b, m, h, d = q.shape
    mk, hk = k.shape[1], k.shape[2]
    k, v, bad = finite_keys(k, v)
    qg = q.to(acc).reshape(b, m, hk, h // hk, d)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)).reshape(b, h, m, mk) * scale
    visible = None
    if is_causal:
        visible = torch.ones(m, mk, dtype=torch.bool, device=q.device).tril()[None, None]
    if kv_valid is not None:
        kv = kv_valid[:, None, None, :]
        visible = kv if visible is None else visible & kv
    if q_ids is not None and kv_ids is not None:
        same = q_ids[:, None, :, None] == kv_ids[:, None, None, :]
        visible = same if visible is None else visible & same
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
    pg = (p / safe).reshape(b, hk, h // hk, m, mk)
    out = torch.einsum("bhgqk,bkhd->bqhgd", pg, v.to(acc)).reshape(b, m, h, d)
    lse = torch.where(has_key, torch.log(safe) + row_max, torch.full((), float("-inf"), dtype=acc, device=q.device))
    out, lse_t = poison(out, lse[..., 0].transpose(1, 2), visible, bad)
    assert lse_t is not None
    return out, lse_t
