"""Scaling table of ring dilated attention on simulated CPU devices: ``python -m benchmarks.ring_scaling``.

For each configuration and device count ``P`` a fresh subprocess starts JAX with
``--xla_force_host_platform_device_count=P``, shards ``q, k, v`` over a ``("seq",)`` mesh of ``P``
devices and times ``jd.ring_dilated_attention`` (compilation excluded, median of repeats). Columns:

- ``time_ms``: one forward call. The ``P`` simulated devices share this machine's cores, so time does
  not fall with ``P``; the table shows the work and memory each device would have.
- ``device_mb``: per-device memory of the compiled program, from ``compiled.memory_analysis()``
  (arguments + outputs + temporaries of the per-device SPMD program, aliasing subtracted).
- ``act_mb``: the temporaries alone (activation memory), per device.
- ``rss_mb`` / ``rss_per_device_mb``: peak resident memory of the whole process during the timed calls
  above the post-warm-up baseline (all ``P`` simulated devices live in one process), and that / ``P``.
- ``comm_mb``: bytes each device sends per call, read from the compiled HLO: the operand size of
  every ``collective-permute`` (each device sends one such buffer per op); ``collectives`` counts every
  collective op in the program (all of them permutes, none for groups that fit in a chunk).
- ``improved_ms`` (``P = 1``): ``jd.improved_dilated_attention`` timed the same way, and the ratio.

Writes ``benchmarks/results/cpu/ring_scaling.md`` and ``.json`` (``--out`` changes the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runner import REPO_ROOT, _release_free_heap, _status_kib, cpu_name

MIB = 2.0**20
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu"

# (name, seq_len, segment_lengths, dilation_rates, device counts)
# n = 65536 for the scaling rows: attention scores are computed in bounded chunks (_softmax.attend), so
# the part of the per-device memory that shrinks with P (inputs, per-branch outputs, statistics) only
# dominates the fixed score scratch at long sequences. "spanning" has groups over 2 and 8 devices at P=8.
SCALING = [
    ("local", 65536, (1024, 2048, 4096), (1, 2, 4), (1, 2, 4, 8)),
    ("spanning", 65536, (1024, 16384, 65536), (1, 8, 32), (1, 2, 4, 8)),
    ("seed-oom", 8192, (1024, 2048, 4096), (1, 2, 4), (1, 8)),
    ("mid", 16384, (1024, 2048, 4096), (1, 2, 4), (1, 8)),
    ("xl", 131072, (1024, 2048, 4096), (1, 2, 4), (1, 8)),
]

_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "pred": 1, "s32": 4, "u8": 1}
_PERMUTE = re.compile(r"= \(?(\w+)\[([\d,]*)\][^=]*? collective-permute(?:-start)?\(")
_COLLECTIVE = re.compile(r"\b(collective-permute|all-gather|all-reduce|all-to-all|reduce-scatter)(?:-start)?\(")


def hlo_communication(hlo: str) -> tuple[int, int]:
    """``(collective ops, bytes one device sends)`` of compiled HLO text (permute operand sizes)."""
    sent = 0
    for dtype, dims in _PERMUTE.findall(hlo):
        size = 1
        for x in filter(None, dims.split(",")):
            size *= int(x)
        sent += size * _DTYPE_BYTES[dtype]
    return len(_COLLECTIVE.findall(hlo)), sent


def _memory(compiled) -> tuple[float, float]:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / MIB, m.temp_size_in_bytes / MIB


def _timed(fns, args, repeats: int) -> tuple[list[float], float]:
    """Median milliseconds of each ``fn(*args)`` and the peak RSS above the baseline (MiB) during the repeats.

    Several functions are timed alternately (one call of each per round, the order reversed every other
    round), so a change in machine load, or being first in a round, affects them alike.
    """
    import jax

    for fn in fns:
        jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    _release_free_heap()
    base = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    times = [[] for _ in fns]
    for i in range(repeats):
        for fn, t in list(zip(fns, times))[::(-1) ** i]:
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            t.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM") * 1024
    return [statistics.median(t) * 1e3 for t in times], max(peak - base, 0) / MIB


def _worker(spec: dict) -> dict:
    """Measure one (configuration, P) in this process (which was started with P devices)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import jax_dilated as jd

    p, n, b, h, d = spec["devices"], spec["seq_len"], spec["batch"], spec["heads"], spec["head_dim"]
    kw = dict(segment_lengths=tuple(spec["segment_lengths"]), dilation_rates=tuple(spec["dilation_rates"]),
              is_causal=spec["causal"])
    mesh = Mesh(np.array(jax.devices()[:p]), ("seq",))
    rng = np.random.default_rng()
    sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
    args = [jax.device_put(jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32), sharding) for _ in range(3)]
    ring = jax.jit(lambda q, k, v: jd.ring_dilated_attention(q, k, v, mesh=mesh, **kw))
    compiled = ring.lower(*args).compile()
    row = dict(spec)
    row["device_mb"], row["act_mb"] = _memory(compiled)
    row["collectives"], sent = hlo_communication(compiled.as_text())
    row["comm_mb"] = sent / MIB
    if p > 1:
        (row["time_ms"],), row["rss_mb"] = _timed([ring], args, spec["repeats"])
    else:  # RSS here covers both functions; they are the same program
        improved = jax.jit(lambda q, k, v: jd.improved_dilated_attention(q, k, v, **kw))
        row["improved_device_mb"], row["improved_act_mb"] = _memory(improved.lower(*args).compile())
        (row["time_ms"], row["improved_ms"]), row["rss_mb"] = _timed([ring, improved], args, spec["repeats"])
        row["ring_over_improved"] = row["time_ms"] / row["improved_ms"]
    row["rss_per_device_mb"] = row["rss_mb"] / p
    return row


def _run(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={spec['devices']}").strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.ring_scaling", "--worker", json.dumps(spec)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, status=f"✗ timeout after {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return dict(spec, status=f"✗ {tail[0][:200]}")
    return dict(json.loads(lines[-1]), status="✓")


def _fmt(x, digits=1):
    return "" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        "# Ring dilated attention: scaling on simulated CPU devices",
        "",
        f"`python -m benchmarks.ring_scaling` on {meta['cpu']}, jax {meta['jax']}, float32, batch "
        f"{meta['batch']}, {meta['heads']} heads, head_dim {meta['head_dim']}, causal={meta['causal']}, "
        f"median of {meta['repeats']} calls. The P devices are simulated in one process "
        "(`--xla_force_host_platform_device_count`) and share the cores: time measures total work, not "
        "parallel speed-up. device_mb / act_mb: `compiled.memory_analysis()` of the per-device program "
        "(arguments + outputs + temporaries / temporaries only). rss: peak RSS above the baseline during the "
        "timed calls, whole process (all P devices), and divided by P. comm: bytes one device sends per "
        "call, summed over the `collective-permute` operands of the compiled HLO.",
        "",
        "Ratios are against the P = 1 row of the same configuration.",
        "",
        "| config | n | segments | rates | P | chunk | time (ms) | device MiB | vs P=1 | act MiB | vs P=1 | "
        "RSS MiB | RSS/P MiB | vs P=1 | collectives | comm MiB/device | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["name"], r["seq_len"]): r for r in rows if r["devices"] == 1 and r.get("act_mb")}

    def ratio(r, key):
        b = base.get((r["name"], r["seq_len"]), {}).get(key)
        return None if not b or r.get(key) is None else r[key] / b

    for r in rows:
        out.append(
            f"| {r['name']} | {r['seq_len']} | {tuple(r['segment_lengths'])} | {tuple(r['dilation_rates'])} | "
            f"{r['devices']} | {r['seq_len'] // r['devices']} | {_fmt(r.get('time_ms'))} | "
            f"{_fmt(r.get('device_mb'))} | {_fmt(ratio(r, 'device_mb'), 3)} | {_fmt(r.get('act_mb'))} | "
            f"{_fmt(ratio(r, 'act_mb'), 3)} | {_fmt(r.get('rss_mb'))} | {_fmt(r.get('rss_per_device_mb'))} | "
            f"{_fmt(ratio(r, 'rss_per_device_mb'), 3)} | {r.get('collectives', '')} | {_fmt(r.get('comm_mb'), 2)} | "
            f"{r['status']} |"
        )
    one = [r for r in rows if r["devices"] == 1 and r.get("improved_ms")]
    if one:
        out += ["", "One device: ring (dispatches to improved) vs improved, same process and inputs.", "",
                "| config | n | ring (ms) | improved (ms) | ring / improved | act MiB ring | act MiB improved |",
                "|---|---|---|---|---|---|---|"]
        for r in one:
            out.append(f"| {r['name']} | {r['seq_len']} | {_fmt(r['time_ms'])} | {_fmt(r['improved_ms'])} | "
                       f"{_fmt(r['ring_over_improved'], 3)} | {_fmt(r['act_mb'])} | {_fmt(r['improved_act_mb'])} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default=",".join(c[0] for c in SCALING),
                        help="comma-separated subset of: " + ", ".join(c[0] for c in SCALING))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the existing json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    if args.report_only:
        saved = json.loads((args.out / "ring_scaling.json").read_text())
        (args.out / "ring_scaling.md").write_text(markdown(saved["rows"], saved["meta"]))
        return
    import jax

    wanted = set(args.configs.split(","))
    rows = []
    for name, n, seg, rates, counts in SCALING:
        if name not in wanted:
            continue
        for p in counts:
            spec = dict(name=name, seq_len=n, segment_lengths=list(seg), dilation_rates=list(rates), devices=p,
                        batch=args.batch, heads=args.heads, head_dim=args.head_dim, causal=args.causal,
                        repeats=args.repeats)
            row = _run(spec, args.timeout)
            rows.append(row)
            print(f"{name:9s} n={n:6d} P={p}: {row['status']} time={_fmt(row.get('time_ms'))} ms "
                  f"act={_fmt(row.get('act_mb'))} MiB comm={_fmt(row.get('comm_mb'), 2)} MiB", flush=True)
    meta = dict(cpu=cpu_name(), jax=jax.__version__, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                causal=args.causal, repeats=args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ring_scaling.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    text = markdown(rows, meta)
    (args.out / "ring_scaling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
