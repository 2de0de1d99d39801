"""Attention kernels: the one primitive every variant calls for its scores.

:func:`attend` is the seam. Every dilated branch, every block-sparse step and every ring hop calls it
with dense attention over many short sequences and gets back the output and the float32
log-sum-exp, with exact gradients through both. ``implementation`` picks the backend:

* ``None``: chosen for the platform (see :func:`resolve`);
* ``"xla"`` or :class:`Xla`: the portable tiled kernel of :mod:`jax_dilated.kernels.xla`;
  ``Xla(tiling=Tiling(...))`` fixes its tiles.
"""

from __future__ import annotations

import dataclasses

import jax

from jax_dilated.kernels.xla import Tiling, flash_attention, reference_attention, stats_dtype

Array = jax.Array

IMPLEMENTATIONS = ("xla",)


@dataclasses.dataclass(frozen=True)
class Xla:
    """The portable XLA kernel; ``tiling=None`` takes :meth:`Tiling.for_platform` of the default backend."""

    tiling: Tiling | None = None


Backend = Xla


def resolve(implementation: str | Backend | None) -> Backend:
    """The backend object for an ``implementation`` argument; a ValueError names an unknown one."""
    if implementation is None or implementation == "xla":
        return Xla()
    if isinstance(implementation, Xla):
        return implementation
    raise ValueError(
        f"implementation={implementation!r} is unknown; use None, one of {IMPLEMENTATIONS} or "
        f"jax_dilated.kernels.Xla(tiling=...)."
    )


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    is_causal: bool = False,
    kv_valid: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: Backend | None = None,
) -> tuple[Array, Array]:
    """Softmax attention with its log-sum-exp on the chosen backend.

    Args:
      q: ``(B, m, h, d)``; k, v: ``(B, mk, h_kv, d)`` with ``h % h_kv == 0`` (grouped-query heads).
      scale, is_causal, kv_valid, dropout_rate, dropout_rng: as in
        :func:`jax_dilated.kernels.xla.flash_attention`.
      implementation: a resolved backend (:func:`resolve`), or None for the default.

    Returns:
      ``out`` ``(B, m, h, d)`` in the statistics dtype and ``lse`` ``(B, m, h)`` (natural log,
      ``-inf`` for a row with no visible key).
    """
    backend = resolve(implementation)
    return flash_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=is_causal,
        kv_valid=kv_valid,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        tiling=backend.tiling,
    )


__all__ = [
    "IMPLEMENTATIONS",
    "Tiling",
    "Xla",
    "attend",
    "flash_attention",
    "reference_attention",
    "resolve",
    "stats_dtype",
]
