"""The sharding plan of ring dilated attention (docs/semantics.md section 7, docs/ring.md).

Plain Python, shared by both frameworks: the sequence layout over the devices (contiguous chunks or
the zigzag layout), the constraints and their error messages, which devices pass key/value blocks to
which (the rings of each group), which (query part, key part) tiles every device computes at every
hop, and the per-device work that follows from that.

Layouts. ``P`` devices, chunk ``c = n / P``.

* ``load_balance=None`` (contiguous): device ``p`` holds positions ``[p c, (p + 1) c)``, one *part*
  of length ``c``.
* ``load_balance="zigzag"``: the sequence is cut into ``2P`` half-chunks of length ``c / 2``;
  device ``j`` holds half-chunks ``j`` and ``2P - 1 - j`` (MaxText's ``dual_chunk_swap``), two parts.
  :func:`zigzag_order` is the permutation of positions; the caller reorders its arrays once per
  batch (``to_zigzag``), masks and causality keep using original positions.

A group whose segments fit in a part is *local* (no communication); a group whose segment length is
a multiple of the part length is *spanning*: the devices holding parts of the same segments form a
ring and pass their dilated key/value blocks around it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dilated_plan.config import DilatedConfig

LOAD_BALANCES = (None, "zigzag")

SKIP, FULL, CAUSAL = 0, 1, 2  # what a device does with one (query part, key part) tile


def check_load_balance(load_balance: Any) -> str | None:
    """``load_balance`` if it is ``None`` or ``"zigzag"``, else a ValueError naming the choices."""
    if load_balance is not None and (not isinstance(load_balance, str) or load_balance not in LOAD_BALANCES[1:]):
        raise ValueError(
            f"load_balance={load_balance!r} is unknown; use None (contiguous chunks) or 'zigzag' "
            f"(device j holds half-chunks j and 2P-1-j; reorder inputs with to_zigzag)."
        )
    return load_balance


def zigzag_order(n: int, num_devices: int) -> np.ndarray:
    """Original position of each position of the zigzag layout: ``x_zigzag = x[:, order]``.

    The ``2P`` half-chunks of length ``n / (2P)`` are laid out as ``0, 2P-1, 1, 2P-2, ...``, so the
    contiguous chunk ``j`` of the result holds half-chunks ``j`` and ``2P - 1 - j``.

    Raises:
      ValueError: ``n`` is not a multiple of ``2P``.

    >>> zigzag_order(8, 2).tolist()
    [0, 1, 6, 7, 2, 3, 4, 5]
    """
    p = int(num_devices)
    if p <= 0:
        raise ValueError(f"num_devices={num_devices!r} must be a positive integer.")
    if n % (2 * p):
        raise ValueError(
            f"zigzag layout: sequence length n={n} is not a multiple of 2P={2 * p} (P={p} devices, two "
            f"half-chunks each); pad the sequence to n={-(-n // (2 * p)) * 2 * p} and mark the padding in "
            f"key_padding_mask (the outputs at real positions are exact), or use load_balance=None."
        )
    half = n // (2 * p)
    halves = [i for j in range(p) for i in (j, 2 * p - 1 - j)]
    return (np.asarray(halves)[:, None] * half + np.arange(half)[None, :]).reshape(-1)


def zigzag_inverse(n: int, num_devices: int) -> np.ndarray:
    """The inverse permutation of :func:`zigzag_order`: ``x = x_zigzag[:, inverse]``."""
    return np.argsort(zigzag_order(n, num_devices))


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """A checked ring plan: layout, rings and tile schedule (build it with :func:`ring_layout`).

    Attributes:
      n: sequence length (already a valid one: see :func:`ring_padded_length`).
      num_devices: ``P``.
      cfg: the configuration.
      load_balance: ``None`` or ``"zigzag"``.
    """

    n: int
    num_devices: int
    cfg: DilatedConfig
    load_balance: str | None = None

    @property
    def chunk(self) -> int:
        """Positions per device, ``c = n / P``."""
        return self.n // self.num_devices

    @property
    def parts(self) -> int:
        """Contiguous runs of positions per device: 1 (contiguous) or 2 (zigzag)."""
        return 1 if self.load_balance is None else 2

    @property
    def part(self) -> int:
        """Length of one part: ``c`` or ``c / 2``."""
        return self.chunk // self.parts

    def part_index(self, device: int, j: int) -> int:
        """Global index (in units of :attr:`part`) of part ``j`` of ``device``."""
        if self.load_balance is None:
            return device
        return device if j == 0 else 2 * self.num_devices - 1 - device

    def local(self, group: int) -> bool:
        """Whether the segments of ``group`` fit in a part (no communication)."""
        return self.part % self.cfg.segment_lengths[group] == 0

    def rings(self, group: int) -> tuple[tuple[int, ...], ...]:
        """The device rings of a spanning group, each in send order (device ``ring[i]`` sends to ``ring[i + 1]``).

        Devices holding parts of the same segment belong to one ring (under zigzag a ring holds a
        segment and its mirror image, or the middle segment alone).
        """
        s = self.cfg.segment_lengths[group]
        per = s // self.part  # parts per segment
        parent = list(range(self.num_devices))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        owner: dict[int, int] = {}
        for d in range(self.num_devices):
            for j in range(self.parts):
                seg = self.part_index(d, j) // per
                if seg in owner:
                    parent[find(d)] = find(owner[seg])
                else:
                    owner[seg] = d
        rings: dict[int, list[int]] = {}
        for d in range(self.num_devices):
            rings.setdefault(find(d), []).append(d)
        return tuple(tuple(r) for r in sorted(rings.values()))

    def ring_of(self, group: int, device: int) -> tuple[int, ...]:
        """The ring of ``group`` that ``device`` belongs to."""
        return next(r for r in self.rings(group) if device in r)

    def hops(self, group: int) -> int:
        """Hops of a spanning group's blocks: the largest ring size minus one (0 for a local group)."""
        return 0 if self.local(group) else max(len(r) for r in self.rings(group)) - 1

    def wraps(self, is_causal: bool) -> bool:
        """Whether blocks go all the way round (else the last device of a ring sends nothing).

        Contiguous causal rings are shifts: a device only needs blocks of earlier devices. Zigzag
        devices need blocks from both sides, so their rings always wrap.
        """
        return self.load_balance is not None or not is_causal

    def perm(self, group: int, is_causal: bool) -> tuple[tuple[int, int], ...]:
        """``(source, destination)`` pairs of one hop of ``group`` (the same for every hop)."""
        out = []
        for r in self.rings(group):
            m = len(r)
            if m > 1:
                out += [(r[i], r[(i + 1) % m]) for i in range(m if self.wraps(is_causal) else m - 1)]
        return tuple(out)

    def mode(self, group: int, q_part: int, k_part: int, is_causal: bool) -> int:
        """SKIP, FULL or CAUSAL for queries of global part ``q_part`` against keys of ``k_part``."""
        per = self.cfg.segment_lengths[group] // self.part
        if q_part // per != k_part // per:
            return SKIP
        if not is_causal or k_part < q_part:
            return FULL
        return CAUSAL if k_part == q_part else SKIP

    def schedule(self, group: int, device: int, hop: int, is_causal: bool) -> tuple[tuple[int, int, int], ...]:
        """``(query part j, key part j', mode)`` of the tiles ``device`` computes at ``hop`` (mode != SKIP).

        The key parts are those of the block received after ``hop`` hops; hop 0 is the device's own.
        """
        r = self.ring_of(group, device)
        i, m = r.index(device), len(r)
        if hop >= m or (hop > i and not self.wraps(is_causal)):
            return ()
        src = r[(i - hop) % m]
        out = []
        for qj in range(self.parts):
            for kj in range(self.parts):
                md = self.mode(group, self.part_index(device, qj), self.part_index(src, kj), is_causal)
                if md != SKIP:
                    out.append((qj, kj, md))
        return tuple(out)

    def mode_table(self, group: int, is_causal: bool) -> np.ndarray:
        """``(P, hops + 1, parts, parts)`` int array of tile modes, indexed by device (for a traced device index)."""
        t = np.zeros((self.num_devices, self.hops(group) + 1, self.parts, self.parts), np.int32)
        for d in range(self.num_devices):
            for hop in range(self.hops(group) + 1):
                for qj, kj, md in self.schedule(group, d, hop, is_causal):
                    t[d, hop, qj, kj] = md
        return t

    def tiles(self, group: int, device: int, is_causal: bool) -> int:
        """Tiles (one query part against one key part) ``device`` computes for one branch of a spanning group."""
        if self.local(group):
            return 0
        return sum(len(self.schedule(group, device, hop, is_causal)) for hop in range(self.hops(group) + 1))


def _check(n: int, p: int, cfg: DilatedConfig, unit: str, load_balance: str | None, hint: bool = True) -> None:
    where = "a mesh axis" if unit == "devices" else "a process group"
    if load_balance is None:
        if n % p:
            raise ValueError(
                f"ring attention: sequence length n={n} is not divisible by P={p} {unit}, so there is no whole "
                f"chunk per {unit[:-1]} (segment_lengths={cfg.segment_lengths}); use a sequence length that is a "
                f"multiple of {p} or {where} whose size divides {n}."
            )
        part, what = n // p, f"chunk c={n // p}"
    else:
        if n % (2 * p):
            raise ValueError(
                f"ring attention, load_balance='zigzag': n={n} is not a multiple of 2P={2 * p} ({p} {unit}, two "
                f"half-chunks each); pad the sequence to "
                f"n={ring_padded_length(n, p, cfg, load_balance) if hint else '?'} "
                f"(mark the padding in key_padding_mask) before to_zigzag, or use load_balance=None."
            )
        part, what = n // (2 * p), f"half-chunk c/2={n // (2 * p)} (zigzag)"
    for s, r in zip(cfg.segment_lengths, cfg.dilation_rates, strict=True):
        if part % s and s % part:
            raise ValueError(
                f"ring attention: n={n} over P={p} {unit} gives {what}, and segment length s={s} "
                f"neither divides it nor is a multiple of it; choose P so that every segment "
                f"length divides it or is a multiple of it (e.g. powers of two)"
                + (f", or pad to n={ring_padded_length(n, p, cfg, load_balance)}." if load_balance and hint else ".")
            )
        if part % r:
            raise ValueError(
                f"ring attention: n={n} over P={p} {unit} gives {what}, which is not a multiple of the "
                f"dilation rate r={r} of segment s={s}; choose P so that every dilation rate divides it"
                + (f", or pad to n={ring_padded_length(n, p, cfg, load_balance)}." if load_balance and hint else ".")
            )


def _valid(n: int, p: int, cfg: DilatedConfig, load_balance: str | None) -> bool:
    try:
        _check(n, p, cfg, "devices", load_balance, hint=False)
    except ValueError:
        return False
    return True


def ring_padded_length(n: int, num_devices: int, cfg: DilatedConfig, load_balance: str | None = None) -> int:
    """The smallest ``n' >= n`` whose ring plan over ``num_devices`` holds (``n`` itself when it does).

    Padding a sequence at its end to ``n'`` and marking the padding in ``key_padding_mask`` gives
    exactly the outputs of the unpadded call at the real positions (the shorter last segment of
    semantics section 10 becomes a whole segment whose missing keys are masked). The JAX ring does
    this itself under ``load_balance=None``.

    >>> ring_padded_length(48, 4, DilatedConfig((8,), (1,)))
    64
    """
    unit = num_devices * (2 if load_balance else 1)
    base = math.lcm(unit, *(unit * r for r in cfg.dilation_rates))  # every candidate chunk a multiple of r
    top = -(-n // base) * base
    limit = max(top, 1) + unit * cfg.period + base
    m = max(top, base)
    while m <= limit:
        if _valid(m, num_devices, cfg, load_balance):
            return m
        m += base
    return -(-n // (unit * cfg.period)) * unit * cfg.period  # every segment divides the part


def ring_chunk_length(n: int, num_devices: int, cfg: DilatedConfig, load_balance: str | None = None) -> int:
    """The chunk length ``c`` per device of the smallest valid ring plan holding ``n`` positions.

    ``ring_padded_length(n, num_devices, cfg, load_balance) // num_devices``. The torch ring takes
    any ``n`` under ``load_balance=None`` with this chunk: rank ``p`` holds positions
    ``[p c, min((p + 1) c, n))`` (what ``x.split(c, dim=1)`` gives, empty chunks for the ranks past
    the end) and pads its chunk itself, exactly.

    >>> ring_chunk_length(50, 4, DilatedConfig((8, 16), (1, 2)))
    16
    >>> [min(16, max(0, 50 - p * 16)) for p in range(4)]  # the chunk lengths in rank order
    [16, 16, 16, 2]
    """
    return ring_padded_length(n, num_devices, cfg, load_balance) // num_devices


def ring_layout(
    n: int, num_devices: int, cfg: DilatedConfig, load_balance: str | None = None, unit: str = "devices"
) -> RingLayout:
    """Check the sharding constraints and return the :class:`RingLayout`.

    Contiguous: ``n % P == 0``; every segment length divides the chunk ``c`` or is a multiple of it;
    ``c`` a multiple of every dilation rate of a spanning group. Zigzag: the same with the half-chunk
    ``c / 2`` in place of ``c`` and ``n % 2P == 0``.

    Raises:
      ValueError: a constraint that does not hold, named with ``n``, ``P``, the chunk, the segment
        and the fix.
    """
    load_balance = check_load_balance(load_balance)
    _check(n, num_devices, cfg, unit, load_balance)
    return RingLayout(n, num_devices, cfg, load_balance)


def ring_plan(
    n: int, num_devices: int, cfg: DilatedConfig, unit: str = "devices", load_balance: str | None = None
) -> tuple[int, tuple[int, ...]]:
    """Check the sharding constraints and return ``(chunk, devices_per_ring)``.

    ``devices_per_ring[i]`` is 1 for a group whose segments fit inside a part (no communication)
    and the largest ring size of a spanning group (``s_i / c`` under the contiguous layout).
    ``unit`` names the devices in messages ("devices" for a JAX mesh axis, "ranks" for a torch
    process group).

    Raises:
      ValueError: ``n % P != 0``; a segment length that neither divides the chunk nor is a multiple of
        it; a chunk that is not a multiple of a dilation rate. The message names ``n``, ``P``, the
        chunk and the segment.

    >>> ring_plan(8192, 4, DilatedConfig((1024, 4096), (1, 2)))
    (2048, (1, 2))
    """
    lay = ring_layout(n, num_devices, cfg, load_balance, unit)
    spans = tuple(1 if lay.local(g) else lay.hops(g) + 1 for g in range(cfg.num_groups))
    return lay.chunk, spans


def ring_tiles(
    n: int, num_devices: int, cfg: DilatedConfig, num_heads: int, is_causal: bool, load_balance: str | None = None
) -> tuple[int, ...]:
    """Tiles each device computes for the spanning groups of a call (summed over their branches).

    A tile is one kernel call area of one branch: the dilated queries of one part against the
    dilated keys of one part (``c / r`` square under the contiguous layout, ``c / 2r`` under zigzag),
    causal-diagonal tiles included. The ring programs count the tiles they compute (tests compare).

    >>> ring_tiles(64, 4, DilatedConfig((64,), (1,)), 1, True)
    (1, 2, 3, 4)
    >>> ring_tiles(64, 4, DilatedConfig((64,), (1,)), 1, True, "zigzag")
    (9, 9, 9, 9)
    """
    lay = ring_layout(n, num_devices, cfg, load_balance)
    out = [0] * num_devices
    for br in cfg.branches(num_heads):
        for d in range(num_devices):
            out[d] += lay.tiles(br.group, d, is_causal)
    return tuple(out)


def ring_work(
    n: int, num_devices: int, cfg: DilatedConfig, num_heads: int, is_causal: bool, load_balance: str | None = None
) -> tuple[int, ...]:
    """Modelled per-device work: score elements (query x key pairs, per batch row) of every kernel call.

    Spanning branches: tiles x heads x ``(part / r)^2``; local branches: heads x segments per device x
    ``(s / r)^2``. Causal diagonal blocks count in full (what is called, not what survives the mask).
    The modelled ring step time is the maximum over devices.

    >>> ring_work(64, 4, DilatedConfig((64,), (1,)), 1, True, "zigzag")
    (576, 576, 576, 576)
    """
    lay = ring_layout(n, num_devices, cfg, load_balance)
    out = [0] * num_devices
    for br in cfg.branches(num_heads):
        heads = len(br.heads)
        for d in range(num_devices):
            if lay.local(br.group):
                out[d] += heads * (lay.chunk // br.segment) * br.kept**2
            else:
                out[d] += lay.tiles(br.group, d, is_causal) * heads * (lay.part // br.rate) ** 2
    return tuple(out)


def balance(values: Sequence[float]) -> float:
    """``max / mean`` of per-device counts (1.0 is perfect balance; 1.0 for all zeros)."""
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean else 1.0
