"""Flash attention with its log-sum-exp as Pallas kernels for the Triton backend (NVIDIA GPUs).

A drop-in for :func:`jax_dilated.kernels.xla.flash_attention` on GPUs (without dropout): the same
``(out, lse)`` results and the same exact gradients through both, computed by three
``pl.pallas_call`` kernels that never hold more than a few tiles of scores:

* **forward** (grid: query blocks x batch rows x query heads): one program owns ``block_q`` queries
  of one head, walks the key blocks with an online softmax (running row maximum ``m``, row sum
  ``l`` and the ``block_q x d`` float32 accumulator, all loop carries, i.e. registers) and writes
  ``out = acc / l`` and ``lse = ln 2 * (m + log2 l)``. Scores are kept in base 2: ``log2(e)`` is
  folded into the scale, so every exponential is one ``exp2`` and ``x * c - m`` is one FMA.
* **dK/dV** (grid: key blocks x batch rows x key/value heads): one program owns ``block_k_dkv`` keys
  of one key/value head and walks, for each of the ``g = h / h_kv`` query heads of that kv head in
  turn, the query blocks that can see them; it recomputes ``P^T = exp2(S^T c - lse_2)`` from the
  saved log-sum-exp and accumulates ``dV += P^T dO`` and ``dK += dS^T Q``. Summing over the query
  group inside the program is how grouped-query attention gets its dK/dV without ever repeating k/v.
* **dQ** (grid: query blocks x batch rows x query heads): the forward's walk again, accumulating
  ``dQ += dS K``.

``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O) - dLSE`` (plain jnp, before the kernels):
folding the log-sum-exp cotangent into ``delta`` makes the gradient through ``lse`` exact. The
custom VJP saves only ``q, k, v, out`` and ``lse``.

**Causal** (top-left: query ``p`` sees key ``p' <= p``): a query block's key loop stops at the last
key block that its last query can see, and the dK/dV loop starts at the first query block that can
see the key block: blocks wholly in the future are never loaded. Each walk is split in two loops,
the blocks that straddle the diagonal (masked element-wise) and the blocks wholly visible (no mask
work at all). Key padding (``kv_valid``) and the keys added to fill the last block are a float32
bias row (0 or ``-inf``) added to every score tile; it exists only when needed.

**Layout.** The kernels read ``q, k, v`` in their ``(B, m, h, d)`` layout (the head axis is squeezed
out by the BlockSpecs, so no transposes are made); query head ``j`` reads kv head ``j // g`` through
the index map. The wrapper pads ``m`` and ``mk`` to whole blocks and ``head_dim`` to a power of two
(zeros: they change no score and add zero output columns) and slices the results.

**Block sizes** (defaults of :class:`PallasConfig`, chosen as a FlashAttention-2 kernel would be on
Hopper for bf16 at head_dim 64 and 128). Nobody could time them here; what was checked is that the
kernels' Triton IR, compiled for sm_90a by Triton 3.9 and ptxas, uses wgmma for every product and the
registers and shared memory noted below (bf16, head_dim 128 / 64):

* forward ``128 x 64`` (queries per program x keys per step), 8 warps, 3 stages: 128 query rows give
  each K/V tile 128 rows of reuse and two warpgroups of 64 rows (the M of one wgmma); ``B h m / 128``
  programs fill the 132 SMs many times over at 128k tokens. 64-key steps keep the float32 score tile
  and the ``128 x d`` accumulator in registers (204 / 125 a thread, no spills) and let 3 stages of K
  and V sit beside Q in shared memory (128 KiB / 64 KiB). A ``128 x 128`` tile at d = 128 needed 254
  registers and 160 KiB at 2 stages, and 4 warps spilled.
* dK/dV ``32 x 128`` (queries per step x keys per program), 8 warps, 2 stages: a program keeps two
  ``128 x d`` float32 accumulators plus K and V, so it streams short query tiles (as the Triton
  tutorial's Hopper kernel does). ``64 x 128`` spilled 240 bytes at d = 128; ``32 x 128`` uses 255
  registers with 12 bytes of spill (163 and none at d = 64) and 96 KiB / 48 KiB.
* dQ ``128 x 64``, 8 warps, 2 stages: the mirror of the forward with one more score tile (dP) live
  (177 / 123 registers, no spills, 128 KiB / 64 KiB).

``num_warps=None`` gives 8 warps to 128-row programs and to head_dim > 128, else 4. Block sizes are
upper bounds: the wrapper shrinks them for short sequences (to the next power of two >= 16), caps a
program's own block at 64 rows for head_dim > 128, and lowers ``num_stages`` (then the streamed block)
until the tiles fit in 192 KiB of shared memory (float32 inputs at head_dim 128). The grid puts query
(or key) blocks on its first, fastest-launched axis so that the programs resident at once share their
K/V (or Q/dO) in L2; causal calls launch each row's heaviest query blocks first so that the last wave
is made of light ones. float32 inputs multiply at JAX's default matmul precision (TF32 on the GPU
unless ``jax.default_matmul_precision("highest")``), as XLA's own products do.

On the CPU, ``interpret=None`` runs the kernels in Pallas interpret mode (the tests); on a GPU they
compile through Triton. Only ``jax.experimental.pallas`` / ``jax.experimental.pallas.triton`` APIs
present in both jax 0.10 and 0.11 are used (``plgpu.CompilerParams``, not the pre-0.7 name
``TritonCompilerParams``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu  # present in every supported jax (0.10, 0.11)

Array = jax.Array

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
PLATFORMS = ("gpu", "cuda")
MAX_HEAD_DIM = 256
_SMEM_BUDGET = 192 * 1024  # bytes of pipelined tiles per program (Hopper has 227 KiB per block)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Tunables of the Pallas kernels (hashable: a static argument of ``jax.jit``).

    Block sizes are powers of two >= 16 and upper bounds (see the module docstring for the choices and
    the reasons): the wrapper lowers them for short sequences and to fit registers and shared memory.

    Attributes:
      block_q, block_k: forward tile, queries per program x keys per inner step.
      block_q_dkv, block_k_dkv: dK/dV kernel, queries per inner step x keys per program.
      block_q_dq, block_k_dq: dQ kernel, queries per program x keys per inner step.
      num_warps: forward warps; None picks 4 or 8 from head_dim and the block sizes.
      num_warps_bwd: warps of both backward kernels; None picks as above.
      num_stages: software-pipelining stages of the forward's key loop.
      num_stages_bwd: stages of the backward kernels' loops.
      interpret: run in Pallas interpret mode; None means True when ``jax.default_backend() == "cpu"``.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_warps: int | None = None
    num_warps_bwd: int | None = None
    num_stages: int = 3
    num_stages_bwd: int = 2
    interpret: bool | None = None

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or not _is_pow2(value):
                raise ValueError(f"PallasConfig.{name}={value!r} should be a power of two >= 16 (Triton tiles).")
        for name in ("num_warps", "num_warps_bwd"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not _is_pow2(value) or value > 32
            ):
                raise ValueError(f"PallasConfig.{name}={value!r} should be None or a power of two <= 32.")
        for name in ("num_stages", "num_stages_bwd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PallasConfig.{name}={value!r} should be a positive integer.")
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise ValueError(f"PallasConfig.interpret={self.interpret!r} should be None, True or False.")


def supports(*, dtype: Any, head_dim: int, platform: str) -> str | None:
    """None when this kernel can serve a call, else a one-line reason.

    Args:
      dtype: the inputs' dtype (bfloat16, float16 and float32 are served).
      head_dim: ``d``; a multiple of 16 up to 256 (one that is not a power of two is zero-padded to
        the next one, which costs that fraction of the work).
      platform: a JAX platform name (``jax.default_backend()``, a device's ``platform``): ``"gpu"``
        or ``"cuda"`` compile through Triton; others (``"cpu"`` runs only in interpret mode) are refused.
    """
    reason = _shape_reason(dtype, head_dim)
    if reason is not None:
        return reason
    if str(platform).lower() not in PLATFORMS:
        return (
            f"platform {platform!r} is not an NVIDIA GPU (the Triton kernels compile for 'gpu'/'cuda'; "
            f"elsewhere they run only in interpret mode)"
        )
    return None


def _shape_reason(dtype: Any, head_dim: int) -> str | None:
    """The dtype/head_dim half of :func:`supports` (interpret mode has the same limits)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        return f"dtype {dtype!r} is not a dtype"
    if dt not in DTYPES:
        return f"dtype {dt.name} is not supported (bfloat16, float16 or float32)"
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        return f"head_dim {head_dim!r} is not a positive integer"
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} exceeds {MAX_HEAD_DIM} (the tiles would not fit in registers)"
    return None


def _compiler_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler parameters (``jax.experimental.pallas.triton.CompilerParams`` in jax 0.10 and 0.11)."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------
# The plan: effective block sizes, warps and stages of one call (hashable: a nondiff argument).


@dataclasses.dataclass(frozen=True)
class _Kernel:
    rows: int  # the program's own block (queries, or keys for dK/dV)
    cols: int  # the block its inner loop steps over
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class _Plan:
    scale: float
    is_causal: bool
    has_bias: bool
    interpret: bool
    m_pad: int
    mk_pad: int
    fwd: _Kernel  # rows = queries, cols = keys
    dkdv: _Kernel  # rows = keys, cols = queries
    dq: _Kernel  # rows = queries, cols = keys


def _auto_warps(rows: int, d: int) -> int:
    """8 warps (two warpgroups of 64 rows each, the M of one wgmma) for 128-row blocks or head_dim > 128."""
    return 8 if rows >= 128 or d > 128 else 4


def _kernel_plan(
    rows: int,
    cols: int,
    rows_cap: int,
    cols_cap: int,
    d: int,
    warps: int | None,
    stages: int,
    itemsize: int,
    resident: int,
    streamed: int,
    staged: bool = False,
) -> _Kernel:
    """Block sizes, warps and stages of one kernel.

    ``rows``/``cols``: the configured block of the program and of its inner loop, capped at the next
    power of two of the sequence lengths ``rows_cap``/``cols_cap``. ``resident``/``streamed``: operand
    tiles (``x d``) held for the whole program (units of ``rows``) and loaded per pipelined step (units of
    ``cols``), which with the stages make the shared-memory footprint. These estimates matched Triton's
    own shared-memory sizes (Triton 3.9, sm_90) within 1 KiB, except that the dQ kernel with float32
    operands (``staged``) also stages its ``rows x cols`` dS tile there.
    """
    rows = min(rows, max(16, _next_pow2(rows_cap)))
    cols = min(cols, max(16, _next_pow2(cols_cap)))
    if d > 128:  # a 128-row program's float32 accumulators alone would take 128+ registers a thread
        rows = min(rows, 64)
    num_warps = warps if warps is not None else _auto_warps(rows, d)

    def smem(s: int, c: int) -> int:
        staging = rows * c * 4 if staged and itemsize >= 4 else 0
        return itemsize * d * (resident * rows + s * streamed * c) + staging

    while smem(stages, cols) > _SMEM_BUDGET:
        if stages > 1:
            stages -= 1
        elif cols > 16:
            cols //= 2
        else:
            break
    return _Kernel(rows, cols, num_warps, stages)


def _plan(
    config: PallasConfig, scale: float, is_causal: bool, has_valid: bool, m: int, mk: int, d: int, dtype: Any
) -> _Plan:
    itemsize = jnp.dtype(dtype).itemsize
    # forward: Q resident, K and V streamed
    fwd = _kernel_plan(config.block_q, config.block_k, m, mk, d, config.num_warps, config.num_stages, itemsize, 1, 2)
    # dK/dV: K, V resident, Q and dO streamed
    dkdv = _kernel_plan(
        config.block_k_dkv, config.block_q_dkv, mk, m, d, config.num_warps_bwd, config.num_stages_bwd, itemsize, 2, 2
    )
    # dQ: Q, dO resident, K and V streamed
    dq = _kernel_plan(
        config.block_q_dq,
        config.block_k_dq,
        m,
        mk,
        d,
        config.num_warps_bwd,
        config.num_stages_bwd,
        itemsize,
        2,
        2,
        staged=True,
    )
    q_mult = max(fwd.rows, dkdv.cols, dq.rows)
    k_mult = max(fwd.cols, dkdv.rows, dq.cols)
    m_pad, mk_pad = -(-m // q_mult) * q_mult, -(-mk // k_mult) * k_mult
    interpret = config.interpret
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _Plan(
        float(scale), bool(is_causal), bool(has_valid or mk_pad != mk), bool(interpret), m_pad, mk_pad, fwd, dkdv, dq
    )


# ----------------------------------------------------------------------------------------------
# Helpers shared by the kernels.


def _i32(x) -> Array:
    """``x`` as int32: a traced value is converted, a Python int becomes a literal (never a captured constant)."""
    return lax.convert_element_type(x, jnp.int32)


def _div(x, n: int) -> Array:
    """``x // n`` for a non-negative int32 ``x``: ``lax.div`` truncates (one instruction, where ``//``
    adds floor fix-ups) and keeps int32 under ``jax_enable_x64``."""
    x = _i32(x)
    return lax.div(x, lax.convert_element_type(n, jnp.int32))


def _loop(lo, hi, body, carry):
    """``lax.fori_loop`` over ``[lo, hi)`` with int32 bounds (lowered to one ``scf.for`` by Triton)."""
    return lax.fori_loop(_i32(lo), _i32(hi), body, carry)


def _dot_nt(a: Array, b: Array) -> Array:
    """``a @ b.T`` in float32: a ``(r, d)``, b ``(c, d)`` -> ``(r, c)``."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a: Array, b: Array) -> Array:
    """``a @ b`` in float32: a ``(r, c)``, b ``(c, d)`` -> ``(r, d)``."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _log2_scale(scale: float) -> tuple[bool, float]:
    """``(positive, c)`` with ``c = scale * log2(e)``.

    For a positive scale the bias and masks go on the raw scores and ``c`` is applied inside the
    ``exp2`` argument (``x * c - m``: one FMA); otherwise the scores are scaled first.
    """
    c = float(scale) * LOG2E
    return c > 0.0, c


def _logits(s: Array, positive: bool, c: float, bias: Array | None, visible: Array | None) -> Array:
    """Scores with the bias added and invisible entries at ``-inf``, unscaled when ``positive``."""
    if not positive:
        s = s * c
    if bias is not None:
        s = s + bias
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    return s


def _exp2_arg(x: Array, positive: bool, c: float, shift: Array) -> Array:
    return (x * c if positive else x) - shift


# ----------------------------------------------------------------------------------------------
# Forward kernel. Refs (head axis squeezed): q (bq, d), k/v (mk_pad, d), bias (mk_pad,), out (bq, d)
# float32, lse (bq,) float32.


def _query_block(plan: _Plan, nq: int, i):
    """The query block program ``i`` of a query-major grid owns (heaviest first under causal)."""
    return nq - 1 - i if plan.is_causal else i


def _key_range(plan: _Plan, q0, bq: int, bk: int, nk: int):
    """Key blocks of the query block starting at ``q0``: ``[0, full)`` wholly visible, ``[full, end)`` masked."""
    if not plan.is_causal:
        return nk, nk
    end = jnp.minimum(_div(q0 + (bq + bk - 1), bk), nk)  # up to the block holding the last query
    full = jnp.minimum(_div(q0 + 1, bk), end)  # blocks whose last key <= the first query
    return full, end


def _fwd_kernel(*refs, plan: _Plan, nq: int, nk: int):
    if plan.has_bias:
        q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), bias_ref = refs, None
    bq, bk = plan.fwd.rows, plan.fwd.cols
    positive, c = _log2_scale(plan.scale)
    q0 = _query_block(plan, nq, pl.program_id(0)) * bq
    q = q_ref[...]
    d = q.shape[-1]

    def step(j, carry, masked: bool):
        acc, m_i, l_i = carry
        start = pl.multiple_of(j * bk, bk)
        s = _dot_nt(q, k_ref[pl.ds(start, bk), :])
        bias = None if bias_ref is None else bias_ref[pl.ds(start, bk)][None, :]
        visible = None
        if masked:
            rows = q0 + jnp.arange(bq, dtype=jnp.int32)[:, None]
            cols = start + jnp.arange(bk, dtype=jnp.int32)[None, :]
            visible = cols <= rows
        x = _logits(s, positive, c, bias, visible)
        m_new = jnp.maximum(m_i, jnp.max(x, axis=1) * c if positive else jnp.max(x, axis=1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet: exp2(-inf) = 0
        p = jnp.exp2(_exp2_arg(x, positive, c, shift[:, None]))
        alpha = jnp.exp2(m_i - shift)
        l_i = l_i * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, bk), :]
        acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l_i

    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    full, end = _key_range(plan, q0, bq, bk, nk)
    carry = _loop(0, full, functools.partial(step, masked=False), carry)
    if plan.is_causal:
        carry = _loop(full, end, functools.partial(step, masked=True), carry)
    acc, m_i, l_i = carry
    seen = l_i > 0.0
    l_safe = jnp.where(seen, l_i, 1.0)
    o_ref[...] = (acc * (1.0 / l_safe)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf).astype(lse_ref.dtype)


def _forward(q, k, v, bias, plan: _Plan):
    """Padded inputs -> out ``(B, m_pad, h, d)`` float32 and lse ``(B, h, m_pad)`` float32."""
    b, m_pad, h, d = q.shape
    mk_pad, hk = k.shape[1], k.shape[2]
    g = h // hk
    bq, bk = plan.fwd.rows, plan.fwd.cols
    nq, nk = m_pad // bq, mk_pad // bk
    qb = functools.partial(_query_block, plan, nq)
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, r, j: (r, qb(i), j, 0)),
        pl.BlockSpec((None, mk_pad, None, d), lambda i, r, j: (r, 0, _div(j, g), 0)),
        pl.BlockSpec((None, mk_pad, None, d), lambda i, r, j: (r, 0, _div(j, g), 0)),
    ]
    args = [q, k, v]
    if plan.has_bias:
        in_specs.append(pl.BlockSpec((None, mk_pad), lambda i, r, j: (r, 0)))
        args.append(bias)
    out_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, r, j: (r, qb(i), j, 0)),
        pl.BlockSpec((None, None, bq), lambda i, r, j: (r, j, qb(i))),
    ]
    out_shape = [jax.ShapeDtypeStruct((b, m_pad, h, d), jnp.float32), jax.ShapeDtypeStruct((b, h, m_pad), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan, nq=nq, nk=nk),
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(plan.fwd.num_warps, plan.fwd.num_stages),
        interpret=plan.interpret,
        name="jax_dilated_flash_fwd",
    )(*args)


# ----------------------------------------------------------------------------------------------
# Backward kernels. lse2 is the log-sum-exp in base 2 (+inf for rows with no visible key, so their
# P is 0), delta = rowsum(dO * O) - dLSE; both (B, h, m_pad) float32.


def _dkdv_kernel(*refs, plan: _Plan, nq: int, g: int):
    """Refs: q/do (m_pad, g, d), k/v (bk, d), bias (bk,), lse2/delta (g, m_pad) -> dk/dv (bk, d)."""
    if plan.has_bias:
        q_ref, k_ref, v_ref, bias_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), bias_ref = refs, None
    bk, bq = plan.dkdv.rows, plan.dkdv.cols
    positive, c = _log2_scale(plan.scale)
    k0 = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]
    d = k.shape[-1]
    bias = None if bias_ref is None else bias_ref[...][:, None]

    def step(i, carry, head, masked: bool):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), head, :]
        do = do_ref[pl.ds(start, bq), head, :]
        lse2 = lse_ref[head, pl.ds(start, bq)][None, :]
        delta = delta_ref[head, pl.ds(start, bq)][None, :]
        visible = None
        if masked:
            keys = k0 + jnp.arange(bk, dtype=jnp.int32)[:, None]
            queries = start + jnp.arange(bq, dtype=jnp.int32)[None, :]
            visible = keys <= queries
        x = _logits(_dot_nt(k, q), positive, c, bias, visible)  # S^T: (bk, bq)
        pt = jnp.exp2(_exp2_arg(x, positive, c, lse2))
        dv = dv + _dot_nn(pt.astype(do.dtype), do)
        dpt = _dot_nt(v, do)
        dst = pt * (dpt - delta)
        dk = dk + _dot_nn(dst.astype(q.dtype), q)
        return dk, dv

    lo: Any = 0
    mid: Any = 0
    if plan.is_causal:  # query blocks [lo, mid) straddle the diagonal, [mid, nq) see every key of the block
        lo = jnp.minimum(_div(k0, bq), nq)
        mid = jnp.minimum(_div(k0 + (bk + bq - 2), bq), nq)

    def one_head(head, carry):
        if plan.is_causal:
            carry = _loop(lo, mid, functools.partial(step, head=head, masked=True), carry)
        return _loop(mid, nq, functools.partial(step, head=head, masked=False), carry)

    carry = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
    carry = one_head(0, carry) if g == 1 else _loop(0, g, one_head, carry)
    dk, dv = carry
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, plan: _Plan, nq: int, nk: int):
    """Refs: q/do (bq, d), k/v (mk_pad, d), bias (mk_pad,), lse2/delta (bq,) -> dq (bq, d)."""
    if plan.has_bias:
        q_ref, k_ref, v_ref, bias_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), bias_ref = refs, None
    bq, bk = plan.dq.rows, plan.dq.cols
    positive, c = _log2_scale(plan.scale)
    q0 = _query_block(plan, nq, pl.program_id(0)) * bq
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    d = q.shape[-1]

    def step(j, dq, masked: bool):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        bias = None if bias_ref is None else bias_ref[pl.ds(start, bk)][None, :]
        visible = None
        if masked:
            rows = q0 + jnp.arange(bq, dtype=jnp.int32)[:, None]
            cols = start + jnp.arange(bk, dtype=jnp.int32)[None, :]
            visible = cols <= rows
        x = _logits(_dot_nt(q, k), positive, c, bias, visible)
        p = jnp.exp2(_exp2_arg(x, positive, c, lse2))
        ds = p * (_dot_nt(do, v) - delta)
        return dq + _dot_nn(ds.astype(k.dtype), k)

    full, end = _key_range(plan, q0, bq, bk, nk)
    dq = _loop(0, full, functools.partial(step, masked=False), jnp.zeros((bq, d), jnp.float32))
    if plan.is_causal:
        dq = _loop(full, end, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _backward(q, k, v, bias, out, lse, dout, dlse, plan: _Plan):
    """Padded residuals and cotangents -> dq, dk, dv in the inputs' dtypes and shapes."""
    b, m_pad, h, d = q.shape
    mk_pad, hk = k.shape[1], k.shape[2]
    g = h // hk
    delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1).transpose(0, 2, 1) - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)  # no visible key: P = exp2(x - inf) = 0
    do = dout.astype(q.dtype)  # the products run in the input dtype and accumulate in float32
    bias_args = [bias] if plan.has_bias else []

    bk, bq = plan.dkdv.rows, plan.dkdv.cols
    nk, nq = mk_pad // bk, m_pad // bq
    kv_block = pl.BlockSpec((None, bk, None, d), lambda i, r, j: (r, i, j, 0))
    group_rows = pl.BlockSpec((None, m_pad, g, d), lambda i, r, j: (r, 0, j, 0))  # the g query heads of kv head j
    group_stats = pl.BlockSpec((None, g, m_pad), lambda i, r, j: (r, j, 0))
    in_specs = [group_rows, kv_block, kv_block]
    if plan.has_bias:
        in_specs.append(pl.BlockSpec((None, bk), lambda i, r, j: (r, i)))
    in_specs += [group_rows, group_stats, group_stats]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan, nq=nq, g=g),
        grid=(nk, b, hk),
        in_specs=in_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(plan.dkdv.num_warps, plan.dkdv.num_stages),
        interpret=plan.interpret,
        name="jax_dilated_flash_dkdv",
    )(q, k, v, *bias_args, do, lse2, delta)

    bq, bk = plan.dq.rows, plan.dq.cols
    nq, nk = m_pad // bq, mk_pad // bk
    qb = functools.partial(_query_block, plan, nq)
    q_block = pl.BlockSpec((None, bq, None, d), lambda i, r, j: (r, qb(i), j, 0))
    kv_rows = pl.BlockSpec((None, mk_pad, None, d), lambda i, r, j: (r, 0, _div(j, g), 0))
    stats = pl.BlockSpec((None, None, bq), lambda i, r, j: (r, j, qb(i)))
    in_specs = [q_block, kv_rows, kv_rows]
    if plan.has_bias:
        in_specs.append(pl.BlockSpec((None, mk_pad), lambda i, r, j: (r, 0)))
    in_specs += [q_block, stats, stats]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan, nq=nq, nk=nk),
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(plan.dq.num_warps, plan.dq.num_stages),
        interpret=plan.interpret,
        name="jax_dilated_flash_dq",
    )(q, k, v, *bias_args, do, lse2, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# The custom VJP over padded inputs: out (B, m_pad, h, d) float32, lse (B, m_pad, h) float32.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, bias, plan: _Plan):
    out, lse = _forward(q, k, v, bias, plan)
    return out, lse.transpose(0, 2, 1)


def _flash_fwd(q, k, v, bias, plan: _Plan):
    out, lse = _flash(q, k, v, bias, plan)
    return (out, lse), (q, k, v, bias, out, lse)


def _flash_bwd(plan: _Plan, residuals, cotangents):
    q, k, v, bias, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, bias, out, lse.transpose(0, 2, 1), dout, dlse.transpose(0, 2, 1), plan)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    is_causal: bool = False,
    kv_valid: Array | None = None,
    config: PallasConfig | None = None,
) -> tuple[Array, Array]:
    """Softmax attention with its log-sum-exp in Pallas (Triton) kernels, with the flash-attention VJP.

    Args:
      q: ``(B, m, h, d)`` queries (bfloat16, float16 or float32; see :func:`supports`).
      k, v: ``(B, mk, h_kv, d)`` keys and values; ``h % h_kv == 0`` and query head ``j`` uses key/value
        head ``j // (h / h_kv)`` (grouped-query attention; repeated k/v are never materialised).
      scale: multiplies the scores ``q . k``.
      is_causal: query ``p`` sees key ``p' <= p`` (top-left aligned, also when ``m != mk``).
      kv_valid: optional ``(B, mk)`` boolean, False for keys nobody may see (they get zero weight and
        zero gradient whatever their values).
      config: block sizes, warps, stages and interpret mode; default :class:`PallasConfig`.

    Returns:
      ``out`` ``(B, m, h, d)`` float32 (0 for a row with no visible key) and ``lse`` ``(B, m, h)``
      float32, the natural-log log-sum-exp of the row's scaled visible scores (``-inf`` for such a row).
      Both are differentiable (``jax.grad`` through either or both).
    """
    config = PallasConfig() if config is None else config
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v should be (B, m, h, d) and (B, mk, h_kv, d); got {q.shape}, {k.shape}, {v.shape}.")
    b, m, h, d = q.shape
    mk, hk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v should both be (B, mk, h_kv, d) = ({b}, mk, h_kv, {d}); got {k.shape}, {v.shape}.")
    if hk == 0 or h % hk:
        raise ValueError(f"h={h} query heads should be a multiple of h_kv={hk} key/value heads.")
    if kv_valid is not None and kv_valid.shape != (b, mk):
        raise ValueError(f"kv_valid should be (B, mk) = {(b, mk)}; got {kv_valid.shape}.")
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    reason = _shape_reason(dtype, d) if d else None
    if reason is not None:
        raise ValueError(f"the Pallas attention kernel cannot serve this call: {reason}.")
    if b == 0 or m == 0 or h == 0 or d == 0 or mk == 0:
        return jnp.zeros((b, m, h, d), jnp.float32), jnp.full((b, m, h), -jnp.inf, jnp.float32)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if is_causal and mk > m:  # keys at or after position m are in every query's future
        k, v, mk = k[:, :m], v[:, :m], m
        kv_valid = None if kv_valid is None else kv_valid[:, :m]
    if kv_valid is not None:  # zero weight whatever the values: no 0 * inf or 0 * NaN reaches a product
        keep = kv_valid.astype(bool)[:, :, None, None]
        k, v = jnp.where(keep, k, jnp.zeros((), dtype)), jnp.where(keep, v, jnp.zeros((), dtype))
    d_pad = max(16, _next_pow2(d))
    plan = _plan(config, scale, is_causal, kv_valid is not None, m, mk, d_pad, dtype)
    bias = None
    if plan.has_bias:
        visible = jnp.ones((b, mk), bool) if kv_valid is None else kv_valid.astype(bool)
        visible = _pad_axis(visible, 1, plan.mk_pad)
        bias = jnp.where(visible, 0.0, -jnp.inf).astype(jnp.float32)
    qp = _pad_axis(_pad_axis(q, 1, plan.m_pad), 3, d_pad)
    kp = _pad_axis(_pad_axis(k, 1, plan.mk_pad), 3, d_pad)
    vp = _pad_axis(_pad_axis(v, 1, plan.mk_pad), 3, d_pad)
    out, lse = _flash(qp, kp, vp, bias, plan)
    return out[:, :m, :, :d], lse[:, :m]


__all__ = ["PallasConfig", "flash_attention", "supports"]
