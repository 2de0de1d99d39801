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
