"""Attention kernels: the one primitive every variant calls for its scores.

:func:`attend` is the seam. Every dilated branch, every block-sparse step and every ring hop calls it
with dense attention over many short sequences and gets back the output and the float32
log-sum-exp, with exact gradients through both. ``implementation`` picks the backend, as in
``jax.nn.dot_product_attention``:

* ``None`` (:class:`Auto`): chosen per call by :func:`jax_dilated.kernels.select.choose` (the
  platform, dtype, head_dim and what the call needs), behind a one-time probe on the device;
* ``"xla"`` or :class:`Xla`: the portable tiled kernel (:mod:`jax_dilated.kernels.xla`);
  ``Xla(tiling=Tiling(...))`` fixes its tiles;
* ``"pallas"`` or :class:`Pallas`: our Pallas flash kernel (:mod:`jax_dilated.kernels.pallas`) on
  NVIDIA GPUs, interpreted on the CPU; ``Pallas(config=PallasConfig(...))`` fixes its blocks;
* ``"cudnn"`` or :class:`Cudnn`: cuDNN through ``jax.nn.dot_product_attention`` where it applies.

A backend named explicitly that cannot serve a call raises a ValueError with the reason; one chosen
automatically is skipped instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jax_dilated.kernels import cudnn, pallas, select, xla
from jax_dilated.kernels.pallas import PallasConfig
from jax_dilated.kernels.select import IMPLEMENTATIONS, CallShape
from jax_dilated.kernels.xla import Tiling, reference_attention, stats_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Auto:
    """Choose the kernel per call (``implementation=None``)."""


@dataclasses.dataclass(frozen=True)
class Xla:
    """The portable XLA kernel; ``tiling=None`` takes :meth:`Tiling.for_platform` of the default backend."""

    tiling: Tiling | None = None


@dataclasses.dataclass(frozen=True)
class Pallas:
    """Our Pallas flash kernel; ``config=None`` takes :class:`PallasConfig`'s defaults."""

    config: PallasConfig | None = None


@dataclasses.dataclass(frozen=True)
class Cudnn:
    """cuDNN's fused attention (half precision, no log-sum-exp, no key mask)."""


Backend = Auto | Xla | Pallas | Cudnn
_NAMES: dict[str, Xla | Pallas | Cudnn] = {"xla": Xla(), "pallas": Pallas(), "cudnn": Cudnn()}


def resolve(implementation: str | Backend | None) -> Backend:
    """The backend object for an ``implementation`` argument; a ValueError names an unknown one."""
    if implementation is None:
        return Auto()
    if isinstance(implementation, (Auto, Xla, Pallas, Cudnn)):
        return implementation
    if isinstance(implementation, str) and implementation in _NAMES:
        return _NAMES[implementation]
    raise ValueError(
        f"implementation={implementation!r} is unknown; use None, one of {IMPLEMENTATIONS}, or a "
        f"jax_dilated.kernels backend such as Xla(tiling=...) or Pallas(config=...)."
    )


def _name(backend: Backend) -> str:
    return {Xla: "xla", Pallas: "pallas", Cudnn: "cudnn"}[type(backend)]


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    is_causal: bool = False,
    kv_valid: Array | None = None,
    q_ids: Array | None = None,
    kv_ids: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    need_lse: bool = True,
    implementation: str | Backend | None = None,
) -> tuple[Array, Array | None]:
    """Softmax attention with its log-sum-exp on the chosen backend.

    Args:
      q: ``(B, m, h, d)``; k, v: ``(B, mk, h_kv, d)`` with ``h % h_kv == 0`` (grouped-query heads:
        query head ``j`` uses key/value head ``j // (h / h_kv)``).
      scale, is_causal, kv_valid, q_ids, kv_ids, dropout_rate, dropout_rng: as in
        :func:`jax_dilated.kernels.xla.flash_attention`.
      need_lse: whether the caller uses the log-sum-exp; with False a backend that has none (cuDNN)
        may serve the call and return None for it.
      implementation: see the module docstring.

    Returns:
      ``out`` ``(B, m, h, d)`` in the statistics dtype and ``lse`` ``(B, m, h)`` (natural log,
      ``-inf`` for a row with no visible key), or None when ``need_lse`` is False and the backend
      has none.
    """
    backend = resolve(implementation)
    call = CallShape(
        platform=jax.default_backend(),
        dtype=jnp.dtype(q.dtype).name,
        head_dim=q.shape[-1],
        is_causal=bool(is_causal),
        need_lse=bool(need_lse),
        has_mask=kv_valid is not None,
        dropout=dropout_rate > 0.0,
        has_ids=q_ids is not None,
    )
    chosen: Xla | Pallas | Cudnn
    if isinstance(backend, Auto):
        chosen = _NAMES[select.choose(call)]
    else:
        chosen = backend
        reason = select.unsupported(_name(chosen), call)
        if reason is not None:
            raise ValueError(f"implementation={_name(chosen)!r} cannot serve this call: {reason}.")
    kw: dict[str, Any] = dict(scale=scale, is_causal=is_causal, kv_valid=kv_valid)
    if isinstance(chosen, Pallas):
        return pallas.flash_attention(q, k, v, config=chosen.config, **kw)
    if isinstance(chosen, Cudnn):
        return cudnn.attention(q, k, v, **kw)
    return xla.flash_attention(
        q,
        k,
        v,
        q_ids=q_ids,
        kv_ids=kv_ids,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        tiling=chosen.tiling,
        **kw,
    )


__all__ = [
    "IMPLEMENTATIONS",
    "Auto",
    "Backend",
    "CallShape",
    "Cudnn",
    "Pallas",
    "PallasConfig",
    "Tiling",
    "Xla",
    "attend",
    "reference_attention",
    "resolve",
    "stats_dtype",
]
