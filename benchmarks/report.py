"""Everything the benchmark shows: tables (tabulate), figures (matplotlib), results.json/csv, REPORT.md.

Every function takes result rows (:mod:`benchmarks.rows`: plain dicts, ``status`` ``"ok"`` or
``"failed"``) and filters them by ``section`` and status itself, so a caller (the CLI, notebook 03)
only loads rows and asks for a table or a figure. Glyphs (✓/✗) appear only in rendered tables.
Figure functions return a ``matplotlib.figure.Figure``, or None when the rows hold nothing to draw.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from benchmarks import plan
from benchmarks.case import FRAMEWORKS, Case, Status
from benchmarks.rows import FIELDS, Row, load_rows
from benchmarks.seed import SeedTable, seed_device
from benchmarks.variants import PLANNED, VARIANTS, Kind

__all__ = ["load_rows"]  # re-exported: notebook 03 loads and reports through this module only

SEED_HEADERS = ["Implementation", "Framework", "Batch", "Seq Len", "Heads", "Time (ms)", "Memory (MB)",
                "Throughput (tok/s)", "GFLOP/s", "Status"]
PLOTS = {
    "time": "time_vs_seq_len.png",
    "memory": "memory_vs_seq_len.png",
    "dense": "dilated_vs_dense.png",
    "gflops": "gflops.png",
    "modes": "modes.png",
    "seed": "seed_published.png",
}
MODE_NAMES: tuple[str, ...] = tuple(Case("standard", "jax", causal=c, backward=b).mode for c, b in plan.MODE_SETTINGS)
ORDER = {name: i for i, name in enumerate(VARIANTS)}

METHOD = """\
- Every case runs in a fresh Python subprocess that imports only its own framework
  (`python -m benchmarks.runner`); a crash, out-of-memory kill or timeout loses only that case.
- Warm-up: one call (after JAX's ahead-of-time compilation) before timing; it is not measured.
- Time: every one of `repeats` calls is timed and recorded (`times_ms`), each followed by device
  synchronisation (`jax.block_until_ready`; `torch.cuda.synchronize` on GPU; torch CPU kernels are
  synchronous). Tables show the median and, in brackets, the min-max spread of the repeats.
- Memory: the peak during the timed calls above the post-warm-up baseline (inputs and parameters
  already allocated, warm-up output freed, freed heap returned to the OS). CPU: `VmHWM - VmRSS` of
  `/proc/self/status`, with the high-water mark reset by writing `5` to `/proc/self/clear_refs`
  after warm-up, so compilation is excluded. GPU: peak allocated bytes (`torch.cuda.max_memory_allocated`
  after a reset; JAX `memory_stats()['peak_bytes_in_use']`) minus bytes in use before the timed calls.
- Throughput: `batch * seq_len / time`. GFLOP/s: useful FLOPs / time, where a dilated group counts
  `4 b h_i (n/s_i) (s_i/r_i)^2 d`, dense attention `4 b h n^2 d`, block-sparse
  `4 b h kept B^2 d`; modules add `8 b n E^2` for the projections; causal halves the attention
  term; backward triples everything. The machine peak is a plain float32 `n x n` matmul (`2 n^3`),
  measured once per run and framework by the same harness.
- A case that raises, is killed or exceeds the per-case timeout is a failed (✗) row with its
  failure kind and error; the run goes on (after a timeout, kill or out-of-memory failure the same
  settings are not retried at a larger n: `skipped`)."""


# ----------------------------------------------------------------------------------------------
# selecting rows


def is_ok(row: Row) -> bool:
    """True for a measured row (``status == "ok"`` with a time)."""
    return row["status"] == Status.OK and row["time_ms"] is not None


def section(rows: Iterable[Row], name: str) -> list[Row]:
    """The rows of one section (``main``, ``modes``, ``peak``, ``seed``, ``seed_dilated``)."""
    return [r for r in rows if r["section"] == name]


def _by_order(rows: Iterable[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (ORDER.get(r["variant"], len(ORDER)), FRAMEWORKS.index(r["framework"]),
                                       r["seq_len"]))


# ----------------------------------------------------------------------------------------------
# formatting


def _fmt(value: float | None, digits: int) -> str:
    return "N/A" if value is None else f"{value:.{digits}f}"


def spread(row: Row) -> tuple[float, float] | None:
    """``(min, max)`` of the row's timed repeats (ms), or None where they were not recorded."""
    times = row.get("times_ms") or []
    return (min(times), max(times)) if times else None


def _time_cell(row: Row | None, digits: int = 1) -> str:
    if row is None:
        return "-"
    if not is_ok(row):
        return status_cell(row, 30)
    s = spread(row)
    text = _fmt(row["time_ms"], digits)
    return text if s is None or len(row["times_ms"]) < 2 else f"{text} ({s[0]:.{digits}f}-{s[1]:.{digits}f})"


def status_cell(row: Row, width: int = 60) -> str:
    """``✓`` for an ok row; ``✗ <failure>: <error>`` (shortened to ``width``) for a failed one."""
    if row["status"] == Status.OK:
        return "✓"
    error = row.get("error") or ""
    text = f"{row.get('failure') or 'failed'}: {error}" if error else str(row.get("failure") or "failed")
    return f"✗ {text[:width]}{'…' if len(text) > width else ''}"


def _implementation(row: Row) -> str:
    name = row.get("label") or row["variant"]
    if row.get("density") is not None:
        return f"{name} (density {row['density']:.3f})"
    return name


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if (a is not None and b not in (None, 0)) else None


def _table(body: list[list[Any]], headers: Sequence[str], tablefmt: str) -> str:
    return tabulate(body, headers=list(headers), tablefmt=tablefmt, disable_numparse=True)


# ----------------------------------------------------------------------------------------------
# tables


def seed_format_table(rows: Iterable[Row], tablefmt: str = "grid", error_width: int = 60) -> str:
    """The seed's table with Framework and GFLOP/s columns, one line per row."""
    body = [[_implementation(r), r["framework"], r["batch"], r["seq_len"], r["heads"], _time_cell(r, 2),
             _fmt(r["memory_mb"], 2), _fmt(r["throughput_tok_s"], 0), _fmt(r["gflops"], 1),
             status_cell(r, error_width)] for r in rows]
    return _table(body, SEED_HEADERS, tablefmt)


@dataclasses.dataclass(frozen=True)
class Headline:
    """Which framework is faster for one variant, at the largest n both measured."""

    variant: str
    label: str
    seq_len: int | None
    jax: Row | None
    torch: Row | None
    faster: str | None       # "jax", "torch", or None when only one (or no) framework has a time
    factor: float | None     # slower median / faster median
    overlap: bool | None     # the two min-max spreads overlap (within the noise); None: repeats not recorded


def headlines(rows: Iterable[Row]) -> list[Headline]:
    """One :class:`Headline` per variant of the ``main`` section, in registry order."""
    by_variant: dict[str, list[Row]] = defaultdict(list)
    for r in section(rows, plan.MAIN):
        by_variant[r["variant"]].append(r)
    out = []
    for variant in sorted(by_variant, key=lambda v: ORDER.get(v, len(ORDER))):
        measured = [r for r in by_variant[variant] if is_ok(r)]
        label = (measured or by_variant[variant])[0]["label"] or variant
        pairs: dict[int, dict[str, Row]] = defaultdict(dict)
        for r in measured:
            pairs[r["seq_len"]][r["framework"]] = r
        both = [n for n, p in pairs.items() if set(p) >= {"jax", "torch"}]
        if both:
            n = max(both)
            j, t = pairs[n]["jax"], pairs[n]["torch"]
            faster = "jax" if j["time_ms"] < t["time_ms"] else "torch"
            factor = max(j["time_ms"], t["time_ms"]) / min(j["time_ms"], t["time_ms"])
            sj, st = spread(j), spread(t)
            overlap = None if not (sj and st) else (sj[0] <= st[1] and st[0] <= sj[1])
            out.append(Headline(variant, label, n, j, t, faster, factor, overlap))
        elif measured:
            n = max(r["seq_len"] for r in measured)
            p = pairs[n]
            out.append(Headline(variant, label, n, p.get("jax"), p.get("torch"), None, None, False))
        else:
            out.append(Headline(variant, label, None, None, None, None, None, False))
    return out


def headline_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """Per variant: the faster framework and by how much, with each framework's median and min-max."""
    body = []
    for h in headlines(rows):
        if h.faster is not None:
            verdict, by = h.faster, f"{h.factor:.2f}x"
            note = {True: "spreads overlap: within the noise", False: "", None: "spread not recorded"}[h.overlap]
        elif h.seq_len is not None:
            verdict, by, note = "-", "-", f"only {'jax' if h.jax else 'torch'} measured"
        else:
            verdict, by, note = "-", "-", "no successful row"
        body.append([h.label, h.seq_len or "-", verdict, by, _time_cell(h.jax), _time_cell(h.torch), note])
    return _table(body, ["Implementation", "Seq Len", "Faster", "By", "JAX ms (min-max)", "torch ms (min-max)",
                         "Note"], tablefmt)


def headline_summary(rows: Iterable[Row]) -> str:
    """One sentence: how many variants each framework wins, and how many are within the noise."""
    hs = [h for h in headlines(rows) if h.faster is not None]
    if not hs:
        return "No variant was measured in both frameworks."
    wins = {fw: sum(h.faster == fw for h in hs) for fw in FRAMEWORKS}
    by = "\"By\" is the slower median over the faster one, at the largest n both frameworks measured."
    text = (f"Variants measured in both frameworks: {len(hs)}. JAX is faster for {wins['jax']}, "
            f"torch for {wins['torch']}")
    if all(h.overlap is None for h in hs):
        return f"{text}; these results do not record every repeat, so the spread is unknown. {by}"
    close = sum(bool(h.overlap) for h in hs)
    return (f"{text}; for {close} of them the min-max spreads of the repeats overlap (the order is within the "
            f"noise). {by}")


def ratio_rows(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """JAX/torch time and memory ratios per (variant, seq_len) of the ``main`` section, where both
    frameworks have a measured row."""
    by_key: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for r in _by_order(r for r in section(rows, plan.MAIN) if is_ok(r)):
        by_key[(r["variant"], r["seq_len"])][r["framework"]] = r
    out = []
    for (variant, n), pair in by_key.items():
        if set(pair) != set(FRAMEWORKS):
            continue
        j, t = pair["jax"], pair["torch"]
        out.append(dict(variant=variant, label=j["label"], seq_len=n, jax_ms=j["time_ms"], torch_ms=t["time_ms"],
                        time_ratio=_ratio(j["time_ms"], t["time_ms"]), jax_mb=j["memory_mb"],
                        torch_mb=t["memory_mb"], memory_ratio=_ratio(j["memory_mb"], t["memory_mb"])))
    return out


def ratio_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """JAX-vs-torch table: time and memory of both and their ratios (JAX / torch; < 1 means JAX is better)."""
    body = [[r["label"], r["seq_len"], _fmt(r["jax_ms"], 2), _fmt(r["torch_ms"], 2), _fmt(r["time_ratio"], 2),
             _fmt(r["jax_mb"], 1), _fmt(r["torch_mb"], 1), _fmt(r["memory_ratio"], 2)] for r in ratio_rows(rows)]
    headers = ["Implementation", "Seq Len", "JAX (ms)", "torch (ms)", "Time JAX/torch", "JAX (MB)", "torch (MB)",
               "Memory JAX/torch"]
    return _table(body, headers, tablefmt)


def mode_index(rows: Iterable[Row]) -> dict[tuple[str, str, str], Row]:
    """The ``modes`` section by ``(variant, framework, mode)``."""
    return {(r["variant"], r["framework"], r["mode"]): r for r in section(rows, plan.MODES)}


def _time(index: dict, *key: str) -> float | None:
    r = index.get(key)
    return r["time_ms"] if r is not None and is_ok(r) else None


def mode_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """Per mode variant and mode: JAX and torch time (median, min-max) and JAX / torch."""
    index = mode_index(rows)
    variants = [v for v in plan.MODE_VARIANTS if any(k[0] == v for k in index)]
    body = [[v, mode, _time_cell(index.get((v, "jax", mode))), _time_cell(index.get((v, "torch", mode))),
             _fmt(_ratio(_time(index, v, "jax", mode), _time(index, v, "torch", mode)), 2)]
            for v in variants for mode in MODE_NAMES]
    return _table(body, ["Implementation", "Mode", "JAX ms (min-max)", "torch ms (min-max)", "JAX/torch"], tablefmt)


def mode_ratio_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """Per mode: improved / standard time in each framework (below 1: improved is faster)."""
    index = mode_index(rows)
    body = [[mode] + [_fmt(_ratio(_time(index, "improved", fw, mode), _time(index, "standard", fw, mode)), 2)
                      for fw in FRAMEWORKS] for mode in MODE_NAMES]
    return _table(body, ["Mode"] + [f"{fw} improved/standard" for fw in FRAMEWORKS], tablefmt)


def causal_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """Per mode variant and framework: causal / non-causal (forward; forward+backward), and the cost
    of the backward pass (forward+backward / forward)."""
    index = mode_index(rows)
    variants = [v for v in plan.MODE_VARIANTS if any(k[0] == v for k in index)]
    fwd, cfwd, bwd, cbwd = MODE_NAMES
    body = [[v, fw, _fmt(_ratio(_time(index, v, fw, cfwd), _time(index, v, fw, fwd)), 2),
             _fmt(_ratio(_time(index, v, fw, cbwd), _time(index, v, fw, bwd)), 2),
             _fmt(_ratio(_time(index, v, fw, bwd), _time(index, v, fw, fwd)), 2)]
            for v in variants for fw in FRAMEWORKS if any(k[:2] == (v, fw) for k in index)]
    return _table(body, ["Implementation", "Framework", "causal/non-causal forward",
                         "causal/non-causal fwd+bwd", "fwd+bwd / forward"], tablefmt)


def peak_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """The machine peak: the plain matmul of each framework, its time and FLOP/s."""
    unit, scale = flops_unit(rows)
    body = [[r["framework"], f"{r['seq_len']}x{r['seq_len']} float32", _time_cell(r, 2),
             _fmt(None if r["gflops"] is None else r["gflops"] * scale, 1)] for r in section(rows, plan.PEAK)]
    return _table(body, ["Framework", "matmul", "Time ms (min-max)", unit], tablefmt)


def seed_comparison_table(seed: SeedTable, rows: Sequence[Row], tablefmt: str = "grid") -> str:
    """Our effective-configuration rows beside the seed's published numbers, per (variant, seq_len)."""
    ours = {(r["variant"], r["seq_len"], r["framework"]): r for r in rows}
    frameworks = [fw for fw in FRAMEWORKS if any(key[2] == fw for key in ours)]
    body = []
    for s in seed.rows:
        line = [s.variant, s.seq_len, _fmt(s.time_ms, 2), _fmt(s.memory_mb, 2), "✓" if s.status == Status.OK else "✗"]
        for fw in frameworks:
            r = ours.get((s.variant, s.seq_len, fw))
            line += ["-", "-", "-"] if r is None else [_fmt(r["time_ms"], 2), _fmt(r["memory_mb"], 2),
                                                       status_cell(r, 30)]
        body.append(line)
    headers = ["Implementation", "Seq Len", "seed (ms)", "seed (MB)", "seed"]
    for fw in frameworks:
        headers += [f"{fw} (ms)", f"{fw} (MB)", fw]
    return _table(body, headers, tablefmt)


def hardware_note(seed: SeedTable | None, rows: Sequence[Row]) -> str:
    """One line saying that the seed's and our numbers come from different hardware."""
    ours = next((r["device_name"] for r in rows if r.get("device_name")), rows[0]["device"] if rows else "?")
    theirs = seed_device(seed) if seed else "?"
    return (f"Different hardware: the seed measured on a {theirs}; ours ran on {ours}. Compare shapes "
            f"and ratios, not absolute numbers.")


def planned_table(tablefmt: str = "grid") -> str:
    """The row families the report leaves room for (:data:`benchmarks.variants.PLANNED`)."""
    return _table([[p.name, p.measures, p.waits_for] for p in PLANNED], ["Rows", "Would measure", "Waits for"],
                  tablefmt)


# ----------------------------------------------------------------------------------------------
# shapes and decode: ratios against a baseline, with their spread and the target


@dataclasses.dataclass(frozen=True)
class Ratio:
    """One ratio of two measured rows: median over median, and the widest ratio the repeats allow
    (``low = min(a) / max(b)``, ``high = max(a) / min(b)``), beside its target (an upper bound)."""

    framework: str
    name: str
    mode: str
    value: float | None
    low: float | None
    high: float | None
    target: float | None
    target_text: str = ""

    @property
    def met(self) -> str:
        """``yes`` / ``no`` (median against the target), ``-`` without a value or a target."""
        if self.value is None or self.target is None:
            return "-"
        return "yes" if self.value <= self.target else "no"


def time_ratio(framework: str, name: str, mode: str, a: Row | None, b: Row | None, target: float | None,
               target_text: str = "") -> Ratio:
    """The :class:`Ratio` of ``a``'s time over ``b``'s (None values where either row is missing or failed)."""
    text = target_text or ("-" if target is None else f"<= {target:g}")
    if a is None or b is None or not (is_ok(a) and is_ok(b)):
        return Ratio(framework, name, mode, None, None, None, target, text)
    sa, sb = spread(a), spread(b)
    low = high = None
    if sa and sb:
        low, high = sa[0] / sb[1], sa[1] / sb[0]
    return Ratio(framework, name, mode, _ratio(a["time_ms"], b["time_ms"]), low, high, target, text)


def _ratio_cell(r: Ratio, digits: int = 2) -> str:
    if r.value is None:
        return "N/A"
    text = f"{r.value:.{digits}f}"
    return text if r.low is None or r.high is None else f"{text} ({r.low:.{digits}f}-{r.high:.{digits}f})"


def _ratio_table(ratios: Sequence[Ratio], tablefmt: str, digits: int = 2) -> str:
    body = [[r.framework, r.mode, r.name, _ratio_cell(r, digits), r.target_text, r.met] for r in ratios]
    return _table(body, ["Framework", "Mode", "Ratio", "Median (min-max)", "Target", "Met (median)"], tablefmt)


#: The issue's targets for the shapes section: each case's time over the baseline's.
SHAPE_TARGETS: dict[str, float] = {"gqa": 1.0, "odd": 1.05, "packed": 1.1}
#: The decode section's targets: step at the longest context over the shortest, step over the full
#: causal forward, JAX step over torch's. (GQA's k/v memory target is h_kv / h, from the rows.)
DECODE_GROWTH_TARGET, DECODE_VS_FORWARD_TARGET, DECODE_JAX_TORCH_TARGET = 1.2, 1 / 50, 1.0


def shapes_index(rows: Iterable[Row]) -> tuple[int | None, dict[tuple[str, str, str], Row]]:
    """The ``shapes`` section's n and its rows by ``(framework, mode, kind)`` (kinds of
    :data:`benchmarks.plan.SHAPE_KINDS`)."""
    shapes = section(rows, plan.SHAPES)
    if not shapes:
        return None, {}
    n = max(r["seq_len"] for r in shapes)
    return n, {(r["framework"], r["mode"], plan.shape_kind(r, n)): r for r in shapes}


def _shape_names(index: dict[tuple[str, str, str], Row], n: int) -> dict[str, str]:
    heads = next((r["heads"] for r in index.values()), None)
    gqa = next((r for k, r in index.items() if k[2] == "gqa"), None)
    packed = next((r for k, r in index.items() if k[2] == "packed"), None)
    odd = next((r for k, r in index.items() if k[2] == "odd"), None)
    return {
        "gqa": f"GQA h_kv={gqa['num_kv_heads'] if gqa else '?'} / h_kv={heads}",
        "odd": f"n={odd['seq_len'] if odd else n - 1} / n={n}",
        "packed": f"packed ({packed['documents'] if packed else '?'} documents) / unpacked",
    }


def shapes_ratios(rows: Iterable[Row]) -> list[Ratio]:
    """Per framework and mode (forward, forward+backward): GQA, odd-length and packed time over the
    baseline's, with the issue's targets (:data:`SHAPE_TARGETS`)."""
    n, index = shapes_index(rows)
    if n is None:
        return []
    names = _shape_names(index, n)
    modes = [m for m in MODE_NAMES if any(k[1] == m for k in index)]
    return [time_ratio(fw, names[kind], mode, index.get((fw, mode, kind)), index.get((fw, mode, "baseline")),
                       SHAPE_TARGETS[kind])
            for fw in FRAMEWORKS if any(k[0] == fw for k in index) for mode in modes for kind in SHAPE_TARGETS]


def shapes_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """:func:`shapes_ratios` as a table, with the median (min-max) and the target."""
    return _table_with_times(shapes_ratios(rows), rows, tablefmt)


def _table_with_times(ratios: Sequence[Ratio], rows: Iterable[Row], tablefmt: str) -> str:
    n, index = shapes_index(rows)
    kinds = {v: k for k, v in _shape_names(index, n or 0).items()}
    body = []
    for r in ratios:
        kind = kinds.get(r.name)
        case, base = index.get((r.framework, r.mode, kind or "")), index.get((r.framework, r.mode, "baseline"))
        body.append([r.framework, r.mode, r.name, _time_cell(case), _time_cell(base), _ratio_cell(r), r.target_text,
                     r.met])
    return _table(body, ["Framework", "Mode", "Ratio", "Case ms (min-max)", "Baseline ms (min-max)",
                         "Ratio median (min-max)", "Target", "Met (median)"], tablefmt)


def gqa_memory_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """GQA against the baseline, per framework and mode: what ``k, v`` (and their gradients) take
    (``kv_mb``: JAX from the compiled program's argument and output bytes, torch from the tensors),
    and the extra peak memory of the call the runner measures (``memory_mb``)."""
    n, index = shapes_index(rows)
    body = []
    for fw in FRAMEWORKS:
        for mode in MODE_NAMES:
            g, b = index.get((fw, mode, "gqa")), index.get((fw, mode, "baseline"))
            if g is None and b is None:
                continue
            kv = [None if r is None else r.get("kv_mb") for r in (g, b)]
            mem = [None if r is None else r.get("memory_mb") for r in (g, b)]
            heads = next(r for r in (g, b) if r is not None)["heads"]
            target = g["num_kv_heads"] / heads if g is not None and g.get("num_kv_heads") else None
            ratio = _ratio(kv[0], kv[1])
            # the compiled JAX output also counts its tuple's few bytes of pointers: compare within 0.1 %
            met = "-" if ratio is None or target is None else ("yes" if ratio <= target * 1.001 else "no")
            body.append([fw, mode, _fmt(kv[0], 1), _fmt(kv[1], 1), _fmt(ratio, 3),
                         "-" if target is None else f"<= {target:g}", met, _fmt(mem[0], 1), _fmt(mem[1], 1),
                         _fmt(_ratio(mem[0], mem[1]), 2)])
    return _table(body, ["Framework", "Mode", "k/v MiB GQA", "k/v MiB baseline", "k/v GQA/baseline", "Target",
                         "Met", "extra peak MiB GQA", "extra peak MiB baseline", "extra peak GQA/baseline"], tablefmt)


def decode_index(rows: Iterable[Row]) -> tuple[dict[tuple[str, int], Row], dict[str, Row]]:
    """The ``decode`` section: steps by ``(framework, position)`` and the full forward by framework."""
    steps: dict[tuple[str, int], Row] = {}
    full: dict[str, Row] = {}
    for r in section(rows, plan.DECODE):
        if r["variant"] == "decode":
            steps[(r["framework"], r["position"])] = r
        else:
            full[r["framework"]] = r
    return steps, full


def decode_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """Per framework: the decode step at each position (ms per token, tokens/s, extra peak memory)
    and the full causal forward over the cache length."""
    steps, full = decode_index(rows)
    body = []
    for fw in FRAMEWORKS:
        for (f, position), r in sorted(steps.items(), key=lambda kv: kv[0][1]):
            if f == fw:
                body.append([fw, f"decode step at index {position} (cache {r['seq_len']})", _time_cell(r, 3),
                             _fmt(r["throughput_tok_s"], 0), _fmt(r["memory_mb"], 1)])
        if fw in full:
            r = full[fw]
            body.append([fw, f"full causal forward over {r['seq_len']} tokens (batch {r['batch']})",
                         _time_cell(r, 1), _fmt(r["throughput_tok_s"], 0), _fmt(r["memory_mb"], 1)])
    return _table(body, ["Framework", "Call", "ms (min-max)", "tokens/s", "extra peak MiB"], tablefmt)


def decode_ratios(rows: Iterable[Row]) -> list[Ratio]:
    """Per framework: step at the longest context over the shortest (target <= 1.2), step at the
    longest context over the full forward (target <= 1/50); per position: JAX step over torch's
    (target <= 1)."""
    steps, full = decode_index(rows)
    positions = sorted({p for _, p in steps})
    if not positions:
        return []
    lo, hi = positions[0], positions[-1]
    out = []
    for fw in FRAMEWORKS:
        if not any(f == fw for f, _ in steps):
            continue
        if hi != lo:
            out.append(time_ratio(fw, f"t(index {hi}) / t(index {lo})", "decode", steps.get((fw, hi)),
                                  steps.get((fw, lo)), DECODE_GROWTH_TARGET))
        if fw in full:
            out.append(time_ratio(fw, f"step at index {hi} / full causal forward over {full[fw]['seq_len']}",
                                  "decode", steps.get((fw, hi)), full[fw], DECODE_VS_FORWARD_TARGET, "<= 1/50"))
    if {f for f, _ in steps} >= {"jax", "torch"}:
        for p in positions:
            out.append(time_ratio("jax/torch", f"JAX step / torch step at index {p}", "decode",
                                  steps.get(("jax", p)), steps.get(("torch", p)), DECODE_JAX_TORCH_TARGET))
    return out


def decode_ratio_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """:func:`decode_ratios` as a table (median, min-max, target)."""
    return _ratio_table(decode_ratios(rows), tablefmt, digits=3)


def tables(rows: Sequence[Row], seed: SeedTable | None = None, tablefmt: str = "grid") -> dict[str, tuple[str, str]]:
    """Every table the rows allow, in report order: ``key -> (title, table)``.

    Keys: ``headline``, ``jax``, ``torch``, ``ratio`` (main section); ``modes``, ``mode_ratios``,
    ``causal`` (modes); ``peak``; ``shapes``, ``shapes_memory``; ``decode``, ``decode_ratios``; ``seed``,
    ``seed_dilated``. The console and REPORT.md both print these.
    """
    main = section(rows, plan.MAIN)
    out: dict[str, tuple[str, str]] = {}
    if main:
        out["headline"] = ("Headline: which framework is faster", headline_table(rows, tablefmt))
        for fw in FRAMEWORKS:
            fw_rows = [r for r in main if r["framework"] == fw]
            if fw_rows:
                out[fw] = (f"All main rows: {fw}", seed_format_table(fw_rows, tablefmt, 200))
        out["ratio"] = ("JAX vs torch (JAX / torch: below 1, JAX is faster or leaner)", ratio_table(rows, tablefmt))
    modes = section(rows, plan.MODES)
    if modes:
        n = modes[0]["seq_len"]
        out["modes"] = (f"Modes at n = {n}: time per mode", mode_table(rows, tablefmt))
        out["mode_ratios"] = (f"Modes at n = {n}: improved / standard", mode_ratio_table(rows, tablefmt))
        out["causal"] = (f"Modes at n = {n}: causal and backward cost", causal_table(rows, tablefmt))
    if section(rows, plan.PEAK):
        out["peak"] = ("Machine peak (plain float32 matmul)", peak_table(rows, tablefmt))
    n, _ = shapes_index(rows)
    if n is not None:
        out["shapes"] = (f"Shapes at n = {n}: time over the baseline (improved, h_kv = h, unpacked)",
                         shapes_table(rows, tablefmt))
        out["shapes_memory"] = (f"Shapes at n = {n}: GQA k/v memory against the baseline",
                                gqa_memory_table(rows, tablefmt))
    if section(rows, plan.DECODE):
        out["decode"] = ("Decode: one token per step with a key/value cache (batch 1)", decode_table(rows, tablefmt))
        out["decode_ratios"] = ("Decode: ratios and targets", decode_ratio_table(rows, tablefmt))
    effective = section(rows, plan.SEED)
    if seed is not None and effective:
        out["seed"] = ("Seed comparison (the seed's dense configuration). " + hardware_note(seed, effective),
                       seed_comparison_table(seed, effective, tablefmt))
    dilated = section(rows, plan.SEED_DILATED)
    if dilated:
        out["seed_dilated"] = ("Seed shapes with the dilated configuration (never measured by the seed)",
                               seed_format_table(dilated, tablefmt, 200))
    return out


# ----------------------------------------------------------------------------------------------
# files


def write_results(rows: Sequence[Row], out_dir: Path) -> tuple[Path, Path]:
    """Write ``results.json`` (a list of row objects) and ``results.csv`` (lists as JSON text)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
    json_path.write_text(json.dumps(list(rows), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return json_path, csv_path


# ----------------------------------------------------------------------------------------------
# figures


def flops_unit(rows: Iterable[Row]) -> tuple[str, float]:
    """``("GFLOP/s", 1)`` on CPU, ``("TFLOP/s", 1e-3)`` when any row ran on a GPU (scale of the gflops field)."""
    return ("TFLOP/s", 1e-3) if any(r["device"] == "gpu" for r in rows) else ("GFLOP/s", 1.0)


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _color(variant: str):
    return _pyplot().get_cmap("tab10")(ORDER.get(variant, 9) % 10)


def _log_axes(ax, xs: Iterable[int], ylabel: str, title: str) -> None:
    from matplotlib.ticker import NullLocator

    ticks = sorted(set(xs))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if ticks:
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _lines(ax, rows: list[Row], variants: Sequence[str], field: str) -> list[int]:
    """One line per variant of ``variants`` (dense gray and dashed: the baseline); returns the x values."""
    xs: list[int] = []
    for v in variants:
        pts = sorted((r["seq_len"], r[field]) for r in rows if r["variant"] == v and r[field] is not None)
        if not pts:
            continue
        x, y = zip(*pts, strict=True)
        xs += x
        label = next(r["label"] for r in rows if r["variant"] == v)
        style = dict(color="0.45", ls="--", marker="x") if v == "dense" else dict(color=_color(v), marker="o")
        ax.plot(x, y, label=label, **style)
    if xs:
        ax.legend(fontsize=7)
    return xs


def _main_ok(rows: Iterable[Row]) -> list[Row]:
    return [r for r in section(rows, plan.MAIN) if is_ok(r)]


def figure_vs_seq_len(rows: Sequence[Row], field: str = "time_ms"):
    """Time (or ``field="memory_mb"``) vs n: one row of panels per framework, one column for the
    attention functions and one for the modules, each with the dense baseline."""
    main = _main_ok(rows)
    if not any(r[field] is not None for r in main):
        return None
    plt = _pyplot()
    frameworks = [fw for fw in FRAMEWORKS if any(r["framework"] == fw for r in main)]
    panels = (("attention functions", Kind.ATTENTION), ("multi-head modules", Kind.MODULE))
    groups = [(title, kind) for title, kind in panels
              if any(VARIANTS[r["variant"]].kind is kind for r in main)] or [("dense attention", Kind.BASELINE)]
    fig, axes = plt.subplots(len(frameworks), len(groups), figsize=(6 * len(groups), 3.8 * len(frameworks)),
                             squeeze=False)
    ylabel = "time per call (ms)" if field == "time_ms" else "peak memory above baseline (MB)"
    for i, fw in enumerate(frameworks):
        fw_rows = [r for r in main if r["framework"] == fw]
        for j, (title, kind) in enumerate(groups):
            variants = [n for n, v in VARIANTS.items() if v.kind is kind and n != "dense"] + ["dense"]
            xs = _lines(axes[i][j], fw_rows, variants, field)
            _log_axes(axes[i][j], xs, ylabel, f"{fw}: {title} (dense = baseline)")
    fig.tight_layout()
    return fig


def figure_vs_dense(rows: Sequence[Row]):
    """Dilated and block-sparse attention against dense attention, time and memory, per framework.
    None when the rows hold no dense baseline."""
    main = _main_ok(rows)
    if not any(r["variant"] == "dense" for r in main):
        return None
    plt = _pyplot()
    frameworks = [fw for fw in FRAMEWORKS if any(r["framework"] == fw for r in main)]
    chosen = ("dense", "standard", "improved", "block_sparse")
    fig, axes = plt.subplots(2, len(frameworks), figsize=(6.5 * len(frameworks), 7.5), squeeze=False)
    for j, fw in enumerate(frameworks):
        fw_rows = [r for r in main if r["framework"] == fw]
        for i, (field, ylabel) in enumerate((("time_ms", "time per call (ms)"),
                                             ("memory_mb", "peak memory above baseline (MB)"))):
            xs = _lines(axes[i][j], fw_rows, chosen, field)
            _log_axes(axes[i][j], xs, ylabel, f"{fw}: dilated vs dense attention")
    fig.tight_layout()
    return fig


def figure_gflops(rows: Sequence[Row]):
    """Useful FLOP/s per variant at the largest n of the run, both frameworks, with each framework's
    measured matmul peak as a horizontal line."""
    main = [r for r in _main_ok(rows) if r["gflops"] is not None]
    if not main:
        return None
    plt = _pyplot()
    unit, scale = flops_unit(rows)
    n = max(r["seq_len"] for r in main)
    at_n = {(r["variant"], r["framework"]): r for r in main if r["seq_len"] == n}
    variants = sorted({v for v, _ in at_n}, key=lambda v: ORDER.get(v, len(ORDER)))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.38
    styles = {"jax": dict(color="tab:blue"), "torch": dict(color="tab:orange", hatch="//")}
    for i, fw in enumerate(FRAMEWORKS):
        xs = [k + (i - 0.5) * width for k, v in enumerate(variants) if (v, fw) in at_n]
        ys = [at_n[(v, fw)]["gflops"] * scale for v in variants if (v, fw) in at_n]
        if xs:
            ax.bar(xs, ys, width, label=f"{fw} (useful {unit})", **styles[fw])
    peaks = [r for r in section(rows, plan.PEAK) if is_ok(r)]
    for r in peaks:
        value = r["gflops"] * scale
        ax.axhline(value, color=styles[r["framework"]]["color"], ls="--", lw=1.2,
                   label=f"{r['framework']} matmul peak {value:.0f} {unit} ({r['seq_len']}x{r['seq_len']} float32)")
    labels = [next(r["label"] for r in main if r["variant"] == v) for v in variants]
    ax.set_xticks(range(len(variants)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"useful {unit}")
    note = "" if peaks else " (no matmul peak in these results)"
    ax.set_title(f"Useful {unit} at n = {n} against the machine's matmul peak{note}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def figure_modes(rows: Sequence[Row]):
    """Time per mode (forward, causal, +backward) of standard and improved, both frameworks; the
    error bars are the min-max spread of the repeats. None without mode rows."""
    index = mode_index(rows)
    variants = [v for v in plan.MODE_VARIANTS if any(k[0] == v and is_ok(r) for k, r in index.items())]
    if not variants:
        return None
    plt = _pyplot()
    n = section(rows, plan.MODES)[0]["seq_len"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4), squeeze=False, sharey=True)
    width = 0.38
    for ax, v in zip(axes[0], variants, strict=True):
        for i, fw in enumerate(FRAMEWORKS):
            xs, ys, lo, hi = [], [], [], []
            for k, mode in enumerate(MODE_NAMES):
                r = index.get((v, fw, mode))
                if r is None or not is_ok(r):
                    continue
                s = spread(r) or (r["time_ms"], r["time_ms"])
                xs.append(k + (i - 0.5) * width)
                ys.append(r["time_ms"])
                lo.append(r["time_ms"] - s[0])
                hi.append(s[1] - r["time_ms"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=fw,
                       color="tab:blue" if fw == "jax" else "tab:orange")
        ax.set_xticks(range(len(MODE_NAMES)), MODE_NAMES, rotation=15, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{v}, n = {n}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("time per call (ms), bars: min-max of repeats")
    fig.tight_layout()
    return fig


def figure_seed(seed: SeedTable | None):
    """The seed package's published time and memory per variant, on a plot of its own: another
    machine (its device from the table header), not measured by this benchmark."""
    if seed is None or not seed.rows:
        return None
    plt = _pyplot()
    variants = list(dict.fromkeys(r.variant for r in seed.rows))
    lengths = sorted({r.seq_len for r in seed.rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(lengths)
    for ax, field, ylabel in ((axes[0], "time_ms", "time (ms)"), (axes[1], "memory_mb", "memory (MB)")):
        for i, n in enumerate(lengths):
            for k, v in enumerate(variants):
                r = next((r for r in seed.rows if r.variant == v and r.seq_len == n), None)
                x = k + (i - (len(lengths) - 1) / 2) * width
                value = None if r is None else getattr(r, field)
                if value is None:
                    ax.text(x, 0.02, "✗", ha="center", va="bottom", color="red", fontsize=11,
                            transform=ax.get_xaxis_transform())
                else:
                    ax.bar(x, value, width, color=plt.get_cmap("Greys")(0.4 + 0.4 * i),
                           label=f"n = {n}" if k == 0 else None)
        ax.set_xticks(range(len(variants)), variants, rotation=25, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"The seed package's published numbers ({seed.path.name}, ✗: failed there)\n"
                 f"measured on a {seed_device(seed)}: another machine, not by this benchmark", fontsize=10)
    fig.tight_layout()
    return fig


def figures(rows: Sequence[Row], seed: SeedTable | None = None) -> dict[str, Any]:
    """Every figure the rows (and the seed table) allow, by :data:`PLOTS` key."""
    made = {"time": figure_vs_seq_len(rows, "time_ms"), "memory": figure_vs_seq_len(rows, "memory_mb"),
            "dense": figure_vs_dense(rows), "gflops": figure_gflops(rows), "modes": figure_modes(rows),
            "seed": figure_seed(seed)}
    return {key: fig for key, fig in made.items() if fig is not None}


def write_plots(rows: Sequence[Row], out_dir: Path, seed: SeedTable | None = None) -> dict[str, Path]:
    """Save :func:`figures` as PNG files under ``out_dir``; returns the written paths by key."""
    import matplotlib

    matplotlib.use("Agg")
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, fig in figures(rows, seed).items():
        paths[key] = out_dir / PLOTS[key]
        fig.savefig(paths[key], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------
# REPORT.md


def _settings(rows: Sequence[Row]) -> str:
    r = rows[0]
    text = (f"device `{r['device']}` ({r['device_name'] or 'unknown'}), dtype `{r['dtype']}`, batch {r['batch']}, "
            f"{r['heads']} heads, head_dim {r['head_dim']}, segment lengths {r['segment_lengths']}, dilation "
            f"rates {r['dilation_rates']}, merge {r.get('merge', 'head_partition')}, {r['mode']}, "
            f"repeats {r['repeats']}")
    bs = next((x for x in rows if x["block_size"] is not None), None)
    if bs:
        text += f", block-sparse: block {bs['block_size']}, ratio {bs['sparsity_ratio']}, pattern dilated_sparse"
    mh = next((x for x in rows if x["embed_dim"] is not None), None)
    if mh:
        text += f", modules: embed_dim {mh['embed_dim']}"
    software = sorted({x["software"] for x in rows if x.get("software")})
    if software:
        text += f"; {', '.join(software)}"
    return text


_CAPTIONS = {
    "time": "Time vs n per framework: attention functions and modules, dense attention as the gray baseline.",
    "memory": "Peak memory above the baseline vs n, same panels.",
    "dense": "Dilated and block-sparse attention against dense attention (the baseline), per framework.",
    "gflops": "Useful FLOP/s per variant against the machine's measured matmul peak (dashed lines).",
    "modes": "The mode rows: time per mode, error bars the min-max of the repeats.",
    "seed": "The seed package's own published numbers, from another machine (not comparable in absolute terms).",
}


def write_report(rows: Sequence[Row], out_dir: Path, command: str, plots: dict[str, Path],
                 seed: SeedTable | None, seed_note: str = "", runtime_s: float | None = None) -> Path:
    """Write ``REPORT.md``: the headline first, then settings, tables per section, plots, seed
    comparison, planned rows and the method."""
    main = section(rows, plan.MAIN)
    runtime = "" if runtime_s is None else f" (whole run: {runtime_s:.0f} s)"
    lines = ["# Benchmark report: jax_dilated vs torch_ref", "", f"Command: `{command}`{runtime}", ""]
    t = {key: text for key, (_title, text) in tables(rows, seed, "github").items()}

    def put(title: str, *texts: str, level: str = "##") -> None:
        lines.extend([f"{level} {title}", ""])
        for text in texts:
            lines.extend([text, ""])

    if main:
        put("Headline: which framework is faster", headline_summary(rows), t["headline"],
            f"Settings of the main rows: {_settings(main)}.")
        for fw in FRAMEWORKS:
            if fw in t:
                put(f"All main rows: {fw}", t[fw])
        put("JAX vs torch", "Ratios are JAX / torch: below 1 means JAX is faster or leaner.", t["ratio"])
    if "modes" in t:
        n = section(rows, plan.MODES)[0]["seq_len"]
        put(f"Modes: causal and backward at n = {n}",
            "`standard` and `improved` in each mode, both frameworks, from the same run. JAX/torch below 1: "
            "JAX is faster; improved/standard below 1: improved is faster; causal/non-causal below 1: the "
            "causal mask saves time.")
        put("Time per mode", t["modes"], level="###")
        put("Improved / standard per mode", t["mode_ratios"], level="###")
        put("Causal / non-causal, and the cost of the backward pass", t["causal"], level="###")
    else:
        put("Modes: causal and backward",
            "No mode rows in this run (a custom run without `--modes`, or `--no-modes`).")
    if "peak" in t:
        put("Machine peak", "A plain float32 matmul per framework, measured by the same harness: the ceiling for "
            "the useful FLOP/s of the attention rows.", t["peak"])
    if "shapes" in t:
        n_shapes, index = shapes_index(rows)
        docs = next((r["documents"] for k, r in index.items() if k[2] == "packed"), 0)
        layout = f"{docs} documents of {n_shapes // docs} in a row of {n_shapes}" if docs and n_shapes else "none here"
        put(f"Shapes: grouped-query heads, odd length, packed documents at n = {n_shapes}",
            "`improved_dilated_attention` in both frameworks, non-causal, forward and forward+backward, each case "
            "against the baseline (h_kv = h, n as given, no `document_ids`). Ratios: median over median, in "
            "brackets the widest ratio the repeats allow (min / max to max / min); the targets are upper bounds "
            "from the issue, and \"Met\" compares the median. Packed: `document_ids = position * documents // n` "
            f"({layout}), an argument of the compiled JAX program.")
        put("Time over the baseline", t["shapes"], level="###")
        put("GQA: k/v memory", "k/v MiB is what `k` and `v` take, with their gradients for forward+backward: JAX "
            "reads it from the compiled program (`memory_analysis()`: argument bytes minus `q` (and "
            "`document_ids`), plus output bytes minus `dq`), torch from the `k, v` tensors (a gradient has its "
            "tensor's shape). The target is h_kv / h. \"Extra peak\" is the runner's memory column (peak RSS "
            "above the post-warm-up baseline), which includes every temporary of the call.",
            t["shapes_memory"], level="###")
    else:
        put("Shapes: grouped-query heads, odd length, packed documents",
            "No shape rows in this run (a custom run without `--shapes`, or `--no-shapes`).")
    if "decode" in t:
        put("Decode: tokens/s with a key/value cache",
            "`dilated_attention_decode`, batch 1, one new token (q, k, v of one position) against a cache filled "
            "with random values, at a fixed index. JAX: compiled once (the index an argument, the two cache "
            "arguments donated so XLA writes the new row in place), each step feeding the returned cache back; "
            "torch: the cache updated in place, under `torch.no_grad()`. A timed repeat is many steps in a row, "
            "divided by their number (the `steps` field). The full causal `improved_dilated_attention` forward "
            "over the whole cache length is the comparison.")
        put("Per-token step", t["decode"], level="###")
        put("Ratios and targets", "Median over median, in brackets the widest ratio the repeats allow.",
            t["decode_ratios"], level="###")
    else:
        put("Decode: tokens/s with a key/value cache",
            "No decode rows in this run (a custom run without `--decode`, or `--no-decode`).")
    if plots:
        put("Plots", *[f"{_CAPTIONS.get(key, key)}\n\n![{key}]({path.name})" for key, path in plots.items()])
    put("Seed comparison", *([seed_note] if seed_note else []))
    effective = section(rows, plan.SEED)
    if "seed" in t and seed is not None:
        lines.extend([hardware_note(seed, effective), "",
                      f"The seed's effective configuration (`segment_lengths=[n]`, `dilation_rates=[1]`, i.e. "
                      f"dense attention), batch 2, 8 heads, head_dim 64, float32, median of "
                      f"{effective[0]['repeats']} timed call(s) after the warm-up, beside `{seed.path.name}` "
                      f"({seed.header}); the seed's own numbers are also plotted on their own "
                      f"(`{PLOTS['seed']}`):", "", t["seed"], ""])
    if "seed_dilated" in t:
        lines.extend(["The dilated configuration the seed never measured (segments 1024/2048/4096, rates 1/2/4), "
                      "same shapes:", "", t["seed_dilated"], ""])
    if PLANNED:
        put("Planned rows", "Not measured yet; the registry (`PLANNED` in `benchmarks/variants.py`) and this "
            "section are where they go once the library supports them.", planned_table("github"))
    put("Method", METHOD)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
