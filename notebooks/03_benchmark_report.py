# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 Benchmark report
#
# Reads the committed `benchmarks/results/cpu/results.json` (written by `make bench`, i.e.
# `python -m benchmarks`; see docs/benchmarks.md) and shows it with the same functions that write
# `REPORT.md`: `benchmarks.report`. Each row is one case (variant, framework, sequence length, mode)
# with `status` `"ok"` or `"failed"`; the report functions keep the `ok` rows where they need times.
#
# Nothing is measured here. To see fresh numbers, run `make bench` (about nine minutes on a 2-core
# CPU) and rerun this notebook.

# %%
import sys
from collections import Counter
from pathlib import Path

REPO = Path.cwd().resolve().parent if (Path.cwd().resolve().parent / "benchmarks").is_dir() else Path.cwd().resolve()
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the checkout, not an installed package

import matplotlib.pyplot as plt

from benchmarks import report, seed
from benchmarks.case import Status

RESULTS = REPO / "benchmarks" / "results" / "cpu" / "results.json"
rows = report.load_rows(RESULTS)
seed_table = seed.load_seed_table()
print(f"{len(rows)} rows from {RESULTS.relative_to(REPO)}")
print("rows per section and status:", dict(Counter((r["section"], r["status"]) for r in rows)))
measured = [r for r in report.section(rows, "main") if r["status"] == Status.OK]
assert measured, f"{RESULTS} holds no measured main row: rerun `make bench`"
print("device:", measured[0]["device_name"])

# %% [markdown]
# ## Headline
#
# Per variant, at the largest sequence length both frameworks measured: which one is faster, by
# how much (slower median / faster median), and each framework's median with the min-max spread of
# its repeats.

# %% tags=["table"]
print(report.headline_summary(rows))
print()
print(report.headline_table(rows, "github"))

# %% [markdown]
# ## JAX vs torch, every sequence length
#
# Ratios are JAX / torch: below 1 means JAX is faster (time) or needs less extra memory.

# %% tags=["table"]
print(report.ratio_table(rows, "github"))

# %% [markdown]
# ## Modes: causal and backward
#
# `standard` and `improved` at n = 8192 in four modes (forward, causal forward, forward+backward,
# causal forward+backward). Results files written before the mode rows existed have none; the cell
# says so instead of showing an empty table.

# %%
if report.section(rows, "modes"):
    for key in ("modes", "mode_ratios", "causal"):
        title, table = report.tables(rows, seed_table, "github")[key]
        print(title, table, "", sep="\n")
    report.figure_modes(rows)
    plt.show()
else:
    print("No mode rows in this results file; `make bench` writes them.")

# %% [markdown]
# ## Time and memory against the sequence length
#
# One row of panels per framework; attention functions and multi-head modules apart, with dense
# attention as the gray baseline in each panel.

# %% tags=["figure"]
report.figure_vs_seq_len(rows, "time_ms")
plt.show()

# %% tags=["figure"]
report.figure_vs_seq_len(rows, "memory_mb")
plt.show()

# %% [markdown]
# ## Dilated against dense attention, and useful FLOP/s
#
# The FLOP/s plot counts only the work each variant is defined to do, against the machine's peak: a
# plain float32 matmul measured by the same run (absent from results files written before it was
# measured).

# %% tags=["figure"]
report.figure_vs_dense(rows)
plt.show()

# %% tags=["figure"]
report.figure_gflops(rows)
plt.show()

# %% [markdown]
# ## The seed comparison
#
# The seed package's own published table comes from a CUDA GPU, another machine: its numbers get a
# plot of their own. Our rerun of the seed's configuration (dense attention, `segment_lengths=[n]`)
# stands beside them in the table.

# %% tags=["figure"]
report.figure_seed(seed_table)
plt.show()

# %% tags=["table"]
title, table = report.tables(rows, seed_table, "github")["seed"]
print(title, table, sep="\n\n")

# %% [markdown]
# ## Failed rows
#
# Every failed row keeps its failure kind (`error`, `out_of_memory`, `timeout`, `killed`,
# `skipped`) and error text.

# %%
failed = [r for r in rows if r["status"] == Status.FAILED]
print(f"{len(failed)} failed rows")
for r in failed:
    print(f"  [{r['section']}] {r['framework']} {r['label']} n={r['seq_len']} {r['mode']}: {r['failure']}: {r['error']}")
