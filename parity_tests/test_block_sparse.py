"""Block layouts and block-sparse attention (docs/semantics.md section 5): JAX vs torch vs the plain float64 reference."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_dilated as jd
import jax_dilated.block_sparse as jbs
import torch_ref as tr
import torch_ref.block_sparse as tbs
from parity_tests import reference_block_sparse as ref
from parity_tests.strategies import random_padding, random_qkv

PATTERNS = ("local_window", "dilated_sparse", "global_local")
RATIOS = (0.0, 0.5, 0.75, 0.9)


def _rng() -> np.random.Generator:
    return np.random.default_rng()


# ----------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("global_blocks", [0, 1, 2])
def test_layout_matches_reference_and_budget(pattern, is_causal, global_blocks):
    for nb in (1, 2, 3, 5, 8, 13, 16):
        for ratio in RATIOS:
            bs = 1 + nb % 3
            args = (nb * bs, bs, pattern, ratio, global_blocks, is_causal)
            want = ref.block_layout(*args)
            got_jax, got_torch = jd.block_layout(*args), tr.block_layout(*args)
            assert got_jax.shape == got_torch.shape == (nb, nb) and got_jax.dtype == bool
            np.testing.assert_array_equal(got_jax, want, err_msg=str(args))
            np.testing.assert_array_equal(got_torch, want, err_msg=str(args))
            k = max(1, nb - int(np.floor(ratio * nb)))
            candidates = np.arange(nb) + 1 if is_causal else np.full(nb, nb)
            np.testing.assert_array_equal(want.sum(axis=1), np.minimum(k, candidates))
            assert want.diagonal().all() or pattern == "global_local"
            if is_causal:
                assert not np.triu(want, 1).any()


@pytest.mark.parametrize(
    "pattern, ratio, global_blocks, is_causal, rows",
    [
        # nb = 8, k = 4: first and last rows written out by hand from the semantics rules
        ("local_window", 0.5, 1, False, {0: [0, 1, 2, 3], 3: [2, 3, 4, 1], 7: [4, 5, 6, 7]}),
        ("dilated_sparse", 0.5, 1, False, {0: [0, 1, 2, 4], 5: [5, 4, 6, 3], 7: [7, 6, 5, 3]}),
        ("global_local", 0.5, 2, False, {0: [0, 1, 2, 3], 5: [0, 1, 5, 4], 7: [0, 1, 7, 6]}),
        ("global_local", 0.5, 0, False, {0: [0, 1, 2, 3], 5: [5, 4, 6, 3], 7: [4, 5, 6, 7]}),
        ("dilated_sparse", 0.5, 1, True, {0: [0], 2: [0, 1, 2], 7: [7, 6, 5, 3]}),
        # nb = 8, k = max(1, 8 - 7) = 1 at ratio 0.9; global_local with 2 global blocks drops the diagonal
        ("global_local", 0.9, 2, False, {0: [0], 6: [0]}),
        ("dilated_sparse", 0.9, 1, False, {0: [0], 6: [6]}),
    ],
)
def test_layout_hand_examples(pattern, ratio, global_blocks, is_causal, rows):
    for layout in (jd.block_layout(16, 2, pattern, ratio, global_blocks, is_causal),
                   tr.block_layout(16, 2, pattern, ratio, global_blocks, is_causal)):
        for i, kept in rows.items():
            assert sorted(np.flatnonzero(layout[i])) == sorted(kept), (i, layout[i])


def test_layout_single_block_and_empty():
    for fw in (jd, tr):
        for pattern in PATTERNS:
            np.testing.assert_array_equal(fw.block_layout(4, 4, pattern, 0.9, 0, True), [[True]])
            assert fw.block_layout(0, 4, pattern, 0.5).shape == (0, 0)


def test_layout_is_a_fresh_copy():
    a = jd.block_layout(8, 2, "local_window", 0.5)
    a[:] = False
    assert jd.block_layout(8, 2, "local_window", 0.5).any()
    b = tr.block_layout(8, 2, "local_window", 0.5)
    b[:] = False
    assert tr.block_layout(8, 2, "local_window", 0.5).any()


# ----------------------------------------------------------------------------------------------
# Attention against dense masked attention


@st.composite
def block_configs(draw):
    bs = draw(st.integers(1, 4))
    nb = draw(st.integers(1, 6))
    return dict(
        b=draw(st.integers(1, 2)), n=bs * nb, h=draw(st.integers(1, 3)), d=draw(st.sampled_from([2, 4, 8])),
        block_size=bs, pattern=draw(st.sampled_from(PATTERNS)), sparsity_ratio=draw(st.sampled_from(RATIOS)),
        global_blocks=draw(st.integers(0, 2)), is_causal=draw(st.booleans()),
        padded=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.3])),
    )


def _run_both(q, k, v, pad, cfg):
    opts = {key: cfg[key] for key in ("block_size", "pattern", "sparsity_ratio", "global_blocks", "is_causal",
                                      "scale")}
    out_jax = jd.block_sparse_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **opts,
                                        key_padding_mask=None if pad is None else jnp.asarray(pad))
    with torch.no_grad():
        out_torch = tr.block_sparse_attention(torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v), **opts,
                                              key_padding_mask=None if pad is None else torch.as_tensor(pad))
    return np.asarray(out_jax), out_torch.numpy()


def _reference(q, k, v, pad, cfg):
    return ref.block_sparse_attention(q, k, v, cfg["block_size"], cfg["pattern"], cfg["sparsity_ratio"],
                                      cfg["global_blocks"], cfg["is_causal"], cfg["scale"], pad)


@settings(max_examples=12, deadline=None)
@given(cfg=block_configs())
def test_float64_matches_dense_masked_reference(cfg):
    rng = _rng()
    q, k, v = random_qkv(rng, cfg["b"], cfg["n"], cfg["h"], cfg["d"])
    pad = random_padding(rng, cfg["b"], cfg["n"]) if cfg["padded"] else None
    want = _reference(q, k, v, pad, cfg)
    for got in _run_both(q, k, v, pad, cfg):
        assert got.dtype == np.float64 and not np.isnan(got).any()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@settings(max_examples=8, deadline=None)
@given(cfg=block_configs())
def test_float32_within_spec_bound(cfg):
    rng = _rng()
    q, k, v = random_qkv(rng, cfg["b"], cfg["n"], cfg["h"], cfg["d"], dtype=np.float32)
    pad = random_padding(rng, cfg["b"], cfg["n"]) if cfg["padded"] else None
    want = _reference(q, k, v, pad, cfg)
    with jax.default_matmul_precision("highest"):
        outs = _run_both(q, k, v, pad, cfg)
    for got in outs:
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-6


@pytest.mark.parametrize("is_causal", [False, True])
def test_many_loop_steps_and_padding(monkeypatch, is_causal):
    """Force one query block per loop step (the large-n path) and pad whole key blocks away."""
    monkeypatch.setattr(jbs, "_CHUNK_SCORES", 1)
    monkeypatch.setattr(tbs, "_CHUNK_SCORES", 1)
    jbs._block_sparse.clear_cache()
    try:
        rng = _rng()
        cfg = dict(b=2, n=40, h=2, d=4, block_size=4, pattern="global_local", sparsity_ratio=0.5, global_blocks=2,
                   is_causal=is_causal, scale=None)
        q, k, v = random_qkv(rng, 2, 40, 2, 4, scale=3.0)
        pad = random_padding(rng, 2, 40)
        pad[0, :8] = True  # batch 0: both global blocks are padding
        pad[1, :] = True  # batch 1: every key is padding -> zero rows
        want = _reference(q, k, v, pad, cfg)
        assert not want[1].any()
        for got in _run_both(q, k, v, pad, cfg):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
        # gradients stay finite and agree where whole rows see no key
        opts = {key: cfg[key] for key in ("block_size", "pattern", "sparsity_ratio", "global_blocks", "is_causal")}
        cot = rng.standard_normal(q.shape)
        grads_jax = jax.grad(lambda *x: jnp.sum(jd.block_sparse_attention(*x, key_padding_mask=jnp.asarray(pad),
                                                                          **opts) * cot), argnums=(0, 1, 2))(
            *(jnp.asarray(x) for x in (q, k, v)))
        tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
        (tr.block_sparse_attention(tq, tk, tv, key_padding_mask=torch.as_tensor(pad), **opts)
         * torch.as_tensor(cot)).sum().backward()
        for gj, gt in zip(grads_jax, (tq.grad, tk.grad, tv.grad)):
            assert np.isfinite(gt.numpy()).all()
            np.testing.assert_allclose(np.asarray(gj), gt.numpy(), rtol=0, atol=1e-9)
        assert not tq.grad[1].any()
    finally:
        jbs._block_sparse.clear_cache()


def test_sparsity_zero_is_dense_attention():
    rng = _rng()
    q, k, v = random_qkv(rng, 1, 12, 2, 4)
    for is_causal in (False, True):
        want = ref.dense_attention(q, k, v, is_causal=is_causal)
        cfg = dict(block_size=3, pattern="dilated_sparse", sparsity_ratio=0.0, global_blocks=1, is_causal=is_causal,
                   scale=None)
        for got in _run_both(q, k, v, None, cfg):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_large_logits_stay_finite_and_bf16_close():
    rng = _rng()
    q, k, v = random_qkv(rng, 1, 16, 2, 8, dtype=np.float32, scale=100.0)  # logits ~ 1e4
    cfg = dict(block_size=4, pattern="local_window", sparsity_ratio=0.5, global_blocks=1, is_causal=True, scale=None)
    for got in _run_both(q, k, v, None, cfg):
        assert np.isfinite(got).all()
    q, k, v = random_qkv(rng, 1, 16, 2, 8, dtype=np.float32)
    with jax.default_matmul_precision("highest"):
        f32 = _run_both(q, k, v, None, cfg)
    out_jax = jd.block_sparse_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), **cfg)
    out_torch = tr.block_sparse_attention(*(torch.as_tensor(x).bfloat16() for x in (q, k, v)), **cfg)
    assert out_jax.dtype == jnp.bfloat16 and out_torch.dtype == torch.bfloat16
    for got, want in zip((np.asarray(out_jax, np.float32), out_torch.float().numpy()), f32):
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def test_empty_sequence():
    assert jd.block_sparse_attention(*(jnp.ones((2, 0, 3, 4)),) * 3, block_size=4).shape == (2, 0, 3, 4)
    assert tr.block_sparse_attention(*(torch.ones(2, 0, 3, 4),) * 3, block_size=4).shape == (2, 0, 3, 4)


# ----------------------------------------------------------------------------------------------
# Gradients


@settings(max_examples=4, deadline=None)
@given(cfg=block_configs())
def test_gradients_match_across_frameworks(cfg):
    rng = _rng()
    q, k, v = random_qkv(rng, cfg["b"], cfg["n"], cfg["h"], cfg["d"])
    cot = rng.standard_normal(q.shape)
    pad = random_padding(rng, cfg["b"], cfg["n"]) if cfg["padded"] else None
    opts = {key: cfg[key] for key in ("block_size", "pattern", "sparsity_ratio", "global_blocks", "is_causal",
                                      "scale")}

    def loss(q_, k_, v_):
        out = jd.block_sparse_attention(q_, k_, v_, key_padding_mask=None if pad is None else jnp.asarray(pad), **opts)
        return jnp.sum(out * cot)

    grads_jax = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x) for x in (q, k, v)))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = tr.block_sparse_attention(tq, tk, tv, key_padding_mask=None if pad is None else torch.as_tensor(pad), **opts)
    (out * torch.as_tensor(cot)).sum().backward()
    for gj, gt in zip(grads_jax, (tq.grad, tk.grad, tv.grad)):
        assert np.isfinite(np.asarray(gj)).all()
        np.testing.assert_allclose(np.asarray(gj), gt.numpy(), rtol=0, atol=1e-9)


def test_gradient_against_finite_differences():
    rng = _rng()
    q, k, v = random_qkv(rng, 1, 8, 1, 2)
    opts = dict(block_size=2, pattern="dilated_sparse", sparsity_ratio=0.5, is_causal=True)
    cot = rng.standard_normal(q.shape)

    def loss(x):
        return jnp.sum(jd.block_sparse_attention(x, jnp.asarray(k), jnp.asarray(v), **opts) * cot)

    g = np.asarray(jax.grad(loss)(jnp.asarray(q)))
    eps, idx = 1e-6, (0, 5, 0, 1)
    dq = np.zeros_like(q)
    dq[idx] = eps
    fd = (float(loss(jnp.asarray(q + dq))) - float(loss(jnp.asarray(q - dq)))) / (2 * eps)
    assert abs(fd - g[idx]) < 1e-6


# ----------------------------------------------------------------------------------------------
# Dropout and the torch module


def test_dropout():
    rng = _rng()
    q, k, v = random_qkv(rng, 1, 16, 2, 4)
    opts = dict(block_size=4, pattern="local_window", sparsity_ratio=0.5)
    plain = np.asarray(jd.block_sparse_attention(*(jnp.asarray(x) for x in (q, k, v)), **opts))
    key = jax.random.key(int(rng.integers(2**31)))
    drop = [np.asarray(jd.block_sparse_attention(*(jnp.asarray(x) for x in (q, k, v)), dropout_rate=0.5,
                                                 dropout_rng=key, **opts)) for _ in range(2)]
    np.testing.assert_array_equal(drop[0], drop[1])
    assert np.isfinite(drop[0]).all() and np.abs(drop[0] - plain).max() > 1e-3
    with pytest.raises(ValueError, match=re.escape("dropout_rate=0.5 needs a dropout_rng key")):
        jd.block_sparse_attention(*(jnp.asarray(x) for x in (q, k, v)), dropout_rate=0.5, **opts)

    module = tr.BlockSparseDilatedAttention(4, "local_window", 0.5, dropout=0.5)
    tq, tk, tv = (torch.as_tensor(x) for x in (q, k, v))
    torch.manual_seed(int(rng.integers(2**31)))
    state = torch.get_rng_state()
    a = module(tq, tk, tv)
    torch.set_rng_state(state)
    np.testing.assert_array_equal(a.numpy(), module(tq, tk, tv).numpy())
    assert np.abs(a.numpy() - plain).max() > 1e-3
    module.eval()
    np.testing.assert_allclose(module(tq, tk, tv).numpy(), plain, rtol=0, atol=1e-12)


def test_torch_module_matches_function():
    rng = _rng()
    q, k, v = (torch.as_tensor(x) for x in random_qkv(rng, 2, 24, 2, 4))
    pad = torch.as_tensor(random_padding(rng, 2, 24))
    module = tr.BlockSparseDilatedAttention(block_size=4, pattern="global_local", sparsity_ratio=0.75,
                                            global_blocks=2, scale=0.5)
    assert "global_local" in repr(module) and not list(module.parameters())
    got = module(q, k, v, is_causal=True, key_padding_mask=pad)
    want = ref.block_sparse_attention(q.numpy(), k.numpy(), v.numpy(), 4, "global_local", 0.75, 2, True, 0.5,
                                      pad.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Bad input: the same message in both frameworks


BAD = [
    (dict(block_size=0), ValueError, "block_size=0 must be a positive integer"),
    (dict(block_size=2.0), ValueError, "block_size=2.0 must be a positive integer"),
    (dict(sparsity_ratio=1.0), ValueError, "sparsity_ratio=1.0 is outside [0, 1)"),
    (dict(sparsity_ratio=-0.1), ValueError, "sparsity_ratio=-0.1 is outside [0, 1)"),
    (dict(sparsity_ratio=float("nan")), ValueError, "sparsity_ratio=nan is outside [0, 1)"),
    (dict(pattern="strided"), ValueError, "pattern='strided' is unknown; use one of"),
    (dict(global_blocks=-1), ValueError, "global_blocks=-1 must be an integer >= 0"),
    (dict(global_blocks=1.5), ValueError, "global_blocks=1.5 must be an integer >= 0"),
]


def _error_message(fn) -> tuple[type, str]:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return type(exc), str(exc)
    raise AssertionError("no error raised")


@pytest.mark.parametrize("bad, exc, message", BAD)
def test_bad_options_same_message_everywhere(bad, exc, message):
    opts = dict(block_size=4, pattern="dilated_sparse", sparsity_ratio=0.5, global_blocks=1) | bad
    qj = jnp.ones((1, 16, 2, 4))
    qt = torch.ones(1, 16, 2, 4)
    layout_args = (16, opts["block_size"], opts["pattern"], opts["sparsity_ratio"], opts["global_blocks"])
    calls = [lambda: jd.block_sparse_attention(qj, qj, qj, **opts),
             lambda: tr.block_sparse_attention(qt, qt, qt, **opts),
             lambda: jd.block_layout(*layout_args),
             lambda: tr.block_layout(*layout_args)]
    if "block_size" not in bad or bad["block_size"] != 5:
        calls.append(lambda: tr.BlockSparseDilatedAttention(**opts))
    results = []
    for call in calls:
        with pytest.raises(exc, match=re.escape(message)):
            call()
        results.append(_error_message(call))
    assert len(set(results)) == 1, results


def test_bad_tensors_and_dropout():
    qj, qt = jnp.ones((1, 8, 2, 4)), torch.ones(1, 8, 2, 4)
    with pytest.raises(ValueError, match=re.escape("key_padding_mask has shape (1, 4)")):
        jd.block_sparse_attention(qj, qj, qj, block_size=4, key_padding_mask=jnp.zeros((1, 4), bool))
    with pytest.raises(ValueError, match=re.escape("key_padding_mask has shape (1, 4)")):
        tr.block_sparse_attention(qt, qt, qt, block_size=4, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="pass a floating dtype"):
        jd.block_sparse_attention(*(jnp.ones((1, 8, 2, 4), jnp.int32),) * 3, block_size=4)
    with pytest.raises(TypeError, match="pass a floating dtype"):
        tr.block_sparse_attention(*(torch.ones(1, 8, 2, 4, dtype=torch.int32),) * 3, block_size=4)
    with pytest.raises(ValueError, match=re.escape("dropout rate 1.0 is outside [0, 1)")):
        jd.block_sparse_attention(qj, qj, qj, block_size=4, dropout_rate=1.0, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape("dropout rate 1.0 is outside [0, 1)")):
        tr.block_sparse_attention(qt, qt, qt, block_size=4, dropout_p=1.0)
    with pytest.raises(ValueError, match=re.escape("dropout rate 1.0 is outside [0, 1)")):
        tr.BlockSparseDilatedAttention(4, dropout=1.0)
