"""Input checks of the JAX package: the shared plan's checks (:mod:`dilated_plan.checks`) on JAX arrays."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dilated_plan import checks as plan_checks
from dilated_plan.checks import check_dropout_rate


def _is_floating(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _is_bool(x: Any) -> bool:
    return x.dtype == jnp.bool_


def as_array(name: str, x: Any) -> Any:
    """``jnp.asarray(x)`` (None stays None), or our TypeError naming ``name`` if JAX cannot read it."""
    if x is None:
        return None
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} is a {type(x).__name__} that is not an array ({exc}); pass an array.") from None


def check_qkv(q: Any, k: Any, v: Any) -> None:
    """Raise unless q, k, v are 4-D ``(b, n, h, d)`` arrays of one shape and one floating dtype."""
    plan_checks.check_qkv(q, k, v, _is_floating)


def check_key_padding_mask(mask: Any, batch: int, n: int) -> None:
    """Raise unless ``mask`` is None or a boolean ``(batch, n)`` array (True = padding)."""
    plan_checks.check_key_padding_mask(mask, batch, n, _is_bool)


def check_dropout(rate: Any, rng: Any = None, *, needs_rng: bool = True) -> float:
    """``rate`` as a float if it is in ``[0, 1)``; a call (``needs_rng``) with ``rate > 0`` needs a key."""
    rate = check_dropout_rate(rate)
    if needs_rng and rate > 0.0 and rng is None:
        raise ValueError(f"dropout_rate={rate} needs a dropout_rng key; pass jax.random.key(...).")
    if rng is not None:
        check_key(rng)
    return rate


def check_key(rng: Any) -> None:
    """Raise unless ``rng`` is one PRNG key: a typed key of shape ``()`` or a raw ``uint32`` ``(2,)`` key."""
    dtype = getattr(rng, "dtype", None)
    shape = tuple(getattr(rng, "shape", ()))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if (typed and shape == ()) or (dtype == jnp.uint32 and shape == (2,)):
        return
    raise TypeError(
        f"dropout_rng={rng!r} should be one PRNG key, e.g. jax.random.key(0) (shape (), or a raw uint32 (2,) "
        f"key); got {type(rng).__name__} of shape {shape}. Split a batch of keys yourself and pass one."
    )


def check_module_inputs(query: Any, key: Any, value: Any, key_padding_mask: Any, embed_dim: int) -> None:
    """Raise unless query/key/value are ``(b, n, embed_dim)`` floating arrays and the mask fits them."""
    plan_checks.check_module_inputs(query, key, value, embed_dim, _is_floating)
    check_key_padding_mask(key_padding_mask, query.shape[0], query.shape[1])


def check_document_ids(ids: Any, batch: int, n: int) -> None:
    """Raise unless ``ids`` is None or an integer ``(batch, n)`` array."""
    plan_checks.check_document_ids(ids, batch, n, lambda x: jnp.issubdtype(x.dtype, jnp.integer))
