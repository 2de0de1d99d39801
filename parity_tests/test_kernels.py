"""The attention kernel (jax_dilated.kernels): values, exact custom gradients, tiling paths, causal skipping.

Every tiling path is forced at small sizes through ``Tiling``: whole units per step, one unit per
step, and the long-row path (query tiles with an online softmax over key tiles). Each is held to
the plain unblocked form (``reference_attention``: every score at once, plain autodiff) in float64.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_dilated as jd
from jax_dilated import kernels
from jax_dilated.kernels import select
from jax_dilated.kernels import Tiling, Xla, attend, reference_attention
from jax_dilated.kernels.xla import flash_attention
from jax_dilated.kernels import xla as xla_kernel

TILINGS = {
    "units": Tiling(causal_tiles=3, causal_tile_min=1),
    "one-unit-steps": Tiling(step_scores=300, causal_tiles=3, causal_tile_min=1),
    "long-rows": Tiling(step_scores=1, query_tile=5, key_tile=7, causal_tiles=2),
    "long-rows-one-tile": Tiling(step_scores=1, query_tile=64, key_tile=64),
}
# (batch, queries, keys, heads, kv heads, head_dim): GQA with 2 and 1 kv heads, fewer and more keys.
SHAPES = [(3, 17, 17, 4, 4, 8), (2, 17, 17, 4, 2, 4), (2, 12, 20, 3, 1, 4), (2, 20, 12, 2, 2, 4)]
STATIC = ("scale", "is_causal", "dropout_rate", "tiling")
flash = jax.jit(flash_attention, static_argnames=STATIC)
plain = jax.jit(reference_attention, static_argnames=("scale", "is_causal"))


def _grad(loss):
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _inputs(rng, b, m, mk, h, hk, d, padded):
    q = jnp.asarray(rng.standard_normal((b, m, h, d)))
    k = jnp.asarray(rng.standard_normal((b, mk, hk, d)))
    v = jnp.asarray(rng.standard_normal((b, mk, hk, d)))
    valid = jnp.asarray(rng.random((b, mk)) > 0.3) if padded else None
    return q, k, v, valid


def _loss(fn, cot_out, cot_lse, **kw):
    """A scalar that uses both outputs; the log-sum-exp of rows with no visible key (-inf) is left out."""

    def loss(q, k, v):
        out, lse = fn(q, k, v, **kw)
        return jnp.sum(out * cot_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * cot_lse)

    return loss


# Every tiling on two of the shapes and every shape on two tilings (rotated pairs, not the full product:
# each pair is a fresh compile of the forward and the backward).
TILING_SHAPES = [(name, SHAPES[(i + j) % len(SHAPES)]) for i, name in enumerate(TILINGS) for j in (0, 2)]


@pytest.mark.parametrize("name,shape", TILING_SHAPES,
                         ids=[f"{n}-" + "b{}-m{}-mk{}-h{}-hkv{}-d{}".format(*s) for n, s in TILING_SHAPES])
def test_values_and_custom_gradients_equal_the_plain_form(name, shape):
    """float64: out and lse to 1e-12, the custom VJP (through out and lse) to autodiff of the plain form to 1e-10."""
    tiling = TILINGS[name]
    rng = np.random.default_rng()
    for is_causal, padded in ((False, False), (True, True)):
        q, k, v, valid = _inputs(rng, *shape, padded)
        kw = dict(scale=float(rng.uniform(0.2, 1.0)), is_causal=is_causal, kv_valid=valid)
        out, lse = flash(q, k, v, tiling=tiling, **kw)
        ref_out, ref_lse = plain(q, k, v, **kw)
        np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
        np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(ref_lse), ref_lse, 0),
                                   rtol=0, atol=1e-12)
        cot_out = jnp.asarray(rng.standard_normal(out.shape))
        cot_lse = jnp.asarray(rng.standard_normal(lse.shape))
        got = _grad(_loss(flash_attention, cot_out, cot_lse, tiling=tiling, **kw))(q, k, v)
        want = _grad(_loss(reference_attention, cot_out, cot_lse, **kw))(q, k, v)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("tiling", [TILINGS["units"], TILINGS["long-rows"]], ids=["units", "long-rows"])
def test_check_grads_reverse_and_forward_over_reverse(tiling):
    """``jax.test_util.check_grads`` against finite differences, on a loss of both out and lse.

    Order 1 in reverse mode, and forward mode over the reverse-mode gradient (Hessian-vector
    products). Forward mode on the kernel itself does not exist: a ``jax.custom_vjp`` function has
    no JVP rule (JAX raises "can't apply forward-mode autodiff (jvp) to a custom_vjp function").
    """
    rng = np.random.default_rng()
    q, k, v, valid = _inputs(rng, 2, 9, 9, 2, 1, 4, padded=True)
    valid = valid.at[:, 0].set(True)  # every causal row sees a key: lse finite everywhere
    loss = _loss(flash_attention, jnp.asarray(rng.standard_normal(q.shape)),
                 jnp.asarray(rng.standard_normal(q.shape[:3])), scale=0.5, is_causal=True, kv_valid=valid,
                 tiling=tiling)
    check_grads(jax.jit(loss), (q, k, v), order=1, modes=("rev",))
    check_grads(jax.jit(jax.grad(loss)), (q, k, v), order=1, modes=("fwd",))


def _score_products(fn, *args) -> list[tuple[int, ...]]:
    """Output shapes of the score products (``dot_general`` with a key axis) in ``fn``'s jaxpr."""
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def test_causal_never_scores_a_future_key_tile():
    """Unit path: a causal call of 64 positions in 4 tiles scores key prefixes 16, 32, 48 and 64 only
    (10/16 of the square), in the forward and in the backward pass; a non-causal call scores all."""
    rng = np.random.default_rng()
    q, k, v, _ = _inputs(rng, 1, 64, 64, 1, 1, 8, padded=False)
    tiling = Tiling(causal_tiles=4, causal_tile_min=16)
    fwd = lambda causal: lambda q, k, v: flash_attention(q, k, v, scale=0.3, is_causal=causal, tiling=tiling)

    def score_elements(fn):  # products whose output has a query axis and a key axis (not head_dim 8)
        return sum(int(np.prod(s)) for s in _score_products(fn, q, k, v) if s[-1] != 8 and s[-2] != 8)

    assert score_elements(fwd(False)) == 64 * 64
    assert score_elements(fwd(True)) == 16 * (16 + 32 + 48 + 64)
    grad = lambda causal: jax.grad(lambda q, k, v: jnp.sum(fwd(causal)(q, k, v)[0]), argnums=(0, 1, 2))
    # backward: the forward's score products plus S^T and dP^T per tile
    assert score_elements(grad(True)) == 3 * 16 * (16 + 32 + 48 + 64)
    assert score_elements(grad(False)) == 3 * 64 * 64


@pytest.mark.parametrize("tiling", [TILINGS["units"], TILINGS["long-rows"], Tiling(step_scores=1, query_tile=4,
                                                                                  key_tile=4)],
                         ids=["units", "long-rows", "long-rows-aligned"])
def test_causal_skips_future_tiles_in_both_passes(tiling):
    """NaN keys and values in key tiles wholly after a query tile cannot reach it: those tiles are never
    read, forward or backward (a masked but computed tile would turn 0 * NaN into NaN)."""
    rng = np.random.default_rng()
    n = 16
    q, k, v, _ = _inputs(rng, 1, n, n, 2, 2, 4, padded=False)
    if tiling.step_scores > 1:  # unit path: a causal tile [a, b) reads keys < b
        first_clean = max(b for a, b in xla_kernel._causal_bounds(n, tiling) if b <= 8)
    else:  # long rows: query tile i reads key tiles up to the one holding its last query
        tq, tk = tiling.query_tile, tiling.key_tile
        first_clean = max(tq * i for i in range(n // tq + 1) if i == 0 or ((tq * i - 1) // tk + 1) * tk <= 8)
    poisoned_k = k.at[:, 8:].set(jnp.nan)
    poisoned_v = v.at[:, 8:].set(jnp.nan)
    out, lse = flash(q, poisoned_k, poisoned_v, scale=0.5, is_causal=True, tiling=tiling)
    ref_out, ref_lse = plain(q[:, :8], k[:, :8], v[:, :8], scale=0.5, is_causal=True)
    np.testing.assert_allclose(out[:, :first_clean], ref_out[:, :first_clean], rtol=0, atol=1e-12)
    grads = jax.jit(jax.grad(lambda q: jnp.sum(flash_attention(
        q, poisoned_k, poisoned_v, scale=0.5, is_causal=True, tiling=tiling)[0][:, :first_clean])))(q)
    assert bool(jnp.all(jnp.isfinite(grads[:, :first_clean])))


@pytest.mark.parametrize("tiling", TILINGS.values(), ids=TILINGS.keys())
def test_dropout_masks_follow_the_documented_rule_in_every_tiling(tiling):
    """The keep-mask is ``bernoulli(fold_in(fold_in(split(rng, B)[i], head), query), 1 - rate, (mk,))``
    whatever the tiling: values and gradients equal a plain form that applies that mask."""
    rng = np.random.default_rng()
    b, m, mk, h, hk, d = 2, 13, 11, 4, 2, 4
    q, k, v, valid = _inputs(rng, b, m, mk, h, hk, d, padded=True)
    rate, key = 0.4, jax.random.key(int(rng.integers(2**31)))
    kw = dict(scale=0.5, is_causal=True, kv_valid=valid)
    draw = lambda row, head, query: jax.random.bernoulli(
        jax.random.fold_in(jax.random.fold_in(row, head), query), 1.0 - rate, (mk,))
    per_query = jax.vmap(draw, in_axes=(None, None, 0))
    per_head = jax.vmap(per_query, in_axes=(None, 0, None))
    keep = jax.vmap(per_head, in_axes=(0, None, None))(jax.random.split(key, b), jnp.arange(h), jnp.arange(m))

    def masked_plain(q, k, v, valid):
        kr, vr = jnp.repeat(k, h // hk, axis=2), jnp.repeat(v, h // hk, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kr) * kw["scale"]
        vis = (jnp.arange(mk)[None, :] <= jnp.arange(m)[:, None])[None, None] & valid[:, None, None, :]
        p = jax.nn.softmax(jnp.where(vis, s, -jnp.inf), axis=-1)
        p = jnp.where(jnp.isnan(p), 0.0, p)  # rows with no visible key
        return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, p / (1.0 - rate), 0.0), vr)

    got = flash(q, k, v, dropout_rate=rate, dropout_rng=key, tiling=tiling, **kw)[0]
    want = jax.jit(masked_plain)(q, k, v, valid)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    cot = jnp.asarray(rng.standard_normal(got.shape))
    g1 = _grad(lambda *a: jnp.sum(flash_attention(*a, dropout_rate=rate, dropout_rng=key, tiling=tiling,
                                                          **kw)[0] * cot))(q, k, v)
    g0 = _grad(lambda *a: jnp.sum(masked_plain(*a, valid) * cot))(q, k, v)
    for a, e in zip(g1, g0):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-10)


def test_dropout_keeps_the_expected_fraction():
    rng = np.random.default_rng()
    q, k, v, _ = _inputs(rng, 2, 64, 64, 2, 2, 4, padded=False)
    v = jnp.ones_like(v)  # each output row is the sum of its kept weights / (1 - rate)
    out = flash(q * 0, k, v, scale=1.0, dropout_rate=0.25, dropout_rng=jax.random.key(1))[0]
    # uniform weights 1/64: a row's output is (kept keys / 64) / 0.75; mean kept fraction 0.75
    kept = np.asarray(out[..., 0]) * 0.75 * 64
    assert abs(kept.mean() / 64 - 0.75) < 0.02
    assert np.allclose(kept, np.round(kept), atol=1e-4)  # whole numbers of kept keys


def test_float32_and_half_precision():
    """float32 within the semantics section 8 bound of float64; bf16/fp16 with float32 statistics within 2e-2."""
    rng = np.random.default_rng()
    q, k, v, valid = _inputs(rng, 2, 40, 40, 4, 2, 16, padded=True)
    ref_out, _ = reference_attention(q, k, v, scale=0.25, is_causal=True, kv_valid=valid)
    f32_bound = 1e-5 * float(jnp.abs(ref_out).max()) + 1e-6
    # float32 on both walks; each half dtype on one of them (the statistics code is shared)
    for dtype, bound, tilings in ((jnp.float32, f32_bound, ("units", "long-rows")), (jnp.bfloat16, 2e-2, ("units",)),
                                  (jnp.float16, 2e-2, ("long-rows",))):
        for tiling in (TILINGS[t] for t in tilings):
            with jax.default_matmul_precision("highest"):
                out, lse = flash(*(x.astype(dtype) for x in (q, k, v)), scale=0.25, is_causal=True, kv_valid=valid,
                                 tiling=tiling)
            assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
            assert float(jnp.abs(out - ref_out).max()) <= bound * (1 if dtype == jnp.float32 else
                                                                   float(jnp.abs(ref_out).max()))


def test_empty_inputs():
    z = jnp.zeros((2, 0, 4, 8))
    out, lse = flash_attention(z, z[:, :, :2], z[:, :, :2], scale=1.0)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 0, 4)
    q = jnp.ones((2, 3, 4, 8))
    out, lse = flash_attention(q, z[:, :, :2], z[:, :, :2], scale=1.0)
    assert bool(jnp.all(out == 0)) and bool(jnp.all(lse == -jnp.inf))


def test_attend_resolves_implementations():
    rng = np.random.default_rng()
    q, k, v, _ = _inputs(rng, 1, 8, 8, 2, 2, 4, padded=False)
    a = attend(q, k, v, scale=0.5, implementation=kernels.resolve("xla"))
    b = attend(q, k, v, scale=0.5, implementation=Xla(Tiling(step_scores=1, query_tile=3, key_tile=3)))
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"implementation='fast' is unknown"):
        kernels.resolve("fast")
    with pytest.raises(ValueError, match=r"Tiling.query_tile=0 should be a positive integer"):
        Tiling(query_tile=0)


def test_default_tiling_depends_on_the_platform():
    assert Tiling.for_platform("cpu") == xla_kernel.CPU_TILING
    assert Tiling.for_platform("gpu").step_scores > 100 * Tiling.for_platform("cpu").step_scores


# ----------------------------------------------------------------------------------------------
# The choice of kernel: a pure rule over call shapes (made-up devices), and the probe's fallback.

GPU_BF16 = select.CallShape(platform="gpu", dtype="bfloat16", head_dim=128, need_lse=False)
CHOICES = [
    (select.CallShape(platform="cpu", dtype="float32", head_dim=64), ("xla",)),
    (select.CallShape(platform="tpu", dtype="bfloat16", head_dim=128), ("xla",)),
    (GPU_BF16, ("pallas", "cudnn", "xla")),
    (select.CallShape(platform="cuda", dtype="bfloat16", head_dim=128, need_lse=True), ("pallas", "xla")),
    (select.CallShape(platform="gpu", dtype="float16", head_dim=64, need_lse=False, has_mask=True), ("pallas", "xla")),
    (select.CallShape(platform="gpu", dtype="float32", head_dim=64, need_lse=False), ("pallas", "xla")),
    (select.CallShape(platform="gpu", dtype="float64", head_dim=64), ("xla",)),
    (select.CallShape(platform="gpu", dtype="bfloat16", head_dim=72, need_lse=False), ("cudnn", "xla")),
    (select.CallShape(platform="gpu", dtype="bfloat16", head_dim=12, need_lse=False), ("xla",)),
    (select.CallShape(platform="gpu", dtype="bfloat16", head_dim=64, dropout=True), ("xla",)),
]


@pytest.mark.parametrize("call,expected", CHOICES, ids=lambda x: str(x) if isinstance(x, tuple) else "")
def test_candidates_table(call, expected):
    assert select.candidates(call) == expected


@pytest.mark.parametrize("name,call,match", [
    ("pallas", select.CallShape(platform="tpu", dtype="float32", head_dim=64), r"not on 'tpu'"),
    ("pallas", select.CallShape(platform="gpu", dtype="float64", head_dim=64), r"float64"),
    ("pallas", select.CallShape(platform="gpu", dtype="bfloat16", head_dim=72), r"head_dim 72"),
    ("cudnn", select.CallShape(platform="cpu", dtype="bfloat16", head_dim=64, need_lse=False), r"NVIDIA GPU"),
    ("cudnn", select.CallShape(platform="gpu", dtype="bfloat16", head_dim=64), r"log-sum-exp has no gradient"),
    ("cudnn", select.CallShape(platform="gpu", dtype="float32", head_dim=64, need_lse=False), r"float16/bfloat16"),
    ("cudnn", select.CallShape(platform="gpu", dtype="bfloat16", head_dim=264, need_lse=False), r"multiple of 8"),
    ("xla", select.CallShape(platform="gpu", dtype="bfloat16", head_dim=64, dropout=True), None),
])
def test_unsupported_reasons(name, call, match):
    reason = select.unsupported(name, call)
    if match is None:
        assert reason is None
    else:
        assert reason is not None and re.search(match, reason), reason


def test_named_backend_that_cannot_serve_raises():
    q = jnp.ones((1, 8, 2, 4), jnp.float64)
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot serve this call: .*float64"):
        attend(q, q, q, scale=0.5, implementation="pallas")
    with pytest.raises(ValueError, match=r"implementation='cudnn' cannot serve this call: cuDNN attention needs"):
        attend(q, q, q, scale=0.5, need_lse=False, implementation="cudnn")


def test_probe_failure_falls_back_once_with_a_warning(monkeypatch):
    """A kernel that fails its probe on a (made-up) GPU is skipped with one warning naming the reason."""
    def broken(*args, **kwargs):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(select.pallas, "flash_attention", broken)
    monkeypatch.setattr(select.cudnn, "attention", broken)
    select.probe.cache_clear()
    select._warn_once.cache_clear()
    call = select.CallShape(platform="gpu", dtype="float32", head_dim=16, need_lse=False)
    with pytest.warns(RuntimeWarning, match=r"pallas attention kernel is skipped .* RuntimeError: no Triton here"):
        assert select.choose(call) == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select.choose(call) == "xla"  # remembered: no second probe, no second warning
    select.probe.cache_clear()
    select._warn_once.cache_clear()


def test_probe_passes_for_the_interpreted_pallas_kernel():
    """On the CPU the probe can run our Pallas kernel (interpreted) against the XLA kernel."""
    call = select.CallShape(platform="cpu", dtype="float32", head_dim=16, is_causal=True, has_mask=True)
    assert select.probe("pallas", call) is None


def test_pallas_through_the_public_api_on_the_cpu():
    """implementation='pallas' runs our kernel (interpret mode here) inside a dilated call."""
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, 16)), jnp.float32) for _ in range(3))
    kw = dict(segment_lengths=(32, 64), dilation_rates=(1, 2), is_causal=True, merge="lse")
    with jax.default_matmul_precision("highest"):
        got = jd.improved_dilated_attention(q, k, v, implementation="pallas", **kw)
        want = jd.improved_dilated_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
