"""Exact key/value-cache decoding of dilated attention (docs/semantics.md section 12).

The torch mirror of ``jax_dilated/decode.py``: the row decoded at position ``t`` equals row ``t`` of the
full causal forward over the tokens seen so far. ``index`` is a Python int here, so a step slices
exactly the keys it needs: one new position reads, per branch, the kept keys of its segment up to
``t``; a chunk of ``T > 1`` positions runs the causal forward from the last multiple of
``lcm(segment_lengths)`` at or before the chunk (a segment boundary of every group).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from dilated_plan import DilatedConfig, default_scale
from dilated_plan.checks import check_scale
from dilated_plan.config import kv_buckets
from torch_ref.branches import _heads, combine_branches
from torch_ref.dilated import _run
from torch_ref.kernels import stats_dtype
from torch_ref.kernels.plain import attend

Tensor = torch.Tensor


@dataclasses.dataclass
class KVCache:
    """The key/value cache of one attention layer, advanced in place by each decoding call.

    Attributes:
      key, value: ``(b, max_length, h_kv, d)``.
      index: positions decoded so far (the next one's position).
    """

    key: Tensor
    value: Tensor
    index: int = 0

    @property
    def max_length(self) -> int:
        return self.key.shape[1]


def _one_position(q: Tensor, cached_key: Tensor, cached_value: Tensor, index: int, cfg: DilatedConfig, scale) -> Tensor:
    b, _, h, d = q.shape
    scale = default_scale(d, scale)
    group = h // cached_key.shape[2]
    acc = stats_dtype(q.dtype)
    branches = cfg.branches(h)
    outs: list[Tensor] = []
    lses: list[Tensor | None] = []
    for br in branches:
        start = index - index % br.segment
        if (index - start) % br.rate != br.offset:  # off the grid: the row sees nothing
            outs.append(q.new_zeros((b, 1, len(br.heads), d), dtype=acc))
            lses.append(q.new_full((b, 1, len(br.heads)), float("-inf"), dtype=acc))
            continue
        keys = cached_key[:, start + br.offset : index + 1 : br.rate]  # the kept keys up to index
        values = cached_value[:, start + br.offset : index + 1 : br.rate]
        o_parts, l_parts, order = [], [], list[int]()
        for bucket in kv_buckets(br.heads, group):
            o, l = attend(
                _heads(q, bucket.query_heads),
                _heads(keys, bucket.kv_heads),
                _heads(values, bucket.kv_heads),
                scale=scale,
            )
            o_parts.append(o)
            l_parts.append(l)
            order.extend(bucket.query_heads)
        back = torch.argsort(torch.tensor(order, device=q.device))
        outs.append(torch.cat(o_parts, dim=2).index_select(2, back))
        lses.append(torch.cat(l_parts, dim=2).index_select(2, back))
    return combine_branches(cfg, branches, outs, lses)


def _check(q: Tensor, k: Tensor, v: Tensor, cached_key: Tensor, cached_value: Tensor, cfg: DilatedConfig, index) -> int:
    for name, x in (("q", q), ("k", k), ("v", v), ("cached_key", cached_key), ("cached_value", cached_value)):
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"{name} should be a floating (b, n, h, d) tensor, got {type(x).__name__} {getattr(x, 'shape', '')}."
            )
    b, t, h, d = q.shape
    if k.shape != v.shape or tuple(k.shape[:2]) != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit: k and v should be "
            f"(b, T, h_kv, d) = ({b}, {t}, h_kv, {d}) with h_kv dividing h = {h}."
        )
    if (
        cached_key.shape != cached_value.shape
        or tuple(cached_key.shape[::2]) != (b, k.shape[2])
        or cached_key.shape[3] != d
    ):
        raise ValueError(
            f"cached_key {tuple(cached_key.shape)} and cached_value {tuple(cached_value.shape)} should both be "
            f"(b, max_length, h_kv, d) = ({b}, max_length, {k.shape[2]}, {d})."
        )
    cfg.check_heads(h)
    length = cfg.check_cache_length(cached_key.shape[1])
    if t == 0 or t > length:
        raise ValueError(f"q holds {t} new positions; decode 1 to max_length={length} at a time.")
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index={index!r} should be a Python int.")
    if index < 0 or index + t > length:
        raise ValueError(
            f"index={index} with {t} new positions overflows the cache of max_length={length}; "
            f"use a longer cache (init_cache) or index <= {length - t}."
        )
    return index


def dilated_attention_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cached_key: Tensor,
    cached_value: Tensor,
    index: int,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    scale: float | None = None,
    merge: str = "head_partition",
) -> tuple[Tensor, Tensor, Tensor]:
    """One decoding step of causal dilated attention: :func:`jax_dilated.dilated_attention_decode` in torch.

    Writes ``k``/``v`` ``(b, T, h_kv, d)`` into ``cached_key``/``cached_value`` ``(b, max_length, h_kv, d)``
    at ``[index, index + T)`` **in place** and returns ``(out, cached_key, cached_value)``, ``out``
    ``(b, T, h, d)`` equal to rows ``index .. index+T-1`` of the causal
    :func:`torch_ref.dilated_attention` over everything cached. ``max_length`` must be a multiple of
    ``lcm(segment_lengths)``; ``index`` is a Python int.

    >>> cache = torch.zeros(1, 16, 2, 8), torch.zeros(1, 16, 2, 8)
    >>> x = torch.ones(1, 1, 2, 8)
    >>> dilated_attention_decode(x, x, x, *cache, 0, segment_lengths=(4, 8), dilation_rates=(1, 2))[0].shape
    torch.Size([1, 1, 2, 8])
    """
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    scale = check_scale(scale)
    index = _check(q, k, v, cached_key, cached_value, cfg, index)
    t, dtype = q.shape[1], q.dtype
    cached_key[:, index : index + t] = k
    cached_value[:, index : index + t] = v
    q = q.to(cached_key.dtype)
    if t == 1:
        out = _one_position(q, cached_key, cached_value, index, cfg, scale)
    else:
        start = index - index % cfg.period
        keys, values = cached_key[:, start : index + t], cached_value[:, start : index + t]
        queries = q.new_zeros((q.shape[0], index + t - start, *q.shape[2:]))
        queries[:, index - start :] = q
        options = dict(is_causal=True, scale=scale, dropout_p=0.0)
        out = _run(queries, keys, values, None, None, cfg, options, plain=False)[:, index - start :]
    return out.to(dtype), cached_key, cached_value
