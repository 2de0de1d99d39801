"""Builders that turn a :class:`~benchmarks.case.Case` into a ready-to-time step, in either framework.

``build(case)`` creates random inputs on the case's device, looks the variant's callable up in
``jax_dilated`` or ``torch_ref`` *at call time* (a name another issue has not delivered yet raises
:class:`NotImplementedYet`), and returns a :class:`Built` whose ``step()`` runs the computation once:
the forward pass, or forward + backward with ``case.backward`` (gradients w.r.t. ``q, k, v`` for
functions and w.r.t. the parameters for modules). JAX steps are jitted; a module is split into its
parameters and the rest so that one ``jax.jit`` covers the whole call. Torch modules run in eval mode,
and forward-only steps under ``torch.no_grad()``.

Only the framework of the case is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import numpy as np

from benchmarks.case import Case

PACKAGES = {"jax": "jax_dilated", "torch": "torch_ref"}
#: The public name each variant resolves to (the same in both packages; ``dense`` uses the framework's own).
API_NAMES: dict[str, str] = {
    "standard": "dilated_attention",
    "improved": "improved_dilated_attention",
    "multihead_standard": "MultiheadDilatedAttention",
    "multihead_improved": "ImprovedMultiheadDilatedAttention",
    "ring_v2_collective": "ring_dilated_attention",
    "block_sparse": "block_sparse_attention",
    "block_sparse_multihead": "BlockSparseMultiheadDilatedAttention",
}
PATTERN = "dilated_sparse"


class NotImplementedYet(Exception):
    """The variant's public name does not exist (yet) in the framework's package."""


@dataclasses.dataclass
class Built:
    """A case ready to time.

    Attributes:
      step: runs the computation once on fixed inputs and returns its outputs (possibly unfinished).
      sync: blocks until the outputs of ``step`` are computed (device synchronisation).
      density: realised block density for block-sparse variants, else None.
      device_name: human-readable name of the accelerator the case runs on ("" on CPU).
    """

    step: Callable[[], Any]
    sync: Callable[[Any], None]
    density: float | None
    device_name: str


def resolve(framework: str, name: str) -> Any:
    """``getattr(package, name)`` for the framework's package, or raise :class:`NotImplementedYet`."""
    package = importlib.import_module(PACKAGES[framework])
    obj = getattr(package, name, None)
    if obj is None:
        raise NotImplementedYet(f"not implemented yet: {PACKAGES[framework]}.{name} does not exist")
    return obj


def _density(case: Case) -> float | None:
    if not case.is_block_sparse:
        return None
    layout = resolve(case.framework, "block_layout")(case.seq_len, case.block_size, PATTERN, case.sparsity_ratio,
                                                      1, case.causal)
    return float(np.asarray(layout, dtype=np.float64).mean())


def _function_kwargs(case: Case) -> dict[str, Any]:
    """Keyword arguments of the core function of ``case`` (besides q, k, v)."""
    if case.variant == "block_sparse":
        return dict(block_size=case.block_size, pattern=PATTERN, sparsity_ratio=case.sparsity_ratio,
                    is_causal=case.causal)
    kw = dict(segment_lengths=case.segment_lengths, dilation_rates=case.dilation_rates, is_causal=case.causal)
    if case.variant == "ring_v2_collective":
        kw["mesh" if case.framework == "jax" else "group"] = None  # one device, as in the seed
    return kw


def _module_args(case: Case) -> tuple[tuple, dict[str, Any]]:
    """Constructor arguments (besides ``rngs`` and dtypes) of the module of ``case``."""
    if case.variant == "block_sparse_multihead":
        return (case.embed_dim, case.heads), dict(block_size=case.block_size, pattern=PATTERN,
                                                  sparsity_ratio=case.sparsity_ratio)
    return (case.embed_dim, case.heads, case.segment_lengths, case.dilation_rates), {}


# ----------------------------------------------------------------------------------------------
# JAX


def _build_jax(case: Case) -> Built:
    import jax
    import jax.numpy as jnp

    if case.dtype == "float64":
        jax.config.update("jax_enable_x64", True)  # this worker process only
    dtype = jnp.dtype(case.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    device = jax.devices()[0]

    if case.is_module:
        from flax import nnx

        cls = resolve("jax", API_NAMES[case.variant])
        args, kw = _module_args(case)
        model = cls(*args, **kw, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x = jax.random.normal(keys[0], (case.batch, case.seq_len, case.embed_dim), dtype)

        def forward(p, x):
            return nnx.merge(graphdef, p, rest)(x, is_causal=case.causal)

        if case.backward:
            fn = jax.jit(jax.grad(lambda p, x: forward(p, x).astype(jnp.float32).sum()))
        else:
            fn = jax.jit(forward)
        inputs = (params, x)
    else:
        shape = (case.batch, case.seq_len, case.heads, case.head_dim)
        inputs = tuple(jax.random.normal(key, shape, dtype) for key in keys[:3])
        if case.variant == "dense":
            core = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=case.causal,
                                                                  implementation="xla")
        else:
            attention = resolve("jax", API_NAMES[case.variant])
            kw = _function_kwargs(case)
            core = lambda q, k, v: attention(q, k, v, **kw)
        if case.backward:
            fn = jax.jit(jax.grad(lambda q, k, v: core(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        else:
            fn = jax.jit(core)
    density = _density(case)
    jax.block_until_ready(inputs)
    return Built(step=lambda: fn(*inputs), sync=jax.block_until_ready, density=density,
                 device_name="" if device.platform == "cpu" else f"{device.platform}: {device.device_kind}")


# ----------------------------------------------------------------------------------------------
# torch


def _build_torch(case: Case) -> Built:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, case.dtype)
    device = torch.device("cuda" if case.device == "gpu" else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    if case.is_module:
        cls = resolve("torch", API_NAMES[case.variant])
        args, kw = _module_args(case)
        model = cls(*args, **kw).to(device=device, dtype=dtype).eval()
        x = randn(case.batch, case.seq_len, case.embed_dim)
        params = [p for p in model.parameters() if p.requires_grad]
        inputs, wrt = (x,), params
        call = lambda x: model(x, is_causal=case.causal)
    else:
        if case.variant == "dense":  # SDPA's native layout (b, h, n, d)
            shape = (case.batch, case.heads, case.seq_len, case.head_dim)
            call = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
        else:
            shape = (case.batch, case.seq_len, case.heads, case.head_dim)
            attention = resolve("torch", API_NAMES[case.variant])
            kw = _function_kwargs(case)
            call = lambda q, k, v: attention(q, k, v, **kw)
        inputs = tuple(randn(*shape).requires_grad_(case.backward) for _ in range(3))
        wrt = list(inputs)

    if case.backward:
        def step():
            out = call(*inputs)
            return torch.autograd.grad(out.float().sum(), wrt)
    else:
        def step():
            with torch.no_grad():
                return call(*inputs)

    if device.type == "cuda":
        sync = lambda _out: torch.cuda.synchronize()
        name = f"cuda: {torch.cuda.get_device_name(device)}"
    else:
        sync = lambda _out: None  # CPU kernels run synchronously
        name = ""
    return Built(step=step, sync=sync, density=_density(case), device_name=name)


def build(case: Case) -> Built:
    """Inputs, callable and synchronisation for ``case`` (imports only ``case.framework``)."""
    if case.framework == "jax":
        return _build_jax(case)
    if case.framework == "torch":
        return _build_torch(case)
    raise ValueError(f"framework={case.framework!r} is unknown; use 'jax' or 'torch'.")
