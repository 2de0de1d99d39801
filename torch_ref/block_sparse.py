"""Block-sparse attention (docs/semantics.md section 5), the torch mirror of ``jax_dilated.block_sparse``.

:func:`block_layout` (from :mod:`dilated_plan.blocks`, re-exported) says which key blocks each query
block keeps; :func:`block_sparse_attention` gathers the kept key/value blocks of every query block
and runs one exact softmax over all their keys, so its cost is ``O(n * k * block_size)``, never
``O(n^2)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dilated_plan import block_layout, block_tables, check_block_options, default_scale
from dilated_plan.blocks import chunk_blocks
from dilated_plan.checks import check_is_causal, check_scale
from torch_ref.checks import check_dropout, check_key_padding_mask, check_qkv
from torch_ref.kernels.plain import finite_keys, poison

Tensor = torch.Tensor

# Score elements (batch x heads x queries x keys) one step of the loop over query blocks may hold.
_CHUNK_SCORES = 1 << 23

__all__ = ["BlockSparseDilatedAttention", "block_layout", "block_sparse_attention"]


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 128,
    pattern: str = "dilated_sparse",
    sparsity_ratio: float = 0.9,
    global_blocks: int = 1,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact softmax attention restricted to a block layout (docs/semantics.md section 5).

    Each query attends to every key of the key blocks its row of :func:`block_layout` keeps, with
    one joint softmax; with ``is_causal`` also key ``<=`` query inside the diagonal block. Only the
    kept blocks are gathered and scored: time and memory are ``O(n * k * block_size)``.

    Args:
      q: ``(b, n, h, d)``; k, v: ``(b, n, h_kv, d)`` (grouped-query heads), one floating dtype; any ``n``
        (the last block is shorter).
      block_size: tokens per block.
      pattern: ``"local_window"``, ``"dilated_sparse"`` or ``"global_local"``.
      sparsity_ratio: fraction of key blocks each query block drops, in ``[0, 1)``.
      global_blocks: leading key blocks kept first under ``"global_local"`` (>= 0).
      is_causal: query ``p`` sees key ``p' <= p`` only (top-left aligned).
      scale: score scale, default ``1 / sqrt(d)``.
      key_padding_mask: optional ``(b, n)`` boolean, True where the key is padding.
      dropout_p: dropout on the attention probabilities (torch's default generator; 0 disables it).

    Returns:
      ``(b, n, h, d)`` in the dtype of ``q``; a query with no visible key gets 0.

    >>> q = k = v = torch.ones(1, 1024, 4, 32)
    >>> block_sparse_attention(q, k, v, block_size=128, sparsity_ratio=0.75).shape
    torch.Size([1, 1024, 4, 32])
    """
    check_qkv(q, k, v)
    check_block_options(block_size, pattern, sparsity_ratio, global_blocks)
    check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[1])
    check_dropout(dropout_p)
    is_causal, scale = check_is_causal(is_causal), check_scale(scale)
    b, n, h, d = q.shape
    hk = k.shape[2]
    if 0 in q.shape:
        return torch.zeros_like(q)
    scale = default_scale(d, scale)
    bs = int(block_size)
    nb = -(-n // bs)  # any n: the last block is shorter (its missing positions are masked keys)
    extra = nb * bs - n
    k, v, bad = finite_keys(k, v)  # a non-finite key/value reaches exactly the rows that see it
    tables = block_tables(nb, pattern, float(sparsity_ratio), int(global_blocks), bool(is_causal))
    index, valid, diagonal, width = tables.index, tables.valid, tables.diagonal, tables.width
    c = chunk_blocks(nb, b * h * bs * bs * (width + int(bool(is_causal))), _CHUNK_SCORES)
    dev = q.device
    index_t = torch.as_tensor(index.astype(np.int64), device=dev)
    kept_t = torch.as_tensor(np.repeat(valid, bs, axis=1), device=dev)  # (nb, width * bs)
    causal_t = None
    if is_causal:  # (nb, bs, bs): element-wise causal inside the diagonal block, if the row keeps it
        tril = torch.ones(bs, bs, dtype=torch.bool, device=dev).tril()
        causal_t = tril[None] & torch.as_tensor(diagonal.copy(), device=dev)[:, None, None]
    pad = lambda x, fill=0.0: F.pad(x, (0, 0) * (x.ndim - 2) + (0, extra), value=fill) if extra else x  # noqa: E731
    qb = pad(q).reshape(b, nb, bs, h, d)
    kb, vb = (pad(x).reshape(b, nb, bs, hk, d) for x in (k, v))
    badb = pad(bad, False).reshape(b, nb, bs, hk)
    visible = None
    if key_padding_mask is not None or extra:
        keys_ok = torch.ones(b, n, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
        visible = pad(keys_ok, False).reshape(b, nb, bs)
    out = q.new_empty((b, nb, bs, h, d))
    for start in range(0, nb, c):  # query blocks [start, start + c)
        own = slice(start, start + c)
        idx = index_t[own].reshape(-1)

        def gather(x, idx=idx):  # the kept (off-diagonal when causal) key blocks of each query block
            return x.index_select(1, idx).reshape(b * c, width * bs, *x.shape[3:])

        keys, values, bad_keys = gather(kb), gather(vb), gather(badb)
        mask = None
        if visible is not None or not valid[own].all():  # (b * c, 1, 1, width * bs)
            mask = kept_t[own][None].expand(b, c, width * bs)
            if visible is not None:
                mask = mask & gather(visible).reshape(b, c, width * bs)
            mask = mask.reshape(b * c, 1, 1, width * bs)
        if is_causal:  # append the diagonal block with its element mask (b * c, 1, bs, bs)
            keys = torch.cat([keys, kb[:, own].reshape(b * c, bs, hk, d)], dim=1)
            values = torch.cat([values, vb[:, own].reshape(b * c, bs, hk, d)], dim=1)
            bad_keys = torch.cat([bad_keys, badb[:, own].reshape(b * c, bs, hk)], dim=1)
            assert causal_t is not None
            diag = causal_t[own][None].expand(b, c, bs, bs)
            if visible is not None:
                diag = diag & visible[:, own, None, :]
            off = torch.ones(b * c, 1, 1, width * bs, dtype=torch.bool, device=dev) if mask is None else mask
            mask = torch.cat([off.expand(b * c, 1, bs, width * bs), diag.reshape(b * c, 1, bs, bs)], dim=-1)
        empty = None
        if mask is not None:  # rows with no visible key are opened to all keys, then set to 0
            empty = ~mask.any(dim=-1, keepdim=True)
            mask = mask | empty
        queries = qb[:, own].reshape(b * c, bs, h, d)
        o = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask,
            dropout_p=dropout_p,
            scale=scale,
            enable_gqa=hk != h,
        )  # (b * c, h, bs, d)
        if empty is not None:
            o = o.masked_fill(empty.expand(b * c, 1, bs, 1), 0.0)
        seen = None if mask is None or empty is None else mask & ~empty
        o, _ = poison(o.transpose(1, 2), None, seen, bad_keys)
        out[:, own] = o.reshape(b, c, bs, h, d)
    return out.reshape(b, nb * bs, h, d)[:, :n]


class BlockSparseDilatedAttention(nn.Module):
    """Module form of :func:`block_sparse_attention` (no parameters).

    Args:
      block_size, pattern, sparsity_ratio, global_blocks: the layout options, validated on construction
        (any sequence length: the last block is shorter).
      scale: score scale, default ``1 / sqrt(head_dim)``.
      dropout: dropout on the attention probabilities, applied only in training mode.

    ``forward(q, k, v, is_causal=False, key_padding_mask=None)`` takes ``(b, n, h, d)`` tensors and
    returns ``(b, n, h, d)``.
    """

    def __init__(
        self,
        block_size: int = 128,
        pattern: str = "dilated_sparse",
        sparsity_ratio: float = 0.9,
        global_blocks: int = 1,
        *,
        scale: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_block_options(block_size, pattern, sparsity_ratio, global_blocks)
        check_dropout(dropout)
        self.block_size = int(block_size)
        self.pattern = pattern
        self.sparsity_ratio = float(sparsity_ratio)
        self.global_blocks = int(global_blocks)
        self.scale = None if scale is None else float(scale)
        self.dropout = float(dropout)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        return block_sparse_attention(
            q,
            k,
            v,
            block_size=self.block_size,
            pattern=self.pattern,
            sparsity_ratio=self.sparsity_ratio,
            global_blocks=self.global_blocks,
            is_causal=is_causal,
            scale=self.scale,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, pattern={self.pattern!r}, sparsity_ratio={self.sparsity_ratio}, "
            f"global_blocks={self.global_blocks}, scale={self.scale}, dropout={self.dropout}"
        )
