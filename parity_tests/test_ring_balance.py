"""Ring attention for training (issue 13): zigzag load balance, GQA, any length, torch backward, work counts.

JAX runs on the 8 CPU devices that conftest.py forces; torch runs in gloo processes on loopback
(one spawn per world size). Every comparison is against the single-device function in float64.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

import jax_dilated as jd
import torch_ref as tr
from dilated_plan import DilatedConfig
from dilated_plan.ring import balance, ring_layout, ring_tiles, ring_work, zigzag_order
from jax_dilated.ring import ring_tile_counts
from parity_tests import reference as ref
from parity_tests.gloo import run_ranks


def _mesh(p: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:p]), ("seq",))


def _qkv(rng, b, n, h, h_kv, d):
    return rng.standard_normal((b, n, h, d)), rng.standard_normal((b, n, h_kv, d)), rng.standard_normal((b, n, h_kv, d))


def test_zigzag_round_trip_and_layout():
    x = np.random.default_rng().standard_normal((2, 32, 3))
    for p in (2, 4, 8):
        z = jd.to_zigzag(x, p)
        np.testing.assert_array_equal(np.asarray(jd.from_zigzag(z, p)), x)
        np.testing.assert_array_equal(tr.to_zigzag(torch.as_tensor(x), p).numpy(), np.asarray(z))
        np.testing.assert_array_equal(tr.from_zigzag(tr.to_zigzag(torch.as_tensor(x), p), p).numpy(), x)
        half = 32 // (2 * p)
        for j in range(p):  # device j holds half-chunks j and 2P-1-j
            want = np.r_[j * half : (j + 1) * half, (2 * p - 1 - j) * half : (2 * p - j) * half]
            np.testing.assert_array_equal(zigzag_order(32, p)[2 * j * half : 2 * (j + 1) * half], want)
    with pytest.raises(ValueError, match=r"n=30 is not a multiple of 2P=8 .*pad the sequence to n=32"):
        jd.to_zigzag(np.zeros((1, 30)), 4)


# (P, n, segments, rates, causal, merge, h, h_kv, padding, with gradients)
ZIGZAG = [
    (2, 16, (16,), (2,), True, "head_partition", 2, 1, False, True),  # one segment over both devices
    (4, 32, (4, 32), (1, 2), True, "lse", 4, 2, True, False),  # a local and a whole-sequence group
    (8, 32, (8, 32), (1, 2), True, "head_partition", 4, 4, True, False),  # rings of 2 and of 8 devices
    (4, 32, (8, 16), (2, 2), False, "head_partition", 4, 2, False, False),  # bidirectional
]


@pytest.mark.parametrize("p,n,seg,rates,causal,merge,h,h_kv,padding,grads", ZIGZAG,
                         ids=[f"P{c[0]}-{c[2]}-{'causal' if c[4] else 'full'}-{c[5]}-kv{c[7]}" for c in ZIGZAG])
def test_jax_zigzag_equals_single_device(p, n, seg, rates, causal, merge, h, h_kv, padding, grads):
    rng = np.random.default_rng()
    q, k, v = _qkv(rng, 2, n, h, h_kv, 3)
    mask = (rng.random((2, n)) < 0.25) if padding else None
    kw = dict(segment_lengths=seg, dilation_rates=rates, is_causal=causal, merge=merge)
    want = ref.dilated_attention(q, k, v, seg, rates, causal, None, merge, mask)
    zmask = None if mask is None else jd.to_zigzag(mask, p)

    def ring(q, k, v):
        out = jd.ring_dilated_attention(jd.to_zigzag(q, p), jd.to_zigzag(k, p), jd.to_zigzag(v, p), mesh=_mesh(p),
                                        key_padding_mask=zmask, load_balance="zigzag", **kw)
        return jd.from_zigzag(out, p)

    args = [jnp.asarray(x) for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(ring(*args)), want, rtol=0, atol=1e-10)
    if grads:
        w = jnp.asarray(rng.standard_normal(q.shape))
        mk = None if mask is None else jnp.asarray(mask)
        got = jax.jit(jax.grad(lambda *a: jnp.sum(w * ring(*a)), argnums=(0, 1, 2)))(*args)
        single = jax.grad(lambda *a: jnp.sum(w * jd.dilated_attention(*a, key_padding_mask=mk, **kw)),
                          argnums=(0, 1, 2))
        for g, s in zip(got, jax.jit(single)(*args), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(s), rtol=0, atol=1e-10)


@pytest.mark.parametrize("p,n,seg,rates,merge,h,h_kv", [
    (4, 32, (8, 32), (1, 2), "head_partition", 6, 2),  # a group splits a kv head's query heads: 2 buckets
    (8, 21, (4, 16), (1, 4), "lse", 4, 1),  # any length: padded to a valid plan, exact
])
def test_jax_ring_gqa_and_any_length(p, n, seg, rates, merge, h, h_kv):
    rng = np.random.default_rng()
    q, k, v = _qkv(rng, 2, n, h, h_kv, 3)
    mask = rng.random((2, n)) < 0.2
    want = ref.dilated_attention(q, k, v, seg, rates, True, None, merge, mask)
    got = jd.ring_dilated_attention(*(jnp.asarray(x) for x in (q, k, v)), segment_lengths=seg, dilation_rates=rates,
                                    mesh=_mesh(p), is_causal=True, merge=merge, key_padding_mask=jnp.asarray(mask))
    assert got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)


_PERMUTE = re.compile(r"= ([a-z0-9]+)\[([0-9,]*)\][^ ]* collective-permute(?:-start)?\(")


@pytest.mark.parametrize("load_balance", [None, "zigzag"])
def test_hlo_permutes_are_sized_by_kv_heads(load_balance):
    # h = 8 query heads over h_kv = 2 key/value heads, one spanning group: every collective-permute
    # carries the stacked (k, v) block of the 2 kv heads, (2, b, parts, c / (parts r), h_kv, d), never 8.
    rng = np.random.default_rng()
    p, n, b, d, r = 4, 32, 1, 2, 2
    sizes = {}
    for h_kv in (2,):
        args = [jnp.asarray(x, jnp.float32) for x in _qkv(rng, b, n, 8, h_kv, d)]
        fn = jax.jit(lambda q, k, v: jd.ring_dilated_attention(q, k, v, segment_lengths=(32,), dilation_rates=(r,),
                                                               mesh=_mesh(p), load_balance=load_balance))
        text = fn.lower(*args).compile().as_text()
        shapes = {(t, s) for t, s in _PERMUTE.findall(text)}
        parts = 2 if load_balance else 1
        assert shapes == {("f32", f"2,{b},{parts},{n // p // parts // r},{h_kv},{d}")}, shapes
        sizes[h_kv] = 2 * b * (n // p // r) * h_kv * d * 4  # bytes per hop
    assert sizes[2] == 128  # repeating k, v to the 8 query heads would send 512


@pytest.mark.parametrize("p,n,seg,rates,causal,merge,h,load_balance", [
    (8, 64, (64,), (1,), True, "head_partition", 2, "zigzag"),
    (8, 64, (64,), (1,), True, "head_partition", 2, None),
    (4, 32, (8, 32), (1, 2), False, "lse", 4, None),
])
def test_tile_counts_of_the_program_equal_the_plan(p, n, seg, rates, causal, merge, h, load_balance):
    q, k, v = (jnp.asarray(x) for x in _qkv(np.random.default_rng(), 1, n, h, h, 2))
    got = ring_tile_counts(q, k, v, segment_lengths=seg, dilation_rates=rates, mesh=_mesh(p), is_causal=causal,
                           merge=merge, load_balance=load_balance)
    plan = ring_tiles(n, p, DilatedConfig(seg, rates, merge), h, causal, load_balance)
    assert tuple(int(x) for x in got) == plan
    if causal and load_balance == "zigzag":
        assert max(plan) - min(plan) <= 1  # equal within one tile


def test_zigzag_figures_for_a_causal_segment_over_8_devices():
    n, p = 131072, 8
    cfg = DilatedConfig((n,), (1,))
    contiguous, zigzag = ring_tiles(n, p, cfg, 8, True), ring_tiles(n, p, cfg, 8, True, "zigzag")
    assert balance(contiguous) > 1.7 and balance(zigzag) <= 1.05
    assert max(ring_work(n, p, cfg, 8, True, "zigzag")) / max(ring_work(n, p, cfg, 8, True)) <= 0.6
    # Bidirectional: the same score elements either way (zigzag gains nothing there).
    assert sum(ring_work(n, p, cfg, 8, False, "zigzag")) == sum(ring_work(n, p, cfg, 8, False))
    assert ring_layout(n, p, cfg, "zigzag").rings(0) == (tuple(range(8)),)


@pytest.mark.parametrize("n,p,seg,rates,match", [
    (34, 2, (2,), (1,), r"load_balance='zigzag': n=34 is not a multiple of 2P=4"),
    (48, 4, (8,), (1,), r"half-chunk c/2=6 \(zigzag\), and segment length s=8 neither divides it"),
    (32, 4, (32,), (8,), r"half-chunk c/2=4 \(zigzag\), which is not a multiple of the dilation rate r=8"),
])
def test_zigzag_constraints_raise(n, p, seg, rates, match):
    q = jnp.zeros((1, n, 2, 2))
    with pytest.raises(ValueError, match=match):
        jd.ring_dilated_attention(q, q, q, segment_lengths=seg, dilation_rates=rates, mesh=_mesh(p),
                                  load_balance="zigzag")
    with pytest.raises(ValueError, match=r"load_balance='striped' is unknown"):
        jd.ring_dilated_attention(q, q, q, segment_lengths=seg, dilation_rates=rates, mesh=_mesh(p),
                                  load_balance="striped")


# ----------------------------------------------------------------------------------------------
# torch: gloo processes on loopback.

TORCH_CASES = [  # (segment_lengths, dilation_rates, is_causal, merge, h, h_kv, padding, load_balance), n = 32
    ((8, 32), (1, 2), True, "head_partition", 4, 2, True, "zigzag"),
    ((4, 16, 32), (1, 2, 4), True, "lse", 4, 2, False, "zigzag"),
    ((16, 32), (2, 4), True, "head_partition", 6, 2, True, None),
    ((32,), (2,), False, "lse", 2, 1, False, None),
]

_WORKER = """
c = data["q0"].shape[1] // world
sl = slice(rank * c, (rank + 1) * c)
for i, (seg, rates, causal, merge, h, h_kv, padding, lb) in enumerate(cases):
    def mine(x):
        x = torch.as_tensor(x)
        return (tr.to_zigzag(x, world) if lb else x)[:, sl]
    q, k, v = (mine(data[f"{x}{i}"]).requires_grad_() for x in "qkv")
    mask = mine(data[f"mask{i}"]) if padding else None
    out = tr.ring_dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates, is_causal=causal,
                                    merge=merge, key_padding_mask=mask, load_balance=lb)
    (out * mine(data[f"w{i}"])).sum().backward()
    for name, x in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        results[f"{name}{i}"] = x.detach().numpy()
q = torch.zeros(1, 8, 2, 2, dtype=torch.float64)
for name, kw in (("seg", dict(segment_lengths=(8 * (rank + 1),), dilation_rates=(1,))),
                 ("shape", dict(segment_lengths=(8,), dilation_rates=(1,), q=q[:, : 4 + 4 * rank]))):
    args = kw.pop("q", q)
    try:  # ranks that disagree raise on every rank, before any block is sent
        tr.ring_dilated_attention(args, args, args, **kw)
    except ValueError as e:
        results[f"error_{name}"] = np.array(str(e))
"""


def _single(q, k, v, mask, w, seg, rates, causal, merge):
    q, k, v = (torch.as_tensor(x).requires_grad_() for x in (q, k, v))
    out = tr.dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates, is_causal=causal, merge=merge,
                               key_padding_mask=None if mask is None else torch.as_tensor(mask))
    (out * torch.as_tensor(w)).sum().backward()
    return {"out": out.detach().numpy(), "dq": q.grad.numpy(), "dk": k.grad.numpy(), "dv": v.grad.numpy()}


@pytest.mark.parametrize("world", [4])  # test_ring.py covers values on 2 ranks
def test_torch_ring_gloo_values_and_gradients(world):
    rng = np.random.default_rng()
    n, b, d = 32, 2, 3
    data, wants = {}, []
    for i, (seg, rates, causal, merge, h, h_kv, padding, _) in enumerate(TORCH_CASES):
        q, k, v = _qkv(rng, b, n, h, h_kv, d)
        mask, w = rng.random((b, n)) < 0.25, rng.standard_normal((b, n, h, d))
        data.update({f"q{i}": q, f"k{i}": k, f"v{i}": v, f"mask{i}": mask, f"w{i}": w})
        wants.append(_single(q, k, v, mask if padding else None, w, seg, rates, causal, merge))
    outs = run_ranks(_WORKER, world, data, TORCH_CASES)
    for i, want in enumerate(wants):
        lb = TORCH_CASES[i][-1]
        for name in ("out", "dq", "dk", "dv"):
            got = torch.as_tensor(np.concatenate([o[f"{name}{i}"] for o in outs], axis=1))
            got = (tr.from_zigzag(got, world) if lb else got).numpy()
            np.testing.assert_allclose(got, want[name], rtol=0, atol=1e-10, err_msg=f"case {i} {name}")
    for o in outs:
        assert re.search(r"disagree on segment_lengths/dilation_rates", str(o["error_seg"]))
        assert re.search(r"disagree on q shape, k shape, v shape", str(o["error_shape"]))
