"""Weights from the NNX modules into torch: the mirror of ``jax_dilated/convert.py``.

``jax_dilated.to_torch_state_dict`` gives NumPy arrays named like this package's ``state_dict``;
:func:`state_dict_from_numpy` turns them into tensors without changing a bit, bfloat16 included
(``torch.from_numpy`` refuses NumPy's bfloat16, which comes from ml_dtypes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def state_dict_from_numpy(arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{name: array}`` -> ``{name: tensor}`` with the same shapes, dtypes and bits.

    >>> state_dict_from_numpy({"w": np.ones((2, 3), np.float32)})["w"].shape
    torch.Size([2, 3])
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays has type {type(arrays).__name__}; pass a mapping name -> array.")
    out = {}
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.name == "bfloat16":  # same bits, read as int16 and viewed back as torch.bfloat16
            out[name] = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(a.copy())
    return out
