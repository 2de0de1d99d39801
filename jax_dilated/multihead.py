"""Multi-head Flax NNX modules around the three attention cores (SPEC.md section 6).

Every module is the same shell around a different core:

    q, k, v = q_proj(query), k_proj(key), v_proj(value)      # (b, n, E) -> (b, n, h, E/h)
    o = core(q, k, v, key_padding_mask, is_causal, dropout)  # (b, n, h, E/h)
    o = norm(o.reshape(b, n, E))                             # MAGNETO sub-LayerNorm, if layer_norm
    out = out_proj(o)                                        # (b, n, E)

The parameter tree is named and laid out like the torch mirror's ``state_dict``:
``q_proj.weight`` ``(E, E)`` (out, in), ``q_proj.bias`` ``(E,)``, likewise ``k_proj``, ``v_proj``,
``out_proj``, and ``norm.weight``, ``norm.bias``. ``jax_dilated.convert`` moves weights both ways.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype as flax_promote_dtype

from jax_dilated._config import DilatedConfig, check_dropout, check_key_padding_mask
from jax_dilated._softmax import stats_dtype
from jax_dilated.block_sparse import block_sparse_attention, check_block_options
from jax_dilated.dilated import dilated_attention, improved_dilated_attention
from jax_dilated.ring import ring_dilated_attention

Array = jax.Array


def _xavier_normal(gain: float):
    """Untruncated normal with std ``gain * sqrt(2 / (fan_in + fan_out))`` for an ``(out, in)`` weight."""
    return jax.nn.initializers.variance_scaling(gain ** 2, "fan_avg", "normal", in_axis=1, out_axis=0)


class _Linear(nnx.Module):
    """``y = x W^T + b`` with a torch-layout weight ``(out_features, in_features)``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, gain: float, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.weight = nnx.Param(_xavier_normal(gain)(rngs.params(), (out_features, in_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if bias else nnx.data(None)

    def __call__(self, x: Array, dtype: Any) -> Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class _LayerNorm(nnx.Module):
    """LayerNorm over the last axis with torch names ``weight`` and ``bias``; statistics in float32 or wider."""

    def __init__(self, features: int, *, eps: float, param_dtype: Any):
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        acc = stats_dtype(x.dtype)
        xs = x.astype(acc)
        mean = jnp.mean(xs, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)
        y = (xs - mean) * jax.lax.rsqrt(var + jnp.asarray(self.eps, acc))
        y = y * self.weight[...].astype(acc) + self.bias[...].astype(acc)
        return y.astype(x.dtype)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return value


def _check_module_inputs(query: Array, key: Array, value: Array, key_padding_mask: Array | None,
                         embed_dim: int) -> None:
    """Raise unless query/key/value are ``(b, n, embed_dim)`` floating arrays of one batch and length."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 3:
            raise ValueError(f"{name} has shape {tuple(x.shape)} ({x.ndim}-D); pass a 3-D array (batch, seq, "
                             f"embed_dim={embed_dim}).")
        if x.shape[-1] != embed_dim:
            raise ValueError(f"{name} has feature size {x.shape[-1]} (shape {tuple(x.shape)}); the module's "
                             f"embed_dim is {embed_dim}: project the input to {embed_dim} features.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} has dtype {x.dtype}; pass a floating array (float32, bfloat16, ...).")
    if not query.shape[:2] == key.shape[:2] == value.shape[:2]:
        raise ValueError(
            f"query, key, value have (batch, seq) {tuple(query.shape[:2])}, {tuple(key.shape[:2])}, "
            f"{tuple(value.shape[:2])}; cross-attention needs key and value of the same batch and sequence "
            f"length as the query (pad or cut them to length {query.shape[1]})."
        )
    check_key_padding_mask(key_padding_mask, query.shape[0], query.shape[1])


class _MultiheadAttention(nnx.Module):
    """Projections, sub-LayerNorm, masks and dropout shared by the multi-head modules.

    Subclasses only say which core runs, by implementing :meth:`_attend`.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float, bias: bool, layer_norm: bool,
                 layer_norm_eps: float, gamma_init: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; choose an "
                             f"embed_dim that is a multiple of num_heads, or a num_heads that divides it.")
        check_dropout(dropout, needs_rng=False)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.dtype = dtype
        self.param_dtype = param_dtype
        linear = lambda gain: _Linear(embed_dim, embed_dim, bias=bias, gain=gain, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(1.0)
        self.k_proj = linear(1.0)
        self.v_proj = linear(float(gamma_init))
        self.out_proj = linear(float(gamma_init))
        self.norm = (_LayerNorm(embed_dim, eps=layer_norm_eps, param_dtype=param_dtype) if layer_norm
                     else nnx.data(None))
        # NNX convention (as nnx.Dropout): .train()/.eval() flip this flag; dropout keys come from the
        # `dropout` stream of `rngs`.
        self.deterministic = False
        self.rngs = rngs.dropout.fork() if self.dropout > 0 else nnx.data(None)

    def _attend(self, q: Array, k: Array, v: Array, *, key_padding_mask: Array | None, is_causal: bool,
                dropout_rate: float, dropout_rng: Array | None) -> Array:
        raise NotImplementedError

    def __call__(
        self,
        query: Array,
        key: Array | None = None,
        value: Array | None = None,
        *,
        key_padding_mask: Array | None = None,
        is_causal: bool = False,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | Array | None = None,
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
          deterministic: disable dropout; default the module's flag (``.eval()`` sets it, ``.train()``
            clears it).
          rngs: optional ``nnx.Rngs``, ``nnx.RngStream`` or key overriding the module's dropout stream.

        Returns:
          ``(b, n, E)`` in the computation dtype (``dtype``, else the promotion of input and parameters).
        """
        if key is None:
            if value is not None:
                raise ValueError("value was given without key; pass key as well (value defaults to key, "
                                 "key defaults to query).")
            key = query
        if value is None:
            value = key
        _check_module_inputs(query, key, value, key_padding_mask, self.embed_dim)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(query.dtype, key.dtype, value.dtype,
                                                                           self.param_dtype)
        deterministic = self.deterministic if deterministic is None else deterministic
        rate = 0.0 if deterministic else self.dropout
        dropout_rng = self._dropout_key(rngs) if rate > 0 else None

        b, n, _ = query.shape
        heads = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(query.astype(dtype), dtype).reshape(heads)
        k = self.k_proj(key.astype(dtype), dtype).reshape(heads)
        v = self.v_proj(value.astype(dtype), dtype).reshape(heads)
        o = self._attend(q, k, v, key_padding_mask=key_padding_mask, is_causal=bool(is_causal),
                         dropout_rate=rate, dropout_rng=dropout_rng).reshape(b, n, self.embed_dim)
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
        raise TypeError(f"rngs={rngs!r} cannot give a dropout key; pass nnx.Rngs(dropout=...), an RngStream "
                        f"or a jax.random.key.")


class MultiheadDilatedAttention(_MultiheadAttention):
    """Multi-head dilated attention (LongNet), core :func:`jax_dilated.dilated_attention`.

    Args:
      embed_dim: model width ``E``; a multiple of ``num_heads``.
      num_heads: heads ``h``; head size ``E / h``.
      segment_lengths, dilation_rates, merge: the dilated-attention configuration (SPEC sections 1-3).
      dropout: dropout rate on the attention probabilities (training mode only).
      bias: whether the four projections have biases.
      layer_norm: apply the MAGNETO sub-LayerNorm to the attention output before ``out_proj``.
      layer_norm_eps: its epsilon.
      gamma_init: xavier gain of ``v_proj`` and ``out_proj`` (``q_proj``/``k_proj`` use gain 1).
      dtype: computation dtype (default: promote input and parameter dtypes).
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs``; ``params`` initialises weights, ``dropout`` feeds dropout.

    Example::

        mha = MultiheadDilatedAttention(512, 8, (1024, 2048), (1, 2), rngs=nnx.Rngs(0))
        y = mha(x, is_causal=True)          # x: (b, n, 512), n a multiple of 2048
    """

    _core = staticmethod(dilated_attention)

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], *, dropout: float = 0.0, bias: bool = True,
                 layer_norm: bool = True, layer_norm_eps: float = 1e-5, gamma_init: float = 1.0,
                 merge: str = "head_partition", dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, layer_norm=layer_norm,
                         layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
        cfg.check_heads(num_heads)
        self.segment_lengths = cfg.segment_lengths
        self.dilation_rates = cfg.dilation_rates
        self.merge = cfg.merge

    def _attend(self, q, k, v, **kw):
        return self._core(q, k, v, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                          merge=self.merge, **kw)


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

    Args:
      embed_dim, num_heads, segment_lengths, dilation_rates, ...: as :class:`MultiheadDilatedAttention`.
      mesh: ``jax.sharding.Mesh`` with an axis ``axis_name``, or None.
      axis_name: the mesh axis the sequence is sharded over.

    Example::

        mesh = jax.make_mesh((8,), ("seq",))
        mha = RingMultiheadDilatedAttention(512, 8, (2048, 8192), (1, 4), mesh=mesh, rngs=nnx.Rngs(0))
        y = mha(x)                          # x: (b, n, 512); y sharded along n
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], *, mesh: jax.sharding.Mesh | None = None, axis_name: str = "seq",
                 dropout: float = 0.0, rngs: nnx.Rngs, **kwargs: Any):
        if dropout:
            raise ValueError(f"dropout={dropout}: ring attention has no dropout; pass dropout=0.0 or use "
                             f"ImprovedMultiheadDilatedAttention.")
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, rngs=rngs, **kwargs)
        self.mesh = mesh
        self.axis_name = axis_name

    def _attend(self, q, k, v, *, dropout_rate, dropout_rng, **kw):
        return ring_dilated_attention(q, k, v, segment_lengths=self.segment_lengths,
                                      dilation_rates=self.dilation_rates, merge=self.merge, mesh=self.mesh,
                                      axis_name=self.axis_name, **kw)


class BlockSparseMultiheadDilatedAttention(_MultiheadAttention):
    """Multi-head block-sparse attention, core :func:`jax_dilated.block_sparse_attention`.

    Same structure, parameters and call as :class:`MultiheadDilatedAttention`; the core's options
    ``block_size``, ``pattern``, ``sparsity_ratio`` and ``global_blocks`` (SPEC section 5) replace the
    segment lengths and dilation rates. ``n`` must be a multiple of ``block_size``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, block_size: int = 128,
                 pattern: str = "dilated_sparse", sparsity_ratio: float = 0.9, global_blocks: int = 1,
                 dropout: float = 0.0, bias: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        # the sequence length is unknown here: check the options against a sequence of one block.
        check_block_options(block_size, block_size, pattern, sparsity_ratio, global_blocks)
        self.block_size = int(block_size)
        self.pattern = pattern
        self.sparsity_ratio = float(sparsity_ratio)
        self.global_blocks = int(global_blocks)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, layer_norm=layer_norm,
                         layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def _attend(self, q, k, v, **kw):
        return block_sparse_attention(q, k, v, block_size=self.block_size, pattern=self.pattern,
                                      sparsity_ratio=self.sparsity_ratio, global_blocks=self.global_blocks, **kw)


# ----------------------------------------------------------------------------------------------
# Flax attention_fn adapter.


def _key_padding_from_flax_mask(mask: Array, batch: int, n: int) -> Array:
    """A Flax mask (True = attend) that depends on the key only -> ``(b, n)`` key_padding_mask (True = padding)."""
    shape = tuple(mask.shape)
    if len(shape) != 4 or shape[1:3] != (1, 1) or shape[3] != n or shape[0] not in (1, batch):
        raise ValueError(
            f"mask has shape {shape}; dilated attention can only express a key-padding mask of shape "
            f"(batch, 1, 1, kv_length) = ({batch}, 1, 1, {n}) with True = attend. Build causal masks with "
            f"is_causal=True instead of a (.., q_length, kv_length) mask."
        )
    return jnp.broadcast_to(~mask.astype(jnp.bool_)[:, 0, 0, :], (batch, n))


def _precision_name(precision: Any) -> str | None:
    if precision is None:
        return None
    if isinstance(precision, str):
        precision = jax.lax.Precision(precision)
    if isinstance(precision, jax.lax.Precision):
        return precision.name.lower()
    raise ValueError(f"precision={precision!r} is not supported; pass None, a jax.lax.Precision or one of "
                     f"'default', 'high', 'highest' (one precision for every matmul).")


def dilated_attention_fn(segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                         merge: str = "head_partition", scale: float | None = None,
                         implementation: str = "improved") -> Callable[..., Array]:
    """An ``attention_fn`` for ``nnx.MultiHeadAttention`` that runs dilated attention.

    Args:
      segment_lengths, dilation_rates, merge, scale: as in :func:`jax_dilated.dilated_attention`.
      implementation: ``"improved"`` (fast core) or ``"standard"``.

    Returns:
      ``attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
      dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
      promote_dtype=None, is_causal=False)`` with Flax's ``dot_product_attention`` signature, on
      ``(b, n, h, d)`` arrays. Each argument is honoured or rejected:

      - ``mask`` only as a key-padding mask ``(b or 1, 1, 1, n)``, True = attend; ``bias`` must be None;
      - dropout (``dropout_rate > 0`` and not ``deterministic``) acts on the attention probabilities
        with independent masks, so it needs ``broadcast_dropout=False`` (Flax's default is True);
      - ``module`` (``sow_weights=True``) is rejected: the full attention weights are never formed;
      - ``dtype``/``promote_dtype`` cast q, k, v as Flax does; ``precision`` sets the matmul precision.

    Example::

        mha = nnx.MultiHeadAttention(8, 512, attention_fn=dilated_attention_fn((1024, 2048), (1, 2)),
                                     rngs=nnx.Rngs(0))
    """
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    cores = {"improved": improved_dilated_attention, "standard": dilated_attention}
    if implementation not in cores:
        raise ValueError(f"implementation={implementation!r} is unknown; use one of {tuple(cores)}.")
    core = cores[implementation]

    def attention_fn(query: Array, key: Array, value: Array, bias: Array | None = None, mask: Array | None = None,
                     broadcast_dropout: bool = True, dropout_rng: Array | None = None, dropout_rate: float = 0.0,
                     deterministic: bool = False, dtype: Any = None, precision: Any = None, module: Any = None,
                     promote_dtype: Any = None, is_causal: bool = False) -> Array:
        if bias is not None:
            raise ValueError("bias is not None; dilated attention cannot add an arbitrary attention bias: pass "
                             "bias=None (use mask for key padding and is_causal for causal masking).")
        if module is not None:
            raise ValueError("module is not None (sow_weights=True): dilated attention never forms the full "
                             "attention weights to sow; call the module with sow_weights=False.")
        if query.ndim != 4:
            raise ValueError(f"query has shape {tuple(query.shape)}; dilated_attention_fn takes 4-D "
                             f"(batch, seq, heads, head_dim) arrays: flatten extra batch axes first.")
        promote = promote_dtype if promote_dtype is not None else flax_promote_dtype
        query, key, value = promote((query, key, value), dtype=dtype)
        rate = 0.0 if deterministic else float(dropout_rate)
        if rate > 0 and broadcast_dropout:
            raise ValueError("broadcast_dropout=True shares one dropout mask across the batch, which dilated "
                             "attention does not do; build nnx.MultiHeadAttention(..., broadcast_dropout=False).")
        kpm = None if mask is None else _key_padding_from_flax_mask(mask, query.shape[0], key.shape[1])
        name = _precision_name(precision)
        kw = dict(segment_lengths=cfg.segment_lengths, dilation_rates=cfg.dilation_rates, merge=cfg.merge,
                  scale=scale, is_causal=bool(is_causal), key_padding_mask=kpm, dropout_rate=rate,
                  dropout_rng=dropout_rng if rate > 0 else None)
        if name is None:
            return core(query, key, value, **kw)
        with jax.default_matmul_precision(name):
            return core(query, key, value, **kw)

    return attention_fn
