"""Input checks of the torch package: the shared plan's checks (:mod:`dilated_plan.checks`) on tensors."""

from __future__ import annotations

from typing import Any

import torch

from dilated_plan import checks as plan_checks
from dilated_plan.checks import check_dropout_rate


def _is_floating(x: torch.Tensor) -> bool:
    return torch.is_floating_point(x)


def _is_bool(x: torch.Tensor) -> bool:
    return x.dtype == torch.bool


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise unless q, k, v are 4-D ``(b, n, h, d)`` tensors of one shape and one floating dtype."""
    plan_checks.check_qkv(q, k, v, _is_floating)


def check_key_padding_mask(mask: torch.Tensor | None, batch: int, n: int) -> None:
    """Raise unless ``mask`` is None or a boolean ``(batch, n)`` tensor (True = padding)."""
    plan_checks.check_key_padding_mask(mask, batch, n, _is_bool)


def check_dropout(rate: Any) -> float:
    """``rate`` as a float if it is in ``[0, 1)`` (torch draws from its default generator)."""
    return check_dropout_rate(rate)


def check_module_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None, embed_dim: int
) -> None:
    """Raise unless query/key/value are ``(b, n, embed_dim)`` floating tensors and the mask fits them."""
    plan_checks.check_module_inputs(query, key, value, embed_dim, _is_floating)
    check_key_padding_mask(key_padding_mask, query.shape[0], query.shape[1])


def check_document_ids(ids: torch.Tensor | None, batch: int, n: int) -> None:
    """Raise unless ``ids`` is None or an integer ``(batch, n)`` tensor."""
    plan_checks.check_document_ids(
        ids, batch, n, lambda x: not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    )
