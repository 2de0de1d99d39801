"""Bad and degenerate input at every public entry point of both packages (semantics sections 3 and 11).

Every refusal must be our own ValueError/TypeError naming the value (raised from jax_dilated,
torch_ref or dilated_plan, never from inside JAX, torch or NumPy), and masked keys must get exactly
zero weight whatever their values are.
"""

from __future__ import annotations

import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_dilated as jd
import torch_ref as tr
from parity_tests import reference as ref
from parity_tests.implementations import DILATED

SEGS, RATES = (4, 8), (1, 2)
KW = dict(segment_lengths=SEGS, dilation_rates=RATES)
OURS = ("jax_dilated", "torch_ref", "dilated_plan")


def _raises_ours(fn, match: str | None = None) -> BaseException:
    """Call ``fn``; it must raise ValueError/TypeError whose innermost frame is in our packages."""
    with pytest.raises((ValueError, TypeError), match=match) as info:
        fn()
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert any(f"/{pkg}/" in frame.filename for pkg in OURS), (frame.filename, frame.lineno, info.value)
    return info.value


def _jq(b=1, n=8, h=2, d=4):
    return jnp.asarray(np.random.default_rng().standard_normal((b, n, h, d)))


def _tq(b=1, n=8, h=2, d=4):
    return torch.randn(b, n, h, d, dtype=torch.float64)


JAX_CORES = [jd.dilated_attention, jd.improved_dilated_attention]
TORCH_CORES = [tr.dilated_attention, tr.improved_dilated_attention]


# ------------------------------------------------------------------------------------------------
# Silently wrong answers, now refused.


@pytest.mark.parametrize("bad", ["False", "yes", 2, None, 0.5])
def test_is_causal_must_be_a_bool_everywhere(bad):
    q, t = _jq(), _tq()
    mha = jd.ImprovedMultiheadDilatedAttention(8, 2, SEGS, RATES, rngs=nnx.Rngs(0))
    tmha = tr.ImprovedMultiheadDilatedAttention(8, 2, SEGS, RATES)
    calls = [lambda f=f: f(q, q, q, is_causal=bad, **KW) for f in JAX_CORES]
    calls += [lambda f=f: f(t, t, t, is_causal=bad, **KW) for f in TORCH_CORES]
    calls += [
        lambda: jd.block_sparse_attention(q, q, q, block_size=4, is_causal=bad),
        lambda: tr.block_sparse_attention(t, t, t, block_size=4, is_causal=bad),
        lambda: jd.block_layout(16, 4, is_causal=bad),
        lambda: mha(jnp.ones((1, 8, 8)), is_causal=bad),
        lambda: tmha(torch.ones(1, 8, 8), is_causal=bad),
    ]
    for call in calls:
        _raises_ours(call, match="is_causal=.* should be True or False")


def test_is_causal_accepts_numpy_bools_and_0_1():
    q = _jq()
    a = jd.improved_dilated_attention(q, q, q, is_causal=np.bool_(True), **KW)
    np.testing.assert_array_equal(a, jd.improved_dilated_attention(q, q, q, is_causal=1, **KW))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_refused(bad):
    q, t = _jq(), _tq()
    calls = [lambda f=f: f(q, q, q, scale=bad, **KW) for f in JAX_CORES]
    calls += [lambda f=f: f(t, t, t, scale=bad, **KW) for f in TORCH_CORES]
    calls += [lambda: jd.block_sparse_attention(q, q, q, block_size=4, scale=bad),
              lambda: tr.block_sparse_attention(t, t, t, block_size=4, scale=bad)]
    for call in calls:
        _raises_ours(call, match="scale=.* is not finite")


def test_scale_zero_gives_the_mean_of_visible_values():
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((1, 8, 2, 4)) for _ in range(3))
    for impl in DILATED:
        got = impl.run(q, k, v, scale=0.0, is_causal=True, **KW)
        np.testing.assert_allclose(got, ref.dilated_attention(q, k, v, scale=0.0, is_causal=True, **KW), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Masked keys get exactly zero weight whatever their values.


@pytest.mark.parametrize("poison", [np.nan, 1e30])
@pytest.mark.parametrize("impl", DILATED, ids=repr)
def test_padded_and_future_keys_never_leak(impl, poison):
    rng = np.random.default_rng()
    b, n, h, d = 2, 24, 4, 4
    q, k, v = (rng.standard_normal((b, n, h, d)) for _ in range(3))
    pad = rng.random((b, n)) < 0.3
    pad[:, 0] = False
    kw = dict(segment_lengths=(8, 24), dilation_rates=(1, 2), merge="lse")
    want_pad = ref.dilated_attention(q, k, v, key_padding_mask=pad, **kw)
    want_causal = ref.dilated_attention(q, k, v, is_causal=True, **kw)
    kb, vb = k.copy(), v.copy()
    kb[pad], vb[pad] = poison, poison
    np.testing.assert_allclose(impl.run(q, kb, vb, key_padding_mask=pad, **kw), want_pad, rtol=0, atol=1e-10)
    kf, vf = k.copy(), v.copy()
    kf[:, -1], vf[:, -1] = poison, poison  # the last position: only row n-1 may see it
    got = impl.run(q, kf, vf, is_causal=True, **kw)
    np.testing.assert_allclose(got[:, :-1], want_causal[:, :-1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_block_sparse_padded_and_future_keys_never_leak(framework):
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((1, 16, 2, 4)) for _ in range(3))
    kw = dict(block_size=4, sparsity_ratio=0.5, is_causal=True)
    if framework == "jax":
        run = lambda k, v: np.asarray(jd.block_sparse_attention(*(jnp.asarray(x) for x in (q, k, v)), **kw))
    else:
        run = lambda k, v: tr.block_sparse_attention(*(torch.as_tensor(x) for x in (q, k, v)), **kw).numpy()
    clean = run(k, v)
    kf, vf = k.copy(), v.copy()
    kf[:, -1], vf[:, -1] = np.nan, np.nan
    np.testing.assert_allclose(run(kf, vf)[:, :-1], clean[:, :-1], rtol=0, atol=1e-12)


def test_non_finite_query_poisons_its_own_row_in_every_form():
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((1, 8, 2, 4)) for _ in range(3))
    q[0, 3, 0] = np.nan
    clean = q.copy()
    clean[0, 3, 0] = 0.0
    want = ref.dilated_attention(clean, k, v, merge="lse", **KW)
    for impl in DILATED:
        got = impl.run(q, k, v, merge="lse", **KW)
        assert np.isnan(got[0, 3, 0]).all(), impl
        rest = np.ones(got.shape, bool)
        rest[0, 3, 0] = False
        np.testing.assert_allclose(got[rest], want[rest], atol=1e-12, err_msg=repr(impl))


# ------------------------------------------------------------------------------------------------
# Our errors, not JAX's, torch's or NumPy's.


def test_static_arguments_traced_under_jit_say_so():
    q = _jq()
    for f in JAX_CORES:
        _raises_ours(lambda f=f: jax.jit(lambda s: f(q, q, q, scale=s, **KW))(1.0), match="static")
        _raises_ours(lambda f=f: jax.jit(lambda c: f(q, q, q, is_causal=c, **KW))(True), match="static")
        _raises_ours(
            lambda f=f: jax.jit(lambda r: f(q, q, q, dropout_rate=r, dropout_rng=jax.random.key(0), **KW))(0.1),
            match="static",
        )


@pytest.mark.parametrize("key", [3, np.uint32(7), "key"])
def test_bad_dropout_keys(key):
    q = _jq()
    for f in JAX_CORES:
        _raises_ours(lambda f=f: f(q, q, q, dropout_rate=0.1, dropout_rng=key, **KW), match="one PRNG key")
    _raises_ours(lambda: jd.improved_dilated_attention(q, q, q, dropout_rate=0.1,
                                                       dropout_rng=jax.random.split(jax.random.key(0), 2), **KW),
                 match="one PRNG key")


def test_degenerate_sizes_return_empty_or_zero_results():
    for b, n, h, d, merge in ((0, 8, 2, 4, "head_partition"), (1, 8, 2, 0, "head_partition"), (1, 8, 0, 4, "lse"),
                              (1, 0, 2, 4, "head_partition")):
        x = np.zeros((b, n, h, d))
        for impl in DILATED:
            out = impl.run(x, x, x, merge=merge, **KW)
            assert out.shape == (b, n, h, d) and not np.any(out), (impl, b, n, h, d)


def test_torch_refuses_non_tensors_and_the_modules_name_missing_streams():
    a = np.ones((1, 8, 2, 4)).tolist()
    for f in TORCH_CORES:
        _raises_ours(lambda f=f: f(a, a, a, **KW), match="is a list; pass an array")
    _raises_ours(lambda: jd.ImprovedMultiheadDilatedAttention(8, 2, SEGS, RATES, dropout=0.1, rngs=nnx.Rngs(params=0)),
                 match="needs a 'dropout'")


def test_conversion_refusals():
    _raises_ours(lambda: jd.to_torch_state_dict(object()), match="pass an nnx.Module")
    mha = jd.ImprovedMultiheadDilatedAttention(8, 2, SEGS, RATES, rngs=nnx.Rngs(0))
    with torch.device("meta"):
        meta = tr.ImprovedMultiheadDilatedAttention(8, 2, SEGS, RATES)
    _raises_ours(lambda: jd.load_torch_state_dict(mha, meta.state_dict()), match="meta tensor")
    _raises_ours(lambda: jd.dilated_attention_fn(SEGS, RATES)(_jq(), _jq(), _jq(), precision="bogus"),
                 match="precision='bogus' is not supported")


def test_bfloat16_weights_reach_torch_bit_for_bit():
    model = jd.LongNetLM(10, 8, 2, 1, SEGS, RATES, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    arrays = jd.to_torch_state_dict(model)
    tensors = tr.state_dict_from_numpy(arrays)
    tm = tr.LongNetLM(10, 8, 2, 1, SEGS, RATES, dtype=torch.bfloat16)
    tm.load_state_dict(tensors)
    for name, a in arrays.items():
        assert tensors[name].dtype == torch.bfloat16
        np.testing.assert_array_equal(tensors[name].float().numpy(), np.asarray(a, np.float32))


# ------------------------------------------------------------------------------------------------
# Property: random invalid arguments are refused by us, never from deep inside a framework.

BAD_VALUES = {
    "segment_lengths": [(), (0, 8), (4, 7), "48", (4.5, 8), (4,)],
    "dilation_rates": [(0, 2), (1, 3), (-1, 2), None],
    "merge": ["sum", 3, None],
    "scale": [float("nan"), "0.5", [1.0]],
    "is_causal": ["True", 2, None],
    "key_padding_mask": ["mask", np.zeros((1, 7), bool), np.zeros((1, 8), np.float32)],
    "document_ids": [np.zeros((1, 7), np.int32), np.zeros((1, 8), np.float32)],
}


@settings(max_examples=40, deadline=None)
@given(arg=st.sampled_from(sorted(BAD_VALUES)), pick=st.integers(0, 5), framework=st.sampled_from(["jax", "torch"]),
       form=st.integers(0, 1))
def test_invalid_arguments_are_refused_by_us(arg, pick, framework, form):
    bad = BAD_VALUES[arg][pick % len(BAD_VALUES[arg])]
    kw = {**KW, arg: bad}
    if framework == "jax":
        q = _jq()
        if arg in ("key_padding_mask", "document_ids") and isinstance(bad, np.ndarray):
            kw[arg] = jnp.asarray(bad)
        _raises_ours(lambda: JAX_CORES[form](q, q, q, **kw))
    else:
        t = _tq()
        if arg in ("key_padding_mask", "document_ids") and isinstance(bad, np.ndarray):
            kw[arg] = torch.as_tensor(bad)
        _raises_ours(lambda: TORCH_CORES[form](t, t, t, **kw))


def test_ring_refusals():
    q = _jq(1, 16, 2, 4)
    mesh = jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2])
    _raises_ours(lambda: jd.ring_dilated_attention(q, q, q, mesh=[mesh], **KW), match="should be a jax.sharding.Mesh")
    _raises_ours(lambda: jd.ring_dilated_attention(q, q, q, mesh=mesh, is_causal="no", **KW), match="is_causal")
    _raises_ours(lambda: jd.ring_dilated_attention(q, q, q, mesh=mesh, scale=float("nan"), **KW), match="not finite")
    t = _tq(1, 16, 2, 4)
    _raises_ours(lambda: tr.ring_dilated_attention(t, t, t, is_causal="no", **KW), match="is_causal")
