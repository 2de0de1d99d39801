"""The Pallas (Triton) attention kernel, jax_dilated.kernels.pallas, in interpret mode on the CPU.

Every case is held to the plain unblocked form (``reference_attention``: every score at once, plain
autodiff) computed in float64 from the same inputs. The kernel computes in float32 (it does not take
float64), so float32 cases run under ``jax.default_matmul_precision("highest")`` and are held to
``1e-5 * max|ref| + 1e-6`` for values and ten times that for gradients; bfloat16/float16 cases to
``2e-2 * max|ref|``. Interpret mode spends its time compiling, so each case is one jitted function
that returns the values and the gradients of a loss that uses both ``out`` and ``lse``, and most cases
use 16-wide blocks so that a few dozen positions already span several blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_dilated.kernels import pallas, reference_attention
from jax_dilated.kernels.pallas import PallasConfig, supports

SMALL = PallasConfig(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16)


def _loss_and_grads(fn, q, k, v, valid, cot_out, cot_lse, **kw):
    """out, lse and the gradients in (q, k, v) of ``sum(out * cot_out) + sum(finite(lse) * cot_lse)``."""

    def loss(q, k, v):
        out, lse = fn(q, k, v, kv_valid=valid, **kw)
        total = jnp.sum(out * cot_out.astype(out.dtype))
        total = total + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * cot_lse.astype(lse.dtype))
        return total, (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


@functools.partial(jax.jit, static_argnames=("scale", "is_causal", "config"))
def _kernel(q, k, v, valid, cot_out, cot_lse, *, scale, is_causal, config):
    return _loss_and_grads(pallas.flash_attention, q, k, v, valid, cot_out, cot_lse, scale=scale,
                           is_causal=is_causal, config=config)


@functools.partial(jax.jit, static_argnames=("scale", "is_causal"))
def _plain(q, k, v, valid, cot_out, cot_lse, *, scale, is_causal):
    f64 = lambda x: x.astype(jnp.float64)
    return _loss_and_grads(reference_attention, f64(q), f64(k), f64(v), valid, f64(cot_out), f64(cot_lse),
                           scale=scale, is_causal=is_causal)


def _inputs(seed, b, m, mk, h, hk, d, dtype=jnp.float32, padded=False):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, m, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, mk, hk, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, mk, hk, d)), dtype)
    valid = jnp.asarray(rng.random((b, mk)) > 0.3) if padded else None
    cot_out = jnp.asarray(rng.standard_normal((b, m, h, d)), jnp.float32)
    cot_lse = jnp.asarray(rng.standard_normal((b, m, h)), jnp.float32)
    return q, k, v, valid, cot_out, cot_lse


def _close(got, want, bound, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=what)
    got, want = np.where(np.isfinite(want), got, 0.0), np.where(np.isfinite(want), want, 0.0)
    tol = bound(np.max(np.abs(want), initial=0.0))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=what)


F32_VALUES = lambda top: 1e-5 * top + 1e-6
F32_GRADS = lambda top: 1e-4 * top + 1e-5
HALF = lambda top: 2e-2 * top + 1e-3


def _check(args, *, scale, is_causal, config=SMALL, values=F32_VALUES, grads=F32_GRADS):
    q, k, v, valid, cot_out, cot_lse = args
    with jax.default_matmul_precision("highest"):
        out, lse, g = _kernel(q, k, v, valid, cot_out, cot_lse, scale=scale, is_causal=is_causal, config=config)
    ref_out, ref_lse, ref_g = _plain(q, k, v, valid, cot_out, cot_lse, scale=scale, is_causal=is_causal)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    _close(out, ref_out, values, "out")
    _close(lse, ref_lse, values, "lse")
    for name, a, e, x in zip(("dq", "dk", "dv"), g, ref_g, (q, k, v), strict=True):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert bool(jnp.all(jnp.isfinite(a))), name
        _close(a, e, grads, name)
    return out, lse, g


# (batch, queries, keys, heads, kv heads, head_dim), causal, key padding, scale: every GQA group size
# (h_kv = h, h/2, 1), m == mk, m > mk and m < mk, lengths that are not block multiples.
CASES = {
    "gqa2-not-multiples": ((2, 40, 40, 4, 2, 16), False, False, 0.3),
    "causal-padded-mha-m<mk": ((1, 24, 56, 2, 2, 32), True, True, 0.25),
    "padded-gqa1-m>mk-negative-scale": ((2, 33, 17, 4, 1, 16), False, True, -0.4),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_values_and_gradients_equal_the_plain_form(case):
    shape, is_causal, padded, scale = case
    _check(_inputs(0, *shape, padded=padded), scale=scale, is_causal=is_causal)


def test_default_blocks_causal_gqa_several_blocks():
    """The default PallasConfig (128 x 64 forward tiles): two query blocks, diagonal and full key blocks."""
    args = _inputs(1, 1, 200, 200, 2, 1, 64, padded=True)
    _check(args, scale=0.125, is_causal=True, config=PallasConfig())


def test_fully_padded_rows_are_zero_without_nan():
    """A batch row whose keys are all padded, and causal rows whose only keys are padded: out 0, lse -inf,
    zero gradients, no NaN; masked keys holding NaN and inf get zero weight and zero gradient."""
    b, m, mk, h, hk, d = 2, 24, 40, 4, 1, 16
    q, k, v, valid, cot_out, cot_lse = _inputs(2, b, m, mk, h, hk, d, padded=True)
    valid = valid.at[0].set(False).at[1, :3].set(False)  # row 0: nothing; row 1: causal queries 0-2 see nothing
    poison = ~valid[:, :, None, None]
    k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.inf, v)
    with jax.default_matmul_precision("highest"):
        out, lse, (dq, dk, dv) = _kernel(q, k_bad, v_bad, valid, cot_out, cot_lse, scale=0.3, is_causal=True,
                                         config=SMALL)
    ref_out, ref_lse, ref_g = _plain(q, k, v, valid, cot_out, cot_lse, scale=0.3, is_causal=True)
    for x in (out, dq, dk, dv):
        assert bool(jnp.all(jnp.isfinite(x)))
    assert bool(jnp.all(out[0] == 0)) and bool(jnp.all(lse[0] == -jnp.inf)) and bool(jnp.all(dq[0] == 0))
    assert bool(jnp.all(out[1, :3] == 0)) and bool(jnp.all(lse[1, :3] == -jnp.inf))
    assert bool(jnp.all(dk[0] == 0)) and bool(jnp.all(dv[0] == 0))
    assert bool(jnp.all(jnp.where(poison, dk, 0) == 0)) and bool(jnp.all(jnp.where(poison, dv, 0) == 0))
    _close(out, ref_out, F32_VALUES, "out")
    _close(lse, ref_lse, F32_VALUES, "lse")
    for name, a, e in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, strict=True):
        _close(a, e, F32_GRADS, name)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_half_precision_within_2e_2_of_float32(dtype):
    """Half-precision inputs, float32 statistics: within 2e-2 of the exact answer for those inputs
    (causal with more queries than keys: the last queries see every key)."""
    args = _inputs(3, 2, 40, 24, 4, 2, 32, dtype=dtype, padded=True)
    _check(args, scale=32 ** -0.5, is_causal=True, values=HALF, grads=HALF)


def test_future_key_blocks_are_never_read():
    """Causal, 16-wide blocks, 64 positions. Forward and dQ: NaN keys and values at positions >= 32 (key
    blocks wholly after query blocks 0 and 1) leave those queries' out, lse and dQ finite and exact.
    dK/dV: NaN queries at positions < 32 leave the gradients of keys >= 32 finite and exact. A kernel that
    loaded such a block and only masked it would turn 0 * NaN into NaN."""
    b, n, h, hk, d = 1, 64, 2, 1, 16
    q, k, v, _, cot_out, cot_lse = _inputs(4, b, n, n, h, hk, d)
    kw = dict(scale=0.3, is_causal=True)
    early = (jnp.arange(n) < 32)[None, :, None]

    # queries < 32 against NaN future keys; the loss reads only those queries
    co, cl = jnp.where(early[..., None], cot_out, 0.0), jnp.where(early, cot_lse, 0.0)
    k_bad, v_bad = k.at[:, 32:].set(jnp.nan), v.at[:, 32:].set(jnp.nan)
    with jax.default_matmul_precision("highest"):
        out, lse, (dq, _, _) = _kernel(q, k_bad, v_bad, None, co, cl, config=SMALL, **kw)
    ref_out, ref_lse, (ref_dq, _, _) = _plain(q, k, v, None, co, cl, **kw)
    _close(out[:, :32], ref_out[:, :32], F32_VALUES, "out")
    _close(lse[:, :32], ref_lse[:, :32], F32_VALUES, "lse")
    _close(dq[:, :32], ref_dq[:, :32], F32_GRADS, "dq")

    # NaN queries < 32; the loss reads only queries >= 32, which never see them
    co, cl = jnp.where(early[..., None], 0.0, cot_out), jnp.where(early, 0.0, cot_lse)
    q_bad = q.at[:, :32].set(jnp.nan)
    with jax.default_matmul_precision("highest"):
        _, _, (_, dk, dv) = _kernel(q_bad, k, v, None, co, cl, config=SMALL, **kw)
    _, _, (_, ref_dk, ref_dv) = _plain(q, k, v, None, co, cl, **kw)
    _close(dk[:, 32:], ref_dk[:, 32:], F32_GRADS, "dk")
    _close(dv[:, 32:], ref_dv[:, 32:], F32_GRADS, "dv")


def test_kernels_lower_to_triton():
    """bf16, head_dim 128, default blocks: forward, dK/dV and dQ lower through the Pallas Triton backend
    (not run: no GPU here) with the planned warps and stages."""
    cfg = PallasConfig(interpret=False)
    q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((2, 256), jnp.bool_)

    def loss(q, k, v, valid):
        out, lse = pallas.flash_attention(q, k, v, scale=0.1, is_causal=True, kv_valid=valid, config=cfg)
        return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    try:
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, valid).lower(
            lowering_platforms=("cuda",)).as_text()
    except (RuntimeError, NotImplementedError, ValueError) as err:
        if "GPU" in str(err) or "gpu" in str(err) or "cuda" in str(err).lower():
            pytest.skip(f"this jax cannot lower for CUDA without a GPU: {err}")
        raise
    plan = pallas._plan(cfg, 0.1, True, True, 256, 256, 128, jnp.bfloat16)
    for name, kernel in (("fwd", plan.fwd), ("dkdv", plan.dkdv), ("dq", plan.dq)):
        assert f'name = "jax_dilated_flash_{name}", num_stages = {kernel.num_stages} : i32, ' \
               f'num_warps = {kernel.num_warps} : i32' in text, name


def test_default_plan_for_hopper():
    """The documented defaults: bf16 at head_dim 128 and 64, m = mk = 2048."""
    for d in (64, 128):
        plan = pallas._plan(PallasConfig(), 0.1, False, False, 2048, 2048, d, jnp.bfloat16)
        assert (plan.fwd.rows, plan.fwd.cols, plan.fwd.num_warps, plan.fwd.num_stages) == (128, 64, 8, 3)
        assert (plan.dkdv.rows, plan.dkdv.cols, plan.dkdv.num_warps, plan.dkdv.num_stages) == (128, 32, 8, 2)
        assert (plan.dq.rows, plan.dq.cols, plan.dq.num_warps, plan.dq.num_stages) == (128, 64, 8, 2)
        assert not plan.has_bias and (plan.m_pad, plan.mk_pad) == (2048, 2048)
    short = pallas._plan(PallasConfig(), 0.1, False, False, 40, 17, 64, jnp.bfloat16)
    assert (short.fwd.rows, short.fwd.cols, short.m_pad, short.mk_pad, short.has_bias) == (64, 32, 64, 32, True)


def test_supports_messages():
    for platform in ("gpu", "cuda", "GPU"):
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
            for d in (16, 64, 80, 128, 256):
                assert supports(dtype=dtype, head_dim=d, platform=platform) is None
    assert supports(dtype=jnp.bfloat16, head_dim=72, platform="gpu") == "head_dim 72 is not a multiple of 16"
    assert "exceeds 256" in supports(dtype=jnp.bfloat16, head_dim=512, platform="gpu")
    assert supports(dtype=jnp.float64, head_dim=64, platform="gpu").startswith("dtype float64 is not supported")
    assert supports(dtype=jnp.int8, head_dim=64, platform="gpu").startswith("dtype int8 is not supported")
    assert "'cpu'" in supports(dtype=jnp.bfloat16, head_dim=64, platform="cpu")
    assert "'tpu'" in supports(dtype=jnp.bfloat16, head_dim=64, platform="tpu")
    for reason in (supports(dtype=jnp.float64, head_dim=72, platform="cpu"),
                   supports(dtype=jnp.bfloat16, head_dim=64, platform="tpu")):
        assert "\n" not in reason


def test_rejected_calls_and_configs():
    q = jnp.zeros((1, 8, 2, 64), jnp.float64)
    with pytest.raises(ValueError, match="dtype float64"):
        pallas.flash_attention(q, q, q, scale=1.0)
    x = jnp.zeros((1, 8, 3, 64), jnp.float32)
    with pytest.raises(ValueError, match="multiple of h_kv"):
        pallas.flash_attention(x, jnp.zeros((1, 8, 2, 64), jnp.float32), jnp.zeros((1, 8, 2, 64), jnp.float32),
                               scale=1.0)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        pallas.flash_attention(*(jnp.zeros((1, 8, 1, 72), jnp.float32),) * 3, scale=1.0)
    for bad in (dict(block_q=48), dict(block_k=8), dict(num_warps=3), dict(num_stages=0), dict(interpret=1)):
        with pytest.raises(ValueError, match="PallasConfig"):
            PallasConfig(**bad)
    hash(PallasConfig())  # a static argument of jax.jit


def test_empty_inputs():
    q, kv = jnp.zeros((2, 5, 2, 16), jnp.float32), jnp.zeros((2, 0, 1, 16), jnp.float32)
    out, lse = pallas.flash_attention(q, kv, kv, scale=1.0)
    assert out.shape == (2, 5, 2, 16) and bool(jnp.all(out == 0)) and bool(jnp.all(lse == -jnp.inf))
