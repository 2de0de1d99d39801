"""Standard and improved dilated attention, JAX and torch, against the float64 reference (semantics 1-3, 8)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_dilated as jd
from jax_dilated.kernels import Tiling, Xla
import torch_ref as tr
from parity_tests import reference as ref
from parity_tests.implementations import DILATED
from parity_tests.strategies import dilated_configs, random_padding, random_qkv

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
SETTINGS = settings(max_examples=10, deadline=None)


def f32_bound(expected: np.ndarray) -> float:
    """Semantics 8: float32 max abs error <= 1e-5 * max|ref| + 1e-6."""
    return 1e-5 * float(np.abs(expected).max(initial=0.0)) + 1e-6


def opts(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("segment_lengths", "dilation_rates", "is_causal", "merge")}


@pytest.mark.parametrize("impl", DILATED, ids=repr)
@SETTINGS
@given(cfg=dilated_configs(), padded=st.booleans(), custom_scale=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_float64_matches_reference(impl, cfg, padded, custom_scale, seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, cfg["b"], cfg["n"], cfg["h"], cfg["d"])
    mask = random_padding(rng, cfg["b"], cfg["n"]) if padded else None
    scale = float(rng.uniform(0.1, 1.0)) if custom_scale else None
    expected = ref.dilated_attention(q, k, v, scale=scale, key_padding_mask=mask, **opts(cfg))
    got = impl.run(q, k, v, key_padding_mask=mask, scale=scale, **opts(cfg))
    assert got.dtype == np.float64 and got.shape == q.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", DILATED, ids=repr)
@SETTINGS
@given(cfg=dilated_configs(max_n=64), seed=st.integers(0, 2**32 - 1))
def test_float32_within_spec_bound(impl, cfg, seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, cfg["b"], cfg["n"], cfg["h"], cfg["d"], dtype=np.float32, scale=2.0)
    expected = ref.dilated_attention(q, k, v, **opts(cfg))
    with jax.default_matmul_precision("highest"):
        got = impl.run(q, k, v, **opts(cfg))
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= f32_bound(expected)


def test_worked_example_of_spec():
    """Semantics 1: n=8, h=3, segments (4, 8), rates (1, 2): head 2 is zero at even positions."""
    rng = np.random.default_rng()
    q, k, v = random_qkv(rng, 1, 8, 3, 4)
    cfg = dict(segment_lengths=(4, 8), dilation_rates=(1, 2))
    for impl in DILATED:
        out = impl.run(q, k, v, **cfg)
        assert np.all(out[0, 0::2, 2] == 0.0), impl
        dense01 = ref.dense_attention(q[:, :4, :2], k[:, :4, :2], v[:, :4, :2]) / 2
        np.testing.assert_allclose(out[:, :4, :2], dense01, atol=1e-12)
        odd = ref.dense_attention(q[:, 1::2, 2:], k[:, 1::2, 2:], v[:, 1::2, 2:]) / 2
        np.testing.assert_allclose(out[:, 1::2, 2:], odd, atol=1e-12)


def test_single_full_segment_is_dense_attention():
    rng = np.random.default_rng()
    q, k, v = random_qkv(rng, 2, 16, 3, 8)
    for causal in (False, True):
        expected = ref.dense_attention(q, k, v, is_causal=causal)
        for impl in DILATED:
            got = impl.run(q, k, v, segment_lengths=(16,), dilation_rates=(1,), is_causal=causal)
            np.testing.assert_allclose(got, expected, atol=1e-12)


def test_seed_golden_outputs():
    """The seed package's own float64 outputs for its standard variant (parity_tests/golden)."""
    data = np.load(GOLDEN / "seed_dilated_attention.npz")
    cases = json.loads((GOLDEN / "seed_dilated_attention.json").read_text())
    for i, case in enumerate(cases):
        q, k, v = (data[f"case{i}_{x}"] for x in "qkv")
        for impl in DILATED:
            got = impl.run(q, k, v, segment_lengths=tuple(case["segment_lengths"]),
                           dilation_rates=tuple(case["dilation_rates"]), is_causal=case["is_causal"])
            np.testing.assert_allclose(got, data[f"case{i}_out"], rtol=0, atol=1e-10, err_msg=f"{impl} case{i}")


@settings(max_examples=6, deadline=None)
@given(cfg=dilated_configs(max_n=64), seed=st.integers(0, 2**32 - 1))
def test_standard_equals_improved_in_each_framework(cfg, seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, cfg["b"], cfg["n"], cfg["h"], cfg["d"], dtype=np.float32)
    mask = random_padding(rng, cfg["b"], cfg["n"])
    by_name = {impl.name: impl for impl in DILATED}
    with jax.default_matmul_precision("highest"):
        for fw in ("jax", "torch"):
            a = by_name[f"{fw}.standard"].run(q, k, v, key_padding_mask=mask, **opts(cfg))
            b = by_name[f"{fw}.improved"].run(q, k, v, key_padding_mask=mask, **opts(cfg))
            np.testing.assert_allclose(a, b, rtol=0, atol=f32_bound(a))


# ---------------------------------------------------------------------------------------------
# Gradients


def _jax_grads(fn, q, k, v, cot, mask, **kw):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, key_padding_mask=mask, **kw) * cot)

    return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))]


def _torch_grads(fn, q, k, v, cot, mask, **kw):
    ts = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    m = None if mask is None else torch.as_tensor(mask)
    (fn(*ts, key_padding_mask=m, **kw) * torch.as_tensor(cot)).sum().backward()
    return [t.grad.numpy() for t in ts]


@settings(max_examples=6, deadline=None)
@given(cfg=dilated_configs(max_n=32), padded=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gradients_jax_torch_and_finite_differences(cfg, padded, seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, cfg["b"], cfg["n"], cfg["h"], cfg["d"])
    cot = rng.standard_normal(q.shape)
    mask = random_padding(rng, cfg["b"], cfg["n"]) if padded else None
    kw = opts(cfg)
    jmask = None if mask is None else jnp.asarray(mask)
    grads = {
        "jax.standard": _jax_grads(jd.dilated_attention, q, k, v, cot, jmask, **kw),
        "jax.improved": _jax_grads(jd.improved_dilated_attention, q, k, v, cot, jmask, **kw),
        "torch.standard": _torch_grads(tr.dilated_attention, q, k, v, cot, mask, **kw),
        "torch.improved": _torch_grads(tr.improved_dilated_attention, q, k, v, cot, mask, **kw),
    }
    base = grads["jax.improved"]
    for name, gs in grads.items():
        for g, b in zip(gs, base):
            np.testing.assert_allclose(g, b, rtol=0, atol=1e-9, err_msg=name)

    # The gradient is the derivative of the reference function: central differences along a random
    # direction. Their truncation error (~eps^2) bounds this check, not the implementations.
    eps = 1e-5

    def loss(q_, k_, v_):
        return float(np.sum(ref.dilated_attention(q_, k_, v_, key_padding_mask=mask, **kw) * cot))

    for i in range(3):
        direction = rng.standard_normal(q.shape)
        args_p = [q, k, v]
        args_m = [q, k, v]
        args_p[i] = args_p[i] + eps * direction
        args_m[i] = args_m[i] - eps * direction
        fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
        analytic = float(np.sum(base[i] * direction))
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (i, fd, analytic)


# ---------------------------------------------------------------------------------------------
# Numerics at the edges


@pytest.mark.parametrize("impl", DILATED, ids=repr)
def test_large_logits_and_fully_masked_rows_are_finite(impl):
    """Logits around 1e4 and fully padded rows: finite, exact zeros, and (in float64) the reference.

    In float32 a logit of 1e4 carries a rounding error near 1e-3, which no float32 kernel can hide
    from the float64 reference, so float32 is held to finiteness and exact zeros only.
    """
    rng = np.random.default_rng()
    b, n, h, d = 2, 16, 4, 4
    q, k, v = random_qkv(rng, b, n, h, d)
    q, k = q * 100.0, k * 100.0  # logits around 1e4
    mask = np.zeros((b, n), bool)
    mask[0] = True  # batch 0: every key padded
    mask[1, :8] = True  # batch 1: the first segment fully padded
    for merge in ("head_partition", "lse"):
        for causal in (False, True):
            kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), is_causal=causal, merge=merge)
            got32 = impl.run(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                             key_padding_mask=mask, **kw)
            assert np.isfinite(got32).all()
            assert np.all(got32[0] == 0.0)
            got64 = impl.run(q, k, v, key_padding_mask=mask, **kw)
            expected = ref.dilated_attention(q, k, v, key_padding_mask=mask, **kw)
            np.testing.assert_allclose(got64, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", DILATED, ids=repr)
def test_empty_sequence_returns_empty(impl):
    q = np.ones((2, 0, 4, 8), np.float32)
    out = impl.run(q, q, q, segment_lengths=(4, 8), dilation_rates=(1, 2))
    assert out.shape == (2, 0, 4, 8) and out.dtype == np.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("impl", DILATED, ids=repr)
def test_half_precision_within_two_percent_of_float32(impl, dtype):
    rng = np.random.default_rng()
    q, k, v = random_qkv(rng, 2, 32, 4, 16, dtype=np.float32)
    kw = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), is_causal=True, merge="lse")
    full = impl.run(q, k, v, **kw)
    if impl.framework == "jax":
        args = [jnp.asarray(x, dtype=getattr(jnp, dtype)) for x in (q, k, v)]
        fn = jd.dilated_attention if impl.name.endswith("standard") else jd.improved_dilated_attention
        out = fn(*args, **kw)
        assert out.dtype == getattr(jnp, dtype)
        half = np.asarray(out.astype(jnp.float32))
    else:
        args = [torch.as_tensor(x).to(getattr(torch, dtype)) for x in (q, k, v)]
        fn = tr.dilated_attention if impl.name.endswith("standard") else tr.improved_dilated_attention
        out = fn(*args, **kw)
        assert out.dtype == getattr(torch, dtype)
        half = out.float().numpy()
    assert np.abs(half - full).max() <= 2e-2 * np.abs(full).max()


# ---------------------------------------------------------------------------------------------
# Transformations


def test_jit_grad_vmap_compose():
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 3, 16, 4, 8, dtype=np.float32))
    kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), is_causal=True)
    f = jax.jit(lambda q, k, v: jd.improved_dilated_attention(q, k, v, **kw))
    direct = jd.improved_dilated_attention(q, k, v, **kw)
    np.testing.assert_allclose(f(q, k, v), direct, atol=1e-6)
    # vmap over a leading axis of per-example batches of 1
    mapped = jax.vmap(lambda a, b, c: jd.dilated_attention(a[None], b[None], c[None], **kw)[0])(q, k, v)
    np.testing.assert_allclose(mapped, direct, atol=1e-5)
    g = jax.jit(jax.grad(lambda q: jnp.sum(jd.improved_dilated_attention(q, k, v, **kw) ** 2)))(q)
    assert g.shape == q.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_dropout_rate_is_honoured_and_reproducible():
    rng = np.random.default_rng()
    # 128 kept positions per segment, through the kernel of each form
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 2, 256, 4, 8, dtype=np.float32))
    kw = dict(segment_lengths=(128, 256), dilation_rates=(1, 2))
    key = jax.random.key(int(rng.integers(2**31)))
    plain = jd.improved_dilated_attention(q, k, v, **kw)
    a = jd.improved_dilated_attention(q, k, v, dropout_rate=0.5, dropout_rng=key, **kw)
    b = jd.dilated_attention(q, k, v, dropout_rate=0.5, dropout_rng=key, **kw)
    assert float(jnp.abs(a - plain).max()) > 1e-3  # dropout changed the result
    np.testing.assert_allclose(a, b, atol=1e-5)  # standard and improved draw the same mask


TILINGS = {
    "one-step": Tiling(step_scores=1 << 30),
    "unit-steps-causal-tiles": Tiling(step_scores=128 * 128, causal_tiles=4, causal_tile_min=16),
    "long-rows": Tiling(step_scores=1, query_tile=48, key_tile=40),
}


def test_improved_tiling_paths_match_reference():
    """Every way the kernel walks the scores (one step; unit steps with causal tiles; query tiles with
    key tiles), chosen through ``implementation=Xla(tiling=...)``, gives the reference values,
    standard's gradients, and the same dropout mask as the default tiling (and, on the long-row path,
    whose backward redraws the mask per key tile, the same dropout gradients). The kernel tests check
    every tiling's dropout gradients against the plain form."""
    rng = np.random.default_rng()
    b, n, h, d = 2, 256, 2, 4  # kept positions per segment m = 128
    q, k, v = random_qkv(rng, b, n, h, d)
    mask = random_padding(rng, b, n)
    kw = dict(segment_lengths=(128, 256), dilation_rates=(1, 2), is_causal=True, key_padding_mask=mask)
    loss = lambda f, **extra: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, **kw, **extra)))
    key = jax.random.key(int(rng.integers(2**31)))
    args = [jnp.asarray(x) for x in (q, k, v)]
    grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(*args)
    drop = dict(dropout_rate=0.3, dropout_rng=key)
    want = ref.dilated_attention(q, k, v, **kw)
    expected_grads = grad(loss(jd.dilated_attention))
    default_dropped = jd.improved_dilated_attention(*args, **kw, **drop)
    for name, tiling in TILINGS.items():
        impl = dict(implementation=Xla(tiling))
        got = jd.improved_dilated_attention(*args, **kw, **impl)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=name)
        for g, e in zip(grad(loss(jd.improved_dilated_attention, **impl)), expected_grads):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-9, err_msg=name)
        dropped = jd.improved_dilated_attention(*args, **kw, **drop, **impl)
        np.testing.assert_allclose(dropped, default_dropped, rtol=0, atol=1e-12, err_msg=name)
    impl = dict(implementation=Xla(TILINGS["long-rows"]))
    for g, e in zip(grad(loss(jd.improved_dilated_attention, **drop, **impl)),
                    grad(loss(jd.improved_dilated_attention, **drop))):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Validation (semantics 3): the same errors, the same messages, in every implementation.

BAD_CONFIGS = [
    (dict(segment_lengths=(), dilation_rates=()), ValueError, r"segment_lengths=\(\) is empty"),
    (dict(segment_lengths=(8, 16), dilation_rates=(1,)), ValueError, r"different lengths \(2 vs 1\)"),
    (dict(segment_lengths=(8, 0), dilation_rates=(1, 1)), ValueError, r"holds 0; every value must be a positive"),
    (dict(segment_lengths=(8, 16), dilation_rates=(1, -2)), ValueError, r"holds -2; every value must be a positive"),
    (dict(segment_lengths=(8, 12), dilation_rates=(1, 5)), ValueError, r"segment length 12 is not divisible by its dilation rate 5"),
    (dict(segment_lengths=(2, 4, 8, 16, 16), dilation_rates=(1, 1, 1, 1, 1)), ValueError, r"num_heads=4 is smaller than the number of groups 5"),
    (dict(segment_lengths=(8,), dilation_rates=(1,), merge="mean"), ValueError, r"merge='mean' is unknown"),
    (dict(segment_lengths=(8,), dilation_rates=(1,), key_padding_mask=np.zeros((2, 8), bool)), ValueError, r"key_padding_mask has shape \(2, 8\); expected \(batch, seq\) = \(2, 16\)"),
    (dict(segment_lengths=(8,), dilation_rates=(1,), key_padding_mask=np.zeros((2, 16), np.float32)), TypeError, r"key_padding_mask has dtype (torch\.)?float32; pass a boolean"),
]


@pytest.mark.parametrize("impl", DILATED, ids=repr)
@pytest.mark.parametrize("kwargs,exc,match", BAD_CONFIGS)
def test_bad_configuration_raises_with_message(impl, kwargs, exc, match):
    q = np.random.default_rng().standard_normal((2, 16, 4, 8)).astype(np.float32)
    with pytest.raises(exc, match=match):
        impl.run(q, q, q, **kwargs)


@pytest.mark.parametrize("impl", DILATED, ids=repr)
def test_bad_arrays_raise_with_message(impl):
    rng = np.random.default_rng()
    q = rng.standard_normal((2, 16, 4, 8)).astype(np.float32)
    kw = dict(segment_lengths=(8,), dilation_rates=(1,))
    with pytest.raises(ValueError, match=r"q has shape \(16, 4, 8\) \(3-D\); pass 4-D arrays"):
        impl.run(q[0], q[0], q[0], **kw)
    with pytest.raises(ValueError, match=r"q, k, v have shapes \(2, 16, 4, 8\), \(2, 16, 4, 8\), \(2, 16, 4, 4\)"):
        impl.run(q, q, q[..., :4], **kw)
    with pytest.raises(TypeError, match=r"q has dtype (torch\.)?int32; pass a floating dtype"):
        impl.run(q.astype(np.int32), q, q, **kw)


def test_import_changes_no_global_state():
    """Importing the packages flips no JAX config and no torch switch (fresh interpreter)."""
    code = (
        "import jax, torch\n"
        "before = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision, torch.get_default_dtype(),"
        " torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,"
        " torch.are_deterministic_algorithms_enabled())\n"
        "import jax_dilated, torch_ref\n"
        "after = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision, torch.get_default_dtype(),"
        " torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,"
        " torch.are_deterministic_algorithms_enabled())\n"
        "assert before == after, (before, after)\n"
        "print('unchanged')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "unchanged" in res.stdout, res.stderr


@pytest.mark.parametrize("package,other", [("jax_dilated", "torch"), ("torch_ref", "jax"), ("dilated_plan", "jax"),
                                           ("dilated_plan", "torch")])
def test_packages_do_not_import_each_other(package, other):
    """In a fresh interpreter, importing one package imports neither the other framework nor its package."""
    code = (f"import sys, {package}\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in ({other!r}, 'jax_dilated', 'torch_ref')"
            f" and m.split('.')[0] != {package!r})\n"
            "print(bad)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
