"""The multi-head module with a ring core (issue 4 item 5): same weights, same result as improved."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_dilated as jd
import torch_ref as tr

CFG = dict(segment_lengths=(8, 32), dilation_rates=(1, 2))


def _mesh(p: int) -> jax.sharding.Mesh:
    # Auto axes: the sharding stays out of the array types, so jax.grad of a replicated loss works.
    return jax.make_mesh((p,), ("seq",), devices=jax.devices()[:p], axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("devices", [4])  # one device is improved exactly: test_ring.py
def test_jax_ring_module_equals_improved_module(devices):
    rng = np.random.default_rng()
    b, n, e, h = 2, 32, 16, 4
    x = jnp.asarray(rng.standard_normal((b, n, e)))
    pad = jnp.asarray(rng.random((b, n)) < 0.2)
    mesh = _mesh(devices)
    ring = jd.RingMultiheadDilatedAttention(e, h, **CFG, mesh=mesh, rngs=nnx.Rngs(0))
    improved = jd.ImprovedMultiheadDilatedAttention(e, h, **CFG, rngs=nnx.Rngs(1))
    nnx.update(improved, nnx.state(ring, nnx.Param))
    for causal in (False, True):
        want = improved(x, key_padding_mask=pad, is_causal=causal)
        got = nnx.jit(lambda m, x: m(x, key_padding_mask=pad, is_causal=causal))(ring, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-10)
    if devices > 1:
        assert got.sharding.spec[1] == "seq"


def test_jax_ring_module_gradients_equal_improved():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((1, 32, 16)))
    mesh = _mesh(4)
    ring = jd.RingMultiheadDilatedAttention(16, 4, **CFG, mesh=mesh, rngs=nnx.Rngs(0))
    improved = jd.ImprovedMultiheadDilatedAttention(16, 4, **CFG, rngs=nnx.Rngs(1))
    nnx.update(improved, nnx.state(ring, nnx.Param))

    def loss(m, x):
        return jnp.sum(m(x, is_causal=True) ** 2)

    g_ring = nnx.grad(loss)(ring, x)
    g_imp = nnx.grad(loss)(improved, x)
    for a, b in zip(jax.tree.leaves(g_ring), jax.tree.leaves(g_imp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-9)


def test_torch_ring_module_without_process_group_equals_improved():
    rng = np.random.default_rng()
    x = torch.as_tensor(rng.standard_normal((2, 32, 16)))
    pad = torch.as_tensor(rng.random((2, 32)) < 0.2)
    ring = tr.RingMultiheadDilatedAttention(16, 4, **CFG, dtype=torch.float64)
    improved = tr.ImprovedMultiheadDilatedAttention(16, 4, **CFG, dtype=torch.float64)
    improved.load_state_dict(ring.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(ring(x, key_padding_mask=pad, is_causal=True).numpy(),
                                   improved(x, key_padding_mask=pad, is_causal=True).numpy(), rtol=0, atol=1e-12)


def test_ring_modules_reject_dropout():
    with pytest.raises(ValueError, match=r"dropout=0.1: ring attention has no dropout"):
        jd.RingMultiheadDilatedAttention(16, 4, **CFG, dropout=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dropout=0.1: ring attention has no dropout"):
        tr.RingMultiheadDilatedAttention(16, 4, **CFG, dropout=0.1)


def test_jax_ring_module_zigzag_equals_improved_module():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((1, 32, 16)))
    ring = jd.RingMultiheadDilatedAttention(16, 4, **CFG, mesh=_mesh(4), num_kv_heads=2, load_balance="zigzag",
                                            rngs=nnx.Rngs(0))
    improved = jd.ImprovedMultiheadDilatedAttention(16, 4, **CFG, num_kv_heads=2, rngs=nnx.Rngs(1))
    nnx.update(improved, nnx.state(ring, nnx.Param))
    got = jd.from_zigzag(ring(jd.to_zigzag(x, 4), is_causal=True), 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(improved(x, is_causal=True)), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"load_balance='zigzag' with rope_theta=10000.0"):
        tr.RingMultiheadDilatedAttention(16, 4, **CFG, load_balance="zigzag", rope_theta=10000.0)
