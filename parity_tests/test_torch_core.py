"""Torch-only checks of torch_ref's core: modules, dropout, SDPA edge cases, gradients, half dtypes, globals.

The cross-framework parity against the float64 reference lives in test_dilated.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_ref as tr
from torch_ref.kernels import attend, flex
from parity_tests.strategies import dilated_configs, random_padding, random_qkv

FUNCTIONS = {
    "standard": (tr.dilated_attention, tr.DilatedAttention),
    "improved": (tr.improved_dilated_attention, tr.ImprovedDilatedAttention),
}
CFG = dict(segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4))


def _qkv(rng, b, n, h, d, dtype=torch.float64):
    return tuple(torch.as_tensor(x).to(dtype) for x in random_qkv(rng, b, n, h, d))


@pytest.mark.parametrize("variant", sorted(FUNCTIONS))
@pytest.mark.parametrize("merge", ["head_partition", "lse"])
def test_eval_module_is_deterministic_and_equals_function(variant, merge):
    fn, cls = FUNCTIONS[variant]
    rng = np.random.default_rng()
    q, k, v = _qkv(rng, 2, 16, 3, 4)
    mask = torch.as_tensor(random_padding(rng, 2, 16))
    module = cls(**CFG, merge=merge, dropout=0.5, scale=0.3).eval()
    a = module(q, k, v, is_causal=True, key_padding_mask=mask)
    b = module(q, k, v, is_causal=True, key_padding_mask=mask)
    expected = fn(q, k, v, **CFG, merge=merge, scale=0.3, is_causal=True, key_padding_mask=mask)
    assert torch.equal(a, b)
    assert torch.equal(a, expected)
    assert not module.training and "dropout=0.5" in repr(module)


@pytest.mark.parametrize("variant", sorted(FUNCTIONS))
@pytest.mark.parametrize("merge", ["head_partition", "lse"])
def test_train_dropout_is_random_and_unbiased(variant, merge):
    """Mean of many dropout draws matches the no-dropout output within 6 standard errors per element.

    Each output element is a sum of independent (weight * value / (1 - p)) Bernoulli terms, whose mean
    is the no-dropout output; the standard error of the mean of N draws is estimated from the draws.
    The N draws are N copies of one input along the batch axis (independent masks, one call).
    """
    fn, cls = FUNCTIONS[variant]
    rng = np.random.default_rng()
    draws = 500
    q, k, v = _qkv(rng, 1, 16, 3, 4)
    module = cls(**CFG, merge=merge, dropout=0.3).train()
    with torch.no_grad():
        exact = fn(q, k, v, **CFG, merge=merge, is_causal=True)[0]
        outs = module(*(x.expand(draws, -1, -1, -1) for x in (q, k, v)), is_causal=True)
    assert not torch.equal(outs[0], outs[1])  # dropout acts in training mode
    assert torch.isfinite(outs).all()
    mean, stderr = outs.mean(0), outs.std(0) / draws**0.5
    assert ((mean - exact).abs() <= 6 * stderr + 1e-12).all(), ((mean - exact).abs() / (stderr + 1e-30)).max()
    assert (outs.std(0) > 0).float().mean() > 0.5  # most elements vary between draws


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("merge", ["head_partition", "lse"])
def test_fully_masked_rows_are_zero_not_nan(merge, dropout_p):
    """SDPA with an all-False mask row can give NaN; improved returns exactly 0 there, with finite gradients."""
    rng = np.random.default_rng()
    q, k, v = (x.requires_grad_() for x in _qkv(rng, 2, 16, 3, 4, torch.float32))
    mask = torch.as_tensor(random_padding(rng, 2, 16))
    mask[0] = True  # batch element 0: every key padded
    mask[1, :8] = True  # batch element 1: under causal masking the first 8 queries see no key
    for is_causal in (False, True):
        out = tr.improved_dilated_attention(q, k, v, **CFG, merge=merge, is_causal=is_causal, key_padding_mask=mask,
                                            dropout_p=dropout_p)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        if is_causal:
            assert torch.equal(out[1, :8], torch.zeros_like(out[1, :8]))
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@settings(max_examples=12, deadline=None)
@given(cfg=dilated_configs(max_n=32), padded=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_improved_gradients_equal_standard_float64(cfg, padded, seed):
    rng = np.random.default_rng(seed)
    base = _qkv(rng, cfg["b"], cfg["n"], cfg["h"], cfg["d"])
    cot = torch.as_tensor(rng.standard_normal(base[0].shape))
    mask = torch.as_tensor(random_padding(rng, cfg["b"], cfg["n"])) if padded else None
    kw = {key: cfg[key] for key in ("segment_lengths", "dilation_rates", "is_causal", "merge")}
    grads = []
    for fn in (tr.dilated_attention, tr.improved_dilated_attention):
        xs = [x.clone().requires_grad_() for x in base]
        (fn(*xs, key_padding_mask=mask, **kw) * cot).sum().backward()
        grads.append([x.grad for x in xs])
    for gs, gi in zip(*grads):
        assert torch.isfinite(gi).all()
        torch.testing.assert_close(gi, gs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("merge", ["head_partition", "lse"])
def test_half_dtypes_within_two_percent_of_float32(variant, dtype, merge):
    fn = FUNCTIONS[variant][0]
    rng = np.random.default_rng()
    q, k, v = _qkv(rng, 2, 32, 3, 8, torch.float32)
    mask = torch.as_tensor(random_padding(rng, 2, 32))
    kw = dict(**CFG, merge=merge, is_causal=True, key_padding_mask=mask)
    ref = fn(q, k, v, **kw)
    out = fn(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float() - ref).abs().max()
    assert err <= 2e-2 * ref.abs().max(), err


@pytest.mark.parametrize("variant", sorted(FUNCTIONS))
def test_module_empty_sequence_and_validation(variant):
    cls = FUNCTIONS[variant][1]
    empty = torch.randn(2, 0, 3, 4)
    out = cls(**CFG)(empty, empty, empty)
    assert out.shape == empty.shape and out.dtype == empty.dtype
    with pytest.raises(ValueError, match=r"dropout rate 1\.5 is outside \[0, 1\); pass a probability"):
        cls(**CFG, dropout=1.5)
    with pytest.raises(ValueError, match=r"segment length 6 is not divisible by its dilation rate 4"):
        cls((6,), (4,))
    with pytest.raises(ValueError, match=r"merge='mean' is unknown; use one of"):
        cls(**CFG, merge="mean")
    q = torch.randn(1, 16, 3, 4)
    with pytest.raises(ValueError, match=r"dropout rate -0\.1 is outside \[0, 1\)"):
        FUNCTIONS[variant][0](q, q, q, **CFG, dropout_p=-0.1)
    with pytest.raises(TypeError, match=r"key_padding_mask has dtype torch\.int64; pass a boolean"):
        cls(**CFG)(q, q, q, key_padding_mask=torch.zeros(1, 16, dtype=torch.int64))


def test_import_changes_no_torch_global_state():
    """Importing torch_ref (fresh interpreter) leaves torch's global switches as they were."""
    code = (
        "import torch\n"
        "state = lambda: (torch.get_default_dtype(), torch.backends.cuda.matmul.allow_tf32,"
        " torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision(),"
        " torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(), torch.is_grad_enabled(),"
        " torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())\n"
        "before = state()\n"
        "import torch_ref\n"
        "torch_ref.ImprovedDilatedAttention((4,), (1,))\n"
        "assert state() == before, (before, state())\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.skipif(not flex.available(), reason="this torch has no flex attention")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("is_causal", [False, True])
def test_flex_lse_path_forward_matches_reference(is_causal):
    """The CUDA log-sum-exp path (flex attention) runs forward on the CPU: its masks, GQA, empty rows
    and log-sum-exp against the float64 reference of the kernel (``attend`` with repeated k/v)."""
    rng = np.random.default_rng()
    q = torch.as_tensor(rng.standard_normal((2, 20, 4, 8)))
    k, v = (torch.as_tensor(rng.standard_normal((2, 20, 2, 8))) for _ in range(2))
    valid = torch.as_tensor(rng.random((2, 20)) > 0.3)
    valid[1] = False  # a row of the batch with no visible key at all
    out, lse = flex.flex_attention(q, k, v, scale=0.3, is_causal=is_causal, kv_valid=valid)
    want_out, want_lse = attend(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), scale=0.3,
                                is_causal=is_causal, kv_valid=valid)
    np.testing.assert_allclose(out.numpy(), want_out.numpy(), rtol=0, atol=1e-12)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))
    finite = torch.isfinite(want_lse)
    # flex attention keeps its log-sum-exp in float32, even for float64 inputs
    np.testing.assert_allclose(lse[finite].numpy(), want_lse[finite].numpy(), rtol=0, atol=1e-5)
    # Non-finite keys/values (padded, and at a position causal rows before it never see) and a NaN query:
    # only the rows that see them are NaN, as in the plain kernel.
    kb, vb, qb = k.clone(), v.clone(), q.clone()
    kb[0, ~valid[0]] = float("nan")
    vb[0, 5] = float("inf")
    qb[0, 2, 1] = float("nan")
    out_b, lse_b = flex.flex_attention(qb, kb, vb, scale=0.3, is_causal=is_causal, kv_valid=valid)
    want_b, want_lb = attend(qb, kb.repeat_interleave(2, dim=2), vb.repeat_interleave(2, dim=2), scale=0.3,
                             is_causal=is_causal, kv_valid=valid)
    assert torch.equal(torch.isnan(out_b), torch.isnan(want_b)) and torch.equal(torch.isnan(lse_b), torch.isnan(want_lb))
    ok = ~torch.isnan(want_b)
    np.testing.assert_allclose(out_b[ok].numpy(), want_b[ok].numpy(), rtol=0, atol=1e-12)
