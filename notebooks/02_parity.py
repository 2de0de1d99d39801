# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 Parity: JAX vs PyTorch vs a float64 reference
#
# Three independent statements of the same function: `jax_dilated`, its PyTorch mirror `torch_ref`,
# and a plain NumPy float64 reference written out below (explicit masks, one dense softmax per head).
# This notebook runs all of them on the same random inputs and prints and plots the errors. The test
# suite holds the packages to docs/semantics.md section 8: float64 within `1e-10`, float32 within
# `1e-5 * max|ref| + 1e-6`.

# %%
import jax
jax.config.update("jax_enable_x64", True)   # float64 comparisons (the notebook's own choice)
import jax.numpy as jnp
import numpy as np
import torch

import jax_dilated as jd
import torch_ref as tr

# %% [markdown]
# ## The reference, as plainly as possible
#
# Per head, an explicit `(n, n)` matrix of allowed (query, key) pairs and one dense softmax over it.
# A branch with segment `s`, rate `r` and offset `o` keeps the positions `p` with
# `(p mod s) mod r == o`; a query attends to the kept keys of its own segment (and, causal, not to
# later ones; padded keys never). Under `merge="head_partition"` the heads are split into one group
# per branch (`h // G` each, one more for the first `h % G`), group `i` uses offset `i mod r_i`, its
# output is 0 at positions it does not keep, and the sum over groups is divided by `G`. Under
# `merge="lse"` every head `j` runs every branch with offset `j mod r` and mixes them with weights
# proportional to each branch's softmax normaliser `exp(lse)`.

# %%
def allowed_pairs(n, segment, rate, offset, causal, padded):
    p = np.arange(n)
    kept = (p % segment) % rate == offset
    ok = (p[:, None] // segment == p[None, :] // segment) & kept[:, None] & kept[None, :]
    if causal:
        ok &= p[None, :] <= p[:, None]
    if padded is not None:
        ok &= ~padded[None, :]
    return ok, kept


def softmax_attention(q, k, v, ok):
    """One head, q/k/v (n, d), ok (n, n): the output and each query's log-sum-exp (-inf without keys)."""
    s = np.where(ok, q @ k.T / np.sqrt(q.shape[-1]), -np.inf)
    top = s.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(s - top)
    total = w.sum(axis=1, keepdims=True)
    out = np.divide(w, total, out=np.zeros_like(w), where=total > 0) @ v
    lse = np.where(total[:, 0] > 0, top[:, 0] + np.log(np.maximum(total[:, 0], 1e-300)), -np.inf)
    return out, lse


def reference(q, k, v, segment_lengths, dilation_rates, is_causal=False, merge="head_partition",
              key_padding_mask=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, n, h, d = q.shape
    g = len(segment_lengths)
    group_of = np.repeat(np.arange(g), [h // g + (i < h % g) for i in range(g)])
    out = np.zeros_like(q)
    for bi in range(b):
        pad = None if key_padding_mask is None else np.asarray(key_padding_mask[bi], bool)
        for hj in range(h):
            qh, kh, vh = q[bi, :, hj], k[bi, :, hj], v[bi, :, hj]
            if merge == "head_partition":
                i = group_of[hj]
                s, r = segment_lengths[i], dilation_rates[i]
                ok, kept = allowed_pairs(n, s, r, i % r, is_causal, pad)
                out[bi, :, hj] = np.where(kept[:, None], softmax_attention(qh, kh, vh, ok)[0], 0.0) / g
            else:  # "lse"
                branches = [softmax_attention(qh, kh, vh, allowed_pairs(n, s, r, hj % r, is_causal, pad)[0])
                            for s, r in zip(segment_lengths, dilation_rates)]
                lse = np.stack([l for _, l in branches])                    # (G, n)
                top = lse.max(axis=0)
                w = np.exp(lse - np.where(np.isfinite(top), top, 0.0))
                w = np.divide(w, w.sum(axis=0), out=np.zeros_like(w), where=w.sum(axis=0) > 0)
                out[bi, :, hj] = sum(wi[:, None] * o for wi, (o, _) in zip(w, branches))
    return out


# The reference against dense attention: one branch, rate 1, segment n is plain softmax attention.
x = np.random.default_rng(0).standard_normal((1, 16, 2, 4))
dense = jax.nn.dot_product_attention(*(jnp.asarray(x),) * 3)
print("reference vs jax.nn.dot_product_attention:", np.abs(reference(x, x, x, (16,), (1,)) - np.asarray(dense)).max())

# %%
rng = np.random.default_rng()
CASES = [
    dict(segment_lengths=(8, 16), dilation_rates=(1, 2)),
    dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4)),
    dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), is_causal=True),
    dict(segment_lengths=(16, 32), dilation_rates=(2, 4), merge="lse"),
    dict(segment_lengths=(16, 32), dilation_rates=(2, 4), merge="lse", is_causal=True, padded=True),
]

def run_all(dtype_np, case):
    case = dict(case)
    padded = case.pop("padded", False)
    b, n, h, d = 2, 32, 6, 8
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(dtype_np) for _ in range(3))
    mask = None
    if padded:
        mask = np.zeros((b, n), bool); mask[1, 24:] = True
    expect = reference(q, k, v, key_padding_mask=mask, **case)
    jmask = None if mask is None else jnp.asarray(mask)
    tmask = None if mask is None else torch.as_tensor(mask)
    outs = {}
    with jax.default_matmul_precision("highest"):
        outs["jax.standard"] = np.asarray(jd.dilated_attention(*map(jnp.asarray, (q, k, v)), key_padding_mask=jmask, **case))
        outs["jax.improved"] = np.asarray(jd.improved_dilated_attention(*map(jnp.asarray, (q, k, v)), key_padding_mask=jmask, **case))
    with torch.no_grad():
        tq, tk, tv = map(torch.as_tensor, (q, k, v))
        outs["torch.standard"] = tr.dilated_attention(tq, tk, tv, key_padding_mask=tmask, **case).numpy()
        outs["torch.improved"] = tr.improved_dilated_attention(tq, tk, tv, key_padding_mask=tmask, **case).numpy()
    errors = {name: float(np.abs(o.astype(np.float64) - expect).max()) for name, o in outs.items()}
    errors["jax vs torch (improved)"] = float(np.abs(outs["jax.improved"].astype(np.float64) - outs["torch.improved"]).max())
    return errors, float(np.abs(expect).max())


# %% tags=["table"]
from tabulate import tabulate

rows, table = [], []
for dtype in (np.float64, np.float32):
    for i, case in enumerate(CASES):
        errors, scale = run_all(dtype, case)
        bound = 1e-10 if dtype == np.float64 else 1e-5 * scale + 1e-6
        rows.append((np.dtype(dtype).name, i, errors, bound))
        table.append([np.dtype(dtype).name, str(case)] + [f"{e:.1e}" for e in errors.values()] + [f"{bound:.0e}"])
names = list(rows[0][2])
print(tabulate(table, headers=["dtype", "case"] + names + ["bound (semantics 8)"], tablefmt="github"))
worst = max(max(e for n_, e in errs.items() if n_ != "jax vs torch (improved)") / bound for _, _, errs, bound in rows)
print(f"worst error / bound: {worst:.2e}")
assert worst <= 1.0

# %% tags=["figure"]
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharey=False)
for ax, dtype in zip(axes, ("float64", "float32")):
    sel = [r for r in rows if r[0] == dtype]
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar(np.arange(len(sel)) + j * width, [max(r[2][name], 1e-18) for r in sel], width, label=name)
    ax.axhline(sel[0][3] if dtype == "float64" else min(r[3] for r in sel), color="k", ls="--", lw=1,
               label="bound (semantics 8)")
    ax.set_yscale("log"); ax.set_xticks(np.arange(len(sel)) + 0.4, [f"case {r[1]}" for r in sel])
    ax.set_title(f"max |error| vs float64 reference, {dtype}")
axes[0].legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Modules: weights converted from torch give the same outputs
#
# `jax_dilated.load_torch_state_dict` copies a torch `state_dict` into an NNX module name for name.

# %%
from flax import nnx

E, H = 48, 6
tm = tr.ImprovedMultiheadDilatedAttention(E, H, (8, 16), (1, 2)).to(torch.float64).eval()
jm = jd.ImprovedMultiheadDilatedAttention(E, H, (8, 16), (1, 2), param_dtype=jnp.float64, rngs=nnx.Rngs(0))
jd.load_torch_state_dict(jm, tm.state_dict())
x = rng.standard_normal((2, 32, E))
with torch.no_grad():
    t_out = tm(torch.as_tensor(x), is_causal=True).numpy()
j_out = np.asarray(jm(jnp.asarray(x), is_causal=True))
print("module max |jax - torch|, float64:", np.abs(j_out - t_out).max())
assert np.abs(j_out - t_out).max() < 1e-10
