# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 Train a LongNet-style model on associative recall over 2048 tokens
#
# A small decoder-only model (`jax_dilated.models.LongNetLM`: token embedding + sinusoidal positions,
# pre-LN blocks with causal `ImprovedMultiheadDilatedAttention` and an MLP, tied head) is trained with
# optax AdamW on a synthetic long-range task, asked to continue prompts with `model.generate`, then saved
# with Orbax and restored.
#
# Set `JAX_DILATED_NOTEBOOK_QUICK=1` (the notebook test does) to run a few steps only; the accuracy it
# prints is then the honest accuracy of that short run, not the figure the full run reaches.
# `JAX_DILATED_TRAIN_STEPS` changes the length of the full run.

# %%
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jax_dilated.models import LongNetLM

QUICK = os.environ.get("JAX_DILATED_NOTEBOOK_QUICK", "") == "1"
print("quick mode" if QUICK else "full run", jax.devices())

# %% [markdown]
# ## The task, laid out for dilated attention
#
# Every layer uses `segment_lengths = (32, 2048)`, `dilation_rates = (1, 32)` with
# `merge="head_partition"`: heads 0-1 (group 0) attend inside each 32-token segment; heads 2-3
# (group 1) attend over the whole 2048-token sequence, but only among the positions their group keeps,
# `p % 32 == 1` (a group `i` with rate `r` keeps offset `i % r`): 64 positions per sequence. Nothing
# outside that residue class is reachable from more than 31 tokens away by any head, so the task puts
# everything that must meet at long range on those positions:
#
# - The sequence is 64 slots of `R = 32` tokens; every token is a random **filler** unless said below.
# - **Context** (first half, positions < 1024): each of the `K = 16` keys gets one **pair token** at
#   offset 1 of a random slot. A pair token is a single id that stands for `(key, value)`:
#   `id = PAIR0 + key * V + value`, with the value drawn uniformly from `V = 16` values.
# - **Queries** (last quarter, positions >= 1536): offset 1 of each of the last 16 slots holds a
#   **query token** (a key, in its own id range) for a random context key, and offset 2 holds the
#   answer, that key's **value token**. The model must predict the answer at the query position.
# - Loss and accuracy count only the answer predictions. The value is drawn independently of
#   everything else, so without reading the context the best guess is right with probability
#   `1 / V = 1/16` (chance).
#
# A query is at least 544 and at most ~2000 tokens after its pair (distribution plotted below). The
# local heads see only the query's own 32-token slot, which holds no pair, so the answer can only come
# through the long-range dilated heads. Because a pair is one token on a kept position, the lookup is
# one hop: a long head at the query compares the query key with the key part of each earlier kept
# position and copies the value part of the match.

# %% tags=["figure"]
N, R, OFF = 2048, 32, 1                     # sequence, slot (= local segment = dilation rate), kept offset
F, K, V = 16, 16, 16                        # filler ids, keys, values
VALUE0, QUERY0, PAIR0 = F, F + V, F + V + K # id ranges: fillers [0, F), values, query keys, pair tokens
VOCAB = PAIR0 + K * V
SEGMENTS, RATES = (R, N), (1, R)
SLOTS = N // R
CTX_SLOTS = np.arange(SLOTS // 2)           # pairs live in the first half
QRY_SLOTS = np.arange(SLOTS - SLOTS // 4, SLOTS)  # queries fill the last quarter


def make_batch(rng: np.random.Generator, b: int):
    """tokens (b, N) int32; targets (b, N) (the next token); mask (b, N) True at query positions;
    pair_pos (b, N) position of the pair each query needs (-1 elsewhere)."""
    toks = rng.integers(0, F, size=(b, N))
    pair_pos = np.full((b, N), -1)
    qpos = QRY_SLOTS * R + OFF
    for i in range(b):
        vals = rng.integers(0, V, K)                           # value of each key in this sequence
        ppos = rng.choice(CTX_SLOTS, K, replace=False) * R + OFF  # where key k's pair token sits
        toks[i, ppos] = PAIR0 + np.arange(K) * V + vals
        asked = rng.integers(0, K, len(qpos))
        toks[i, qpos] = QUERY0 + asked
        toks[i, qpos + 1] = VALUE0 + vals[asked]                # the answer follows its query
        pair_pos[i, qpos] = ppos[asked]
    mask = pair_pos >= 0
    targets = np.concatenate([toks[:, 1:], np.zeros((b, 1), toks.dtype)], axis=1)
    return jnp.asarray(toks, jnp.int32), jnp.asarray(targets, jnp.int32), jnp.asarray(mask), pair_pos


toks, targets, mask, pair_pos = make_batch(np.random.default_rng(0), 1)
q = int(np.flatnonzero(np.asarray(mask[0]))[-1])
p = int(pair_pos[0, q])
key, val = divmod(int(toks[0, p]) - PAIR0, V)
print(f"query at position {q}: key {int(toks[0, q]) - QUERY0} -> answer value {int(targets[0, q]) - VALUE0}; "
      f"its pair token (key {key}, value {val}) sits at position {p}, {q - p} tokens back")

_, _, m64, pp64 = make_batch(np.random.default_rng(9), 64)
dist = (np.arange(N)[None, :] - pp64)[np.asarray(m64)]
plt.figure(figsize=(5, 2.8))
plt.hist(dist, bins=32)
plt.xlabel("tokens between a query and the pair it needs"); plt.ylabel("queries")
plt.title(f"min {dist.min()}, median {int(np.median(dist))}, max {dist.max()}")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Model and optimizer
#
# Two layers of width 64 with four heads, AdamW with a linear warmup and a cosine decay. The batch
# holds 8 sequences, i.e. 128 answers per step.

# %%
STEPS = 40 if QUICK else int(os.environ.get("JAX_DILATED_TRAIN_STEPS", 1400))
BATCH, LR, WARMUP = 8, 5e-3, 30
CONFIG = dict(vocab_size=VOCAB, embed_dim=64, num_heads=4, num_layers=2, segment_lengths=SEGMENTS,
              dilation_rates=RATES, mlp_ratio=2, tie_embeddings=True)

model = LongNetLM(**CONFIG, rngs=nnx.Rngs(0))
schedule = optax.warmup_cosine_decay_schedule(0.0, LR, WARMUP, STEPS, LR * 0.1)
optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
print(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))), "parameters, vocabulary", VOCAB)


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
    return model(toks).argmax(-1)


# %% tags=["training"]
rng = np.random.default_rng(1)
LOG_EVERY = 10 if QUICK else 100
history = []
t0 = time.perf_counter()
for step in range(STEPS):
    loss, acc = train_step(model, optimizer, *make_batch(rng, BATCH)[:3])
    history.append((float(loss), float(acc)))
    if step % LOG_EVERY == 0 or step == STEPS - 1:
        print(f"step {step:4d}  loss {history[-1][0]:.3f}  batch recall {history[-1][1]:.3f}  "
              f"{time.perf_counter() - t0:6.1f} s", flush=True)
train_seconds = time.perf_counter() - t0
print(f"trained {STEPS} steps in {train_seconds:.0f} s (cross-entropy at the answers: {history[0][0]:.3f} at the "
      f"first step, {history[-1][0]:.3f} at the last)")

# %% tags=["figure"]
loss_curve, acc_curve = np.array(history).T
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
ax[0].plot(loss_curve); ax[0].axhline(np.log(V), ls="--", c="gray", label="chance (log V)")
ax[0].set_xlabel("step"); ax[0].set_ylabel("cross-entropy at answers"); ax[0].legend()
ax[1].plot(acc_curve); ax[1].axhline(1 / V, ls="--", c="gray", label="chance")
ax[1].set_xlabel("step"); ax[1].set_ylabel("batch recall accuracy"); ax[1].set_ylim(0, 1); ax[1].legend()
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Accuracy on fresh sequences
#
# Held-out sequences from a generator seed never used in training, scored by the distance between
# each query and its pair. As a control, the same sequences with every pair token replaced by a filler
# must fall to chance: the answers really come from the context.

# %%
eval_rng = np.random.default_rng(2)
EVAL_BATCHES = 2 if QUICK else 8
dists, oks, ablated = [], [], []
for _ in range(EVAL_BATCHES):
    toks, targets, mask, pair_pos = make_batch(eval_rng, BATCH)
    m, y = np.asarray(mask), np.asarray(targets)
    oks.append((np.asarray(predict(model, toks)) == y)[m])
    dists.append((np.arange(N)[None, :] - pair_pos)[m])
    blank = np.where(np.asarray(toks) >= PAIR0, 0, np.asarray(toks))     # remove the context
    ablated.append((np.asarray(predict(model, jnp.asarray(blank))) == y)[m])
oks, dists, ablated = map(np.concatenate, (oks, dists, ablated))
accuracy = oks.mean()
print(f"recall accuracy: {accuracy:.3f} over {oks.size} fresh queries (chance {1 / V:.3f})")
print(f"control, pair tokens removed: {ablated.mean():.3f}")
edges = [544, 1024, 1536, 2048]
for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (dists >= lo) & (dists < hi)
    print(f"  queries {lo:4d}-{hi:4d} tokens after their pair: accuracy {oks[sel].mean():.3f} ({sel.sum()} queries)")
if accuracy >= 0.9:
    print("reached the >= 90% target")
else:
    print(f"below the 90% target after {STEPS} steps ({'quick mode' if QUICK else 'full run'})")

# %% [markdown]
# ## Generating from the trained model
#
# `model.generate(prompt, max_new_tokens, ...)` prefills the prompt in one call and then decodes one
# token per step with a key/value cache per layer (docs/semantics.md section 12); it runs on a copy of
# the model, which it leaves unchanged. The prompt is a fresh sequence cut right after its last query
# token, so the first generated token is the model's answer; what follows the answer in the data is
# random filler, so the rest of the continuation has nothing to get right. `temperature=0` (the
# default) is greedy; a positive temperature samples, with `rng` as the key. Token ids are shown by
# what they stand for: `f3` a filler, `q5` the query for key 5, `v7` value 7, `(k,v)` a pair token.

# %%
def token_name(t: int) -> str:
    if t < VALUE0:
        return f"f{t}"
    if t < QUERY0:
        return f"v{t - VALUE0}"
    if t < PAIR0:
        return f"q{t - QUERY0}"
    return "({},{})".format(*divmod(t - PAIR0, V))


NEW = 4
toks, targets, mask, _ = make_batch(np.random.default_rng(4), 2)
cut = int(np.flatnonzero(np.asarray(mask[0]))[-1]) + 1        # up to and including the last query token
prompt = toks[:, :cut]
greedy = model.generate(prompt, NEW)
sampled = model.generate(prompt, NEW, temperature=1.0, rng=jax.random.key(0))
assert greedy.shape == sampled.shape == (2, cut + NEW)
for i in range(2):
    print(f"sequence {i}: prompt of {cut} tokens ending ... {' '.join(token_name(int(t)) for t in prompt[i, -6:])}")
    print(f"  answer in the data: {token_name(int(targets[i, cut - 1]))}")
    print(f"  greedy continuation:  {' '.join(token_name(int(t)) for t in greedy[i, cut:])}")
    print(f"  sampled (T = 1.0):    {' '.join(token_name(int(t)) for t in sampled[i, cut:])}")

# %% [markdown]
# ## Save and restore (Orbax)
#
# Flax NNX checkpoints are the model's `nnx.State` written by Orbax. Only the parameters are saved
# here (`nnx.state(model, nnx.Param)`); to restore, build a model of the same configuration (any
# seed), or an abstract one with `nnx.eval_shape`, and `nnx.update` it with the restored state.

# %%
import tempfile

ckpt_dir = Path(tempfile.mkdtemp()) / "longnet"
with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt_dir, nnx.state(model, nnx.Param))

restored = LongNetLM(**CONFIG, rngs=nnx.Rngs(123))
abstract = nnx.state(nnx.eval_shape(lambda: LongNetLM(**CONFIG, rngs=nnx.Rngs(0))), nnx.Param)
with ocp.StandardCheckpointer() as ckptr:
    nnx.update(restored, ckptr.restore(ckpt_dir, abstract))

toks = make_batch(np.random.default_rng(3), 2)[0]
same = bool((np.asarray(predict(restored, toks)) == np.asarray(predict(model, toks))).all())
logit_diff = float(jnp.abs(nnx.jit(lambda m, t: m(t))(restored, toks) - nnx.jit(lambda m, t: m(t))(model, toks)).max())
print("restored predictions equal:", same, "| max logit difference:", logit_diff)
assert same and logit_diff == 0.0

# %% [markdown]
# ## Notes
#
# - The loss stays at chance (`log 16`) for a few hundred steps and then drops: the model first has
#   to learn, for each of the 256 pair tokens, an embedding whose key part matches the query token
#   and whose value part maps to the answer, and the attention only starts to help once both exist.
# - An earlier version of this task stored `key value` as two tokens and needed a two-hop
#   (induction-style) circuit: a local head copies the key into the value's position, then a long
#   head matches the query against that copy. That circuit formed much more slowly (24% recall after
#   1000 steps). One pair token per kept position makes the long-range lookup a single hop; the
#   distance it has to bridge is unchanged.
# - Measured full run (1400 steps, 315 s on a 2-core CPU): **0.82** recall on held-out queries, 0.06
#   with the pairs removed. Well above chance (0.0625), but below the 90% the project set itself;
#   accuracy was still rising slowly when the learning rate had decayed. docs/notebooks.md lists what
#   else was tried.
