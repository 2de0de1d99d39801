"""Key/value-cache decoding (semantics section 12): every decoded row equals the full causal forward.

Prompts of several lengths are prefilled in one chunk, the rest decoded one position at a time to the
end of the cache; every row is compared with the float64 reference of the causal call over the whole
sequence (rows do not depend on later tokens). Both frameworks, both merges, grouped-query heads.
Block-sparse attention has no decoding (its layout is not causal-incremental) and is not tested here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_dilated as jd
import torch_ref as tr
from jax_dilated import decode as jdecode
from parity_tests import reference as ref

SEGS, RATES = (4, 8, 16), (1, 2, 4)
LENGTH = 32  # a multiple of lcm(SEGS)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """One framework's decode step on NumPy arrays: ``(q, k, v, cache, index, merge) -> (out, cache)``."""

    name: str
    step: Callable

    def __repr__(self) -> str:
        return self.name


def _jax_step(q, k, v, cache, index, merge):
    out, ck, cv = jd.dilated_attention_decode(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), *cache, index, segment_lengths=SEGS, dilation_rates=RATES,
        merge=merge,
    )
    return np.asarray(out), (ck, cv)


def _torch_step(q, k, v, cache, index, merge):
    out, ck, cv = tr.dilated_attention_decode(
        torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v), *cache, index, segment_lengths=SEGS,
        dilation_rates=RATES, merge=merge,
    )
    return out.numpy(), (ck, cv)


def _empty(name, b, hk, d, dtype):
    if name == "jax":
        return jnp.zeros((b, LENGTH, hk, d), dtype), jnp.zeros((b, LENGTH, hk, d), dtype)
    return torch.zeros(b, LENGTH, hk, d, dtype=getattr(torch, np.dtype(dtype).name)), torch.zeros(
        b, LENGTH, hk, d, dtype=getattr(torch, np.dtype(dtype).name)
    )


DECODERS = [Decoder("jax", _jax_step), Decoder("torch", _torch_step)]


def _decode_all(dec: Decoder, q, k, v, prompt: int, merge: str) -> np.ndarray:
    """Prefill ``prompt`` positions in one chunk (none for 0), then decode the rest one at a time."""
    cache = _empty(dec.name, q.shape[0], k.shape[2], q.shape[3], q.dtype)
    rows = []
    if prompt:
        out, cache = dec.step(q[:, :prompt], k[:, :prompt], v[:, :prompt], cache, 0, merge)
        rows.append(out)
    for t in range(prompt, q.shape[1]):
        out, cache = dec.step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], cache, t, merge)
        rows.append(out)
    return np.concatenate(rows, axis=1)


@pytest.mark.parametrize("dec", DECODERS, ids=repr)
@pytest.mark.parametrize(("merge", "hk"), [("head_partition", 2), ("lse", 2), ("lse", 6)])
def test_decoded_rows_equal_full_causal_float64(dec, merge, hk):
    """h = 6 over h_kv = 2 (grouped-query, head groups splitting kv heads) for both merges, and h_kv = h."""
    rng = np.random.default_rng(hash((dec.name, merge, hk)) % 2**32)
    b, h, d = 2, 6, 8
    q, k, v = rng.standard_normal((b, LENGTH, h, d)), rng.standard_normal((b, LENGTH, hk, d)), rng.standard_normal(
        (b, LENGTH, hk, d)
    )
    want = ref.dilated_attention(q, k, v, SEGS, RATES, is_causal=True, merge=merge)
    s = SEGS[1]
    for prompt in (0, 1, s - 1, s, s + 1, int(rng.integers(2, LENGTH))):
        got = _decode_all(dec, q, k, v, prompt, merge)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=f"prompt={prompt}")


@pytest.mark.parametrize("dec", DECODERS, ids=repr)
def test_decoded_rows_float32_within_spec(dec):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, LENGTH, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, LENGTH, 2, 16)).astype(np.float32) for _ in range(2))
    want = ref.dilated_attention(q, k, v, SEGS, RATES, is_causal=True, merge="lse")
    with jax.default_matmul_precision("highest"):
        got = _decode_all(dec, q, k, v, 5, "lse")
    assert got.dtype == np.float32
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)) + 1e-6


def test_jax_step_traces_once_for_every_position():
    """One compiled program per chunk length: decoding all positions adds one T=1 entry to the cache."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, LENGTH, 4, 8))) for _ in range(3))
    cache = (jnp.zeros((1, LENGTH, 4, 8)), jnp.zeros((1, LENGTH, 4, 8)))
    before = jdecode._decode._cache_size()
    for t in range(LENGTH):
        _, *cache = jd.dilated_attention_decode(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], *cache, t, segment_lengths=SEGS, dilation_rates=RATES,
            scale=0.123,  # a configuration no other test compiles
        )
    assert jdecode._decode._cache_size() - before == 1


def test_torchscale_style_offset_rule_would_fail():
    """The rule of torchscale's incremental decoding, offset 0 and no grid check for every decoded token,
    is not the causal forward: with a rate above 1 its rows differ from position 1 on. Ours match."""
    rng = np.random.default_rng(11)
    n, d = 16, 8
    q, k, v = (rng.standard_normal((1, n, 1, d)) for _ in range(3))
    seg, rate = (16,), (2,)
    want = ref.dilated_attention(q, k, v, seg, rate, is_causal=True)

    def offset_zero_row(t):  # every key of the segment with (p mod s) mod r == 0 up to t, never zeroed
        keys = [p for p in range(t - t % 16, t + 1) if (p % 16) % 2 == 0]
        allowed = np.zeros((n, n), bool)
        allowed[t, keys] = True
        return ref.masked_softmax_attention(q[0, :, 0], k[0, :, 0], v[0, :, 0], allowed, d**-0.5)[0][t]

    style = np.stack([offset_zero_row(t) for t in range(n)])
    assert np.max(np.abs(style[1:] - want[0, 1:, 0])) > 1e-2  # the torchscale-style rule is wrong
    cache = (jnp.zeros((1, n, 1, d)), jnp.zeros((1, n, 1, d)))
    ours = []
    for t in range(n):
        o, *cache = jd.dilated_attention_decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], *cache, t,
                                                segment_lengths=seg, dilation_rates=rate)
        ours.append(np.asarray(o))
    np.testing.assert_allclose(np.concatenate(ours, 1), want, atol=1e-12)


def test_bad_decode_calls_raise():
    x, cache = jnp.ones((1, 1, 4, 8)), jnp.zeros((1, 30, 4, 8))
    with pytest.raises(ValueError, match="use max_length=32"):
        jd.dilated_attention_decode(x, x, x, cache, cache, 0, segment_lengths=SEGS, dilation_rates=RATES)
    cache = jnp.zeros((1, 32, 4, 8))
    with pytest.raises(ValueError, match="overflows the cache"):
        jd.dilated_attention_decode(x, x, x, cache, cache, 32, segment_lengths=SEGS, dilation_rates=RATES)
    with pytest.raises(ValueError, match="overflows the cache"):
        tr.dilated_attention_decode(*(torch.ones(1, 1, 4, 8),) * 3, *(torch.zeros(1, 32, 4, 8),) * 2, 32,
                                    segment_lengths=SEGS, dilation_rates=RATES)
    with pytest.raises(ValueError, match="should both be"):
        jd.dilated_attention_decode(x, x, x, cache, jnp.zeros((1, 32, 1, 8)), 0, segment_lengths=SEGS,
                                    dilation_rates=RATES)
    step = jax.jit(lambda i: jd.dilated_attention_decode(x, x, x, cache, cache, i, segment_lengths=SEGS,
                                                         dilation_rates=RATES)[0])
    assert bool(jnp.isnan(step(32)).all()) and not bool(jnp.isnan(step(31)).any())  # traced overflow: NaN rows


# ----------------------------------------------------------------------------------------------
# Modules and generation.

MODULE_KW = dict(num_kv_heads=2, rope_theta=10000.0, merge="lse")


def _jax_module(seed=0):
    return jd.ImprovedMultiheadDilatedAttention(32, 4, SEGS, RATES, param_dtype=jnp.float64, rngs=nnx.Rngs(seed),
                                                **MODULE_KW)


def test_nnx_module_decode_equals_full_causal_call():
    mha = _jax_module()
    x = jax.random.normal(jax.random.key(1), (2, 29, 32), jnp.float64)
    want = mha(x, is_causal=True)
    dec = nnx.view(mha, decode=True, batch_size=2, max_length=LENGTH)
    assert mha.decode is False and dec.decode is True  # nnx.view leaves the original alone
    rows = [dec(x[:, :9])] + [dec(x[:, t : t + 1]) for t in range(9, 29)]
    np.testing.assert_allclose(np.concatenate(rows, 1), want, atol=1e-10)
    assert int(dec.cache_index[...]) == 29 and dec.cached_key[...].shape == (2, LENGTH, 2, 8)
    with pytest.raises(ValueError, match="overflows"):
        dec(jnp.ones((2, 4, 32)))  # 29 + 4 > 32
    with pytest.raises(ValueError, match="use max_length=32"):
        mha.init_cache((2, 20, 32))


def test_nnx_module_decode_under_nnx_jit():
    mha = _jax_module(1)
    mha.init_cache((1, LENGTH, 32), jnp.float64)
    x = jax.random.normal(jax.random.key(2), (1, 12, 32), jnp.float64)
    step = nnx.jit(lambda m, xt: m(xt, decode=True))
    rows = [step(mha, x[:, t : t + 1]) for t in range(12)]
    fresh = _jax_module(1)
    np.testing.assert_allclose(np.concatenate(rows, 1), fresh(x, is_causal=True), atol=1e-10)


def test_view_deterministic_turns_dropout_off():
    mha = jd.ImprovedMultiheadDilatedAttention(32, 4, SEGS, RATES, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    x = jnp.ones((1, 16, 32))
    ev = nnx.view(mha, deterministic=True)
    np.testing.assert_array_equal(ev(x), ev(x))  # no dropout: the same twice
    assert not np.array_equal(np.asarray(mha(x)), np.asarray(mha(x)))  # the original still drops


def test_torch_module_decode_equals_full_causal_call():
    torch.manual_seed(0)
    mha = tr.ImprovedMultiheadDilatedAttention(32, 4, SEGS, RATES, dtype=torch.float64, **MODULE_KW)
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    with torch.no_grad():
        want = mha(x, is_causal=True)
        cache = mha.init_cache(2, LENGTH)
        rows = [mha(x[:, :9], cache=cache)] + [mha(x[:, t : t + 1], cache=cache) for t in range(9, 29)]
    torch.testing.assert_close(torch.cat(rows, 1), want, atol=1e-10, rtol=0)
    assert cache.index == 29
    with pytest.raises(ValueError, match="use max_length=32"):
        mha.init_cache(2, 20)


@pytest.mark.parametrize("rope", [None, 10000.0])
def test_greedy_generation_equals_argmax_and_matches_torch(rope):
    kw = dict(segment_lengths=SEGS, dilation_rates=RATES, num_kv_heads=2, rope_theta=rope)
    model = jd.LongNetLM(40, 32, 4, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(3), **kw)
    prompt = jax.random.randint(jax.random.key(4), (2, 6), 0, 40)
    out = model.generate(prompt, 20)
    assert out.shape == (2, 26) and np.array_equal(out[:, :6], prompt)
    logits = model(out)  # the full forward: each generated token is the argmax after its prefix
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[:, 5:-1]), -1), np.asarray(out[:, 6:]))
    assert model.blocks[0].attn.cached_key is None  # generation leaves the model without a cache
    tm = tr.LongNetLM(40, 32, 4, 2, dtype=torch.float64, **kw)
    tm.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in jd.to_torch_state_dict(model).items()})
    np.testing.assert_array_equal(tm.generate(torch.tensor(np.asarray(prompt)).long(), 20).numpy(), np.asarray(out))


def test_sampling_is_reproducible_and_respects_top_k():
    model = jd.LongNetLM(40, 16, 2, 1, segment_lengths=(4, 8), dilation_rates=(1, 2), rngs=nnx.Rngs(0))
    prompt = jnp.zeros((3, 2), jnp.int32)
    a = model.generate(prompt, 10, temperature=1.0, top_k=1, rng=jax.random.key(0))
    np.testing.assert_array_equal(a, model.generate(prompt, 10))  # top_k=1 is greedy
    b1 = model.generate(prompt, 10, temperature=2.0, rng=jax.random.key(5))
    np.testing.assert_array_equal(b1, model.generate(prompt, 10, temperature=2.0, rng=jax.random.key(5)))
    with pytest.raises(ValueError, match="rng"):
        model.generate(prompt, 3, temperature=1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 3, top_k=0)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(jnp.zeros((1, 0), jnp.int32), 3)
    tm = tr.LongNetLM(40, 16, 2, 1, segment_lengths=(4, 8), dilation_rates=(1, 2))
    g = tm.generate(torch.zeros(3, 2, dtype=torch.long), 10, temperature=1.0, top_k=1)
    torch.testing.assert_close(g, tm.generate(torch.zeros(3, 2, dtype=torch.long), 10))
