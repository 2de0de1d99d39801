"""Scaling of ring dilated attention on simulated CPU devices: ``python -m benchmarks.ring_scaling``.

Run by ``make figures``, not by ``make bench``. For each configuration and device count ``P`` the
ring case (variant ``ring_v2_collective`` with ``devices=P``: ``q, k, v`` sharded over a ``("seq",)``
mesh of ``P`` devices; with ``P = 1`` ``mesh=None``, the improved program) and, at ``P = 1``,
``improved`` are measured by :mod:`benchmarks.runner` exactly like the rows of the report: a fresh
subprocess per case (started with ``--xla_force_host_platform_device_count=P``), warm-up, every
repeat timed, peak RSS above the post-warm-up baseline, and what the compiled program says about
itself. Columns:

- ``time (ms)``: median forward call. The ``P`` simulated devices share this machine's cores, so time
  does not fall with ``P``; the table shows the work and memory each device would have.
- ``device MiB``: per-device memory of the compiled program, ``compiled.memory_analysis()``
  (arguments + outputs + temporaries of the per-device SPMD program, aliasing subtracted);
  ``act MiB``: the temporaries alone (activation memory).
- ``RSS MiB`` / ``RSS/P``: peak resident memory of the whole process during the timed calls above
  the baseline (all ``P`` simulated devices live in one process), and that / ``P``.
- ``collectives``: every collective op of the compiled HLO; ``comm MiB/device``: bytes each device
  sends per call, the operand sizes of its ``collective-permute`` ops.
- One device: ring against improved, each in its own subprocess, same inputs and method.

The work table (:func:`work_table`, also ``--work-only``, which runs nothing) reports, per
configuration and device count, the tiles each device computes for spanning groups under the
contiguous and the zigzag layout (:func:`dilated_plan.ring.ring_tiles`; the ring program counts
the same, ``parity_tests/test_ring_balance.py``), their max / mean, and the modelled ring step time
(the maximum per-device work, :func:`dilated_plan.ring.ring_work`) of zigzag over contiguous.

Writes ``ring_scaling.md`` and ``ring_scaling.json`` (the result rows) under ``--out``
(default ``benchmarks/results/cpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from benchmarks.case import Case
from benchmarks.report import is_ok, status_cell
from benchmarks.rows import Row, make_row
from benchmarks.runner import REPO_ROOT, cpu_name, run_cases
from dilated_plan import DilatedConfig
from dilated_plan.ring import balance, ring_layout, ring_tiles, ring_work

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu"
RING, IMPROVED = "ring_scaling", "ring_scaling_improved"  # the sections of the rows


@dataclasses.dataclass(frozen=True)
class Config:
    """One scaling configuration: its shapes and the device counts it is measured on."""

    name: str
    seq_len: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    device_counts: tuple[int, ...]


# n = 65536 for the scaling rows: attention scores are computed in bounded chunks, so the part of the
# per-device memory that shrinks with P (inputs, per-branch outputs, statistics) only dominates the fixed
# score scratch at long sequences. "spanning" has groups over 2 and 8 devices at P=8.
SCALING: tuple[Config, ...] = (
    Config("local", 65536, (1024, 2048, 4096), (1, 2, 4), (1, 2, 4, 8)),
    Config("spanning", 65536, (1024, 16384, 65536), (1, 8, 32), (1, 2, 4, 8)),
    Config("seed-oom", 8192, (1024, 2048, 4096), (1, 2, 4), (1, 8)),
    Config("mid", 16384, (1024, 2048, 4096), (1, 2, 4), (1, 8)),
    Config("xl", 131072, (1024, 2048, 4096), (1, 2, 4), (1, 8)),
)


def config_cases(config: Config, base: Case) -> list[tuple[str, Case]]:
    """``(section, case)`` of one configuration: ring at every device count, improved at one device."""
    one = dataclasses.replace(
        base, seq_len=config.seq_len, segment_lengths=config.segment_lengths, dilation_rates=config.dilation_rates
    )
    out = [(RING, dataclasses.replace(one, variant="ring_v2_collective", devices=p)) for p in config.device_counts]
    if 1 in config.device_counts:
        out.append((IMPROVED, dataclasses.replace(one, variant="improved", devices=1)))
    return out


def run(configs: Sequence[Config], base: Case, timeout: float) -> list[Row]:
    """Measure every case of ``configs`` through the runner; rows carry ``config`` (the name)."""
    planned = [(c.name, section, case) for c in configs for section, case in config_cases(c, base)]
    measured = run_cases(
        [case for _, _, case in planned],
        timeout,
        lambda case: f"ring scaling: {case.variant} n={case.seq_len} P={case.devices}",
    )
    return [dict(make_row(case, measured[case], section), config=name) for name, section, case in planned]


def _fmt(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def markdown(rows: Sequence[Row]) -> str:
    """The scaling table and the one-device ring-vs-improved table."""
    ring = [r for r in rows if r["section"] == RING]
    improved = {(r["config"], r["seq_len"]): r for r in rows if r["section"] == IMPROVED}
    first = next((r for r in rows if is_ok(r)), rows[0] if rows else None)
    if first is None:
        return "# Ring dilated attention: scaling on simulated CPU devices\n\nNo rows.\n"
    base = {(r["config"], r["seq_len"]): r for r in ring if r["devices"] == 1 and is_ok(r)}

    def vs_one(r: Row, key: str, per_device: bool = False) -> str:
        b = base.get((r["config"], r["seq_len"]))
        if b is None or r[key] is None or b[key] is None:
            return ""
        scale = r["devices"] if per_device else 1
        return _fmt(_ratio(r[key] / scale, b[key]), 3)

    body = []
    for r in ring:
        rss_per = None if r["memory_mb"] is None else r["memory_mb"] / r["devices"]
        body.append(
            [
                r["config"],
                r["seq_len"],
                tuple(r["segment_lengths"]),
                tuple(r["dilation_rates"]),
                r["devices"],
                r["seq_len"] // r["devices"],
                _fmt(r["time_ms"]),
                _fmt(r["xla_device_mb"]),
                vs_one(r, "xla_device_mb"),
                _fmt(r["xla_temp_mb"]),
                vs_one(r, "xla_temp_mb"),
                _fmt(r["memory_mb"]),
                _fmt(rss_per),
                vs_one(r, "memory_mb", per_device=True),
                "" if r["collectives"] is None else r["collectives"],
                _fmt(r["comm_mb"], 2),
                status_cell(r, 60),
            ]
        )
    headers = [
        "config",
        "n",
        "segments",
        "rates",
        "P",
        "chunk",
        "time (ms)",
        "device MiB",
        "vs P=1",
        "act MiB",
        "vs P=1",
        "RSS MiB",
        "RSS/P MiB",
        "vs P=1",
        "collectives",
        "comm MiB/device",
        "status",
    ]
    out = [
        "# Ring dilated attention: scaling on simulated CPU devices",
        "",
        f"`python -m benchmarks.ring_scaling` on {first['device_name'] or cpu_name()}, {first['software']}, "
        f"{first['dtype']}, batch {first['batch']}, {first['heads']} heads, head_dim {first['head_dim']}, "
        f"{first['mode']}, median of {first['repeats']} calls, each case in its own subprocess "
        "(`benchmarks.runner`, the same harness as `python -m benchmarks`). The P devices are simulated in one "
        "process (`--xla_force_host_platform_device_count`) and share the cores: time measures total work, "
        "not parallel speed-up. device / act MiB: `compiled.memory_analysis()` of the per-device program "
        "(arguments + outputs + temporaries / temporaries only). RSS: peak RSS above the baseline during the "
        "timed calls, whole process (all P devices), and divided by P. comm: bytes one device sends per call, "
        "summed over the `collective-permute` operands of the compiled HLO.",
        "",
        "Ratios are against the P = 1 row of the same configuration.",
        "",
        tabulate(body, headers=headers, tablefmt="github", disable_numparse=True),
    ]
    one = [(r, improved.get((r["config"], r["seq_len"]))) for r in ring if r["devices"] == 1]
    one = [(r, i) for r, i in one if i is not None]
    if one:
        body = [
            [
                r["config"],
                r["seq_len"],
                _fmt(r["time_ms"]),
                _fmt(i["time_ms"]),
                _fmt(_ratio(r["time_ms"], i["time_ms"]), 3),
                _fmt(r["xla_temp_mb"]),
                _fmt(i["xla_temp_mb"]),
            ]
            for r, i in one
        ]
        out += [
            "",
            "One device: ring (`mesh=None`, which runs the improved program) vs improved, each in its own "
            "subprocess, same inputs and method.",
            "",
            tabulate(
                body,
                headers=[
                    "config",
                    "n",
                    "ring (ms)",
                    "improved (ms)",
                    "ring / improved",
                    "act MiB ring",
                    "act MiB improved",
                ],
                tablefmt="github",
                disable_numparse=True,
            ),
        ]
    return "\n".join(out) + "\n"


# The case: one causal segment over the whole sequence, spanning every device.
WORK: tuple[Config, ...] = (Config("whole-causal", 131072, (131072,), (1,), (2, 4, 8)),) + SCALING[:2]


def work_table(configs: Sequence[Config], heads: int, causal: bool = True) -> str:
    """Per-device tiles of spanning groups, contiguous vs zigzag, and the modelled step-time ratio (markdown)."""
    body = []
    for c in configs:
        cfg = DilatedConfig(c.segment_lengths, c.dilation_rates)
        for p in c.device_counts:
            if p == 1:
                continue
            row: list[str] = [c.name, str(c.seq_len), str(c.segment_lengths), str(p)]
            work = {}
            for lb in (None, "zigzag"):
                try:
                    ring_layout(c.seq_len, p, cfg, lb)
                except ValueError as e:
                    row += ["", f"not valid: {str(e)[:40]}"]
                    continue
                tiles = ring_tiles(c.seq_len, p, cfg, heads, causal, lb)
                work[lb] = max(ring_work(c.seq_len, p, cfg, heads, causal, lb))
                row += [" ".join(map(str, tiles)), f"{balance(tiles):.3f}"]
            row.append(f"{work['zigzag'] / work[None]:.3f}" if len(work) == 2 and work[None] else "")
            body.append(row)
    headers = [
        "config",
        "n",
        "segments",
        "P",
        "tiles/device contiguous",
        "max/mean",
        "tiles/device zigzag",
        "max/mean",
        "step time zigzag / contiguous",
    ]
    return (
        "\n".join(
            [
                f"## Ring work per device ({'causal' if causal else 'bidirectional'}, {heads} heads, from the plan)",
                "",
                "A tile is one kernel call of a spanning branch: one part's dilated queries against one part's "
                "dilated keys (contiguous: a chunk, zigzag: a half-chunk). The modelled step time is the largest "
                "per-device score-element count (spanning and local branches, `dilated_plan.ring.ring_work`).",
                "",
                tabulate(body, headers=headers, tablefmt="github", disable_numparse=True),
            ]
        )
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--configs",
        default=",".join(c.name for c in SCALING),
        help="comma-separated subset of: " + ", ".join(c.name for c in SCALING),
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the existing json")
    parser.add_argument("--work-only", action="store_true", help="print the per-device work table and exit")
    args = parser.parse_args(argv)
    if args.work_only:
        print(work_table(WORK, args.heads, causal=True))
        return
    json_path, md_path = args.out / "ring_scaling.json", args.out / "ring_scaling.md"
    if args.report_only:
        md_path.write_text(markdown(json.loads(json_path.read_text())) + "\n" + work_table(WORK, args.heads))
        return
    wanted = set(args.configs.split(","))
    unknown = wanted - {c.name for c in SCALING}
    if unknown:
        parser.error(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(c.name for c in SCALING)}")
    base = Case(
        "ring_v2_collective",
        "jax",
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        causal=args.causal,
        repeats=args.repeats,
    )
    rows = run([c for c in SCALING if c.name in wanted], base, args.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    text = markdown(rows) + "\n" + work_table(WORK, args.heads)
    md_path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
