"""Framework-free argument checks shared by every public entry point of both packages.

Each check raises our own ValueError or TypeError naming the value and the fix; the frameworks add
only what needs their array types (dtype predicates).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def as_int_tuple(name: str, values: Any) -> tuple[int, ...]:
    """A sequence of integers (Python or NumPy; a single integer is a sequence of one) as a tuple."""
    if isinstance(values, (int, np.integer)) and not isinstance(values, (bool, np.bool_)):
        values = (values,)
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name}={values!r} is a string; pass a sequence of positive integers, e.g. (1024, 2048).")
    try:
        out = tuple(values)
    except TypeError:
        raise ValueError(f"{name}={values!r} must be a sequence of positive integers, e.g. (1024, 2048).") from None
    for x in out:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise ValueError(f"{name}={values!r} holds {x!r}, which is not an integer; pass whole numbers.")
    return tuple(int(x) for x in out)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer (Python or NumPy), else a ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return int(value)


_STATIC = "it is a static setting: pass a Python value (under jax.jit, a static argument: static_argnames)"


def _concrete_float(name: str, value: Any) -> float:
    """``float(value)`` for a Python or NumPy real number (or a concrete 0-d array), else a TypeError."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or getattr(value, "ndim", 0) != 0:
        raise TypeError(f"{name}={value!r} should be a real number.")
    try:
        return float(value)
    except Exception as exc:  # a traced value (ConcretizationTypeError), or no __float__
        raise TypeError(f"{name}={value!r} should be a concrete real number; {_STATIC}.") from exc


def check_dropout_rate(rate: Any, name: str = "dropout rate") -> float:
    """``rate`` as a float if it is a number in ``[0, 1)``."""
    value = _concrete_float(name, rate)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} {rate!r} is outside [0, 1); pass a probability such as 0.1.")
    return value


def check_is_causal(value: Any) -> bool:
    """``is_causal`` as a bool: True/False (NumPy bools and the ints 0/1 too); anything else a TypeError.

    A string is refused rather than read by truthiness (``"False"`` would mean causal).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    kind = "a traced value" if "Trace" in type(value).__name__ else type(value).__name__
    raise TypeError(f"is_causal={value!r} ({kind}) should be True or False; {_STATIC}.")


def check_scale(scale: Any) -> float | None:
    """``scale`` as a float (None stays None: ``1 / sqrt(d)``); it must be finite.

    ``scale=0`` is allowed and gives every visible key the same weight (the mean of their values); a
    negative scale prefers the least similar keys. NaN or infinite scales are refused: they make every
    score non-finite.
    """
    if scale is None:
        return None
    value = _concrete_float("scale", scale)
    if not math.isfinite(value):
        raise ValueError(f"scale={scale!r} is not finite; pass a finite number, or None for 1 / sqrt(head_dim).")
    return value


def check_lcm(values: tuple[int, ...]) -> int:
    """The least common multiple of positive integers, exact (Python integers never wrap)."""
    return math.lcm(*values)


def check_qkv(q: Any, k: Any, v: Any, is_floating) -> None:
    """Raise unless q ``(b, n, h, d)`` and k, v ``(b, n, h_kv, d)`` are 4-D arrays of one floating dtype.

    ``h`` must be a multiple of ``h_kv`` (grouped-query attention; ``h_kv = h`` is ordinary
    multi-head attention). ``is_floating(x)`` is the framework's dtype predicate.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
            raise TypeError(
                f"{name} is a {type(x).__name__}; pass an array (torch: a torch.Tensor) of shape "
                f"(batch, seq, heads, head_dim)."
            )
        if x.ndim != 4:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} ({x.ndim}-D); pass 4-D arrays of shape "
                f"(batch, seq, heads, head_dim)."
            )
        if not is_floating(x):
            raise TypeError(f"{name} has dtype {x.dtype}; pass a floating dtype (float32, float64, bfloat16, float16).")
    if tuple(k.shape) != tuple(v.shape) or tuple(q.shape[:2]) + (q.shape[3],) != tuple(k.shape[:2]) + (k.shape[3],):
        raise ValueError(
            f"q, k, v have shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; they must be equal "
            f"(batch, seq, heads, head_dim), except that k and v may have fewer heads than q (grouped-query "
            f"attention)."
        )
    h, h_kv = q.shape[2], k.shape[2]
    if h_kv == 0 and h == 0:
        pass
    elif h_kv == 0 or h % h_kv:
        raise ValueError(
            f"q has h={h} heads and k, v have h_kv={h_kv}; grouped-query attention needs h to be a multiple of "
            f"h_kv (each key/value head serves h / h_kv query heads): use h_kv in "
            f"{[c for c in range(1, h + 1) if h % c == 0]}."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype.")


def _check_per_position(name: str, x: Any, batch: int, n: int, has_kind, kind: str, meaning: str) -> None:
    """Raise unless ``x`` is None or a ``(batch, n)`` array for which ``has_kind(x)`` holds."""
    if x is None:
        return
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} is a {type(x).__name__}; pass a {kind} (batch, seq) array.")
    if tuple(x.shape) != (batch, n):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (batch, seq) = ({batch}, {n}), {meaning}.")
    if not has_kind(x):
        raise TypeError(f"{name} has dtype {x.dtype}; pass a {kind} array ({meaning}).")


def check_key_padding_mask(mask: Any, batch: int, n: int, is_bool) -> None:
    """Raise unless ``mask`` is None or a boolean ``(batch, n)`` array (True = padding)."""
    _check_per_position("key_padding_mask", mask, batch, n, is_bool, "boolean", "True where a key is padding")


def check_module_inputs(query: Any, key: Any, value: Any, embed_dim: int, is_floating) -> None:
    """Raise unless query/key/value are ``(b, n, embed_dim)`` floating arrays of one batch and length."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 3:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} ({x.ndim}-D); pass a 3-D array (batch, seq, embed_dim={embed_dim})."
            )
        if x.shape[-1] != embed_dim:
            raise ValueError(
                f"{name} has feature size {x.shape[-1]} (shape {tuple(x.shape)}); the module's "
                f"embed_dim is {embed_dim}: project the input to {embed_dim} features."
            )
        if not is_floating(x):
            raise TypeError(f"{name} has dtype {x.dtype}; pass a floating array (float32, bfloat16, ...).")
    if not tuple(query.shape[:2]) == tuple(key.shape[:2]) == tuple(value.shape[:2]):
        raise ValueError(
            f"query, key, value have (batch, seq) {tuple(query.shape[:2])}, {tuple(key.shape[:2])}, "
            f"{tuple(value.shape[:2])}; cross-attention needs key and value of the same batch and sequence "
            f"length as the query (pad or cut them to length {query.shape[1]})."
        )


def check_heads(embed_dim: Any, num_heads: Any) -> tuple[int, int]:
    """``(embed_dim, num_heads)`` as ints, positive, ``embed_dim`` a multiple of ``num_heads``."""
    embed_dim = check_positive_int("embed_dim", embed_dim)
    num_heads = check_positive_int("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(
            f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; choose an "
            f"embed_dim that is a multiple of num_heads, or a num_heads that divides it."
        )
    return embed_dim, num_heads


def default_key_value(query: Any, key: Any, value: Any) -> tuple[Any, Any]:
    """``key`` defaults to ``query`` and ``value`` to ``key`` (a value without a key is an error)."""
    if key is None:
        if value is not None:
            raise ValueError(
                "value was given without key; pass key as well (value defaults to key, key defaults to query)."
            )
        key = query
    return key, key if value is None else value


def check_document_ids(ids: Any, batch: int, n: int, is_integer) -> None:
    """Raise unless ``ids`` is None or an integer ``(batch, n)`` array (one document id per position)."""
    meaning = "one integer per position (a document is a maximal run of equal ids)"
    _check_per_position("document_ids", ids, batch, n, is_integer, "integer", meaning)


def check_generation(prompt_length: int, max_new_tokens: Any, temperature: Any, top_k: Any, vocab_size: int) -> None:
    """Raise unless the arguments of ``LongNetLM.generate`` make sense (both frameworks)."""
    if prompt_length < 1:
        raise ValueError("tokens holds an empty prompt; generation needs at least one token per row (e.g. a BOS id).")
    if (
        isinstance(max_new_tokens, (bool, np.bool_))
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} should be an integer >= 0.")
    if (
        isinstance(temperature, (bool, np.bool_))
        or not isinstance(temperature, numbers.Real)
        or not (math.isfinite(temperature) and float(temperature) >= 0)
    ):
        raise ValueError(f"temperature={temperature!r} should be a finite number >= 0 (0 is greedy decoding).")
    if top_k is not None and (
        isinstance(top_k, (bool, np.bool_))
        or not isinstance(top_k, (int, np.integer))
        or not 1 <= int(top_k) <= vocab_size
    ):
        raise ValueError(f"top_k={top_k!r} should be None or an integer in [1, vocab_size={vocab_size}].")
