"""What packed documents cost the JAX ring: ``python -m benchmarks.ring_documents``.

Not part of ``make bench``. One process, ``P`` simulated CPU devices
(``--xla_force_host_platform_device_count``), the same inputs for both calls: the ring with and
without ``document_ids`` (random documents, mean length ``--doc-length``), forward, each jitted and
warmed up, then ``--repeats`` calls alternating which goes first. The simulated devices share the
cores, so a time is the work of all devices together, not a parallel step time; the ratio of the two
calls is what this measures. The same pair through ``improved_dilated_attention`` on one device
(unsharded inputs, in the same alternation) shows how much of it the packed layout costs anyway.
``temp MiB``: the temporaries of the per-device program (``compiled.memory_analysis()``). Writes
``ring_documents.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CONFIGS = {  # name: (segment_lengths, dilation_rates); n = 16384 over 8 devices gives chunks of 2048
    "local": ((1024, 2048), (1, 2)),
    "spanning": ((1024, 4096, 16384), (1, 2, 4)),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--doc-length", type=int, default=2000, help="mean document length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        parser.error("run as its own process: the device count is set before JAX is imported")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import jax_dilated as jd
    from benchmarks.runner import cpu_name

    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("seq",))
    seq = NamedSharding(mesh, PartitionSpec(None, "seq"))
    rng = np.random.default_rng(0)
    shape = (1, args.seq_len, args.heads, args.head_dim)
    q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal(shape), jnp.float32), seq) for _ in range(3))
    ids = np.cumsum(rng.random((1, args.seq_len)) < 1 / args.doc_length, axis=1).astype(np.int32)
    docs = jax.device_put(jnp.asarray(ids, jnp.int32), seq)
    host = tuple(jax.device_get(x) for x in (q, k, v))  # unsharded, for the one-device improved calls
    lines = [
        "# Ring dilated attention with packed documents (JAX)",
        "",
        f"`python -m benchmarks.ring_documents` on {cpu_name()}, jax {jax.__version__}, float32, batch 1, "
        f"n {args.seq_len}, {args.heads} heads, head_dim {args.head_dim}, P = {args.devices} simulated devices "
        f"(chunk {args.seq_len // args.devices}), {int(ids.max()) + 1} documents (mean length {args.doc_length}), "
        f"forward, median of {args.repeats} calls [min-max], calls alternated. Time is the work of all devices "
        "on shared cores; the ratio is the cost of `document_ids`.",
        "",
        "| config | segments | rates | causal | plain (ms) | documents (ms) | documents / plain | one device: "
        "documents / plain | temp MiB plain | temp MiB documents |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (segments, rates) in CONFIGS.items():
        for causal in (False, True):
            fns = {}
            for label, d in (("plain", None), ("documents", docs), ("one plain", None), ("one documents", ids)):
                one = label.startswith("one")

                def call(q, k, v, d=d, segments=segments, rates=rates, causal=causal, one=one):
                    kw = dict(segment_lengths=segments, dilation_rates=rates, is_causal=causal, document_ids=d)
                    if one:
                        return jd.improved_dilated_attention(q, k, v, **kw)
                    return jd.ring_dilated_attention(q, k, v, mesh=mesh, **kw)

                fns[label] = jax.jit(call)
                jax.block_until_ready(fns[label](*(host if label.startswith("one") else (q, k, v))))
            times: dict[str, list[float]] = {label: [] for label in fns}
            for r in range(args.repeats):
                for label in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                    t = time.perf_counter()
                    jax.block_until_ready(fns[label](*(host if label.startswith("one") else (q, k, v))))
                    times[label].append((time.perf_counter() - t) * 1e3)
            med = {label: statistics.median(t) for label, t in times.items()}
            temp = {label: fns[label].lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
                    for label in ("plain", "documents")}  # fmt: skip
            cell = {label: f"{med[label]:.0f} [{min(t):.0f}-{max(t):.0f}]" for label, t in times.items()}
            ratio, one = med["documents"] / med["plain"], med["one documents"] / med["one plain"]
            lines.append(f"| {name} | {segments} | {rates} | {causal} | {cell['plain']} | {cell['documents']} | "
                         f"{ratio:.2f} | {one:.2f} | {temp['plain']:.1f} | {temp['documents']:.1f} |")  # fmt: skip
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ring_documents.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
