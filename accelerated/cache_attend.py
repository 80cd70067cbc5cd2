"""Attention of a streaming cache layer over its three segments (definition 6.13), the part of
:class:`accelerated.cache_layer.QuantizedKVCacheLayer` that chooses how the segments are read.

:class:`LayerAttention` is a base class of ``QuantizedKVCacheLayer`` (it reads the layer's
``_dims``, ``_residual``, ``_preserved``, ``quantized``, ``device`` and ``dtype``):

* decode-sized queries over the uniform store where the Triton kernels run (CUDA):
  :meth:`LayerAttention._attend_fused`, one kernel over the three segments and one merge kernel
  (accelerated/decode_kernels.py, docs/05-attention.md "Accelerated decode step");
* a prefill in the cache's dtype: :meth:`LayerAttention._attend_prefill`, the residual through
  torch SDPA (accelerated/attention_sdpa.py, docs/11-transformers.md §11.3);
* otherwise the split form: the quantized store's ``partial`` step and float32 blocks over the
  preserved store and the residual, merged by log-sum-exp (docs/05 Definition 5.5).

The reference has this in ``reference/cache_layer.py`` (``attend``); the accelerated side keeps
it apart because its dispatch is larger than the 600-line module allows beside the rest.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import attention as _att
from . import attention_sdpa as _sdpa
from .attention_launch import DECODE_ROWS
from .cache_checks import FLOAT_DTYPES, DeferredChecks
from .decode_kernels import fused_decode_attention

__all__ = ["LayerAttention"]

_F32 = torch.float32


class LayerAttention:
    """Definition 6.13 for :class:`accelerated.cache_layer.QuantizedKVCacheLayer` (its base class)."""

    # ------------------------------------------------------------------ 6.13 attention

    def attend(self, query, query_positions, scale=None, *, block_size: int = 256,
               use_kernel: Optional[bool] = None, checks: Optional[DeferredChecks] = None,
               shared: Optional[dict] = None, out_dtype: torch.dtype = _F32) -> torch.Tensor:
        """Attention of ``query`` over the cache (definition 6.13), ``(B, Hq, Tq, D)`` in
        ``out_dtype`` (default float32; a narrower one is the float32 result rounded to nearest
        even, as ``.to()``: the fused decode kernel writes it directly, the other paths convert).

        Decode (``g*Tq <= DECODE_ROWS``) over the uniform store where the Triton kernels run
        (CUDA): :meth:`_attend_fused`, one kernel over the three segments and one merge kernel.
        Otherwise the quantized store is read by its ``partial`` step (uniform: from its packed
        form, ``block_size`` slots at a time, :func:`accelerated.attention.quantized_segment_attention`,
        the Triton kernel on CUDA, ``use_kernel`` as there; kvquant: the dequantized blocks), the
        preserved store and the residual are attended at full precision, and the three partial
        results are merged with the log-sum-exp rule (Definition 5.5).  Equals the reference's
        ``split_attention(query, segments(), ...)`` within docs/09-tolerances.md §9.3.  Key ``s``
        is visible to query ``t`` iff its slot is not empty and its position is ``<=
        query_positions[b, t]``.  A query holding NaN or Inf raises ``ValueError`` (one
        device->host synchronisation), or, with ``checks`` (a :class:`DeferredChecks`), is recorded
        there and raised by its ``check()``.  ``shared``: None, or a fresh dict per model step passed
        to the ``attend`` of every layer holding the same slots (same updates, statuses and flushes)
        with the same ``query_positions``: the preserved and residual visibility masks are made by
        the first layer and reused (docs/11-transformers.md §11.3).
        A prefill (``Tq > 1``) reads the residual through SDPA (:meth:`_attend_prefill`).
        """
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"query must be a torch tensor (B, Hq, Tq, D), got {type(query).__name__}")
        if query.dim() != 4:
            raise ValueError(f"query must have shape (B, Hq, Tq, D), got {tuple(query.shape)}")
        if self._dims is None:
            b, hq, tq, d = query.shape
            _att.int_tensor("query_positions", query_positions, (b, tq), query.device)
            _att.check_scale(scale, d)
            return torch.zeros(query.shape, dtype=out_dtype, device=query.device)
        if self._fused_applies(query, use_kernel):
            return self._attend_fused(query, query_positions, scale, checks, out_dtype)
        out = self._attend_unfused(query, query_positions, scale, block_size, use_kernel, checks,
                                   shared, out_dtype)
        if out.dtype == out_dtype:
            return out
        # one conversion into the fused path's layout: a transposed view of (B, Tq, Hq, D)
        return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format).transpose(1, 2)

    def _attend_unfused(self, query, query_positions, scale, block_size, use_kernel, checks,
                        shared, out_dtype: torch.dtype = _F32) -> torch.Tensor:
        """:meth:`attend` by the prefill path or the split form (float32, or the SDPA prefill's
        own dtype when that is ``out_dtype``)."""
        out = self._attend_prefill(query, query_positions, scale, block_size, use_kernel, checks, shared,
                                   out_dtype)
        if out is not None:
            return out
        q, qp, sc = self._attend_inputs(query, query_positions, scale, checks)
        parts = []
        if self.quantized.num_codes:
            parts.append(self.quantized.partial(q, qp, sc, block_size=block_size, use_kernel=use_kernel,
                                                check_query=checks is None))
        parts += self._full_precision_parts(q, qp, sc, block_size, shared)
        if not parts:
            return torch.zeros(q.shape, dtype=_F32, device=self.device)
        if len(parts) == 1:
            return _att.normalise(*parts[0])
        return _att.normalise(*_att.merge_raw(parts))

    def _fused_applies(self, query: torch.Tensor, use_kernel) -> bool:
        """Whether :meth:`attend` takes :meth:`_attend_fused` (a store that ``fused_decode``s, a
        decode-sized query of valid shape, the Triton kernels usable, ``use_kernel`` not False)."""
        (b, h, d), (qb, hq, tq, qd) = self._dims, query.shape
        return (use_kernel is not False and self.quantized.fused_decode and (qb, qd) == (b, d)
                and hq % h == 0 and 0 < (hq // h) * tq <= DECODE_ROWS and query.dtype in FLOAT_DTYPES
                and query.device == self._residual.keys.device and _att.attention_kernel_usable(query))

    def _attend_fused(self, query: torch.Tensor, query_positions, scale, checks,
                      out_dtype: torch.dtype = _F32) -> torch.Tensor:
        """:meth:`attend` in two launches and no host read (accelerated/decode_kernels.py):
        ``(B, Hq, Tq, D)`` in ``out_dtype``, a transposed view of ``(B, Tq, Hq, D)``."""
        if checks is not None:
            checks.finite(query, "query contains NaN or Inf; pass finite values")
        elif not bool(torch.isfinite(query).all()):
            raise ValueError("query contains NaN or Inf; pass finite values")
        qp = _att.int_tensor("query_positions", query_positions, (query.shape[0], query.shape[2]), self.device)
        (ppos, pk, pv), (rk, rv, valid, _) = self._preserved.view(), self._residual.view()
        return fused_decode_attention(query, qp, _att.check_scale(scale, query.shape[3]),
                                      self.quantized.kernel_views(), (pk, pv, ppos),
                                      (rk, rv, valid, self._residual.start_dev), out_dtype=out_dtype)

    def _attend_inputs(self, query: torch.Tensor, query_positions, scale, checks, convert: bool = True):
        """The checked query (on the device; float32 unless not ``convert``), positions (int64), scale.

        The query's finiteness is checked once: recorded in ``checks``, or by the store's
        ``partial`` when it checks it (``checks_query``) and holds codes, here otherwise (each
        eager check is a device->host sync)."""
        b, h, d = self._dims
        if query.shape[0] != b or query.shape[3] != d:
            raise ValueError(f"query must have shape (B={b}, Hq, Tq, D={d}), got {tuple(query.shape)}")
        if checks is not None:
            checks.finite(query, "query contains NaN or Inf; pass finite values")
        store_checks = self.quantized.checks_query and self.quantized.num_codes > 0
        q = _att.float_tensor("query", query.to(self.device), 4,
                              check_finite=checks is None and not store_checks, convert=convert)
        _att.check_heads(q.shape[1], h)
        qp = _att.int_tensor("query_positions", query_positions, (b, q.shape[2]), self.device)
        return q, qp, _att.check_scale(scale, d)

    def _full_precision_parts(self, q, qp, sc, block_size: int, shared: Optional[dict]) -> list:
        """``(m, l, acc)`` of the preserved store and of the residual (those not empty); already
        checked finite on update, no re-check here."""
        parts = self._preserved_parts(q, qp, sc, block_size, shared)
        res = self._residual
        if res.length:
            rk, rv, _, _ = res.view()
            vis = self._shared_visibility(shared, "residual", qp, res.positions)
            parts.append(_att.segment_partial(q, rk.to(_F32), rv.to(_F32), qp, None if vis is not None
                                              else res.positions(), None, sc, block_size, vis=vis))
        return parts

    def _preserved_parts(self, q, qp, sc, block_size: int, shared: Optional[dict]) -> list:
        """``[(m, l, acc)]`` of the preserved store, ``[]`` when it is empty."""
        if not self._preserved.used:
            return []
        ppos, pk, pv = self._preserved.view()
        vis = self._shared_visibility(shared, "preserved", qp, lambda: ppos)
        return [_att.segment_partial(q, pk.to(_F32), pv.to(_F32), qp, ppos, None, sc, block_size, vis=vis)]

    def _attend_prefill(self, query, query_positions, scale, block_size, use_kernel, checks, shared,
                        out_dtype: torch.dtype = _F32):
        """A prefill's attention, its residual through SDPA (:mod:`accelerated.attention_sdpa`,
        docs/11-transformers.md §11.3), or None (the blocked path): ``Tq == 1``, no residual, a
        query not in the cache dtype, or earlier segments and no usable log-sum-exp op here.
        float32, or SDPA's own output when it is already in ``out_dtype``."""
        res = self._residual
        earlier = self.quantized.num_codes > 0 or self._preserved.used > 0
        if not res.length or not _sdpa.prefill_applies(query, self.dtype, self.device.type, earlier):
            return None
        qc, qp, sc = self._attend_inputs(query, query_positions, scale, checks, convert=False)
        rk, rv, valid, _ = res.view()
        plan = _sdpa.shared_plan(shared, (self.device, res.start, res.length), qp, res.start, valid)
        if not earlier:
            out = _sdpa.sdpa_attention(qc, rk, rv, plan, sc)
            return out if out.dtype == out_dtype else out.to(_F32)   # no float32 round trip
        q = qc.to(_F32)
        parts = [self.quantized.partial(q, qp, sc, block_size=block_size, use_kernel=use_kernel,
                                        check_query=checks is None)] if self.quantized.num_codes else []
        parts += self._preserved_parts(q, qp, sc, block_size, shared)
        parts.append(_sdpa.sdpa_partial(qc, rk, rv, plan, sc))
        return _att.normalise(*_att.merge_raw(parts))

    def _shared_visibility(self, shared: Optional[dict], segment: str, qp: torch.Tensor, positions):
        """The segment's visibility (bool ``(B, Tq, S)``) from ``shared`` or made and stored there;
        None without ``shared`` (``segment_partial`` then computes it block by block)."""
        if shared is None:
            return None
        key = (segment, self.device, self._residual.start, self._residual.length, self._preserved.used,
               tuple(qp.shape))
        vis = shared.get(key)
        if vis is None:
            vis = _att.visibility(qp, positions())
            shared[key] = vis
        return vis
