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
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dilated_plan.checks import check_generation, check_positive_int
from torch_ref.decode import KVCache
from torch_ref.layers import positions
from torch_ref.multihead import ImprovedMultiheadDilatedAttention


def sinusoidal_positions(n: int | Tensor, dim: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Fixed sinusoidal encodings: ``(n, dim)`` for positions ``0 .. n-1``, or ``(*pos.shape, dim)``; ``dim`` even."""
    if dim % 2:
        raise ValueError(f"embed_dim={dim} is odd; sinusoidal positions need an even embed_dim (e.g. {dim + 1}).")
    acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 models
    pos = (torch.arange(n, device=device) if isinstance(n, int) else n).to(acc)[..., None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=acc, device=pos.device) / dim)
    angles = pos * freq
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(*angles.shape[:-1], dim).to(dtype)


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
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        hidden = check_positive_int("mlp_ratio", mlp_ratio) * embed_dim
        factory: dict[str, Any] = dict(device=device, dtype=dtype)
        self.dropout = float(dropout)
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-5, **factory)
        self.attn = ImprovedMultiheadDilatedAttention(
            embed_dim,
            num_heads,
            segment_lengths,
            dilation_rates,
            dropout=dropout,
            merge=merge,
            num_kv_heads=num_kv_heads,
            rope_theta=rope_theta,
            **factory,
        )
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-5, **factory)
        self.mlp_in = nn.Linear(embed_dim, hidden, **factory)
        self.mlp_out = nn.Linear(hidden, embed_dim, **factory)
        for lin in (self.mlp_in, self.mlp_out):
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        if cache is not None:
            a = self.attn(self.norm1(x), cache=cache)
        else:
            a = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, is_causal=True, document_ids=document_ids)
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
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
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
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.tie_embeddings = tie_embeddings
        self.rope_theta = rope_theta
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
                    num_kv_heads=num_kv_heads,
                    rope_theta=rope_theta,
                    **factory,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5, **factory)
        self.lm_head = None if tie_embeddings else nn.Linear(embed_dim, vocab_size, bias=False, **factory)
        if self.lm_head is not None:
            nn.init.xavier_normal_(self.lm_head.weight)

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> list[KVCache]:
        """One empty :class:`torch_ref.decode.KVCache` per layer, for ``forward(tokens, cache=...)``."""
        return [self._attention(i).init_cache(batch_size, max_length, dtype, device) for i in range(len(self.blocks))]

    def _attention(self, layer: int) -> ImprovedMultiheadDilatedAttention:
        return cast(DilatedDecoderBlock, self.blocks[layer]).attn

    def forward(
        self,
        tokens: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """``tokens`` integer ``(b, n)`` in ``[0, vocab_size)`` -> logits ``(b, n, vocab_size)``.

        ``key_padding_mask``: optional ``(b, n)`` boolean, True = padding; ``document_ids``: optional
        ``(b, n)`` integers (packed documents; positions restart at each). ``cache`` (from
        :meth:`init_cache`): ``tokens`` are the next ``n`` positions of the decoded sequences; every
        layer's cache advances by ``n`` and the logits equal those of the full forward (semantics 12).
        """
        if cache is not None and (key_padding_mask is not None or document_ids is not None):
            raise ValueError("cache= decodes plain causal sequences: pass no key_padding_mask or document_ids.")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(
                f"cache holds {len(cache)} layers' caches; this model has {len(self.blocks)} (init_cache)."
            )
        if tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(
                f"tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; pass integer "
                f"token ids of shape (batch, seq)."
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            bad = int(tokens.min()) if int(tokens.min()) < 0 else int(tokens.max())
            raise ValueError(
                f"tokens holds the id {bad}, outside [0, vocab_size={self.vocab_size}); pass ids in that range."
            )
        dtype = self.token_embedding.dtype
        emb = self.token_embedding
        x = emb[tokens] * math.sqrt(self.embed_dim)
        if self.rope_theta is None:
            pos = positions(tokens.shape[0], tokens.shape[1], document_ids, device=tokens.device)
            if cache is not None:
                pos = pos + cache[0].index
            x = x + sinusoidal_positions(pos, self.embed_dim, dtype)
        x = F.dropout(x, self.dropout, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask, document_ids, None if cache is None else cache[i])
        h = self.norm(x)
        if self.lm_head is None:
            return h @ emb.T
        return self.lm_head(h)

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue the prompts ``tokens`` ``(b, n)``, ``n >= 1``, by ``max_new_tokens`` tokens.

        One prefill call over the prompt, then one cached step per token (semantics section 12); the
        model runs in eval mode (its mode is restored afterwards). ``temperature=0`` is greedy (argmax,
        the first on ties); otherwise tokens are drawn from ``softmax(logits / temperature)``, restricted
        to the ``top_k`` most likely when given, with ``generator`` (default: torch's global one).

        Returns ``(b, n + max_new_tokens)`` long: the prompt and its continuation.
        """
        check_generation(
            tokens.shape[1] if tokens.ndim == 2 else 0, max_new_tokens, temperature, top_k, self.vocab_size
        )
        if max_new_tokens == 0:
            return tokens.clone()
        b, n = tokens.shape
        period = self._attention(0).config.period
        was = self.training
        self.eval()
        try:
            cache = self.init_cache(b, -(-(n + max_new_tokens) // period) * period)
            logits = self(tokens, cache=cache)[:, -1]
            out = [tokens]
            for i in range(max_new_tokens):
                nxt = _pick(logits, temperature, top_k, generator)
                out.append(nxt[:, None])
                if i + 1 < max_new_tokens:
                    logits = self(nxt[:, None], cache=cache)[:, -1]
        finally:
            self.train(was)
        return torch.cat(out, dim=1)


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """The next token per row from ``(b, V)`` logits: argmax, or a draw at ``temperature`` within ``top_k``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is None:
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)[:, 0]
    top, ids = torch.topk(scaled, top_k, dim=-1)  # exactly k candidates
    pick = torch.multinomial(torch.softmax(top, dim=-1), 1, generator=generator)
    return ids.gather(1, pick)[:, 0]
