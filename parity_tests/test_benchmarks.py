"""The shared benchmark (``python -m benchmarks``): FLOP formulas, the variant registry, rows and
statuses, failure kinds and scheduling, the report built from a whole default plan (fake
measurements, no subprocess), and tiny end-to-end runs of the command line and of ring_scaling
(fresh subprocess per case)."""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import cli, plan, report, ring_scaling, runner, seed
from benchmarks.case import Case, FailureKind, Measurement, Status
from benchmarks.flops import block_sparse_flops, dense_flops, dilated_flops, head_groups
from benchmarks.rows import FIELDS, load_rows, make_row, normalise
from benchmarks.runner import REPO_ROOT
from benchmarks.variants import PLANNED, REPORT_VARIANTS, SEED_VARIANTS, VARIANTS, Kind, label

BENCH = REPO_ROOT / "benchmarks"
STATUSES = {"ok", "failed"}
FAILURES = {None, "error", "out_of_memory", "timeout", "killed", "skipped"}


# ----------------------------------------------------------------------------------------------
# structure: no import circle, a typed registry, no run-time name lookup


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out |= {n.split(".")[1] for n in names if n.count(".") >= 1}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks.")}
    return out


def test_no_import_circle_and_no_name_lookup():
    modules = {p.stem for p in BENCH.glob("*.py")} - {"__init__", "__main__"}
    graph = {m: _imports(BENCH / f"{m}.py") & modules - {m} for m in modules}
    order, state = [], {}

    def visit(m, path):
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        if state.get(m) == "done":
            return
        state[m] = "open"
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = "done"
        order.append(m)

    for m in sorted(modules):
        visit(m, [])
    assert graph["case"] == set() and graph["flops"] == set()  # the plain-data leaves
    for m in ("cli", "plan", "runner", "variants"):  # variants are called, never looked up by name at run time
        text = (BENCH / f"{m}.py").read_text(encoding="utf-8")
        assert "importlib" not in text and "getattr(package" not in text, m


def test_the_path_to_the_kernel_is_four_files():
    # __main__ -> cli -> runner -> variants -> jax_dilated / torch_ref
    assert "from benchmarks.cli import main" in (BENCH / "__main__.py").read_text()
    assert {"runner"} <= _imports(BENCH / "cli.py")
    assert {"variants"} <= _imports(BENCH / "runner.py")
    text = (BENCH / "variants.py").read_text()
    assert "import jax_dilated as jd" in text and "import torch_ref as tr" in text


def test_importing_the_benchmark_imports_no_framework():
    code = ("import sys, benchmarks.cli, benchmarks.report, benchmarks.ring_scaling\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'torch', 'jax_dilated', 'torch_ref'))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_registry_covers_every_variant():
    assert set(REPORT_VARIANTS) | {"matmul", "decode"} == set(VARIANTS)
    assert SEED_VARIANTS == ("standard", "improved", "multihead_standard", "multihead_improved",
                             "ring_v2_collective", "block_sparse", "block_sparse_multihead")
    for name, v in VARIANTS.items():
        assert v.name == name and isinstance(v.kind, Kind)
        for builder, package in ((v.build_jax, "jax"), (v.build_torch, "torch")):
            assert callable(builder) and builder.__module__ == "benchmarks.variants", (name, package)
        assert isinstance(label(Case(name, "jax")), str)
    assert label(Case("ring_v2_collective", "jax")) == "ring_v2_collective (1 device = improved)"
    assert label(Case("ring_v2_collective", "jax", devices=4)) == "ring_v2_collective (4 devices)"
    assert PLANNED == ()  # GQA, the odd length and decode are the shapes and decode sections now
    assert label(Case("improved", "jax", num_kv_heads=2, documents=4)) == "improved (h_kv=2, 4 packed documents)"
    assert label(Case("decode", "torch", seq_len=32768, position=1000)) == "decode step (cache 32768, index 1000)"
    # every CLI choice is a registered report variant
    assert cli.parse_args([]).variants == REPORT_VARIANTS


# ----------------------------------------------------------------------------------------------
# FLOPs and rows


def test_flops_by_hand():
    # b=2, n=8, h=3, d=4, segments (4, 8), rates (1, 2): head groups [2, 1] (semantics 2.1 worked example).
    # group 0: 4*2*2*(8/4)*(4/1)^2*4 = 2048; group 1: 4*2*1*(8/8)*(8/2)^2*4 = 512.
    assert head_groups(3, 2) == [2, 1]
    assert head_groups(8, 3) == [3, 3, 2]
    assert dilated_flops(2, 8, 3, 4, (4, 8), (1, 2)) == 2560
    assert dilated_flops(2, 8, 3, 4, (4, 8), (1, 2), causal=True) == 1280
    assert dense_flops(2, 8, 3, 4) == 4 * 2 * 3 * 64 * 4 == 6144
    # n=8, B=2 -> 4x4 blocks, density 0.5 -> 8 kept blocks: 4*1*2*8*2^2*4 = 1024; causal: 4 diagonal halves.
    assert block_sparse_flops(1, 8, 2, 4, 2, 0.5) == 1024
    assert block_sparse_flops(1, 8, 2, 4, 2, 0.5, causal=True) == 4 * 1 * 2 * (8 - 2) * 4 * 4


def test_useful_flops_of_cases():
    base = Case("standard", "jax", batch=2, seq_len=8, heads=3, head_dim=4, embed_dim=12, segment_lengths=(4, 8),
                dilation_rates=(1, 2))
    flops = lambda case, density=None: VARIANTS[case.variant].useful_flops(case, density)
    assert flops(base) == 2560
    assert flops(dataclasses.replace(base, backward=True)) == 3 * 2560
    assert flops(dataclasses.replace(base, variant="dense")) == 6144
    # modules: attention with head_dim = E / h, plus four E x E projections (8 b n E^2).
    assert flops(dataclasses.replace(base, variant="multihead_improved")) == 2560 + 8 * 2 * 8 * 144
    bs = dataclasses.replace(base, variant="block_sparse", block_size=2, heads=2, batch=1)
    assert flops(bs) is None  # unknown without the realised density
    assert flops(bs, density=0.5) == 1024
    assert flops(Case("matmul", "torch", seq_len=64)) == 2 * 64**3


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 4), h=st.integers(1, 16), d=st.integers(1, 128), n=st.sampled_from([64, 256, 4096]),
       causal=st.booleans())
def test_one_dense_group_is_dense_attention(b, h, d, n, causal):
    # G = 1, r = 1, s = n is dense attention (semantics section 1), and so is its FLOP count.
    assert dilated_flops(b, n, h, d, (n,), (1,), causal) == dense_flops(b, n, h, d, causal)
    # full density block-sparse is dense too (non-causal).
    assert block_sparse_flops(b, n, h, d, 16, 1.0) == dense_flops(b, n, h, d)


def test_rows_hold_plain_status_strings():
    case = Case("dense", "torch", batch=2, seq_len=8, heads=3, head_dim=4, causal=True, backward=True)
    row = make_row(case, Measurement(Status.OK, times_ms=[3.0, 2.0, 2.5], time_ms=2.5, memory_mb=1.5), "main")
    assert row["status"] == "ok" and type(row["status"]) is str and row["failure"] is None
    assert row["times_ms"] == [3.0, 2.0, 2.5] and row["repeats"] == 3 and row["mode"] == "causal forward+backward"
    assert row["throughput_tok_s"] == pytest.approx(2 * 8 / 2.5e-3)
    assert row["gflops"] == pytest.approx(3 * 6144 / 2 / 2.5e-3 / 1e9)
    failed = make_row(case, Measurement.failed(FailureKind.TIMEOUT, "timeout after 5 s"), "main")
    assert (failed["status"], failed["failure"]) == ("failed", "timeout") and failed["time_ms"] is None
    assert list(row) == list(FIELDS) == list(failed)
    json.dumps([row, failed])  # plain JSON, no enum objects
    m = Measurement.failed(FailureKind.OUT_OF_MEMORY, "x")
    back = Measurement.from_json(m.to_json())
    assert back == m and back.failure is FailureKind.OUT_OF_MEMORY


def test_legacy_results_are_normalised():
    # results.json files written before the Status enum stored the seed table's glyphs.
    old = {"variant": "ring_v2_collective", "framework": "jax", "seq_len": 4096, "status": "✓", "time_ms": 1.0}
    row = normalise(old)
    assert row["status"] == "ok" and row["label"].endswith("(1 device = improved)") and row["mode"] == "forward"
    assert normalise(dict(old, status="✗"))["status"] == "failed"
    assert set(row) >= set(FIELDS)
    committed = load_rows(BENCH / "results" / "cpu" / "results.json")
    assert committed and {r["status"] for r in committed} <= STATUSES
    assert report.is_ok(committed[0])


# ----------------------------------------------------------------------------------------------
# seed table


SEED_TEXT = """Benchmark Results - 20250630_131455
Device: cuda, Dtype: torch.float32

+----------------+---------+-----------+---------+-------------+---------------+----------------------+----------+
| Implementation |   Batch |   Seq Len |   Heads | Time (ms)   | Memory (MB)   | Throughput (tok/s)   | Status   |
+================+=========+===========+=========+=============+===============+======================+==========+
| standard       |       2 |      4096 |       8 | 22.68       | 173.04        | 361176               | ✓        |
+----------------+---------+-----------+---------+-------------+---------------+----------------------+----------+
| ring           |       2 |      8192 |       8 | N/A         | N/A           | N/A                  | ✗        |
+----------------+---------+-----------+---------+-------------+---------------+----------------------+----------+
"""


def test_parse_seed_table():
    table = seed.parse_seed_table(SEED_TEXT)
    assert seed.seed_device(table) == "CUDA GPU"
    assert table.rows == (
        seed.SeedRow("standard", 2, 4096, 8, 22.68, 173.04, 361176.0, Status.OK),
        seed.SeedRow("ring", 2, 8192, 8, None, None, None, Status.FAILED),
    )


def test_seed_file_and_cases():
    table = seed.load_seed_table()
    assert table is not None, f"no seed table under {seed.SEED_DIR}"
    assert {r.variant for r in table.rows} == set(SEED_VARIANTS)
    cases = seed.seed_cases(Case("standard", "jax"), ("standard", "dense"), ("torch",))
    assert [(c.variant, c.framework, c.seq_len, c.segment_lengths, c.dilation_rates) for c in cases] == [
        ("standard", "torch", 4096, (4096,), (1,)), ("standard", "torch", 8192, (8192,), (1,))]
    assert [c.segment_lengths for c in seed.dilated_cases(Case("standard", "jax"), ("standard",), ("jax",))] == [
        (1024, 2048, 4096)] * 2


# ----------------------------------------------------------------------------------------------
# failures and scheduling (no subprocess)


def test_failure_kinds():
    assert runner.classify_exception(ValueError("n=192 is not divisible")).failure is FailureKind.ERROR
    assert runner.classify_exception(MemoryError()).failure is FailureKind.OUT_OF_MEMORY
    assert runner.classify_exception(RuntimeError("RESOURCE_EXHAUSTED: x")).failure is FailureKind.OUT_OF_MEMORY
    assert runner.describe_crash(-9, "").failure is FailureKind.KILLED
    assert runner.describe_crash(-11, "").failure is FailureKind.KILLED
    assert runner.describe_crash(1, "ImportError: x").failure is FailureKind.ERROR


def test_worker_turns_an_exception_into_a_failed_result(tmp_path):
    bad = Case("improved", "torch", seq_len=192, batch=1, heads=2, head_dim=8, segment_lengths=(64, 100),
               dilation_rates=(1, 3), repeats=1)  # 100 is not a multiple of its rate 3
    runner._worker_main(bad.to_json(), str(tmp_path / "r.json"))
    m = Measurement.from_json((tmp_path / "r.json").read_text())
    assert m.status is Status.FAILED and m.failure is FailureKind.ERROR and "100" in m.error


def test_scheduler_skips_what_grows_worse():
    calls = []

    def fake(case, timeout):
        calls.append((case.variant, case.seq_len))
        if case.variant == "dense" and case.seq_len >= 8192:
            return Measurement.failed(FailureKind.TIMEOUT, f"timeout after {timeout:g} s")
        if case.variant == "standard" and case.seq_len >= 8192:
            return Measurement.failed(FailureKind.OUT_OF_MEMORY, "out of memory")
        if case.variant == "improved":
            return Measurement.failed(FailureKind.ERROR, "ValueError")
        return Measurement(Status.OK, times_ms=[1.0], time_ms=1.0, memory_mb=1.0)

    cases = plan.main_cases(Case("dense", "torch"), ("dense", "standard", "improved"), ("torch",), (16384, 4096, 8192))
    assert [c.seq_len for c in cases] == [4096, 8192, 16384] * 3  # n increasing
    done = runner.Scheduler(5, fake)
    kinds = [done.run(c).failure for c in cases + cases[:1]]
    assert calls == [("dense", 4096), ("dense", 8192), ("standard", 4096), ("standard", 8192),
                     ("improved", 4096), ("improved", 8192), ("improved", 16384)]  # errors are retried
    assert kinds == [None, "timeout", "skipped", None, "out_of_memory", "skipped", "error", "error", "error", None]


def test_cli_options_and_sections():
    with pytest.raises(SystemExit):
        cli.parse_args(["--variants", "standard,nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--variants", "matmul"])  # the peak is not a report variant
    with pytest.raises(SystemExit):
        cli.parse_args(["--segment-lengths", "64,128", "--dilation-rates", "1"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--seq-lens", "0"])

    default = cli.parse_args(["--repeats", "5", "--out", "/tmp/x"])  # not case options: still the default report
    assert default.custom == [] and default.modes and default.seed_comparison
    custom = cli.parse_args(["--variants", "improved", "--seq-lens", "256"])
    assert custom.custom == ["variants", "seq_lens"] and not custom.modes and not custom.seed_comparison
    asked = cli.parse_args(["--variants", "improved", "--seed-comparison", "--modes"])
    assert asked.modes and asked.seed_comparison
    assert not cli.parse_args(["--no-seed-comparison", "--no-modes"]).seed_comparison

    table = seed.load_seed_table()
    assert list(cli.sections(custom, table)) == [plan.MAIN, plan.PEAK]  # no silent seed rerun in a small run
    assert "custom run (variants, seq_lens)" in cli.seed_note(custom, table)
    parts = cli.sections(default, table)
    assert list(parts) == [plan.MAIN, plan.MODES, plan.PEAK, plan.SHAPES, plan.DECODE, plan.SEED, plan.SEED_DILATED]
    assert {c.repeats for c in parts[plan.MAIN] if c.variant == "dense"} == {plan.DEFAULT_BASELINE_REPEATS}
    assert {c.repeats for c in parts[plan.MAIN] if c.variant != "dense"} == {5}
    modes = parts[plan.MODES]
    assert len(modes) == 2 * 2 * 4 and {c.seq_len for c in modes} == {8192}
    assert {c.mode for c in modes} == set(report.MODE_NAMES)
    assert {c.variant for c in modes} == {"standard", "improved"}
    new = set(modes) - set(parts[plan.MAIN])
    assert len(new) == 12  # the forward rows at 8192 are main rows, measured once
    assert [(c.variant, c.framework, c.seq_len) for c in parts[plan.PEAK]] == [("matmul", "jax", 2048),
                                                                               ("matmul", "torch", 2048)]
    first = {}
    for name, cases in parts.items():
        for c in cases:
            first.setdefault(c, name)
    describe = cli.progress_label(first)
    seed_case = parts[plan.SEED][0]
    assert describe(seed_case).startswith("seed comparison (seed's dense config): ")
    assert describe(next(c for c in new if c.causal and c.backward)).endswith("causal forward+backward")


def test_shapes_and_decode_sections():
    default = cli.parse_args([])
    assert default.shapes and default.decode and default.baseline_repeats == plan.DEFAULT_BASELINE_REPEATS
    custom = cli.parse_args(["--variants", "improved"])
    assert not custom.shapes and not custom.decode and custom.baseline_repeats == custom.repeats
    off = cli.parse_args(["--no-shapes", "--no-decode"])
    assert not off.shapes and not off.decode and off.custom == []
    assert plan.SHAPES not in cli.sections(off, None) and plan.DECODE not in cli.sections(off, None)
    for bad in (["--shapes-kv-heads", "3"], ["--shapes-documents", "3"], ["--decode-cache-len", "5000"],
                ["--decode-positions", "40000"], ["--decode-steps", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)
    cli.parse_args(["--no-decode", "--decode-cache-len", "5000"])  # checked only when the section runs

    parts = cli.sections(default, None)
    shapes = parts[plan.SHAPES]
    assert len(shapes) == 2 * 2 * 4 and {c.variant for c in shapes} == {"improved"}
    kinds = [(c.framework, c.mode, plan.shape_kind(c, 8192)) for c in shapes]
    assert kinds[:4] == [("jax", "forward", k) for k in plan.SHAPE_KINDS]
    assert [(c.seq_len, c.num_kv_heads, c.documents) for c in shapes[4:8]] == [
        (8192, None, 0), (8192, 2, 0), (8191, None, 0), (8192, None, 4)]
    assert {c.backward for c in shapes[4:8]} == {True} and not any(c.causal for c in shapes)
    assert {(c.batch, c.heads, c.head_dim, c.segment_lengths, c.dilation_rates, c.repeats) for c in shapes} == {
        (2, 8, 64, (1024, 2048, 4096), (1, 2, 4), 3)}
    # the baselines are the mode rows' non-causal rows: measured once
    baselines = {c for c in shapes if plan.shape_kind(c, 8192) == "baseline"}
    assert len(baselines) == 4 and baselines <= set(parts[plan.MODES])
    assert len(set(shapes) - set(parts[plan.MODES]) - set(parts[plan.MAIN])) == 12

    decode = parts[plan.DECODE]
    steps = [c for c in decode if c.variant == "decode"]
    assert [(c.framework, c.position) for c in steps] == [("jax", 1000), ("jax", 30000), ("torch", 1000),
                                                           ("torch", 30000)]
    assert {(c.batch, c.seq_len, c.heads, c.head_dim, c.steps, c.kv_heads) for c in steps} == {
        (1, 32768, 8, 64, 50, 8)}
    full = [c for c in decode if c.variant != "decode"]
    assert [(c.variant, c.framework, c.batch, c.seq_len, c.mode, c.steps) for c in full] == [
        ("improved", "jax", 1, 32768, "causal forward", 1), ("improved", "torch", 1, 32768, "causal forward", 1)]
    first = {c: name for name, cases in reversed(list(parts.items())) for c in cases}
    assert cli.progress_label(first)(steps[0]) == "decode: jax decode step (cache 32768, index 1000) n=32768"


def test_case_json_round_trip_of_the_new_fields():
    case = Case("improved", "torch", seq_len=8191, num_kv_heads=2, documents=4, position=7, steps=5)
    back = Case.from_json(case.to_json())
    assert back == case and hash(back) == hash(case) and back.kv_heads == 2
    old = json.loads(Case("standard", "jax").to_json())
    for name in ("num_kv_heads", "documents", "position", "steps"):
        del old[name]  # a case written before these fields existed
    assert Case.from_json(json.dumps(old)) == Case("standard", "jax")
    assert Case("standard", "jax").kv_heads == 8
    m = Measurement(Status.OK, times_ms=[1.0], time_ms=1.0, kv_mb=2.5)
    assert Measurement.from_json(m.to_json()) == m


def test_decode_and_shape_rows():
    step = Case("decode", "jax", batch=1, seq_len=32768, position=30000, steps=50)
    row = make_row(step, Measurement(Status.OK, times_ms=[2.0, 2.5], time_ms=2.25), plan.DECODE)
    assert row["throughput_tok_s"] == pytest.approx(1 / 2.25e-3)  # one token per step, not the cache length
    assert (row["position"], row["steps"], row["gflops"], row["label"]) == (
        30000, 50, None, "decode step (cache 32768, index 30000)")
    packed = Case("improved", "torch", seq_len=8192, documents=4, num_kv_heads=2)
    prow = make_row(packed, Measurement(Status.OK, times_ms=[1.0], time_ms=1.0, kv_mb=8.0), plan.SHAPES)
    assert (prow["documents"], prow["num_kv_heads"], prow["kv_mb"], prow["position"]) == (4, 2, 8.0, None)
    assert list(prow) == list(FIELDS)
    # packed documents of 2048 cut the 4096 segments to 2048: fewer useful FLOPs than the unpacked row
    unpacked = make_row(dataclasses.replace(packed, documents=0), Measurement(Status.OK, times_ms=[1.0], time_ms=1.0),
                        plan.SHAPES)
    assert prow["gflops"] < unpacked["gflops"]
    assert VARIANTS["improved"].useful_flops(packed) == dilated_flops(2, 8192, 8, 64, (1024, 2048, 2048), (1, 2, 4))
    old = normalise({"variant": "improved", "framework": "jax", "seq_len": 8192, "status": "ok", "time_ms": 1.0})
    assert (old["documents"], old["steps"], old["num_kv_heads"], old["kv_mb"]) == (0, 1, None, None)
    assert plan.shape_kind(old, 8192) == "baseline"


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_shape_and_decode_builders_measure_tiny_cases(framework):
    # in process (no subprocess): grouped-query heads with packed documents at an odd length and a decode
    # step, at tiny sizes; torch also backward (JAX compiles a backward program for several seconds).
    tiny = dict(batch=1, heads=4, head_dim=8, segment_lengths=(32, 64), dilation_rates=(1, 2), repeats=2)
    backward = framework == "torch"
    shapes = Case("improved", framework, seq_len=127, num_kv_heads=2, documents=2, backward=backward, **tiny)
    m = runner.measure(shapes)
    assert m.status is Status.OK and len(m.times_ms) == 2 and m.time_ms > 0
    kv = 2 * (1 * 127 * 2 * 8 * 4) / 2**20  # k and v of (1, 127, 2, 8) float32; their gradients as much again
    assert m.kv_mb == pytest.approx(kv * (2 if backward else 1), rel=1e-3)
    step = Case("decode", framework, seq_len=128, position=100, steps=3, **tiny)
    m = runner.measure(step)
    assert m.status is Status.OK and len(m.times_ms) == 2 and m.kv_mb is None
    if framework == "jax":
        assert m.xla["device_mb"] > 0  # the compiled step, with its two cache arguments donated


# ----------------------------------------------------------------------------------------------
# the whole default report from fake measurements (in process, no subprocess)

BASE_MS = {"standard": 400.0, "improved": 200.0, "multihead_standard": 600.0, "multihead_improved": 450.0,
           "ring_v2_collective": 210.0, "block_sparse": 300.0, "block_sparse_multihead": 500.0, "dense": 2000.0,
           "matmul": 1000.0, "decode": 2.0}
#: fake time factors of the shapes cases (the decode step takes 1.1x at the longer context)
SHAPE_FACTOR = {"baseline": 1.0, "gqa": 0.8, "odd": 1.02, "packed": 1.2}


def fake_measure(case: Case, timeout: float) -> Measurement:
    """Deterministic measurements: torch takes twice JAX's time, causal 0.6x, backward 3x; dense torch
    runs out of memory at 8192, the JAX ring case at 8192 times out."""
    if case.variant == "dense" and case.framework == "torch" and case.seq_len == 8192:
        return Measurement.failed(FailureKind.OUT_OF_MEMORY, "out of memory: fake")
    if case.variant == "ring_v2_collective" and case.framework == "jax" and case.seq_len == 8192:
        return Measurement.failed(FailureKind.TIMEOUT, f"timeout after {timeout:g} s")
    t = BASE_MS[case.variant] * (2 if case.framework == "torch" else 1) * (0.6 if case.causal else 1)
    t *= (3 if case.backward else 1) * (case.seq_len / 4096 if case.variant not in ("matmul", "decode") else 1)
    if case.variant == "decode":
        t *= 1.1 if case.position > 1000 else 1.0
    elif case.num_kv_heads or case.documents or case.seq_len == 8191:
        t *= SHAPE_FACTOR[plan.shape_kind(case, 8192)] * 8192 / case.seq_len
    times = [t * 0.95, t, t * 1.05][:case.repeats]
    kv_mb = 2 * case.batch * case.seq_len * case.kv_heads * case.head_dim * 4 / 2**20 * (2 if case.backward else 1)
    return Measurement(Status.OK, times_ms=times, time_ms=t, memory_mb=t / 10, device_name="cpu: fake",
                       density=0.125 if VARIANTS[case.variant].block_sparse else None, software=f"{case.framework} 0",
                       kv_mb=None if case.variant == "decode" else kv_mb)


def _table_row(text: str, *cells: str) -> bool:
    """True when a markdown table row of ``text`` starts with ``cells`` (regular expressions)."""
    pattern = r"^\|" + r"\|".join(rf"\s*{c}\s*" for c in cells) + r"\|"
    return re.search(pattern, text, flags=re.M) is not None


def test_default_report_from_fake_measurements(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_cases", lambda cases, timeout, describe: runner.run_cases(
        cases, timeout, describe, run=fake_measure))
    assert cli.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert {r["status"] for r in rows} == STATUSES and {r["failure"] for r in rows} <= FAILURES
    assert {r["section"] for r in rows} == {"main", "modes", "peak", "shapes", "decode", "seed", "seed_dilated"}
    assert len([r for r in rows if r["section"] == "modes"]) == 16
    assert len([r for r in rows if r["section"] == "shapes"]) == 16
    assert len([r for r in rows if r["section"] == "decode"]) == 6

    md = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings[0] == "Headline: which framework is faster"
    assert headings[1:] == ["All main rows: jax", "All main rows: torch", "JAX vs torch",
                            "Modes: causal and backward at n = 8192", "Machine peak",
                            "Shapes: grouped-query heads, odd length, packed documents at n = 8192",
                            "Decode: tokens/s with a key/value cache", "Plots", "Seed comparison", "Method"]
    headline = md.split("## All main rows")[0]
    # every variant, JAX twice as fast; dense only at 4096 (torch OOM at 8192); ring only 4096 (JAX timeout).
    assert _table_row(headline, "improved", "8192", "jax", "2.00x", r"400\.0 \(380\.0-420\.0\)")  # median, min-max
    assert _table_row(headline, r"dense \(jax.nn.dot_product_attention / SDPA\)", "4096", "jax", "2.00x")
    assert _table_row(headline, r"ring_v2_collective \(1 device = improved\)", "4096", "jax", "2.00x")
    assert "JAX is faster for 8, torch for 0" in headline
    modes = md.split("### Time per mode")[1].split("## Machine peak")[0]
    # 200 ms * 2 (n = 8192) * 0.6 (causal) * 3 (backward) = 720 ms in JAX, twice that in torch
    assert _table_row(modes, "improved", "causal forward\\+backward", r"720\.0 \(684\.0-756\.0\)",
                      r"1440\.0 \(1368\.0-1512\.0\)", r"0\.50")
    assert _table_row(modes, "forward", r"0\.50", r"0\.50")  # improved / standard, both frameworks
    assert _table_row(modes, "improved", "jax", r"0\.60", r"0\.60", r"3\.00")  # causal / non-causal, backward cost
    assert modes.count("| 0.50 ") >= 8  # JAX / torch in every mode
    assert "✗ out_of_memory: out of memory: fake" in md and "✗ skipped" not in md.split("## Seed")[0]
    assert "✗ timeout: timeout after 120 s" in md
    assert "(1 device = improved)" in md.split("## Seed comparison")[1]
    shapes = md.split("### Time over the baseline")[1].split("### GQA")[0]
    # improved forward+backward at 8192: 200 * 2 * 3 = 1200 ms in JAX; GQA 0.8x, odd 1.02x, packed 1.2x (missed)
    assert _table_row(shapes, "jax", r"forward\+backward", "GQA h_kv=2 / h_kv=8", r"960\.0 \(912\.0-1008\.0\)",
                      r"1200\.0 \(1140\.0-1260\.0\)", r"0\.80 \(0\.72-0\.88\)", "<= 1", "yes")
    assert _table_row(shapes, "torch", "forward", "n=8191 / n=8192", ".*", ".*", r"1\.02 .*", "<= 1.05", "yes")
    assert _table_row(shapes, "torch", "forward", r"packed \(4 documents\) / unpacked", ".*", ".*", r"1\.20 .*",
                      "<= 1.1", "no")
    gqa = md.split("### GQA: k/v memory")[1].split("## Decode")[0]
    # k and v of (2, 8192, 2, 64) float32 take 8 MiB each, their gradients as much; 8 kv heads take 4x that
    assert _table_row(gqa, "jax", r"forward\+backward", r"32\.0", r"128\.0", r"0\.250", "<= 0.25", "yes")
    assert _table_row(gqa, "torch", "forward", r"16\.0", r"64\.0", r"0\.250", "<= 0.25", "yes")
    decode = md.split("## Decode")[1].split("## Plots")[0]
    assert _table_row(decode, "jax", r"decode step at index 1000 \(cache 32768\)", r"2\.000 \(1\.900-2\.100\)", "500")
    # the full forward: 200 ms * 2 (torch) * 0.6 (causal) * 32768 / 4096
    assert _table_row(decode, "torch", r"full causal forward over 32768 tokens \(batch 1\)", r"1920\.0 .*")
    assert _table_row(decode, "jax", "decode", r"t\(index 30000\) / t\(index 1000\)", r"1\.100 .*", "<= 1.2", "yes")
    assert _table_row(decode, "jax/torch", "decode", "JAX step / torch step at index 30000", r"0\.500 .*", "<= 1",
                      "yes")
    assert _table_row(decode, "torch", "decode", "step at index 30000 / full causal forward over 32768",
                      r"0\.002 .*", "<= 1/50", "yes")
    assert "Planned rows" not in md
    for name in report.PLOTS.values():
        assert (tmp_path / name).stat().st_size > 5000, name
        assert f"({name})" in md
    out = capsys.readouterr()
    assert "Headline: which framework is faster" in out.out and "seed comparison (seed's dense config)" in out.err


# ----------------------------------------------------------------------------------------------
# end to end (subprocesses)


@pytest.mark.slow
def test_cli_tiny_run(tmp_path: Path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks", "--variants", "improved", "--frameworks", "jax,torch",
           "--seq-lens", "256", "--segment-lengths", "64,128", "--dilation-rates", "1,2", "--batch", "1",
           "--heads", "2", "--head-dim", "8", "--repeats", "2",
           "--peak-size", "128", "--timeout", "120", "--out", str(out)]
    # (The mode rows are left out to keep the subprocess count down: their planning and table are tested
    # from fake measurements above, and the default report's run measures them.)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Headline: which framework is faster" in proc.stdout and "Time JAX/torch" in proc.stdout
    assert "Seed comparison not run (custom run" in proc.stdout and "seed comparison" not in proc.stderr

    rows = json.loads((out / "results.json").read_text())
    assert {r["status"] for r in rows} == {"ok"}, [(r["label"], r["error"]) for r in rows if r["status"] != "ok"]
    assert sorted((r["section"], r["framework"], r["mode"]) for r in rows) == [
        ("main", "jax", "forward"), ("main", "torch", "forward"), ("peak", "jax", "forward"),
        ("peak", "torch", "forward")]
    for row in rows:
        assert set(FIELDS) <= set(row) and row["failure"] is None
        assert len(row["times_ms"]) == 2 and min(row["times_ms"]) <= row["time_ms"] <= max(row["times_ms"])
        assert row["gflops"] > 0 and row["memory_mb"] >= 0
        if row["variant"] == "improved":
            assert row["segment_lengths"] == [64, 128] and row["seq_len"] == 256
            assert row["throughput_tok_s"] == pytest.approx(256 / (row["time_ms"] / 1e3))
        if row["framework"] == "jax":
            assert row["xla_device_mb"] > 0 and row["collectives"] == 0
    with (out / "results.csv").open(newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(rows)

    md = (out / "REPORT.md").read_text(encoding="utf-8")
    assert md.index("## Headline") < md.index("## All main rows") and "| improved " in md.split("## All")[0]
    assert "## Machine peak" in md and "### Time per mode" not in md
    for name in ("time_vs_seq_len.png", "memory_vs_seq_len.png", "gflops.png"):
        assert (out / name).stat().st_size > 5000 and f"({name})" in md
    assert not (out / "dilated_vs_dense.png").exists()  # no dense baseline in this run, so no "vs dense" plot


@pytest.mark.slow
def test_ring_scaling_through_the_runner(tmp_path: Path):
    # one group spans both devices at P = 2 (segment 256 = n), so the sharded program passes key/value blocks.
    config = ring_scaling.Config("tiny", 256, (64, 256), (1, 4), (1, 2))
    base = Case("ring_v2_collective", "jax", batch=1, heads=2, head_dim=8, repeats=2)
    rows = ring_scaling.run([config], base, timeout=120)
    assert [(r["section"], r["variant"], r["devices"], r["status"]) for r in rows] == [
        ("ring_scaling", "ring_v2_collective", 1, "ok"), ("ring_scaling", "ring_v2_collective", 2, "ok"),
        ("ring_scaling_improved", "improved", 1, "ok")], [r["error"] for r in rows]
    one, two, improved = rows
    assert one["collectives"] == 0 and two["collectives"] > 0 and two["comm_mb"] > 0
    assert two["xla_device_mb"] < one["xla_device_mb"]  # each device holds half the sequence
    assert two["label"] == "ring_v2_collective (2 devices)"
    text = ring_scaling.markdown(rows)
    assert "| tiny " in text and "ring / improved" in text and "collective-permute" in text
