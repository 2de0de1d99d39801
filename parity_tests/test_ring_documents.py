"""Packed documents across devices (issue 13, item 3): ``document_ids`` in the JAX ring.

Segments and the dilation grid restart at every document (semantics section 10), so (document,
segment) runs cross chunk boundaries wherever documents start. Every comparison is against the
float64 reference, which states the rule position by position; JAX runs on the 8 CPU devices that
conftest.py forces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh

import jax_dilated as jd
import torch_ref as tr
from dilated_plan import DilatedConfig
from dilated_plan.ring import ring_tiles
from jax_dilated.ring import ring_tile_counts
from parity_tests import reference as ref
from parity_tests.gloo import run_ranks


def _mesh(p: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:p]), ("seq",))


def _qkv(rng, b, n, h, h_kv, d):
    return rng.standard_normal((b, n, h, d)), rng.standard_normal((b, n, h_kv, d)), rng.standard_normal((b, n, h_kv, d))


def _documents(rng, b, n, change):
    """Random packed documents: row 0 changes id with probability ``change`` per position; row 1 has a
    few long documents whose ids alternate 0/1 (an id that comes back is a new document)."""
    short = np.cumsum(rng.random(n) < change)
    cuts = np.sort(rng.choice(np.arange(1, max(n, 2)), size=min(3, max(n - 1, 0)), replace=False))
    long = np.searchsorted(cuts, np.arange(n), side="right") % 2
    return np.stack([short, long][:b])


# (P, n, segments, rates, causal, merge, h, h_kv, key padding, probability of a new document)
CASES = [
    (4, 64, (8, 16), (1, 2), False, "head_partition", 4, 2, False, 0.1),  # local groups: edges only
    (4, 64, (8, 16), (1, 2), True, "lse", 4, 4, True, 0.05),
    (4, 64, (8, 32), (1, 2), True, "head_partition", 4, 2, False, 0.05),  # a group spans two chunks
    (4, 64, (16, 64), (1, 4), False, "head_partition", 4, 1, True, 0.02),  # spans all four, both ways
    (8, 128, (8, 64), (2, 4), True, "lse", 4, 2, False, 0.02),
    (8, 100, (8, 32), (1, 2), True, "head_partition", 4, 2, True, 0.05),  # any length: padded
    (2, 50, (8, 32), (1, 2), False, "lse", 6, 3, True, 0.1),
]


@pytest.mark.parametrize(
    "p,n,seg,rates,causal,merge,h,h_kv,padding,change",
    CASES,
    ids=[f"P{c[0]}-n{c[1]}-{c[2]}-{'causal' if c[4] else 'full'}-{c[5]}" for c in CASES],
)
def test_jax_ring_documents_match_reference(p, n, seg, rates, causal, merge, h, h_kv, padding, change):
    rng = np.random.default_rng()
    q, k, v = _qkv(rng, 2, n, h, h_kv, 3)
    mask = rng.random((2, n)) < 0.2 if padding else None
    docs = _documents(rng, 2, n, change)
    want = ref.dilated_attention(q, k, v, seg, rates, causal, None, merge, mask, docs)
    got = jd.ring_dilated_attention(
        *(jnp.asarray(x) for x in (q, k, v)),
        segment_lengths=seg,
        dilation_rates=rates,
        mesh=_mesh(p),
        is_causal=causal,
        merge=merge,
        key_padding_mask=None if mask is None else jnp.asarray(mask),
        document_ids=jnp.asarray(docs),
    )
    assert got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_jax_ring_documents_gradients_equal_single_device(causal):
    rng = np.random.default_rng()
    p, n, h, h_kv = 4, 64, 4, 2
    q, k, v = (jnp.asarray(x) for x in _qkv(rng, 2, n, h, h_kv, 3))
    docs = jnp.asarray(_documents(rng, 2, n, 0.05))
    mask = jnp.asarray(rng.random((2, n)) < 0.2)
    kw = dict(
        segment_lengths=(8, 32), dilation_rates=(1, 2), is_causal=causal, key_padding_mask=mask, document_ids=docs
    )
    w = jnp.asarray(rng.standard_normal(q.shape))
    ring = jax.jit(
        jax.grad(lambda *a: jnp.sum(w * jd.ring_dilated_attention(*a, mesh=_mesh(p), **kw)), argnums=(0, 1, 2))
    )
    single = jax.jit(jax.grad(lambda *a: jnp.sum(w * jd.dilated_attention(*a, **kw)), argnums=(0, 1, 2)))
    for g, s in zip(ring(q, k, v), single(q, k, v), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(s), rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_document_tiles_that_cannot_meet_are_skipped(causal):
    """One document: the runs are the segments, so the program computes exactly the plan's tiles.
    Documents that start at every chunk boundary: no run crosses one, only each device's own tile."""
    p, n, h = 8, 64, 4
    cfg = DilatedConfig((8, 32), (1, 2))
    q = k = v = jnp.asarray(np.random.default_rng().standard_normal((1, n, h, 2)))
    kw = dict(segment_lengths=cfg.segment_lengths, dilation_rates=cfg.dilation_rates, mesh=_mesh(p), is_causal=causal)
    one = ring_tile_counts(q, k, v, document_ids=jnp.zeros((1, n), jnp.int32), **kw)
    np.testing.assert_array_equal(one, ring_tiles(n, p, cfg, h, causal))
    per_chunk = jnp.asarray(np.arange(n)[None] // (n // p))
    spanning = sum(1 for br in cfg.branches(h) if br.segment > n // p)
    np.testing.assert_array_equal(ring_tile_counts(q, k, v, document_ids=per_chunk, **kw), [spanning] * p)


def test_jax_ring_documents_on_a_mesh_with_explicit_axes_and_any_length():
    """``jax.make_mesh`` gives explicit axes by default: a padded length comes back replicated."""
    rng = np.random.default_rng()
    n = 37
    q, k, v = _qkv(rng, 1, n, 2, 2, 3)
    docs = _documents(rng, 1, n, 0.1)
    mesh = jax.make_mesh((4,), ("seq",), devices=jax.devices()[:4])
    kw = dict(segment_lengths=(4, 16), dilation_rates=(1, 2), is_causal=True)
    for d in (None, docs):
        want = ref.dilated_attention(
            q, k, v, kw["segment_lengths"], kw["dilation_rates"], True, None, "head_partition", None, d
        )
        got = jd.ring_dilated_attention(q, k, v, mesh=mesh, document_ids=d, **kw)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)


def test_jax_ring_module_with_documents_equals_improved_module():
    rng = np.random.default_rng()
    b, n, e, h = 2, 32, 16, 4
    x = jnp.asarray(rng.standard_normal((b, n, e)))
    docs = jnp.asarray(_documents(rng, b, n, 0.1))
    mesh = jax.make_mesh((4,), ("seq",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    cfg = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), rope_theta=10000.0)
    ring = jd.RingMultiheadDilatedAttention(e, h, **cfg, mesh=mesh, rngs=nnx.Rngs(0))
    improved = jd.ImprovedMultiheadDilatedAttention(e, h, **cfg, rngs=nnx.Rngs(1))
    nnx.update(improved, nnx.state(ring, nnx.Param))
    want = improved(x, document_ids=docs, is_causal=True)
    got = ring(x, document_ids=docs, is_causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-10)


def test_documents_with_zigzag_and_bad_ids_raise():
    q = jnp.zeros((1, 32, 2, 2))
    kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), mesh=_mesh(2))
    with pytest.raises(ValueError, match="load_balance=None"):
        jd.ring_dilated_attention(q, q, q, document_ids=jnp.zeros((1, 32), jnp.int32), load_balance="zigzag", **kw)
    with pytest.raises(ValueError, match="document_ids"):
        jd.ring_dilated_attention(q, q, q, document_ids=jnp.zeros((1, 31), jnp.int32), **kw)


# torch: gloo processes on loopback, one spawn per world size running every case.

# (n, segments, rates, causal, merge, h, h_kv, key padding, probability of a new document)
TORCH_CASES = [
    (64, (8, 16), (1, 2), False, "head_partition", 4, 2, True, 0.1),  # local groups: edges both ways
    (64, (8, 16), (1, 2), True, "lse", 4, 2, False, 0.05),
    (64, (8, 32), (1, 2), True, "head_partition", 4, 2, True, 0.05),  # spans two chunks
    (64, (16, 64), (1, 4), False, "lse", 6, 2, True, 0.02),  # spans all ranks, both ways, 2 kv buckets
    (50, (8, 32), (1, 2), True, "head_partition", 4, 2, True, 0.1),  # any length: chunks 16 16 16 2
]

_TORCH_WORKER = """
from dilated_plan import DilatedConfig, ring_chunk_length
for i, (n, seg, rates, causal, merge, h, h_kv, padding, _) in enumerate(cases):
    c = ring_chunk_length(n, world, DilatedConfig(seg, rates, merge))
    sl = slice(rank * c, min((rank + 1) * c, n))
    q, k, v = (torch.as_tensor(data[f"{x}{i}"][:, sl]).requires_grad_() for x in "qkv")
    mask = torch.as_tensor(data[f"mask{i}"][:, sl]) if padding else None
    out = tr.ring_dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates, is_causal=causal,
                                    merge=merge, key_padding_mask=mask,
                                    document_ids=torch.as_tensor(data[f"docs{i}"][:, sl]))
    (out * torch.as_tensor(data[f"w{i}"][:, sl])).sum().backward()
    results[f"out{i}"] = out.detach().numpy()
    for x, t in zip("qkv", (q, k, v)):
        results[f"d{x}{i}"] = t.grad.numpy()
x = torch.zeros(1, 16, 4, 2, dtype=torch.float64)
try:  # only rank 0 passes document_ids: every rank raises, before any message
    tr.ring_dilated_attention(x, x, x, segment_lengths=(8, 16), dilation_rates=(1, 2),
                              document_ids=torch.zeros(1, 16, dtype=torch.int64) if rank == 0 else None)
except ValueError as e:
    results["mismatch"] = np.array(str(e))
"""


@pytest.mark.parametrize("world", [2, 4])
def test_torch_ring_documents_values_and_gradients(world):
    rng = np.random.default_rng()
    data = {}
    for i, (n, _, _, _, _, h, h_kv, padding, change) in enumerate(TORCH_CASES):
        data.update(zip((f"q{i}", f"k{i}", f"v{i}"), _qkv(rng, 2, n, h, h_kv, 3), strict=True))
        data[f"mask{i}"] = rng.random((2, n)) < 0.2 if padding else np.zeros((2, n), bool)
        data[f"docs{i}"] = _documents(rng, 2, n, change)
        data[f"w{i}"] = rng.standard_normal((2, n, h, 3))
    ranks = run_ranks(_TORCH_WORKER, world, data, TORCH_CASES)
    assert all("document_ids shape" in str(r["mismatch"]) for r in ranks), [r.get("mismatch") for r in ranks]
    for i, (_n, seg, rates, causal, merge, _, _, padding, _) in enumerate(TORCH_CASES):
        q, k, v = (torch.as_tensor(data[f"{x}{i}"]).requires_grad_() for x in "qkv")
        mask = torch.as_tensor(data[f"mask{i}"]) if padding else None
        want = tr.improved_dilated_attention(
            q,
            k,
            v,
            segment_lengths=seg,
            dilation_rates=rates,
            is_causal=causal,
            merge=merge,
            key_padding_mask=mask,
            document_ids=torch.as_tensor(data[f"docs{i}"]),
        )
        (want * torch.as_tensor(data[f"w{i}"])).sum().backward()
        np.testing.assert_allclose(
            np.asarray(want.detach()),
            ref.dilated_attention(
                data[f"q{i}"],
                data[f"k{i}"],
                data[f"v{i}"],
                seg,
                rates,
                causal,
                None,
                merge,
                None if mask is None else data[f"mask{i}"],
                data[f"docs{i}"],
            ),
            rtol=0,
            atol=1e-10,
        )
        for name, full in (("out", want.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            got = np.concatenate([r[f"{name}{i}"] for r in ranks], axis=1)
            np.testing.assert_allclose(got, full.numpy(), rtol=0, atol=1e-10, err_msg=f"case {i} {name}")


_MODULE_WORKER = """
from dilated_plan import DilatedConfig, ring_chunk_length
n, e, h = cases[0]
c = ring_chunk_length(n, world, DilatedConfig((8, 32), (1, 2)))
sl = slice(rank * c, min((rank + 1) * c, n))
torch.manual_seed(0)
mha = tr.RingMultiheadDilatedAttention(e, h, (8, 32), (1, 2), num_kv_heads=2, rope_theta=10000.0,
                                       dtype=torch.float64)
x = torch.as_tensor(data["x"][:, sl])
docs = torch.as_tensor(data["docs"][:, sl])
for name, ids in (("plain", None), ("packed", docs)):
    results[name] = mha(x, is_causal=True, document_ids=ids).detach().numpy()
for key, value in mha.state_dict().items():
    results["param_" + key] = value.numpy()
"""


def test_torch_ring_module_rotary_positions_and_documents_equal_improved_module():
    """Rotary positions are global on every rank (from each document's start with ``document_ids``)."""
    rng = np.random.default_rng()
    n, e, h = 50, 16, 4  # chunks 16 16 16 2
    data = {"x": rng.standard_normal((2, n, e)), "docs": _documents(rng, 2, n, 0.05)}
    ranks = run_ranks(_MODULE_WORKER, 4, data, [(n, e, h)])
    improved = tr.ImprovedMultiheadDilatedAttention(
        e, h, (8, 32), (1, 2), num_kv_heads=2, rope_theta=10000.0, dtype=torch.float64
    )
    improved.load_state_dict(
        {k[len("param_") :]: torch.as_tensor(v) for k, v in ranks[0].items() if k.startswith("param_")}
    )
    x = torch.as_tensor(data["x"])
    for name, ids in (("plain", None), ("packed", torch.as_tensor(data["docs"]))):
        want = improved(x, is_causal=True, document_ids=ids).detach().numpy()
        got = np.concatenate([r[name] for r in ranks], axis=1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("documents", [False, True])
def test_jax_ring_long_row_kernel_path_inside_shard_map(documents):
    """Tiles whose scores exceed ``Tiling.step_scores`` take the kernel's long-row path (loops over key
    tiles); inside ``shard_map`` its loop carries must take the devices' varying type (this raised a
    TypeError before). A tiny tiling forces the path at test sizes; values and gradients vs one device."""
    from jax_dilated.kernels import Tiling, Xla

    rng = np.random.default_rng()
    n = 64
    q, k, v = (jnp.asarray(x) for x in _qkv(rng, 1, n, 2, 2, 3))
    docs = jnp.asarray(_documents(rng, 1, n, 0.05)) if documents else None
    kw = dict(
        segment_lengths=(8, 32),
        dilation_rates=(1, 2),
        is_causal=True,
        document_ids=docs,
        implementation=Xla(tiling=Tiling(step_scores=16, query_tile=4, key_tile=4)),
    )
    want = ref.dilated_attention(
        q, k, v, (8, 32), (1, 2), True, None, "head_partition", None, None if docs is None else np.asarray(docs)
    )
    w = jnp.asarray(rng.standard_normal(q.shape))
    ring = lambda *a: jd.ring_dilated_attention(*a, mesh=_mesh(4), **kw)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ring(q, k, v)), want, rtol=0, atol=1e-10)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(w * ring(*a)), argnums=(0, 1, 2)))(q, k, v)
    single = jax.grad(lambda *a: jnp.sum(w * jd.dilated_attention(*a, **kw)), argnums=(0, 1, 2))(q, k, v)
    for g, s in zip(got, single, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(s), rtol=0, atol=1e-10)
