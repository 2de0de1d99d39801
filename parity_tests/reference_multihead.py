"""Float64 NumPy reference of the multi-head modules (docs/semantics.md section 6), built from a state dict.

Projections, a core from ``parity_tests.reference``, the sub-LayerNorm and the output projection,
written out plainly. Tests only.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from parity_tests import reference, reference_block_sparse


def _linear(state: Mapping[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    y = x @ np.asarray(state[f"{name}.weight"], np.float64).T
    if f"{name}.bias" in state:
        y = y + np.asarray(state[f"{name}.bias"], np.float64)
    return y


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def dilated_core(segment_lengths, dilation_rates, merge="head_partition") -> Callable:
    """Core ``(q, k, v, is_causal, key_padding_mask) -> out`` of dilated attention, ``(b, n, h, d)``."""

    def core(q, k, v, is_causal, key_padding_mask):
        return reference.dilated_attention(q, k, v, segment_lengths, dilation_rates, is_causal=is_causal,
                                           merge=merge, key_padding_mask=key_padding_mask)

    return core


def block_sparse_core(**options) -> Callable:
    """Core of block-sparse attention with the given options (block_size, pattern, ...), from
    ``parity_tests.reference_block_sparse`` (the plain rendering of semantics section 5)."""

    def core(q, k, v, is_causal, key_padding_mask):
        return reference_block_sparse.block_sparse_attention(q, k, v, is_causal=is_causal,
                                                             key_padding_mask=key_padding_mask, **options)

    return core


def multihead(state: Mapping[str, np.ndarray], core: Callable, query, key=None, value=None, *, num_heads: int,
              key_padding_mask=None, is_causal: bool = False, layer_norm_eps: float = 1e-5) -> np.ndarray:
    """The multi-head module in float64: ``(b, n, E)`` inputs -> ``(b, n, E)``.

    ``state`` holds ``q_proj.weight`` ... ``out_proj.bias`` and, when the module has the sub-LayerNorm,
    ``norm.weight``/``norm.bias``.
    """
    query = np.asarray(query, np.float64)
    key = query if key is None else np.asarray(key, np.float64)
    value = key if value is None else np.asarray(value, np.float64)
    b, n, e = query.shape
    split = lambda x: x.reshape(b, n, num_heads, e // num_heads)
    q = split(_linear(state, "q_proj", query))
    k = split(_linear(state, "k_proj", key))
    v = split(_linear(state, "v_proj", value))
    o = core(q, k, v, is_causal, key_padding_mask).reshape(b, n, e)
    if "norm.weight" in state:
        o = _layer_norm(o, np.asarray(state["norm.weight"], np.float64), np.asarray(state["norm.bias"], np.float64),
                        layer_norm_eps)
    return _linear(state, "out_proj", o)
