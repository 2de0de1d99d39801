"""Which attention kernel serves a call: a pure rule, and a one-time probe on a real device.

:func:`candidates` and :func:`unsupported` are pure functions of a :class:`CallShape` (platform,
dtype, head_dim, causality, whether the log-sum-exp, a key mask or dropout is needed), tested as
tables with made-up device descriptions. :func:`probe` runs a backend once per call shape on a
tiny input on the real device (compile, run, compare with the XLA kernel, gradients included where
the backend supplies its own) and remembers the answer; a backend that fails is skipped from then on
with one warning that names the reason.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_dilated.kernels import cudnn, pallas, xla

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")
_HALF = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class CallShape:
    """What the choice of a kernel depends on.

    Attributes:
      platform: the JAX platform of the computation (``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``, ...).
      dtype: the name of the inputs' dtype (``"float32"``, ``"bfloat16"``, ...).
      head_dim: ``d``.
      is_causal: causal masking.
      need_lse: the caller merges by log-sum-exp (``merge="lse"``, ring hops, causal block-sparse).
      has_mask: a key mask (``kv_valid``) is given.
      dropout: dropout is on.
      has_ids: query/key ids (packed documents) restrict who sees whom.
    """

    platform: str
    dtype: str
    head_dim: int
    is_causal: bool = False
    need_lse: bool = True
    has_mask: bool = False
    dropout: bool = False
    has_ids: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.platform in ("gpu", "cuda")


def unsupported(name: str, call: CallShape) -> str | None:
    """None when backend ``name`` can serve ``call``, else a one-line reason."""
    if name == "xla":
        return None
    if call.dropout:
        return f"it has no dropout (the {name} kernel serves dropout_rate=0 only)"
    if call.has_ids:
        return f"it takes no packed-document ids (the {name} kernel serves calls without document_ids)"
    if name == "pallas":
        if not call.on_gpu and call.platform != "cpu":
            return f"it runs on NVIDIA GPUs (and interpreted on the CPU), not on {call.platform!r}"
        return pallas.supports(dtype=call.dtype, head_dim=call.head_dim, platform="gpu")
    if name == "cudnn":
        if not call.on_gpu:
            return f"cuDNN attention needs an NVIDIA GPU, not {call.platform!r}"
        if call.need_lse:
            return "cuDNN's log-sum-exp has no gradient, and this call merges by log-sum-exp"
        if call.has_mask:
            return "this call masks keys, which the cuDNN path here does not take"
        return cudnn.supports(dtype=call.dtype, head_dim=call.head_dim)
    raise ValueError(f"implementation={name!r} is unknown; use None or one of {IMPLEMENTATIONS}.")


def candidates(call: CallShape) -> tuple[str, ...]:
    """The backends to try for ``call``, best first (the last is always ``"xla"``).

    On a GPU: our Pallas kernel, then cuDNN where it applies (half precision, no log-sum-exp, no key
    mask), then XLA. Elsewhere (CPU: Pallas would only be interpreted; TPU: no kernel of ours): XLA.
    """
    if not call.on_gpu:
        return ("xla",)
    return tuple(name for name in ("pallas", "cudnn") if unsupported(name, call) is None) + ("xla",)


def _tiny_inputs(call: CallShape):
    rng = np.random.default_rng(0)
    b, m, h, hk, d = 1, 96, 2, 1, call.head_dim
    shapes = ((b, m, h, d), (b, m, hk, d), (b, m, hk, d))
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype=call.dtype) for s in shapes)
    valid = jnp.asarray(rng.random((b, m)) > 0.2).at[:, 0].set(True) if call.has_mask else None
    return q, k, v, valid


def _compare(name: str, call: CallShape) -> str | None:
    """Run backend ``name`` and the XLA kernel, jitted, on the same tiny input; None if they agree."""
    kernel = pallas.flash_attention if name == "pallas" else cudnn.attention
    tol = 2e-2 if call.dtype in _HALF else 1e-3
    q, k, v, valid = _tiny_inputs(call)

    def run(f):
        def out(q, k, v, valid):
            return f(q, k, v, scale=call.head_dim**-0.5, is_causal=call.is_causal, kv_valid=valid)[0]

        def loss(q, k, v, valid):
            return jnp.sum(out(q, k, v, valid).astype(jnp.float32) * jnp.arange(q.shape[-1]))

        both = jax.jit(lambda *a: (out(*a), jax.grad(loss)(*a)))(q, k, v, valid)
        return tuple(x.astype(jnp.float32) for x in both)

    (want, gwant), (got, ggot) = run(xla.flash_attention), run(kernel)
    err = float(jnp.max(jnp.abs(got - want))) / max(1.0, float(jnp.max(jnp.abs(want))))
    gerr = float(jnp.max(jnp.abs(ggot - gwant))) / max(1.0, float(jnp.max(jnp.abs(gwant))))
    if not err <= tol or not gerr <= 10 * tol:
        return f"it differs from the XLA kernel by {err:.2e} (gradient {gerr:.2e}) on the probe input"
    return None


@functools.cache
def probe(name: str, call: CallShape) -> str | None:
    """Run backend ``name`` once on a tiny input of ``call``'s kind; None if it matches XLA, else why not.

    Compares the output and the query gradient with the XLA kernel's at the dtype's tolerance. The
    probe runs in a thread of its own, so it executes even when reached while the caller is tracing
    (JAX's trace state is per thread). Remembered per (backend, call shape).
    """
    if name == "xla":
        return None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(_compare, name, call).result()
        except Exception as exc:  # a kernel that does not compile or run on this device is skipped
            return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def choose(call: CallShape) -> str:
    """The first of :func:`candidates` whose :func:`probe` passes (warning once for each that fails)."""
    for name in candidates(call):
        reason = probe(name, call)
        if reason is None:
            return name
        _warn_once(name, call, reason)
    return "xla"  # unreachable: the XLA kernel always passes


@functools.cache
def _warn_once(name: str, call: CallShape, reason: str) -> None:
    warnings.warn(
        f"jax_dilated: the {name} attention kernel is skipped for {call} on this device: {reason}. "
        f"Falling back to the next kernel; pass implementation='xla' to choose it yourself.",
        RuntimeWarning,
        stacklevel=4,
    )
