"""Multi-head torch modules around the three attention cores, mirroring ``jax_dilated.multihead``.

    q, k, v = q_proj(query), k_proj(key), v_proj(value)      # (b, n, E) -> (b, n, h, E/h)
    o = core(q, k, v, key_padding_mask, is_causal, dropout)  # (b, n, h, E/h)
    o = norm(o.reshape(b, n, E))                             # MAGNETO sub-LayerNorm, if layer_norm
    out = out_proj(o)                                        # (b, n, E)

``state_dict`` keys: ``q_proj.weight`` ``(E, E)``, ``q_proj.bias``, likewise ``k_proj``, ``v_proj``,
``out_proj``, and ``norm.weight``, ``norm.bias`` -- the same names and shapes as the NNX modules.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ref._config import DilatedConfig, check_dropout, check_key_padding_mask
from torch_ref._softmax import stats_dtype
from torch_ref.block_sparse import block_sparse_attention, check_block_options
from torch_ref.dilated import dilated_attention, improved_dilated_attention
from torch_ref.ring import ring_dilated_attention


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return value


def _check_module_inputs(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                         embed_dim: int) -> None:
    """Raise unless query/key/value are ``(b, n, embed_dim)`` floating tensors of one batch and length."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 3:
            raise ValueError(f"{name} has shape {tuple(x.shape)} ({x.ndim}-D); pass a 3-D array (batch, seq, "
                             f"embed_dim={embed_dim}).")
        if x.shape[-1] != embed_dim:
            raise ValueError(f"{name} has feature size {x.shape[-1]} (shape {tuple(x.shape)}); the module's "
                             f"embed_dim is {embed_dim}: project the input to {embed_dim} features.")
        if not torch.is_floating_point(x):
            raise TypeError(f"{name} has dtype {x.dtype}; pass a floating array (float32, bfloat16, ...).")
    if not query.shape[:2] == key.shape[:2] == value.shape[:2]:
        raise ValueError(
            f"query, key, value have (batch, seq) {tuple(query.shape[:2])}, {tuple(key.shape[:2])}, "
            f"{tuple(value.shape[:2])}; cross-attention needs key and value of the same batch and sequence "
            f"length as the query (pad or cut them to length {query.shape[1]})."
        )
    check_key_padding_mask(key_padding_mask, query.shape[0], query.shape[1])


class _MultiheadAttention(nn.Module):
    """Projections, sub-LayerNorm, masks and dropout shared by the multi-head modules.

    Subclasses only say which core runs, by implementing :meth:`_attend`.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float, bias: bool, layer_norm: bool,
                 layer_norm_eps: float, gamma_init: float, dtype: torch.dtype | None, param_dtype: torch.dtype):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; choose an "
                             f"embed_dim that is a multiple of num_heads, or a num_heads that divides it.")
        check_dropout(dropout)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, dtype=param_dtype)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, dtype=param_dtype)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, dtype=param_dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, dtype=param_dtype)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, dtype=param_dtype) if layer_norm else None
        self.gamma_init = float(gamma_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier normal weights (gain 1 for q/k, ``gamma_init`` for v/out), zero biases, LayerNorm 1/0."""
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gamma_init),
                           (self.out_proj, self.gamma_init)):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.norm is not None:
            self.norm.reset_parameters()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, is_causal: bool,
                dropout_p: float) -> Tensor:
        raise NotImplementedError

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Multi-head attention of ``query`` over ``key``/``value``; dropout only in training mode.

        Args:
          query: ``(b, n, E)``.
          key: ``(b, n, E)``, default ``query``; cross-attention needs the same length ``n``.
          value: ``(b, n, E)``, default ``key``.
          key_padding_mask: optional ``(b, n)`` boolean, True where the key is padding.
          is_causal: query ``p`` sees keys ``p' <= p`` only.

        Returns:
          ``(b, n, E)`` tensor in the computation dtype.
        """
        if key is None:
            if value is not None:
                raise ValueError("value was given without key; pass key as well (value defaults to key, "
                                 "key defaults to query).")
            key = query
        if value is None:
            value = key
        _check_module_inputs(query, key, value, key_padding_mask, self.embed_dim)
        dtype = self.dtype if self.dtype is not None else torch.promote_types(
            torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype), self.param_dtype)

        def project(proj: nn.Linear, x: Tensor) -> Tensor:
            bias = None if proj.bias is None else proj.bias.to(dtype)
            return F.linear(x.to(dtype), proj.weight.to(dtype), bias)

        b, n, _ = query.shape
        heads = (b, n, self.num_heads, self.head_dim)
        q = project(self.q_proj, query).reshape(heads)
        k = project(self.k_proj, key).reshape(heads)
        v = project(self.v_proj, value).reshape(heads)
        o = self._attend(q, k, v, key_padding_mask=key_padding_mask, is_causal=bool(is_causal),
                         dropout_p=self.dropout if self.training else 0.0).reshape(b, n, self.embed_dim)
        if self.norm is not None:
            acc = stats_dtype(o.dtype)
            o = F.layer_norm(o.to(acc), (self.embed_dim,), self.norm.weight.to(acc), self.norm.bias.to(acc),
                             self.norm.eps).to(dtype)
        return project(self.out_proj, o)


class MultiheadDilatedAttention(_MultiheadAttention):
    """Multi-head dilated attention (LongNet), core :func:`torch_ref.dilated_attention`.

    Same arguments as ``jax_dilated.MultiheadDilatedAttention`` without ``rngs``; dropout draws from
    torch's default generator and follows ``module.training``.
    """

    _core = staticmethod(dilated_attention)

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], *, dropout: float = 0.0, bias: bool = True,
                 layer_norm: bool = True, layer_norm_eps: float = 1e-5, gamma_init: float = 1.0,
                 merge: str = "head_partition", dtype: torch.dtype | None = None,
                 param_dtype: torch.dtype = torch.float32):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, layer_norm=layer_norm,
                         layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, dtype=dtype, param_dtype=param_dtype)
        cfg = DilatedConfig(segment_lengths, dilation_rates, merge)
        cfg.check_heads(num_heads)
        self.segment_lengths = cfg.segment_lengths
        self.dilation_rates = cfg.dilation_rates
        self.merge = cfg.merge

    def _attend(self, q, k, v, **kw):
        return self._core(q, k, v, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                          merge=self.merge, **kw)


class ImprovedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` with the fast core :func:`torch_ref.improved_dilated_attention`."""

    _core = staticmethod(improved_dilated_attention)


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` whose core is :func:`torch_ref.ring_dilated_attention`.

    Every rank of ``group`` passes its own chunk ``(b, n / P, E)`` of the sequence and gets its chunk
    of the output. ``group=None`` uses the default process group, or, when ``torch.distributed`` is
    not initialised, computes exactly :class:`ImprovedMultiheadDilatedAttention`. Ring attention has
    no dropout: ``dropout`` must be 0.
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], *, group=None, dropout: float = 0.0, **kwargs: Any):
        if dropout:
            raise ValueError(f"dropout={dropout}: ring attention has no dropout; pass dropout=0.0 or use "
                             f"ImprovedMultiheadDilatedAttention.")
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)
        self.group = group

    def _attend(self, q, k, v, *, dropout_p, **kw):
        return ring_dilated_attention(q, k, v, segment_lengths=self.segment_lengths,
                                      dilation_rates=self.dilation_rates, merge=self.merge, group=self.group, **kw)


class BlockSparseMultiheadDilatedAttention(_MultiheadAttention):
    """Multi-head block-sparse attention, core :func:`torch_ref.block_sparse_attention`.

    Same structure, parameters and call as :class:`MultiheadDilatedAttention`, with the block-sparse
    options (SPEC section 5) instead of segment lengths and dilation rates.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, block_size: int = 128,
                 pattern: str = "dilated_sparse", sparsity_ratio: float = 0.9, global_blocks: int = 1,
                 dropout: float = 0.0, bias: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, dtype: torch.dtype | None = None, param_dtype: torch.dtype = torch.float32):
        # the sequence length is unknown here: check the options against a sequence of one block.
        check_block_options(block_size, block_size, pattern, sparsity_ratio, global_blocks)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, layer_norm=layer_norm,
                         layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, dtype=dtype, param_dtype=param_dtype)
        self.block_size = int(block_size)
        self.pattern = pattern
        self.sparsity_ratio = float(sparsity_ratio)
        self.global_blocks = int(global_blocks)

    def _attend(self, q, k, v, **kw):
        return block_sparse_attention(q, k, v, block_size=self.block_size, pattern=self.pattern,
                                      sparsity_ratio=self.sparsity_ratio, global_blocks=self.global_blocks, **kw)
