"""The one-shot GPU check runs end to end on the CPU (``--dry-run``), so it cannot rot between GPU loans."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=420,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = results["sections"]
    assert all("result" in s for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    exact = sections["exactness"]["result"]
    # all seven variants, both frameworks, both dtypes, each within its bound
    assert len(exact) == 7 * 2 * 2 and all(row["ok"] for row in exact), exact
    assert {r["backend"] for r in sections["kernel_tflops"]["result"] if "tflops" in r} == {"xla", "pallas", "sdpa"}
    assert all(r["pallas"] == "ok" for r in sections["probes"]["result"])
    assert {(r["framework"], r["merge"], r["mode"]) for r in sections["improved_vs_torch"]["result"]} == {
        (fw, merge, mode) for fw in ("jax", "torch") for merge in ("head_partition", "lse")
        for mode in ("fwd", "fwd+bwd")}
    assert [r["n"] for r in sections["longest"]["result"] if "time_ms" in r] == [256]
    assert sections["report"]["result"]["returncode"] == 0
    markdown = (tmp_path / "GPU_CHECK.md").read_text()
    assert "## kernel_tflops" in markdown and "| pallas" in markdown
