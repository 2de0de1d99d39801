"""The LongNet-style language model (jax_dilated.models, mirrored by torch_ref.models).

Shapes and the tied/untied head, causality, JAX vs torch parity through weight conversion (float64),
an optax training step under nnx.jit, dropout, an orbax save/restore round trip, and bad input.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx

import jax_dilated as jd
import torch_ref.models as tm
from jax_dilated.models import LongNetLM, sinusoidal_positions

VOCAB, E, H, L = 37, 16, 4, 2
SEGS, RATES = (4, 16), (1, 2)


def _model(seed: int = 0, **kw) -> LongNetLM:
    return LongNetLM(kw.pop("vocab_size", VOCAB), E, H, kw.pop("num_layers", L), SEGS, RATES, rngs=nnx.Rngs(seed), **kw)


@nnx.jit(static_argnames=("deterministic",))
def _forward(model, tokens, key_padding_mask=None, deterministic=None):
    """Jitted ``model(tokens)``: the eager NNX call dispatches op by op and is slow on a busy CPU."""
    return model(tokens, key_padding_mask=key_padding_mask, deterministic=deterministic)


def _tokens(rng: np.random.Generator, b: int = 2, n: int = 32) -> jax.Array:
    return jnp.asarray(rng.integers(0, VOCAB, size=(b, n)), jnp.int32)


@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_head(tie):
    rng = np.random.default_rng()
    model = _model(int(rng.integers(1 << 30)), tie_embeddings=tie)
    tokens = _tokens(rng, b=3, n=32)
    logits = _forward(model, tokens)
    assert logits.shape == (3, 32, VOCAB) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    names = set(jd.to_torch_state_dict(model))
    assert ("lm_head.weight" in names) == (not tie)
    assert "token_embedding" in names and "blocks.1.attn.q_proj.weight" in names
    # the option is honoured: the head in use is the one that moves the logits
    if tie:
        model.token_embedding[...] = model.token_embedding[...] * 2.0
    else:
        model.lm_head.weight[...] = model.lm_head.weight[...] * 2.0
        np.testing.assert_allclose(np.asarray(_forward(model, tokens)), 2.0 * np.asarray(logits), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(_forward(model, tokens)), np.asarray(logits))


def test_causal():
    rng = np.random.default_rng()
    model = _model(int(rng.integers(1 << 30)))
    tokens = _tokens(rng, n=32)
    t = int(rng.integers(1, 31))
    bump = jnp.asarray(rng.integers(1, VOCAB, 2), jnp.int32)
    changed = tokens.at[:, t].set((tokens[:, t] + bump) % VOCAB)
    # the same compiled call for both, so only the changed token can make them differ
    a, b = np.asarray(_forward(model, tokens)), np.asarray(_forward(model, changed))
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("tie", [True, False])
def test_torch_parity_float64(tie):
    rng = np.random.default_rng()
    model = _model(int(rng.integers(1 << 30)), tie_embeddings=tie, param_dtype=jnp.float64)
    ref = tm.LongNetLM(VOCAB, E, H, L, SEGS, RATES, tie_embeddings=tie, dtype=torch.float64)
    ref.load_state_dict({k: torch.tensor(v) for k, v in jd.to_torch_state_dict(model).items()})
    ref.eval()
    tokens = _tokens(rng, n=32)
    pad = np.zeros((2, 32), bool)
    pad[1, 20:] = True  # right padding in the second sequence
    out = np.asarray(_forward(model, tokens, jnp.asarray(pad)))
    with torch.no_grad():
        expect = ref(torch.tensor(np.array(tokens)).long(), key_padding_mask=torch.as_tensor(pad)).numpy()
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-10)
    # and back: torch weights into a fresh NNX model give the same logits
    fresh = _model(int(rng.integers(1 << 30)), tie_embeddings=tie, param_dtype=jnp.float64)
    jd.load_torch_state_dict(fresh, ref.state_dict())
    np.testing.assert_array_equal(np.asarray(_forward(fresh, tokens, jnp.asarray(pad))), out)


def test_sinusoidal_positions_match_torch():
    pos = np.asarray(sinusoidal_positions(64, 16, jnp.float64))
    np.testing.assert_allclose(pos, tm.sinusoidal_positions(64, 16, torch.float64).numpy(), rtol=0, atol=1e-12)
    assert pos[0, 0] == 0.0 and pos[0, 1] == 1.0 and pos[5, 0] == np.sin(5.0)


def _loss(model, tokens, targets):
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), targets).mean()


def test_adamw_training_lowers_loss():
    rng = np.random.default_rng()
    model = _model(int(rng.integers(1 << 30)), tie_embeddings=False)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens, targets):
        loss, grads = nnx.value_and_grad(_loss)(model, tokens, targets)
        opt.update(model, grads)
        return loss

    # tiny task: the next token is the current one shifted by 3 (mod vocab)
    tokens = _tokens(rng, b=4, n=32)
    targets = (tokens + 3) % VOCAB
    first = float(step(model, opt, tokens, targets))
    for _ in range(40):
        last = float(step(model, opt, tokens, targets))
    assert np.isfinite(last) and last < 0.5 * first, (first, last)


def test_dropout_honoured():
    rng = np.random.default_rng()
    model = _model(int(rng.integers(1 << 30)), dropout=0.3, num_layers=1)
    tokens = _tokens(rng)
    a, b = np.asarray(_forward(model, tokens)), np.asarray(_forward(model, tokens))
    assert not np.allclose(a, b)  # training mode: fresh dropout masks per call
    model.eval()
    c = np.asarray(_forward(model, tokens))
    np.testing.assert_array_equal(c, np.asarray(_forward(model, tokens)))
    model.train()  # the call argument overrides the mode
    np.testing.assert_array_equal(np.asarray(_forward(model, tokens, deterministic=True)), c)


def test_orbax_save_restore(tmp_path):
    rng = np.random.default_rng()
    model = _model(int(rng.integers(1 << 30)), tie_embeddings=False)
    tokens = _tokens(rng)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, nnx.state(model, nnx.Param))
    restored = _model(int(rng.integers(1 << 30)), tie_embeddings=False)  # other random weights
    assert not np.allclose(np.asarray(_forward(restored, tokens)), np.asarray(_forward(model, tokens)))
    abstract = nnx.state(nnx.eval_shape(lambda: _model(0, tie_embeddings=False)), nnx.Param)
    with ocp.StandardCheckpointer() as ckptr:
        nnx.update(restored, ckptr.restore(path, abstract))
    np.testing.assert_array_equal(np.asarray(_forward(restored, tokens)), np.asarray(_forward(model, tokens)))


@pytest.mark.parametrize("kw, err, match", [
    (dict(embed_dim=15, num_heads=3), ValueError, "embed_dim=15 is odd"),
    (dict(tie_embeddings=1), ValueError, "tie_embeddings=1 must be True or False"),
    (dict(mlp_ratio=0), ValueError, "mlp_ratio=0 must be a positive integer"),
    (dict(num_layers=0), ValueError, "num_layers=0 must be a positive integer"),
    (dict(vocab_size=-2), ValueError, "vocab_size=-2 must be a positive integer"),
])
def test_bad_config(kw, err, match):
    args = dict(vocab_size=VOCAB, embed_dim=E, num_heads=H, num_layers=L, segment_lengths=SEGS, dilation_rates=RATES)
    args.update(kw)
    with pytest.raises(err, match=match):
        LongNetLM(**args, rngs=nnx.Rngs(0))
    with pytest.raises(err, match=match):
        tm.LongNetLM(**args)


def test_bad_tokens():
    model = _model()
    with pytest.raises(ValueError, match="pass integer token ids of shape"):
        model(jnp.ones((2, 32), jnp.float32))
    with pytest.raises(ValueError, match="pass integer token ids of shape"):
        model(jnp.ones((32,), jnp.int32))
    with pytest.raises(ValueError, match="pass integer token ids of shape"):
        tm.LongNetLM(VOCAB, E, H, L, SEGS, RATES)(torch.ones(2, 32))
    with pytest.raises(ValueError, match="sinusoidal positions need an even embed_dim"):
        sinusoidal_positions(8, 7)
