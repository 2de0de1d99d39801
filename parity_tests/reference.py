"""The float64 NumPy reference of SPEC.md: the slowest, plainest statement of what is computed.

Explicit per-head position masks, one dense softmax per head, plain loops. Tests only.
"""

from __future__ import annotations

import numpy as np


def group_sizes(h: int, g: int) -> list[int]:
    """SPEC 1.1: ``h // g`` heads per group, one more for the first ``h % g`` groups."""
    return [h // g + (1 if i < h % g else 0) for i in range(g)]


def kept_positions(n: int, segment: int, rate: int, offset: int) -> np.ndarray:
    """Boolean ``(n,)``: position ``p`` is kept iff ``(p mod segment) mod rate == offset``."""
    p = np.arange(n)
    return (p % segment) % rate == offset


def masked_softmax_attention(q, k, v, allowed, scale):
    """Dense attention of one head. q,k,v ``(n, d)``, allowed ``(n, n)`` bool -> (out ``(n, d)``, lse ``(n,)``).

    A row with no allowed key gives out 0 and lse -inf.
    """
    s = np.where(allowed, scale * (q @ k.T), -np.inf)
    has_key = allowed.any(axis=1)
    top = np.where(has_key, s.max(axis=1, initial=-np.inf), 0.0)
    w = np.exp(s - top[:, None])  # exactly 0 where not allowed
    total = w.sum(axis=1)
    safe = np.where(has_key, total, 1.0)
    out = (w / safe[:, None]) @ v
    lse = np.where(has_key, top + np.log(safe), -np.inf)
    return out, lse


def branch_mask(n, segment, rate, offset, is_causal, key_padding=None):
    """``(n, n)`` allowed matrix of one (segment, rate, offset): same segment, both kept, causal, not padded."""
    p = np.arange(n)
    kept = kept_positions(n, segment, rate, offset)
    same_segment = (p[:, None] // segment) == (p[None, :] // segment)
    allowed = same_segment & kept[:, None] & kept[None, :]
    if is_causal:
        allowed &= p[None, :] <= p[:, None]
    if key_padding is not None:
        allowed &= ~key_padding[None, :]
    return allowed, kept


def dilated_attention(q, k, v, segment_lengths, dilation_rates, is_causal=False, scale=None,
                      merge="head_partition", key_padding_mask=None):
    """SPEC sections 1-2 in float64. q, k, v ``(b, n, h, d)``; key_padding_mask ``(b, n)``, True = padding."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, n, h, d = q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    g = len(segment_lengths)
    out = np.zeros_like(q)
    for bi in range(b):
        pad = None if key_padding_mask is None else np.asarray(key_padding_mask[bi], dtype=bool)
        if merge == "head_partition":
            start = 0
            for i, size in enumerate(group_sizes(h, g)):
                s, r = segment_lengths[i], dilation_rates[i]
                allowed, kept = branch_mask(n, s, r, i % r, is_causal, pad)
                for hj in range(start, start + size):
                    o, _ = masked_softmax_attention(q[bi, :, hj], k[bi, :, hj], v[bi, :, hj], allowed, scale)
                    o[~kept] = 0.0
                    out[bi, :, hj] = o / g
                start += size
        elif merge == "lse":
            for hj in range(h):
                outs, lses = [], []
                for s, r in zip(segment_lengths, dilation_rates):
                    allowed, _ = branch_mask(n, s, r, hj % r, is_causal, pad)
                    o, l = masked_softmax_attention(q[bi, :, hj], k[bi, :, hj], v[bi, :, hj], allowed, scale)
                    outs.append(o)
                    lses.append(l)
                lse = np.stack(lses)  # (G, n)
                top = lse.max(axis=0)
                safe_top = np.where(np.isfinite(top), top, 0.0)
                w = np.exp(lse - safe_top)
                tot = w.sum(axis=0)
                w = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 0.0)
                out[bi, :, hj] = sum(w[i][:, None] * outs[i] for i in range(g))
        else:
            raise ValueError(merge)
    return out


def dense_attention(q, k, v, is_causal=False, scale=None, allowed=None):
    """Plain softmax attention in float64. q,k,v ``(b, n, h, d)``; allowed optional ``(n, n)`` bool."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, n, h, d = q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    mask = np.ones((n, n), bool) if allowed is None else allowed.copy()
    if is_causal:
        mask &= np.tril(np.ones((n, n), bool))
    out = np.zeros_like(q)
    for bi in range(b):
        for hj in range(h):
            out[bi, :, hj], _ = masked_softmax_attention(q[bi, :, hj], k[bi, :, hj], v[bi, :, hj], mask, scale)
    return out
