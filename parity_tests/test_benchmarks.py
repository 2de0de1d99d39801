"""The shared benchmark (``python -m benchmarks``): FLOP formula, seed-table parsing, scheduling, and one
tiny end-to-end run of the command line (fresh subprocess per case, ✓ and ✗ rows, every output file)."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import cli, report, seed
from benchmarks.case import FAILED, OK, Case, Measurement, make_row
from benchmarks.flops import block_sparse_flops, dense_flops, dilated_flops, head_groups, useful_flops
from benchmarks.report import FIELDS
from benchmarks.runner import REPO_ROOT

REQUIRED_FIELDS = ["variant", "framework", "device", "dtype", "batch", "seq_len", "heads", "head_dim",
                   "segment_lengths", "dilation_rates", "time_ms", "memory_mb", "throughput_tok_s", "gflops",
                   "status", "error"]


# ----------------------------------------------------------------------------------------------
# FLOPs


def test_flops_by_hand():
    # b=2, n=8, h=3, d=4, segments (4, 8), rates (1, 2): head groups [2, 1] (SPEC worked example).
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
    assert useful_flops(base) == 2560
    assert useful_flops(dataclasses.replace(base, backward=True)) == 3 * 2560
    assert useful_flops(dataclasses.replace(base, variant="dense")) == 6144
    # modules: attention with head_dim = E / h, plus four E x E projections (8 b n E^2).
    assert useful_flops(dataclasses.replace(base, variant="multihead_improved")) == 2560 + 8 * 2 * 8 * 144
    bs = dataclasses.replace(base, variant="block_sparse", block_size=2, heads=2, batch=1)
    assert useful_flops(bs) is None  # unknown without the realised density
    assert useful_flops(bs, density=0.5) == 1024


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 4), h=st.integers(1, 16), d=st.integers(1, 128), n=st.sampled_from([64, 256, 4096]),
       causal=st.booleans())
def test_one_dense_group_is_dense_attention(b, h, d, n, causal):
    # G = 1, r = 1, s = n is dense attention (SPEC section 1), and so is its FLOP count.
    assert dilated_flops(b, n, h, d, (n,), (1,), causal) == dense_flops(b, n, h, d, causal)
    # full density block-sparse is dense too (non-causal).
    assert block_sparse_flops(b, n, h, d, 16, 1.0) == dense_flops(b, n, h, d)


def test_row_derived_fields():
    case = Case("dense", "torch", batch=2, seq_len=8, heads=3, head_dim=4)
    row = make_row(case, Measurement(OK, time_ms=2.0, memory_mb=1.5))
    assert row["throughput_tok_s"] == pytest.approx(2 * 8 / 2e-3)
    assert row["gflops"] == pytest.approx(6144 / 2e-3 / 1e9)
    failed = make_row(case, Measurement.failure("boom"))
    assert failed["status"] == FAILED and failed["time_ms"] is None and failed["gflops"] is None
    assert set(REQUIRED_FIELDS) <= set(row) and list(row) == FIELDS


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
        seed.SeedRow("standard", 2, 4096, 8, 22.68, 173.04, 361176.0, "✓"),
        seed.SeedRow("ring", 2, 8192, 8, None, None, None, "✗"),
    )


def test_seed_file_and_cases():
    table = seed.load_seed_table()
    assert table is not None, f"no seed table under {seed.SEED_DIR}"
    assert {r.variant for r in table.rows} == set(seed.SEED_VARIANTS)
    cases = seed.seed_cases(Case("standard", "jax"), ("standard", "dense"), ("torch",))
    assert [(c.variant, c.framework, c.seq_len, c.segment_lengths, c.dilation_rates) for c in cases] == [
        ("standard", "torch", 4096, (4096,), (1,)), ("standard", "torch", 8192, (8192,), (1,))]
    assert [c.segment_lengths for c in seed.dilated_cases(Case("standard", "jax"), ("standard",), ("jax",))] == [
        (1024, 2048, 4096)] * 2


def test_seed_comparison_and_ratio_tables(tmp_path: Path):
    table = seed.parse_seed_table(SEED_TEXT, Path("seed-benchmark-x.txt"))
    jax_case = Case("standard", "jax", seq_len=4096, segment_lengths=(4096,), dilation_rates=(1,))
    rows = [make_row(jax_case, Measurement(OK, time_ms=10.0, memory_mb=100.0, device_name="cpu: X"), "seed"),
            make_row(dataclasses.replace(jax_case, framework="torch"), Measurement(OK, time_ms=5.0, memory_mb=50.0),
                     "seed")]
    text = report.seed_comparison_table(table, rows)
    assert "22.68" in text and "10.00" in text and "5.00" in text
    assert report.ratio_rows(rows) == [dict(variant="standard", seq_len=4096, jax_ms=10.0, torch_ms=5.0,
                                            time_ratio=2.0, jax_mb=100.0, torch_mb=50.0, memory_ratio=2.0)]
    note = report.hardware_note(table, rows)
    assert "Different hardware" in note and "CUDA GPU" in note and "cpu: X" in note
    md = report.write_report(rows, tmp_path, "python -m benchmarks", {}, table).read_text(encoding="utf-8")
    assert "## Seed comparison" in md and "22.68" in md and "CUDA GPU" in md


# ----------------------------------------------------------------------------------------------
# scheduling (no subprocess)


def test_scheduler_skips_known_failures(monkeypatch):
    calls = []

    def fake_run_case(case, timeout):
        calls.append(case)
        if case.variant == "ring_v2_collective":
            return Measurement.failure("not implemented yet: torch_ref.ring_dilated_attention does not exist")
        if case.seq_len >= 8192:
            return Measurement.failure(f"timeout after {timeout:g} s")
        return Measurement(OK, time_ms=1.0, memory_mb=1.0)

    monkeypatch.setattr(cli, "run_case", fake_run_case)
    args = cli.parse_args(["--variants", "dense,ring_v2_collective", "--frameworks", "torch",
                           "--seq-lens", "16384,4096,8192", "--no-seed-comparison"])
    cases = cli.main_cases(args)
    assert [c.seq_len for c in cases] == [4096, 8192, 16384] * 2  # n increasing
    rows = cli.run_all({"main": cases, "again": cases[:1]}, timeout=5)
    assert [(c.variant, c.seq_len) for c in calls] == [("dense", 4096), ("dense", 8192), ("ring_v2_collective", 4096)]
    status = [(r["section"], r["status"], r["error"].split(":")[0]) for r in rows]
    assert status == [("main", OK, ""), ("main", FAILED, "timeout after 5 s"),
                      ("main", FAILED, "skipped"), ("main", FAILED, "not implemented yet"),
                      ("main", FAILED, "not implemented yet"), ("main", FAILED, "not implemented yet"),
                      ("again", OK, "")]


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit):
        cli.parse_args(["--variants", "standard,nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--segment-lengths", "64,128", "--dilation-rates", "1"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--seq-lens", "0"])


# ----------------------------------------------------------------------------------------------
# end to end


def _run_cli(out: Path, *options: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks", "--segment-lengths", "64,128", "--dilation-rates", "1,2",
           "--heads", "2", "--head-dim", "8", "--repeats", "1", "--no-seed-comparison", "--timeout", "60",
           "--out", str(out), *options]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_cli_tiny_run(tmp_path: Path):
    # 192 is not a multiple of the segment 128: those cases fail in their subprocesses and the run goes
    # on to n = 256, which is measured in both frameworks.
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks", "--variants", "improved", "--frameworks", "jax,torch",
           "--seq-lens", "192,256", "--segment-lengths", "64,128", "--dilation-rates", "1,2", "--heads", "2",
           "--head-dim", "8", "--repeats", "1", "--no-seed-comparison", "--timeout", "60", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Throughput (tok/s)" in proc.stdout and "Time JAX/torch" in proc.stdout and "✗ ValueError" in proc.stdout

    rows = json.loads((out / "results.json").read_text())
    assert sorted((r["framework"], r["seq_len"]) for r in rows) == [
        ("jax", 192), ("jax", 256), ("torch", 192), ("torch", 256)]
    for row in rows:
        assert set(REQUIRED_FIELDS) <= set(row)
        assert row["segment_lengths"] == [64, 128] and row["dilation_rates"] == [1, 2]
        if row["seq_len"] == 256:
            assert row["status"] == OK, row["error"]
            assert row["time_ms"] > 0 and row["memory_mb"] >= 0 and row["gflops"] > 0
            assert row["throughput_tok_s"] == pytest.approx(2 * 256 / (row["time_ms"] / 1e3))
        else:
            assert row["status"] == FAILED and "divisible" in row["error"] and row["time_ms"] is None

    with (out / "results.csv").open(newline="", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and set(REQUIRED_FIELDS) <= set(csv_rows[0])

    report = (out / "REPORT.md").read_text(encoding="utf-8")
    for name in ("time_vs_seq_len.png", "memory_vs_seq_len.png", "dilated_vs_dense.png"):
        assert (out / name).stat().st_size > 1000
        assert f"({name})" in report
    assert "## JAX vs torch" in report and "## Method" in report and "--no-seed-comparison" in report
