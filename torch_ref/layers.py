"""Layers of the torch mirror that ``torch.nn`` does not have: positions and the rotary embedding.

The mirror of ``jax_dilated/layers.py`` (whose ``Linear`` and ``LayerNorm`` are ``torch.nn``'s own here).
"""

from __future__ import annotations

import torch

from torch_ref.kernels import stats_dtype

Tensor = torch.Tensor


def positions(batch: int, n: int, document_ids: Tensor | None = None, device=None) -> Tensor:
    """``(b, n)`` position of every token: ``0 .. n-1``, or counted from its document's start."""
    p = torch.arange(n, device=device).expand(batch, n)
    if document_ids is None or n == 0:
        return p
    new = torch.ones(batch, n, dtype=torch.bool, device=device)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return p - torch.cummax(torch.where(new, p, torch.zeros_like(p)), dim=1).values


def rotary(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """The rotary position embedding of ``x`` ``(b, n, h, d)`` (``d`` even) at positions ``pos`` ``(b, n)``.

    Channel pairs ``(i, i + d/2)`` rotate by ``pos * theta**(-2i/d)`` ("rotate half"), computed in float32
    (float64 for float64) and cast back.

    >>> rotary(torch.ones(1, 3, 2, 4), positions(1, 3), 10000.0).shape
    torch.Size([1, 3, 2, 4])
    """
    d = x.shape[-1]
    acc = stats_dtype(x.dtype)
    half = d // 2
    freqs = torch.tensor(theta, dtype=acc) ** (-torch.arange(half, dtype=acc) * 2 / d)
    angles = pos.to(acc)[..., None] * freqs.to(x.device)  # (b, n, d/2)
    cos, sin = torch.cos(angles)[:, :, None, :], torch.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].to(acc), x[..., half:].to(acc)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
