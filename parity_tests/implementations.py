"""The one table of implementations that the parity tests run against the float64 reference.

Each row takes NumPy ``q, k, v`` of shape ``(b, n, h, d)`` and keyword options of the dilated-attention
contract, runs one framework's implementation in the dtype of its inputs, and returns NumPy. A later
variant joins every parity test by adding a row here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np
import torch

import jax_dilated as jd
import torch_ref as tr


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    framework: str  # "jax" or "torch"
    run: Callable[..., np.ndarray]

    def __repr__(self) -> str:
        return self.name


def _jax(fn):
    def run(q, k, v, key_padding_mask=None, document_ids=None, **kw):
        mask = None if key_padding_mask is None else jnp.asarray(key_padding_mask)
        if document_ids is not None:
            kw["document_ids"] = jnp.asarray(document_ids)
        return np.asarray(fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key_padding_mask=mask, **kw))

    return run


def _torch(fn):
    def run(q, k, v, key_padding_mask=None, document_ids=None, **kw):
        mask = None if key_padding_mask is None else torch.as_tensor(key_padding_mask)
        if document_ids is not None:
            kw["document_ids"] = torch.as_tensor(document_ids)
        with torch.no_grad():
            out = fn(torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v), key_padding_mask=mask, **kw)
        return out.numpy()

    return run


DILATED = [
    Impl("jax.standard", "jax", _jax(jd.dilated_attention)),
    Impl("jax.improved", "jax", _jax(jd.improved_dilated_attention)),
    Impl("torch.standard", "torch", _torch(tr.dilated_attention)),
    Impl("torch.improved", "torch", _torch(tr.improved_dilated_attention)),
]
