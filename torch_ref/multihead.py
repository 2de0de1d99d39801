"""Multi-head torch modules around the three attention cores, mirroring ``jax_dilated.multihead``.

    q, k, v = q_proj(query), k_proj(key), v_proj(value)      # (b, n, E) -> (b, n, h, E/h)
    o = core(q, k, v, key_padding_mask, is_causal, dropout)  # (b, n, h, E/h)
    o = norm(o.reshape(b, n, E))                             # MAGNETO sub-LayerNorm, if layer_norm
    out = out_proj(o)                                        # (b, n, E)

``state_dict`` keys: ``q_proj.weight`` ``(E, E)``, ``q_proj.bias``, likewise ``k_proj``, ``v_proj``,
``out_proj``, and ``norm.weight``, ``norm.bias`` -- the same names and shapes as the NNX modules.

torch conventions: ``device=`` and ``dtype=`` are factory arguments (where and in which dtype the
parameters are created, as for ``torch.nn.Linear``); a call computes in the promotion of its inputs'
dtypes and the parameters' dtype, so ``module.half()(x.half())`` computes in float16. The NNX modules
follow Flax instead (``dtype`` = computation, ``param_dtype`` = parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dilated_plan import DilatedConfig, ModuleOptions, check_block_options
from dilated_plan.checks import check_heads, default_key_value
from torch_ref.block_sparse import block_sparse_attention
from torch_ref.checks import check_module_inputs
from torch_ref.dilated import dilated_attention, improved_dilated_attention
from torch_ref.kernels import stats_dtype
from torch_ref.ring import ring_dilated_attention


class MultiheadAttentionBase(nn.Module):
    """Projections, sub-LayerNorm, masks and dropout shared by the multi-head modules.

    Subclasses only say which core runs, by implementing :meth:`_attend`.
    """

    def __init__(self, embed_dim: int, num_heads: int, options: ModuleOptions, factory: dict[str, Any]):
        super().__init__()
        embed_dim, num_heads = check_heads(embed_dim, num_heads)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = options.dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(embed_dim, embed_dim, bias=options.bias, **factory) for _ in range(4)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=options.layer_norm_eps, **factory) if options.layer_norm else None
        self.gamma_init = options.gamma_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier normal weights (gain 1 for q/k, ``gamma_init`` for v/out), zero biases, LayerNorm 1/0."""
        gains = (1.0, 1.0, self.gamma_init, self.gamma_init)
        for proj, gain in zip((self.q_proj, self.k_proj, self.v_proj, self.out_proj), gains, strict=True):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.norm is not None:
            self.norm.reset_parameters()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, p: float) -> Tensor:
        """The core on ``(b, n, h, d)`` projections: mask, causality and dropout probability."""
        raise NotImplementedError

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Multi-head attention of ``query`` over ``key``/``value``; dropout only in training mode.

        ``query`` ``(b, n, E)``; ``key``/``value`` ``(b, n, E)`` (default ``query``/``key``);
        ``key_padding_mask`` optional ``(b, n)`` boolean, True = padding. Returns ``(b, n, E)`` in the
        promotion of the inputs' and the parameters' dtypes.
        """
        key, value = default_key_value(query, key, value)
        check_module_inputs(query, key, value, key_padding_mask, self.embed_dim)
        dtype = self.q_proj.weight.dtype
        for x in (query, key, value):
            dtype = torch.promote_types(dtype, x.dtype)

        def project(proj: nn.Linear, x: Tensor) -> Tensor:
            bias = None if proj.bias is None else proj.bias.to(dtype)
            return F.linear(x.to(dtype), proj.weight.to(dtype), bias)

        b, n, _ = query.shape
        heads = (b, n, self.num_heads, self.head_dim)
        q, k, v = (
            project(p, x).reshape(heads) for p, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value))
        )
        p = self.dropout if self.training else 0.0
        o = self._attend(q, k, v, key_padding_mask, bool(is_causal), p).reshape(b, n, self.embed_dim)
        if self.norm is not None:
            acc = stats_dtype(o.dtype)
            weight, bias = self.norm.weight.to(acc), self.norm.bias.to(acc)
            o = F.layer_norm(o.to(acc), (self.embed_dim,), weight, bias, self.norm.eps).to(dtype)
        return project(self.out_proj, o)


class MultiheadDilatedAttention(MultiheadAttentionBase):
    """Multi-head dilated attention (LongNet), core :func:`torch_ref.dilated_attention`.

    The arguments of ``jax_dilated.MultiheadDilatedAttention`` without ``rngs``, with torch's
    factory arguments ``device`` and ``dtype`` (the parameters' dtype) instead of Flax's ``dtype`` and
    ``param_dtype``; dropout draws from torch's default generator and follows ``module.training``.

    >>> mha = MultiheadDilatedAttention(32, 4, (8, 16), (1, 2))
    >>> mha(torch.ones(2, 16, 32), is_causal=True).shape
    torch.Size([2, 16, 32])
    >>> mha.half()(torch.ones(2, 16, 32).half()).dtype
    torch.float16
    """

    _core = staticmethod(dilated_attention)

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        merge: str = "head_partition",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        options = ModuleOptions(dropout, bias, layer_norm, layer_norm_eps, gamma_init)
        super().__init__(embed_dim, num_heads, options, dict(device=device, dtype=dtype))
        self.config = DilatedConfig(segment_lengths, dilation_rates, merge)
        self.config.check_heads(self.num_heads)

    def _attend(self, q, k, v, mask, is_causal, p):
        cfg = self.config
        return self._core(
            q,
            k,
            v,
            segment_lengths=cfg.segment_lengths,
            dilation_rates=cfg.dilation_rates,
            merge=cfg.merge,
            key_padding_mask=mask,
            is_causal=is_causal,
            dropout_p=p,
        )


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

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        group: object = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        merge: str = "head_partition",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        if dropout:
            raise ValueError(
                f"dropout={dropout}: ring attention has no dropout; pass dropout=0.0 or use "
                f"ImprovedMultiheadDilatedAttention."
            )
        options = ModuleOptions(0.0, bias, layer_norm, layer_norm_eps, gamma_init)
        MultiheadAttentionBase.__init__(self, embed_dim, num_heads, options, dict(device=device, dtype=dtype))
        self.config = DilatedConfig(segment_lengths, dilation_rates, merge)
        self.config.check_heads(self.num_heads)
        self.group = group

    def _attend(self, q, k, v, mask, is_causal, p):
        cfg = self.config
        return ring_dilated_attention(
            q,
            k,
            v,
            segment_lengths=cfg.segment_lengths,
            dilation_rates=cfg.dilation_rates,
            merge=cfg.merge,
            group=self.group,
            key_padding_mask=mask,
            is_causal=is_causal,
        )


class BlockSparseMultiheadDilatedAttention(MultiheadAttentionBase):
    """Multi-head block-sparse attention, core :func:`torch_ref.block_sparse_attention`.

    Same structure, parameters and call as :class:`MultiheadDilatedAttention`, with the block-sparse
    options (semantics section 5) instead of segment lengths and dilation rates.

    >>> mha = BlockSparseMultiheadDilatedAttention(32, 4, block_size=4, sparsity_ratio=0.5)
    >>> mha(torch.ones(1, 16, 32)).shape
    torch.Size([1, 16, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        block_size: int = 128,
        pattern: str = "dilated_sparse",
        sparsity_ratio: float = 0.9,
        global_blocks: int = 1,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        check_block_options(block_size, pattern, sparsity_ratio, global_blocks)
        options = ModuleOptions(dropout, bias, layer_norm, layer_norm_eps, gamma_init)
        super().__init__(embed_dim, num_heads, options, dict(device=device, dtype=dtype))
        self.layout = (int(block_size), pattern, float(sparsity_ratio), int(global_blocks))

    def _attend(self, q, k, v, mask, is_causal, p):
        size, pattern, ratio, global_blocks = self.layout
        return block_sparse_attention(
            q,
            k,
            v,
            block_size=size,
            pattern=pattern,
            sparsity_ratio=ratio,
            global_blocks=global_blocks,
            key_padding_mask=mask,
            is_causal=is_causal,
            dropout_p=p,
        )
