"""Multi-head modules: JAX (NNX) vs torch vs the float64 reference, conversion, dropout, training, errors."""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jax_dilated as jd
import torch_ref as tr
from parity_tests import reference_multihead as ref

B, N, E, H = 2, 16, 16, 4
D = E // H
SEG, RATES = (4, 8), (1, 2)
BLOCK = dict(block_size=4, pattern="dilated_sparse", sparsity_ratio=0.5, global_blocks=1)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One module class in both frameworks, with its positional/keyword options and reference core."""

    name: str
    jax_cls: type
    torch_cls: type
    args: tuple
    options: dict
    core: Callable[[], Callable]

    def __repr__(self) -> str:
        return self.name

    def torch(self, **kw) -> torch.nn.Module:
        return self.torch_cls(E, H, *self.args, **self.options, **kw)

    def jax(self, rngs: nnx.Rngs | None = None, **kw) -> nnx.Module:
        return self.jax_cls(E, H, *self.args, **self.options, rngs=rngs or nnx.Rngs(0), **kw)


def _kind(name, jax_cls, torch_cls, merge):
    return Kind(name, jax_cls, torch_cls, (SEG, RATES), dict(merge=merge),
                lambda: ref.dilated_core(SEG, RATES, merge))


KINDS = [
    _kind("standard-head_partition", jd.MultiheadDilatedAttention, tr.MultiheadDilatedAttention, "head_partition"),
    _kind("standard-lse", jd.MultiheadDilatedAttention, tr.MultiheadDilatedAttention, "lse"),
    _kind("improved-head_partition", jd.ImprovedMultiheadDilatedAttention, tr.ImprovedMultiheadDilatedAttention,
          "head_partition"),
    _kind("improved-lse", jd.ImprovedMultiheadDilatedAttention, tr.ImprovedMultiheadDilatedAttention, "lse"),
    Kind("block_sparse", jd.BlockSparseMultiheadDilatedAttention, tr.BlockSparseMultiheadDilatedAttention, (),
         dict(BLOCK), lambda: ref.block_sparse_core(**BLOCK)),
]
KIND = {k.name: k for k in KINDS}


def _rng() -> np.random.Generator:
    return np.random.default_rng()


def _inputs(rng, cross: bool, padded: bool, b: int = B):
    query = rng.standard_normal((b, N, E))
    key = rng.standard_normal((b, N, E)) if cross else None
    value = rng.standard_normal((b, N, E)) if cross else None
    mask = None
    if padded:
        mask = rng.random((b, N)) < 0.3
        mask[0, :BLOCK["block_size"] + 1] = True  # leading keys padded: early causal queries see no key
    return query, key, value, mask


def _pair(kind: Kind, dtype=torch.float64, **kw):
    """A torch module with fresh random weights (non-zero biases, non-trivial LayerNorm) and its NNX twin."""
    tm = kind.torch(dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if not name.endswith("weight") or name.startswith("norm"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "norm.weight" else 0.0))
    jm = kind.jax(param_dtype=jnp.float64 if dtype == torch.float64 else jnp.float32, **kw)
    jd.load_torch_state_dict(jm, tm.state_dict())
    return tm, jm


def _state(tm: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in tm.state_dict().items()}


def _t(x):
    return None if x is None else torch.as_tensor(x)


def _j(x):
    return None if x is None else jnp.asarray(x)


def _assert_close(got, want, tol):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want))
    assert err <= tol * max(1.0, np.max(np.abs(want))), f"max abs err {err:.3e}"


# ----------------------------------------------------------------------------------------------
# Outputs: JAX vs torch vs float64 reference.

CASES = {
    "self": dict(cross=False, padded=False, causal=False),
    "causal-padded": dict(cross=False, padded=True, causal=True),
    "cross-padded": dict(cross=True, padded=True, causal=False),
    "cross-causal": dict(cross=True, padded=False, causal=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_match_reference(kind, case):
    c = CASES[case]
    query, key, value, mask = _inputs(_rng(), c["cross"], c["padded"])
    tm, jm = _pair(kind)
    want = ref.multihead(_state(tm), kind.core(), query, key, value, num_heads=H, key_padding_mask=mask,
                         is_causal=c["causal"])
    got_j = jm(_j(query), _j(key), _j(value), key_padding_mask=_j(mask), is_causal=c["causal"])
    with torch.no_grad():
        got_t = tm(_t(query), _t(key), _t(value), key_padding_mask=_t(mask), is_causal=c["causal"])
    assert got_j.dtype == jnp.float64 and got_t.dtype == torch.float64
    _assert_close(got_j, want, 1e-10)
    _assert_close(got_t.numpy(), want, 1e-10)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_fully_padded_query_gets_zero_before_norm(layer_norm):
    """A query with no visible key gives 0 before the sub-LN: the output is out_proj(norm(0))."""
    kind = KIND["improved-head_partition"]
    tm, jm = _pair(kind, layer_norm=layer_norm)
    query = _rng().standard_normal((1, N, E))
    mask = np.zeros((1, N), bool)
    mask[0, :SEG[1]] = True  # every key of the first segment of every group is padding
    out = np.asarray(jm(_j(query), key_padding_mask=_j(mask)))
    sd = _state(tm)
    zero_out = (sd["norm.bias"] if layer_norm else np.zeros(E)) @ sd["out_proj.weight"].T + sd["out_proj.bias"]
    _assert_close(out[0, :SEG[0]], np.broadcast_to(zero_out, (SEG[0], E)), 1e-12)


@pytest.mark.parametrize("bias,layer_norm", [(False, True), (True, False), (False, False)])
def test_options_bias_and_layer_norm(bias, layer_norm):
    kind = KIND["standard-lse"]
    tm, jm = _pair(kind, bias=bias, layer_norm=layer_norm)
    names = set(jd.to_torch_state_dict(jm))
    assert names == set(tm.state_dict()) and ("q_proj.bias" in names) == bias and ("norm.weight" in names) == layer_norm
    query = _rng().standard_normal((B, N, E))
    want = ref.multihead(_state(tm), kind.core(), query, num_heads=H, is_causal=True)
    _assert_close(jm(_j(query), is_causal=True), want, 1e-10)
    with torch.no_grad():
        _assert_close(tm(_t(query), is_causal=True).numpy(), want, 1e-10)


def test_float32_and_dtype_options():
    """float32 parity within the semantics tolerance. NNX: `dtype` sets the computation dtype, `param_dtype` the
    weights'. torch: `dtype` is the factory dtype of the weights, and a call computes in the promotion
    of input and weight dtypes, so `module.half()(x.half())` computes in half."""
    kind = KIND["improved-head_partition"]
    tm, jm = _pair(kind, dtype=torch.float32)
    query, _, _, mask = _inputs(_rng(), cross=False, padded=True)
    want = ref.multihead(_state(tm), kind.core(), query, num_heads=H, key_padding_mask=mask, is_causal=True)
    with jax.default_matmul_precision("highest"):
        got = jm(jnp.asarray(query, jnp.float32), key_padding_mask=_j(mask), is_causal=True)
    with torch.no_grad():
        got_t = tm(torch.as_tensor(query, dtype=torch.float32), key_padding_mask=_t(mask), is_causal=True)
    assert got.dtype == jnp.float32 and got_t.dtype == torch.float32
    _assert_close(got, want, 1e-5)
    _assert_close(got_t.numpy(), want, 1e-5)
    bf = kind.jax(dtype=jnp.bfloat16)
    assert bf.q_proj.weight[...].dtype == jnp.float32
    assert bf(jnp.asarray(query, jnp.float32)).dtype == jnp.bfloat16
    tbf = kind.torch(dtype=torch.bfloat16)
    assert tbf.q_proj.weight.dtype == torch.bfloat16
    assert tbf(torch.as_tensor(query, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert tbf(torch.as_tensor(query, dtype=torch.float32)).dtype == torch.float32
    half = kind.torch().half()
    assert half(torch.as_tensor(query).half()).dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# Gradients of every parameter and input, across frameworks, float64.


@functools.lru_cache(maxsize=None)
def _jax_grad_fn(is_causal: bool):
    def loss(module, query, key, value, mask, cot):
        return jnp.sum(module(query, key, value, key_padding_mask=mask, is_causal=is_causal) * cot)

    return nnx.jit(nnx.grad(loss, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("kind,case", [("standard-head_partition", "causal-padded"), ("improved-lse", "cross-padded"),
                                       ("improved-head_partition", "cross-causal"), ("block_sparse", "causal-padded")])
def test_gradients_match_across_frameworks(kind, case):
    c = CASES[case]
    rng = _rng()
    query, key, value, mask = _inputs(rng, True, c["padded"])
    cot = rng.standard_normal((B, N, E))
    tm, jm = _pair(KIND[kind])
    g_mod, g_q, g_k, g_v = _jax_grad_fn(c["causal"])(jm, _j(query), _j(key), _j(value), _j(mask), _j(cot))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (query, key, value))
    (tm(tq, tk, tv, key_padding_mask=_t(mask), is_causal=c["causal"]) * torch.as_tensor(cot)).sum().backward()
    jax_grads = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(g_mod, nnx.Param))}
    torch_grads = {n: p.grad.numpy() for n, p in tm.named_parameters()}
    assert set(jax_grads) == set(torch_grads) and len(torch_grads) == 10
    for name, g in torch_grads.items():
        _assert_close(jax_grads[name], g, 1e-9)
    for gj, t in ((g_q, tq), (g_k, tk), (g_v, tv)):
        assert np.abs(t.grad.numpy()).max() > 0
        _assert_close(gj, t.grad.numpy(), 1e-9)


# ----------------------------------------------------------------------------------------------
# Weight conversion.


def test_init_is_xavier_normal_with_gamma():
    """q/k: xavier normal gain 1; v/out: gain gamma_init (untruncated); biases 0; LayerNorm 1/0."""
    e, gamma = 256, 0.5
    jm = jd.MultiheadDilatedAttention(e, 4, SEG, RATES, gamma_init=gamma, rngs=nnx.Rngs(params=int(_rng().integers(1 << 30))))
    tm = tr.MultiheadDilatedAttention(e, 4, SEG, RATES, gamma_init=gamma)
    for sd in (jd.to_torch_state_dict(jm), _state(tm)):
        for proj, gain in (("q_proj", 1.0), ("k_proj", 1.0), ("v_proj", gamma), ("out_proj", gamma)):
            w = sd[f"{proj}.weight"]
            std = gain * np.sqrt(2.0 / (2 * e))
            assert w.shape == (e, e) and w.dtype == np.float32
            assert abs(w.std() / std - 1) < 0.03 and abs(w.mean()) < 0.03 * std
            assert np.abs(w).max() > 3.5 * std  # not truncated at 2 std
            assert np.array_equal(sd[f"{proj}.bias"], np.zeros(e, np.float32))
        assert np.array_equal(sd["norm.weight"], np.ones(e, np.float32))
        assert np.array_equal(sd["norm.bias"], np.zeros(e, np.float32))


@pytest.mark.parametrize("kind", [KIND["standard-head_partition"], KIND["block_sparse"]])
def test_conversion_round_trips_bit_exact(kind):
    tm = kind.torch()  # float32, fresh random init
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    jm = kind.jax(rngs=nnx.Rngs(int(_rng().integers(1 << 30))))
    jd.load_torch_state_dict(jm, tm.state_dict())
    back = jd.to_torch_state_dict(jm)
    assert isinstance(back, dict) and all(isinstance(v, np.ndarray) for v in back.values())
    assert back.keys() == before.keys()
    for name, v in before.items():
        assert back[name].dtype == np.float32 and np.array_equal(back[name], v.numpy()), name
    # and NNX -> torch -> NNX
    other = kind.torch()
    other.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
    jm2 = kind.jax(rngs=nnx.Rngs(7))
    jd.load_torch_state_dict(jm2, {k: v.numpy() for k, v in other.state_dict().items()})
    for name, v in jd.to_torch_state_dict(jm2).items():
        assert np.array_equal(v, back[name]), name


def test_load_rejects_mismatched_state_dicts():
    jm = KIND["improved-lse"].jax()
    sd = dict(jd.to_torch_state_dict(jm))
    del sd["k_proj.bias"], sd["norm.weight"]
    sd["extra.weight"] = np.ones(3)
    sd["q_proj.weight"] = np.ones((E, E + 1), np.float32)
    with pytest.raises(ValueError, match=r"missing keys: \['k_proj.bias', 'norm.weight'\]; unexpected keys: "
                                         r"\['extra.weight'\]; wrong shapes: \['q_proj.weight: got \(16, 17\), "
                                         r"expected \(16, 16\)'\]"):
        jd.load_torch_state_dict(jm, sd)
    with pytest.raises(TypeError, match="state_dict has type list; pass a mapping"):
        jd.load_torch_state_dict(jm, [1, 2])


def test_load_torch_checkpoint(tmp_path):
    kind = KIND["improved-head_partition"]
    tm = kind.torch()
    path = tmp_path / "mha.pt"
    torch.save(tm.state_dict(), path)
    jm = kind.jax(rngs=nnx.Rngs(3))
    jd.load_torch_checkpoint(jm, path)
    for name, v in jd.to_torch_state_dict(jm).items():
        assert np.array_equal(v, tm.state_dict()[name].numpy()), name


def test_load_torch_checkpoint_without_torch(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="load_torch_checkpoint needs PyTorch to read .pt files"):
        jd.load_torch_checkpoint(KIND["improved-lse"].jax(), tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------------------
# Dropout. All JAX dropout calls share one compiled core: same kind, rate and shapes.

DROP_KIND, DROP_RATE, DROP_BATCH = "improved-lse", 0.5, 256


def test_dropout_off_is_deterministic():
    kind = KIND[DROP_KIND]
    query = _rng().standard_normal((DROP_BATCH, N, E))
    tm, jm = _pair(kind, dropout=DROP_RATE)
    tm0, jm0 = _pair(kind)
    jd.load_torch_state_dict(jm0, tm.state_dict())
    tm0.load_state_dict(tm.state_dict())
    want = np.asarray(jm0(_j(query)))  # dropout 0 in training mode: no randomness
    assert np.array_equal(want, np.asarray(jm0(_j(query))))
    assert np.array_equal(np.asarray(jm(_j(query), deterministic=True)), want)
    jm.eval()
    assert jm.deterministic and np.array_equal(np.asarray(jm(_j(query))), want)
    jm.train()
    first = np.asarray(jm(_j(query)))
    assert not jm.deterministic and not np.allclose(first, want)
    assert not np.allclose(np.asarray(jm(_j(query))), first)  # the dropout stream advances
    with torch.no_grad():
        t_want = tm0(_t(query)).numpy()
        assert np.array_equal(t_want, tm0(_t(query)).numpy())
        tm.eval()
        assert np.array_equal(tm(_t(query)).numpy(), t_want)
        tm.train()
        assert not np.allclose(tm(_t(query)).numpy(), t_want)
    _assert_close(want, t_want, 1e-10)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_dropout_preserves_expected_value(framework):
    """Mean over many dropout draws equals the dropout-free output (layer_norm=False keeps it linear)."""
    tm, jm = _pair(KIND[DROP_KIND], dropout=DROP_RATE, layer_norm=False)
    query = _rng().standard_normal((1, N, E))
    tiled = np.ascontiguousarray(np.broadcast_to(query, (DROP_BATCH, N, E)))  # one dropout mask per row
    if framework == "jax":
        want = np.asarray(jm(_j(query), deterministic=True))
        draws = np.asarray(jm(_j(tiled), rngs=jax.random.key(int(_rng().integers(1 << 30)))))
    else:
        with torch.no_grad():
            want = tm.eval()(_t(query)).numpy()
            draws = tm.train()(_t(tiled)).numpy()
    se = draws.std(axis=0) / np.sqrt(DROP_BATCH)
    assert se.max() > 1e-3  # dropout acted
    assert np.all(np.abs(draws.mean(axis=0) - want[0]) <= 5 * se + 1e-12)


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("kind", [KIND[DROP_KIND], KIND["block_sparse"]])
def test_dropout_acts_on_attention_probabilities_only(kind, framework):
    """With every value row equal to one vector, attention without dropout returns that head's value
    vector c_h. Dropout on the probabilities rescales it, s * c_h per (query, head), s != 1; dropout on
    q or k would leave c_h exactly, and dropout on values or outputs would break the collinearity."""
    tm, jm = _pair(kind, dropout=DROP_RATE, layer_norm=False)
    sd = _state(tm)
    sd["out_proj.weight"], sd["out_proj.bias"] = np.eye(E), np.zeros(E)
    tm.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
    jd.load_torch_state_dict(jm, sd)
    rng = _rng()
    query = rng.standard_normal((DROP_BATCH, N, E))
    value = np.ascontiguousarray(np.broadcast_to(rng.standard_normal((DROP_BATCH, 1, E)), (DROP_BATCH, N, E)))
    if framework == "jax":
        out = np.asarray(jm(_j(query), _j(query), _j(value), rngs=jax.random.key(int(rng.integers(1 << 30)))))
    else:
        with torch.no_grad():
            out = tm.train()(_t(query), _t(query), _t(value)).numpy()
    c = (value[:, :1] @ sd["v_proj.weight"].T + sd["v_proj.bias"]).reshape(DROP_BATCH, 1, H, D)
    o = out.reshape(DROP_BATCH, N, H, D)
    s = np.sum(o * c, axis=-1) / np.sum(c * c, axis=-1)
    _assert_close(o, s[..., None] * c, 1e-12)
    assert np.abs(s - 1).max() > 0.2 and np.all(s >= 0)


# ----------------------------------------------------------------------------------------------
# Training.


def test_adamw_training_reduces_loss():
    """A student learns a teacher's map: optax.adamw steps under nnx.jit, 50 steps."""
    kind = KIND["improved-head_partition"]
    teacher = kind.jax(rngs=nnx.Rngs(int(_rng().integers(1 << 30))))
    student = kind.jax(rngs=nnx.Rngs(int(_rng().integers(1 << 30))))
    x = jnp.asarray(_rng().standard_normal((8, N, E)), jnp.float32)
    y = teacher(x, is_causal=True)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x, is_causal=True) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    opt = nnx.Optimizer(student, optax.adamw(1e-2), wrt=nnx.Param)
    losses = [float(step(student, opt, x, y)) for _ in range(50)]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.3 * losses[0], losses[::10]


# ----------------------------------------------------------------------------------------------
# The attention_fn adapter.


def _flax_twin(jm, merge, dropout_rate=0.0, **kw):
    """nnx.MultiHeadAttention running dilated attention, with the weights of our layer_norm=False module."""
    mha = nnx.MultiHeadAttention(H, E, attention_fn=jd.dilated_attention_fn(SEG, RATES, merge=merge),
                                 dropout_rate=dropout_rate, param_dtype=jnp.float64, decode=False,
                                 rngs=nnx.Rngs(0), **kw)
    sd = jd.to_torch_state_dict(jm)
    for ours, theirs in (("q_proj", mha.query), ("k_proj", mha.key), ("v_proj", mha.value)):
        theirs.kernel[...] = sd[f"{ours}.weight"].T.reshape(E, H, D)
        theirs.bias[...] = sd[f"{ours}.bias"].reshape(H, D)
    mha.out.kernel[...] = sd["out_proj.weight"].T.reshape(H, D, E)
    mha.out.bias[...] = sd["out_proj.bias"]
    return mha


@pytest.mark.parametrize("merge", ["head_partition", "lse"])
def test_attention_fn_matches_module(merge):
    kind = KIND[f"improved-{merge}"]
    _, jm = _pair(kind, layer_norm=False)
    mha = _flax_twin(jm, merge)
    query, key, value, mask = _inputs(_rng(), cross=True, padded=True)
    want = jm(_j(query), _j(key), _j(value), key_padding_mask=_j(mask), is_causal=True)
    got = mha(_j(query), _j(key), _j(value), mask=_j(~mask)[:, None, None, :], is_causal=True)
    _assert_close(got, want, 1e-10)
    _assert_close(mha(_j(query)), jm(_j(query)), 1e-10)


def test_attention_fn_dropout_precision_dtype():
    _, jm = _pair(KIND[DROP_KIND], layer_norm=False)
    query = _j(_rng().standard_normal((DROP_BATCH, N, E)))
    mha = _flax_twin(jm, "lse", dropout_rate=DROP_RATE, broadcast_dropout=False)
    want = jm(query)
    _assert_close(mha(query, deterministic=True), want, 1e-10)
    assert not np.allclose(mha(query, deterministic=False), want)
    fn = jd.dilated_attention_fn(SEG, RATES)
    q = jnp.asarray(_rng().standard_normal((B, N, H, D)))
    assert fn(q, q, q, dtype=jnp.float32).dtype == jnp.float32
    _assert_close(fn(q, q, q, precision=jax.lax.Precision.HIGHEST), jd.dilated_attention(
        q, q, q, segment_lengths=SEG, dilation_rates=RATES), 1e-12)


def test_attention_fn_rejects_what_it_cannot_honour():
    fn = jd.dilated_attention_fn(SEG, RATES)
    q = jnp.asarray(_rng().standard_normal((B, N, H, D)))
    with pytest.raises(ValueError, match="bias is not None; dilated attention cannot add"):
        fn(q, q, q, bias=jnp.ones((B, H, N, N)))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 1, 16, 16\); dilated attention can only express"):
        fn(q, q, q, mask=jnp.ones((B, 1, N, N), bool))
    with pytest.raises(ValueError, match="module is not None \\(sow_weights=True\\)"):
        fn(q, q, q, module=object())
    with pytest.raises(ValueError, match="broadcast_dropout=True shares one dropout mask"):
        fn(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"precision=\(.*\) is not supported"):
        fn(q, q, q, precision=(jax.lax.Precision.HIGH, jax.lax.Precision.HIGH))
    with pytest.raises(ValueError, match=r"have shapes \(16, 4, 4\), \(16, 4, 4\), \(16, 4, 4\); dilated_attention_fn takes"):
        fn(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="form='flash' is unknown"):
        jd.dilated_attention_fn(SEG, RATES, form="flash")
    with pytest.raises(ValueError, match="implementation='flash' is unknown"):
        jd.dilated_attention_fn(SEG, RATES, implementation="flash")
    _, jm = _pair(KIND["improved-head_partition"], layer_norm=False)
    mha = _flax_twin(jm, "head_partition", dropout_rate=0.1)
    with pytest.raises(ValueError, match="build nnx.MultiHeadAttention\\(..., broadcast_dropout=False\\)"):
        mha(_j(_rng().standard_normal((B, N, E))), deterministic=False)


# ----------------------------------------------------------------------------------------------
# Bad input: the same messages in both frameworks.

_X = np.ones((B, N, E))
BAD_CONSTRUCTION = [
    (dict(embed_dim=10), ValueError, "embed_dim=10 is not divisible by num_heads=4"),
    (dict(num_heads=0), ValueError, "num_heads=0 must be a positive integer"),
    (dict(embed_dim=2.5), ValueError, r"embed_dim=2.5 must be a positive integer"),
    (dict(dropout=1.0), ValueError, r"dropout rate 1.0 is outside \[0, 1\)"),
    (dict(num_heads=1, embed_dim=8), ValueError, "num_heads=1 is smaller than the number of groups 2"),
    (dict(segment_lengths=(4, 7)), ValueError, "segment length 7 is not divisible by its dilation rate 2"),
    (dict(merge="mean"), ValueError, "merge='mean' is unknown"),
]
BAD_BLOCK_CONSTRUCTION = [
    (dict(sparsity_ratio=1.0), ValueError, r"sparsity_ratio=1.0 is outside \[0, 1\)"),
    (dict(pattern="random"), ValueError, "pattern='random' is unknown"),
    (dict(global_blocks=-1), ValueError, "global_blocks=-1 must be an integer >= 0"),
    (dict(block_size=0), ValueError, "block_size=0 must be a positive integer"),
]
BAD_CALLS = [
    (dict(query=np.ones((B, N))), ValueError, r"query has shape \(2, 16\) \(2-D\); pass a 3-D array"),
    (dict(query=np.ones((B, N, E + 1))), ValueError, "query has feature size 17 .*embed_dim is 16"),
    (dict(key=np.ones((B, N, E - 1))), ValueError, "key has feature size 15"),
    (dict(query=np.ones((B, N, E), np.int32)), TypeError, r"query has dtype (torch\.)?int32; pass a floating array"),
    (dict(key=np.ones((B, N // 2, E))), ValueError,
     r"key, value have \(batch, seq\) \(2, 16\), \(2, 8\), \(2, 8\); cross-attention needs key and value of the same"),
    (dict(key=_X, value=np.ones((1, N, E))), ValueError, "cross-attention needs key and value of the same batch"),
    (dict(value=_X), ValueError, "value was given without key"),
    (dict(key_padding_mask=np.zeros((B, N + 1), bool)), ValueError,
     r"key_padding_mask has shape \(2, 17\); expected \(batch, seq\) = \(2, 16\)"),
    (dict(key_padding_mask=np.zeros((B, N), np.float32)), TypeError, r"key_padding_mask has dtype (torch\.)?float32; pass a boolean"),
]


def _build(framework: str, kind: Kind, overrides: dict):
    args = dict(embed_dim=E, num_heads=H, segment_lengths=SEG, dilation_rates=RATES, **kind.options)
    if kind.name == "block_sparse":
        del args["segment_lengths"], args["dilation_rates"]
    args.update(overrides)
    if framework == "jax":
        return kind.jax_cls(**args, rngs=nnx.Rngs(0))
    return kind.torch_cls(**args)


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("overrides,exc,match", BAD_CONSTRUCTION)
def test_bad_construction(framework, overrides, exc, match):
    with pytest.raises(exc, match=match):
        _build(framework, KIND["standard-head_partition"], overrides)


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("overrides,exc,match", BAD_BLOCK_CONSTRUCTION)
def test_bad_block_sparse_construction(framework, overrides, exc, match):
    with pytest.raises(exc, match=match):
        _build(framework, KIND["block_sparse"], overrides)


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("args,exc,match", BAD_CALLS)
def test_bad_call(framework, args, exc, match):
    module = _build(framework, KIND["improved-head_partition"], {})
    conv = _j if framework == "jax" else _t
    query = args.get("query", _X)
    with pytest.raises(exc, match=match):
        module(conv(query), conv(args.get("key")), conv(args.get("value")),
               key_padding_mask=conv(args.get("key_padding_mask")))


def test_bad_dropout_rngs():
    module = _build("jax", KIND["improved-head_partition"], dict(dropout=0.1))
    with pytest.raises(TypeError, match="rngs='seed' cannot give a dropout key"):
        module(_j(_X), rngs="seed")
