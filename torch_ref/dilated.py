"""Standard and improved dilated attention (SPEC.md sections 1-3), both merges, and their nn.Modules.

The torch mirror of ``jax_dilated/dilated.py``. Both functions take ``q, k, v`` of shape
``(batch, seq, heads, head_dim)`` and return the same shape and dtype. They compute the same
function: ``dilated_attention`` is the readable form (index gather, attend, scatter) and
``improved_dilated_attention`` the fast one (strided views, one batched
``F.scaled_dot_product_attention`` call per branch, output assembled by padding).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref._config import Branch, DilatedConfig, check_dropout, check_key_padding_mask, check_qkv, default_scale
from torch_ref._softmax import attend, merge_lse, stats_dtype

Tensor = torch.Tensor

# Bound on the float32 score elements one query chunk of the improved lse pass materialises (64 MiB).
_LSE_CHUNK_ELEMENTS = 1 << 24


def validate(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
             merge: str, key_padding_mask: Tensor | None = None, dropout_p: float = 0.0) -> DilatedConfig:
    """Check the inputs against SPEC section 3 and return the hashable configuration."""
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    check_qkv(q, k, v)
    cfg.check_sequence(q.shape[1])
    cfg.check_heads(q.shape[2])
    check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[1])
    check_dropout(dropout_p)
    return cfg


def combine_branches(cfg: DilatedConfig, branches: tuple[Branch, ...], outs: list[Tensor], lses: list[Tensor | None]) -> Tensor:
    """Join per-branch results ``(b, n, heads_of_branch, d)`` into ``(b, n, h, d)`` per SPEC's merge rule."""
    if cfg.merge == "head_partition":
        return torch.cat(outs, dim=2).div_(cfg.num_groups)  # in place: cat's backward keeps no output
    group_outs, group_lses = [], []
    for i in range(cfg.num_groups):
        idx = [j for j, br in enumerate(branches) if br.group == i]
        heads = torch.tensor([hd for j in idx for hd in branches[j].heads])
        order = torch.argsort(heads).to(outs[0].device)
        group_outs.append(torch.cat([outs[j] for j in idx], dim=2).index_select(2, order))
        group_lses.append(torch.cat([lses[j] for j in idx], dim=2).index_select(2, order))
    return merge_lse(group_outs, group_lses)[0]


def _run(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, *, cfg: DilatedConfig,
         is_causal: bool, scale: float | None, dropout_p: float, attend_branch: Callable) -> Tensor:
    b, n, h, d = q.shape
    if n == 0:
        return torch.zeros_like(q)
    scale = default_scale(d, scale)
    branches = cfg.branches(h)
    need_lse = cfg.merge == "lse"
    outs, lses = [], []
    for br in branches:
        o, l = attend_branch(q, k, v, key_padding_mask, br, scale=scale, is_causal=bool(is_causal),
                             dropout_p=float(dropout_p), need_lse=need_lse)
        outs.append(o)
        lses.append(l)
    return combine_branches(cfg, branches, outs, lses).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Standard: explicit position indices, gather, attend, scatter.


def _standard_branch(q, k, v, key_padding_mask, br: Branch, *, need_lse: bool, **kw):
    # `attend` always returns the log-sum-exp, so `need_lse` (which spares improved an extra pass) costs
    # nothing here; the plain form always returns it.
    b, n, h, d = q.shape
    m = br.segment // br.rate
    nseg = n // br.segment
    starts = torch.arange(0, n, br.segment, device=q.device)
    pos = (starts[:, None] + br.offset + br.rate * torch.arange(m, device=q.device)[None, :]).reshape(-1)
    heads = torch.tensor(br.heads, device=q.device)

    def gather(x):
        return x.index_select(1, pos).index_select(2, heads).reshape(b * nseg, m, len(heads), d)

    valid = None
    if key_padding_mask is not None:
        valid = ~key_padding_mask.index_select(1, pos).reshape(b * nseg, m)
    o, l = attend(gather(q), gather(k), gather(v), kv_valid=valid, **kw)
    o = o.reshape(b, nseg * m, len(heads), d)
    l = l.reshape(b, nseg * m, len(heads))
    out = o.new_zeros(b, n, len(heads), d).index_copy(1, pos, o)
    lse = l.new_full((b, n, len(heads)), float("-inf")).index_copy(1, pos, l)
    return out, lse


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool = False,
    scale: float | None = None,
    merge: str = "head_partition",
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Dilated attention, the readable reference form (SPEC.md sections 1-2).

    Args:
      q, k, v: ``(b, n, h, d)``, one floating dtype. ``n`` must be a multiple of every segment length.
      segment_lengths: ``(s_0, ..., s_{G-1})``.
      dilation_rates: ``(r_0, ..., r_{G-1})``, each dividing its segment length.
      is_causal: kept position ``p`` sees kept positions ``p' <= p`` of its segment.
      scale: score scale, default ``1 / sqrt(d)``.
      merge: ``"head_partition"`` (heads split among groups, output divided by ``G``) or
        ``"lse"`` (every head sees every group, mixed by log-sum-exp weights).
      key_padding_mask: optional ``(b, n)`` boolean, True where the key is padding (the
        ``torch.nn.MultiheadAttention`` convention). Padded keys get exactly zero weight.
      dropout_p: dropout on the attention probabilities (0 disables it); draws from torch's
        default generator.

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q``.

    Example::

        q = k = v = torch.randn(1, 16, 4, 8)
        out = dilated_attention(q, k, v, segment_lengths=(8, 16), dilation_rates=(1, 2))
    """
    cfg = validate(q, k, v, segment_lengths, dilation_rates, merge, key_padding_mask, dropout_p)
    return _run(q, k, v, key_padding_mask, cfg=cfg, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                attend_branch=_standard_branch)


# ----------------------------------------------------------------------------------------------
# Improved: dilation as a strided view, all segments of a branch in one batched SDPA call.


def heads_slice(heads: tuple[int, ...]) -> slice:
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    return slice(heads[0], heads[-1] + 1, step)


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
    qt = (q.to(acc) * scale).transpose(1, 2).contiguous()  # (B, h, m, d)
    kt = k.to(acc).permute(0, 2, 3, 1).contiguous()  # (B, h, d, m)
    pieces = []
    for a in range(0, m, chunk):
        e = min(m, a + chunk)
        hi = e if is_causal else m  # causal: keys beyond the chunk's last query are never visible
        s = torch.matmul(qt[:, :, a:e], kt[..., :hi])  # (B, h, c, hi)
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


def improved_branch(q, k, v, key_padding_mask, br: Branch, *, scale: float, is_causal: bool, dropout_p: float,
                     need_lse: bool):
    b = q.shape[0]
    hs = heads_slice(br.heads)
    qd, kd, vd = (dilate(x[:, :, hs], br) for x in (q, k, v))  # (B, m, hg, d) strided views
    valid = None if key_padding_mask is None else ~dilate(key_padding_mask, br)
    mask, empty = None, None
    if valid is not None:
        mask, empty = _visibility(valid, is_causal)
    o = F.scaled_dot_product_attention(
        qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p,
        is_causal=is_causal and mask is None, scale=scale,
    ).transpose(1, 2)  # (B, m, hg, d)
    if empty is not None:
        o = o.masked_fill(empty[:, :, None, None], 0.0)
    lse = None
    if need_lse:
        lse = undilate(_chunked_lse(qd, kd, valid, scale=scale, is_causal=is_causal), br, b, float("-inf"))
    return undilate(o, br, b, 0.0), lse


def improved_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool = False,
    scale: float | None = None,
    merge: str = "head_partition",
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Dilated attention, fast form. Same arguments, shapes and result as :func:`dilated_attention`.

    Dilation is a strided view (no index gathers or copies), all segments of a branch go through one
    batched ``F.scaled_dot_product_attention`` call, and the output is assembled by padding, never
    by scatter. ``merge="lse"`` adds a query-chunked log-sum-exp pass per branch (see docs/torch_core.md).
    """
    cfg = validate(q, k, v, segment_lengths, dilation_rates, merge, key_padding_mask, dropout_p)
    return _run(q, k, v, key_padding_mask, cfg=cfg, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                attend_branch=improved_branch)


# ----------------------------------------------------------------------------------------------
# Modules.


class DilatedAttention(nn.Module):
    """Module form of :func:`dilated_attention` (no parameters).

    Args:
      segment_lengths, dilation_rates: the groups, validated on construction.
      scale: score scale, default ``1 / sqrt(head_dim)``.
      merge: ``"head_partition"`` or ``"lse"``.
      dropout: dropout on the attention probabilities, applied only in training mode.

    ``forward(q, k, v, is_causal=False, key_padding_mask=None)`` takes ``(b, n, h, d)`` tensors and
    returns ``(b, n, h, d)``.
    """

    _attention = staticmethod(dilated_attention)

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], *, scale: float | None = None,
                 merge: str = "head_partition", dropout: float = 0.0) -> None:
        super().__init__()
        cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
        check_dropout(dropout)
        self.segment_lengths = cfg.segment_lengths
        self.dilation_rates = cfg.dilation_rates
        self.merge = cfg.merge
        self.scale = None if scale is None else float(scale)
        self.dropout = float(dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                key_padding_mask: Tensor | None = None) -> Tensor:
        return self._attention(q, k, v, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                               is_causal=is_causal, scale=self.scale, merge=self.merge,
                               key_padding_mask=key_padding_mask, dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"merge={self.merge!r}, scale={self.scale}, dropout={self.dropout}")


class ImprovedDilatedAttention(DilatedAttention):
    """Module form of :func:`improved_dilated_attention`; same arguments as :class:`DilatedAttention`."""

    _attention = staticmethod(improved_dilated_attention)
