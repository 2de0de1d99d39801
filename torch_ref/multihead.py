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

from dilated_plan import DilatedConfig, Heads, ModuleOptions, check_block_options
from dilated_plan.checks import check_is_causal, check_positive_int, default_key_value
from torch_ref.block_sparse import block_sparse_attention
from torch_ref.checks import check_module_inputs
from torch_ref.decode import KVCache, dilated_attention_decode
from torch_ref.dilated import dilated_attention, improved_dilated_attention
from torch_ref.kernels import stats_dtype
from torch_ref.layers import positions, rotary
from torch_ref.ring import ring_dilated_attention, ring_positions


class MultiheadAttentionBase(nn.Module):
    """Projections, rotary positions, sub-LayerNorm, masks and dropout shared by the multi-head modules.

    Subclasses only say which core runs, by implementing :meth:`_attend`.
    """

    def __init__(self, heads: Heads, options: ModuleOptions, factory: dict[str, Any]):
        super().__init__()
        if options.rope_theta is not None and heads.head_dim % 2:
            raise ValueError(f"rope_theta needs an even head_dim; embed_dim / num_heads = {heads.head_dim}.")
        self.embed_dim, self.num_heads, self.num_kv_heads = heads.embed_dim, heads.num_heads, heads.kv_heads
        self.head_dim = heads.head_dim
        self.dropout = options.dropout
        self.rope_theta = options.rope_theta
        e, kv, bias = heads.embed_dim, heads.kv_dim, options.bias
        self.q_proj = nn.Linear(e, e, bias=bias, **factory)
        self.k_proj = nn.Linear(e, kv, bias=bias, **factory)
        self.v_proj = nn.Linear(e, kv, bias=bias, **factory)
        self.out_proj = nn.Linear(e, e, bias=bias, **factory)
        self.norm = nn.LayerNorm(e, eps=options.layer_norm_eps, **factory) if options.layer_norm else None
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

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, docs: Tensor | None, is_causal: bool, p: float
    ) -> Tensor:
        """The core on ``(b, n, h, d)`` queries and ``(b, n, h_kv, d)`` keys/values."""
        raise NotImplementedError

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        document_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Multi-head attention of ``query`` over ``key``/``value``; dropout only in training mode.

        ``query`` ``(b, n, E)``; ``key``/``value`` ``(b, n, E)`` (default ``query``/``key``);
        ``key_padding_mask`` optional ``(b, n)`` boolean, True = padding; ``document_ids`` optional
        ``(b, n)`` integers (packed documents; rotary positions restart at each). Returns ``(b, n, E)``
        in the promotion of the inputs' and the parameters' dtypes.

        ``cache`` (from :meth:`init_cache`): causal self-attention of ``query`` ``(b, T, E)``, the next
        ``T >= 1`` positions; their keys/values are written into the cache, ``cache.index`` advances by
        ``T``, and the rows equal those of the full causal call over everything decoded so far
        (semantics section 12). Takes no ``key``/``value``, mask, documents or dropout.
        """
        if cache is not None:
            return self._decode(query, key, value, key_padding_mask, document_ids, cache)
        key, value = default_key_value(query, key, value)
        check_module_inputs(query, key, value, key_padding_mask, self.embed_dim)
        dtype = self.q_proj.weight.dtype
        for x in (query, key, value):
            dtype = torch.promote_types(dtype, x.dtype)
        b, n, _ = query.shape
        q = self._project(self.q_proj, query, dtype).reshape(b, n, self.num_heads, self.head_dim)
        k = self._project(self.k_proj, key, dtype).reshape(b, n, self.num_kv_heads, self.head_dim)
        v = self._project(self.v_proj, value, dtype).reshape(b, n, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            pos = self._positions(b, n, document_ids, query.device)
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        p = self.dropout if self.training else 0.0
        o = self._attend(q, k, v, key_padding_mask, document_ids, check_is_causal(is_causal), p)
        return self._output(o.reshape(b, n, self.embed_dim), dtype)

    def _positions(self, b: int, n: int, document_ids: Tensor | None, device) -> Tensor:
        """``(b, n)`` rotary positions of the call's tokens (from each document's start)."""
        return positions(b, n, document_ids, device=device)

    @staticmethod
    def _project(proj: nn.Linear, x: Tensor, dtype: torch.dtype) -> Tensor:
        bias = None if proj.bias is None else proj.bias.to(dtype)
        return F.linear(x.to(dtype), proj.weight.to(dtype), bias)

    def _output(self, o: Tensor, dtype: torch.dtype) -> Tensor:
        """Sub-LayerNorm (if any) and ``out_proj`` of the attention output ``(b, n, E)``."""
        if self.norm is not None:
            acc = stats_dtype(o.dtype)
            weight, bias = self.norm.weight.to(acc), self.norm.bias.to(acc)
            o = F.layer_norm(o.to(acc), (self.embed_dim,), weight, bias, self.norm.eps).to(dtype)
        return self._project(self.out_proj, o, dtype)

    def _decode_config(self) -> DilatedConfig:
        """The configuration decoding follows; modules that cannot decode raise."""
        raise ValueError(f"{type(self).__name__} has no cached decoding; use ImprovedMultiheadDilatedAttention.")

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty key/value cache for ``forward(x, cache=...)``: ``(batch_size, max_length, h_kv, d)``.

        ``max_length`` must be a multiple of ``lcm(segment_lengths)`` (the error names the length to use);
        ``dtype``/``device`` default to the parameters'.
        """
        length = self._decode_config().check_cache_length(max_length)
        batch_size = check_positive_int("batch_size", batch_size)
        dtype = self.q_proj.weight.dtype if dtype is None else dtype
        device = self.q_proj.weight.device if device is None else device
        shape = (batch_size, length, self.num_kv_heads, self.head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def _decode(self, query, key, value, key_padding_mask, document_ids, cache: KVCache) -> Tensor:
        cfg = self._decode_config()
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache={cache!r} should be a KVCache from init_cache(batch_size, max_length).")
        if key is not None or value is not None or key_padding_mask is not None or document_ids is not None:
            raise ValueError("cache= is causal self-attention: pass only the query (no key, value, mask or documents).")
        if self.dropout > 0 and self.training:
            raise ValueError("cached decoding has no dropout: call module.eval() first.")
        check_module_inputs(query, query, query, None, self.embed_dim)
        dtype = torch.promote_types(self.q_proj.weight.dtype, query.dtype)
        b, t, _ = query.shape
        q = self._project(self.q_proj, query, dtype).reshape(b, t, self.num_heads, self.head_dim)
        k = self._project(self.k_proj, query, dtype).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self._project(self.v_proj, query, dtype).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            pos = cache.index + positions(b, t, device=query.device)
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        o, _, _ = dilated_attention_decode(
            q,
            k,
            v,
            cache.key,
            cache.value,
            cache.index,
            segment_lengths=cfg.segment_lengths,
            dilation_rates=cfg.dilation_rates,
            merge=cfg.merge,
        )
        cache.index += t
        return self._output(o.reshape(b, t, self.embed_dim), dtype)


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
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        options = ModuleOptions(dropout, bias, layer_norm, layer_norm_eps, gamma_init, rope_theta)
        super().__init__(Heads(embed_dim, num_heads, num_kv_heads), options, dict(device=device, dtype=dtype))
        self.config = DilatedConfig(segment_lengths, dilation_rates, merge)
        self.config.check_heads(self.num_heads)

    def _decode_config(self) -> DilatedConfig:
        return self.config

    def _attend(self, q, k, v, mask, docs, is_causal, p):
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
            document_ids=docs,
            dropout_p=p,
        )


class ImprovedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` with the fast core :func:`torch_ref.improved_dilated_attention`."""

    _core = staticmethod(improved_dilated_attention)


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` whose core is :func:`torch_ref.ring_dilated_attention`.

    Every rank of ``group`` passes its own chunk ``(b, t, E)`` of the sequence (the layout of
    :func:`torch_ref.ring_dilated_attention`: rank ``p`` holds ``[p c, min((p + 1) c, n))``) and gets
    its chunk of the output; ``key_padding_mask`` and ``document_ids`` are chunked the same way, and
    rotary positions are global (from each document's start, :func:`torch_ref.ring.ring_positions`).
    ``group=None`` uses the default process group, or, when ``torch.distributed`` is not initialised,
    computes exactly :class:`ImprovedMultiheadDilatedAttention`. Ring attention has no dropout:
    ``dropout`` must be 0. ``load_balance="zigzag"``: each rank passes its chunk of
    :func:`torch_ref.to_zigzag` of the sequence (no rotary embedding then).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        group: object = None,
        load_balance: str | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        merge: str = "head_partition",
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        if dropout:
            raise ValueError(
                f"dropout={dropout}: ring attention has no dropout; pass dropout=0.0 or use "
                f"ImprovedMultiheadDilatedAttention."
            )
        if load_balance is not None and rope_theta is not None:
            raise ValueError(
                f"load_balance={load_balance!r} with rope_theta={rope_theta}: the module would rotate by zigzag "
                f"indices, not original positions; pass rope_theta=None (rotate q, k yourself) or load_balance=None."
            )
        options = ModuleOptions(0.0, bias, layer_norm, layer_norm_eps, gamma_init, rope_theta)
        heads = Heads(embed_dim, num_heads, num_kv_heads)
        MultiheadAttentionBase.__init__(self, heads, options, dict(device=device, dtype=dtype))
        self.config = DilatedConfig(segment_lengths, dilation_rates, merge)
        self.config.check_heads(self.num_heads)
        self.group = group
        from dilated_plan.ring import check_load_balance  # here: only this class takes load_balance

        self.load_balance = check_load_balance(load_balance)

    def _positions(self, b: int, n: int, document_ids: Tensor | None, device) -> Tensor:
        """Global positions: this rank's chunk starts where the ranks before it end (:func:`ring_positions`)."""
        return ring_positions(b, n, self.group, document_ids, device=device)

    def _attend(self, q, k, v, mask, docs, is_causal, p):
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
            load_balance=self.load_balance,
            document_ids=docs,
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
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        check_block_options(block_size, pattern, sparsity_ratio, global_blocks)
        options = ModuleOptions(dropout, bias, layer_norm, layer_norm_eps, gamma_init, rope_theta)
        super().__init__(Heads(embed_dim, num_heads, num_kv_heads), options, dict(device=device, dtype=dtype))
        self.layout = (int(block_size), pattern, float(sparsity_ratio), int(global_blocks))

    def _attend(self, q, k, v, mask, docs, is_causal, p):
        if docs is not None:
            raise ValueError("block-sparse attention has no packed documents; pass document_ids=None.")
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
