"""Ring dilated attention (docs/semantics.md 7): parity on 2, 4 and 8 simulated devices, communication, errors.

JAX runs on the 8 CPU devices that conftest.py forces; torch runs in 2 and 4 gloo processes on
loopback (one spawn per world size, several configurations inside).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed as dist
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jax_dilated as jd
import torch_ref as tr
from dilated_plan import DilatedConfig, ring_plan
from parity_tests import reference as ref
from parity_tests.gloo import run_ranks


# (P, n, segment_lengths, dilation_rates, kind, is_causal, merge, padding): chunk c = n / P. "local":
# every c % s == 0; "span": every s % c == 0 with s > c; "mixed": both kinds in one call. Rates > 1 with
# offsets i % r != 0 appear in head-partition groups (group 1 with r=2 -> offset 1, group 2 with r=4 ->
# offset 2) and in every lse group with r > 1 (one branch per offset). Each row is one compiled program,
# so the options rotate over the rows instead of multiplying them (compiles dominate the test time).
CONFIGS = [
    (2, 16, (4, 8), (1, 2), "local", False, "head_partition", True),
    (2, 16, (16,), (2,), "span", True, "lse", False),
    (2, 32, (8, 32), (1, 4), "mixed", True, "head_partition", True),
    (4, 32, (8, 16, 32), (1, 2, 4), "mixed", True, "lse", True),
    (4, 32, (32, 16), (2, 2), "span", False, "head_partition", False),
    (4, 32, (4, 8), (2, 4), "local", True, "lse", False),
    (8, 32, (4, 8, 32), (1, 2, 4), "mixed", True, "head_partition", True),
    (8, 64, (16, 64), (2, 8), "span", False, "head_partition", True),
    (8, 32, (8, 32), (2, 2), "span", True, "lse", True),
]


def _mesh(p: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:p]), ("seq",))


def _inputs(rng, b, n, h, d, padding):
    q, k, v = (rng.standard_normal((b, n, h, d)) for _ in range(3))
    mask = (rng.random((b, n)) < 0.3) if padding else None
    if mask is not None:
        mask[0, : n // 2] = True  # a half-padded row: queries whose whole segment is padding give 0
    return q, k, v, mask


def _f32_bound(reference, factor=1.0):
    return factor * (1e-5 * np.abs(reference).max() + 1e-6)


def _ring(q, k, v, mask, p, seg, rates, causal, merge, axis_name="seq"):
    return jd.ring_dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates, mesh=_mesh(p),
                                     axis_name=axis_name, is_causal=causal, merge=merge,
                                     key_padding_mask=None if mask is None else jnp.asarray(mask))


@pytest.mark.parametrize("p,n,seg,rates,kind,causal,merge,padding", CONFIGS,
                         ids=[f"P{c[0]}-{c[4]}-{c[2]}-{'causal' if c[5] else 'full'}-{c[6]}" for c in CONFIGS])
def test_jax_ring_matches_reference(p, n, seg, rates, kind, causal, merge, padding):
    rng = np.random.default_rng()
    b, h, d = 2, 4, 4
    q, k, v, mask = _inputs(rng, b, n, h, d, padding)
    want = ref.dilated_attention(q, k, v, seg, rates, causal, None, merge, mask)
    got = _ring(*(jnp.asarray(x) for x in (q, k, v)), mask, p, seg, rates, causal, merge)
    assert got.dtype == jnp.float64
    assert got.sharding.spec[1] == "seq"  # returned sharded along the sequence
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)
    if kind != "local" and (p, merge) != (4, "lse") and p < 8:  # float32 where blocks travel (online merge)
        with jax.default_matmul_precision("highest"):
            got32 = _ring(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask, p, seg, rates, causal, merge)
        assert got32.dtype == jnp.float32
        assert np.abs(np.asarray(got32, np.float64) - want).max() <= _f32_bound(want)


def test_jax_ring_scale_presharded_and_jit():
    rng = np.random.default_rng()
    p, n, seg, rates = 4, 32, (8, 32), (1, 2)
    q, k, v, _ = _inputs(rng, 1, n, 2, 3, False)
    mesh = _mesh(p)
    sharded = [jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec(None, "seq"))) for x in (q, k, v)]
    fn = jax.jit(lambda q, k, v: jd.ring_dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates,
                                                           mesh=mesh, scale=0.3, is_causal=True))
    got = fn(*sharded)
    want = ref.dilated_attention(q, k, v, seg, rates, True, 0.3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)
    assert got.sharding.is_equivalent_to(sharded[0].sharding, 4)


def test_jax_ring_other_axis_name_and_2d_mesh():
    rng = np.random.default_rng()
    q, k, v, mask = _inputs(rng, 2, 32, 4, 3, True)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "sp"))
    got = jd.ring_dilated_attention(*(jnp.asarray(x) for x in (q, k, v)), segment_lengths=(8, 16),
                                    dilation_rates=(1, 2), mesh=mesh, axis_name="sp",
                                    key_padding_mask=jnp.asarray(mask))
    want = ref.dilated_attention(q, k, v, (8, 16), (1, 2), key_padding_mask=mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mesh_size", [None, 1])
def test_jax_ring_one_device_is_improved(mesh_size):
    rng = np.random.default_rng()
    q, k, v, mask = (jnp.asarray(x) if x is not None else None for x in _inputs(rng, 2, 16, 3, 4, True))
    kw = dict(segment_lengths=(4, 16), dilation_rates=(1, 4), is_causal=True, merge="lse", key_padding_mask=mask)
    mesh = None if mesh_size is None else _mesh(1)
    got = jd.ring_dilated_attention(q, k, v, mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jd.improved_dilated_attention(q, k, v, **kw)))


@pytest.mark.parametrize("p,seg,rates,causal,merge,padding", [
    # a local and a spanning group, causal skip, mask, lse weights (more hops: the zigzag gradient tests)
    (2, (8, 32), (1, 2), True, "lse", True),
])
def test_jax_ring_gradients_match_standard(p, seg, rates, causal, merge, padding):
    rng = np.random.default_rng()
    q, k, v, mask = _inputs(rng, 2, 32, 4, 3, padding)
    mask = None if mask is None else jnp.asarray(mask)
    w = jnp.asarray(rng.standard_normal((2, 32, 4, 3)))
    kw = dict(segment_lengths=seg, dilation_rates=rates, is_causal=causal, merge=merge, key_padding_mask=mask)

    def loss(fn):
        return lambda q, k, v: jnp.sum(w * fn(q, k, v, **kw))

    ring = loss(lambda q, k, v, **kw: jd.ring_dilated_attention(q, k, v, mesh=_mesh(p), **kw))
    args = [jnp.asarray(x) for x in (q, k, v)]
    got = jax.jit(jax.grad(ring, argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(loss(jd.dilated_attention), argnums=(0, 1, 2)))(*args)
    for g, s in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(s), rtol=0, atol=1e-9)


# Collective ops as they appear in compiled HLO text (an instruction is "%name = type op(operands)").
_COLLECTIVE = re.compile(r"\b(collective-permute|all-gather|all-reduce|all-to-all|reduce-scatter|"
                         r"collective-broadcast|send|recv)(-start)?\(")


def _collectives(p, seg, rates, merge, padding):
    # Distinct random arguments (not constants): XLA folds or merges permutes of constant or equal data.
    rng = np.random.default_rng()
    n, h = 32, 4
    args = [jnp.asarray(rng.standard_normal((1, n, h, 2)), jnp.float32) for _ in range(3)]
    args.append(jnp.asarray(rng.random((1, n)) < 0.3) if padding else None)
    fn = jax.jit(lambda q, k, v, m: jd.ring_dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates,
                                                              mesh=_mesh(p), merge=merge, key_padding_mask=m))
    return [m.group(1) for m in _COLLECTIVE.finditer(fn.lower(*args).compile().as_text())]


@pytest.mark.parametrize("merge", ["lse"])  # one branch per offset: the most kernel calls
def test_hlo_local_groups_have_no_collective(merge):
    assert _collectives(4, (2, 4, 8), (1, 2, 4), merge, padding=True) == []


@pytest.mark.parametrize("p,seg,rates,merge,padding", [
    (4, (4, 32), (1, 2), "lse", True),  # 2 branches x 3 hops, each hop with its mask
])
def test_hlo_spanning_groups_issue_m_minus_1_hops(p, seg, rates, merge, padding):
    # Every hop of a spanning branch is one ppermute of the stacked (k, v) block, plus one of the
    # dilated padding mask when there is one; each lowers to one collective-permute in the forward
    # program (unrolled loop: no while body repeats them). A group with segment s spans m = s / c
    # devices and passes its blocks m - 1 times; under merge="lse" a group has one branch per
    # distinct offset (min(r, h) of them), each with its own blocks. Nothing else communicates.
    n, h = 32, 4
    c = n // p
    cfg = DilatedConfig(seg, rates, merge)
    hops = sum(br.segment // c - 1 for br in cfg.branches(h) if br.segment > c)
    ops = _collectives(p, seg, rates, merge, padding)
    assert hops > 0
    assert ops == ["collective-permute"] * (hops * (2 if padding else 1))


@pytest.mark.parametrize("n,p,seg,rates,match", [
    (30, 4, (2,), (1,), r"n=30 is not divisible by P=4"),
    (48, 4, (8,), (1,), r"n=48 over P=4 \S+ gives chunk c=12, and segment length s=8 neither divides"),
    (32, 8, (16,), (8,), r"n=32 over P=8 \S+ gives chunk c=4, which is not a multiple of the dilation rate r=8 "
                         r"of segment s=16"),
])
def test_bad_sharding_raises(n, p, seg, rates, match):
    # Each configuration passes the single-device checks (n % s == 0, s % r == 0); only the sharding is bad.
    # The plan raises (torch ranks hold fixed chunks); the JAX ring pads to ring_padded_length instead, exactly.
    rng = np.random.default_rng()
    q = rng.standard_normal((1, n, 2, 2))
    got = jd.ring_dilated_attention(jnp.asarray(q), q, q, segment_lengths=seg, dilation_rates=rates, mesh=_mesh(p))
    np.testing.assert_allclose(np.asarray(got), ref.dilated_attention(q, q, q, seg, rates), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=match):
        ring_plan(n, p, DilatedConfig(seg, rates), unit="ranks")


def test_unknown_axis_name_raises():
    q = jnp.asarray(np.random.default_rng().standard_normal((1, 8, 2, 2)))
    with pytest.raises(ValueError, match=r"axis_name='sp' is not an axis of the mesh"):
        jd.ring_dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,), mesh=_mesh(2), axis_name="sp")


# ----------------------------------------------------------------------------------------------
# torch: gloo processes on loopback.

TORCH_CASES = [  # (segment_lengths, dilation_rates, is_causal, merge, padding), n = 32
    ((4, 8), (1, 2), False, "head_partition", True),    # local for P = 2 and 4
    ((16, 32), (2, 4), True, "head_partition", False),  # spanning
    ((8, 32), (1, 4), True, "lse", True),               # mixed
    ((16, 32), (2, 2), False, "lse", False),            # spanning, offsets 0 and 1
]


# The rank program (parity_tests.gloo runs it on each rank).
_TORCH_WORKER = """
c = data["q0"].shape[1] // world
sl = slice(rank * c, (rank + 1) * c)
for i, (seg, rates, causal, merge, padding) in enumerate(cases):
    q, k, v = (torch.as_tensor(data[f"{x}{i}"][:, sl]) for x in "qkv")
    mask = torch.as_tensor(data[f"mask{i}"][:, sl]) if padding else None
    with torch.no_grad():
        out = tr.ring_dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates,
                                        is_causal=causal, merge=merge, key_padding_mask=mask)
        out32 = tr.RingDilatedAttention(seg, rates, merge=merge)(
            q.float(), k.float(), v.float(), is_causal=causal, key_padding_mask=mask)
    results[f"out{i}"] = out.numpy()
    results[f"out32_{i}"] = out32.numpy()
try:  # the chunk 32 / world is not a multiple of the rate 32
    tr.ring_dilated_attention(q, k, v, segment_lengths=(32,), dilation_rates=(32,))
except ValueError as e:
    results["error"] = np.array(str(e))
"""


@pytest.mark.parametrize("world", [2])  # 4 ranks, with gradients: test_ring_balance.py
def test_torch_ring_gloo_matches_reference(world):
    rng = np.random.default_rng()
    n, b, h, d = 32, 2, 4, 3
    data, wants = {}, []
    for i, (seg, rates, causal, merge, padding) in enumerate(TORCH_CASES):
        q, k, v, mask = _inputs(rng, b, n, h, d, True)
        data.update({f"q{i}": q, f"k{i}": k, f"v{i}": v, f"mask{i}": mask})
        wants.append(ref.dilated_attention(q, k, v, seg, rates, causal, None, merge, mask if padding else None))
    outs = run_ranks(_TORCH_WORKER, world, data, TORCH_CASES)
    for i, want in enumerate(wants):
        got = np.concatenate([o[f"out{i}"] for o in outs], axis=1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
        got32 = np.concatenate([o[f"out32_{i}"] for o in outs], axis=1).astype(np.float64)
        assert np.abs(got32 - want).max() <= _f32_bound(want)
    for o in outs:
        assert re.search(rf"n=32 over P={world} ranks gives chunk c={32 // world}.*dilation rate r=32 of segment s=32",
                         str(o["error"]))


def test_torch_ring_without_process_group_is_improved():
    rng = np.random.default_rng()
    q, k, v, mask = (torch.as_tensor(x) for x in _inputs(rng, 2, 16, 3, 4, True))
    kw = dict(segment_lengths=(4, 16), dilation_rates=(1, 4), is_causal=True, merge="lse", key_padding_mask=mask)
    assert not dist.is_initialized()
    got = tr.RingDilatedAttention((4, 16), (1, 4), merge="lse")(q, k, v, is_causal=True, key_padding_mask=mask)
    torch.testing.assert_close(got, tr.improved_dilated_attention(q, k, v, **kw), rtol=0, atol=0)
    got = tr.ring_dilated_attention(q, k, v, **kw)
    torch.testing.assert_close(got, tr.improved_dilated_attention(q, k, v, **kw), rtol=0, atol=0)
