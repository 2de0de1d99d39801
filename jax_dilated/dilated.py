"""Standard and improved dilated attention (docs/semantics.md sections 1-3), both merges.

Both functions take ``q, k, v`` of shape ``(batch, seq, heads, head_dim)`` (the layout of
``jax.nn.dot_product_attention``) and return the same shape and dtype. They compute the same
function; :func:`dilated_attention` is the readable form (index gather, attend, scatter) and
:func:`improved_dilated_attention` the fast one (strided reshapes, one kernel call per branch,
output assembled by padding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from dilated_plan import DilatedConfig, default_scale
from dilated_plan.checks import check_dropout_rate, check_is_causal, check_scale
from jax_dilated.branches import Documents, Layout, branch_attention, combine_branches
from jax_dilated.checks import as_array, check_document_ids, check_dropout, check_key_padding_mask, check_qkv
from jax_dilated.kernels import Backend, resolve

Array = jax.Array


def validate(
    q: Array,
    k: Array,
    v: Array,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str,
    key_padding_mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> DilatedConfig:
    """Check the inputs (docs/semantics.md section 3) and return the hashable configuration."""
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    check_qkv(q, k, v)
    cfg.check_heads(q.shape[2])
    check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[1])
    check_dropout(dropout_rate, dropout_rng)
    return cfg


@dataclasses.dataclass(frozen=True)
class Call:
    """The static part of a call, normalised (hashable: one compiled program per distinct value)."""

    cfg: DilatedConfig
    is_causal: bool
    scale: float | None
    dropout_rate: float
    backend: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_causal", check_is_causal(self.is_causal))
        object.__setattr__(self, "scale", check_scale(self.scale))
        object.__setattr__(self, "dropout_rate", check_dropout_rate(self.dropout_rate))
        object.__setattr__(self, "backend", resolve(self.backend))


def run(q, k, v, key_padding_mask, document_ids, dropout_rng, call: Call, layout: Layout) -> Array:
    b, n, h, d = q.shape
    if 0 in q.shape:  # nothing to attend (empty batch, sequence, heads or head_dim)
        return jnp.zeros_like(q)
    scale = default_scale(d, call.scale)
    branches = call.cfg.branches(h)
    documents = None if document_ids is None else Documents.from_ids(document_ids)
    outs, lses = [], []
    for idx, br in enumerate(branches):
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, idx)
        kw: dict[str, Any] = dict(dropout_rate=call.dropout_rate, dropout_rng=rng, implementation=call.backend)
        kw.update(need_lse=call.cfg.merge == "lse", layout=layout, documents=documents)
        o, l = branch_attention(q, k, v, key_padding_mask, br, scale=scale, is_causal=call.is_causal, **kw)
        outs.append(o)
        lses.append(l)
    return combine_branches(call.cfg, branches, outs, lses).astype(q.dtype)


# Standard: explicit position indices, an index gather and a scatter into zeros. Improved: a strided
# reshape, put back by padding. Everything else (pieces, key/value buckets, kernel, merge) is shared.


@functools.partial(jax.jit, static_argnames=("call",))
def _standard(q, k, v, key_padding_mask, document_ids, dropout_rng, call: Call) -> Array:
    return run(q, k, v, key_padding_mask, document_ids, dropout_rng, call, Layout(strided=False))


@functools.partial(jax.jit, static_argnames=("call",))
def _improved(q, k, v, key_padding_mask, document_ids, dropout_rng, call: Call) -> Array:
    return run(q, k, v, key_padding_mask, document_ids, dropout_rng, call, Layout(strided=True))


def _checked(q, k, v, key_padding_mask, document_ids, dropout_rng, call: Call) -> tuple:
    """The arrays of a call of either form, validated against its configuration."""
    q, k, v = (as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    mask = as_array("key_padding_mask", key_padding_mask)
    docs = as_array("document_ids", document_ids)
    cfg = call.cfg
    validate(q, k, v, cfg.segment_lengths, cfg.dilation_rates, cfg.merge, mask, call.dropout_rate, dropout_rng)
    check_document_ids(docs, q.shape[0], q.shape[1])
    return q, k, v, mask, docs, dropout_rng


def dilated_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool = False,
    scale: float | None = None,
    merge: str = "head_partition",
    key_padding_mask: ArrayLike | None = None,
    document_ids: ArrayLike | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: ArrayLike | None = None,
    implementation: str | Backend | None = None,
) -> Array:
    """Dilated attention, the readable reference form (docs/semantics.md sections 1-2).

    Args:
      q: ``(b, n, h, d)``; k, v: ``(b, n, h_kv, d)``, one floating dtype; ``h`` a multiple of ``h_kv``
        (grouped-query attention: query head ``j`` uses key/value head ``j // (h / h_kv)``). Any ``n``:
        the last segment of each group is shorter when ``n`` is not a multiple of its length.
      segment_lengths: ``(s_0, ..., s_{G-1})``.
      dilation_rates: ``(r_0, ..., r_{G-1})``, each dividing its segment length.
      is_causal: kept position ``p`` sees kept positions ``p' <= p`` of its segment.
      scale: score scale, default ``1 / sqrt(d)``.
      merge: ``"head_partition"`` (heads split among groups, output divided by ``G``) or
        ``"lse"`` (every head sees every group, mixed by log-sum-exp weights).
      key_padding_mask: optional ``(b, n)`` boolean, True where the key is padding (the
        ``torch.nn.MultiheadAttention`` convention). Padded keys get exactly zero weight.
      document_ids: optional ``(b, n)`` integers packing several documents in a row: a document is a
        maximal run of equal ids; positions count from each document's start (the segment and
        dilation grid restarts there) and nothing is seen across documents, so the packed call equals
        each document run alone (semantics section 10).
      dropout_rate: dropout on the attention probabilities (0 disables it).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      implementation: the attention kernel (:mod:`jax_dilated.kernels`): None chooses for the
        platform, ``"xla"`` is the portable tiled kernel, ``jax_dilated.kernels.Xla(tiling=...)``
        fixes its tiles.

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q``.

    >>> q = k = v = jnp.ones((1, 16, 4, 8))
    >>> dilated_attention(q, k, v, segment_lengths=(8, 16), dilation_rates=(1, 2)).shape
    (1, 16, 4, 8)
    """
    call = Call(DilatedConfig(segment_lengths, dilation_rates, merge), is_causal, scale, dropout_rate, implementation)
    return _standard(*_checked(q, k, v, key_padding_mask, document_ids, dropout_rng, call), call)


def improved_dilated_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool = False,
    scale: float | None = None,
    merge: str = "head_partition",
    key_padding_mask: ArrayLike | None = None,
    document_ids: ArrayLike | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: ArrayLike | None = None,
    implementation: str | Backend | None = None,
) -> Array:
    """Dilated attention, fast form. Same arguments, shapes and result as :func:`dilated_attention`.

    Dilation is a strided reshape (no index gathers), all segments of a branch go through one
    kernel call, and the output is assembled by padding, never by scatter.

    >>> q = k = v = jnp.ones((2, 32, 4, 8), jnp.float32)
    >>> out = improved_dilated_attention(q, k, v, segment_lengths=(8, 32), dilation_rates=(1, 4), is_causal=True)
    >>> out.shape, out.dtype
    ((2, 32, 4, 8), dtype('float32'))
    """
    call = Call(DilatedConfig(segment_lengths, dilation_rates, merge), is_causal, scale, dropout_rate, implementation)
    return _improved(*_checked(q, k, v, key_padding_mask, document_ids, dropout_rng, call), call)
