"""A prefill's attention over its own full-precision tokens through torch's SDPA
(docs/05-attention.md §5.7, docs/09-tolerances.md §9.3, docs/11-transformers.md §11.3).

During a prefill (``Tq > 1`` queries) the residual window holds the step's tokens at full
precision; :meth:`accelerated.cache.QuantizedKVCacheLayer.attend` hands that segment to
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA,
the fused CPU kernel elsewhere) in the cache's dtype instead of the float32 blocks of
:func:`accelerated.attention.segment_partial`.  The visibility rule is the cache's (Definition
5.2: key slot valid and position ``<= `` the query's), described by a :class:`ResidualPlan` made
once per forward and shared by the layers:

* no padding and the queries are the window's tokens themselves (``Tq == r``, query ``t`` at the
  window's slot ``t``): ``is_causal=True`` -- no mask at all (flash attention on CUDA);
* otherwise a boolean ``(B, 1, Tq, r)`` mask (what transformers' sdpa mask is for a padded
  ``DynamicCache``), with the rows that see no key set to 0 after the call (SDPA leaves NaN or
  garbage there; Definition 5.3 says 0).

When earlier segments are visible too (chunked prefill: quantized blocks, preserved tokens),
:func:`sdpa_partial` also returns the segment's log-sum-exp, so the caller merges it with the
other segments' partial statistics (Definition 5.5): ``(m, l, acc) = (lse, 1, out)``.  The
log-sum-exp comes from ``aten._scaled_dot_product_efficient_attention(..., compute_log_sumexp=True)``
on CUDA and ``aten._scaled_dot_product_flash_attention_for_cpu`` on CPU; where neither is
available (or, on CUDA, the head dim is not aligned for it) :func:`lse_supported` is False and
the caller keeps the float32 blocks.

Memory: no float32 copy of the window and no float mask in the single-segment case; the
merged case builds a float ``(B, 1, Tq, r)`` additive mask in the cache dtype (those ops take no
boolean mask) and expands the K/V heads for grouped-query attention (they take no
``enable_gqa``) -- a chunk's size, not the prompt's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ResidualPlan", "residual_plan", "shared_plan", "sdpa_attention", "sdpa_partial", "lse_available",
           "lse_supported", "prefill_applies",
           "SDPA_DTYPES", "LSE_OPS"]

#: Storage dtypes whose residual goes through SDPA (float64 keeps the float32-block path).
SDPA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class ResidualPlan:
    """How the queries see the residual window: ``causal`` (no mask: query ``t`` sees slots
    ``<= t``, every row sees itself) or ``mask`` bool ``(B, 1, Tq, r)`` with ``seen`` bool
    ``(B, 1, Tq, 1)`` (the rows seeing at least one key)."""

    causal: bool
    mask: Optional[torch.Tensor] = None
    seen: Optional[torch.Tensor] = None


def residual_plan(qp: torch.Tensor, start: int, valid: torch.Tensor) -> ResidualPlan:
    """The :class:`ResidualPlan` of queries at positions ``qp`` (int64 ``(B, Tq)``) over a window of
    ``r`` slots starting at position ``start`` with validity ``valid`` (bool ``(B, r)``).

    Causal iff ``Tq == r``, every slot valid and ``qp[b, t] == start + t`` (one device->host read,
    made once per forward when the plan is shared); else the mask ``0 <= kp <= qp``, ``kp`` the
    slot positions with -1 at padding (Definition 5.2).
    """
    b, tq = qp.shape
    r = valid.shape[1]
    slots = torch.arange(start, start + r, dtype=torch.int64, device=qp.device)
    if tq == r and bool(torch.logical_and(valid.all(), (qp == slots).all())):
        return ResidualPlan(causal=True)
    kp = torch.where(valid, slots, torch.full_like(slots, -1))
    mask = ((kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None]))[:, None]   # (B, 1, Tq, r)
    return ResidualPlan(causal=False, mask=mask, seen=mask.any(dim=-1, keepdim=True))


def shared_plan(shared: Optional[dict], key: tuple, qp: torch.Tensor, start: int,
                valid: torch.Tensor) -> ResidualPlan:
    """:func:`residual_plan`, taken from ``shared`` (the forward's dict, ``key`` naming the window:
    device, start, length) or made and stored there: one per forward, every layer holding the
    same slots."""
    key = ("sdpa",) + tuple(key) + (tuple(qp.shape),)
    plan = None if shared is None else shared.get(key)
    if plan is None:
        plan = residual_plan(qp, start, valid)
        if shared is not None:
            shared[key] = plan
    return plan


def _gqa_kwarg() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5)."""
    return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


_GQA = _gqa_kwarg()


def _expand_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """``(B, H, S, D)`` -> ``(B, Hq, S, D)``, query head ``h`` reading KV head ``h // (Hq // H)``."""
    b, h, s, d = x.shape
    if h == hq:
        return x
    return x[:, :, None].expand(b, h, hq // h, s, d).reshape(b, hq, s, d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ResidualPlan,
                   scale: float) -> torch.Tensor:
    """Attention of ``q`` ``(B, Hq, Tq, D)`` over one full-precision segment ``k, v`` ``(B, H, r,
    D)`` (all in the cache dtype) under ``plan``; ``(B, Hq, Tq, D)`` in that dtype, rows seeing no
    key are 0.  Grouped-query heads through ``enable_gqa`` where torch has it and no mask is
    given (the flash kernel takes it; the masked kernels would fall back to the math one), else
    expanded K/V heads (what transformers' sdpa attention does)."""
    hq = q.shape[1]
    if plan.causal:
        if _GQA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=k.shape[1] != hq)
        return F.scaled_dot_product_attention(q, _expand_heads(k, hq), _expand_heads(v, hq),
                                              is_causal=True, scale=scale)
    out = F.scaled_dot_product_attention(q, _expand_heads(k, hq), _expand_heads(v, hq),
                                         attn_mask=plan.mask, scale=scale)
    return out.masked_fill(~plan.seen, 0)


#: The log-sum-exp op of each device type and the arguments :func:`sdpa_partial` passes it (the
#: schemas of torch 2.1 to 2.13; an op missing or with another schema keeps the blocked path).
LSE_OPS = {
    "cuda": ("_scaled_dot_product_efficient_attention",
             ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale")),
    "cpu": ("_scaled_dot_product_flash_attention_for_cpu",
            ("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale")),
}


def prefill_applies(query: torch.Tensor, cache_dtype: torch.dtype, device_type: str, merge: bool) -> bool:
    """Whether ``query`` ``(B, Hq, Tq, D)`` reads the residual (on ``device_type``, in
    ``cache_dtype``) through SDPA: a prefill (``Tq > 1``; decoding keeps the float32 path), the
    query in the cache's dtype, one of :data:`SDPA_DTYPES`, and, when other segments are to be
    merged (``merge``), :func:`lse_supported`."""
    return (query.shape[2] > 1 and query.dtype == cache_dtype and cache_dtype in SDPA_DTYPES
            and (not merge or lse_supported(device_type, cache_dtype, query.shape[3])))


def lse_supported(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`sdpa_partial` runs for queries of ``dtype`` and ``head_dim`` on
    ``device_type``: :func:`lse_available`, and on CUDA the memory-efficient kernel's head-dim
    alignment (a multiple of 4 in float32, of 8 in 16-bit formats; torch's own sdpa check)."""
    if not lse_available(device_type):
        return False
    return device_type != "cuda" or head_dim % (4 if dtype == torch.float32 else 8) == 0


@functools.lru_cache(maxsize=None)
def lse_available(device_type: str) -> bool:
    """Whether :func:`sdpa_partial` can run on devices of ``device_type`` ("cuda", "cpu"): the
    op of :data:`LSE_OPS` exists in this torch with the expected arguments."""
    if device_type not in LSE_OPS:
        return False
    name, args = LSE_OPS[device_type]
    op = getattr(torch.ops.aten, name, None)
    try:
        schema = op.default._schema
    except (AttributeError, RuntimeError):
        return False
    return tuple(a.name for a in schema.arguments) == args


def _additive_mask(plan: ResidualPlan, shape, dtype, device, align: int) -> torch.Tensor:
    """``plan``'s visibility as a ``(B, Hq, Tq, r)`` additive mask (0 / -inf) in ``dtype``, heads
    broadcast (stride 0), the last axis stored ``align``-aligned (the CUDA kernel's requirement)."""
    b, hq, tq, r = shape
    if plan.causal:
        vis = torch.ones((tq, r), dtype=torch.bool, device=device).tril(r - tq)
        vis = vis[None, None].expand(b, 1, tq, r)
    else:
        vis = plan.mask
    padded = -(-r // align) * align
    bias = torch.full((b, 1, tq, padded), _NEG_INF, dtype=dtype, device=device)
    bias[..., :r].masked_fill_(vis, 0)
    return bias[..., :r].expand(b, hq, tq, r)


def sdpa_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ResidualPlan,
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial statistics ``(m, l, acc)`` (Definition 5.4, float32 ``(B, Hq, Tq)``, ``(B, Hq, Tq)``,
    ``(B, Hq, Tq, D)``) of one full-precision segment, from SDPA's output and log-sum-exp:
    ``(lse, 1, out)`` where the row sees a key, ``(-inf, 0, 0)`` where it sees none.  Arguments as
    :func:`sdpa_attention`; the caller checked :func:`lse_supported`."""
    b, hq, tq, _ = q.shape
    ke, ve = _expand_heads(k, hq), _expand_heads(v, hq)
    if q.device.type == "cuda":
        bias = _additive_mask(plan, (b, hq, tq, k.shape[2]), q.dtype, q.device, 16)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, ke, ve, bias, True, 0.0, False, scale=scale)[:2]
    else:
        bias = _additive_mask(plan, (b, hq, tq, k.shape[2]), q.dtype, q.device, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, ke, ve, 0.0, False, attn_mask=bias, scale=scale)
    lse = lse[..., :tq].float()
    out = out.float()
    if plan.causal:
        return lse, torch.ones_like(lse), out
    seen = plan.seen[..., 0]                                           # (B, 1, Tq)
    m = lse.masked_fill(~seen, _NEG_INF)
    return m, seen.to(torch.float32).expand_as(m).contiguous(), out.masked_fill(~seen[..., None], 0)
