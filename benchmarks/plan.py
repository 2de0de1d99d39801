"""What one run measures: the report's sections and their cases.

A section is a named list of cases; a row's ``section`` field says which one it belongs to. A case
that belongs to two sections (a mode row that is also a main row, a seed-comparison row that is also
a main row) is measured once and listed in both.

- ``main``: every variant x framework x n of the command line, in its settings (the dense baseline
  with its own, smaller number of repeats in the default report: seconds per call on the CPU).
- ``modes``: ``standard`` and ``improved`` at one n (8192 by default) in the four modes (forward,
  causal forward, forward+backward, causal forward+backward), both frameworks.
- ``peak``: one plain matmul per framework, the machine's attainable FLOP/s (the line on the
  GFLOP/s plot).
- ``seed`` / ``seed_dilated``: the seed package's effective configuration, and the same shapes
  with the dilated settings (:mod:`benchmarks.seed`).
- ``shapes``: ``improved`` at one n (8192) in both frameworks, forward and forward+backward:
  the baseline, grouped-query heads (``h_kv = 2``), the odd length ``n - 1`` and packed documents
  (4 of ``n / 4``). The baselines are the mode rows' non-causal rows, measured once.
- ``decode``: one decode step (batch 1) against a cache of 32768 positions at indices 1000 and
  30000, timed over 50 steps per repeat, and the full causal ``improved`` forward over the cache
  length for comparison.

Later sections would be listed in :data:`benchmarks.variants.PLANNED` (empty now).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from benchmarks.case import Case
from benchmarks.variants import VARIANTS, Kind

MAIN, MODES, PEAK, SEED, SEED_DILATED = "main", "modes", "peak", "seed", "seed_dilated"
SHAPES, DECODE = "shapes", "decode"
#: How the progress bar names a case of each section.
TITLES: dict[str, str] = {
    MAIN: "main",
    MODES: "mode",
    PEAK: "peak",
    SEED: "seed comparison (seed's dense config)",
    SEED_DILATED: "seed comparison (dilated config)",
    SHAPES: "shapes",
    DECODE: "decode",
}
#: The variants of the mode rows, and the modes as (causal, backward).
MODE_VARIANTS: tuple[str, ...] = ("standard", "improved")
MODE_SETTINGS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
DEFAULT_MODE_SEQ_LEN = 8192
#: Side of the peak matmul: 2048 (~0.3 s per call on 2 cores; BLAS is at its rate well below that size).
DEFAULT_PEAK_SIZE = 2048
#: Timed calls of the dense baseline's main rows in the default report (JAX: ~11 s per call at 8192).
DEFAULT_BASELINE_REPEATS = 1
#: The shapes section: n, grouped-query kv heads, packed documents per row.
DEFAULT_SHAPES_SEQ_LEN, DEFAULT_SHAPES_KV_HEADS, DEFAULT_SHAPES_DOCUMENTS = 8192, 2, 4
#: The decode section: cache length, positions (indices) of the new token, steps per timed repeat.
DEFAULT_DECODE_CACHE_LEN, DEFAULT_DECODE_POSITIONS, DEFAULT_DECODE_STEPS = 32768, (1000, 30000), 50
#: Names of the shapes cases (``shape_kind``), in report order.
SHAPE_KINDS: tuple[str, ...] = ("baseline", "gqa", "odd", "packed")


def main_cases(base: Case, variants: Sequence[str], frameworks: Sequence[str], seq_lens: Sequence[int],
               baseline_repeats: int | None = None) -> list[Case]:
    """Every (variant, framework, n), n increasing within a variant and framework; the dense
    baseline gets ``baseline_repeats`` timed calls where given (else ``base.repeats``)."""
    def repeats(v: str) -> int:
        return baseline_repeats if baseline_repeats and VARIANTS[v].kind is Kind.BASELINE else base.repeats
    return [dataclasses.replace(base, variant=v, framework=fw, seq_len=n, repeats=repeats(v))
            for v in variants for fw in frameworks for n in sorted(seq_lens)]


def mode_cases(base: Case, variants: Sequence[str], frameworks: Sequence[str], seq_len: int) -> list[Case]:
    """The mode rows: each of :data:`MODE_VARIANTS` that ``variants`` holds, per framework, in every mode.

    The plain forward is included (it is usually a main row as well), so that the section's ratios
    come from one set of settings.
    """
    return [dataclasses.replace(base, variant=v, framework=fw, seq_len=seq_len, causal=causal, backward=backward)
            for v in MODE_VARIANTS if v in variants for fw in frameworks for causal, backward in MODE_SETTINGS]


def peak_cases(base: Case, frameworks: Sequence[str], size: int) -> list[Case]:
    """One float32 ``(size, size) @ (size, size)`` matmul per framework, with ``base``'s device and repeats."""
    return [Case("matmul", fw, device=base.device, dtype="float32", seq_len=size, repeats=base.repeats)
            for fw in frameworks]


def shapes_cases(base: Case, frameworks: Sequence[str], seq_len: int = DEFAULT_SHAPES_SEQ_LEN,
                 kv_heads: int = DEFAULT_SHAPES_KV_HEADS, documents: int = DEFAULT_SHAPES_DOCUMENTS) -> list[Case]:
    """``improved``, non-causal, per framework and (forward, forward+backward): the baseline at
    ``seq_len``, ``num_kv_heads=kv_heads``, ``seq_len - 1`` and ``documents`` packed documents, in
    :data:`SHAPE_KINDS` order. The baseline equals the mode rows' non-causal case (measured once)."""
    out = []
    for fw in frameworks:
        for backward in (False, True):
            one = dataclasses.replace(base, variant="improved", framework=fw, seq_len=seq_len, causal=False,
                                      backward=backward, num_kv_heads=None, documents=0, position=0, steps=1)
            out += [one, dataclasses.replace(one, num_kv_heads=kv_heads),
                    dataclasses.replace(one, seq_len=seq_len - 1), dataclasses.replace(one, documents=documents)]
    return out


def shape_kind(case: Case | dict, seq_len: int) -> str:
    """Which of :data:`SHAPE_KINDS` a shapes case (or row) is, given the section's ``seq_len``: GQA
    has kv heads below its heads, packed has documents, odd is shorter than ``seq_len``."""
    get = case.get if isinstance(case, dict) else (lambda name: getattr(case, name))
    if get("num_kv_heads") is not None and get("num_kv_heads") != get("heads"):
        return "gqa"
    if get("documents"):
        return "packed"
    return "odd" if get("seq_len") != seq_len else "baseline"


def decode_cases(base: Case, frameworks: Sequence[str], cache_len: int = DEFAULT_DECODE_CACHE_LEN,
                 positions: Sequence[int] = DEFAULT_DECODE_POSITIONS,
                 steps: int = DEFAULT_DECODE_STEPS) -> list[Case]:
    """Per framework: a decode step (batch 1, ``steps`` steps per timed repeat) against a cache of
    ``cache_len`` positions at each of ``positions``, then the full causal ``improved`` forward over
    ``cache_len`` tokens (batch 1), the comparison of the section."""
    out = []
    for fw in frameworks:
        one = dataclasses.replace(base, framework=fw, batch=1, seq_len=cache_len, causal=False, backward=False,
                                  num_kv_heads=None, documents=0, devices=1)
        out += [dataclasses.replace(one, variant="decode", position=p, steps=steps) for p in positions]
        out.append(dataclasses.replace(one, variant="improved", causal=True, position=0, steps=1))
    return out
