"""One benchmark measurement: what is run (:class:`Case`) and what came out (:class:`Row`).

A case is plain, hashable data so that it can be sent to a worker subprocess as JSON and used as a
key to avoid measuring the same configuration twice (the seed comparison reuses main-run cases).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from benchmarks.flops import useful_flops

#: The seven variants of the seed table, in its order.
SEED_VARIANTS: tuple[str, ...] = (
    "standard",
    "improved",
    "multihead_standard",
    "multihead_improved",
    "ring_v2_collective",
    "block_sparse",
    "block_sparse_multihead",
)
#: Dense softmax attention (``jax.nn.dot_product_attention`` / torch SDPA), the baseline.
DENSE = "dense"
VARIANTS: tuple[str, ...] = SEED_VARIANTS + (DENSE,)
MODULE_VARIANTS: tuple[str, ...] = ("multihead_standard", "multihead_improved", "block_sparse_multihead")
BLOCK_SPARSE_VARIANTS: tuple[str, ...] = ("block_sparse", "block_sparse_multihead")
FRAMEWORKS: tuple[str, ...] = ("jax", "torch")
DEVICES: tuple[str, ...] = ("cpu", "gpu")
DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
#: Status marks of a row, as in the seed table.
OK, FAILED = "✓", "✗"


@dataclasses.dataclass(frozen=True)
class Case:
    """Everything that defines one measurement.

    Core variants take ``q, k, v`` of shape ``(batch, seq_len, heads, head_dim)``; module variants
    take ``x`` of shape ``(batch, seq_len, embed_dim)`` with ``embed_dim // heads`` per head.
    ``segment_lengths``/``dilation_rates`` apply to the dilated variants, ``block_size`` and
    ``sparsity_ratio`` to the block-sparse ones (pattern ``dilated_sparse``); ``dense`` uses neither.
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

    @property
    def is_module(self) -> bool:
        """True for the multi-head module variants, which take ``(b, n, embed_dim)`` input."""
        return self.variant in MODULE_VARIANTS

    @property
    def is_block_sparse(self) -> bool:
        """True for the two block-sparse variants."""
        return self.variant in BLOCK_SPARSE_VARIANTS

    @property
    def effective_head_dim(self) -> int:
        """Per-head width actually used: ``embed_dim // heads`` for modules, else ``head_dim``."""
        return self.embed_dim // self.heads if self.is_module else self.head_dim

    def label(self) -> str:
        """Short human-readable name, e.g. ``jax improved n=8192``."""
        return f"{self.framework} {self.variant} n={self.seq_len}"

    def to_json(self) -> str:
        """Serialise for the worker subprocess (inverse of :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        """Rebuild a case from :meth:`to_json` output."""
        data = json.loads(text)
        data["segment_lengths"] = tuple(data["segment_lengths"])
        data["dilation_rates"] = tuple(data["dilation_rates"])
        return cls(**data)


@dataclasses.dataclass
class Measurement:
    """What a worker reports for one case (times in ms, memory in MB = 2**20 bytes).

    ``wall_s`` and ``cpu_s`` are the whole subprocess's wall-clock and CPU seconds (imports,
    compilation and all calls included), filled in by the parent: the cost of the case in a run.
    """

    status: str
    time_ms: float | None = None
    memory_mb: float | None = None
    density: float | None = None
    error: str = ""
    device_name: str = ""
    wall_s: float | None = None
    cpu_s: float | None = None

    @classmethod
    def failure(cls, error: str) -> "Measurement":
        """A ✗ measurement carrying ``error``."""
        return cls(status=FAILED, error=error)


def make_row(case: Case, m: Measurement, section: str = "main") -> dict[str, Any]:
    """Flatten a case and its measurement into one results row (the ``results.json`` object).

    Derived fields: ``throughput_tok_s = batch * seq_len / time`` and ``gflops`` = useful FLOPs
    (:func:`benchmarks.flops.useful_flops`) per second / 1e9.
    """
    ok = m.status == OK and m.time_ms is not None
    seconds = m.time_ms / 1e3 if ok else None
    flops = useful_flops(case, m.density) if ok else None
    return {
        "variant": case.variant,
        "framework": case.framework,
        "device": case.device,
        "dtype": case.dtype,
        "batch": case.batch,
        "seq_len": case.seq_len,
        "heads": case.heads,
        "head_dim": case.effective_head_dim,
        "segment_lengths": list(case.segment_lengths),
        "dilation_rates": list(case.dilation_rates),
        "time_ms": m.time_ms if ok else None,
        "memory_mb": m.memory_mb if ok else None,
        "throughput_tok_s": case.batch * case.seq_len / seconds if ok else None,
        "gflops": flops / seconds / 1e9 if (ok and flops is not None) else None,
        "status": m.status,
        "error": m.error,
        # extras
        "density": m.density,
        "causal": case.causal,
        "backward": case.backward,
        "embed_dim": case.embed_dim if case.is_module else None,
        "block_size": case.block_size if case.is_block_sparse else None,
        "sparsity_ratio": case.sparsity_ratio if case.is_block_sparse else None,
        "repeats": case.repeats,
        "section": section,
        "device_name": m.device_name,
        "wall_s": m.wall_s,
        "cpu_s": m.cpu_s,
    }
