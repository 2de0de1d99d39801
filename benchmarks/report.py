"""Everything the benchmark writes: tables (tabulate), plots (matplotlib), results.json/csv, REPORT.md.

All functions take result rows as produced by :func:`benchmarks.case.make_row` (plain dicts).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from tabulate import tabulate

from benchmarks.case import FRAMEWORKS, OK, VARIANTS
from benchmarks.seed import SeedTable, seed_device

Row = dict[str, Any]

SEED_HEADERS = ["Implementation", "Framework", "Batch", "Seq Len", "Heads", "Time (ms)", "Memory (MB)",
                "Throughput (tok/s)", "GFLOP/s", "Status"]
FIELDS = ["variant", "framework", "device", "dtype", "batch", "seq_len", "heads", "head_dim", "segment_lengths",
          "dilation_rates", "time_ms", "memory_mb", "throughput_tok_s", "gflops", "status", "error", "density",
          "causal", "backward", "embed_dim", "block_size", "sparsity_ratio", "repeats", "section", "device_name",
          "wall_s", "cpu_s"]
PLOTS = {
    "time": "time_vs_seq_len.png",
    "memory": "memory_vs_seq_len.png",
    "dense": "dilated_vs_dense.png",
}

METHOD = """\
- Every case runs in a fresh Python subprocess that imports only its own framework.
- Warm-up: one call (including JIT compilation) before timing; it is not measured.
- Time: median of `repeats` calls, each followed by device synchronisation
  (`jax.block_until_ready`; `torch.cuda.synchronize` on GPU; torch CPU kernels are synchronous).
- Memory: the peak during the timed calls above the post-warm-up baseline (inputs and parameters
  already allocated, warm-up output freed, freed heap returned to the OS). CPU: `VmHWM - VmRSS` of
  `/proc/self/status`, with the high-water mark reset by writing `5` to `/proc/self/clear_refs`
  after warm-up, so compilation is excluded. GPU: peak allocated bytes (`torch.cuda.max_memory_allocated`
  after a reset; JAX `memory_stats()['peak_bytes_in_use']`) minus bytes in use before the timed calls.
- Throughput: `batch * seq_len / time`. GFLOP/s: useful FLOPs / time, where a dilated group counts
  `4 b h_i (n/s_i) (s_i/r_i)^2 d`, dense attention `4 b h n^2 d`, block-sparse
  `4 b h kept B^2 d`; modules add `8 b n E^2` for the projections; causal halves the attention
  term; backward triples everything.
- A case that raises, is killed or exceeds the per-case timeout is a ✗ row with its error; the run
  goes on (a variant that timed out is not retried at larger n in the same run)."""


# ----------------------------------------------------------------------------------------------
# formatting


def _fmt(value: float | None, digits: int) -> str:
    return "N/A" if value is None else f"{value:.{digits}f}"


def _status(row: Row, width: int = 60) -> str:
    if row["status"] == OK:
        return OK
    error = row["error"] or "failed"
    return f"{row['status']} {error[:width]}{'…' if len(error) > width else ''}"


def _implementation(row: Row) -> str:
    if row.get("density") is not None:
        return f"{row['variant']} (density {row['density']:.3f})"
    return row["variant"]


def seed_format_table(rows: Iterable[Row], tablefmt: str = "grid", error_width: int = 60) -> str:
    """The seed's table with Framework and GFLOP/s columns, one line per row."""
    body = [[_implementation(r), r["framework"], r["batch"], r["seq_len"], r["heads"], _fmt(r["time_ms"], 2),
             _fmt(r["memory_mb"], 2), _fmt(r["throughput_tok_s"], 0), _fmt(r["gflops"], 1),
             _status(r, error_width)] for r in rows]
    return tabulate(body, headers=SEED_HEADERS, tablefmt=tablefmt, disable_numparse=True)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if (a is not None and b not in (None, 0)) else None


def ratio_rows(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """JAX/torch time and memory ratios per (variant, seq_len), where both frameworks have a row."""
    by_key: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        by_key[(r["variant"], r["seq_len"])][r["framework"]] = r
    out = []
    for (variant, n), pair in by_key.items():
        if set(pair) != set(FRAMEWORKS):
            continue
        j, t = pair["jax"], pair["torch"]
        out.append(dict(variant=variant, seq_len=n, jax_ms=j["time_ms"], torch_ms=t["time_ms"],
                        time_ratio=_ratio(j["time_ms"], t["time_ms"]), jax_mb=j["memory_mb"],
                        torch_mb=t["memory_mb"], memory_ratio=_ratio(j["memory_mb"], t["memory_mb"])))
    return out


def ratio_table(rows: Iterable[Row], tablefmt: str = "grid") -> str:
    """JAX-vs-torch table: time and memory of both and their ratios (JAX / torch; < 1 means JAX is better)."""
    body = [[r["variant"], r["seq_len"], _fmt(r["jax_ms"], 2), _fmt(r["torch_ms"], 2), _fmt(r["time_ratio"], 2),
             _fmt(r["jax_mb"], 1), _fmt(r["torch_mb"], 1), _fmt(r["memory_ratio"], 2)] for r in ratio_rows(rows)]
    headers = ["Implementation", "Seq Len", "JAX (ms)", "torch (ms)", "Time JAX/torch", "JAX (MB)", "torch (MB)",
               "Memory JAX/torch"]
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def seed_comparison_table(seed: SeedTable, rows: Sequence[Row], tablefmt: str = "grid") -> str:
    """Our effective-configuration rows beside the seed's published numbers, per (variant, seq_len)."""
    ours = {(r["variant"], r["seq_len"], r["framework"]): r for r in rows}
    frameworks = [fw for fw in FRAMEWORKS if any(key[2] == fw for key in ours)]
    body = []
    for s in seed.rows:
        line = [s.variant, s.seq_len, _fmt(s.time_ms, 2), _fmt(s.memory_mb, 2), s.status]
        for fw in frameworks:
            r = ours.get((s.variant, s.seq_len, fw))
            line += ["-", "-", "-"] if r is None else [_fmt(r["time_ms"], 2), _fmt(r["memory_mb"], 2),
                                                       _status(r, 30)]
        body.append(line)
    headers = ["Implementation", "Seq Len", "seed (ms)", "seed (MB)", "seed"]
    for fw in frameworks:
        headers += [f"{fw} (ms)", f"{fw} (MB)", fw]
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def hardware_note(seed: SeedTable | None, rows: Sequence[Row]) -> str:
    """One line saying that the seed's and our numbers come from different hardware."""
    ours = next((r["device_name"] for r in rows if r.get("device_name")), rows[0]["device"] if rows else "?")
    theirs = seed_device(seed) if seed else "?"
    return (f"Different hardware: the seed measured on a {theirs}; ours ran on {ours}. Compare shapes "
            f"and ratios, not absolute numbers.")


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


def _series(rows: Iterable[Row], field: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    out: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["status"] == OK and r[field] is not None:
            out[(r["variant"], r["framework"])].append((r["seq_len"], r[field]))
    return {key: sorted(points) for key, points in out.items()}


def _plot(ax, series: dict, variants: Sequence[str], ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    colors = plt.get_cmap("tab10")
    styles = {"jax": ("-", "o"), "torch": ("--", "s")}
    ticks: set[int] = set()
    for (variant, fw), points in sorted(series.items(), key=lambda kv: (VARIANTS.index(kv[0][0]), kv[0][1])):
        if variant not in variants:
            continue
        line, marker = styles[fw]
        xs, ys = zip(*points)
        ticks.update(xs)
        ax.plot(xs, ys, line, marker=marker, color=colors(VARIANTS.index(variant) % 10), label=f"{fw} {variant}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks), [str(x) for x in sorted(ticks)])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rows: Sequence[Row], out_dir: Path) -> dict[str, Path]:
    """The three PNG plots (time, memory, dilated vs dense); a plot with no data is still written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    times, memory = _series(rows, "time_ms"), _series(rows, "memory_mb")
    paths = {key: out_dir / name for key, name in PLOTS.items()}

    fig, ax = plt.subplots(figsize=(10, 5.5))
    _plot(ax, times, VARIANTS, "time per call (ms)", "Time vs sequence length (solid JAX, dashed torch)")
    _save(fig, paths["time"])

    fig, ax = plt.subplots(figsize=(10, 5.5))
    _plot(ax, memory, VARIANTS, "peak memory above baseline (MB)", "Peak memory vs sequence length")
    _save(fig, paths["memory"])

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5))
    chosen = ("dense", "standard", "improved", "block_sparse")
    _plot(ax1, times, chosen, "time per call (ms)", "Dilated vs dense attention: time")
    _plot(ax2, memory, chosen, "peak memory above baseline (MB)", "Dilated vs dense attention: memory")
    _save(fig, paths["dense"])
    return paths


def _settings(rows: Sequence[Row]) -> str:
    r = rows[0]
    text = (f"device `{r['device']}` ({r['device_name'] or 'unknown'}), dtype `{r['dtype']}`, batch {r['batch']}, "
            f"{r['heads']} heads, head_dim {r['head_dim']}, segment lengths {r['segment_lengths']}, dilation "
            f"rates {r['dilation_rates']}, causal {r['causal']}, backward {r['backward']}, repeats {r['repeats']}")
    bs = next((x for x in rows if x["block_size"] is not None), None)
    if bs:
        text += f", block-sparse: block {bs['block_size']}, ratio {bs['sparsity_ratio']}, pattern dilated_sparse"
    mh = next((x for x in rows if x["embed_dim"] is not None), None)
    if mh:
        text += f", modules: embed_dim {mh['embed_dim']}"
    return text


def write_report(rows: Sequence[Row], out_dir: Path, command: str, plots: dict[str, Path],
                 seed: SeedTable | None, seed_note: str = "", runtime_s: float | None = None) -> Path:
    """Write ``REPORT.md``: settings, method, per-framework tables, JAX-vs-torch table, plots, seed section."""
    main = [r for r in rows if r["section"] == "main"]
    runtime = "" if runtime_s is None else f" (whole run: {runtime_s:.0f} s)"
    lines = ["# Benchmark report: jax_dilated vs torch_ref", "", f"Command: `{command}`{runtime}", ""]
    if main:
        lines += [f"Settings: {_settings(main)}.", ""]
        for fw in FRAMEWORKS:
            fw_rows = [r for r in main if r["framework"] == fw]
            if fw_rows:
                lines += [f"## {fw}", "", seed_format_table(fw_rows, "github", 200), ""]
        lines += ["## JAX vs torch", "", "Ratios are JAX / torch: below 1 means JAX is faster or leaner.", "",
                  ratio_table(main, "github"), ""]
        lines += ["## Plots", ""]
        lines += [f"![{key}]({path.name})" for key, path in plots.items()] + [""]
    effective = [r for r in rows if r["section"] == "seed"]
    dilated = [r for r in rows if r["section"] == "seed_dilated"]
    lines += ["## Seed comparison", ""]
    if seed_note:
        lines += [seed_note, ""]
    if seed and effective:
        lines += [hardware_note(seed, effective), "",
                  f"The seed's effective configuration (`segment_lengths=[n]`, `dilation_rates=[1]`, i.e. dense "
                  f"attention), batch 2, 8 heads, head_dim 64, float32, median of {effective[0]['repeats']} "
                  f"timed call(s) after the warm-up, beside `{seed.path.name}` ({seed.header}):", "", seed_comparison_table(seed, effective, "github"), ""]
    if dilated:
        lines += ["The dilated configuration the seed never measured (segments 1024/2048/4096, rates 1/2/4), "
                  "same shapes:", "", seed_format_table(dilated, "github", 200), ""]
    lines += ["## Method", "", METHOD, ""]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
