"""The validated, hashable configuration of dilated attention: groups, head groups and branches.

docs/semantics.md sections 1-3 define what is computed; this module turns a configuration into the
branches both frameworks run. Plain Python: a :class:`DilatedConfig` is a static argument of
``jax.jit`` and a plain attribute of a torch module.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

from dilated_plan.checks import as_int_tuple, check_dropout_rate, check_heads, check_positive_int

MERGES = ("head_partition", "lse")


@dataclasses.dataclass(frozen=True)
class Branch:
    """One attention branch: a set of heads that see the same dilated positions.

    Attributes:
      group: index ``i`` of the (segment length, dilation rate) group.
      segment: segment length ``s_i``.
      rate: dilation rate ``r_i``.
      offset: first kept position inside each segment (``0 <= offset < rate``).
      heads: the head indices of the branch, increasing and evenly spaced.
    """

    group: int
    segment: int
    rate: int
    offset: int
    heads: tuple[int, ...]

    @property
    def head_slice(self) -> slice:
        """The branch's heads as a slice of the head axis (they are evenly spaced)."""
        step = self.heads[1] - self.heads[0] if len(self.heads) > 1 else 1
        return slice(self.heads[0], self.heads[-1] + 1, step)

    @property
    def kept(self) -> int:
        """Kept positions per segment, ``s / r``."""
        return self.segment // self.rate


@dataclasses.dataclass(frozen=True)
class DilatedConfig:
    """Segment lengths, dilation rates and merge rule of dilated attention (validated on construction).

    >>> cfg = DilatedConfig((4, 8), (1, 2))
    >>> [(br.segment, br.rate, br.offset, br.heads) for br in cfg.branches(num_heads=3)]
    [(4, 1, 0, (0, 1)), (8, 2, 1, (2,))]
    """

    segment_lengths: Sequence[int]  # stored as a tuple (hashable)
    dilation_rates: Sequence[int]
    merge: str = "head_partition"

    def __post_init__(self) -> None:
        seg = as_int_tuple("segment_lengths", self.segment_lengths)
        rates = as_int_tuple("dilation_rates", self.dilation_rates)
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
        for s, r in zip(seg, rates, strict=True):
            if s % r:
                raise ValueError(
                    f"segment length {s} is not divisible by its dilation rate {r}; "
                    f"choose segment_lengths that are multiples of their dilation_rates."
                )
        if not isinstance(self.merge, str) or self.merge not in MERGES:
            raise ValueError(f"merge={self.merge!r} is unknown; use one of {MERGES}.")

    @property
    def num_groups(self) -> int:
        """Number of (segment, rate) groups ``G``."""
        return len(self.segment_lengths)

    @property
    def period(self) -> int:
        """``lcm(s_0, ..., s_{G-1})``: the positions where a segment of every group starts are its multiples."""
        return math.lcm(*self.segment_lengths)

    def check_cache_length(self, max_length: Any) -> int:
        """``max_length`` of a decoding cache, checked: a positive multiple of :attr:`period`.

        A decode step reads the cache in windows that start at segment boundaries, so the cache must
        end at one for every group (semantics section 12).

        >>> DilatedConfig((4, 6), (1, 2)).check_cache_length(24)
        24
        """
        n = check_positive_int("max_length", max_length)
        if n % self.period:
            use = -(-n // self.period) * self.period
            raise ValueError(
                f"max_length={n} is not a multiple of {self.period}, the least common multiple of "
                f"segment_lengths={self.segment_lengths}; use max_length={use}."
            )
        return n

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
            for i, (size, s, r) in enumerate(
                zip(self.group_sizes(num_heads), self.segment_lengths, self.dilation_rates, strict=True)
            ):
                out.append(Branch(i, s, r, i % r, tuple(range(start, start + size))))
                start += size
        else:
            for i, (s, r) in enumerate(zip(self.segment_lengths, self.dilation_rates, strict=True)):
                for o in range(min(r, num_heads)):
                    out.append(Branch(i, s, r, o, tuple(range(o, num_heads, r))))
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class ModuleOptions:
    """The options every multi-head module shares (docs/semantics.md section 6), validated.

    Attributes:
      dropout: dropout rate on the attention probabilities, in ``[0, 1)``.
      bias: whether the four projections have biases.
      layer_norm: whether the MAGNETO sub-LayerNorm normalises the attention output.
      layer_norm_eps: its epsilon.
      gamma_init: xavier gain of ``v_proj`` and ``out_proj``.
      rope_theta: base of the rotary position embedding of q and k (None: no rotary embedding).
    """

    dropout: float = 0.0
    bias: bool = True
    layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    gamma_init: float = 1.0
    rope_theta: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dropout", check_dropout_rate(self.dropout))
        for name in ("bias", "layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} should be a bool (True or False).")
        object.__setattr__(self, "layer_norm_eps", float(self.layer_norm_eps))
        object.__setattr__(self, "gamma_init", float(self.gamma_init))
        if self.rope_theta is not None:
            theta = self.rope_theta
            if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta) or theta <= 1:
                raise ValueError(f"rope_theta={theta!r} should be a finite number > 1 (e.g. 10000.0), or None.")
            object.__setattr__(self, "rope_theta", float(theta))


@dataclasses.dataclass(frozen=True)
class Heads:
    """The head layout of a multi-head module: ``E = h * d``, ``h_kv`` key/value heads (validated).

    >>> Heads(512, 8, 2).head_dim, Heads(512, 8, 2).kv_dim
    (64, 128)
    """

    embed_dim: int
    num_heads: int
    num_kv_heads: int | None = None

    def __post_init__(self) -> None:
        embed_dim, num_heads = check_heads(self.embed_dim, self.num_heads)
        kv = num_heads if self.num_kv_heads is None else check_positive_int("num_kv_heads", self.num_kv_heads)
        if num_heads % kv:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={kv}; each key/value head serves "
                f"num_heads / num_kv_heads query heads: use num_kv_heads in "
                f"{[c for c in range(1, num_heads + 1) if num_heads % c == 0]}."
            )
        object.__setattr__(self, "embed_dim", embed_dim)
        object.__setattr__(self, "num_heads", num_heads)
        object.__setattr__(self, "num_kv_heads", kv)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """``h_kv`` (``num_heads`` when ``num_kv_heads`` was None)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def kv_dim(self) -> int:
        """Width of ``k_proj``/``v_proj``'s output: ``h_kv * d``."""
        return self.kv_heads * self.head_dim


def default_scale(head_dim: int, scale: Any) -> float:
    """``scale`` if given, else ``1 / sqrt(head_dim)``."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


@dataclasses.dataclass(frozen=True)
class KvBucket:
    """Query heads of a branch that share key/value heads in equal numbers: one kernel call.

    Attributes:
      query_heads: the bucket's query heads, grouped by key/value head (kv-major: the ``g`` query heads
        of ``kv_heads[0]``, then those of ``kv_heads[1]``, ...).
      kv_heads: the distinct key/value heads they use, increasing.
    """

    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]

    @property
    def group(self) -> int:
        """Query heads per key/value head in this bucket."""
        return len(self.query_heads) // len(self.kv_heads)


def kv_buckets(heads: Sequence[int], group: int) -> tuple[KvBucket, ...]:
    """Split a branch's query ``heads`` by key/value head (query head ``j`` uses kv head ``j // group``).

    Key/value heads that serve the same number of the branch's query heads form one bucket, so each
    bucket is one grouped-query kernel call over distinct key/value heads: k and v are never repeated.
    A head-partition group that splits a key/value head's query heads gives up to three buckets.

    >>> [(b.query_heads, b.kv_heads) for b in kv_buckets((3, 4, 5), group=4)]
    [((3,), (0,)), ((4, 5), (1,))]
    >>> [(b.query_heads, b.kv_heads) for b in kv_buckets((0, 2, 4, 6), group=4)]
    [((0, 2, 4, 6), (0, 1))]
    """
    by_kv: dict[int, list[int]] = {}
    for j in heads:
        by_kv.setdefault(j // group, []).append(j)
    by_size: dict[int, list[int]] = {}
    for kv, queries in by_kv.items():
        by_size.setdefault(len(queries), []).append(kv)
    return tuple(KvBucket(tuple(j for kv in kvs for j in by_kv[kv]), tuple(kvs)) for _, kvs in sorted(by_size.items()))


class StackedBuckets(NamedTuple):
    """A branch's :func:`kv_buckets` laid end to end on the head axis (one array per tile, sliced per bucket).

    ``query_heads``/``kv_heads``: the heads in bucket order; ``query_offsets``/``kv_offsets``: bucket
    ``u`` is ``[offsets[u], offsets[u + 1])`` of them; ``order``: the permutation back to the branch's
    head order (``stacked[:, :, order]``); ``many``: more than one bucket (else no reordering is needed).
    """

    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    query_offsets: tuple[int, ...]
    kv_offsets: tuple[int, ...]
    order: tuple[int, ...]
    many: bool


def stacked_buckets(heads: Sequence[int], group: int) -> StackedBuckets:
    """:func:`kv_buckets` of ``heads`` stacked (the ring's spanning branches keep every bucket in one block).

    >>> stacked_buckets((3, 4, 5), group=4)[:5]
    ((3, 4, 5), (0, 1), (0, 1, 3), (0, 1, 2), (0, 1, 2))
    """
    buckets = kv_buckets(heads, group)
    q_heads = tuple(j for u in buckets for j in u.query_heads)
    kv_heads = tuple(j for u in buckets for j in u.kv_heads)
    q_offsets, kv_offsets = [0], [0]
    for u in buckets:
        q_offsets.append(q_offsets[-1] + len(u.query_heads))
        kv_offsets.append(kv_offsets[-1] + len(u.kv_heads))
    order = tuple(sorted(range(len(q_heads)), key=q_heads.__getitem__))
    return StackedBuckets(q_heads, kv_heads, tuple(q_offsets), tuple(kv_offsets), order, len(buckets) > 1)


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of whole segments of a branch: positions ``[start, start + length)`` of the sequence.

    ``branch`` is the branch with the segment length the piece is cut into: the branch's own for the
    whole segments, the last (shorter) segment's length rounded up to a multiple of the rate for the
    rest of a sequence that is not a multiple of the segment length. ``padded`` is the piece's length
    after that rounding (the extra positions do not exist: masked as keys, dropped as queries).
    """

    start: int
    length: int
    branch: Branch

    @property
    def padded(self) -> int:
        return -(-self.length // self.branch.segment) * self.branch.segment


def branch_pieces(n: int, br: Branch) -> tuple[Piece, ...]:
    """The whole segments of ``br`` in ``[0, n)``, then the shorter last segment (the any-length rule).

    >>> [(p.start, p.length, p.branch.segment, p.padded) for p in branch_pieces(10, Branch(0, 4, 2, 1, (0,)))]
    [(0, 8, 4, 8), (8, 2, 2, 2)]
    >>> [(p.start, p.length, p.branch.segment, p.padded) for p in branch_pieces(7, Branch(0, 8, 4, 0, (0,)))]
    [(0, 7, 8, 8)]
    """
    full, rest = divmod(n, br.segment)
    pieces = [Piece(0, full * br.segment, br)] if full else []
    if rest:
        last = -(-rest // br.rate) * br.rate
        pieces.append(Piece(full * br.segment, rest, dataclasses.replace(br, segment=last)))
    return tuple(pieces)
