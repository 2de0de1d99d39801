"""Standard and improved dilated attention (docs/semantics.md sections 1-3), both merges, and their nn.Modules.

The torch mirror of ``jax_dilated/dilated.py``. Both functions take ``q, k, v`` of shape
``(batch, seq, heads, head_dim)`` and return the same shape and dtype. They compute the same
function: ``dilated_attention`` is the readable form (index gather, attend, scatter) and
``improved_dilated_attention`` the fast one (strided views, one batched
``F.scaled_dot_product_attention`` call per branch, output assembled by padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dilated_plan import DilatedConfig, default_scale
from dilated_plan.checks import check_is_causal, check_scale
from torch_ref.branches import branch_attention, combine_branches
from torch_ref.checks import check_document_ids, check_dropout, check_key_padding_mask, check_qkv

Tensor = torch.Tensor


def validate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> DilatedConfig:
    """Check the inputs (docs/semantics.md section 3) and return the hashable configuration."""
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    check_qkv(q, k, v)
    cfg.check_heads(q.shape[2])
    check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[1])
    check_dropout(dropout_p)
    return cfg


def _run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    documents: Tensor | None,
    cfg: DilatedConfig,
    options: dict,
    plain: bool,
) -> Tensor:
    """Every branch, merged; ``options`` holds is_causal, scale and dropout_p.

    Packed documents run one at a time (the row's document boundaries are read on the host): each
    document is its own sequence under the any-length rule, which is what semantics section 10 says the
    packed call equals.
    """
    b, n, h, d = q.shape
    if 0 in q.shape:  # nothing to attend (empty batch, sequence, heads or head_dim)
        return torch.zeros_like(q)
    if documents is not None:
        out = torch.zeros_like(q)
        for row in range(b):
            ids = documents[row].tolist()
            cuts = [0] + [p for p in range(1, n) if ids[p] != ids[p - 1]] + [n]
            for a, e in zip(cuts[:-1], cuts[1:], strict=True):
                one = (slice(row, row + 1), slice(a, e))
                doc_mask = None if mask is None else mask[one]
                out[one] = _run(q[one], k[one], v[one], doc_mask, None, cfg, options, plain)
        return out
    kw: dict[str, Any] = dict(scale=default_scale(d, options["scale"]), is_causal=bool(options["is_causal"]))
    kw.update(dropout_p=float(options["dropout_p"]), need_lse=cfg.merge == "lse", plain=plain)
    branches = cfg.branches(h)
    results = [branch_attention(q, k, v, mask, br, **kw) for br in branches]
    return combine_branches(cfg, branches, [o for o, _ in results], [lse for _, lse in results]).to(q.dtype)


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
    document_ids: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Dilated attention, the readable form: :func:`jax_dilated.dilated_attention` on torch tensors.

    ``q, k, v`` ``(b, n, h, d)`` -> ``(b, n, h, d)`` in the dtype of ``q``; the arguments are those of
    the JAX function, with ``dropout_p`` (torch's default generator) for ``dropout_rate``/``dropout_rng``.

    >>> q = k = v = torch.randn(1, 16, 4, 8)
    >>> dilated_attention(q, k, v, segment_lengths=(8, 16), dilation_rates=(1, 2)).shape
    torch.Size([1, 16, 4, 8])
    """
    cfg = validate(q, k, v, segment_lengths, dilation_rates, merge, key_padding_mask, dropout_p)
    check_document_ids(document_ids, q.shape[0], q.shape[1])
    options: dict[str, Any] = dict(is_causal=check_is_causal(is_causal), scale=check_scale(scale), dropout_p=dropout_p)
    return _run(q, k, v, key_padding_mask, document_ids, cfg, options, plain=True)


# ----------------------------------------------------------------------------------------------
# Improved: dilation as a strided view, all segments of a branch in one batched SDPA call.


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
    document_ids: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Dilated attention, fast form. Same arguments, shapes and result as :func:`dilated_attention`.

    Dilation is a strided view (no index gathers or copies), all segments of a branch go through one
    batched ``F.scaled_dot_product_attention`` call, and the output is assembled by padding, never
    by scatter. ``merge="lse"`` adds a query-chunked log-sum-exp pass per branch (see docs/torch_core.md).

    >>> q = k = v = torch.randn(2, 32, 4, 8)
    >>> improved_dilated_attention(q, k, v, segment_lengths=(8, 32), dilation_rates=(1, 4), is_causal=True).shape
    torch.Size([2, 32, 4, 8])
    """
    cfg = validate(q, k, v, segment_lengths, dilation_rates, merge, key_padding_mask, dropout_p)
    check_document_ids(document_ids, q.shape[0], q.shape[1])
    options: dict[str, Any] = dict(is_causal=check_is_causal(is_causal), scale=check_scale(scale), dropout_p=dropout_p)
    return _run(q, k, v, key_padding_mask, document_ids, cfg, options, plain=False)


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

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        scale: float | None = None,
        merge: str = "head_partition",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
        check_dropout(dropout)
        self.segment_lengths = cfg.segment_lengths
        self.dilation_rates = cfg.dilation_rates
        self.merge = cfg.merge
        self.scale = None if scale is None else float(scale)
        self.dropout = float(dropout)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        return self._attention(
            q,
            k,
            v,
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            is_causal=is_causal,
            scale=self.scale,
            merge=self.merge,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"merge={self.merge!r}, scale={self.scale}, dropout={self.dropout}"
        )


class ImprovedDilatedAttention(DilatedAttention):
    """Module form of :func:`improved_dilated_attention`; same arguments as :class:`DilatedAttention`."""

    _attention = staticmethod(improved_dilated_attention)
