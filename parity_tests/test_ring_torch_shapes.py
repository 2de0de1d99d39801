"""The torch ring at any sequence length, and non-finite keys in its backward (semantics sections 7, 10, 11).

Contiguous layout: rank ``p`` holds positions ``[p c, min((p + 1) c, n))`` (chunk lengths
``c, ..., c, t, 0, ..., 0``, ``x.split(c, dim=1)``), ``c = dilated_plan.ring_chunk_length(n, P, cfg)``
or any ``c`` whose ``c * P`` the plan accepts. Values and gradients are compared in float64 with the
single-process ``torch_ref.improved_dilated_attention`` on the whole unpadded sequence. One gloo
spawn per world size runs every case (the process start dominates).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import torch_ref as tr
from dilated_plan import DilatedConfig, ring_chunk_length
from parity_tests.gloo import run_ranks

B, D = 2, 3

# ("run", n, c or None (ring_chunk_length), segments, rates, causal, merge, h, h_kv, padding, nan)
#   nan: None; "masked": NaN/Inf in k and v at key-padding positions (run next to the clean inputs);
#   "seen": NaN in one unmasked key: the rows that see it are NaN, nothing else, and the gradients are the
#   single-process ones (a NaN row passes no gradient back, as autograd through the forward kernel).
RUNS = {
    4: [
        (50, None, (8, 16), (1, 2), False, "head_partition", 4, 2, True, None),  # c=16: 16 16 16 2, local
        (37, None, (8, 16), (1, 2), True, "lse", 4, 2, False, None),  # 16 16 5 0, no mask given
        (50, None, (8, 32), (1, 2), True, "head_partition", 4, 2, True, None),  # s=32 spans 2 ranks
        (37, None, (8, 64), (1, 2), False, "lse", 4, 2, True, None),  # spans all 4; rank 3 empty
        (37, 32, (8, 64), (1, 2), True, "head_partition", 4, 4, False, None),  # a larger c: 32 5 0 0
        (64, None, (16, 64), (2, 4), True, "head_partition", 6, 2, True, None),  # n = c P, 2 kv buckets
        (50, None, (8, 64), (1, 2), False, "head_partition", 4, 2, True, "masked"),
        (37, None, (8, 32), (1, 2), True, "lse", 4, 2, True, "masked"),
        (50, None, (8, 64), (1, 2), True, "lse", 4, 2, True, "seen"),
    ],
    2: [
        (50, None, (8, 16), (1, 2), True, "head_partition", 4, 2, True, None),  # c=32: 32 18
        (37, None, (8, 64), (1, 2), False, "lse", 4, 2, False, None),  # 32 5, spanning
        (37, None, (8, 64), (1, 2), True, "head_partition", 4, 2, True, "masked"),
    ],
}

# ("error", name, chunk lengths in rank order, segments, rates, load_balance)
ERRORS = {
    4: [
        ("t_above_c", (16, 8, 16, 2), (8, 16), (1, 2), None),
        ("zero_inside", (16, 16, 0, 5), (8, 16), (1, 2), None),
        ("bad_c", (13, 13, 13, 11), (8, 16), (1, 2), None),  # n=50, c=13: c*P=52 is refused; c=16 works
        ("zigzag_unequal", (16, 16, 16, 2), (8, 16), (1, 2), "zigzag"),
    ],
    2: [
        ("t_above_c", (16, 20), (8, 16), (1, 2), None),
        ("bad_c", (25, 25), (8, 16), (1, 2), None),  # n=50: c=32 works
    ],
}

_WORKER = """
for i, case in enumerate(cases):
    if case[0] == "error":
        _, name, lengths, seg, rates, lb = case
        t = lengths[rank]
        q = torch.zeros(1, t, 4, 2, dtype=torch.float64)
        try:
            tr.ring_dilated_attention(q, q[:, :, :2], q[:, :, :2], segment_lengths=seg, dilation_rates=rates,
                                      load_balance=lb)
        except ValueError as e:
            results[f"error_{name}"] = np.array(str(e))
        continue
    _, n, c, seg, rates, causal, merge, h, h_kv, padding, nan = case
    sl = slice(rank * c, min((rank + 1) * c, n))
    variants = {"clean": "", "nan": "nan"} if nan == "masked" else {"clean": "nan" if nan == "seen" else ""}
    for tag, suffix in variants.items():
        q, k, v = (torch.as_tensor(data[f"{x}{suffix if x != 'q' else ''}{i}"][:, sl]).requires_grad_()
                   for x in "qkv")
        mask = torch.as_tensor(data[f"mask{i}"][:, sl]) if padding else None
        out = tr.ring_dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates, is_causal=causal,
                                        merge=merge, key_padding_mask=mask)
        assert out.shape == q.shape, (out.shape, q.shape)
        results[f"out_{tag}{i}"] = out.detach().numpy()
        (out * torch.as_tensor(data[f"w{i}"][:, sl])).sum().backward()
        for name, x in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            results[f"{name}_{tag}{i}"] = x.numpy()
"""


def _single(q, k, v, mask, w, seg, rates, causal, merge):
    q, k, v = (torch.as_tensor(x).requires_grad_() for x in (q, k, v))
    out = tr.improved_dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates, is_causal=causal,
                                        merge=merge, key_padding_mask=None if mask is None else torch.as_tensor(mask))
    (out * torch.as_tensor(w)).sum().backward()
    return {"out": out.detach().numpy(), "dq": q.grad.numpy(), "dk": k.grad.numpy(), "dv": v.grad.numpy()}


def _gather(outs, key):
    return np.concatenate([o[key] for o in outs], axis=1)


@pytest.mark.parametrize("world", [2, 4])
def test_torch_ring_any_length_and_masked_non_finite_keys(world):
    rng = np.random.default_rng()
    data, cases, wants = {}, [], []
    for i, (n, c, seg, rates, causal, merge, h, h_kv, padding, nan) in enumerate(RUNS[world]):
        c = c or ring_chunk_length(n, world, DilatedConfig(seg, rates, merge))
        lengths = [min(c, max(0, n - p * c)) for p in range(world)]
        assert sum(lengths) == n and (c * world > n or n == 64)
        q = rng.standard_normal((B, n, h, D))
        k, v = rng.standard_normal((B, n, h_kv, D)), rng.standard_normal((B, n, h_kv, D))
        mask = rng.random((B, n)) < 0.25
        if nan == "masked":  # at least one padded key on every rank holding positions, and NaN/Inf there
            mask[:, [p * c + 1 for p in range(world) if lengths[p] > 1]] = True
            knan, vnan = k.copy(), v.copy()
            bad = np.nonzero(mask)
            knan[bad[0], bad[1], :, 0] = np.nan
            vnan[bad[0], bad[1], :, 1] = np.inf
            knan[bad[0][::2], bad[1][::2], 0, :] = -np.inf
            data.update({f"knan{i}": knan, f"vnan{i}": vnan})
        if nan == "seen":  # one unmasked key of rank 1 is NaN: the rows that see it are NaN
            mask[0, c + 3] = False
            knan = k.copy()
            knan[0, c + 3, 0, 1] = np.nan
            data.update({f"knan{i}": knan, f"vnan{i}": v})
        w = rng.standard_normal((B, n, h, D))
        data.update({f"q{i}": q, f"k{i}": k, f"v{i}": v, f"mask{i}": mask, f"w{i}": w})
        cases.append(("run", n, c, seg, rates, causal, merge, h, h_kv, padding, nan))
        m = mask if padding else None
        wants.append(_single(q, data[f"knan{i}"] if nan == "seen" else k, v, m, w, seg, rates, causal, merge))
    cases += [("error", *e) for e in ERRORS[world]]

    outs = run_ranks(_WORKER, world, data, cases)

    for i, (*_, nan) in enumerate(RUNS[world]):
        want = wants[i]
        if nan == "seen":
            got = _gather(outs, f"out_clean{i}")
            assert got.shape == want["out"].shape
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want["out"]), err_msg=f"case {i} NaN rows")
            assert np.isnan(got).any() and not np.isnan(got).all(), f"case {i}"
            np.testing.assert_allclose(got, want["out"], rtol=0, atol=1e-10, err_msg=f"case {i} out")
            for name in ("dq", "dk", "dv"):
                g = _gather(outs, f"{name}_clean{i}")
                np.testing.assert_array_equal(np.isfinite(g), np.isfinite(want[name]), err_msg=f"case {i} {name}")
                np.testing.assert_allclose(g, want[name], rtol=0, atol=1e-10, err_msg=f"case {i} {name}")
            continue
        for name in ("out", "dq", "dk", "dv"):
            got = _gather(outs, f"{name}_clean{i}")
            assert got.shape == want[name].shape, (i, name, got.shape)
            np.testing.assert_allclose(got, want[name], rtol=0, atol=1e-10, err_msg=f"case {i} {name}")
            if nan == "masked":  # the same call with NaN/Inf in the padded keys: exactly the clean results
                bad = _gather(outs, f"{name}_nan{i}")
                assert np.isfinite(bad).all(), f"case {i} {name}"
                np.testing.assert_allclose(bad, got, rtol=0, atol=1e-10, err_msg=f"case {i} {name} nan")
        if nan == "masked":
            mask = data[f"mask{i}"]
            for name in ("dk", "dv"):  # the padded keys themselves get exactly zero gradient
                assert mask.sum() > 0
                assert np.all(_gather(outs, f"{name}_nan{i}")[mask] == 0), f"case {i} {name}"

    for name, lengths, *_ in ERRORS[world]:
        for r, o in enumerate(outs):  # every rank raises, before any block is sent (no hang)
            msg = str(o[f"error_{name}"])
            if name == "bad_c":
                c, n = lengths[0], sum(lengths)
                assert re.search(rf"chunks of c={c} positions .*n={n} .*Use chunks of c={32 if world == 2 else 16} ",
                                 msg), (r, msg)
                assert "ring_chunk_length" in msg
            elif name == "zigzag_unequal":
                assert re.search(r"disagree on q shape, k shape, v shape .*load_balance='zigzag'", msg), (r, msg)
            else:
                assert re.search(rf"disagree on q shape, k shape, v shape .*chunk lengths in rank order, "
                                 rf"{re.escape(str(tuple(lengths)))}, are not c, \.\.\., c, t, 0", msg), (r, msg)
                assert "ring_chunk_length" in msg
