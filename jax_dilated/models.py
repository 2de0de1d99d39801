"""A small decoder-only LongNet-style language model in Flax NNX (an example built on the modules).

    x = token_embedding[tokens] * sqrt(E) + sinusoidal_positions(n)     (b, n) -> (b, n, E)
    for block in blocks:                                                 pre-LN residual blocks
        x = x + dropout(attn(norm1(x), is_causal=True))                  causal ImprovedMultiheadDilatedAttention
        x = x + dropout(mlp_out(gelu(mlp_in(norm2(x)))))                 E -> mlp_ratio * E -> E
    logits = norm(x) @ token_embedding.T   (tied)   or   lm_head(norm(x))   (untied)     (b, n, vocab)

Positions are fixed sinusoids (Vaswani et al. 2017), computed for whatever ``n`` is called: there is
no maximum length and no position parameter. Every layer uses the same dilated configuration.

Parameters are named like a torch ``state_dict`` (``token_embedding``, ``blocks.0.attn.q_proj.weight``,
``blocks.0.mlp_in.weight`` ``(mlp_ratio*E, E)``, ``norm.weight``, ``lm_head.weight`` ``(vocab, E)``), so
:func:`jax_dilated.to_torch_state_dict` / :func:`jax_dilated.load_torch_state_dict` move weights to and
from :class:`torch_ref.models.LongNetLM` exactly. See docs/models.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dilated_plan.checks import check_positive_int
from jax_dilated.layers import LayerNorm, Linear
from jax_dilated.multihead import ImprovedMultiheadDilatedAttention

Array = jax.Array


def sinusoidal_positions(n: int, dim: int, dtype: Any = jnp.float32) -> Array:
    """Fixed sinusoidal position encodings ``(n, dim)``.

    Column ``2i`` is ``sin(p / 10000^(2i/dim))`` and column ``2i+1`` the matching cosine; ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"embed_dim={dim} is odd; sinusoidal positions need an even embed_dim (e.g. {dim + 1}).")
    acc = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 for float64 models
    pos = jnp.arange(n, dtype=acc)[:, None]
    freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=acc) / dim)
    angles = pos * freq
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(n, dim).astype(dtype)


class DilatedDecoderBlock(nnx.Module):
    """Pre-LN decoder block: causal dilated self-attention and a GELU MLP, each in a residual branch.

    Args:
      embed_dim, num_heads, segment_lengths, dilation_rates, merge: the attention configuration (see
        :class:`jax_dilated.ImprovedMultiheadDilatedAttention`).
      mlp_ratio: hidden width of the MLP is ``mlp_ratio * embed_dim``.
      dropout: rate on the attention probabilities and on both residual branches (training mode only).
      param_dtype, dtype: parameter and computation dtypes.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` when ``dropout > 0``).
    """

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
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        hidden = check_positive_int("mlp_ratio", mlp_ratio) * embed_dim
        self.dtype = dtype
        self.norm1 = LayerNorm(embed_dim, eps=1e-5, param_dtype=param_dtype)
        self.attn = ImprovedMultiheadDilatedAttention(
            embed_dim,
            num_heads,
            segment_lengths,
            dilation_rates,
            dropout=dropout,
            merge=merge,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm2 = LayerNorm(embed_dim, eps=1e-5, param_dtype=param_dtype)
        self.mlp_in = Linear(embed_dim, hidden, bias=True, gain=1.0, param_dtype=param_dtype, rngs=rngs)
        self.mlp_out = Linear(hidden, embed_dim, bias=True, gain=1.0, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)

    def __call__(self, x: Array, *, key_padding_mask: Array | None = None, deterministic: bool | None = None) -> Array:
        """``(b, n, E)`` -> ``(b, n, E)``; ``key_padding_mask`` ``(b, n)``, True = padding."""
        a = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, is_causal=True, deterministic=deterministic)
        x = x + self.dropout(a, deterministic=deterministic)
        dtype = a.dtype
        hdn = jax.nn.gelu(self.mlp_in(self.norm2(x).astype(dtype), dtype), approximate=False)
        return x + self.dropout(self.mlp_out(hdn, dtype), deterministic=deterministic)


class LongNetLM(nnx.Module):
    """Decoder-only language model with causal dilated attention in every layer (LongNet-style).

    Args:
      vocab_size: number of token ids ``V``.
      embed_dim: model width ``E`` (even, a multiple of ``num_heads``).
      num_heads: attention heads per layer.
      num_layers: number of decoder blocks.
      segment_lengths, dilation_rates: dilated-attention configuration shared by all layers; the
        sequence length must be a multiple of every segment length.
      mlp_ratio: MLP hidden width is ``mlp_ratio * embed_dim``.
      dropout: dropout rate (attention probabilities and residual branches), training mode only.
      tie_embeddings: if True the output head is the transposed token embedding (no ``lm_head``
        parameter); if False a separate ``lm_head`` ``(V, E)`` without bias.
      merge: ``"head_partition"`` or ``"lse"`` (SPEC sections 1-2).
      dtype: computation dtype (default: promote the parameter dtype).
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs``; ``params`` initialises, ``dropout`` feeds dropout when ``dropout > 0``.

    Call ``model(tokens)`` with int ``tokens`` ``(b, n)`` -> logits ``(b, n, V)``; logits at position
    ``p`` depend on ``tokens[:, :p+1]`` only (every layer is causal).

    Example::

        model = LongNetLM(256, 64, 4, 2, segment_lengths=(64, 512), dilation_rates=(1, 4), rngs=nnx.Rngs(0))
        logits = model(jnp.zeros((2, 512), jnp.int32))        # (2, 512, 256)
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
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
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
        self.dtype = dtype
        self.param_dtype = param_dtype
        init = jax.nn.initializers.normal(embed_dim**-0.5)
        self.token_embedding = nnx.Param(init(rngs.params(), (vocab_size, embed_dim), param_dtype))
        self.blocks = nnx.List(
            [
                DilatedDecoderBlock(
                    embed_dim,
                    num_heads,
                    segment_lengths,
                    dilation_rates,
                    mlp_ratio=mlp_ratio,
                    dropout=dropout,
                    merge=merge,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = LayerNorm(embed_dim, eps=1e-5, param_dtype=param_dtype)
        self.lm_head = (
            nnx.data(None)
            if tie_embeddings
            else Linear(embed_dim, vocab_size, bias=False, gain=1.0, param_dtype=param_dtype, rngs=rngs)
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)

    def __call__(
        self, tokens: Array, *, key_padding_mask: Array | None = None, deterministic: bool | None = None
    ) -> Array:
        """Next-token logits.

        Args:
          tokens: integer ``(b, n)`` in ``[0, vocab_size)``; ``n`` a multiple of every segment length.
          key_padding_mask: optional ``(b, n)`` boolean, True where the token is padding; padded
            tokens are never attended to (their own logits are meaningless).
          deterministic: disable dropout; default the modules' flags (``.eval()`` / ``.train()``).

        Returns:
          ``(b, n, vocab_size)`` logits in the computation dtype.
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; pass integer "
                f"token ids of shape (batch, seq)."
            )
        dtype = self.dtype if self.dtype is not None else self.param_dtype
        emb = self.token_embedding[...].astype(dtype)
        x = jnp.take(emb, tokens, axis=0) * math.sqrt(self.embed_dim)
        x = x + sinusoidal_positions(tokens.shape[1], self.embed_dim, dtype)
        x = self.dropout(x, deterministic=deterministic)
        for block in self.blocks:
            x = block(x, key_padding_mask=key_padding_mask, deterministic=deterministic)
        h = self.norm(x)
        if self.lm_head is None:
            return jnp.einsum("bne,ve->bnv", h, emb)
        return self.lm_head(h, dtype)
