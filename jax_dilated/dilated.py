"""Standard and improved dilated attention (SPEC.md sections 1-3), both merges.

Both functions take ``q, k, v`` of shape ``(batch, seq, heads, head_dim)`` (the layout of
``jax.nn.dot_product_attention``) and return the same shape and dtype. They compute the same
function; ``dilated_attention`` is the readable form (index gather, attend, scatter) and
``improved_dilated_attention`` the fast one (strided reshapes, one batched call per branch,
query-blocked softmax).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_dilated._config import Branch, DilatedConfig, check_dropout, check_key_padding_mask, check_qkv, default_scale
from jax_dilated._softmax import merge_lse
from jax_dilated.kernels import Backend, attend, resolve

Array = jax.Array


def validate(q: Array, k: Array, v: Array, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
             merge: str, key_padding_mask: Array | None = None, dropout_rate: float = 0.0,
             dropout_rng: Array | None = None) -> DilatedConfig:
    """Check the inputs against SPEC section 3 and return the hashable configuration."""
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    check_qkv(q, k, v)
    cfg.check_sequence(q.shape[1])
    cfg.check_heads(q.shape[2])
    check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[1])
    check_dropout(dropout_rate, dropout_rng)
    return cfg


def combine_branches(cfg: DilatedConfig, branches: tuple[Branch, ...], outs: list[Array],
                     lses: list[Array]) -> Array:
    """Join per-branch results ``(b, n, heads_of_branch, d)`` into ``(b, n, h, d)`` per SPEC's merge rule."""
    if cfg.merge == "head_partition":
        return jnp.concatenate(outs, axis=2) / cfg.num_groups
    group_outs, group_lses = [], []
    for i in range(cfg.num_groups):
        idx = [j for j, br in enumerate(branches) if br.group == i]
        order = np.argsort(np.concatenate([branches[j].heads for j in idx]))
        group_outs.append(jnp.take(jnp.concatenate([outs[j] for j in idx], axis=2), order, axis=2))
        group_lses.append(jnp.take(jnp.concatenate([lses[j] for j in idx], axis=2), order, axis=2))
    return merge_lse(group_outs, group_lses)[0]


def _run(q, k, v, key_padding_mask, dropout_rng, *, cfg, is_causal, scale, dropout_rate, attend_branch, backend):
    b, n, h, d = q.shape
    if n == 0:
        return jnp.zeros_like(q)
    scale = default_scale(d, scale)
    branches = cfg.branches(h)
    outs, lses = [], []
    for idx, br in enumerate(branches):
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, idx)
        o, l = attend_branch(q, k, v, key_padding_mask, br, scale=scale, is_causal=is_causal,
                             dropout_rate=dropout_rate, dropout_rng=rng, implementation=backend)
        outs.append(o)
        lses.append(l)
    return combine_branches(cfg, branches, outs, lses).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Standard: explicit position indices, gather, attend, scatter.


def _standard_branch(q, k, v, key_padding_mask, br: Branch, **kw):
    b, n, h, d = q.shape
    m = br.segment // br.rate
    starts = np.arange(0, n, br.segment)
    pos = (starts[:, None] + br.offset + br.rate * np.arange(m)[None, :]).reshape(-1)  # (n/s * m,)
    heads = np.asarray(br.heads)

    def gather(x):
        return x[:, pos][:, :, heads].reshape(b * (n // br.segment), m, len(heads), d)

    valid = None
    if key_padding_mask is not None:
        valid = ~key_padding_mask[:, pos].reshape(b * (n // br.segment), m)
    o, l = attend(gather(q), gather(k), gather(v), kv_valid=valid, **kw)
    o = o.reshape(b, -1, len(heads), d)
    l = l.reshape(b, -1, len(heads))
    out = jnp.zeros((b, n, len(heads), d), o.dtype).at[:, pos].set(o)
    lse = jnp.full((b, n, len(heads)), -jnp.inf, l.dtype).at[:, pos].set(l)
    return out, lse


@functools.partial(jax.jit, static_argnames=("cfg", "is_causal", "scale", "dropout_rate"))
def _standard(q, k, v, key_padding_mask, dropout_rng, *, cfg, is_causal, scale, dropout_rate):
    return _run(q, k, v, key_padding_mask, dropout_rng, cfg=cfg, is_causal=is_causal, scale=scale,
                dropout_rate=dropout_rate, attend_branch=_standard_branch, backend=None)


def dilated_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool = False,
    scale: float | None = None,
    merge: str = "head_partition",
    key_padding_mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
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
      dropout_rate: dropout on the attention probabilities (0 disables it).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q``.

    Example::

        q = k = v = jnp.ones((1, 16, 4, 8))
        out = dilated_attention(q, k, v, segment_lengths=(8, 16), dilation_rates=(1, 2))
    """
    cfg = validate(q, k, v, segment_lengths, dilation_rates, merge, key_padding_mask, dropout_rate, dropout_rng)
    return _standard(q, k, v, key_padding_mask, dropout_rng, cfg=cfg, is_causal=bool(is_causal),
                     scale=None if scale is None else float(scale), dropout_rate=float(dropout_rate))


# ----------------------------------------------------------------------------------------------
# Improved: dilation as a reshape, all segments of a branch in one batched call.


def heads_slice(heads: tuple[int, ...]) -> slice:
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    return slice(heads[0], heads[-1] + 1, step)


def dilate(x: Array, br: Branch) -> Array:
    """``(b, n, ...)`` -> ``(b * n/s, s/r, ...)``: the kept positions of every segment of a branch."""
    b, n = x.shape[:2]
    x = x.reshape(b, n // br.rate, br.rate, *x.shape[2:])[:, :, br.offset]
    return x.reshape(b * (n // br.segment), br.segment // br.rate, *x.shape[2:])


def undilate(x: Array, br: Branch, batch: int, fill: float) -> Array:
    """Inverse of :func:`dilate`: ``(b * n/s, s/r, ...)`` -> ``(b, n, ...)`` with ``fill`` elsewhere."""
    rest = x.shape[2:]
    x = x.reshape(batch, -1, 1, *rest)
    pad = [(0, 0), (0, 0), (br.offset, br.rate - 1 - br.offset)] + [(0, 0)] * len(rest)
    x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(batch, -1, *rest)


def improved_branch(q, k, v, key_padding_mask, br: Branch, **kw):
    b = q.shape[0]
    hs = heads_slice(br.heads)
    valid = None if key_padding_mask is None else ~dilate(key_padding_mask, br)
    o, l = attend(dilate(q[:, :, hs], br), dilate(k[:, :, hs], br), dilate(v[:, :, hs], br), kv_valid=valid, **kw)
    return undilate(o, br, b, 0.0), undilate(l, br, b, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("cfg", "is_causal", "scale", "dropout_rate", "backend"))
def _improved(q, k, v, key_padding_mask, dropout_rng, *, cfg, is_causal, scale, dropout_rate, backend):
    return _run(q, k, v, key_padding_mask, dropout_rng, cfg=cfg, is_causal=is_causal, scale=scale,
                dropout_rate=dropout_rate, attend_branch=improved_branch, backend=backend)


def improved_dilated_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool = False,
    scale: float | None = None,
    merge: str = "head_partition",
    key_padding_mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | Backend | None = None,
) -> Array:
    """Dilated attention, fast form. Same arguments, shapes and result as :func:`dilated_attention`.

    Dilation is a strided reshape (no index gathers), all segments of a branch go through one
    batched attention call, and the output is assembled by padding, never by scatter.

    Args:
      implementation: the attention kernel (``jax_dilated.kernels``): None chooses, ``"xla"`` is
        the portable tiled kernel, ``jax_dilated.kernels.Xla(tiling=...)`` fixes its tiles.
    """
    cfg = validate(q, k, v, segment_lengths, dilation_rates, merge, key_padding_mask, dropout_rate, dropout_rng)
    backend = resolve(implementation)
    return _improved(q, k, v, key_padding_mask, dropout_rng, cfg=cfg, is_causal=bool(is_causal),
                     scale=None if scale is None else float(scale), dropout_rate=float(dropout_rate), backend=backend)
