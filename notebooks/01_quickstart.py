# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 Quickstart: dilated attention in JAX
#
# `jax_dilated` computes LongNet-style dilated attention (arXiv 2307.02486). Inputs use the layout of
# `jax.nn.dot_product_attention`: `(batch, seq, heads, head_dim)`. This notebook shows the functions,
# the Flax NNX modules, causal masking and key padding.

# %%
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_dilated as jd
print(jax.__version__, jax.devices())

# %% [markdown]
# ## Functions
#
# Every head group `i` cuts the sequence into segments of `segment_lengths[i]` and keeps every
# `dilation_rates[i]`-th position inside each segment. `n` may be any length: the last segment of a group is then shorter (docs/semantics.md section 10).

# %%
b, n, h, d = 2, 64, 4, 16
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (b, n, h, d))
k = jax.random.normal(kk, (b, n, h, d))
v = jax.random.normal(kv, (b, n, h, d))

cfg = dict(segment_lengths=(16, 64), dilation_rates=(1, 4))
out_std = jd.dilated_attention(q, k, v, **cfg)            # readable form
out_imp = jd.improved_dilated_attention(q, k, v, **cfg)   # fast form, same function
print(out_imp.shape, out_imp.dtype)
print("standard vs improved, max |diff|:", float(jnp.abs(out_std - out_imp).max()))

# %% [markdown]
# With one group, rate 1 and a segment equal to the sequence, dilated attention is dense softmax
# attention:

# %%
dense = jax.nn.dot_product_attention(q, k, v)
one = jd.improved_dilated_attention(q, k, v, segment_lengths=(n,), dilation_rates=(1,))
print("vs jax.nn.dot_product_attention:", float(jnp.abs(dense - one).max()))

# %% [markdown]
# ### Which positions a head sees
#
# Under the default `merge="head_partition"` the heads are split into one group per segment length;
# group `i` keeps positions with offset `i % r_i` in each segment, and the other positions of its heads
# are 0. The picture shows, per head, which output positions are non-zero.

# %% tags=["figure"]
import matplotlib.pyplot as plt

nonzero = np.asarray(jnp.abs(out_imp[0]).sum(-1) > 0).T   # (heads, n)
fig, ax = plt.subplots(figsize=(8, 1.8))
ax.imshow(nonzero, aspect="auto", cmap="Greys", interpolation="nearest")
ax.set_xlabel("position"); ax.set_ylabel("head"); ax.set_title("positions kept per head, segments (16, 64), rates (1, 4)")
plt.show()

# %% [markdown]
# `merge="lse"` (the LongNet paper's mixture) lets every head see every group and mixes the groups by
# their softmax normalisers, so no position is left out:

# %%
out_lse = jd.improved_dilated_attention(q, k, v, merge="lse", **cfg)
print("zero rows per head, head_partition:", np.asarray((jnp.abs(out_imp[0]).sum(-1) == 0).sum(0)))
print("zero rows per head, lse:           ", np.asarray((jnp.abs(out_lse[0]).sum(-1) == 0).sum(0)))

# %% [markdown]
# ## Causal masking
#
# `is_causal=True` is top-left aligned: position `p` sees positions `p' <= p`. Changing a later key or
# value leaves earlier outputs unchanged:

# %%
causal = jd.improved_dilated_attention(q, k, v, is_causal=True, **cfg)
v2 = v.at[:, 40:].set(jax.random.normal(jax.random.key(1), (b, n - 40, h, d)))
causal2 = jd.improved_dilated_attention(q, k, v2, is_causal=True, **cfg)
print("positions < 40 changed by:", float(jnp.abs(causal[:, :40] - causal2[:, :40]).max()))
print("positions >= 40 changed by:", float(jnp.abs(causal[:, 40:] - causal2[:, 40:]).max()))

# %% [markdown]
# ## Key padding
#
# `key_padding_mask` is `(batch, seq)` boolean with **True = padding** (the `torch.nn.MultiheadAttention`
# convention). Padded keys get exactly zero weight, so what they contain does not matter:

# %%
pad = jnp.zeros((b, n), bool).at[1, 48:].set(True)     # the second sequence has 16 padding tokens
a = jd.improved_dilated_attention(q, k, v, key_padding_mask=pad, **cfg)
junk = jnp.where(pad[:, :, None, None], 1e4, v)          # garbage in the padded values
a2 = jd.improved_dilated_attention(q, k, junk, key_padding_mask=pad, **cfg)
print("effect of padded values:", float(jnp.abs(a - a2).max()))

# %% [markdown]
# ## Modules (Flax NNX)
#
# `MultiheadDilatedAttention`, `ImprovedMultiheadDilatedAttention` and
# `BlockSparseMultiheadDilatedAttention` take `(batch, seq, embed_dim)` and hold `q/k/v/out`
# projections and the MAGNETO sub-LayerNorm, named like the torch mirror's `state_dict`.

# %%
mha = jd.ImprovedMultiheadDilatedAttention(64, 4, (16, 64), (1, 4), dropout=0.1, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(2), (b, n, 64))
y = mha(x, is_causal=True, key_padding_mask=pad, deterministic=True)
print(y.shape)
print({name: arr.shape for name, arr in jd.to_torch_state_dict(mha).items()})

# %%
bs = jd.BlockSparseMultiheadDilatedAttention(64, 4, block_size=16, pattern="local_window", sparsity_ratio=0.5,
                                             rngs=nnx.Rngs(0))
print(bs(x, is_causal=True).shape)
print(np.asarray(jd.block_layout(n, 16, "local_window", 0.5, 1, True)).astype(int))

# %% [markdown]
# The functions work under `jax.jit`, `jax.grad` and `nnx.jit`:

# %%
loss = lambda q: jd.improved_dilated_attention(q, k, v, is_causal=True, **cfg).sum()
g = jax.jit(jax.grad(loss))(q)
print(g.shape, bool(jnp.isfinite(g).all()))
