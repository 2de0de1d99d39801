"""The layers the multi-head modules and the model are built from, with torch-layout parameters.

``Linear`` keeps its weight as ``(out_features, in_features)`` and ``LayerNorm`` names its
parameters ``weight``/``bias``, as ``torch.nn`` does, so that weights convert name for name
(:mod:`jax_dilated.convert`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_dilated.kernels import stats_dtype

Array = jax.Array


def xavier_normal(gain: float) -> jax.nn.initializers.Initializer:
    """Untruncated normal with std ``gain * sqrt(2 / (fan_in + fan_out))`` for an ``(out, in)`` weight."""
    return jax.nn.initializers.variance_scaling(gain**2, "fan_avg", "normal", in_axis=1, out_axis=0)


class Linear(nnx.Module):
    """``y = x W^T + b`` with a torch-layout weight ``(out_features, in_features)``.

    >>> layer = Linear(4, 3, bias=True, gain=1.0, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 4)), jnp.float32).shape
    (2, 3)
    """

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, gain: float, param_dtype: Any, rngs: nnx.Rngs
    ):
        self.weight = nnx.Param(xavier_normal(gain)(rngs.params(), (out_features, in_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if bias else nnx.data(None)

    def __call__(self, x: Array, dtype: Any) -> Array:
        """``(..., in_features)`` -> ``(..., out_features)``, computed in ``dtype``."""
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with torch names ``weight`` and ``bias``; statistics in float32 or wider.

    >>> LayerNorm(4, eps=1e-5, param_dtype=jnp.float32)(jnp.arange(8.0).reshape(2, 4)).shape
    (2, 4)
    """

    def __init__(self, features: int, *, eps: float, param_dtype: Any):
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        """``(..., features)`` -> the same shape and dtype."""
        acc = stats_dtype(x.dtype)
        xs = x.astype(acc)
        mean = jnp.mean(xs, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)
        y = (xs - mean) * jax.lax.rsqrt(var + jnp.asarray(self.eps, acc))
        y = y * self.weight[...].astype(acc) + self.bias[...].astype(acc)
        return y.astype(x.dtype)


def positions(batch: int, n: int, document_ids: Array | None = None) -> Array:
    """``(b, n)`` position of every token: ``0 .. n-1``, or counted from its document's start."""
    p = jnp.broadcast_to(jnp.arange(n), (batch, n))
    if document_ids is None:
        return p
    new = (
        jnp.concatenate([jnp.ones((batch, 1), bool), document_ids[:, 1:] != document_ids[:, :-1]], axis=1)
        if n
        else jnp.zeros((batch, 0), bool)
    )
    return p - jax.lax.cummax(jnp.where(new, p, 0), axis=1)


def rotary(x: Array, pos: Array, theta: float) -> Array:
    """The rotary position embedding of ``x`` ``(b, n, h, d)`` (``d`` even) at positions ``pos`` ``(b, n)``.

    Channel pairs ``(i, i + d/2)`` rotate by ``pos * theta**(-2i/d)`` (the "rotate half" layout of
    GPT-NeoX and Llama), computed in float32 (float64 for float64) and cast back.

    >>> rotary(jnp.ones((1, 3, 2, 4), jnp.float32), positions(1, 3), 10000.0).shape
    (1, 3, 2, 4)
    """
    d = x.shape[-1]
    acc = stats_dtype(x.dtype)
    half = d // 2
    freqs = jnp.asarray(theta, acc) ** (-jnp.arange(half, dtype=acc) * 2 / d)
    angles = pos.astype(acc)[..., None] * freqs  # (b, n, d/2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(acc), x[..., half:].astype(acc)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
