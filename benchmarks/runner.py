"""The measurement harness: every case in a fresh subprocess, timed and memory-profiled the same way.

Parent side: :func:`run_cases` runs a list of cases one after the other behind a tqdm progress bar,
through a :class:`Scheduler` that does not spend a subprocess on what is sure to fail;
:func:`run_case` starts ``python -m benchmarks.runner CASE_JSON RESULT_PATH`` with a timeout and
turns whatever happens (a result, an exception, a crash, a timeout) into a
:class:`~benchmarks.case.Measurement`. A fresh process per case means one case's compilation caches,
allocator state or memory high-water mark never leak into another's, and a crash or out-of-memory
kill only loses that case.

Worker side, :func:`measure` (the same for both frameworks):

1. build inputs and the step with the case's builder (``benchmarks.variants.VARIANTS[name]``; JAX
   compiles here); run the step once and wait for it (warm-up);
2. drop the warm-up output, collect garbage and return freed heap pages to the OS (``malloc_trim``);
3. read the baseline: CPU ``VmRSS`` of ``/proc/self/status``; GPU bytes currently allocated;
4. reset the high-water mark: CPU writes ``5`` to ``/proc/self/clear_refs`` (resets ``VmHWM``); torch
   GPU ``torch.cuda.reset_peak_memory_stats()`` (JAX cannot reset its peak; its warm-up ran the same
   program, so the peak is the same one);
5. run ``repeats`` timed repeats, each of ``steps`` steps (1 but for decode cases) synchronised
   after the last one (``jax.block_until_ready``, ``torch.cuda.synchronize``), and keep every
   repeat's time divided by ``steps``;
6. time = median step; memory = high-water mark (``VmHWM`` / peak bytes) minus the baseline, i.e. the
   extra memory the call needs on top of its inputs and parameters, compilation excluded;
7. JAX only: per-device memory from ``compiled.memory_analysis()`` and the collective ops of the
   compiled HLO (count, and bytes one device sends through ``collective-permute``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.case import Case, FailureKind, Measurement, Status
from benchmarks.variants import VARIANTS

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


_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "pred": 1, "s32": 4, "u32": 4, "s8": 1, "u8": 1}
_PERMUTE = re.compile(r"= \(?(\w+)\[([\d,]*)\][^=]*? collective-permute(?:-start)?\(")
_COLLECTIVE = re.compile(r"\b(collective-permute|all-gather|all-reduce|all-to-all|reduce-scatter)(?:-start)?\(")


def hlo_communication(hlo: str) -> tuple[int, int]:
    """``(collective ops, bytes one device sends)`` of compiled HLO text (``collective-permute`` operands)."""
    sent = 0
    for dtype, dims in _PERMUTE.findall(hlo):
        size = 1
        for x in filter(None, dims.split(",")):
            size *= int(x)
        sent += size * _DTYPE_BYTES[dtype]
    return len(_COLLECTIVE.findall(hlo)), sent


def xla_stats(compiled: Any) -> dict[str, float]:
    """What a compiled JAX program says about itself, per device (MiB): ``device_mb`` = arguments +
    outputs + temporaries - aliased, ``temp_mb`` = temporaries; ``collectives``, ``comm_mb``."""
    out: dict[str, float] = {}
    m = compiled.memory_analysis()
    if m is not None:
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        out.update(device_mb=total / MIB, temp_mb=m.temp_size_in_bytes / MIB)
    count, sent = hlo_communication(compiled.as_text())
    out.update(collectives=count, comm_mb=sent / MIB)
    return out


def measure(case: Case) -> Measurement:
    """Build, warm up, then time ``case.repeats`` repeats of ``case.steps`` steps each and measure their
    peak memory (in this process); a repeat's time is per step."""
    built = VARIANTS[case.variant].build(case)
    out = built.step()
    built.sync(out)
    del out
    memory = _PeakMemory(case)
    memory.start()
    times = []
    for _ in range(case.repeats):
        start = time.perf_counter()
        for _ in range(case.steps):
            out = built.step()
        built.sync(out)
        times.append((time.perf_counter() - start) * 1e3 / case.steps)
        del out
    memory_mb = memory.stop()
    return Measurement(status=Status.OK, times_ms=times, time_ms=statistics.median(times), memory_mb=memory_mb,
                       density=built.density, device_name=built.device_name or f"cpu: {cpu_name()}",
                       software=built.software, kv_mb=built.kv_mb,
                       xla={} if built.compiled is None else xla_stats(built.compiled))


def classify_exception(exc: BaseException) -> Measurement:
    """The failed measurement of an exception: out of memory where the text says so, else an error."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
    if isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return Measurement.failed(FailureKind.OUT_OF_MEMORY, text)
    return Measurement.failed(FailureKind.ERROR, text)


def _worker_main(case_json: str, result_path: str) -> None:
    case = Case.from_json(case_json)
    try:
        result = measure(case)
    except Exception as exc:  # every failure becomes a failed row
        traceback.print_exc()
        result = classify_exception(exc)
    Path(result_path).write_text(result.to_json())


# ----------------------------------------------------------------------------------------------
# parent side


def worker_env(case: Case) -> dict[str, str]:
    """Environment of the worker: JAX pinned to the case's platform (and its number of simulated CPU
    devices), the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    if case.framework == "jax":
        env["JAX_PLATFORMS"] = "cpu" if case.device == "cpu" else "cuda"
        if case.devices > 1 and case.device == "cpu":
            flag = f"--xla_force_host_platform_device_count={case.devices}"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def describe_crash(returncode: int, stderr: str) -> Measurement:
    """The failed measurement of a worker that exited without writing a result."""
    tail = " ".join((stderr or "").strip().splitlines()[-1:])[-300:]
    if returncode == -9:
        return Measurement.failed(FailureKind.KILLED, f"worker killed by SIGKILL (likely out of memory) {tail}".strip())
    if returncode < 0:
        return Measurement.failed(FailureKind.KILLED, f"worker killed by signal {-returncode} {tail}".strip())
    text = f"worker exited with code {returncode} without a result: {tail}".strip()
    return Measurement.failed(FailureKind.ERROR, text)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(case: Case, timeout: float) -> Measurement:
    """Measure ``case`` in a fresh subprocess; a timeout, crash or exception gives a failed measurement.

    The result also records the subprocess's wall-clock and CPU seconds.
    """
    start_wall, start_cpu = time.perf_counter(), _children_cpu_s()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.runner", case.to_json(), str(result_path)]
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=worker_env(case), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            m = Measurement.failed(FailureKind.TIMEOUT, f"timeout after {timeout:g} s")
        else:
            m = (Measurement.from_json(result_path.read_text()) if result_path.exists()
                 else describe_crash(proc.returncode, proc.stderr))
    m.wall_s = round(time.perf_counter() - start_wall, 2)
    m.cpu_s = round(_children_cpu_s() - start_cpu, 2)
    return m


#: Failures after which the same settings are not retried at a larger n (they would only fail slower).
_GROWS_WORSE = (FailureKind.TIMEOUT, FailureKind.KILLED, FailureKind.OUT_OF_MEMORY)


class Scheduler:
    """Runs cases once each; after a timeout, kill or out-of-memory failure, the same variant,
    framework and settings are skipped at any larger n (a ``skipped`` row, no subprocess)."""

    def __init__(self, timeout: float, run: Callable[[Case, float], Measurement] = run_case):
        self.timeout = timeout
        self._run = run
        self.done: dict[Case, Measurement] = {}
        self._too_big: dict[Case, int] = {}

    def run(self, case: Case) -> Measurement:
        """Measure ``case`` (or reuse what is known) and remember the outcome."""
        if case in self.done:
            return self.done[case]
        key = dataclasses.replace(case, seq_len=0)
        smallest = self._too_big.get(key)
        if smallest is not None and case.seq_len > smallest:
            m = Measurement.failed(FailureKind.SKIPPED, f"skipped: the same settings failed at n={smallest}")
        else:
            m = self._run(case, self.timeout)
            if m.failure in _GROWS_WORSE:
                self._too_big[key] = min(case.seq_len, self._too_big.get(key, case.seq_len))
        self.done[case] = m
        return m


def run_cases(cases: Sequence[Case], timeout: float, describe: Callable[[Case], str],
              run: Callable[[Case, float], Measurement] = run_case) -> dict[Case, Measurement]:
    """Measure every distinct case in order, with a tqdm bar (description ``describe(case)``)."""
    from tqdm import tqdm

    scheduler = Scheduler(timeout, run)
    unique = list(dict.fromkeys(cases))
    with tqdm(total=len(unique), unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
        for case in unique:
            bar.set_description(describe(case))
            bar.set_postfix_str("")
            m = scheduler.run(case)
            bar.set_postfix_str(f"{m.time_ms:.0f} ms" if m.status is Status.OK else f"{m.failure}")
            bar.update(1)
    return scheduler.done


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
