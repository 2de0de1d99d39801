"""The fast torch kernel: ``F.scaled_dot_product_attention`` with key padding, and its log-sum-exp.

SDPA returns no log-sum-exp, so :func:`sdpa_attention` computes it, when asked (``merge="lse"``),
in a separate query-chunked pass over the scores (see docs/torch_core.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_ref.kernels.plain import finite_keys, poison_masked, stats_dtype

Tensor = torch.Tensor

# Bound on the float32 score elements one query chunk of the log-sum-exp pass materialises (64 MiB).
_LSE_CHUNK_ELEMENTS = 1 << 24


def _visibility(valid: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    """SDPA boolean mask for key validity ``(B, m)`` (and causality), and the ``(B, m)`` rows with no key.

    Rows with no visible key are opened to every key (so no kernel sees an all-False row, whose
    softmax is NaN); the caller sets their output to 0.
    """
    if is_causal:
        empty = valid.cumsum(dim=1) == 0  # query p sees no valid key among 0..p
        m = valid.shape[1]
        tril = torch.ones(m, m, dtype=torch.bool, device=valid.device).tril()
        mask = (tril & valid[:, None, :]) | empty[:, :, None]
        return mask[:, None], empty
    empty = ~valid.any(dim=1, keepdim=True)
    return (valid | empty)[:, None, None, :], empty.expand_as(valid)


def _chunked_lse(q: Tensor, k: Tensor, valid: Tensor | None, *, scale: float, is_causal: bool) -> Tensor:
    """Log-sum-exp ``(B, m, h)`` of the scaled, masked scores of ``q, k`` ``(B, m, h, d)``, chunked over queries.

    ``-inf`` for a row with no visible key. Only ``chunk x keys`` scores exist at a time (forward).
    """
    acc = stats_dtype(q.dtype)
    bsz, m, h, _ = q.shape
    chunk = max(1, min(m, _LSE_CHUNK_ELEMENTS // max(1, bsz * h * m)))
    hk = k.shape[2]
    # grouped-query heads: (B, h_kv, g, m, d) queries against (B, h_kv, 1, d, m) keys, broadcast, not repeated
    qt = (q.to(acc) * scale).reshape(bsz, m, hk, h // hk, -1).permute(0, 2, 3, 1, 4).contiguous()
    kt = k.to(acc).permute(0, 2, 3, 1)[:, :, None]
    pieces = []
    for a in range(0, m, chunk):
        e = min(m, a + chunk)
        hi = e if is_causal else m  # causal: keys beyond the chunk's last query are never visible
        s = torch.matmul(qt[:, :, :, a:e], kt[..., :hi]).reshape(bsz, h, e - a, hi)  # (B, h, c, hi)
        visible = None
        if is_causal:
            visible = torch.arange(a, e, device=q.device)[:, None] >= torch.arange(hi, device=q.device)[None, :]
            visible = visible[None, None]
        if valid is not None:
            kv = valid[:, None, None, :hi]
            visible = kv if visible is None else visible & kv
        if visible is None:
            pieces.append(torch.logsumexp(s, dim=-1))
            continue
        any_visible = visible.any(dim=-1)
        # Rows with no visible key: take the logsumexp of finite zeros (no NaN gradient), then -inf.
        s = s.masked_fill(~(visible | ~any_visible[..., None]), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        pieces.append(lse.masked_fill(~any_visible, float("-inf")))
    return torch.cat(pieces, dim=2).transpose(1, 2)


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    is_causal: bool,
    kv_valid: Tensor | None,
    dropout_p: float,
    need_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """SDPA on ``(B, m, h, d)`` queries and ``(B, m, h_kv, d)`` keys/values: out and lse or None.

    Strided views are fine. Grouped-query heads go to SDPA as they are (``enable_gqa``: query head
    ``j`` uses kv head ``j // (h / h_kv)``). ``kv_valid``: optional ``(B, m)`` boolean, False for keys
    nobody may see; a row with no visible key gets 0. ``need_lse``: also return the ``(B, m, h)``
    log-sum-exp (``-inf`` for such a row). Non-finite keys/values reach exactly the rows that see them.
    """
    k, v, bad = finite_keys(k, v)
    if scale == 0.0:  # SDPA's CPU kernel returns NaN for scale=0 under a causal mask: zero the scores via q
        q, scale = q * 0.0, 1.0
    mask, empty = None, None
    if kv_valid is not None:
        mask, empty = _visibility(kv_valid, is_causal)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal and mask is None,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    ).transpose(1, 2)  # (B, m, h, d)
    # A non-finite query makes its own row NaN when the row sees a key (as the plain form and JAX do);
    # SDPA's CPU kernel would return a finite row instead.
    bad_q = ~torch.isfinite(q).all(dim=-1)  # (B, m, h)
    if empty is not None:
        o = o.masked_fill(empty[:, :, None, None], 0.0)
        bad_q = bad_q & ~empty[:, :, None]
    o = o.masked_fill(bad_q[..., None], float("nan"))
    lse = _chunked_lse(q, k, kv_valid, scale=scale, is_causal=is_causal) if need_lse else None
    if lse is not None:  # as the plain kernel: a non-finite query's log-sum-exp is -inf
        lse = lse.masked_fill(bad_q, float("-inf"))
    return poison_masked(o, lse, bad, kv_valid, is_causal)
