# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 Ring attention on 8 simulated devices
#
# `ring_dilated_attention` computes the same function as `dilated_attention` with the sequence sharded
# over a mesh axis: each device holds `n / P` positions of `q, k, v`. Groups whose segments fit inside a
# device's chunk need no communication; a group whose segments span several devices passes its
# dilated key/value blocks around those devices and merges them with an online softmax.
#
# XLA can pretend the CPU is 8 devices. The flag must be set before JAX is imported, so it is the
# first thing this notebook does (restart the kernel if JAX was already imported).

# %%
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import jax_dilated as jd
print(jax.devices())
assert jax.device_count() == 8

# %%
b, n, h, d = 1, 4096, 4, 32
cfg = dict(segment_lengths=(512, 4096), dilation_rates=(1, 4), is_causal=True)
mesh = jax.make_mesh((8,), ("seq",))
seq = NamedSharding(mesh, PartitionSpec(None, "seq"))
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.device_put(jax.random.normal(kk, (b, n, h, d)), seq) for kk in keys)

with jax.default_matmul_precision("highest"):
    out_ring = jd.ring_dilated_attention(q, k, v, mesh=mesh, axis_name="seq", **cfg)
    out_ref = jd.improved_dilated_attention(jax.device_get(q), jax.device_get(k), jax.device_get(v), **cfg)
err = float(jnp.abs(jax.device_get(out_ring) - out_ref).max())
print("ring vs improved, max |diff|:", err)
assert err <= 1e-5 * float(jnp.abs(out_ref).max()) + 1e-6

# %% [markdown]
# Each device holds one contiguous chunk of `n / 8 = 512` positions of the output (and of q, k, v):

# %%
for shard in out_ring.addressable_shards[:3]:
    print(shard.device, shard.index, shard.data.shape)
print("...")

# %% [markdown]
# ## Memory per device
#
# `compiled.memory_analysis()` reports the per-device program's arguments, outputs and temporaries.
# The single-device improved call holds the whole sequence; each ring device holds `1 / P` of the
# inputs and outputs and only a bounded number of key/value blocks at a time.

# %% tags=["figure"]
import matplotlib.pyplot as plt

def device_mb(fn, *args):
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**20, m.temp_size_in_bytes / 2**20

rows = []
for p in (1, 2, 4, 8):
    if p == 1:
        qq, kk_, vv = (jax.device_get(x) for x in (q, k, v))
        fn = lambda q, k, v: jd.improved_dilated_attention(q, k, v, **cfg)
    else:
        m = jax.make_mesh((p,), ("seq",), devices=jax.devices()[:p])
        sh = NamedSharding(m, PartitionSpec(None, "seq"))
        qq, kk_, vv = (jax.device_put(x, sh) for x in (q, k, v))
        fn = lambda q, k, v, m=m: jd.ring_dilated_attention(q, k, v, mesh=m, axis_name="seq", **cfg)
    total, temp = device_mb(fn, qq, kk_, vv)
    rows.append((p, total, temp))
    print(f"P={p}: {total:7.2f} MB per device ({temp:6.2f} MB temporaries)")

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="per device (args+out+temp)")
ax.plot([r[0] for r in rows], [rows[0][1] / r[0] for r in rows], ls="--", label="ideal 1/P")
ax.set_xscale("log", base=2); ax.set_xlabel("devices P"); ax.set_ylabel("MB"); ax.legend(); ax.set_title(f"n={n}")
plt.tight_layout(); plt.show()
