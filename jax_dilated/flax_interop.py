"""Flax interop: dilated attention as the ``attention_fn`` of ``flax.nnx.MultiHeadAttention``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.nnx.nn.dtypes import promote_dtype as flax_promote_dtype

from dilated_plan import DilatedConfig
from dilated_plan.checks import check_is_causal
from jax_dilated.dilated import dilated_attention, improved_dilated_attention
from jax_dilated.kernels import Backend, resolve

Array = jax.Array


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
    if isinstance(precision, str) and precision.lower() in ("default", "high", "highest"):
        precision = jax.lax.Precision(precision.lower())
    if isinstance(precision, jax.lax.Precision):
        return precision.name.lower()
    raise ValueError(
        f"precision={precision!r} is not supported; pass None, a jax.lax.Precision or one of "
        f"'default', 'high', 'highest' (one precision for every matmul)."
    )


def dilated_attention_fn(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    merge: str = "head_partition",
    scale: float | None = None,
    form: str = "improved",
    implementation: str | Backend | None = None,
) -> Callable[..., Array]:
    """An ``attention_fn`` for ``nnx.MultiHeadAttention`` that runs dilated attention.

    Args:
      segment_lengths, dilation_rates, merge, scale: as in :func:`jax_dilated.dilated_attention`.
      form: ``"improved"`` (fast core) or ``"standard"`` (the readable one).
      implementation: the attention kernel (see :func:`jax_dilated.dilated_attention`).

    Returns:
      ``attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
      dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
      promote_dtype=None, is_causal=False)`` with Flax's ``dot_product_attention`` signature, on
      ``(*batch, n, h, d)`` arrays (key and value may have fewer heads: grouped-query attention, as
      ``nnx.MultiHeadAttention(num_kv_heads=...)`` gives them). Each argument is honoured or rejected:

      - ``mask`` only as a key-padding mask ``(b or 1, 1, 1, n)``, True = attend; ``bias`` must be None;
      - dropout (``dropout_rate > 0`` and not ``deterministic``) acts on the attention probabilities
        with independent masks, so it needs ``broadcast_dropout=False`` (Flax's default is True);
      - ``module`` (``sow_weights=True``) is rejected: the full attention weights are never formed;
      - ``dtype``/``promote_dtype`` cast q, k, v as Flax does; ``precision`` sets the matmul precision.

    >>> from flax import nnx
    >>> mha = nnx.MultiHeadAttention(4, 32, attention_fn=dilated_attention_fn((8, 16), (1, 2)),
    ...                              decode=False, rngs=nnx.Rngs(0))
    >>> mha(jnp.ones((2, 16, 32), jnp.float32)).shape
    (2, 16, 32)
    """
    cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
    cores = {"improved": improved_dilated_attention, "standard": dilated_attention}
    if form not in cores:
        raise ValueError(f"form={form!r} is unknown; use one of {tuple(cores)}.")
    core = cores[form]
    backend = resolve(implementation)

    def attention_fn(
        query: Array,
        key: Array,
        value: Array,
        bias: Array | None = None,
        mask: Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        promote_dtype: Any = None,
        is_causal: bool = False,
    ) -> Array:
        if bias is not None:
            raise ValueError(
                "bias is not None; dilated attention cannot add an arbitrary attention bias: pass "
                "bias=None (use mask for key padding and is_causal for causal masking)."
            )
        if module is not None:
            raise ValueError(
                "module is not None (sow_weights=True): dilated attention never forms the full "
                "attention weights to sow; call the module with sow_weights=False."
            )
        if query.ndim < 4 or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                f"query, key, value have shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}; "
                f"dilated_attention_fn takes (*batch, seq, heads, head_dim) arrays with at least one batch axis."
            )
        lead = query.shape[:-3]  # any number of leading batch axes: flattened into one, restored after
        query, key, value = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
        if mask is not None:
            mask = jnp.asarray(mask)
            mask = jnp.broadcast_to(mask, (*lead, *mask.shape[-3:])).reshape(-1, *mask.shape[-3:])
        promote = promote_dtype if promote_dtype is not None else flax_promote_dtype
        query, key, value = promote((query, key, value), dtype=dtype)
        rate = 0.0 if deterministic else float(dropout_rate)
        if rate > 0 and broadcast_dropout:
            raise ValueError(
                "broadcast_dropout=True shares one dropout mask across the batch, which dilated "
                "attention does not do; build nnx.MultiHeadAttention(..., broadcast_dropout=False)."
            )
        kpm = None if mask is None else _key_padding_from_flax_mask(mask, query.shape[0], key.shape[1])
        name = _precision_name(precision)
        kw: dict[str, Any] = dict(
            segment_lengths=cfg.segment_lengths,
            dilation_rates=cfg.dilation_rates,
            merge=cfg.merge,
            scale=scale,
            is_causal=check_is_causal(is_causal),
            key_padding_mask=kpm,
            dropout_rate=rate,
            dropout_rng=dropout_rng if rate > 0 else None,
            implementation=backend,
        )
        if name is None:
            out = core(query, key, value, **kw)
        else:
            with jax.default_matmul_precision(name):
                out = core(query, key, value, **kw)
        return out.reshape(*lead, *out.shape[1:])

    return attention_fn
