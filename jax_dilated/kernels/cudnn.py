"""cuDNN's fused attention through ``jax.nn.dot_product_attention(implementation="cudnn")``.

It serves calls that need no log-sum-exp (``merge="head_partition"`` branches): the log-sum-exp JAX
returns with ``return_residual=True`` is in the input dtype and its gradient is dropped (a
``stop_gradient`` in the XLA path, ignored by the cuDNN backward), so a merge built on it would
give wrong ``dq``/``dk``. cuDNN takes float16/bfloat16 and head_dim a multiple of 8 up to 256
(Hopper); JAX's own tests skip cuDNN attention on CUDA 13, which is why a probe
(:func:`jax_dilated.kernels.select.probe`) stands between it and automatic use.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

DTYPES = ("bfloat16", "float16")


def supports(*, dtype: Any, head_dim: int) -> str | None:
    """None when cuDNN attention can take this dtype and head_dim, else a one-line reason."""
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        return f"cuDNN attention takes float16/bfloat16, not {name}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN attention needs head_dim a multiple of 8 and at most 256, not {head_dim}"
    return None


def attention(
    q: Array, k: Array, v: Array, *, scale: float, is_causal: bool = False, kv_valid: Array | None = None
) -> tuple[Array, None]:
    """Softmax attention by cuDNN: ``out`` ``(B, m, h, d)`` in float32 and no log-sum-exp.

    ``q`` ``(B, m, h, d)``, ``k, v`` ``(B, mk, h_kv, d)`` (grouped-query heads as in the XLA kernel);
    ``kv_valid`` must be None (key masks are not taken here).
    """
    if kv_valid is not None:
        raise ValueError("the cuDNN kernel takes no key mask here; use implementation='xla' or 'pallas'.")
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, implementation="cudnn")
    return out.astype(jnp.float32), None
