"""Result rows: one flat ``dict`` per (case, measurement, section), the objects of ``results.json``.

:func:`make_row` builds them, :func:`load_rows` reads a ``results.json`` back (including files
written before ``status`` held plain strings, whose glyph statuses it translates).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.case import Case, FailureKind, Measurement, Status
from benchmarks.variants import VARIANTS, Kind, label

Row = dict[str, Any]

#: The fields of a row, in order (also the columns of results.csv).
FIELDS: tuple[str, ...] = (
    "variant", "label", "framework", "device", "dtype", "batch", "seq_len", "heads", "head_dim",
    "segment_lengths", "dilation_rates", "causal", "backward", "mode", "devices",
    "num_kv_heads", "documents", "position", "steps", "merge",
    "time_ms", "times_ms", "memory_mb", "throughput_tok_s", "gflops", "status", "failure", "error",
    "density", "embed_dim", "block_size", "sparsity_ratio", "repeats", "section", "device_name", "software",
    "xla_device_mb", "xla_temp_mb", "collectives", "comm_mb", "kv_mb", "wall_s", "cpu_s",
)


def make_row(case: Case, m: Measurement, section: str) -> Row:
    """Flatten a case and its measurement into one results row.

    Derived fields: ``throughput_tok_s = batch * seq_len / time`` (attention rows; ``batch / time``
    for a decode step, which adds one token per row) and ``gflops`` =
    useful FLOPs (:meth:`benchmarks.variants.Variant.useful_flops`) per second / 1e9. ``status`` and
    ``failure`` are the plain strings of :class:`~benchmarks.case.Status` / :class:`FailureKind`.
    """
    variant = VARIANTS[case.variant]
    ok = m.status is Status.OK and m.time_ms is not None
    seconds = m.time_ms / 1e3 if m.status is Status.OK and m.time_ms is not None else 0.0  # used only when ok
    useful = variant.useful_flops(case, m.density) if ok else None
    tokens = case.batch * (1 if variant.kind is Kind.DECODE else case.seq_len)
    row: Row = {
        "variant": case.variant,
        "label": label(case),
        "framework": case.framework,
        "device": case.device,
        "dtype": case.dtype,
        "batch": case.batch,
        "seq_len": case.seq_len,
        "heads": case.heads,
        "head_dim": variant.head_dim(case),
        "segment_lengths": list(case.segment_lengths),
        "dilation_rates": list(case.dilation_rates),
        "causal": case.causal,
        "backward": case.backward,
        "mode": case.mode,
        "devices": case.devices,
        "num_kv_heads": case.num_kv_heads,
        "documents": case.documents,
        "position": case.position if variant.kind is Kind.DECODE else None,
        "steps": case.steps,
        "merge": case.merge,
        "time_ms": m.time_ms if ok else None,
        "times_ms": list(m.times_ms) if ok else [],
        "memory_mb": m.memory_mb if ok else None,
        "throughput_tok_s": tokens / seconds if ok and variant.kind is not Kind.PEAK else None,
        "gflops": useful / seconds / 1e9 if (ok and useful is not None) else None,
        "status": str(m.status),
        "failure": None if m.failure is None else str(m.failure),
        "error": m.error,
        "density": m.density,
        "embed_dim": case.embed_dim if variant.kind is Kind.MODULE else None,
        "block_size": case.block_size if variant.block_sparse else None,
        "sparsity_ratio": case.sparsity_ratio if variant.block_sparse else None,
        "repeats": len(m.times_ms) if ok else case.repeats,
        "section": section,
        "device_name": m.device_name,
        "software": m.software,
        "xla_device_mb": m.xla.get("device_mb"),
        "xla_temp_mb": m.xla.get("temp_mb"),
        "collectives": m.xla.get("collectives"),
        "comm_mb": m.xla.get("comm_mb"),
        "kv_mb": m.kv_mb if ok else None,
        "wall_s": m.wall_s,
        "cpu_s": m.cpu_s,
    }
    assert tuple(row) == FIELDS
    return row


#: Status values of results files written before the Status enum (the seed table's glyphs).
_LEGACY_STATUS = {"✓": Status.OK, "✗": Status.FAILED}


def normalise(row: Row) -> Row:
    """``row`` with every field of :data:`FIELDS`: missing ones get their neutral value (None, [],
    the registry label, the mode from causal/backward), glyph statuses become ``ok``/``failed``."""
    out = dict(row)
    status = out.get("status")
    if status in _LEGACY_STATUS:
        out["status"] = str(_LEGACY_STATUS[status])
        if out["status"] == Status.FAILED and not out.get("failure"):
            out["failure"] = str(FailureKind.ERROR)
    out.setdefault("causal", False)
    out.setdefault("backward", False)
    out.setdefault("devices", 1)
    out.setdefault("documents", 0)
    out.setdefault("merge", "head_partition")
    out.setdefault("steps", 1)
    out.setdefault("times_ms", [])
    out.setdefault("mode", Case(out["variant"], out["framework"], causal=out["causal"], backward=out["backward"]).mode)
    if "label" not in out:
        known = out["variant"] in VARIANTS
        out["label"] = label(Case(out["variant"], out["framework"], seq_len=out["seq_len"],
                                  devices=out["devices"])) if known else out["variant"]
    for name in FIELDS:
        out.setdefault(name, None)
    return out


def load_rows(path: Path) -> list[Row]:
    """The rows of a ``results.json`` file, normalised (:func:`normalise`)."""
    return [normalise(r) for r in json.loads(Path(path).read_text(encoding="utf-8"))]
