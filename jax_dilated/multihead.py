"""Multi-head Flax NNX modules around the three attention cores (docs/semantics.md section 6).

Every module is the same shell around a different core:

    q, k, v = q_proj(query), k_proj(key), v_proj(value)      # (b, n, E) -> (b, n, h, E/h)
    o = core(q, k, v, key_padding_mask, is_causal, dropout)  # (b, n, h, E/h)
    o = norm(o.reshape(b, n, E))                             # MAGNETO sub-LayerNorm, if layer_norm
    out = out_proj(o)                                        # (b, n, E)

The parameter tree is named and laid out like the torch mirror's ``state_dict``:
``q_proj.weight`` ``(E, E)`` (out, in), ``q_proj.bias`` ``(E,)``, likewise ``k_proj``, ``v_proj``,
``out_proj``, and ``norm.weight``, ``norm.bias``. :mod:`jax_dilated.convert` moves weights both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dilated_plan import DilatedConfig, Heads, ModuleOptions, check_block_options
from dilated_plan.checks import check_is_causal, default_key_value
from jax_dilated.block_sparse import block_sparse_attention
from jax_dilated.checks import check_module_inputs
from jax_dilated.decode import dilated_attention_decode
from jax_dilated.dilated import dilated_attention, improved_dilated_attention
from jax_dilated.kernels import Backend, resolve
from jax_dilated.layers import LayerNorm, Linear, positions, rotary
from jax_dilated.ring import ring_dilated_attention

Array = jax.Array


def _dropout_stream(rngs: nnx.Rngs, rate: float) -> nnx.RngStream:
    """A fork of the ``dropout`` stream of ``rngs`` (or of its ``default`` one), else a clear error."""
    try:
        return rngs.dropout.fork()
    except AttributeError:
        raise ValueError(
            f"dropout={rate} needs a 'dropout' (or 'default') stream in rngs; pass "
            f"nnx.Rngs(params=..., dropout=...) or nnx.Rngs(seed)."
        ) from None


class MultiheadAttentionBase(nnx.Module):
    """Projections, rotary positions, sub-LayerNorm, masks and dropout shared by the multi-head modules.

    Subclasses only say which core runs, by implementing :meth:`_attend`.
    """

    def __init__(
        self,
        heads: Heads,
        options: ModuleOptions,
        dtype: Any,
        param_dtype: Any,
        implementation: str | Backend | None,
        rngs: nnx.Rngs,
    ):
        if options.rope_theta is not None and heads.head_dim % 2:
            raise ValueError(f"rope_theta needs an even head_dim; embed_dim / num_heads = {heads.head_dim}.")
        self.embed_dim, self.num_heads, self.num_kv_heads = heads.embed_dim, heads.num_heads, heads.kv_heads
        self.head_dim = heads.head_dim
        self.dropout = options.dropout
        self.rope_theta = options.rope_theta
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.implementation = resolve(implementation)
        e, kv, bias = heads.embed_dim, heads.kv_dim, options.bias
        self.q_proj = Linear(e, e, bias=bias, gain=1.0, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = Linear(e, kv, bias=bias, gain=1.0, param_dtype=param_dtype, rngs=rngs)
        self.v_proj = Linear(e, kv, bias=bias, gain=options.gamma_init, param_dtype=param_dtype, rngs=rngs)
        self.out_proj = Linear(e, e, bias=bias, gain=options.gamma_init, param_dtype=param_dtype, rngs=rngs)
        norm = LayerNorm(e, eps=options.layer_norm_eps, param_dtype=param_dtype) if options.layer_norm else None
        self.norm = norm if norm is not None else nnx.data(None)
        # NNX convention (as nnx.Dropout): .train()/.eval() and nnx.view(deterministic=...) set this flag;
        # dropout keys come from the `dropout` stream of `rngs`.
        self.deterministic = False
        self.rngs = _dropout_stream(rngs, self.dropout) if self.dropout > 0 else nnx.data(None)
        # Autoregressive decoding (semantics section 12), the nnx.MultiHeadAttention names.
        self.decode = False
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    def init_cache(self, input_shape: Sequence[int], dtype: Any = jnp.float32) -> None:
        """Allocate the key/value cache for ``decode=True`` calls, empty (``cache_index`` 0).

        Args:
          input_shape: ``(b, max_length, E)`` (the shape of the whole sequence to be decoded; only
            ``b`` and ``max_length`` are used). ``max_length`` must be a multiple of
            ``lcm(segment_lengths)``; the error names the length to use.
          dtype: dtype of the cached keys and values.

        Sets ``cached_key``/``cached_value`` ``(b, max_length, h_kv, d)`` and ``cache_index`` ``()``
        int32, ``nnx.Cache`` variables.
        """
        if len(input_shape) != 3:
            raise ValueError(f"input_shape={tuple(input_shape)} should be (batch, max_length, embed_dim).")
        batch, length = int(input_shape[0]), self._decode_config().check_cache_length(input_shape[1])
        shape = (batch, length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
    ) -> None:
        """Used by ``nnx.view``: ``deterministic=True`` turns attention dropout off (like ``.eval()``);
        ``decode=True`` switches to cached decoding, allocating the cache (``batch_size``,
        ``max_length``, as :meth:`init_cache`) if there is none."""
        if deterministic is not None:
            self.deterministic = bool(deterministic)
        if decode is not None:
            self.decode = bool(decode)
            if self.decode and self.cached_key is None:
                if batch_size is None or max_length is None:
                    raise TypeError("decode=True needs batch_size and max_length to allocate the cache.")
                dtype = self.dtype if self.dtype is not None else self.param_dtype
                self.init_cache((batch_size, max_length, self.embed_dim), dtype)

    def _decode_config(self) -> DilatedConfig:
        """The configuration decoding follows; modules that cannot decode raise."""
        raise ValueError(f"{type(self).__name__} has no cached decoding; use ImprovedMultiheadDilatedAttention.")

    def _attend(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: Array | None,
        docs: Array | None,
        is_causal: bool,
        rate: float,
        rng: Array | None,
    ) -> Array:
        """The core on ``(b, n, h, d)`` queries and ``(b, n, h_kv, d)`` keys/values."""
        raise NotImplementedError

    def __call__(
        self,
        query: Array,
        key: Array | None = None,
        value: Array | None = None,
        *,
        key_padding_mask: Array | None = None,
        is_causal: bool = False,
        document_ids: Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | Array | None = None,
        decode: bool | None = None,
    ) -> Array:
        """Multi-head attention of ``query`` over ``key``/``value``.

        Args:
          query: ``(b, n, E)``.
          key: ``(b, n, E)``, default ``query``. Cross-attention is supported with the *same* length
            ``n`` as the query (segments and blocks cut queries and keys alike).
          value: ``(b, n, E)``, default ``key``.
          key_padding_mask: optional ``(b, n)`` boolean, True where the key is padding; padded keys get
            exactly zero weight, and a query with no visible key gets 0 before the sub-LayerNorm.
          is_causal: query ``p`` sees keys ``p' <= p`` only.
          document_ids: optional ``(b, n)`` integers, packed documents (semantics section 10); rotary
            positions restart at every document too.
          deterministic: disable dropout; default the module's flag (``.eval()`` or
            ``nnx.view(module, deterministic=True)`` set it, ``.train()`` clears it).
          rngs: optional ``nnx.Rngs``, ``nnx.RngStream`` or key overriding the module's dropout stream.
          decode: causal self-attention of ``query`` ``(b, T, E)``, the next ``T >= 1`` positions, with the
            cache of :meth:`init_cache` (default the module's flag, ``nnx.view(m, decode=True)``): writes
            their keys/values at ``cache_index``, advances it by ``T`` and returns rows equal to those
            of the full causal call over everything decoded so far (semantics section 12). Takes no
            ``key``/``value``, mask, documents or dropout.

        Returns:
          ``(b, n, E)`` in the computation dtype (``dtype``, else the promotion of input and parameters).
        """
        if self.decode if decode is None else decode:
            return self._decode(query, key, value, key_padding_mask, document_ids, deterministic)
        key, value = default_key_value(query, key, value)
        check_module_inputs(query, key, value, key_padding_mask, self.embed_dim)
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(query.dtype, key.dtype, value.dtype, self.param_dtype)
        deterministic = self.deterministic if deterministic is None else deterministic
        rate = 0.0 if deterministic else self.dropout
        rng = self._dropout_key(rngs) if rate > 0 else None
        b, n, _ = query.shape
        q = self.q_proj(query.astype(dtype), dtype).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(key.astype(dtype), dtype).reshape(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value.astype(dtype), dtype).reshape(b, n, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            pos = positions(b, n, None if document_ids is None else jnp.asarray(document_ids))
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        o = self._attend(q, k, v, key_padding_mask, document_ids, check_is_causal(is_causal), rate, rng)
        o = o.reshape(b, n, self.embed_dim)
        if self.norm is not None:
            o = self.norm(o)
        return self.out_proj(o, dtype)

    def _decode(self, query, key, value, key_padding_mask, document_ids, deterministic) -> Array:
        cfg = self._decode_config()
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("decode=True needs a cache: call init_cache((batch, max_length, embed_dim)) first.")
        if key is not None or value is not None or key_padding_mask is not None or document_ids is not None:
            raise ValueError(
                "decode=True is causal self-attention: pass only the query (no key, value, mask or documents)."
            )
        if self.dropout > 0 and not (self.deterministic if deterministic is None else deterministic):
            raise ValueError("decode=True has no dropout: call .eval() or nnx.view(module, deterministic=True) first.")
        check_module_inputs(query, query, query, None, self.embed_dim)
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(query.dtype, self.param_dtype)
        b, t, _ = query.shape
        x = query.astype(dtype)
        q = self.q_proj(x, dtype).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, dtype).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, dtype).reshape(b, t, self.num_kv_heads, self.head_dim)
        index = self.cache_index[...]
        if self.rope_theta is not None:
            pos = index + positions(b, t)
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        o, self.cached_key[...], self.cached_value[...] = dilated_attention_decode(
            q,
            k,
            v,
            self.cached_key[...],
            self.cached_value[...],
            index,
            segment_lengths=cfg.segment_lengths,
            dilation_rates=cfg.dilation_rates,
            merge=cfg.merge,
            implementation=self.implementation,
        )
        self.cache_index[...] = index + t
        o = o.reshape(b, t, self.embed_dim)
        if self.norm is not None:
            o = self.norm(o)
        return self.out_proj(o, dtype)

    def _dropout_key(self, rngs: nnx.Rngs | nnx.RngStream | Array | None) -> Array:
        if rngs is None:
            rngs = self.rngs
        if isinstance(rngs, nnx.Rngs):
            return rngs.dropout()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        raise TypeError(
            f"rngs={rngs!r} cannot give a dropout key; pass nnx.Rngs(dropout=...), an RngStream or a jax.random.key."
        )


class MultiheadDilatedAttention(MultiheadAttentionBase):
    """Multi-head dilated attention (LongNet), core :func:`jax_dilated.dilated_attention`.

    Args:
      embed_dim: model width ``E``; a multiple of ``num_heads``.
      num_heads: heads ``h``; head size ``E / h``.
      segment_lengths, dilation_rates, merge: the dilated-attention configuration (semantics 1-3).
      dropout: dropout rate on the attention probabilities (training mode only).
      bias: whether the four projections have biases.
      layer_norm: apply the MAGNETO sub-LayerNorm to the attention output before ``out_proj``.
      layer_norm_eps: its epsilon.
      gamma_init: xavier gain of ``v_proj`` and ``out_proj`` (``q_proj``/``k_proj`` use gain 1).
      num_kv_heads: key/value heads ``h_kv`` (grouped-query attention; default ``num_heads``):
        ``k_proj`` and ``v_proj`` map ``E -> h_kv * E / h`` (the ``nnx.MultiHeadAttention`` name).
      rope_theta: rotary position embedding of q and k with this base (None: off), positions
        restarting at every document when ``document_ids`` are given.
      dtype: computation dtype (default: promote input and parameter dtypes).
      param_dtype: parameter dtype.
      implementation: the attention kernel (see :func:`jax_dilated.dilated_attention`).
      rngs: ``nnx.Rngs``; ``params`` initialises weights, ``dropout`` feeds dropout.

    >>> mha = MultiheadDilatedAttention(32, 4, (8, 16), (1, 2), rngs=nnx.Rngs(0))
    >>> mha(jnp.ones((2, 16, 32), jnp.float32), is_causal=True).shape
    (2, 16, 32)
    """

    _core = staticmethod(dilated_attention)

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        merge: str = "head_partition",
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | Backend | None = None,
        rngs: nnx.Rngs,
    ):
        options = ModuleOptions(dropout, bias, layer_norm, layer_norm_eps, gamma_init, rope_theta)
        heads = Heads(embed_dim, num_heads, num_kv_heads)
        super().__init__(heads, options, dtype, param_dtype, implementation, rngs)
        self.config = DilatedConfig(segment_lengths, dilation_rates, merge)
        self.config.check_heads(self.num_heads)

    def _decode_config(self) -> DilatedConfig:
        return self.config

    def _attend(self, q, k, v, mask, docs, is_causal, rate, rng):
        cfg, kw = self.config, dict(dropout_rate=rate, dropout_rng=rng, implementation=self.implementation)
        kw["document_ids"] = docs
        return self._core(
            q,
            k,
            v,
            segment_lengths=cfg.segment_lengths,
            dilation_rates=cfg.dilation_rates,
            merge=cfg.merge,
            key_padding_mask=mask,
            is_causal=is_causal,
            **kw,
        )


class ImprovedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` with the fast core :func:`jax_dilated.improved_dilated_attention`.

    Same arguments, parameters and results.
    """

    _core = staticmethod(improved_dilated_attention)


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` whose core is :func:`jax_dilated.ring_dilated_attention`.

    The projections act position by position, so only the core needs the sequence sharding: with
    ``mesh`` the sequence is sharded over its ``axis_name`` axis, and the output comes back sharded
    the same way. ``mesh=None`` (or an axis of size 1) computes exactly
    :class:`ImprovedMultiheadDilatedAttention`. Ring attention has no dropout: ``dropout`` must be 0.
    Further arguments as :class:`MultiheadDilatedAttention`; ``mesh`` is a ``jax.sharding.Mesh`` with
    an axis ``axis_name`` (the one the sequence is sharded over), or None. ``load_balance="zigzag"``
    takes ``x`` (and masks) in :func:`jax_dilated.to_zigzag` order and returns that order (no rotary
    embedding then: its positions would be the zigzag indices). ``document_ids`` (packed documents)
    are taken in the contiguous layout, rotary positions restarting at every document.

    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> mha = RingMultiheadDilatedAttention(32, 4, (8, 16), (1, 2), mesh=mesh, rngs=nnx.Rngs(0))
    >>> mha(jnp.ones((1, 16, 32), jnp.float32)).shape
    (1, 16, 32)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        mesh: jax.sharding.Mesh | None = None,
        axis_name: str = "seq",
        load_balance: str | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        merge: str = "head_partition",
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | Backend | None = None,
        rngs: nnx.Rngs,
    ):
        if dropout:
            raise ValueError(
                f"dropout={dropout}: ring attention has no dropout; pass dropout=0.0 or use "
                f"ImprovedMultiheadDilatedAttention."
            )
        if load_balance is not None and rope_theta is not None:
            raise ValueError(
                f"load_balance={load_balance!r} with rope_theta={rope_theta}: the module would rotate by zigzag "
                f"indices, not original positions; pass rope_theta=None (rotate q, k yourself) or load_balance=None."
            )
        options = ModuleOptions(0.0, bias, layer_norm, layer_norm_eps, gamma_init, rope_theta)
        heads = Heads(embed_dim, num_heads, num_kv_heads)
        MultiheadAttentionBase.__init__(self, heads, options, dtype, param_dtype, implementation, rngs)
        self.config = DilatedConfig(segment_lengths, dilation_rates, merge)
        self.config.check_heads(self.num_heads)
        self.mesh = mesh
        self.axis_name = axis_name
        from dilated_plan.ring import check_load_balance  # here: only this class takes load_balance

        self.load_balance = check_load_balance(load_balance)

    def _attend(self, q, k, v, mask, docs, is_causal, rate, rng):
        cfg, kw = self.config, dict(mesh=self.mesh, axis_name=self.axis_name, implementation=self.implementation)
        return ring_dilated_attention(
            q,
            k,
            v,
            segment_lengths=cfg.segment_lengths,
            dilation_rates=cfg.dilation_rates,
            merge=cfg.merge,
            key_padding_mask=mask,
            is_causal=is_causal,
            load_balance=self.load_balance,
            document_ids=docs,
            **kw,
        )


class BlockSparseMultiheadDilatedAttention(MultiheadAttentionBase):
    """Multi-head block-sparse attention, core :func:`jax_dilated.block_sparse_attention`.

    Same structure, parameters and call as :class:`MultiheadDilatedAttention`; the core's options
    ``block_size``, ``pattern``, ``sparsity_ratio`` and ``global_blocks`` (semantics section 5) replace
    the segment lengths and dilation rates. Any ``n``: the last block is shorter.

    >>> mha = BlockSparseMultiheadDilatedAttention(32, 4, block_size=4, sparsity_ratio=0.5, rngs=nnx.Rngs(0))
    >>> mha(jnp.ones((1, 16, 32), jnp.float32)).shape
    (1, 16, 32)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        block_size: int = 128,
        pattern: str = "dilated_sparse",
        sparsity_ratio: float = 0.9,
        global_blocks: int = 1,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | Backend | None = None,
        rngs: nnx.Rngs,
    ):
        check_block_options(block_size, pattern, sparsity_ratio, global_blocks)
        self.layout = (int(block_size), pattern, float(sparsity_ratio), int(global_blocks))
        options = ModuleOptions(dropout, bias, layer_norm, layer_norm_eps, gamma_init, rope_theta)
        super().__init__(Heads(embed_dim, num_heads, num_kv_heads), options, dtype, param_dtype, implementation, rngs)

    def _attend(self, q, k, v, mask, docs, is_causal, rate, rng):
        if docs is not None:
            raise ValueError("block-sparse attention has no packed documents; pass document_ids=None.")
        size, pattern, ratio, global_blocks = self.layout
        kw = dict(dropout_rate=rate, dropout_rng=rng, implementation=self.implementation)
        return block_sparse_attention(
            q,
            k,
            v,
            block_size=size,
            pattern=pattern,
            sparsity_ratio=ratio,
            global_blocks=global_blocks,
            key_padding_mask=mask,
            is_causal=is_causal,
            **kw,
        )
