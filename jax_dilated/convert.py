"""Exact weight conversion between the NNX multi-head modules and torch_ref ``state_dict``s.

The NNX modules name and lay out their parameters as torch does (``q_proj.weight`` ``(E, E)`` as
(out, in), ``norm.weight``, ...), so conversion is a name-for-name copy: no transposes, no rounding.
torch -> NNX -> torch returns the same bits. This module never imports torch at import time;
:func:`load_torch_checkpoint` imports it when called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx


def _params(module: nnx.Module) -> dict[str, nnx.Param]:
    """The module's parameters by dotted torch-style name."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(str(p) for p in path): var for path, var in flat}


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device, with or without grad) or array-like as a NumPy array, bits unchanged."""
    if getattr(value, "is_meta", False):
        raise ValueError(
            "the state_dict holds a meta tensor (a shape without data); materialise the torch module first "
            "(module.to_empty(device='cpu') and load or initialise its weights)."
        )
    if hasattr(value, "detach"):
        t = value.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # torch dtypes NumPy lacks (bfloat16): widen exactly to float32 first.
            return t.float().numpy()
    return np.asarray(value)


def to_torch_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's parameters as a torch-style state dict of NumPy arrays.

    Example (``torch_ref.state_dict_from_numpy`` also converts bfloat16 arrays, bit for bit)::

        sd = to_torch_state_dict(mha)                       # {"q_proj.weight": (E, E) array, ...}
        torch_mha.load_state_dict(torch_ref.state_dict_from_numpy(sd))
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module has type {type(module).__name__}; pass an nnx.Module (e.g. a LongNetLM).")
    return {name: np.asarray(var[...]) for name, var in sorted(_params(module).items())}


def load_torch_state_dict(module: nnx.Module, state_dict: Mapping[str, Any]) -> None:
    """Copy a torch ``state_dict`` (tensors or arrays) into the module's parameters, in place.

    Every parameter must be present with its exact shape and no other key may appear; otherwise a
    ValueError lists the missing, unexpected and misshaped entries. Values are cast to the parameter's
    dtype (a no-op, hence bit-exact, when the dtypes agree).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict has type {type(state_dict).__name__}; pass a mapping name -> tensor "
            f"(e.g. torch_module.state_dict())."
        )
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module has type {type(module).__name__}; pass an nnx.Module (e.g. a LongNetLM).")
    params = _params(module)
    arrays = {name: _to_numpy(v) for name, v in state_dict.items()}
    missing = sorted(set(params) - set(arrays))
    unexpected = sorted(set(arrays) - set(params))
    misshaped = sorted(
        f"{name}: got {tuple(arrays[name].shape)}, expected {tuple(params[name].shape)}"
        for name in set(params) & set(arrays)
        if tuple(arrays[name].shape) != tuple(params[name].shape)
    )
    if missing or unexpected or misshaped:
        parts = [
            f"{label}: {items}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("wrong shapes", misshaped),
            )
            if items
        ]
        raise ValueError(
            f"state_dict does not match {type(module).__name__}: "
            + "; ".join(parts)
            + ". Build the module with the same embed_dim, bias and layer_norm as the torch module."
        )
    for name, var in params.items():
        var[...] = jnp.asarray(arrays[name], dtype=var[...].dtype)


def load_torch_checkpoint(module: nnx.Module, path: str | os.PathLike) -> None:
    """Load a ``.pt`` file holding a state dict into the module (``torch.load(..., weights_only=True)``).

    Only tensors and plain containers are unpickled, never arbitrary code. Needs torch installed.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "load_torch_checkpoint needs PyTorch to read .pt files; install torch, or load the "
            "state dict elsewhere and call load_torch_state_dict with NumPy arrays."
        ) from err
    state_dict = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    load_torch_state_dict(module, state_dict)
