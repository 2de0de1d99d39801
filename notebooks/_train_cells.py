"""Cells of notebooks/05_train_longnet.ipynb (imported by _build.py)."""

from _build import REPO_PATH, code, md

TRAIN = [
    md("""
# 05 Train a LongNet-style model on associative recall over 2048 tokens

A small decoder-only model (`jax_dilated.models.LongNetLM`: token embedding + sinusoidal positions,
pre-LN blocks with causal `ImprovedMultiheadDilatedAttention` and an MLP, tied head) is trained with
optax AdamW on a synthetic long-range task, then saved with Orbax and restored.

Set `JAX_DILATED_NOTEBOOK_QUICK=1` (the notebook test does) to run a few steps only; the accuracy it
prints is then the honest accuracy of that short run, not the figure the full run reaches.
"""),
    code(REPO_PATH + """

import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jax_dilated.models import LongNetLM

QUICK = os.environ.get("JAX_DILATED_NOTEBOOK_QUICK", "") == "1"
print("quick mode" if QUICK else "full run", jax.devices())"""),
    md("""
## The task, laid out for dilated attention

The sequence is `N = 2048` tokens cut into 64 slots of `R = 32` tokens. Token ids: fillers `[0, 16)`,
keys `[16, 16 + K)`, values `[16 + K, 16 + K + V)`.

- **Context** (the first `P = 8` slots): slot `j` is `key_j value_j` followed by 30 random fillers.
- **Queries** (`Q = 48` random later slots, always including the last one): `f key answer` and 29
  fillers, where `key`
  is one of the context keys and `answer` its value. The model must predict `answer` at the `key`
  position, up to 2000 tokens after the context. Every other slot is fillers.
- The loss and the accuracy count only the answer predictions. Chance is `1 / V`.

**Why this layout.** Every layer uses `segment_lengths = (32, 2048)`, `dilation_rates = (1, 32)` with
`merge="head_partition"`: heads 0-1 attend inside each 32-token slot (segment 32, rate 1); heads 2-3
attend over the whole sequence but, being group 1, only to positions `p % 32 == 1` (offset
`1 % 32 = 1`): 64 positions per sequence. A position outside that residue is never reached from far away by any head, so the
task puts exactly the positions that must meet at long range at `p % 32 == 1`: the context **values**
(slot offset 1) and the query **keys** (slot offset 1). The rest is local:

1. layer 1, local heads: a context value sees its key in the same slot and copies "my key is k";
2. layer 2, long heads: the query key `k` (at `p % 32 == 1`) looks over all earlier `p % 32 == 1`
   positions for the one that carries "my key is k", and reads that position's own token, the value.

That is an induction-style two-hop circuit, which is why the model has two layers. With
`merge="lse"` every head would see every group, but a query would still see only its own residue
class in the long group, so the layout matters either way.
"""),
    code("""
N, R = 2048, 32
F, K, V, P, Q = 16, 16, 16, 8, 48
VOCAB = F + K + V
SEGMENTS, RATES = (R, N), (1, R)


def make_batch(rng: np.random.Generator, b: int):
    \"\"\"tokens (b, N) int32, targets (b, N) = tokens shifted left, mask (b, N) True at query keys.\"\"\"
    slots = N // R
    toks = rng.integers(0, F, size=(b, N))
    mask = np.zeros((b, N), bool)
    for i in range(b):
        keys = rng.choice(K, P, replace=False)
        vals = rng.integers(0, V, P)
        toks[i, 0:P * R:R] = F + keys               # slot offset 0: key
        toks[i, 1:P * R:R] = F + K + vals           # slot offset 1: value (p % 32 == 1)
        qslots = np.append(rng.choice(np.arange(P, slots - 1), Q - 1, replace=False), slots - 1)
        which = rng.integers(0, P, Q)
        qpos = qslots * R + 1                       # slot offset 1: query key (p % 32 == 1)
        toks[i, qpos] = F + keys[which]
        toks[i, qpos + 1] = F + K + vals[which]     # the answer follows the query key
        mask[i, qpos] = True
    targets = np.concatenate([toks[:, 1:], np.zeros((b, 1), toks.dtype)], axis=1)
    return jnp.asarray(toks, jnp.int32), jnp.asarray(targets, jnp.int32), jnp.asarray(mask)


toks, targets, mask = make_batch(np.random.default_rng(0), 1)
print("first context slots:", np.asarray(toks[0, :12]))
last = int(np.flatnonzero(np.asarray(mask[0]))[-1])
print(f"last query key at position {last}: key {int(toks[0, last])} -> answer {int(targets[0, last])}")"""),
    md("""
## Model and optimizer
"""),
    code("""
STEPS = 40 if QUICK else int(os.environ.get("JAX_DILATED_TRAIN_STEPS", 1000))
BATCH, LR = 8, 5e-3

model = LongNetLM(VOCAB, 64, 4, 2, SEGMENTS, RATES, mlp_ratio=2, tie_embeddings=True, rngs=nnx.Rngs(0))
schedule = optax.warmup_cosine_decay_schedule(0.0, LR, 20, STEPS, LR * 0.1)
optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
print(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))), "parameters")


def loss_fn(model, toks, targets, mask):
    logits = model(toks)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = logits.argmax(-1) == targets
    return (ce * mask).sum() / mask.sum(), (correct * mask).sum() / mask.sum()


@nnx.jit
def train_step(model, optimizer, toks, targets, mask):
    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, toks, targets, mask)
    optimizer.update(model, grads)
    return loss, acc


@nnx.jit
def predict(model, toks):
    return model(toks).argmax(-1)"""),
    code("""
rng = np.random.default_rng(1)
history = []
t0 = time.perf_counter()
for step in range(STEPS):
    loss, acc = train_step(model, optimizer, *make_batch(rng, BATCH))
    history.append((float(loss), float(acc)))
    if step % 50 == 0 or step == STEPS - 1:
        print(f"step {step:4d}  loss {history[-1][0]:.3f}  batch recall {history[-1][1]:.3f}  "
              f"{time.perf_counter() - t0:6.1f} s", flush=True)
train_seconds = time.perf_counter() - t0
print(f"trained {STEPS} steps in {train_seconds:.0f} s")"""),
    code("""
loss_curve, acc_curve = np.array(history).T
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
ax[0].plot(loss_curve); ax[0].axhline(np.log(V), ls="--", c="gray", label="chance (log V)")
ax[0].set_xlabel("step"); ax[0].set_ylabel("cross-entropy at answers"); ax[0].legend()
ax[1].plot(acc_curve); ax[1].axhline(1 / V, ls="--", c="gray", label="chance")
ax[1].set_xlabel("step"); ax[1].set_ylabel("batch recall accuracy"); ax[1].set_ylim(0, 1); ax[1].legend()
plt.tight_layout(); plt.show()"""),
    md("""
## Accuracy on fresh sequences

Recall accuracy over all queries, and over the last query of each sequence (about 2000 tokens after
the context).
"""),
    code("""
eval_rng = np.random.default_rng(2)
hits = last_hits = total = 0
EVAL_BATCHES = 2 if QUICK else 8
for _ in range(EVAL_BATCHES):
    toks, targets, mask = make_batch(eval_rng, BATCH)
    pred = np.asarray(predict(model, toks))
    ok = (pred == np.asarray(targets)) & np.asarray(mask)
    hits += ok.sum(); total += np.asarray(mask).sum()
    last_hits += ok[:, N - R + 1].sum()        # the final query key sits at N - R + 1
accuracy = hits / total
last_accuracy = last_hits / (EVAL_BATCHES * BATCH)
print(f"recall accuracy: {accuracy:.3f} over {total} queries (chance {1 / V:.3f}); "
      f"last query: {last_accuracy:.3f}")
if accuracy >= 0.9:
    print("reached the >= 90% target")
else:
    print(f"below the 90% target after {STEPS} steps ({'quick mode' if QUICK else 'full run'}); "
          "see the notes at the end")"""),
    md("""
## Save and restore (Orbax)

Flax NNX checkpoints are the model's `nnx.State` written by Orbax. Only the parameters are saved
here (`nnx.state(model, nnx.Param)`); to restore, build a model of the same configuration (any
seed), or an abstract one with `nnx.eval_shape`, and `nnx.update` it with the restored state.
"""),
    code("""
import tempfile

ckpt_dir = Path(tempfile.mkdtemp()) / "longnet"
with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt_dir, nnx.state(model, nnx.Param))

restored = LongNetLM(VOCAB, 64, 4, 2, SEGMENTS, RATES, mlp_ratio=2, tie_embeddings=True, rngs=nnx.Rngs(123))
abstract = nnx.state(nnx.eval_shape(lambda: LongNetLM(VOCAB, 64, 4, 2, SEGMENTS, RATES, mlp_ratio=2,
                                                      rngs=nnx.Rngs(0))), nnx.Param)
with ocp.StandardCheckpointer() as ckptr:
    nnx.update(restored, ckptr.restore(ckpt_dir, abstract))

toks, _, _ = make_batch(np.random.default_rng(3), 2)
same = bool((np.asarray(predict(restored, toks)) == np.asarray(predict(model, toks))).all())
logit_diff = float(jnp.abs(nnx.jit(lambda m, t: m(t))(restored, toks) - nnx.jit(lambda m, t: m(t))(model, toks)).max())
print("restored predictions equal:", same, "| max logit difference:", logit_diff)
assert same and logit_diff == 0.0"""),
    md("""
## Notes: how far the full run gets, and why

Measured full run (1000 steps, batch 8, 339 s of training on a 2-core CPU shared with other jobs):
recall accuracy **0.24** over 3072 fresh queries (last query 0.31), about four times chance
(1/16 = 0.0625), but **below the 90% target**. The loss sits at chance (log 16) for the first ~250
steps and then falls slowly. The two-hop circuit (layer 1 copies each value's key into it, layer 2
matches the query against that copy) is an induction-style circuit, which gradient descent is known
to find only after a plateau; in 1000 small steps it is only partly formed. More steps, a larger
batch, or a longer constant learning rate before the cosine decay are the obvious next things to
try; they were not measured here within the few-minute CPU budget.
"""),
]
