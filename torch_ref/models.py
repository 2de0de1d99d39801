"""The small LongNet-style decoder-only language model, mirroring ``jax_dilated.models``.

Same structure, arguments (minus ``rngs``) and ``state_dict`` names as the NNX model, so weights move
between the two with ``jax_dilated.to_torch_state_dict`` / ``jax_dilated.load_torch_state_dict``:

    x = token_embedding[tokens] * sqrt(E) + sinusoidal_positions(n)
    x = x + dropout(attn(norm1(x), is_causal=True));  x = x + dropout(mlp_out(gelu(mlp_in(norm2(x)))))
    logits = norm(x) @ token_embedding.T  (tied)  or  lm_head(norm(x))  (untied)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dilated_plan.checks import check_positive_int
from torch_ref.multihead import ImprovedMultiheadDilatedAttention


def sinusoidal_positions(n: int, dim: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Fixed sinusoidal position encodings ``(n, dim)``: column ``2i`` sine, ``2i+1`` cosine; ``dim`` even."""
    if dim % 2:
        raise ValueError(f"embed_dim={dim} is odd; sinusoidal positions need an even embed_dim (e.g. {dim + 1}).")
    acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 models
    pos = torch.arange(n, dtype=acc, device=device)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=acc, device=device) / dim)
    angles = pos * freq
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(n, dim).to(dtype)


class DilatedDecoderBlock(nn.Module):
    """Pre-LN decoder block: causal dilated self-attention and a GELU MLP. ``(b, n, E)`` -> ``(b, n, E)``."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        merge: str = "head_partition",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        hidden = check_positive_int("mlp_ratio", mlp_ratio) * embed_dim
        factory: dict[str, Any] = dict(device=device, dtype=dtype)
        self.dropout = float(dropout)
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-5, **factory)
        self.attn = ImprovedMultiheadDilatedAttention(
            embed_dim, num_heads, segment_lengths, dilation_rates, dropout=dropout, merge=merge, **factory
        )
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-5, **factory)
        self.mlp_in = nn.Linear(embed_dim, hidden, **factory)
        self.mlp_out = nn.Linear(hidden, embed_dim, **factory)
        for lin in (self.mlp_in, self.mlp_out):
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        a = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, is_causal=True)
        x = x + F.dropout(a, self.dropout, self.training)
        hdn = F.gelu(self.mlp_in(self.norm2(x).to(a.dtype)))
        return x + F.dropout(self.mlp_out(hdn), self.dropout, self.training)


class LongNetLM(nn.Module):
    """Decoder-only LM with causal dilated attention; mirror of ``jax_dilated.models.LongNetLM``.

    Same arguments without ``rngs``, with torch's factory arguments ``device`` and ``dtype`` (the
    parameters' dtype, which is also the computation dtype) instead of Flax's ``dtype`` and
    ``param_dtype``. ``forward(tokens (b, n) long) -> logits (b, n, vocab)``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        merge: str = "head_partition",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        vocab_size = check_positive_int("vocab_size", vocab_size)
        num_layers = check_positive_int("num_layers", num_layers)
        embed_dim = check_positive_int("embed_dim", embed_dim)
        if embed_dim % 2:
            raise ValueError(f"embed_dim={embed_dim} is odd; sinusoidal positions need an even embed_dim.")
        if not isinstance(tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={tie_embeddings!r} must be True or False.")
        self.embed_dim = embed_dim
        self.tie_embeddings = tie_embeddings
        self.dropout = float(dropout)
        factory: dict[str, Any] = dict(device=device, dtype=dtype)
        self.token_embedding = nn.Parameter(torch.randn(vocab_size, embed_dim, **factory) * embed_dim**-0.5)
        self.blocks = nn.ModuleList(
            [
                DilatedDecoderBlock(
                    embed_dim,
                    num_heads,
                    segment_lengths,
                    dilation_rates,
                    mlp_ratio=mlp_ratio,
                    dropout=dropout,
                    merge=merge,
                    **factory,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5, **factory)
        self.lm_head = None if tie_embeddings else nn.Linear(embed_dim, vocab_size, bias=False, **factory)
        if self.lm_head is not None:
            nn.init.xavier_normal_(self.lm_head.weight)

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``tokens`` integer ``(b, n)`` -> logits ``(b, n, vocab_size)``.

        ``key_padding_mask``: optional ``(b, n)`` boolean, True = padding.
        """
        if tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(
                f"tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; pass integer "
                f"token ids of shape (batch, seq)."
            )
        dtype = self.token_embedding.dtype
        emb = self.token_embedding
        x = emb[tokens] * math.sqrt(self.embed_dim)
        x = x + sinusoidal_positions(tokens.shape[1], self.embed_dim, dtype, tokens.device)
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x, key_padding_mask=key_padding_mask)
        h = self.norm(x)
        if self.lm_head is None:
            return h @ emb.T
        return self.lm_head(h)
