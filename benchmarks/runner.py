"""The measurement harness: every case in a fresh subprocess, timed and memory-profiled the same way.

Parent side, :func:`run_case`: start ``python -m benchmarks.runner CASE_JSON RESULT_PATH`` with a
timeout, and turn whatever happens (a result, an exception, a crash, a timeout) into a
:class:`~benchmarks.case.Measurement`. A fresh process per case means one case's compilation caches,
allocator state or memory high-water mark never leak into another's, and a crash or out-of-memory
kill only loses that case.

Worker side, :func:`measure` (the same for both frameworks):

1. build inputs and the (jitted) step; run it once and wait for it: warm-up, including compilation;
2. drop the warm-up output, collect garbage and return freed heap pages to the OS (``malloc_trim``);
3. read the baseline: CPU ``VmRSS`` of ``/proc/self/status``; GPU bytes currently allocated;
4. reset the high-water mark: CPU writes ``5`` to ``/proc/self/clear_refs`` (resets ``VmHWM``); torch
   GPU ``torch.cuda.reset_peak_memory_stats()`` (JAX cannot reset its peak; its warm-up ran the same
   program, so the peak is the same one);
5. run ``repeats`` timed steps, each synchronised (``jax.block_until_ready``, ``torch.cuda.synchronize``);
6. time = median step; memory = high-water mark (``VmHWM`` / peak bytes) minus the baseline, i.e. the
   extra memory the call needs on top of its inputs and parameters, compilation excluded.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benchmarks.case import OK, Case, Measurement

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2.0**20


# ----------------------------------------------------------------------------------------------
# worker side


def _status_kib(field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


def _release_free_heap() -> None:
    """Garbage-collect and hand freed malloc pages back to the OS, so RSS counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include freed-but-cached pages
        pass


class _PeakMemory:
    """Peak memory of the timed repeats above the post-warm-up baseline, in MiB (see module doc).

    :meth:`stop` returns None where the platform offers no way to measure it (no ``clear_refs``,
    no device memory statistics); the case still gets its time.
    """

    def __init__(self, case: Case):
        self.case = case
        self.base: int | None = None

    def start(self) -> None:
        _release_free_heap()
        try:
            if self.case.device == "cpu":
                base = _status_kib("VmRSS") * 1024
                Path("/proc/self/clear_refs").write_text("5")
            elif self.case.framework == "jax":
                base = self._jax_stats()["bytes_in_use"]
            else:
                import torch

                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        except (OSError, RuntimeError, TypeError, KeyError):
            return
        self.base = base

    def stop(self) -> float | None:
        if self.base is None:
            return None
        if self.case.device == "cpu":
            peak = _status_kib("VmHWM") * 1024
        elif self.case.framework == "jax":
            peak = self._jax_stats()["peak_bytes_in_use"]
        else:
            import torch

            peak = torch.cuda.max_memory_allocated()
        return max(peak - self.base, 0) / MIB

    @staticmethod
    def _jax_stats() -> dict:
        import jax

        return jax.devices()[0].memory_stats()


def cpu_name() -> str:
    """The CPU model and core count, e.g. ``AMD EPYC, 2 cores``."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def measure(case: Case) -> Measurement:
    """Build, warm up, then time ``case.repeats`` steps and measure their peak memory (in this process)."""
    from benchmarks.variants import build

    built = build(case)
    out = built.step()
    built.sync(out)
    del out
    memory = _PeakMemory(case)
    memory.start()
    times = []
    for _ in range(case.repeats):
        start = time.perf_counter()
        out = built.step()
        built.sync(out)
        times.append(time.perf_counter() - start)
        del out
    return Measurement(status=OK, time_ms=statistics.median(times) * 1e3, memory_mb=memory.stop(),
                       density=built.density, device_name=built.device_name or f"cpu: {cpu_name()}")


def describe_exception(exc: BaseException) -> str:
    """One-line error text for a ✗ row; out-of-memory errors are labelled as such."""
    from benchmarks.variants import NotImplementedYet

    if isinstance(exc, NotImplementedYet):
        return str(exc)
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    if isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        text = "out of memory: " + text
    return text[:400]


def _worker_main(case_json: str, result_path: str) -> None:
    case = Case.from_json(case_json)
    try:
        result = measure(case)
    except Exception as exc:  # every failure becomes a ✗ row
        traceback.print_exc()
        result = Measurement.failure(describe_exception(exc))
    Path(result_path).write_text(json.dumps(result.__dict__))


# ----------------------------------------------------------------------------------------------
# parent side


def worker_env(case: Case) -> dict[str, str]:
    """Environment of the worker: JAX pinned to the case's platform, the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    if case.framework == "jax":
        env["JAX_PLATFORMS"] = "cpu" if case.device == "cpu" else "cuda"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _describe_crash(proc: subprocess.CompletedProcess) -> str:
    code = proc.returncode
    tail = " ".join((proc.stderr or "").strip().splitlines()[-1:])[-300:]
    if code == -9:
        return f"worker killed by SIGKILL (likely out of memory) {tail}".strip()
    return f"worker exited with code {code} without a result: {tail}".strip()


def run_case(case: Case, timeout: float) -> Measurement:
    """Measure ``case`` in a fresh subprocess; a timeout, crash or exception gives a ✗ measurement.

    The result also records the subprocess's wall-clock and CPU seconds.
    """
    start_wall, start_cpu = time.perf_counter(), _children_cpu_s()
    m = _run_subprocess(case, timeout)
    m.wall_s = round(time.perf_counter() - start_wall, 2)
    m.cpu_s = round(_children_cpu_s() - start_cpu, 2)
    return m


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_subprocess(case: Case, timeout: float) -> Measurement:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.runner", case.to_json(), str(result_path)]
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=worker_env(case), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return Measurement.failure(f"timeout after {timeout:g} s")
        if not result_path.exists():
            return Measurement.failure(_describe_crash(proc))
        return Measurement(**json.loads(result_path.read_text()))


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
