"""The float64 NumPy reference of docs/semantics.md: the slowest, plainest statement of what is computed.

Explicit per-head position masks, one dense softmax per head, plain loops. Tests only.
"""

from __future__ import annotations

import numpy as np


def group_sizes(h: int, g: int) -> list[int]:
    """Semantics 2.1: ``h // g`` heads per group, one more for the first ``h % g`` groups."""
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


def document_runs(n: int, document_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the index of its document (a maximal run of equal ids) and the run's first position."""
    p = np.arange(n)
    if document_ids is None:
        return np.zeros(n, int), np.zeros(n, int)
    ids = np.asarray(document_ids)
    new = np.ones(n, bool)
    new[1:] = ids[1:] != ids[:-1]
    run = np.cumsum(new) - 1
    start = np.maximum.accumulate(np.where(new, p, 0))
    return run, start


def branch_mask(n, segment, rate, offset, is_causal, key_padding=None, document_ids=None):
    """``(n, n)`` allowed matrix of one (segment, rate, offset) and the ``(n,)`` kept positions.

    Positions count from the start of their document (the whole row without ``document_ids``):
    ``rel = p - start``. Query ``p`` sees key ``p'`` when both are kept (``(rel mod s) mod r == o``),
    they are in the same document and the same segment of it (``rel // s``), the key is not padding,
    and ``p' <= p`` if causal.
    """
    p = np.arange(n)
    run, start = document_runs(n, document_ids)
    rel = p - start
    kept = (rel % segment) % rate == offset
    same_segment = (run[:, None] == run[None, :]) & ((rel[:, None] // segment) == (rel[None, :] // segment))
    allowed = same_segment & kept[:, None] & kept[None, :]
    if is_causal:
        allowed &= p[None, :] <= p[:, None]
    if key_padding is not None:
        allowed &= ~key_padding[None, :]
    return allowed, kept


def dilated_attention(q, k, v, segment_lengths, dilation_rates, is_causal=False, scale=None,
                      merge="head_partition", key_padding_mask=None, document_ids=None):
    """Semantics sections 1-2 and 10 in float64. q ``(b, n, h, d)``, k, v ``(b, n, h_kv, d)`` (query head
    ``j`` uses kv head ``j // (h / h_kv)``); any ``n``; key_padding_mask ``(b, n)``, True = padding;
    document_ids ``(b, n)`` integers (a document is a maximal run of equal ids)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, n, h, d = q.shape
    group = h // k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    g = len(segment_lengths)
    out = np.zeros_like(q)
    for bi in range(b):
        pad = None if key_padding_mask is None else np.asarray(key_padding_mask[bi], dtype=bool)
        docs = None if document_ids is None else document_ids[bi]

        def head(hj, allowed):
            return masked_softmax_attention(q[bi, :, hj], k[bi, :, hj // group], v[bi, :, hj // group], allowed,
                                            scale)

        if merge == "head_partition":
            start = 0
            for i, size in enumerate(group_sizes(h, g)):
                s, r = segment_lengths[i], dilation_rates[i]
                allowed, kept = branch_mask(n, s, r, i % r, is_causal, pad, docs)
                for hj in range(start, start + size):
                    o, _ = head(hj, allowed)
                    o[~kept] = 0.0
                    out[bi, :, hj] = o / g
                start += size
        elif merge == "lse":
            for hj in range(h):
                outs, lses = [], []
                for s, r in zip(segment_lengths, dilation_rates):
                    allowed, _ = branch_mask(n, s, r, hj % r, is_causal, pad, docs)
                    o, l = head(hj, allowed)
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
