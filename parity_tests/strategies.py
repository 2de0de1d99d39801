"""Hypothesis strategies for dilated-attention configurations and inputs (shared by the parity tests)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st


@st.composite
def dilated_configs(draw, max_groups: int = 3, max_n: int = 48, merges=("head_partition", "lse")):
    """A valid configuration: dict with b, n, h, d, segment_lengths, dilation_rates, is_causal, merge."""
    g = draw(st.integers(1, max_groups))
    rates = [draw(st.integers(1, 3)) for _ in range(g)]
    segs = [r * draw(st.integers(1, 4)) for r in rates]
    base = math.lcm(*segs)
    if base > max_n:
        segs, rates = [segs[0]], [rates[0]]
        base = segs[0]
    n = base * draw(st.integers(1, max(1, max_n // base)))
    merge = draw(st.sampled_from(merges))
    h_min = len(segs) if merge == "head_partition" else 1
    return dict(
        b=draw(st.integers(1, 2)),
        n=n,
        h=draw(st.integers(h_min, 5)),
        d=draw(st.sampled_from([2, 4, 8])),
        segment_lengths=tuple(segs),
        dilation_rates=tuple(rates),
        is_causal=draw(st.booleans()),
        merge=merge,
    )


def random_qkv(rng: np.random.Generator, b: int, n: int, h: int, d: int, dtype=np.float64, scale: float = 1.0):
    """Three fresh standard-normal ``(b, n, h, d)`` arrays times ``scale``."""
    return tuple((scale * rng.standard_normal((b, n, h, d))).astype(dtype) for _ in range(3))


def random_padding(rng: np.random.Generator, b: int, n: int, p: float = 0.3) -> np.ndarray:
    """``(b, n)`` boolean, True = padding, each key padded with probability ``p``."""
    return rng.random((b, n)) < p
