"""What one run measures: the report's sections and their cases.

A section is a named list of cases; a row's ``section`` field says which one it belongs to. A case
that belongs to two sections (a mode row that is also a main row, a seed-comparison row that is also
a main row) is measured once and listed in both.

- ``main``: every variant x framework x n of the command line, in its settings.
- ``modes``: ``standard`` and ``improved`` at one n (8192 by default) in the four modes (forward,
  causal forward, forward+backward, causal forward+backward), both frameworks.
- ``peak``: one plain matmul per framework, the machine's attainable FLOP/s (the line on the
  GFLOP/s plot).
- ``seed`` / ``seed_dilated``: the seed package's effective configuration, and the same shapes
  with the dilated settings (:mod:`benchmarks.seed`).

Later sections (GQA, odd length, decode) are listed in :data:`benchmarks.variants.PLANNED`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from benchmarks.case import Case

MAIN, MODES, PEAK, SEED, SEED_DILATED = "main", "modes", "peak", "seed", "seed_dilated"
#: How the progress bar names a case of each section.
TITLES: dict[str, str] = {
    MAIN: "main",
    MODES: "mode",
    PEAK: "peak",
    SEED: "seed comparison (seed's dense config)",
    SEED_DILATED: "seed comparison (dilated config)",
}
#: The variants of the mode rows, and the modes as (causal, backward).
MODE_VARIANTS: tuple[str, ...] = ("standard", "improved")
MODE_SETTINGS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
DEFAULT_MODE_SEQ_LEN = 8192
DEFAULT_PEAK_SIZE = 4096


def main_cases(base: Case, variants: Sequence[str], frameworks: Sequence[str], seq_lens: Sequence[int]) -> list[Case]:
    """Every (variant, framework, n), n increasing within a variant and framework."""
    return [dataclasses.replace(base, variant=v, framework=fw, seq_len=n)
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
