"""The seed package's published benchmark table, and the configuration that reruns it.

The seed table (``seed_data/seed-benchmark-*.txt``, a copy of ``../shared/seed/``) is a tabulate grid
measured on a CUDA GPU (another machine than ours). Every seed model was built with
``segment_lengths=[n], dilation_rates=[1]``, i.e. dense attention; :func:`seed_cases` reproduces that
effective configuration, and :func:`dilated_cases` the dilated one the seed never measured.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from benchmarks.case import Case, Status
from benchmarks.variants import SEED_VARIANTS

#: Where the seed table lives: benchmarks/seed_data/, a copy of the project's ../shared/seed/
SEED_DIR = Path(__file__).resolve().parent / "seed_data"
SEED_SEQ_LENS: tuple[int, ...] = (4096, 8192)
SEED_BATCH, SEED_HEADS, SEED_HEAD_DIM = 2, 8, 64  # head_dim: the seed's embed_dim 512 / 8 heads
DILATED_SEGMENTS, DILATED_RATES = (1024, 2048, 4096), (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class SeedRow:
    """One row of the seed table (``None`` where the seed printed ``N/A``; its ✓/✗ as a :class:`Status`)."""

    variant: str
    batch: int
    seq_len: int
    heads: int
    time_ms: float | None
    memory_mb: float | None
    throughput_tok_s: float | None
    status: Status


@dataclasses.dataclass(frozen=True)
class SeedTable:
    """The parsed seed table: its header line (device and dtype), rows and source file."""

    header: str
    rows: tuple[SeedRow, ...]
    path: Path


def _number(text: str) -> float | None:
    text = text.strip()
    return None if text in ("", "N/A") else float(text)


def parse_seed_table(text: str, path: Path = Path("?")) -> SeedTable:
    """Parse a seed benchmark file: a ``Device: ...`` header line and a tabulate ``grid`` table."""
    header = next((line.strip() for line in text.splitlines() if line.startswith("Device:")), "")
    columns: list[str] | None = None
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if columns is None:
            columns = cells
            continue
        row = dict(zip(columns, cells, strict=False))
        rows.append(SeedRow(
            variant=row["Implementation"], batch=int(row["Batch"]), seq_len=int(row["Seq Len"]),
            heads=int(row["Heads"]), time_ms=_number(row["Time (ms)"]), memory_mb=_number(row["Memory (MB)"]),
            throughput_tok_s=_number(row["Throughput (tok/s)"]),
            status=Status.OK if row["Status"] == "✓" else Status.FAILED))
    return SeedTable(header=header, rows=tuple(rows), path=path)


def load_seed_table(directory: Path = SEED_DIR) -> SeedTable | None:
    """The newest ``seed-benchmark-*.txt`` under ``directory``, parsed; None if there is none."""
    files = sorted(directory.glob("seed-benchmark-*.txt")) if directory.is_dir() else []
    if not files:
        return None
    return parse_seed_table(files[-1].read_text(encoding="utf-8"), files[-1])


def seed_device(table: SeedTable) -> str:
    """The seed's device as a label, e.g. ``CUDA GPU`` for ``Device: cuda, ...``."""
    match = re.search(r"Device:\s*(\w+)", table.header)
    device = match.group(1) if match else "unknown device"
    return "CUDA GPU" if device == "cuda" else device


def seed_cases(base: Case, variants: Sequence[str], frameworks: Sequence[str],
               repeats: int | None = None, seq_lens: Sequence[int] = SEED_SEQ_LENS) -> list[Case]:
    """The seed's effective configuration: ``segment_lengths=[n]``, ``dilation_rates=[1]``, n in ``seq_lens``
    (the seed's table has 4096 and 8192), batch 2, 8 heads, float32, forward only, non-causal; device,
    block-sparse options and (unless ``repeats`` is given) repeats from ``base``. Only the seed's variants
    among ``variants`` take part."""
    return [dataclasses.replace(base, variant=v, framework=fw, seq_len=n, segment_lengths=(n,), dilation_rates=(1,),
                                batch=SEED_BATCH, heads=SEED_HEADS, head_dim=SEED_HEAD_DIM,
                                embed_dim=SEED_HEADS * SEED_HEAD_DIM, dtype="float32", causal=False, backward=False,
                                repeats=base.repeats if repeats is None else repeats)
            for v in SEED_VARIANTS if v in variants for fw in frameworks for n in seq_lens]


def dilated_cases(base: Case, variants: Sequence[str], frameworks: Sequence[str],
                  seq_lens: Sequence[int] = SEED_SEQ_LENS) -> list[Case]:
    """:func:`seed_cases` with the dilated configuration (segments 1024/2048/4096, rates 1/2/4)."""
    return [dataclasses.replace(c, segment_lengths=DILATED_SEGMENTS, dilation_rates=DILATED_RATES)
            for c in seed_cases(base, variants, frameworks, seq_lens=seq_lens)]
