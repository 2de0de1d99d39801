"""Attention with its log-sum-exp in one pass on CUDA: ``torch.nn.attention.flex_attention``.

SDPA returns no log-sum-exp, so on the CPU ``merge="lse"`` pays a second, chunked pass over the
scores for it (:mod:`torch_ref.kernels.sdpa`). On CUDA, flex attention returns the natural-log
log-sum-exp from the same fused kernel, and autograd differentiates through it (torch >= 2.5), so
the log-sum-exp merge gets exact gradients without a score pass of its own. Flex attention has no
backward pass on the CPU, which is why the CPU keeps the SDPA path; :func:`flex_attention` still runs
forward there, which is how the tests check its masks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from torch_ref.kernels.plain import finite_keys, poison_masked

Tensor = torch.Tensor


@functools.cache
def _flex(compiled: bool) -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled once, on first use on CUDA (eager flex attention is a slow reference implementation).
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def available() -> bool:
    """Whether this torch has flex attention (2.5 and newer)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, is_causal: bool, kv_valid: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Softmax attention and its log-sum-exp on ``(B, m, h, d)`` queries and ``(B, mk, h_kv, d)`` keys.

    ``kv_valid`` optional ``(B, mk)`` boolean (False: nobody sees the key). Returns out ``(B, m, h, d)``
    in the inputs' dtype (0 for a row with no visible key) and lse ``(B, m, h)`` in float32
    (``-inf`` there); both carry gradients.
    """
    import torch.nn.attention.flex_attention as fa

    b, m, h, _ = q.shape
    mk = k.shape[1]
    device = q.device
    k, v, bad = finite_keys(k, v)  # a non-finite key/value reaches exactly the rows that see it

    def visible(batch, head, qi, ki):
        ok = ki <= qi if is_causal else ki >= 0
        return ok & kv_valid[batch, ki] if kv_valid is not None else ok

    block_mask = fa.create_block_mask(visible, b, None, m, mk, device=device)
    flex = _flex(q.is_cuda)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    kw: dict[str, Any] = dict(block_mask=block_mask, scale=scale, enable_gqa=k.shape[2] != h)
    request = getattr(fa, "AuxRequest", None)
    if request is not None:  # torch >= 2.9
        out, aux = flex(*args, return_aux=request(lse=True), **kw)
        lse = aux.lse
    else:
        out, lse = flex(*args, return_lse=True, **kw)
    out, lse = out.transpose(1, 2), lse.transpose(1, 2).float()
    # A row with no visible key: out 0 and lse -inf, whatever the kernel leaves there.
    seen = torch.ones(b, m, dtype=torch.bool, device=device)
    if kv_valid is not None:
        seen = (kv_valid.cumsum(dim=1)[:, :m] > 0) if is_causal else kv_valid.any(dim=1, keepdim=True).expand(b, m)
        if is_causal and mk < m:
            seen = torch.cat([seen, seen[:, -1:].expand(b, m - mk)], dim=1)
    out = out.masked_fill(~seen[:, :, None, None], 0.0)
    lse = lse.masked_fill(~seen[:, :, None], float("-inf"))
    # A non-finite query: its own row NaN, its log-sum-exp -inf (its scores count as no visible key), as
    # in the plain kernel and the JAX kernels.
    bad_q = ~torch.isfinite(q).all(dim=-1) & seen[:, :, None]
    out, lse = out.masked_fill(bad_q[..., None], float("nan")), lse.masked_fill(bad_q, float("-inf"))
    out, lse_p = poison_masked(out, lse, bad, kv_valid, is_causal)
    assert lse_p is not None
    return out, lse_p
