"""The shapes real models use (semantics section 10): grouped-query heads, any length, packed documents.

Every implementation (JAX and torch, standard and improved) against the float64 reference, which states
the rule literally: a branch keeps position ``p`` when ``(rel mod s) mod r == o`` with ``rel`` counted
from the start of ``p``'s document, and query ``p`` sees key ``p'`` when both are kept, they lie in the
same document and the same segment of it, the key is not padding, and ``p' <= p`` if causal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_dilated as jd
import torch_ref as tr
from parity_tests import reference as ref
from parity_tests import reference_block_sparse as rbs
from parity_tests.implementations import DILATED

SEGS, RATES = (4, 8, 16), (1, 2, 4)


def _inputs(rng, b, n, h, hk, d):
    return rng.standard_normal((b, n, h, d)), rng.standard_normal((b, n, hk, d)), rng.standard_normal((b, n, hk, d))


def _documents(rng, b, n, p=0.2):
    """Random packed documents: ids that change with probability ``p`` per position (lengths 1 and up)."""
    return np.cumsum(rng.random((b, n)) < p, axis=1)


@pytest.mark.parametrize("impl", DILATED, ids=repr)
@settings(max_examples=5, deadline=None)
@given(n=st.integers(1, 48), hk=st.sampled_from([6, 3, 2, 1]), merge=st.sampled_from(["head_partition", "lse"]),
       causal=st.booleans(), padded=st.booleans(), packed=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gqa_any_length_and_documents_match_reference(impl, n, hk, merge, causal, padded, packed, seed):
    """h = 6 over h_kv in {6, 3, 2, 1} (with 3 groups, head groups split kv heads), random n in
    [1, 3 * max segment], optional key padding and packed documents."""
    rng = np.random.default_rng(seed)
    q, k, v = _inputs(rng, 2, n, 6, hk, 4)
    mask = rng.random((2, n)) < 0.3 if padded else None
    docs = _documents(rng, 2, n) if packed else None
    kw = dict(segment_lengths=SEGS, dilation_rates=RATES, is_causal=causal, merge=merge)
    want = ref.dilated_attention(q, k, v, key_padding_mask=mask, document_ids=docs, **kw)
    got = impl.run(q, k, v, key_padding_mask=mask, document_ids=docs, **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", DILATED, ids=repr)
def test_gqa_equals_repeated_keys_and_values(impl):
    rng = np.random.default_rng()
    q, k, v = _inputs(rng, 2, 32, 8, 2, 4)
    kw = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), is_causal=True)
    grouped = impl.run(q, k, v, **kw)
    repeated = impl.run(q, np.repeat(k, 4, axis=2), np.repeat(v, 4, axis=2), **kw)
    np.testing.assert_allclose(grouped, repeated, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", DILATED, ids=repr)
def test_short_sequences(impl):
    """n = 1, and n smaller than the smallest segment: one short segment per group."""
    rng = np.random.default_rng()
    for n in (1, 3):
        q, k, v = _inputs(rng, 1, n, 3, 3, 4)
        for causal in (False, True):
            kw = dict(segment_lengths=SEGS, dilation_rates=RATES, is_causal=causal)
            np.testing.assert_allclose(impl.run(q, k, v, **kw), ref.dilated_attention(q, k, v, **kw), atol=1e-12)


# The two properties below follow from agreeing with the reference; they are checked on every framework
# and form except JAX standard, whose only difference from JAX improved (index gathers instead of
# strided reshapes) the reference tests above already cover, to keep the suite's compile time down.
PROPERTY_IMPLS = [impl for impl in DILATED if impl.name != "jax.standard"]


@pytest.mark.parametrize("impl", PROPERTY_IMPLS, ids=repr)
def test_causal_prefix_property(impl):
    """With causal masking F(x[:, :m]) == F(x)[:, :m] for every m, packed documents included."""
    rng = np.random.default_rng()
    n = 37
    q, k, v = _inputs(rng, 2, n, 3, 3, 4)
    docs = _documents(rng, 2, n, 0.1)
    kw = dict(segment_lengths=SEGS, dilation_rates=RATES, is_causal=True, merge="lse")
    full = impl.run(q, k, v, document_ids=docs, **kw)
    for m in (5, 23):
        part = impl.run(q[:, :m], k[:, :m], v[:, :m], document_ids=docs[:, :m], **kw)
        np.testing.assert_allclose(part, full[:, :m], rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", PROPERTY_IMPLS, ids=repr)
def test_packed_equals_each_document_alone(impl):
    """Documents shorter than a segment, of length 1, and longer than the largest segment: the packed
    call equals running each document alone."""
    rng = np.random.default_rng()
    lengths = [1, 3, 20, 1, 3]
    n = sum(lengths)
    q, k, v = _inputs(rng, 1, n, 4, 2, 4)
    docs = np.repeat(np.arange(len(lengths)) % 2, lengths)[None]  # ids alternate: every run is its own document
    for causal in (False, True):
        kw = dict(segment_lengths=SEGS, dilation_rates=RATES, is_causal=causal, merge="lse")
        packed = impl.run(q, k, v, document_ids=docs, **kw)
        start = 0
        for length in lengths:
            s = slice(start, start + length)
            alone = impl.run(q[:, s], k[:, s], v[:, s], **kw)
            np.testing.assert_allclose(packed[:, s], alone, rtol=0, atol=1e-12)
            start += length


def test_gradients_gqa_documents_padding():
    """dq, dk, dv of JAX improved (custom VJP) equal torch standard (autograd) with GQA, documents and
    padding, and padded positions of k and v get exactly zero gradient."""
    rng = np.random.default_rng()
    b, n, h, hk, d = 2, 29, 4, 2, 4
    q, k, v = _inputs(rng, b, n, h, hk, d)
    mask = rng.random((b, n)) < 0.3
    docs = _documents(rng, b, n)
    cot = rng.standard_normal(q.shape)
    kw = dict(segment_lengths=SEGS, dilation_rates=RATES, is_causal=True, merge="lse")

    def loss(q, k, v):
        out = jd.improved_dilated_attention(q, k, v, key_padding_mask=jnp.asarray(mask),
                                            document_ids=jnp.asarray(docs), **kw)
        return jnp.sum(out * cot)

    gj = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(jnp.asarray(x) for x in (q, k, v)))
    ts = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    out = tr.dilated_attention(*ts, key_padding_mask=torch.as_tensor(mask), document_ids=torch.as_tensor(docs), **kw)
    (out * torch.as_tensor(cot)).sum().backward()
    for a, t in zip(gj, ts, strict=True):
        np.testing.assert_allclose(np.asarray(a), t.grad.numpy(), rtol=0, atol=1e-9)
    assert np.all(np.asarray(gj[1])[mask] == 0.0) and np.all(np.asarray(gj[2])[mask] == 0.0)
    assert gj[1].shape == (b, n, hk, d)


def test_block_sparse_gqa_and_any_length():
    rng = np.random.default_rng()
    for n, hk in ((23, 2), (16, 1), (9, 4)):
        q, k, v = _inputs(rng, 2, n, 4, hk, 4)
        mask = rng.random((2, n)) < 0.3
        for causal in (False, True):
            kw = dict(block_size=4, pattern="dilated_sparse", sparsity_ratio=0.5, is_causal=causal)
            want = rbs.block_sparse_attention(q, k, v, key_padding_mask=mask, **kw)
            got_j = jd.block_sparse_attention(q, k, v, key_padding_mask=mask, **kw)
            got_t = tr.block_sparse_attention(*(torch.as_tensor(x) for x in (q, k, v)),
                                              key_padding_mask=torch.as_tensor(mask), **kw)
            np.testing.assert_allclose(np.asarray(got_j), want, rtol=0, atol=1e-10)
            np.testing.assert_allclose(got_t.numpy(), want, rtol=0, atol=1e-10)
    assert jd.block_layout(23, 4, "local_window", 0.5).shape == (6, 6)


@pytest.mark.parametrize("impl", DILATED, ids=repr)
@pytest.mark.parametrize("kv_heads,extra,exc,match", [
    (3, {}, ValueError, r"q has h=4 heads and k, v have h_kv=3; grouped-query attention needs h to be a multiple"),
    (2, dict(document_ids=np.zeros((2, 15), np.int32)), ValueError, r"document_ids has shape \(2, 15\); expected"),
    (2, dict(document_ids=np.zeros((2, 16), np.float32)), TypeError, r"document_ids has dtype (torch\.)?float32; pass"),
])
def test_bad_shapes_raise(impl, kv_heads, extra, exc, match):
    rng = np.random.default_rng()
    q, k, v = _inputs(rng, 2, 16, 4, kv_heads, 8)
    with pytest.raises(exc, match=match):
        impl.run(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), segment_lengths=(8,),
                 dilation_rates=(1,), **extra)


# ----------------------------------------------------------------------------------------------
# Modules, the Flax adapter and the model


@pytest.mark.parametrize("cls", ["MultiheadDilatedAttention", "ImprovedMultiheadDilatedAttention"])
def test_modules_with_kv_heads_rotary_and_documents_convert_exactly(cls):
    """num_kv_heads (k_proj/v_proj map E -> h_kv * d), rotary positions restarting per document, and
    document_ids: the NNX module and its torch mirror agree to float64 rounding after a weight copy,
    and the packed call equals each document alone."""
    from flax import nnx

    E, H = 32, 4
    t = getattr(tr, cls)(E, H, (8, 16), (1, 2), num_kv_heads=2, rope_theta=500.0, dtype=torch.float64)
    j = getattr(jd, cls)(E, H, (8, 16), (1, 2), num_kv_heads=2, rope_theta=500.0, param_dtype=jnp.float64,
                         rngs=nnx.Rngs(0))
    assert tuple(t.k_proj.weight.shape) == (16, E)
    jd.load_torch_state_dict(j, t.state_dict())
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 21, E))
    docs = np.array([[0] * 9 + [1] * 12, [3] * 21])
    got = np.asarray(j(jnp.asarray(x), is_causal=True, document_ids=jnp.asarray(docs)))
    with torch.no_grad():
        want = t(torch.as_tensor(x), is_causal=True, document_ids=torch.as_tensor(docs)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    alone = np.asarray(j(jnp.asarray(x[:1, 9:]), is_causal=True))
    np.testing.assert_allclose(got[0, 9:], alone[0], rtol=0, atol=1e-12)


def test_flax_adapter_takes_kv_heads_and_leading_batch_axes():
    from flax import nnx

    fn = jd.dilated_attention_fn((8, 16), (1, 2))
    rng = np.random.default_rng()
    q = rng.standard_normal((2, 3, 16, 4, 8))
    k, v = rng.standard_normal((2, 3, 16, 2, 8)), rng.standard_normal((2, 3, 16, 2, 8))
    out = np.asarray(fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    flat = np.asarray(jd.improved_dilated_attention(q.reshape(6, 16, 4, 8), k.reshape(6, 16, 2, 8),
                                                    v.reshape(6, 16, 2, 8), segment_lengths=(8, 16),
                                                    dilation_rates=(1, 2)))
    np.testing.assert_allclose(out, flat.reshape(out.shape), rtol=0, atol=1e-12)
    mha = nnx.MultiHeadAttention(4, 32, num_kv_heads=2, attention_fn=fn, decode=False, rngs=nnx.Rngs(0))
    assert mha(jnp.ones((2, 3, 16, 32))).shape == (2, 3, 16, 32)


def test_model_kv_heads_rotary_documents():
    from flax import nnx

    from jax_dilated.models import LongNetLM
    from torch_ref import models as tm

    t = tm.LongNetLM(50, 32, 4, 2, (8, 16), (1, 2), num_kv_heads=2, rope_theta=1000.0, dtype=torch.float64)
    j = LongNetLM(50, 32, 4, 2, (8, 16), (1, 2), num_kv_heads=2, rope_theta=1000.0, param_dtype=jnp.float64,
                  rngs=nnx.Rngs(0))
    jd.load_torch_state_dict(j, t.state_dict())
    toks = np.random.default_rng().integers(0, 50, (2, 21))
    docs = np.array([[0] * 9 + [1] * 12, [3] * 21])
    got = np.asarray(j(jnp.asarray(toks), document_ids=jnp.asarray(docs)))
    with torch.no_grad():
        want = t(torch.as_tensor(toks), document_ids=torch.as_tensor(docs)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
    np.testing.assert_allclose(got[0, 9:], np.asarray(j(jnp.asarray(toks[:1, 9:])))[0], rtol=0, atol=1e-11)
    with pytest.raises(ValueError, match=r"num_heads=4 is not a multiple of num_kv_heads=3"):
        LongNetLM(50, 32, 4, 1, (8,), (1,), num_kv_heads=3, rngs=nnx.Rngs(0))
