"""The one-shot GPU check: versions, kernel probes, exactness, kernel TFLOP/s, the report, the longest n.

    python -m benchmarks.gpu_check                # on a GPU machine (at most ~8 minutes on one H100/H200)
    python -m benchmarks.gpu_check --dry-run      # the same code at tiny sizes on the CPU (part of the tests)

Writes ``gpu_check.json`` and ``GPU_CHECK.md`` under ``--out`` (default ``benchmarks/results/gpu/``), and
the default benchmark report's files under ``--out``/``report``. Every section is time-boxed and
failure-tolerant: a section that fails or runs out of time is recorded as such and the check goes
on. It uses only what the lent machines have installed (jax with the CUDA plugin, flax, optax,
torch, triton, numpy, tabulate, matplotlib, tqdm). torch runs in a subprocess of its own, so the
two frameworks never share the GPU's memory; JAX is told not to preallocate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "gpu"
SEGMENTS, RATES = (1024, 2048, 4096), (1, 2, 4)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _median_ms(step: Callable[[], Any], sync: Callable[[Any], Any], repeats: int) -> tuple[float, list[float]]:
    """Warm-up once, then the median (and all) of ``repeats`` synchronised calls, in ms."""
    sync(step())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(step())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


# ----------------------------------------------------------------------------------------------
# Sections run in this process (JAX)


def versions(dry: bool) -> dict[str, Any]:
    """Versions of everything that decides the numbers, and the device's name."""
    import jax
    import jaxlib

    out: dict[str, Any] = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    out["devices"] = [f"{d.platform}: {d.device_kind}" for d in jax.devices()]
    for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "triton", "torch", "flax", "optax", "numpy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    try:
        from jax._src.lib import cuda_versions  # private; version reporting only

        out["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001 - a missing plugin is a fact to record, not an error
        out["cudnn"] = None
    return out


def probes(dry: bool) -> list[dict[str, Any]]:
    """Each backend's verdict (unsupported reason or probe result) for the call shapes that matter."""
    import jax

    from jax_dilated.kernels import select

    platform_name = jax.default_backend()
    shapes = [("bfloat16", 64), ("bfloat16", 128), ("float16", 128), ("float32", 128)]
    if dry:
        shapes = [("float32", 16)]
    rows = []
    for dtype, d in shapes:
        for causal in (False, True):
            for need_lse in (True, False):
                call = select.CallShape(
                    platform=platform_name, dtype=dtype, head_dim=d, is_causal=causal, need_lse=need_lse
                )
                row: dict[str, Any] = dict(dtype=dtype, head_dim=d, causal=causal, need_lse=need_lse)
                for name in ("pallas", "cudnn"):
                    reason = select.unsupported(name, call)
                    if reason is None and (select.candidates(call) != ("xla",) or dry and name == "pallas"):
                        reason = select.probe(name, call)
                        row[name] = "ok" if reason is None else f"probe failed: {reason}"
                    else:
                        row[name] = f"not applicable: {reason}" if reason else "not tried on this platform"
                row["chosen"] = select.choose(call) if platform_name != "cpu" else "xla"
                rows.append(row)
    return rows


def _qkv(rng, shape, dtype):
    import jax.numpy as jnp

    return tuple(jnp.asarray(rng.standard_normal(shape), dtype=dtype) for _ in range(3))


def exactness(dry: bool) -> list[dict[str, Any]]:
    """All seven variants of both frameworks against the float64 references of the tests (small n).

    The bound is the one of docs/semantics.md section 8: float32 ``1e-5 * max|ref| + 1e-6`` (matmuls
    at highest precision), bfloat16 ``2e-2`` relative to ``max|ref|``.
    """
    import numpy as np

    from parity_tests import reference, reference_block_sparse, reference_multihead

    n, h, d, e = (64, 4, 8, 32) if dry else (1024, 8, 64, 512)
    segs, rates = ((16, 32, 64), (1, 2, 4)) if dry else (SEGMENTS[:2], RATES[:2])
    block = dict(block_size=16 if dry else 128, pattern="dilated_sparse", sparsity_ratio=0.5)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, h, d)) for _ in range(3))
    x = rng.standard_normal((1, n, e))
    rows = []
    refs = {
        "standard": reference.dilated_attention(q, k, v, segs, rates, is_causal=True),
        "improved": reference.dilated_attention(q, k, v, segs, rates, is_causal=True, merge="lse"),
        "ring_v2_collective": reference.dilated_attention(q, k, v, segs, rates, is_causal=True),
        "block_sparse": reference_block_sparse.block_sparse_attention(q, k, v, is_causal=True, **block),
    }
    for framework in ("jax", "torch"):
        for dtype in ("float32", "bfloat16"):
            got = _framework_outputs(framework, dtype, q, k, v, x, segs, rates, block, h)
            for name, (out, state) in got.items():
                if name in refs:
                    want = refs[name]
                elif name.startswith("block_sparse"):
                    want = reference_multihead.multihead(
                        state, reference_multihead.block_sparse_core(**block), x, num_heads=h, is_causal=True
                    )
                else:
                    core = reference_multihead.dilated_core(segs, rates)
                    want = reference_multihead.multihead(state, core, x, num_heads=h, is_causal=True)
                scale = float(np.abs(want).max())
                err = float(np.abs(out - want).max())
                bound = 1e-5 * scale + 1e-6 if dtype == "float32" else 2e-2 * scale
                rows.append(
                    dict(
                        variant=name, framework=framework, dtype=dtype, n=n, max_error=err, bound=bound, ok=err <= bound
                    )
                )
    return rows


def _framework_outputs(framework, dtype, q, k, v, x, segs, rates, block, h) -> dict[str, tuple[Any, Any]]:
    """``{variant: (float64 output, state dict or None)}`` of one framework in ``dtype``."""
    import numpy as np

    if framework == "torch":  # in a process of its own; arrays travel as .npz files
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "in.npz", q=q, k=k, v=v, x=x)
            spec = json.dumps([dtype, tmp, list(segs), list(rates), block, h])
            code = (
                "import json, sys\nfrom benchmarks.gpu_check import _torch_outputs as f\nf(*json.loads(sys.argv[1]))\n"
            )
            subprocess.run(
                [sys.executable, "-c", code, spec],
                capture_output=True,
                text=True,
                env=_env(),
                cwd=REPO_ROOT,
                timeout=300,
                check=True,
            )
            data = np.load(Path(tmp) / "out.npz")
            names = sorted({key.split("/")[0] for key in data.files})
            return {
                name: (
                    data[f"{name}/out"],
                    {key.split("/", 2)[2]: data[key] for key in data.files if key.startswith(f"{name}/state/")} or None,
                )
                for name in names
            }
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_dilated as jd

    jdt = jnp.dtype(dtype)
    qj, kj, vj = (jnp.asarray(a, jdt) for a in (q, k, v))
    xj = jnp.asarray(x, jdt)
    kw = dict(segment_lengths=segs, dilation_rates=rates, is_causal=True)
    mesh = jax.make_mesh((1,), ("seq",))
    out: dict[str, tuple[Any, Any]] = {}
    with jax.default_matmul_precision("highest"):
        out["standard"] = (jd.dilated_attention(qj, kj, vj, **kw), None)
        out["improved"] = (jd.improved_dilated_attention(qj, kj, vj, merge="lse", **kw), None)
        out["ring_v2_collective"] = (jd.ring_dilated_attention(qj, kj, vj, mesh=mesh, **kw), None)
        out["block_sparse"] = (jd.block_sparse_attention(qj, kj, vj, is_causal=True, **block), None)
        e = x.shape[-1]
        modules = {
            "multihead_standard": jd.MultiheadDilatedAttention(e, h, segs, rates, param_dtype=jdt, rngs=nnx.Rngs(0)),
            "multihead_improved": jd.ImprovedMultiheadDilatedAttention(
                e, h, segs, rates, param_dtype=jdt, rngs=nnx.Rngs(0)
            ),
            "block_sparse_multihead": jd.BlockSparseMultiheadDilatedAttention(
                e, h, param_dtype=jdt, rngs=nnx.Rngs(0), **block
            ),
        }
        for name, module in modules.items():
            state = {a: np.asarray(b, np.float64) for a, b in jd.to_torch_state_dict(module).items()}
            out[name] = (module(xj, is_causal=True), state)
    return {name: (np.asarray(o.astype(jnp.float32), np.float64), s) for name, (o, s) in out.items()}


def _torch_outputs(dtype, folder, segs, rates, block, h) -> None:
    """The torch side of :func:`exactness` (run in its own process): ``folder/in.npz`` -> ``folder/out.npz``."""
    import numpy as np
    import torch

    import torch_ref as tr

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = getattr(torch, dtype)
    arrays = np.load(Path(folder) / "in.npz")
    q, k, v, x = (torch.as_tensor(arrays[name]).to(device=device, dtype=tdt) for name in "qkvx")
    kw = dict(segment_lengths=segs, dilation_rates=rates, is_causal=True)
    e = x.shape[-1]
    saved: dict[str, Any] = {}
    with torch.no_grad():
        outs = {
            "standard": tr.dilated_attention(q, k, v, **kw),
            "improved": tr.improved_dilated_attention(q, k, v, merge="lse", **kw),
            "ring_v2_collective": tr.ring_dilated_attention(q, k, v, **kw),
            "block_sparse": tr.block_sparse_attention(q, k, v, is_causal=True, **block),
        }
        modules = {
            "multihead_standard": tr.MultiheadDilatedAttention(e, h, segs, rates),
            "multihead_improved": tr.ImprovedMultiheadDilatedAttention(e, h, segs, rates),
            "block_sparse_multihead": tr.BlockSparseMultiheadDilatedAttention(e, h, **block),
        }
        for name, module in modules.items():
            module = module.to(device=device, dtype=tdt).eval()
            saved.update({f"{name}/state/{a}": b.double().cpu().numpy() for a, b in module.state_dict().items()})
            outs[name] = module(x, is_causal=True)
    saved.update({f"{name}/out": o.double().cpu().numpy() for name, o in outs.items()})
    np.savez(Path(folder) / "out.npz", **saved)


def _kernel_cases(dry: bool) -> list[tuple[int, int, int]]:
    """``(head_dim, m, rows)``: about 128k tokens per call (a few on the CPU)."""
    if dry:
        return [(16, 16, 4), (16, 32, 2)]
    return [(d, m, (1 << 17) // m) for d in (64, 128) for m in (512, 2048, 8192)]


def kernel_tflops(dry: bool) -> list[dict[str, Any]]:
    """Useful TFLOP/s of each JAX backend on ``rows`` sequences of ``m`` (8 heads, bf16), fwd and fwd+bwd."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_dilated.kernels import attend, select

    dtype = jnp.float32 if dry else jnp.bfloat16
    h, repeats = 8, (1 if dry else 5)
    rng = np.random.default_rng(0)
    rows = []
    for d, m, b in _kernel_cases(dry):
        q, k, v = _qkv(rng, (b, m, h, d), dtype)
        flops = 4.0 * b * h * m * m * d
        call = select.CallShape(platform=jax.default_backend(), dtype=jnp.dtype(dtype).name, head_dim=d, need_lse=False)
        for backend in ("xla", "pallas", "cudnn"):
            reason = select.unsupported(backend, call)
            if reason is not None and not (dry and backend == "pallas"):
                rows.append(dict(backend=backend, head_dim=d, m=m, rows=b, error=reason))
                continue

            def fwd(q, k, v, backend=backend):
                return attend(q, k, v, scale=d**-0.5, need_lse=False, implementation=backend)[0]

            def loss(q, k, v, backend=backend):
                return jnp.sum(fwd(q, k, v, backend).astype(jnp.float32))

            for mode, fn, mult in (("fwd", jax.jit(fwd), 1), ("fwd+bwd", jax.jit(jax.grad(loss, (0, 1, 2))), 3)):
                row = dict(backend=backend, framework="jax", mode=mode, head_dim=d, m=m, rows=b)
                try:
                    ms, times = _median_ms(lambda fn=fn: fn(q, k, v), jax.block_until_ready, repeats)
                    row.update(time_ms=ms, times_ms=times, tflops=mult * flops / ms / 1e9)
                except Exception as exc:  # noqa: BLE001 - recorded, the check goes on
                    row.update(error=f"{type(exc).__name__}: {str(exc)[:200]}")
                rows.append(row)
    rows += _in_torch("_torch_kernel_tflops", dry)
    return rows


def _torch_kernel_tflops(dry: bool) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    h, repeats = 8, (1 if dry else 5)
    rows = []
    for d, m, b in _kernel_cases(dry):
        q, k, v = (torch.randn(b, h, m, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        flops = 4.0 * b * h * m * m * d

        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v)

        def fwd_bwd():
            return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).float().sum(), (q, k, v))

        for mode, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
            ms, times = _median_ms(fn, sync, repeats)
            rows.append(
                dict(
                    backend="sdpa",
                    framework="torch",
                    mode=mode,
                    head_dim=d,
                    m=m,
                    rows=b,
                    time_ms=ms,
                    times_ms=times,
                    tflops=mult * flops / ms / 1e9,
                )
            )
    return rows


def improved_vs_torch(dry: bool) -> list[dict[str, Any]]:
    """JAX improved and torch improved at n = 32768, bf16, both merges, forward and forward+backward."""
    rows = _improved_times("jax", dry) + _in_torch("_improved_times", "torch", dry)
    by = {(r["framework"], r["merge"], r["mode"]): r for r in rows if "time_ms" in r}
    for r in rows:
        other = by.get(("torch", r["merge"], r["mode"]))
        if r["framework"] == "jax" and other and "time_ms" in r:
            r["jax_over_torch"] = r["time_ms"] / other["time_ms"]
    return rows


def _improved_times(framework: str, dry: bool) -> list[dict[str, Any]]:
    b, n, h, d = (1, 256, 4, 16) if dry else (2, 32768, 8, 64)
    segs, rates = ((32, 64, 128), RATES) if dry else (SEGMENTS, RATES)
    repeats = 1 if dry else 5
    rows = []
    if framework == "jax":
        import jax
        import jax.numpy as jnp
        import numpy as np

        import jax_dilated as jd

        dtype = jnp.float32 if dry else jnp.bfloat16
        q, k, v = _qkv(np.random.default_rng(0), (b, n, h, d), dtype)
        for merge in ("head_partition", "lse"):
            kw = dict(segment_lengths=segs, dilation_rates=rates, merge=merge)
            f = jax.jit(lambda q, k, v, kw=kw: jd.improved_dilated_attention(q, k, v, **kw))
            g = jax.jit(
                jax.grad(
                    lambda q, k, v, kw=kw: jd.improved_dilated_attention(q, k, v, **kw).astype(jnp.float32).sum(),
                    (0, 1, 2),
                )
            )
            for mode, fn in (("fwd", f), ("fwd+bwd", g)):
                ms, times = _median_ms(lambda fn=fn: fn(q, k, v), jax.block_until_ready, repeats)
                rows.append(dict(framework="jax", merge=merge, mode=mode, n=n, time_ms=ms, times_ms=times))
        return rows
    import torch

    import torch_ref as tr

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    for merge in ("head_partition", "lse"):
        kw = dict(segment_lengths=segs, dilation_rates=rates, merge=merge)

        def fwd(kw=kw):
            with torch.no_grad():
                return tr.improved_dilated_attention(q, k, v, **kw)

        def fwd_bwd(kw=kw):
            return torch.autograd.grad(tr.improved_dilated_attention(q, k, v, **kw).float().sum(), (q, k, v))

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            ms, times = _median_ms(fn, sync, repeats)
            rows.append(dict(framework="torch", merge=merge, mode=mode, n=n, time_ms=ms, times_ms=times))
    return rows


def longest(dry: bool) -> list[dict[str, Any]]:
    """The longest n that runs for improved, b 1, h 8, d 128, bf16 (forward), doubling from 2^17 to 2^20."""
    lengths = [256] if dry else [1 << p for p in range(17, 21)]
    rows = []
    for n in lengths:
        code = (
            "import json, sys\n"
            "from benchmarks.gpu_check import _one_long\n"
            f"print(json.dumps(_one_long({n}, {dry!r})))\n"
        )
        try:
            res = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=120
            )
            row = (
                json.loads(res.stdout.splitlines()[-1])
                if res.returncode == 0
                else dict(n=n, error=" ".join(res.stderr.strip().splitlines()[-1:])[:300])
            )
        except subprocess.TimeoutExpired:
            row = dict(n=n, error="timeout after 120 s")
        rows.append(row)
        if "error" in row:
            break
    return rows


def _one_long(n: int, dry: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_dilated as jd

    h, d = (4, 16) if dry else (8, 128)
    dtype = jnp.float32 if dry else jnp.bfloat16
    segs = (32, 64, 128) if dry else SEGMENTS
    q, k, v = _qkv(np.random.default_rng(0), (1, n, h, d), dtype)
    f = jax.jit(lambda q, k, v: jd.improved_dilated_attention(q, k, v, segment_lengths=segs, dilation_rates=RATES))
    ms, _ = _median_ms(lambda: f(q, k, v), jax.block_until_ready, 1 if dry else 3)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(n=n, time_ms=ms, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30 or None)


def report(dry: bool, out: Path) -> dict[str, Any]:
    """The default benchmark report on the GPU (``python -m benchmarks --device gpu``), into ``out``/report."""
    # The default configuration, without the rerun of the seed's dense table (minutes of compiles that say
    # nothing about dilation), so that the whole check fits its budget.
    args = ["--device", "gpu", "--no-seed-comparison"]
    if dry:
        args = ["--variants", "improved", "--seq-lens", "256", "--repeats", "1", "--peak-size", "0"]
    cmd = [sys.executable, "-m", "benchmarks", *args, "--out", str(out / "report")]
    started = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=60 if dry else 200)
        return dict(
            command=" ".join(cmd[1:]),
            returncode=res.returncode,
            seconds=time.perf_counter() - started,
            tail=res.stdout[-3000:] + res.stderr[-1000:],
        )
    except subprocess.TimeoutExpired:
        return dict(command=" ".join(cmd[1:]), error="timed out", seconds=time.perf_counter() - started)


def _in_torch(function: str, *args: Any) -> list[dict[str, Any]]:
    """Run ``benchmarks.gpu_check.<function>(*args)`` in a fresh process (torch alone on the device)."""
    code = (
        "import json, sys\n"
        f"from benchmarks.gpu_check import {function}\n"
        f"print(json.dumps({function}(*json.loads(sys.argv[1]))))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
        timeout=300,
    )
    if res.returncode:
        return [dict(framework="torch", error=" ".join(res.stderr.strip().splitlines()[-1:])[:300])]
    return json.loads(res.stdout.splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Driver


SECTIONS = ("versions", "probes", "exactness", "kernel_tflops", "improved_vs_torch", "longest", "report")


def run(out: Path, dry: bool, budget_s: float) -> dict[str, Any]:
    """Every section in order, each after the last, skipping the rest once ``budget_s`` is spent."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"dry_run": dry, "sections": {}}
    functions: dict[str, Callable[[], Any]] = {
        "versions": lambda: versions(dry),
        "probes": lambda: probes(dry),
        "exactness": lambda: exactness(dry),
        "kernel_tflops": lambda: kernel_tflops(dry),
        "improved_vs_torch": lambda: improved_vs_torch(dry),
        "longest": lambda: longest(dry),
        "report": lambda: report(dry, out),
    }
    for name in SECTIONS:
        if time.perf_counter() - started > budget_s:
            results["sections"][name] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        try:
            results["sections"][name] = {"result": functions[name]()}
        except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
            results["sections"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        results["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check] {name}: {results['sections'][name]['seconds']} s", file=sys.stderr, flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "GPU_CHECK.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    """The check as markdown tables (tabulate)."""
    from tabulate import tabulate

    lines = [
        f"# GPU check{' (dry run on the CPU)' if results['dry_run'] else ''}",
        "",
        f"Whole check: {results['seconds']} s.",
        "",
    ]
    for name, section in results["sections"].items():
        lines += [f"## {name} ({section.get('seconds', 0)} s)", ""]
        if "result" not in section:
            lines += [f"Not completed: {section.get('error') or section.get('skipped')}", ""]
            continue
        result = section["result"]
        if isinstance(result, list) and result:
            keys = list(dict.fromkeys(k for row in result for k in row if k not in ("times_ms",)))
            body = [[_cell(row.get(k)) for k in keys] for row in result]
            lines += [tabulate(body, headers=keys, tablefmt="github"), ""]
        elif isinstance(result, dict):
            body = [[k, _cell(v)] for k, v in result.items() if k != "tail"]
            lines += [tabulate(body, headers=["field", "value"], tablefmt="github"), ""]
            if "tail" in result:
                lines += ["```", result["tail"][-2000:], "```", ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Pallas interpreted)")
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds after which remaining sections are skipped"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = run(args.out, args.dry_run, args.budget)
    failed = [name for name, s in results["sections"].items() if "result" not in s]
    print(f"wrote {args.out / 'GPU_CHECK.md'}; sections not completed: {failed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
