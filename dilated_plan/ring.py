"""The sharding plan of ring dilated attention (docs/semantics.md section 7)."""

from __future__ import annotations

from dilated_plan.config import DilatedConfig


def ring_plan(n: int, num_devices: int, cfg: DilatedConfig, unit: str = "devices") -> tuple[int, tuple[int, ...]]:
    """Check the sharding constraints and return ``(chunk, devices_per_segment)``.

    ``devices_per_segment[i]`` is 1 for a group whose segments fit inside a chunk (no communication)
    and ``s_i / c`` for a group whose segments span several devices (``s_i / c - 1`` hops).
    ``unit`` names the devices in messages ("devices" for a JAX mesh axis, "ranks" for a torch
    process group).

    Raises:
      ValueError: ``n % P != 0``; a segment length that neither divides the chunk nor is a multiple of
        it; a chunk that is not a multiple of a dilation rate. The message names ``n``, ``P``, the
        chunk and the segment.

    >>> ring_plan(8192, 4, DilatedConfig((1024, 4096), (1, 2)))
    (2048, (1, 2))
    """
    p = num_devices
    where = "a mesh axis" if unit == "devices" else "a process group"
    if n % p:
        raise ValueError(
            f"ring attention: sequence length n={n} is not divisible by P={p} {unit}, so there is no whole "
            f"chunk per {unit[:-1]} (segment_lengths={cfg.segment_lengths}); use a sequence length that is a "
            f"multiple of {p} or {where} whose size divides {n}."
        )
    c = n // p
    spans = []
    for s, r in zip(cfg.segment_lengths, cfg.dilation_rates, strict=True):
        if c % s and s % c:
            raise ValueError(
                f"ring attention: n={n} over P={p} {unit} gives chunk c={c}, and segment length s={s} "
                f"neither divides the chunk nor is a multiple of it; choose P so that every segment "
                f"length divides c or is a multiple of c (e.g. powers of two)."
            )
        if c % r:
            raise ValueError(
                f"ring attention: n={n} over P={p} {unit} gives chunk c={c}, which is not a multiple of the "
                f"dilation rate r={r} of segment s={s}; choose P so that every dilation rate divides the chunk."
            )
        spans.append(max(1, s // c))
    return c, tuple(spans)
