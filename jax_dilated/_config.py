"""Validated, hashable configuration of dilated attention and the input checks every variant shares.

The configuration is plain Python (no arrays), so it can be a static argument of ``jax.jit``.
SPEC.md sections 1-3 define the head groups, offsets and the errors raised here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

MERGES = ("head_partition", "lse")


@dataclasses.dataclass(frozen=True)
class Branch:
    """One attention branch: a set of heads that see the same dilated positions.

    Attributes:
      group: index ``i`` of the (segment length, dilation rate) group.
      segment: segment length ``s_i``.
      rate: dilation rate ``r_i``.
      offset: first kept position inside each segment (``0 <= offset < rate``).
      heads: the head indices of the branch, increasing.
    """

    group: int
    segment: int
    rate: int
    offset: int
    heads: tuple[int, ...]


def _as_int_tuple(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (int, np.integer)):
        values = (values,)
    try:
        out = tuple(values)
    except TypeError:
        raise ValueError(f"{name}={values!r} must be a sequence of positive integers, e.g. (1024, 2048).") from None
    for x in out:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise ValueError(f"{name}={values!r} holds {x!r}, which is not an integer; pass whole numbers.")
    return tuple(int(x) for x in out)


@dataclasses.dataclass(frozen=True)
class DilatedConfig:
    """Segment lengths, dilation rates and merge rule of dilated attention (validated on construction).

    Example::

        cfg = DilatedConfig((4, 8), (1, 2))
        cfg.branches(num_heads=3)   # heads 0-1 -> (s=4, r=1, o=0); head 2 -> (s=8, r=2, o=1)
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    merge: str = "head_partition"

    def __post_init__(self) -> None:
        seg = _as_int_tuple("segment_lengths", self.segment_lengths)
        rates = _as_int_tuple("dilation_rates", self.dilation_rates)
        object.__setattr__(self, "segment_lengths", seg)
        object.__setattr__(self, "dilation_rates", rates)
        if not seg:
            raise ValueError("segment_lengths=() is empty; give at least one segment length, e.g. (2048,).")
        if len(seg) != len(rates):
            raise ValueError(
                f"segment_lengths={seg} and dilation_rates={rates} have different lengths "
                f"({len(seg)} vs {len(rates)}); give one dilation rate per segment length."
            )
        for name, vals in (("segment_lengths", seg), ("dilation_rates", rates)):
            for x in vals:
                if x <= 0:
                    raise ValueError(f"{name}={vals} holds {x}; every value must be a positive integer.")
        for s, r in zip(seg, rates):
            if s % r:
                raise ValueError(
                    f"segment length {s} is not divisible by its dilation rate {r}; "
                    f"choose segment_lengths that are multiples of their dilation_rates."
                )
        if self.merge not in MERGES:
            raise ValueError(f"merge={self.merge!r} is unknown; use one of {MERGES}.")

    @property
    def num_groups(self) -> int:
        """Number of (segment, rate) groups ``G``."""
        return len(self.segment_lengths)

    def check_sequence(self, n: int) -> None:
        """Raise ValueError unless every segment length divides the sequence length ``n``."""
        for s in self.segment_lengths:
            if n % s:
                raise ValueError(
                    f"sequence length {n} is not divisible by segment length {s} "
                    f"(segment_lengths={self.segment_lengths}); pad the sequence to a multiple of "
                    f"{int(np.lcm.reduce(self.segment_lengths))} or choose segment lengths that divide {n}."
                )

    def check_heads(self, num_heads: int) -> None:
        """Raise ValueError if ``head_partition`` has fewer heads than groups."""
        if self.merge == "head_partition" and num_heads < self.num_groups:
            raise ValueError(
                f"num_heads={num_heads} is smaller than the number of groups {self.num_groups} "
                f"(segment_lengths={self.segment_lengths}); merge='head_partition' needs at least one head "
                f"per group: use more heads, fewer groups, or merge='lse'."
            )

    def group_sizes(self, num_heads: int) -> tuple[int, ...]:
        """Heads per group under ``head_partition``: ``h // G`` each, one more for the first ``h % G``."""
        g = self.num_groups
        return tuple(num_heads // g + (1 if i < num_heads % g else 0) for i in range(g))

    def branches(self, num_heads: int) -> tuple[Branch, ...]:
        """The attention branches for ``num_heads`` heads, in group order.

        ``head_partition``: one branch per group, contiguous heads, offset ``i % r_i``.
        ``lse``: every group covers every head; head ``j`` uses offset ``j % r_i``, so a group has
        one branch per distinct offset (heads ``o, o + r_i, o + 2 r_i, ...``).
        """
        self.check_heads(num_heads)
        out = []
        if self.merge == "head_partition":
            start = 0
            for i, (size, s, r) in enumerate(zip(self.group_sizes(num_heads), self.segment_lengths, self.dilation_rates)):
                out.append(Branch(i, s, r, i % r, tuple(range(start, start + size))))
                start += size
        else:
            for i, (s, r) in enumerate(zip(self.segment_lengths, self.dilation_rates)):
                for o in range(min(r, num_heads)):
                    out.append(Branch(i, s, r, o, tuple(range(o, num_heads, r))))
        return tuple(out)


def check_qkv(q: Any, k: Any, v: Any) -> None:
    """Raise unless q, k, v are 4-D ``(b, n, h, d)`` arrays of one shape and a floating dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} ({x.ndim}-D); pass 4-D arrays of shape "
                f"(batch, seq, heads, head_dim)."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} has dtype {x.dtype}; pass a floating dtype (float32, float64, bfloat16, float16).")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v have shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; they must be equal "
            f"(batch, seq, heads, head_dim)."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype.")


def check_key_padding_mask(mask: Any, batch: int, n: int) -> None:
    """Raise unless ``mask`` is None or a boolean ``(batch, n)`` array (True = padding)."""
    if mask is None:
        return
    if tuple(mask.shape) != (batch, n):
        raise ValueError(
            f"key_padding_mask has shape {tuple(mask.shape)}; expected (batch, seq) = ({batch}, {n}), "
            f"True where a key is padding."
        )
    if mask.dtype != jnp.bool_:
        raise TypeError(f"key_padding_mask has dtype {mask.dtype}; pass a boolean array (True = padding).")


def check_dropout(rate: float, rng: Any = None, *, needs_rng: bool = True) -> None:
    """Raise unless ``0 <= rate < 1`` and, for a call (``needs_rng``) with ``rate > 0``, a key is given."""
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"dropout rate {rate} is outside [0, 1); pass a probability such as 0.1.")
    if needs_rng and rate > 0.0 and rng is None:
        raise ValueError(f"dropout_rate={rate} needs a dropout_rng key; pass jax.random.key(...).")


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale`` if given, else ``1 / sqrt(head_dim)``."""
    return float(scale) if scale is not None else 1.0 / float(np.sqrt(head_dim))

