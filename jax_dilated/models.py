"""A small decoder-only LongNet-style language model in Flax NNX (an example built on the modules).

    x = token_embedding[tokens] * sqrt(E) + sinusoids(positions)       (b, n) -> (b, n, E)
    for block in blocks:                                                 pre-LN residual blocks
        x = x + dropout(attn(norm1(x), is_causal=True))                  causal ImprovedMultiheadDilatedAttention
        x = x + dropout(mlp_out(gelu(mlp_in(norm2(x)))))                 E -> mlp_ratio * E -> E
    logits = norm(x) @ token_embedding.T   (tied)   or   lm_head(norm(x))   (untied)     (b, n, vocab)

Positions are fixed sinusoids (Vaswani et al. 2017) added to the embeddings, or, with ``rope_theta``,
a rotary embedding of q and k in every attention layer instead; either way there is no maximum length
and no position parameter, and positions restart at every document of ``document_ids``. Every layer
uses the same dilated configuration.

Parameters are named like a torch ``state_dict`` (``token_embedding``, ``blocks.0.attn.q_proj.weight``,
``blocks.0.mlp_in.weight`` ``(mlp_ratio*E, E)``, ``norm.weight``, ``lm_head.weight`` ``(vocab, E)``), so
:func:`jax_dilated.to_torch_state_dict` / :func:`jax_dilated.load_torch_state_dict` move weights to and
from :class:`torch_ref.models.LongNetLM` exactly. See docs/models.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dilated_plan.checks import check_generation, check_positive_int
from jax_dilated.layers import LayerNorm, Linear, positions
from jax_dilated.multihead import ImprovedMultiheadDilatedAttention

Array = jax.Array


def sinusoidal_positions(n: int | Array, dim: int, dtype: Any = jnp.float32) -> Array:
    """Fixed sinusoidal position encodings: ``(n, dim)`` for positions ``0 .. n-1``, or ``(*pos.shape, dim)``.

    ``n`` is a length or an integer array of positions. Column ``2i`` is ``sin(p / 10000^(2i/dim))`` and
    column ``2i+1`` the matching cosine; ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"embed_dim={dim} is odd; sinusoidal positions need an even embed_dim (e.g. {dim + 1}).")
    acc = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 for float64 models
    pos = (jnp.arange(n) if isinstance(n, int) else jnp.asarray(n)).astype(acc)[..., None]
    freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=acc) / dim)
    angles = pos * freq
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], dim).astype(dtype)


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
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
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
            num_kv_heads=num_kv_heads,
            rope_theta=rope_theta,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm2 = LayerNorm(embed_dim, eps=1e-5, param_dtype=param_dtype)
        self.mlp_in = Linear(embed_dim, hidden, bias=True, gain=1.0, param_dtype=param_dtype, rngs=rngs)
        self.mlp_out = Linear(hidden, embed_dim, bias=True, gain=1.0, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)

    def __call__(
        self,
        x: Array,
        *,
        key_padding_mask: Array | None = None,
        document_ids: Array | None = None,
        deterministic: bool | None = None,
        decode: bool | None = None,
    ) -> Array:
        """``(b, n, E)`` -> ``(b, n, E)``; ``key_padding_mask`` ``(b, n)``, True = padding; ``decode``: the
        next ``n`` positions through the attention cache (semantics section 12)."""
        if self.attn.decode if decode is None else decode:
            a = self.attn(self.norm1(x), deterministic=deterministic, decode=True)
        else:
            a = self.attn(
                self.norm1(x),
                is_causal=True,
                key_padding_mask=key_padding_mask,
                document_ids=document_ids,
                deterministic=deterministic,
                decode=False,
            )
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
      segment_lengths, dilation_rates: dilated-attention configuration shared by all layers.
      mlp_ratio: MLP hidden width is ``mlp_ratio * embed_dim``.
      dropout: dropout rate (attention probabilities and residual branches), training mode only.
      tie_embeddings: if True the output head is the transposed token embedding (no ``lm_head``
        parameter); if False a separate ``lm_head`` ``(V, E)`` without bias.
      merge: ``"head_partition"`` or ``"lse"`` (semantics sections 1-2).
      num_kv_heads: key/value heads per layer (grouped-query attention; default ``num_heads``).
      rope_theta: use a rotary embedding of q and k with this base in every layer instead of the
        sinusoids added to the embeddings (None: sinusoids).
      dtype: computation dtype (default: promote the parameter dtype).
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs``; ``params`` initialises, ``dropout`` feeds dropout when ``dropout > 0``.

    Call ``model(tokens)`` with int ``tokens`` ``(b, n)`` -> logits ``(b, n, V)``; logits at position
    ``p`` depend on ``tokens[:, :p+1]`` only (every layer is causal).

    >>> model = LongNetLM(256, 64, 4, 2, segment_lengths=(64, 512), dilation_rates=(1, 4), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 500), jnp.int32)).shape
    (2, 500, 256)
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
        self.rope_theta = rope_theta
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
                    num_kv_heads=num_kv_heads,
                    rope_theta=rope_theta,
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

    def init_cache(self, input_shape: Sequence[int], dtype: Any = None) -> None:
        """Allocate every layer's key/value cache for ``decode=True`` calls.

        Args:
          input_shape: ``(b, max_length)``, the token shape of the whole sequences to be decoded;
            ``max_length`` a multiple of ``lcm(segment_lengths)``.
          dtype: dtype of the cache, default the computation dtype.
        """
        if len(input_shape) != 2:
            raise ValueError(f"input_shape={tuple(input_shape)} should be (batch, max_length).")
        dtype = dtype if dtype is not None else (self.dtype if self.dtype is not None else self.param_dtype)
        for block in self.blocks:
            block.attn.init_cache((*input_shape, self.embed_dim), dtype)

    def __call__(
        self,
        tokens: Array,
        *,
        key_padding_mask: Array | None = None,
        document_ids: Array | None = None,
        deterministic: bool | None = None,
        decode: bool | None = None,
    ) -> Array:
        """Next-token logits.

        Args:
          tokens: integer ``(b, n)`` in ``[0, vocab_size)``, any ``n``. An id outside that range raises
            when the tokens are concrete; under ``jax.jit`` (traced tokens) its embedding, and so its
            logits, are NaN rather than a silently wrapped row.
          key_padding_mask: optional ``(b, n)`` boolean, True where the token is padding; padded
            tokens are never attended to (their own logits are meaningless).
          document_ids: optional ``(b, n)`` integers packing several documents in a row: nothing is seen
            across documents and positions restart at each (semantics section 10).
          deterministic: disable dropout; default the modules' flags (``.eval()`` / ``.train()``).
          decode: ``tokens`` are the next ``n`` positions of sequences decoded with the caches of
            :meth:`init_cache`; every cache advances by ``n`` and the logits equal those of the full
            forward over everything decoded so far (default: the layers' flag, ``nnx.view(model,
            decode=True)``; semantics section 12).

        Returns:
          ``(b, n, vocab_size)`` logits in the computation dtype.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; pass integer "
                f"token ids of shape (batch, seq)."
            )
        check_token_range(tokens, self.vocab_size)
        decode = self.blocks[0].attn.decode if decode is None else bool(decode)
        if decode and (key_padding_mask is not None or document_ids is not None):
            raise ValueError("decode=True decodes plain causal sequences: pass no key_padding_mask or document_ids.")
        dtype = self.dtype if self.dtype is not None else self.param_dtype
        emb = self.token_embedding[...].astype(dtype)
        x = jnp.take(emb, tokens, axis=0, mode="fill", fill_value=jnp.nan) * math.sqrt(self.embed_dim)
        if self.rope_theta is None:
            b, n = tokens.shape
            pos = positions(b, n, None if document_ids is None else jnp.asarray(document_ids))
            if decode:
                index = self.blocks[0].attn.cache_index
                if index is None:
                    raise ValueError("decode=True needs a cache: call init_cache((batch, max_length)) first.")
                pos = pos + index[...]
            x = x + sinusoidal_positions(pos, self.embed_dim, dtype)
        x = self.dropout(x, deterministic=deterministic)
        for block in self.blocks:
            x = block(
                x,
                key_padding_mask=key_padding_mask,
                document_ids=document_ids,
                deterministic=deterministic,
                decode=decode,
            )
        h = self.norm(x)
        if self.lm_head is None:
            return jnp.einsum("bne,ve->bnv", h, emb)
        return self.lm_head(h, dtype)

    def generate(
        self,
        tokens: Array,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        rng: Array | None = None,
    ) -> Array:
        """Continue the prompts ``tokens`` ``(b, n)``, ``n >= 1``, by ``max_new_tokens`` tokens.

        The model is not changed: generation runs on a copy in eval mode with its own caches (length
        ``n + max_new_tokens`` rounded up to a multiple of ``lcm(segment_lengths)``). One jitted prefill
        over the prompt, then one jitted step per token, each compiled once per shape (semantics
        section 12). ``temperature=0`` is greedy (argmax, the first on ties); otherwise token ``i`` is
        drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely when given,
        with the key ``fold_in(rng, i)``.

        Returns:
          ``(b, n + max_new_tokens)`` int32: the prompt and its continuation.

        >>> model = LongNetLM(50, 16, 2, 1, segment_lengths=(4, 8), dilation_rates=(1, 2), rngs=nnx.Rngs(0))
        >>> model.generate(jnp.zeros((2, 3), jnp.int32), 5).shape
        (2, 8)
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; pass (batch, seq) ids.")
        check_generation(tokens.shape[1], max_new_tokens, temperature, top_k, self.vocab_size)
        check_token_range(tokens, self.vocab_size)
        if temperature > 0 and rng is None:
            raise ValueError(f"temperature={temperature} samples: pass rng=jax.random.key(...).")
        tokens = tokens.astype(jnp.int32)
        if max_new_tokens == 0:
            return tokens
        b, n = tokens.shape
        period = self.blocks[0].attn.config.period
        model = nnx.clone(self)  # new variables sharing the parameter arrays; self keeps no cache
        model.eval()
        model.init_cache((b, -(-(n + max_new_tokens) // period) * period))
        parts: tuple[Any, ...] = nnx.split(model, nnx.Cache, ...)  # the caches alone are donated to each step
        graphdef, cache, rest = parts
        pick = _Pick(float(temperature), None if top_k is None else int(top_k))
        key = jax.random.key(0) if rng is None else rng
        nxt, cache = _next_token(graphdef, cache, rest, tokens, jax.random.fold_in(key, 0), pick)
        out = [tokens, nxt[:, None]]
        for i in range(1, max_new_tokens):
            nxt, cache = _next_token(graphdef, cache, rest, nxt[:, None], jax.random.fold_in(key, i), pick)
            out.append(nxt[:, None])
        return jnp.concatenate(out, axis=1)


@dataclasses.dataclass(frozen=True)
class _Pick:
    """How the next token is chosen from ``(b, V)`` logits (static: part of the compiled step)."""

    temperature: float
    top_k: int | None

    def __call__(self, logits: Array, key: Array) -> Array:
        if self.temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits.astype(jnp.float32) / self.temperature
        if self.top_k is None:
            return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
        top, ids = jax.lax.top_k(scaled, self.top_k)  # exactly k candidates, ties broken by lower id
        pick = jax.random.categorical(key, top, axis=-1)
        return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "pick"), donate_argnames=("cache",))
def _next_token(graphdef, cache, rest, tokens: Array, key: Array, pick: _Pick) -> tuple[Array, Any]:
    """The token after ``tokens`` ``(b, T)`` (the prompt, or the last token) and the advanced caches."""
    model = nnx.merge(graphdef, cache, rest)
    logits = model(tokens, decode=True)[:, -1]
    return pick(logits, key), nnx.state(model, nnx.Cache)


def check_token_range(tokens: Array, vocab_size: int) -> None:
    """Raise unless every id is in ``[0, vocab_size)`` (concrete tokens only; traced ones cannot be read)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    low, high = int(jnp.min(tokens, initial=0)), int(jnp.max(tokens, initial=0))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"tokens holds the id {bad}, outside [0, vocab_size={vocab_size}); pass ids in that range.")
