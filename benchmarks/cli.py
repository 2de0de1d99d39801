"""Command line of ``python -m benchmarks``: choose the cases, run them, print and write the report.

Example::

    python -m benchmarks                                   # the default CPU report (~9.5 minutes, quiet 2-core CPU)
    python -m benchmarks --variants improved,dense --seq-lens 8192,32768 --repeats 5 --out /tmp/b
    python -m benchmarks --device gpu --seq-lens 8192,16384,32768
    python -m benchmarks --variants improved --seq-lens 8192 --peak-size 0 --shapes --decode --out /tmp/s

The default report has the main rows, the mode rows (causal and backward at n = 8192), the machine
peak, the shapes rows (GQA, odd length, packed documents), the decode rows and the seed comparison.
A custom run (any option that changes which cases are measured) has the main rows and the peak
only, unless ``--modes`` / ``--shapes`` / ``--decode`` / ``--seed-comparison`` ask for more.
Output goes to ``--out`` (default ``benchmarks/results/<device>/``): results.json, results.csv, PNG
plots and REPORT.md. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import plan, report, seed
from benchmarks.case import DEVICES, DTYPES, FRAMEWORKS, Case
from benchmarks.rows import make_row
from benchmarks.runner import REPO_ROOT, run_cases
from benchmarks.variants import REPORT_VARIANTS, label

DEFAULT_SEQ_LENS = "4096,8192"
#: Options that change which cases the main rows hold: set to anything but their default, the run is
#: a custom run, which adds the mode rows and the seed comparison only when asked.
CASE_OPTIONS = ("variants", "frameworks", "seq_lens", "batch", "heads", "head_dim", "embed_dim", "segment_lengths",
                "dilation_rates", "block_size", "sparsity_ratio", "dtype", "causal", "backward", "merge")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1024,2048") \
            from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers, e.g. 1024,2048")
    return values


def _choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        if text == "all":
            return tuple(allowed)
        values = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown {unknown}; choose from {', '.join(allowed)} or 'all'")
        return values

    return parse


def parser() -> argparse.ArgumentParser:
    """The argument parser (``python -m benchmarks --help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", type=_choices(REPORT_VARIANTS), default=REPORT_VARIANTS,
                   help=f"comma-separated, from: {', '.join(REPORT_VARIANTS)}; or 'all'")
    p.add_argument("--frameworks", type=_choices(FRAMEWORKS), default=FRAMEWORKS, help="jax,torch")
    p.add_argument("--seq-lens", type=_ints, default=_ints(DEFAULT_SEQ_LENS), help="sequence lengths n")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--embed-dim", type=int, default=None, help="module width E (default heads * head_dim)")
    p.add_argument("--segment-lengths", type=_ints, default=_ints("1024,2048,4096"))
    p.add_argument("--dilation-rates", type=_ints, default=_ints("1,2,4"))
    p.add_argument("--block-size", type=int, default=128, help="block-sparse block size B")
    p.add_argument("--sparsity-ratio", type=float, default=0.9, help="block-sparse: fraction of key blocks dropped")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--causal", action="store_true", help="causal masking for the main rows")
    p.add_argument("--merge", choices=("head_partition", "lse"), default="head_partition",
                   help="merge rule of the dilated-attention functions (standard, improved, ring)")
    p.add_argument("--backward", action="store_true", help="time forward + backward for the main rows")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (all recorded; tables show the median)")
    p.add_argument("--modes", action=argparse.BooleanOptionalAction, default=None,
                   help="the mode rows: standard and improved in every causal/backward mode at --mode-seq-len "
                        "(default: on for the default report, off for a custom run)")
    p.add_argument("--mode-seq-len", type=int, default=plan.DEFAULT_MODE_SEQ_LEN, help="n of the mode rows")
    p.add_argument("--baseline-repeats", type=int, default=None,
                   help="timed calls per main case of the dense baseline (default: "
                        f"{plan.DEFAULT_BASELINE_REPEATS} in the default report, --repeats in a custom run)")
    p.add_argument("--peak-size", type=int, default=plan.DEFAULT_PEAK_SIZE,
                   help="side of the float32 matmul that measures the machine peak; 0 skips it")
    p.add_argument("--shapes", action=argparse.BooleanOptionalAction, default=None,
                   help="the shapes rows: improved with GQA, the odd length n-1 and packed documents against the "
                        "baseline at --shapes-seq-len, forward and forward+backward (default: on for the default "
                        "report, off for a custom run)")
    p.add_argument("--shapes-seq-len", type=int, default=plan.DEFAULT_SHAPES_SEQ_LEN, help="n of the shapes rows")
    p.add_argument("--shapes-kv-heads", type=int, default=plan.DEFAULT_SHAPES_KV_HEADS,
                   help="key/value heads of the GQA shapes rows (divides --heads)")
    p.add_argument("--shapes-documents", type=int, default=plan.DEFAULT_SHAPES_DOCUMENTS,
                   help="documents packed in each row of the packed shapes rows")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=None,
                   help="the decode rows: one decode step against a key/value cache at --decode-positions, and "
                        "the full causal forward over --decode-cache-len (default: on for the default report, "
                        "off for a custom run)")
    p.add_argument("--decode-cache-len", type=int, default=plan.DEFAULT_DECODE_CACHE_LEN,
                   help="cache length (max_length) of the decode rows, a multiple of lcm(segment lengths)")
    p.add_argument("--decode-positions", type=_ints, default=plan.DEFAULT_DECODE_POSITIONS,
                   help="cache indices (contexts) of the decode step")
    p.add_argument("--decode-steps", type=int, default=plan.DEFAULT_DECODE_STEPS,
                   help="decode steps per timed repeat (the repeat's time is divided by it)")
    p.add_argument("--seed-comparison", action=argparse.BooleanOptionalAction, default=None,
                   help="rerun the seed's configuration beside its published table (default: on for the default "
                        "report, off for a custom run)")
    p.add_argument("--seed-seq-lens", type=_ints, default=(4096,),
                   help="n of the seed comparison's rerun (its table has 4096 and 8192; the dense-config rows at "
                        "8192 cost about 3 minutes on a 2-core CPU, so the default report reruns 4096)")
    p.add_argument("--seed-repeats", type=int, default=1,
                   help="timed calls per case of the seed's effective (dense) configuration")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per case (subprocess) before it fails; JAX dense attention at n = 8192 needs ~55 s")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<device>)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; ``args.custom`` lists the case options that differ from the
    default report, and ``args.modes`` / ``args.seed_comparison`` / ``args.shapes`` / ``args.decode`` are
    resolved to booleans (and ``args.baseline_repeats`` to a number)."""
    p = parser()
    args = p.parse_args(argv)
    if len(args.segment_lengths) != len(args.dilation_rates):
        p.error(f"--segment-lengths {args.segment_lengths} and --dilation-rates {args.dilation_rates} need one rate "
                f"per segment length")
    for name in ("batch", "heads", "head_dim", "repeats", "seed_repeats", "block_size", "mode_seq_len",
                 "shapes_seq_len", "shapes_kv_heads", "shapes_documents", "decode_cache_len", "decode_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.peak_size < 0:
        p.error(f"--peak-size must be 0 (skip) or positive, got {args.peak_size}")
    if args.baseline_repeats is not None and args.baseline_repeats <= 0:
        p.error(f"--baseline-repeats must be positive, got {args.baseline_repeats}")
    args.custom = [name for name in CASE_OPTIONS if getattr(args, name) != p.get_default(name)]
    if args.embed_dim is None:
        args.embed_dim = args.heads * args.head_dim
    if args.modes is None:
        args.modes = not args.custom
    if args.seed_comparison is None:
        args.seed_comparison = not args.custom
    if args.shapes is None:
        args.shapes = not args.custom
    if args.decode is None:
        args.decode = not args.custom
    if args.baseline_repeats is None:
        args.baseline_repeats = args.repeats if args.custom else plan.DEFAULT_BASELINE_REPEATS
    if args.shapes and args.heads % args.shapes_kv_heads:
        p.error(f"--shapes-kv-heads {args.shapes_kv_heads} must divide --heads {args.heads}")
    if args.shapes and (args.shapes_seq_len < 2 or args.shapes_seq_len % args.shapes_documents):
        p.error(f"--shapes-documents {args.shapes_documents} must divide --shapes-seq-len {args.shapes_seq_len} "
                f"(at least 2)")
    lcm = math.lcm(*args.segment_lengths)
    if args.decode and args.decode_cache_len % lcm:
        p.error(f"--decode-cache-len {args.decode_cache_len} must be a multiple of lcm(segment lengths) = {lcm}")
    if args.decode and any(x >= args.decode_cache_len for x in args.decode_positions):
        p.error(f"--decode-positions {args.decode_positions} must lie below --decode-cache-len "
                f"{args.decode_cache_len}")
    if args.out is None:
        args.out = REPO_ROOT / "benchmarks" / "results" / args.device
    return args


def base_case(args: argparse.Namespace) -> Case:
    """The settings shared by every main-run case (variant, framework and n are filled in per case)."""
    return Case(variant=args.variants[0], framework=args.frameworks[0], device=args.device, dtype=args.dtype,
                batch=args.batch, seq_len=args.seq_lens[0], heads=args.heads, head_dim=args.head_dim,
                embed_dim=args.embed_dim, segment_lengths=args.segment_lengths, dilation_rates=args.dilation_rates,
                causal=args.causal, backward=args.backward, repeats=args.repeats, block_size=args.block_size,
                sparsity_ratio=args.sparsity_ratio, merge=args.merge)


def sections(args: argparse.Namespace, seed_table: seed.SeedTable | None) -> dict[str, list[Case]]:
    """The cases of each section this run measures (see :mod:`benchmarks.plan`)."""
    base = base_case(args)
    out = {plan.MAIN: plan.main_cases(base, args.variants, args.frameworks, args.seq_lens, args.baseline_repeats)}
    if args.modes:
        out[plan.MODES] = plan.mode_cases(base, args.variants, args.frameworks, args.mode_seq_len)
    if args.peak_size:
        out[plan.PEAK] = plan.peak_cases(base, args.frameworks, args.peak_size)
    if args.shapes:
        out[plan.SHAPES] = plan.shapes_cases(base, args.frameworks, args.shapes_seq_len, args.shapes_kv_heads,
                                             args.shapes_documents)
    if args.decode:
        out[plan.DECODE] = plan.decode_cases(base, args.frameworks, args.decode_cache_len, args.decode_positions,
                                             args.decode_steps)
    if args.seed_comparison and seed_table is not None:
        out[plan.SEED] = seed.seed_cases(base, args.variants, args.frameworks, args.seed_repeats, args.seed_seq_lens)
        out[plan.SEED_DILATED] = seed.dilated_cases(base, args.variants, args.frameworks, args.seed_seq_lens)
    return out


def seed_note(args: argparse.Namespace, seed_table: seed.SeedTable | None) -> str:
    """Why the seed section is absent, or ""."""
    if not args.seed_comparison:
        why = "--no-seed-comparison" if not args.custom else f"custom run ({', '.join(args.custom)})"
        return f"Seed comparison not run ({why}); add --seed-comparison to include it."
    if seed_table is None:
        return f"Seed comparison skipped: no seed-benchmark-*.txt under {seed.SEED_DIR}."
    return ""


def progress_label(first_section: dict[Case, str]) -> Callable[[Case], str]:
    """The progress-bar text of a case: its (first) section's title, framework, label, n and mode."""
    def describe(case: Case) -> str:
        return (f"{plan.TITLES[first_section[case]]}: {case.framework} {label(case)} n={case.seq_len}"
                + ("" if case.mode == "forward" else f" {case.mode}"))
    return describe


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables and write results.json, results.csv, plots and REPORT.md."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    seed_table = seed.load_seed_table() if args.seed_comparison else None
    cases = sections(args, seed_table)
    first_section: dict[Case, str] = {}
    for name, section_cases in cases.items():
        for case in section_cases:
            first_section.setdefault(case, name)

    measured = run_cases(list(first_section), args.timeout, progress_label(first_section))
    rows = [make_row(case, measured[case], name) for name, section_cases in cases.items() for case in section_cases]

    note = seed_note(args, seed_table)
    for title, table in report.tables(rows, seed_table).values():
        print(f"\n{title}\n{table}")
    if note:
        print("\n" + note)
    out = args.out
    report.write_results(rows, out)
    plots = report.write_plots(rows, out, seed_table)
    command = ("python -m benchmarks " + shlex.join(argv)).strip()
    path = report.write_report(rows, out, command, plots, seed_table, note, time.perf_counter() - started)
    print(f"\nWrote {path} and results.json, results.csv, {len(plots)} plots under {out} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0
