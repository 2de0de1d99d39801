"""Plain data of the benchmark: what one measurement runs (:class:`Case`) and what came out of it
(:class:`Measurement`, with :class:`Status` and :class:`FailureKind`).

This module imports nothing else from ``benchmarks``: every other module may import it. A case is
hashable (it is the key that lets two report sections share one measurement) and travels to the
worker subprocess as JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

FRAMEWORKS: tuple[str, ...] = ("jax", "torch")
DEVICES: tuple[str, ...] = ("cpu", "gpu")
DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")


class Status(enum.StrEnum):
    """Outcome of a case, stored in ``results.json`` as the plain string (``"ok"``, ``"failed"``)."""

    OK = "ok"
    FAILED = "failed"


class FailureKind(enum.StrEnum):
    """Why a case failed (``results.json`` field ``failure``; ``null`` for an ``ok`` row)."""

    ERROR = "error"                  # the step raised (bad shape, unsupported option, ...)
    OUT_OF_MEMORY = "out_of_memory"  # MemoryError, RESOURCE_EXHAUSTED, CUDA out of memory
    TIMEOUT = "timeout"              # the subprocess ran past --timeout and was stopped
    KILLED = "killed"                # the subprocess died without a result (SIGKILL: usually the OOM killer)
    SKIPPED = "skipped"              # not run: the same settings timed out or were killed at a smaller n


@dataclasses.dataclass(frozen=True)
class Case:
    """Everything that defines one measurement.

    ``variant`` is a key of :data:`benchmarks.variants.VARIANTS`, which says what the name runs.
    Attention variants take ``q, k, v`` of shape ``(batch, seq_len, heads, head_dim)``; module
    variants take ``x`` of shape ``(batch, seq_len, embed_dim)`` with ``embed_dim // heads`` per head;
    ``matmul`` multiplies two ``(seq_len, seq_len)`` matrices (the machine's peak). ``causal`` and
    ``backward`` (time forward + backward) belong to each case, so that one run can hold every mode.
    ``devices > 1`` shards the sequence over that many (simulated, on CPU) devices (ring attention).

    Shapes of real models (attention functions): ``num_kv_heads`` gives ``k, v`` that many heads
    (grouped-query attention; None = ``heads``), ``documents > 0`` packs that many equal documents
    into each row (``document_ids = position // (seq_len // documents)``; 0 = unpacked).

    The ``decode`` variant times one decode step with a key/value cache: ``seq_len`` is the cache
    length (``max_length``) and ``position`` the cache index of the new token (it sees positions
    ``0 .. position``). ``steps`` calls make one timed repeat (the repeat's time is divided by it),
    for steps too short to time one by one.
    """

    variant: str
    framework: str
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 2
    seq_len: int = 4096
    heads: int = 8
    head_dim: int = 64
    embed_dim: int = 512
    segment_lengths: tuple[int, ...] = (1024, 2048, 4096)
    dilation_rates: tuple[int, ...] = (1, 2, 4)
    causal: bool = False
    backward: bool = False
    repeats: int = 3
    block_size: int = 128
    sparsity_ratio: float = 0.9
    devices: int = 1
    num_kv_heads: int | None = None
    documents: int = 0
    position: int = 0
    steps: int = 1
    merge: str = "head_partition"

    @property
    def mode(self) -> str:
        """``forward``, ``causal forward``, ``forward+backward`` or ``causal forward+backward``."""
        return ("causal " if self.causal else "") + ("forward+backward" if self.backward else "forward")

    @property
    def kv_heads(self) -> int:
        """Heads of ``k`` and ``v``: ``num_kv_heads``, or ``heads`` when it is None."""
        return self.heads if self.num_kv_heads is None else self.num_kv_heads

    def to_json(self) -> str:
        """Serialise for the worker subprocess (inverse of :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        """Rebuild a case from :meth:`to_json` output (fields it lacks, from older files, keep their
        defaults)."""
        data = json.loads(text)
        data["segment_lengths"] = tuple(data["segment_lengths"])
        data["dilation_rates"] = tuple(data["dilation_rates"])
        return cls(**data)


@dataclasses.dataclass
class Measurement:
    """What a worker reports for one case (times in ms, memory in MiB = 2**20 bytes).

    ``times_ms`` holds every timed repeat in order; ``time_ms`` is their median. ``xla`` holds what the
    compiled JAX program says about itself (per-device memory from ``compiled.memory_analysis()`` and
    the collective ops of its HLO); it is empty for torch. ``kv_mb`` is what ``k`` and ``v`` take
    (with their gradients for forward+backward), see :attr:`benchmarks.variants.Built.kv_mb`.
    ``wall_s`` and ``cpu_s`` are the whole subprocess's wall-clock and CPU seconds (imports and
    compilation included), filled in by the parent: the cost of the case in a run.
    """

    status: Status
    failure: FailureKind | None = None
    times_ms: list[float] = dataclasses.field(default_factory=list)
    time_ms: float | None = None
    memory_mb: float | None = None
    density: float | None = None
    error: str = ""
    device_name: str = ""
    software: str = ""
    xla: dict[str, float] = dataclasses.field(default_factory=dict)
    kv_mb: float | None = None
    wall_s: float | None = None
    cpu_s: float | None = None

    @classmethod
    def failed(cls, kind: FailureKind, error: str) -> Measurement:
        """A failed measurement of ``kind`` carrying the one-line ``error``."""
        return cls(status=Status.FAILED, failure=kind, error=error)

    def to_json(self) -> str:
        """Serialise for the trip from the worker back to the parent (inverse of :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Measurement:
        """Rebuild a measurement from :meth:`to_json` output (strings back to enums)."""
        data: dict[str, Any] = json.loads(text)
        data["status"] = Status(data["status"])
        data["failure"] = None if data["failure"] is None else FailureKind(data["failure"])
        return cls(**data)
