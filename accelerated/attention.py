"""Attention over a (partly quantized, partly preserved) KV cache, torch twin of
``reference/attention.py`` (docs/05-attention.md).

Same functions and conventions as the reference (shapes, visibility rule,
grouped-query head mapping ``h -> h // (Hq // H)``, default scale
``1 / sqrt(D)``, a query that sees no key outputs 0, NaN/Inf raise), with two
differences of arithmetic:

* everything is **float32** (the reference is float64); inputs of any float
  dtype are converted to float32, results are float32;
* the keys are processed **block by block** (``block_size`` keys at a time,
  online softmax: running max ``m``, running sum ``l``, unnormalised ``acc``),
  so memory stays ``O(B * Hq * Tq * block)`` whatever the cache length.

The error against the reference is bounded by docs/09-tolerances.md §9.3 (row
"float32 throughout": on CPU there is no TF32; on CUDA the torch path's
matmuls follow ``torch.backends.cuda.matmul.allow_tf32``, off by default).

:func:`quantized_segment_attention` computes the partial statistics of the
quantized segment directly from the packed codes (int32 words, scales, zero
points), dequantizing one block of tokens at a time and never the whole
segment: on CUDA through the Triton kernel of ``attention_kernels.py``,
elsewhere with the torch code below.  This is what the cache calls.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .packing import unpack_codes
from .quantize import PackedQuantizedTensor, symmetric_offset
from reference import attention as _ref_attention

__all__ = [
    "kv_head_index",
    "visible_keys",
    "attention_scores",
    "attention",
    "partial_attention",
    "merge_partials",
    "split_attention",
    "quantized_segment_attention",
    "DEFAULT_BLOCK",
    # package-internal API (accelerated/cache*.py): checks, the partial-statistics steps
    "float_tensor", "int_tensor", "check_scale", "check_heads", "const_like", "visibility",
    "segment_partial", "normalise", "merge_raw", "attention_kernel_usable",
]

#: Keys per block of the blocked CPU/torch computation.
DEFAULT_BLOCK = 512
_F32 = torch.float32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- validation

def float_tensor(name: str, x, ndim: int, check_finite: bool = True, convert: bool = True) -> torch.Tensor:
    """``x`` as float32 (as it is with ``convert=False``) after checking it is a floating torch
    tensor of ``ndim`` dimensions (and finite unless ``check_finite=False``); errors name the
    argument ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor (float16/bfloat16/float32/float64), "
                        f"got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; pass finite values")
    return x.to(_F32) if convert else x


def int_tensor(name: str, x, shape, device) -> torch.Tensor:
    """``x`` as int64 on ``device`` after checking it is an integer torch tensor of ``shape``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch tensor, got {type(x).__name__}")
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.int64)


#: The scale argument's check: ``scale`` or ``1/sqrt(d)`` (the reference's, shared).
check_scale = _ref_attention.check_scale


def check_heads(hq: int, h: int) -> int:
    """``g = hq / h`` query heads per key head (grouped-query attention); ValueError otherwise."""
    if h == 0 or hq % h != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number "
                         f"of keys heads ({h}) for grouped-query attention")
    return hq // h


def _check_qkv(query, keys, values):
    q = float_tensor("query", query, 4)
    k = float_tensor("keys", keys, 4)
    v = float_tensor("values", values, 4)
    if k.shape != v.shape:
        raise ValueError(f"keys and values must have the same shape (B, H, S, D), "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"query and keys must have the same batch size, "
                         f"got {q.shape[0]} and {k.shape[0]}")
    check_heads(q.shape[1], k.shape[1])
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"query and keys must have the same head dimension D, "
                         f"got {q.shape[3]} and {k.shape[3]}")
    return q, k.to(q.device), v.to(q.device)


def _check_key_valid(key_valid, shape, device):
    if key_valid is None:
        return None
    if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
        raise TypeError(f"key_valid must be a bool array, got dtype "
                        f"{getattr(key_valid, 'dtype', type(key_valid).__name__)}")
    if tuple(key_valid.shape) != tuple(shape):
        raise ValueError(f"key_valid must have shape {tuple(shape)} (B, S), got {tuple(key_valid.shape)}")
    return key_valid.to(device)


# --------------------------------------------------------------------------- Definitions 5.1 - 5.2

def kv_head_index(num_query_heads: int, num_kv_heads: int) -> torch.Tensor:
    """KV head read by each query head: ``h // (Hq // H)``, int64 ``(Hq,)``."""
    if num_kv_heads <= 0 or num_query_heads <= 0 or num_query_heads % num_kv_heads != 0:
        raise ValueError(f"the number of query heads ({num_query_heads}) must be a positive "
                         f"multiple of the number of keys heads ({num_kv_heads})")
    return torch.arange(num_query_heads, dtype=torch.int64) // (num_query_heads // num_kv_heads)


def visible_keys(query_positions, key_positions, key_valid=None) -> torch.Tensor:
    """bool ``(B, Tq, S)``: ``kp >= 0 and key_valid and kp <= qp`` (Definition 5.2)."""
    if not isinstance(query_positions, torch.Tensor) or query_positions.dim() != 2:
        raise ValueError(f"query_positions must have shape (B, Tq), got "
                         f"{tuple(getattr(query_positions, 'shape', ()))}")
    qp = int_tensor("query_positions", query_positions, query_positions.shape, query_positions.device)
    if not isinstance(key_positions, torch.Tensor) or key_positions.dim() != 2:
        raise ValueError(f"key_positions must have shape (B, S), got "
                         f"{tuple(getattr(key_positions, 'shape', ()))}")
    kp = int_tensor("key_positions", key_positions, key_positions.shape, qp.device)
    if kp.shape[0] != qp.shape[0]:
        raise ValueError(f"key_positions and query_positions must have the same batch size, "
                         f"got {kp.shape[0]} and {qp.shape[0]}")
    vis = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])
    kv = _check_key_valid(key_valid, kp.shape, qp.device)
    if kv is not None:
        vis = vis & kv[:, None, :]
    return vis


def attention_scores(query, keys, *, scale=None) -> torch.Tensor:
    """Scaled dot products float32 ``(B, Hq, Tq, S)``, no masking."""
    q = float_tensor("query", query, 4)
    k = float_tensor("keys", keys, 4).to(q.device)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"query and keys must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"query and keys must have the same head dimension D, "
                         f"got {q.shape[3]} and {k.shape[3]}")
    g = check_heads(q.shape[1], k.shape[1])
    s = check_scale(scale, q.shape[3])
    b, hq, tq, d = q.shape
    qg = q.reshape(b, k.shape[1], g * tq, d)
    e = torch.matmul(qg, k.transpose(-1, -2)) * s
    return e.reshape(b, hq, tq, k.shape[2])


# --------------------------------------------------------------------------- block kernel (torch)

# The online-softmax bookkeeping below runs on every layer of every decode step, one small
# kernel per torch op, so it is written with few ops; each rewrite gives the same values:
# * ``_finite(x)`` is ``torch.isfinite(x)`` in two kernels (``|x| < inf``, NaN compares False)
#   instead of four (eq, abs, ne, mul);
# * ``_finite_or_zero(m)`` is ``torch.where(torch.isfinite(m), m, 0)`` in one kernel;
# * constants are cached 0-d tensors (``torch.where(c, x, 0.0)`` would fill a new one, a kernel).

def _finite(x: torch.Tensor) -> torch.Tensor:
    return x.abs() < math.inf


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)


_CONSTANTS = {}


def const_like(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor holding ``value`` in ``like``'s dtype and device (made once)."""
    key = (like.device, like.dtype, value)
    c = _CONSTANTS.get(key)
    if c is None:
        with torch.inference_mode(False):
            c = _CONSTANTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return c


def _block_partial(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vis: torch.Tensor, scale: float,
                   tq: int):
    """Partial statistics of one key block.

    ``qg``: (B, H, g*Tq, D) (rows ordered head-in-group major, then query);
    ``k, v``: (B, H, S, D); ``vis``: (B, Tq, S).  Returns m, l (B, H, g*Tq), acc (B, H, g*Tq, D).
    """
    b, h, rows, d = qg.shape
    g = rows // tq
    e = torch.matmul(qg, k.transpose(-1, -2)) * scale                 # (B, H, g*Tq, S)
    vis_rows = vis[:, None, None, :, :].expand(b, 1, g, tq, vis.shape[-1]).reshape(b, 1, rows, -1)
    e = torch.where(vis_rows, e, const_like(_NEG_INF, e))
    m = e.amax(dim=-1) if e.shape[-1] else torch.full((b, h, rows), _NEG_INF, dtype=_F32, device=qg.device)
    # an invisible key has e = -inf and the subtrahend is finite: p = exp(-inf) = 0 exactly,
    # so no second mask is needed
    p = torch.exp(e - _finite_or_zero(m)[..., None])
    return m, p.sum(dim=-1), torch.matmul(p, v)


def _combine(a, b_):
    """Log-sum-exp combination of two partial triples (same shapes)."""
    m1, l1, acc1 = a
    m2, l2, acc2 = b_
    m = torch.maximum(m1, m2)
    safe = _finite_or_zero(m)
    zero = const_like(0.0, m)
    w1 = torch.where(_finite(m1), torch.exp(m1 - safe), zero)
    w2 = torch.where(_finite(m2), torch.exp(m2 - safe), zero)
    return m, w1 * l1 + w2 * l2, w1[..., None] * acc1 + w2[..., None] * acc2


def _rows_to_heads(t: torch.Tensor, b: int, hq: int, tq: int) -> torch.Tensor:
    """(B, H, g*Tq[, D]) -> (B, Hq, Tq[, D])."""
    return t.reshape((b, hq, tq) + tuple(t.shape[3:]))


def visibility(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """bool ``(B, Tq, S)``: key ``s`` visible to query ``t`` (``0 <= kp[b, s] <= qp[b, t]``)."""
    return (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])


def segment_partial(q, k, v, qp, kp, key_valid, scale, block_size, vis=None):
    """``(m, l, acc)`` of one segment; ``vis`` (bool ``(B, Tq, S)``, optional) is its visibility
    ``visibility(qp, kp) & key_valid`` computed by the caller (``kp`` is then not read)."""
    b, hq, tq, d = q.shape
    h, s_len = k.shape[1], k.shape[2]
    g = hq // h
    qg = q.reshape(b, h, g * tq, d)
    state = None
    for s0 in range(0, s_len, block_size):
        s1 = min(s_len, s0 + block_size)
        if vis is not None:
            vis_b = vis[:, :, s0:s1]
        else:
            vis_b = visibility(qp, kp[:, s0:s1])
            if key_valid is not None:
                vis_b = vis_b & key_valid[:, None, s0:s1]
        part = _block_partial(qg, k[:, :, s0:s1], v[:, :, s0:s1], vis_b, scale, tq)
        # the first block is the state: combining it with the empty (-inf, 0, 0) is the identity
        state = part if state is None else _combine(state, part)
    if state is None:
        state = _empty_state(b, h, g * tq, d, q.device)
    m, l, acc = state
    return _rows_to_heads(m, b, hq, tq), _rows_to_heads(l, b, hq, tq), _rows_to_heads(acc, b, hq, tq)


def _empty_state(b: int, h: int, rows: int, d: int, device):
    """The partial statistics of no key: ``(-inf, 0, 0)``."""
    return (torch.full((b, h, rows), _NEG_INF, dtype=_F32, device=device),
            torch.zeros((b, h, rows), dtype=_F32, device=device),
            torch.zeros((b, h, rows, d), dtype=_F32, device=device))


def _check_block(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    return int(block_size)


def _prepare(query, keys, values, query_positions, key_positions, key_valid, scale):
    q, k, v = _check_qkv(query, keys, values)
    b, hq, tq, d = q.shape
    qp = int_tensor("query_positions", query_positions, (b, tq), q.device)
    kp = int_tensor("key_positions", key_positions, (b, k.shape[2]), q.device)
    kv = _check_key_valid(key_valid, (b, k.shape[2]), q.device)
    return q, k, v, qp, kp, kv, check_scale(scale, d)


# --------------------------------------------------------------------------- Definitions 5.3 - 5.6

def partial_attention(query, keys, values, *, query_positions, key_positions, key_valid=None,
                      scale=None, block_size: int = DEFAULT_BLOCK):
    """``(m, l, acc)`` of one segment (Definition 5.4), float32.

    ``m, l``: ``(B, Hq, Tq)``; ``acc``: ``(B, Hq, Tq, D)``; ``(-inf, 0, 0)``
    for a query that sees no key of the segment (``S = 0`` allowed).
    """
    block_size = _check_block(block_size)
    q, k, v, qp, kp, kv, s = _prepare(query, keys, values, query_positions, key_positions, key_valid, scale)
    return segment_partial(q, k, v, qp, kp, kv, s, block_size)


def normalise(m, l, acc):
    """``acc / l`` of a partial triple (Definition 5.5's last step), 0 for a query seeing no key."""
    seen = _finite(m)
    den = torch.where(seen, l, const_like(1.0, l))
    return torch.where(seen[..., None], acc / den[..., None], const_like(0.0, acc))


def attention(query, keys, values, *, query_positions, key_positions, key_valid=None, scale=None,
              block_size: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Masked softmax attention (Definition 5.3), float32 ``(B, Hq, Tq, D)``; 0 for a query seeing no key."""
    m, l, acc = partial_attention(query, keys, values, query_positions=query_positions,
                                  key_positions=key_positions, key_valid=key_valid, scale=scale,
                                  block_size=block_size)
    return normalise(m, l, acc)


def merge_raw(parts):
    """The log-sum-exp merge (Definition 5.5) of partial triples, left unnormalised: ``(M, L, ACC)``."""
    m_all = torch.stack([p[0] for p in parts])
    big_m = m_all.amax(dim=0)
    safe = _finite_or_zero(big_m)
    w = torch.where(_finite(m_all), torch.exp(m_all - safe), const_like(0.0, m_all))
    num = (w[..., None] * torch.stack([p[2] for p in parts])).sum(dim=0)
    den = (w * torch.stack([p[1] for p in parts])).sum(dim=0)
    return big_m, den, num


def merge_partials(parts: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Log-sum-exp merge (Definition 5.5), ``(B, Hq, Tq, D)`` in the parts' dtype (float32 normally)."""
    parts = list(parts)
    if len(parts) == 0:
        raise ValueError("parts must hold at least one (m, l, acc) triple")
    checked = []
    for i, part in enumerate(parts):
        if len(part) != 3:
            raise ValueError(f"parts[{i}] must be an (m, l, acc) triple, got {len(part)} items")
        m, l, acc = part
        if not all(isinstance(a, torch.Tensor) for a in (m, l, acc)):
            raise TypeError(f"parts[{i}] must hold torch tensors")
        if acc.dim() != 4 or tuple(m.shape) != tuple(acc.shape[:3]) or tuple(l.shape) != tuple(m.shape):
            raise ValueError(f"parts[{i}] must have m, l of shape (B, Hq, Tq) and acc of shape "
                             f"(B, Hq, Tq, D); got {tuple(m.shape)}, {tuple(l.shape)}, {tuple(acc.shape)}")
        if checked and (m.shape != checked[0][0].shape or acc.shape != checked[0][2].shape):
            raise ValueError(f"parts[{i}] has shapes {tuple(m.shape)}/{tuple(acc.shape)}, parts[0] has "
                             f"{tuple(checked[0][0].shape)}/{tuple(checked[0][2].shape)}; all parts must match")
        if bool(torch.isnan(m).any()) or bool((m == float("inf")).any()):
            raise ValueError(f"parts[{i}] m contains NaN or +Inf; m must be finite or -inf")
        if not (bool(torch.isfinite(l).all()) and bool(torch.isfinite(acc).all())):
            raise ValueError(f"parts[{i}] l or acc contains NaN or Inf")
        dtype = torch.float64 if m.dtype == torch.float64 else _F32
        dev = checked[0][0].device if checked else m.device
        checked.append((m.to(dev, dtype), l.to(dev, dtype), acc.to(dev, dtype)))
    return normalise(*merge_raw(checked))


def split_attention(query, segments, *, query_positions, scale=None,
                    block_size: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Attention over a list of ``(keys, values, key_positions)`` segments (Definition 5.6), float32."""
    q = float_tensor("query", query, 4)
    parts = []
    for i, seg in enumerate(segments):
        if len(seg) != 3:
            raise ValueError(f"segments[{i}] must be a (keys, values, key_positions) triple, "
                             f"got {len(seg)} items")
        k, v, kp = seg
        parts.append(partial_attention(q, k, v, query_positions=query_positions, key_positions=kp,
                                       scale=scale, block_size=block_size))
    if not parts:
        b, hq, tq, d = q.shape
        int_tensor("query_positions", query_positions, (b, tq), q.device)
        check_scale(scale, d)
        return torch.zeros((b, hq, tq, d), dtype=_F32, device=q.device)
    return normalise(*merge_raw(parts))


# --------------------------------------------------------------------------- quantized segment

def _check_packed(name: str, pqt, b: int, h: int, d: int) -> PackedQuantizedTensor:
    if not isinstance(pqt, PackedQuantizedTensor):
        raise TypeError(f"{name} must be an accelerated.quantize.PackedQuantizedTensor "
                        f"(quantize_packed(...)), got {type(pqt).__name__}")
    if len(pqt.shape) != 4 or pqt.shape[0] != b or pqt.shape[1] != h or pqt.shape[3] != d:
        raise ValueError(f"{name} must quantize a (B, H, T, D) = ({b}, {h}, T, {d}) tensor, "
                         f"got shape {pqt.shape}")
    return pqt


def _dequantize_block(pqt: PackedQuantizedTensor, t0: int, t1: int) -> torch.Tensor:
    """Dequantize tokens ``[t0, t1)`` of a packed (B, H, T, D) tensor: float32 (B, H, t1 - t0, D).

    Same two roundings as the reference (``q * s`` then ``+ z``); ``t0`` must be a
    multiple of the group size for axis "channel".
    """
    d = pqt.shape[-1]
    codes = unpack_codes(pqt.words[:, :, t0:t1], pqt.bits, d, validate=False).to(_F32)
    g = pqt.group_size
    n = t1 - t0
    if pqt.axis == "channel":
        sl = slice(t0 // g, -(-t1 // g))
        s = torch.repeat_interleave(pqt.scale[:, :, sl], g, dim=-2)[:, :, :n]
        z = None if pqt.zero is None else torch.repeat_interleave(pqt.zero[:, :, sl], g, dim=-2)[:, :, :n]
    else:
        s = torch.repeat_interleave(pqt.scale[:, :, t0:t1], g, dim=-1)[..., :d]
        z = None if pqt.zero is None else torch.repeat_interleave(pqt.zero[:, :, t0:t1], g, dim=-1)[..., :d]
    if pqt.symmetric:
        return (codes - symmetric_offset(pqt.bits)) * s
    return codes * s + z


def _block_for(keys: PackedQuantizedTensor, values: PackedQuantizedTensor, block_size: int) -> int:
    """Round ``block_size`` up to a multiple of every per-channel (token-grouped) group size."""
    step = 1
    for p in (keys, values):
        if p.axis == "channel":
            step = step * p.group_size // math.gcd(step, p.group_size)
    return max(step, -(-block_size // step) * step)


def quantized_segment_attention(query, keys: PackedQuantizedTensor, values: PackedQuantizedTensor, *,
                                query_positions, key_positions, key_valid=None, scale=None,
                                block_size: int = 256, use_kernel: Optional[bool] = None,
                                precision: str = "ieee", check_query: bool = True):
    """Partial attention ``(m, l, acc)`` over a quantized segment, read from its packed form.

    Equals ``partial_attention(query, dequantize(keys), dequantize(values), ...)``
    (up to the float32 rounding of docs/09-tolerances.md §9.3 and, in the
    Triton kernel, the FMA of dequantization: §9.2 (b)), without ever
    materialising the dequantized segment: ``block_size`` tokens (rounded up
    to a multiple of the per-channel group sizes) are unpacked at a time.

    Parameters
    ----------
    query : float ``(B, Hq, Tq, D)``.
    keys, values : :class:`PackedQuantizedTensor` of shape ``(B, H, T, D)``
        (any axis, scheme, bits and group size).
    query_positions : int ``(B, Tq)``; key_positions : int ``(B, T)``
        (negative = empty slot: preserved token moved out, padding, cropped).
    key_valid : None or bool ``(B, T)``.
    scale : None (``1/sqrt(D)``) or float > 0.
    use_kernel : None = the Triton kernel on CUDA when triton is installed,
        False = torch code, True = kernel or raise.
    precision : the kernel's float32 dot: "ieee" (default; error row
        "float32 throughout" of §9.3) or "tf32x3" (three TF32 products,
        docs/09-tolerances.md accelerated section).  Ignored by the torch code.
    check_query : True (default) raises ``ValueError`` if ``query`` holds NaN or Inf (one
        device->host synchronisation); False skips that check, for a caller that has
        validated the query itself (the cache's deferred checks, ``accelerated.cache.DeferredChecks``).

    Returns
    -------
    (m, l, acc) float32: ``(B, Hq, Tq)``, ``(B, Hq, Tq)``, ``(B, Hq, Tq, D)``.
    """
    block_size = _check_block(block_size)
    q, keys, values, qp, kp, sc, deferred = _checked_segment_inputs(
        query, keys, values, query_positions, key_positions, key_valid, scale, precision, check_query)
    usable = attention_kernel_usable(q)
    if use_kernel and not usable:
        raise ValueError("use_kernel=True but the Triton attention kernel cannot run here "
                         "(needs CUDA tensors and triton); pass use_kernel=None")
    if usable and use_kernel is not False and keys.shape[2] > 0:
        from . import attention_kernels
        bad = ~torch.isfinite(q).all() if deferred else None          # device flag, no sync yet
        out = attention_kernels.quantized_partial_attention(q, keys, values, qp, kp, sc, precision)
        if bad is not None and bool(bad):
            raise ValueError("query contains NaN or Inf; pass finite values")
        return out
    if deferred and not bool(torch.isfinite(q).all()):
        raise ValueError("query contains NaN or Inf; pass finite values")
    return _blocked_segment_partial(q, keys, values, qp, kp, sc, block_size)


def _checked_segment_inputs(query, keys, values, query_positions, key_positions, key_valid, scale,
                            precision, check_query):
    """The checked inputs of :func:`quantized_segment_attention`: float32 ``q``, the packed
    ``keys``/``values``, int64 ``qp``/``kp`` (invalid keys at -1), the scale, and whether the
    query's finiteness check is deferred past the kernel launch (CUDA)."""
    q = float_tensor("query", query, 4, check_finite=False)
    # On CUDA the finiteness of the query is checked AFTER the kernel launch (same single
    # device->host sync, but the Python launch work then overlaps the GPU instead of following
    # an idle wait); elsewhere, here as before.  check_query=False: the caller checked it.
    deferred = check_query and q.is_cuda and q.numel() > 0
    if check_query and not deferred and q.numel() and not bool(torch.isfinite(q).all()):
        raise ValueError("query contains NaN or Inf; pass finite values")
    b, hq, tq, d = q.shape
    if not isinstance(keys, PackedQuantizedTensor):
        raise TypeError(f"keys must be an accelerated.quantize.PackedQuantizedTensor, got {type(keys).__name__}")
    h = keys.shape[1] if len(keys.shape) == 4 else -1
    keys = _check_packed("keys", keys, b, h, d)
    values = _check_packed("values", values, b, h, d)
    if values.shape != keys.shape:
        raise ValueError(f"keys and values must have the same shape, got {keys.shape} and {values.shape}")
    check_heads(hq, h)
    t_len = keys.shape[2]
    qp = int_tensor("query_positions", query_positions, (b, tq), q.device)
    kp = int_tensor("key_positions", key_positions, (b, t_len), q.device)
    kv = _check_key_valid(key_valid, (b, t_len), q.device)
    sc = check_scale(scale, d)
    if precision not in ("ieee", "tf32x3"):
        raise ValueError(f"precision={precision!r} is not allowed; choose 'ieee' or 'tf32x3'")
    if kv is not None:
        kp = torch.where(kv, kp, torch.full_like(kp, -1))
    for name, p in (("keys", keys), ("values", values)):
        if p.words.device != q.device:
            raise ValueError(f"{name} lives on {p.words.device}, query on {q.device}; move them to one device")
    return q, keys, values, qp, kp, sc, deferred


def _blocked_segment_partial(q, keys, values, qp, kp, sc, block_size):
    """The torch path of :func:`quantized_segment_attention`: ``(m, l, acc)`` accumulated over
    blocks of tokens, each dequantized on its own (online softmax)."""
    b, hq, tq, d = q.shape
    h = keys.shape[1]
    t_len = keys.shape[2]
    g = hq // h
    qg = q.reshape(b, h, g * tq, d)
    state = None
    step = _block_for(keys, values, block_size)
    for t0 in range(0, t_len, step):
        t1 = min(t_len, t0 + step)
        kblk = _dequantize_block(keys, t0, t1)
        vblk = _dequantize_block(values, t0, t1)
        kpb = kp[:, t0:t1]
        vis = (kpb[:, None, :] >= 0) & (kpb[:, None, :] <= qp[:, :, None])
        part = _block_partial(qg, kblk, vblk, vis, sc, tq)
        state = part if state is None else _combine(state, part)      # first block: the state
    if state is None:
        state = _empty_state(b, h, g * tq, d, q.device)
    m, l, acc = state
    return _rows_to_heads(m, b, hq, tq), _rows_to_heads(l, b, hq, tq), _rows_to_heads(acc, b, hq, tq)


def attention_kernel_usable(q: torch.Tensor) -> bool:
    """Whether the Triton decode-attention kernel can run for ``q`` (CUDA, or CPU under
    ``TRITON_INTERPRET=1``, with triton installed)."""
    if not (q.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and q.device.type == "cpu")):
        return False
    return _triton_installed()


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    """Whether triton is importable (looked up once: ``find_spec`` costs host time on every call)."""
    import importlib.util
    return importlib.util.find_spec("triton") is not None
