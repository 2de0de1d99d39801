"""Command line of ``python -m benchmarks``: build the cases, run them with a progress bar, report.

Example::

    python -m benchmarks                                   # the default CPU report (a few minutes)
    python -m benchmarks --variants improved,dense --seq-lens 8192,32768 --repeats 5 --out /tmp/b
    python -m benchmarks --device gpu --seq-lens 8192,16384,32768

Output goes to ``--out`` (default ``benchmarks/results/<device>/``): results.json, results.csv, PNG
plots and REPORT.md. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from benchmarks import report, seed
from benchmarks.case import DEVICES, DTYPES, FRAMEWORKS, VARIANTS, Case, Measurement, make_row
from benchmarks.runner import REPO_ROOT, run_case

DEFAULT_SEQ_LENS = "4096,8192"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1024,2048")
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``python -m benchmarks --help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", type=_choices(VARIANTS), default=VARIANTS,
                   help=f"comma-separated, from: {', '.join(VARIANTS)}; or 'all'")
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
    p.add_argument("--causal", action="store_true", help="causal masking")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (the median is reported)")
    p.add_argument("--seed-repeats", type=int, default=1,
                   help="timed calls per case of the seed's effective (dense) configuration")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per case (subprocess) before it is a ✗ row")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<device>)")
    p.add_argument("--no-seed-comparison", dest="seed_comparison", action="store_false",
                   help="skip the rerun of the seed's configuration")
    args = p.parse_args(argv)
    if len(args.segment_lengths) != len(args.dilation_rates):
        p.error(f"--segment-lengths {args.segment_lengths} and --dilation-rates {args.dilation_rates} need one rate "
                f"per segment length")
    for name in ("batch", "heads", "head_dim", "repeats", "seed_repeats", "block_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.embed_dim is None:
        args.embed_dim = args.heads * args.head_dim
    if args.out is None:
        args.out = REPO_ROOT / "benchmarks" / "results" / args.device
    return args


def base_case(args: argparse.Namespace) -> Case:
    """The settings shared by every main-run case (variant, framework and n filled in later)."""
    return Case(variant=args.variants[0], framework=args.frameworks[0], device=args.device, dtype=args.dtype,
                batch=args.batch, seq_len=args.seq_lens[0], heads=args.heads, head_dim=args.head_dim,
                embed_dim=args.embed_dim, segment_lengths=args.segment_lengths, dilation_rates=args.dilation_rates,
                causal=args.causal, backward=args.backward, repeats=args.repeats, block_size=args.block_size,
                sparsity_ratio=args.sparsity_ratio)


def main_cases(args: argparse.Namespace) -> list[Case]:
    """Every (variant, framework, n) of the main run, n increasing within a variant and framework."""
    base = base_case(args)
    return [dataclasses.replace(base, variant=v, framework=fw, seq_len=n)
            for v in args.variants for fw in args.frameworks for n in sorted(args.seq_lens)]


class Scheduler:
    """Runs cases once each, skipping what is known to fail without spending a subprocess on it.

    - A variant that is not implemented in a framework is reported so for every later case of it.
    - After a timeout or a kill, the same variant, framework and settings are not retried at a
      larger n (they would only fail slower).
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.done: dict[Case, Measurement] = {}
        self._missing: dict[tuple[str, str], str] = {}
        self._too_big: dict[Case, int] = {}

    def known(self, case: Case) -> Measurement | None:
        """The measurement of ``case`` if it needs no subprocess (done before, or sure to fail)."""
        if case in self.done:
            return self.done[case]
        if (case.variant, case.framework) in self._missing:
            return Measurement.failure(self._missing[(case.variant, case.framework)])
        smallest = self._too_big.get(dataclasses.replace(case, seq_len=0))
        if smallest is not None and case.seq_len > smallest:
            return Measurement.failure(f"skipped: timed out or was killed at n={smallest}")
        return None

    def run(self, case: Case) -> Measurement:
        """Measure ``case`` (or reuse what is known) and remember the outcome."""
        m = self.known(case)
        if m is None:
            m = run_case(case, self.timeout)
            if m.error.startswith("not implemented yet"):
                self._missing[(case.variant, case.framework)] = m.error
            elif m.error.startswith(("timeout", "worker killed")):
                key = dataclasses.replace(case, seq_len=0)
                self._too_big[key] = min(case.seq_len, self._too_big.get(key, case.seq_len))
        self.done[case] = m
        return m


def run_all(sections: dict[str, list[Case]], timeout: float) -> list[dict]:
    """Run every case of every section with a tqdm progress bar; returns result rows (section-tagged)."""
    scheduler = Scheduler(timeout)
    unique = list(dict.fromkeys(c for cases in sections.values() for c in cases))
    with tqdm(total=len(unique), unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
        for case in unique:
            bar.set_description(case.label())
            bar.set_postfix_str("")
            m = scheduler.run(case)
            bar.set_postfix_str(f"{m.status} {m.time_ms:.0f} ms" if m.time_ms is not None else m.status)
            bar.update(1)
    return [make_row(c, scheduler.done[c], section) for section, cases in sections.items() for c in cases]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables and write results.json, results.csv, plots and REPORT.md."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    sections = {"main": main_cases(args)}
    seed_table, seed_note = None, ""
    if not args.seed_comparison:
        seed_note = "Seed comparison not run (--no-seed-comparison)."
    elif (seed_table := seed.load_seed_table()) is None:
        seed_note = f"Seed comparison skipped: no seed-benchmark-*.txt under {seed.SEED_DIR}."
    else:
        sections["seed"] = seed.seed_cases(base_case(args), args.variants, args.frameworks, args.seed_repeats)
        sections["seed_dilated"] = seed.dilated_cases(base_case(args), args.variants, args.frameworks)

    rows = run_all(sections, args.timeout)
    main_rows = [r for r in rows if r["section"] == "main"]
    print("\n" + report.seed_format_table(main_rows))
    print("\nJAX / torch (below 1: JAX faster or leaner)\n" + report.ratio_table(main_rows))
    effective = [r for r in rows if r["section"] == "seed"]
    if seed_table is not None and effective:
        print("\nSeed comparison. " + report.hardware_note(seed_table, effective))
        print(report.seed_comparison_table(seed_table, effective))
        print("\nDilated configuration (segments 1024/2048/4096, rates 1/2/4), never measured by the seed:")
        print(report.seed_format_table([r for r in rows if r["section"] == "seed_dilated"]))
    elif seed_note:
        print("\n" + seed_note)

    out = args.out
    report.write_results(rows, out)
    plots = report.write_plots(main_rows, out)
    command = "python -m benchmarks " + shlex.join(argv)
    path = report.write_report(rows, out, command.strip(), plots, seed_table, seed_note,
                               time.perf_counter() - started)
    print(f"\nWrote {path} and results.json, results.csv, {len(plots)} plots under {out} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0
