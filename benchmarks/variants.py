"""The registry: what each variant name measures, and how it is built in each framework.

:data:`VARIANTS` maps a name to a :class:`Variant`: its label (what the row measures), its kind,
whether the seed package measured it, its useful FLOPs (:mod:`benchmarks.flops`) and one builder per
framework. A builder takes a :class:`~benchmarks.case.Case` and returns a :class:`Built`: random
inputs on the case's device and a ``step()`` that runs the computation once, the forward pass or,
with ``case.backward``, forward + backward (gradients w.r.t. ``q, k, v`` for functions and w.r.t.
the parameters for modules).

JAX steps are compiled ahead of the warm-up (``jax.jit(f).lower(*inputs).compile()``), so the
runner can read the compiled program's memory analysis and HLO; a module is split into its
parameters and the rest so that one compiled program covers the whole call. Torch modules run in
eval mode, forward-only steps under ``torch.no_grad()``.

Every builder imports its framework (and ``jax_dilated`` or ``torch_ref``) itself, inside the
function: the worker subprocess of a case imports only that case's framework.

Shapes of real models (``case.num_kv_heads``, an odd ``seq_len``, ``case.documents``) reach the
attention functions through the same builders: ``k, v`` get ``num_kv_heads`` heads, and packed
documents pass ``document_ids`` (an argument of the compiled JAX program, as in training). The
``decode`` variant times one step of ``dilated_attention_decode`` against a cache of ``seq_len``
positions at index ``case.position``.

Rows planned for later (:data:`PLANNED`) are listed below the registry; the report prints them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

from benchmarks import flops
from benchmarks.case import Case

#: The block-sparse pattern every block-sparse case uses.
PATTERN = "dilated_sparse"


class Kind(enum.StrEnum):
    """What a variant takes and how its row is read."""

    ATTENTION = "attention"  # a function of q, k, v of shape (b, n, h, d)
    MODULE = "module"        # a multi-head module called on x of shape (b, n, E)
    BASELINE = "baseline"    # the framework's own dense attention
    PEAK = "peak"            # a plain matmul: the machine's attainable FLOP/s, not attention
    DECODE = "decode"        # one decode step (a new token) against a key/value cache


@dataclasses.dataclass
class Built:
    """A case ready to time.

    Attributes:
      step: runs the computation once on fixed inputs and returns its outputs (possibly unfinished).
      sync: blocks until the outputs of ``step`` are computed (device synchronisation).
      density: realised block density for block-sparse variants, else None.
      device_name: the device the case runs on, e.g. ``cuda: NVIDIA H200`` ("" on CPU).
      software: framework and version, e.g. ``jax 0.10.2``.
      compiled: the compiled JAX program (``jax.stages.Compiled``) that ``step`` calls; None for torch.
      kv_mb: MiB that ``k`` and ``v`` take, with their gradients under ``case.backward`` (attention
        functions only, else None). JAX: read from the compiled program (``memory_analysis()``:
        argument bytes minus ``q`` and ``document_ids``, plus output bytes minus ``dq`` for
        forward+backward); torch: the bytes of the ``k, v`` tensors, twice that with gradients
        (a gradient has its tensor's shape).
    """

    step: Callable[[], Any]
    sync: Callable[[Any], None]
    density: float | None = None
    device_name: str = ""
    software: str = ""
    compiled: Any = None
    kv_mb: float | None = None


Builder = Callable[[Case], Built]
Flops = Callable[[Case, float | None], float | None]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One registered variant.

    Attributes:
      name: the key used on the command line, in ``results.json`` and in the seed table.
      describe: the row label for a case, naming what it measures (``ring_v2_collective (1 device =
        improved)``).
      kind: see :class:`Kind`.
      build_jax, build_torch: the builders (see the module doc).
      forward_flops: useful forward FLOPs of a case, given the realised block density (or None).
      seed: the seed package's benchmark table has this variant.
      block_sparse: the row has a block density.
    """

    name: str
    describe: Callable[[Case], str]
    kind: Kind
    build_jax: Builder
    build_torch: Builder
    forward_flops: Flops
    seed: bool = False
    block_sparse: bool = False

    def build(self, case: Case) -> Built:
        """The builder of ``case.framework`` applied to ``case``."""
        if case.framework == "jax":
            return self.build_jax(case)
        if case.framework == "torch":
            return self.build_torch(case)
        raise ValueError(f"framework={case.framework!r} is unknown; use 'jax' or 'torch'.")

    def head_dim(self, case: Case) -> int:
        """Per-head width actually used: ``embed_dim // heads`` for modules, else ``head_dim``."""
        return case.embed_dim // case.heads if self.kind is Kind.MODULE else case.head_dim

    def useful_flops(self, case: Case, density: float | None = None) -> float | None:
        """Useful FLOPs of one step of ``case`` (forward, or forward + backward); None when unknown."""
        forward = self.forward_flops(case, density)
        return None if forward is None else flops.with_backward(forward, case.backward)


# ----------------------------------------------------------------------------------------------
# shared pieces


MIB = 2.0**20


def _dilated_kw(case: Case) -> dict[str, Any]:
    return dict(segment_lengths=case.segment_lengths, dilation_rates=case.dilation_rates, is_causal=case.causal,
                merge=case.merge)


def _block_kw(case: Case) -> dict[str, Any]:
    return dict(block_size=case.block_size, pattern=PATTERN, sparsity_ratio=case.sparsity_ratio)


def _density(block_layout: Callable[..., Any], case: Case) -> float:
    """Fraction of kept blocks of the case's layout, from the framework's own ``block_layout``."""
    import numpy as np

    layout = block_layout(case.seq_len, case.block_size, PATTERN, case.sparsity_ratio, 1, case.causal)
    return float(np.asarray(layout, dtype=np.float64).mean())


def _document_ids(case: Case):
    """``(batch, seq_len)`` int32 ids of ``case.documents`` equal runs per row: ``p * documents // n``
    (``p // 2048`` for 4 documents in 8192 positions)."""
    import numpy as np

    ids = np.arange(case.seq_len, dtype=np.int64) * case.documents // case.seq_len
    return np.broadcast_to(ids.astype(np.int32), (case.batch, case.seq_len)).copy()


def _no_documents(case: Case) -> None:
    if case.documents:
        raise ValueError(f"documents={case.documents}: only the standard and improved functions take document_ids "
                         f"here, not {case.variant}.")


def _one_device(case: Case) -> None:
    if case.devices != 1:
        raise ValueError(f"devices={case.devices}: only the JAX ring variant shards over several devices; "
                         f"use devices=1 for {case.framework} {case.variant}.")


# ----------------------------------------------------------------------------------------------
# JAX


def _jax_compile(case: Case, fn: Callable[..., Any], inputs: tuple, density: float | None = None) -> Built:
    """Compile ``fn`` for ``inputs`` (its gradient with ``case.backward`` is already in ``fn``)."""
    import jax

    compiled = jax.jit(fn).lower(*inputs).compile()
    jax.block_until_ready(inputs)
    device = jax.devices()[0]
    return Built(step=lambda: compiled(*inputs), sync=jax.block_until_ready, density=density,
                 device_name="" if device.platform == "cpu" else f"{device.platform}: {device.device_kind}",
                 software=f"jax {jax.__version__}", compiled=compiled)


def _jax_dtype(case: Case):
    import jax
    import jax.numpy as jnp

    if case.dtype == "float64":
        jax.config.update("jax_enable_x64", True)  # this worker process only
    return jnp.dtype(case.dtype)


def _jax_qkv(case: Case, attention: Callable[..., Any], sharding: Any = None,
             density: float | None = None, documents: bool = False) -> Built:
    """A step of ``attention(q, k, v)`` on random inputs (placed with ``sharding``): ``q`` ``(b, n, h, d)``,
    ``k, v`` ``(b, n, h_kv, d)``; with ``case.documents`` (only where ``documents``) also
    ``attention(..., document_ids=ids)``, the ids an argument of the program."""
    import jax
    import jax.numpy as jnp

    if not documents:
        _no_documents(case)
    dtype = _jax_dtype(case)
    b, n, d = case.batch, case.seq_len, case.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, n, case.heads, d), dtype)
    k, v = [jax.random.normal(key, (b, n, case.kv_heads, d), dtype) for key in keys[1:]]
    inputs: tuple = (q, k, v)
    if sharding is not None:
        inputs = tuple(jax.device_put(x, sharding) for x in inputs)
    if case.documents:
        inputs += (jnp.asarray(_document_ids(case)),)
        call = lambda q, k, v, ids: attention(q, k, v, document_ids=ids)
    else:
        call = attention
    if case.backward:
        fn = jax.grad(lambda q, k, v, *ids: call(q, k, v, *ids).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    else:
        fn = call
    built = _jax_compile(case, fn, inputs, density)
    analysis = built.compiled.memory_analysis() if sharding is None else None  # per device when sharded
    if analysis is not None:
        q_bytes = q.size * q.dtype.itemsize
        other = q_bytes + sum(x.size * x.dtype.itemsize for x in inputs[3:])
        kv = analysis.argument_size_in_bytes - other
        if case.backward:
            kv += analysis.output_size_in_bytes - q_bytes
        built.kv_mb = kv / MIB
    return built


def _jax_module(case: Case, make: Callable[..., Any], density: float | None = None) -> Built:
    """A step of the NNX module ``make(dtype=, param_dtype=, rngs=)`` called on random ``(b, n, E)`` input."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    _no_documents(case)
    dtype = _jax_dtype(case)
    model = make(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    x = jax.random.normal(jax.random.key(0), (case.batch, case.seq_len, case.embed_dim), dtype)

    def forward(p, x):
        return nnx.merge(graphdef, p, rest)(x, is_causal=case.causal)

    fn = jax.grad(lambda p, x: forward(p, x).astype(jnp.float32).sum()) if case.backward else forward
    return _jax_compile(case, fn, (params, x), density)


def jax_standard(case: Case) -> Built:
    import jax_dilated as jd

    _one_device(case)
    kw = _dilated_kw(case)
    return _jax_qkv(case, lambda q, k, v, **extra: jd.dilated_attention(q, k, v, **kw, **extra), documents=True)


def jax_improved(case: Case) -> Built:
    import jax_dilated as jd

    _one_device(case)
    kw = _dilated_kw(case)
    return _jax_qkv(case, lambda q, k, v, **extra: jd.improved_dilated_attention(q, k, v, **kw, **extra),
                    documents=True)


def jax_ring(case: Case) -> Built:
    """``ring_dilated_attention``: ``mesh=None`` with one device (the seed's setting, which runs the
    improved program), else the sequence sharded over a ``("seq",)`` mesh of ``case.devices``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    import jax_dilated as jd

    mesh = sharding = None
    if case.devices > 1:
        if jax.device_count() < case.devices:
            raise ValueError(f"devices={case.devices} but JAX sees {jax.device_count()} device(s)")
        mesh = jax.make_mesh((case.devices,), ("seq",), devices=jax.devices()[:case.devices])
        sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
    kw = _dilated_kw(case)
    return _jax_qkv(case, lambda q, k, v: jd.ring_dilated_attention(q, k, v, mesh=mesh, axis_name="seq", **kw),
                    sharding)


def jax_block_sparse(case: Case) -> Built:
    import jax_dilated as jd

    _one_device(case)
    kw = _block_kw(case)
    return _jax_qkv(case, lambda q, k, v: jd.block_sparse_attention(q, k, v, is_causal=case.causal, **kw),
                    density=_density(jd.block_layout, case))


def jax_multihead_standard(case: Case) -> Built:
    import jax_dilated as jd

    _one_device(case)
    return _jax_module(case, lambda **kw: jd.MultiheadDilatedAttention(
        case.embed_dim, case.heads, case.segment_lengths, case.dilation_rates, **kw))


def jax_multihead_improved(case: Case) -> Built:
    import jax_dilated as jd

    _one_device(case)
    return _jax_module(case, lambda **kw: jd.ImprovedMultiheadDilatedAttention(
        case.embed_dim, case.heads, case.segment_lengths, case.dilation_rates, **kw))


def jax_block_sparse_multihead(case: Case) -> Built:
    import jax_dilated as jd

    _one_device(case)
    return _jax_module(case, lambda **kw: jd.BlockSparseMultiheadDilatedAttention(
        case.embed_dim, case.heads, **_block_kw(case), **kw), density=_density(jd.block_layout, case))


def jax_dense(case: Case) -> Built:
    import jax

    _one_device(case)
    return _jax_qkv(case, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=case.causal,
                                                                        implementation="xla"))


def jax_matmul(case: Case) -> Built:
    import jax

    _one_device(case)
    dtype = _jax_dtype(case)
    a, b = [jax.random.normal(key, (case.seq_len, case.seq_len), dtype) for key in jax.random.split(jax.random.key(0))]
    return _jax_compile(case, lambda a, b: a @ b, (a, b))


def jax_decode(case: Case) -> Built:
    """One step of ``dilated_attention_decode`` at index ``case.position`` of a random cache of
    ``case.seq_len`` positions: compiled once with the index as an argument and the two cache
    arguments donated (XLA writes the new row in place); each step feeds the returned cache back."""
    import jax
    import jax.numpy as jnp

    import jax_dilated as jd

    _one_device(case)
    _no_documents(case)
    dtype = _jax_dtype(case)
    b, h, hkv, d = case.batch, case.heads, case.kv_heads, case.head_dim
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (b, 1, h, d), dtype)
    k, v = [jax.random.normal(key, (b, 1, hkv, d), dtype) for key in keys[1:3]]
    cache = [jax.random.normal(key, (b, case.seq_len, hkv, d), dtype) for key in keys[3:]]
    index = jnp.asarray(case.position, jnp.int32)

    def decode(q, k, v, cached_key, cached_value, index):
        return jd.dilated_attention_decode(q, k, v, cached_key, cached_value, index,
                                           segment_lengths=case.segment_lengths, dilation_rates=case.dilation_rates)

    compiled = jax.jit(decode, donate_argnums=(3, 4)).lower(q, k, v, *cache, index).compile()
    jax.block_until_ready(cache)

    def step():
        out, cache[0], cache[1] = compiled(q, k, v, cache[0], cache[1], index)
        return out

    device = jax.devices()[0]
    return Built(step=step, sync=lambda out: jax.block_until_ready((out, cache)),
                 device_name="" if device.platform == "cpu" else f"{device.platform}: {device.device_kind}",
                 software=f"jax {jax.__version__}", compiled=compiled)


# ----------------------------------------------------------------------------------------------
# torch


def _torch_randn(case: Case):
    """``randn(*shape)`` on the case's device and dtype, from a fixed CPU generator."""
    import torch

    device = torch.device("cuda" if case.device == "gpu" else "cpu")
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _torch_step(case: Case, call: Callable[..., Any], inputs: tuple, wrt: list,
                density: float | None = None) -> Built:
    """A step of ``call(*inputs)``; with ``case.backward`` the gradients of its sum w.r.t. ``wrt``."""
    import torch

    _one_device(case)
    if case.backward:
        def step():
            return torch.autograd.grad(call(*inputs).float().sum(), wrt)
    else:
        def step():
            with torch.no_grad():
                return call(*inputs)

    if case.device == "gpu":
        sync = lambda _out: torch.cuda.synchronize()
        name = f"cuda: {torch.cuda.get_device_name()}"
    else:
        sync = lambda _out: None  # CPU kernels run synchronously
        name = ""
    return Built(step=step, sync=sync, density=density, device_name=name, software=f"torch {torch.__version__}")


def _torch_qkv(case: Case, attention: Callable[..., Any], density: float | None = None,
               layout: str = "bnhd", documents: bool = False) -> Built:
    """A step of ``attention(q, k, v)`` on random inputs, ``(b, n, h, d)`` or SDPA's ``(b, h, n, d)``
    (``k, v`` with ``h_kv`` heads); with ``case.documents`` (only where ``documents``) also
    ``attention(..., document_ids=ids)``."""
    import torch

    if not documents:
        _no_documents(case)
    randn = _torch_randn(case)
    b, n, h, d = case.batch, case.seq_len, case.heads, case.head_dim
    shapes = [(b, n, x, d) if layout == "bnhd" else (b, x, n, d) for x in (h, case.kv_heads, case.kv_heads)]
    inputs = tuple(randn(*shape).requires_grad_(case.backward) for shape in shapes)
    call = attention
    if case.documents:
        ids = torch.from_numpy(_document_ids(case)).to(inputs[0].device)
        call = lambda q, k, v: attention(q, k, v, document_ids=ids)
    built = _torch_step(case, call, inputs, list(inputs), density)
    kv = sum(x.numel() * x.element_size() for x in inputs[1:])
    built.kv_mb = kv * (2 if case.backward else 1) / MIB
    return built


def _torch_module(case: Case, model: Any, density: float | None = None) -> Built:
    """A step of the torch module ``model`` (moved to the case's device and dtype, eval mode) on ``(b, n, E)``."""
    import torch

    _no_documents(case)
    device = torch.device("cuda" if case.device == "gpu" else "cpu")
    model = model.to(device=device, dtype=getattr(torch, case.dtype)).eval()
    x = _torch_randn(case)(case.batch, case.seq_len, case.embed_dim)
    params = [p for p in model.parameters() if p.requires_grad]
    return _torch_step(case, lambda x: model(x, is_causal=case.causal), (x,), params, density)


def torch_standard(case: Case) -> Built:
    import torch_ref as tr

    kw = _dilated_kw(case)
    return _torch_qkv(case, lambda q, k, v, **extra: tr.dilated_attention(q, k, v, **kw, **extra), documents=True)


def torch_improved(case: Case) -> Built:
    import torch_ref as tr

    kw = _dilated_kw(case)
    return _torch_qkv(case, lambda q, k, v, **extra: tr.improved_dilated_attention(q, k, v, **kw, **extra),
                      documents=True)


def torch_ring(case: Case) -> Built:
    """``ring_dilated_attention(group=None)``: one process, which runs the improved program."""
    import torch_ref as tr

    kw = _dilated_kw(case)
    return _torch_qkv(case, lambda q, k, v: tr.ring_dilated_attention(q, k, v, group=None, **kw))


def torch_block_sparse(case: Case) -> Built:
    import torch_ref as tr

    kw = _block_kw(case)
    return _torch_qkv(case, lambda q, k, v: tr.block_sparse_attention(q, k, v, is_causal=case.causal, **kw),
                      density=_density(tr.block_layout, case))


def torch_multihead_standard(case: Case) -> Built:
    import torch_ref as tr

    return _torch_module(case, tr.MultiheadDilatedAttention(case.embed_dim, case.heads, case.segment_lengths,
                                                            case.dilation_rates))


def torch_multihead_improved(case: Case) -> Built:
    import torch_ref as tr

    return _torch_module(case, tr.ImprovedMultiheadDilatedAttention(case.embed_dim, case.heads, case.segment_lengths,
                                                                    case.dilation_rates))


def torch_block_sparse_multihead(case: Case) -> Built:
    import torch_ref as tr

    return _torch_module(case, tr.BlockSparseMultiheadDilatedAttention(case.embed_dim, case.heads, **_block_kw(case)),
                         density=_density(tr.block_layout, case))


def torch_dense(case: Case) -> Built:
    import torch.nn.functional as F

    return _torch_qkv(case, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal),
                      layout="bhnd")


def torch_matmul(case: Case) -> Built:
    import torch

    randn = _torch_randn(case)
    a, b = randn(case.seq_len, case.seq_len), randn(case.seq_len, case.seq_len)
    return _torch_step(case, torch.matmul, (a, b), [])


def torch_decode(case: Case) -> Built:
    """One step of ``dilated_attention_decode`` at index ``case.position`` (a Python int) of a random
    cache of ``case.seq_len`` positions, under ``torch.no_grad()``; the cache is updated in place."""
    import torch_ref as tr

    _no_documents(case)
    randn = _torch_randn(case)
    b, h, hkv, d = case.batch, case.heads, case.kv_heads, case.head_dim
    q, k, v = randn(b, 1, h, d), randn(b, 1, hkv, d), randn(b, 1, hkv, d)
    cached_key, cached_value = randn(b, case.seq_len, hkv, d), randn(b, case.seq_len, hkv, d)

    def decode(q, k, v, cached_key, cached_value):
        return tr.dilated_attention_decode(q, k, v, cached_key, cached_value, case.position,
                                           segment_lengths=case.segment_lengths,
                                           dilation_rates=case.dilation_rates)[0]

    return _torch_step(case, decode, (q, k, v, cached_key, cached_value), [])


# ----------------------------------------------------------------------------------------------
# useful FLOPs per kind (see benchmarks.flops)


def _dilated_flops(case: Case, _density: float | None) -> float:
    """Dilated FLOPs; packed documents of length ``L = n / documents`` cut every segment to ``min(s, L)``
    (each document is attended alone)."""
    segments = case.segment_lengths
    if case.documents:
        segments = tuple(min(s, case.seq_len // case.documents) for s in segments)
    return flops.dilated_flops(case.batch, case.seq_len, case.heads, case.head_dim, segments,
                               case.dilation_rates, case.causal)


def _block_sparse_flops(case: Case, density: float | None) -> float | None:
    if density is None:
        return None
    return flops.block_sparse_flops(case.batch, case.seq_len, case.heads, case.head_dim, case.block_size, density,
                                    case.causal)


def _module(attention: Flops) -> Flops:
    """FLOPs of a module: its attention (at head width E / h) plus the four projections."""
    def count(case: Case, density: float | None) -> float | None:
        inner = attention(dataclasses.replace(case, head_dim=case.embed_dim // case.heads), density)
        return None if inner is None else inner + flops.projection_flops(case.batch, case.seq_len, case.embed_dim)
    return count


def _dense_flops(case: Case, _density: float | None) -> float:
    return flops.dense_flops(case.batch, case.seq_len, case.heads, case.head_dim, case.causal)


def _matmul_flops(case: Case, _density: float | None) -> float:
    return flops.matmul_flops(case.seq_len)


def _no_flops(_case: Case, _density: float | None) -> None:
    return None


def _named(name: str) -> Callable[[Case], str]:
    return lambda case: name


def _decode_label(case: Case) -> str:
    return f"decode step (cache {case.seq_len}, index {case.position})"


def _ring_label(case: Case) -> str:
    if case.devices == 1:
        return "ring_v2_collective (1 device = improved)"
    return f"ring_v2_collective ({case.devices} devices)"


# ----------------------------------------------------------------------------------------------
# the registry

_ALL = (
    Variant("standard", _named("standard"), Kind.ATTENTION, jax_standard, torch_standard, _dilated_flops, seed=True),
    Variant("improved", _named("improved"), Kind.ATTENTION, jax_improved, torch_improved, _dilated_flops, seed=True),
    Variant("multihead_standard", _named("multihead_standard"), Kind.MODULE, jax_multihead_standard,
            torch_multihead_standard, _module(_dilated_flops), seed=True),
    Variant("multihead_improved", _named("multihead_improved"), Kind.MODULE, jax_multihead_improved,
            torch_multihead_improved, _module(_dilated_flops), seed=True),
    Variant("ring_v2_collective", _ring_label, Kind.ATTENTION, jax_ring, torch_ring, _dilated_flops, seed=True),
    Variant("block_sparse", _named("block_sparse"), Kind.ATTENTION, jax_block_sparse, torch_block_sparse,
            _block_sparse_flops, seed=True, block_sparse=True),
    Variant("block_sparse_multihead", _named("block_sparse_multihead"), Kind.MODULE, jax_block_sparse_multihead,
            torch_block_sparse_multihead, _module(_block_sparse_flops), seed=True, block_sparse=True),
    Variant("dense", _named("dense (jax.nn.dot_product_attention / SDPA)"), Kind.BASELINE, jax_dense, torch_dense,
            _dense_flops),
    Variant("matmul", lambda case: f"matmul {case.seq_len}x{case.seq_len} (machine peak)", Kind.PEAK, jax_matmul,
            torch_matmul, _matmul_flops),
    Variant("decode", _decode_label, Kind.DECODE, jax_decode, torch_decode, _no_flops),
)

#: Every variant by name, in report order.
VARIANTS: dict[str, Variant] = {v.name: v for v in _ALL}
#: The variants of the main rows (``--variants``): everything but the peak matmul and the decode step.
REPORT_VARIANTS: tuple[str, ...] = tuple(name for name, v in VARIANTS.items()
                                         if v.kind not in (Kind.PEAK, Kind.DECODE))
#: The seed table's seven variants, in its order.
SEED_VARIANTS: tuple[str, ...] = tuple(name for name, v in VARIANTS.items() if v.seed)


@dataclasses.dataclass(frozen=True)
class Planned:
    """A row family the report will hold once the library supports it (printed under "Planned rows")."""

    name: str
    measures: str
    waits_for: str


#: The place for later rows. To add one: give Case the field it needs, register its builders above
#: (or a section in benchmarks.plan), and move the entry out of this list.
#: GQA, the odd length and decode left this list for the ``shapes`` and ``decode`` sections
#: (:mod:`benchmarks.plan`).
PLANNED: tuple[Planned, ...] = ()


def label(case: Case) -> str:
    """The row label of ``case``: what it measures (with its GQA heads and packed documents)."""
    text = VARIANTS[case.variant].describe(case)
    extra = ([f"h_kv={case.num_kv_heads}"] if case.num_kv_heads is not None else []) + (
        [f"{case.documents} packed documents"] if case.documents else [])
    return f"{text} ({', '.join(extra)})" if extra else text
