"""KVQuant, definitions 8.5 - 8.7: outliers and the dense-and-sparse tensor (docs/08-kvquant.md).

* 8.5 :func:`outlier_count`, :func:`key_outlier_thresholds`, :func:`key_outliers`
  (per-channel key thresholds, calibrated);
* 8.6 :func:`value_outliers` (the largest-magnitude values of each token);
* 8.7 :class:`KVQuantTensor`, :func:`quantize_nonuniform`,
  :func:`dequantize_nonuniform`: dense codes on a level grid plus a sparse
  list of outliers kept exactly.

Shapes: ``x`` ``(B, H, T, D)``; ``exclude`` bool ``(B, T)`` (shared by all
heads).  The argument checks used by the other KVQuant modules
(:func:`check_bhtd`, :func:`check_kv_pair`, :func:`check_exclude_bt`,
:func:`check_outlier_fraction`) live here.  (Split from ``reference.kvquant``,
which re-exports these names.)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .kvquant_levels import check_levels, level_dequantize, nearest_level, normalisation, normalised
from .packing import check_bits, pack_codes, packed_length
from .quantize import GROUP_AXIS, check_group_size, expand_groups, group_min_max, split_groups

__all__ = ["check_outlier_fraction", "check_exclude_bt", "check_bhtd", "check_kv_pair",
           "outlier_count", "key_outlier_thresholds", "key_outliers", "value_outliers",
           "KVQuantTensor", "quantize_nonuniform", "dequantize_nonuniform"]

_F32 = np.float32


# =========================================================================== 8.5 key outliers

def check_outlier_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not (0 <= float(fraction) < 0.5):
        raise ValueError(f"outlier_fraction must be a number in [0, 0.5), got {fraction!r}")
    return float(fraction)


def outlier_count(fraction: float, n: int) -> int:
    """Number of outliers among ``n`` entries (definition 8.5): ``rint(fraction * n)``.

    The product is float64; ``rint`` rounds half to even (``0.5 -> 0``,
    ``1.5 -> 2``).  ``fraction`` in ``[0, 0.5)``, ``n >= 0``.
    """
    f = check_outlier_fraction(fraction)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return int(np.rint(f * int(n)))


def check_exclude_bt(exclude, b: int, t: int) -> np.ndarray:
    if exclude is None:
        return np.zeros((b, t), dtype=bool)
    e = np.asarray(exclude)
    if e.dtype != np.bool_:
        raise TypeError(f"exclude must be a bool array (B, T), got dtype {e.dtype}")
    if e.shape != (b, t):
        raise ValueError(f"exclude must have shape (B, T) = {(b, t)}, got {e.shape}")
    return e


def check_bhtd(name: str, x) -> np.ndarray:
    """``x`` as a finite float32 ``(B, H, T, D)`` array, errors naming ``name``."""
    a = np.asarray(x)
    if a.dtype.name not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"{name} must be a floating array (float16/bfloat16/float32/float64), "
                        f"got dtype {a.dtype}; convert it with .astype(np.float32)")
    if a.ndim != 4:
        raise ValueError(f"{name} must have shape (B, H, T, D), got {a.shape}")
    a64 = a.astype(np.float64)
    if not np.all(np.isfinite(a64)):
        raise ValueError(f"{name} contains NaN or +-Inf; quantization needs finite values")
    with np.errstate(over="ignore"):
        a32 = a64.astype(_F32)
    if not np.all(np.isfinite(a32)):
        raise ValueError(f"{name} has values outside the float32 range (|x| > 3.4e38)")
    return a32


def check_kv_pair(keys_name: str, keys, values) -> Tuple[np.ndarray, np.ndarray]:
    """Keys and values as :func:`check_bhtd` arrays of one shape, errors naming ``keys_name``."""
    k = check_bhtd(keys_name, keys)
    v = check_bhtd("values", values)
    if v.shape != k.shape:
        raise ValueError(f"values must have the shape of {keys_name} {k.shape}, got {v.shape}")
    return k, v


def key_outlier_thresholds(keys, fraction: float, exclude=None) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel outlier thresholds of calibration keys (definition 8.5), float32 ``(H, D)`` each.

    For channel ``(h, d)`` let ``v_(0) <= ... <= v_(N-1)`` be the sorted
    calibration entries ``keys[b, h, t, d]`` of the non-excluded tokens
    ``(b, t)``, and ``k = outlier_count(fraction / 2, N)`` (per side).  Then

    .. math::  lower = v_{(k)}, \\qquad upper = v_{(N-1-k)}

    ``fraction == 0`` gives ``lower = -inf``, ``upper = +inf`` (no outliers,
    ever).  Parameters: ``keys`` float ``(B, H, T, D)`` **pre-RoPE**;
    ``exclude`` None or bool ``(B, T)`` (preserved tokens, padding).
    Every token excluded (``N = 0``, e.g. each calibration token a predicted
    sink) leaves no data to estimate from: ``-inf``/``+inf`` as for ``fraction == 0``.
    """
    x = check_bhtd("keys", keys)
    f = check_outlier_fraction(fraction)
    bsz, h, t, d = x.shape
    excl = check_exclude_bt(exclude, bsz, t)
    keep = ~excl
    n = int(keep.sum())
    if f == 0 or n == 0:
        return np.full((h, d), -np.inf, _F32), np.full((h, d), np.inf, _F32)
    # (H, D, N): the counted entries of each channel
    entries = np.moveaxis(x, 1, 0)[:, keep, :]            # (H, N, D)
    v = np.sort(np.moveaxis(entries, 1, 2), axis=-1)       # (H, D, N)
    k = outlier_count(f / 2, n)
    return v[..., k].astype(_F32), v[..., n - 1 - k].astype(_F32)


def key_outliers(keys, lower, upper, exclude=None) -> np.ndarray:
    """Key outliers (definition 8.5), bool ``(B, H, T, D)``: ``(x < lower) | (x > upper)``, never excluded.

    ``lower``/``upper`` float ``(H, D)`` from :func:`key_outlier_thresholds`;
    an entry equal to a threshold is dense.
    """
    x = check_bhtd("keys", keys)
    bsz, h, t, d = x.shape
    excl = check_exclude_bt(exclude, bsz, t)
    lo = np.asarray(lower, dtype=_F32)
    hi = np.asarray(upper, dtype=_F32)
    if lo.shape != (h, d) or hi.shape != (h, d):
        raise ValueError(f"lower and upper must have shape (H, D) = {(h, d)}, got {lo.shape}, {hi.shape}")
    out = (x < lo[:, None, :]) | (x > hi[:, None, :])
    return out & ~excl[:, None, :, None]


# =========================================================================== 8.6 value outliers

def value_outliers(values, fraction: float, exclude=None) -> np.ndarray:
    """Per-token value outliers (definition 8.6), bool ``(B, H, T, D)``.

    For each non-excluded token ``(b, t)``, its ``n = H * D`` entries (all KV
    heads of the layer) are ordered by decreasing ``|x|``, ties by increasing
    flat index ``h * D + d``; the first ``k = outlier_count(fraction, n)`` are
    outliers — exactly ``k`` per non-excluded token, none for excluded ones.
    """
    x = check_bhtd("values", values)
    f = check_outlier_fraction(fraction)
    bsz, h, t, d = x.shape
    excl = check_exclude_bt(exclude, bsz, t)
    k = outlier_count(f, h * d)
    out = np.zeros((bsz, t, h * d), dtype=bool)
    if k:
        mag = np.abs(np.moveaxis(x, 1, 2).reshape(bsz, t, h * d))      # (B, T, H*D)
        order = np.argsort(-mag, axis=-1, kind="stable")               # stable: lower index first
        np.put_along_axis(out, order[..., :k], True, axis=-1)
        out &= ~excl[..., None]
    return np.moveaxis(out.reshape(bsz, t, h, d), 2, 1)


# =========================================================================== 8.7 dense-and-sparse tensor

@dataclass(frozen=True, eq=False)
class KVQuantTensor:
    """A dense-and-sparse non-uniformly quantized ``(B, H, T, D)`` array (definition 8.7).

    Attributes
    ----------
    codes : uint8 ``shape``, unpacked level indices (0 for outliers, excluded
        entries and zero-range groups).
    scale, centre : float32 group half-range ``s`` and centre ``c``;
        ``(B, H, ceil(T/G), D)`` (axis "channel") or ``(B, H, T, ceil(D/G))`` (axis "token").
    levels : float32 ``(..., n)``, broadcastable against ``shape + (n,)``: ``(n,)``
        (nf grid), ``(H, 1, D, n)`` (per-channel key codebooks) or
        ``(H, 1, 1, n)`` (per-head value codebooks).  Owned by the calibration,
        not counted in :attr:`nbytes`.
    outlier_index : int32 ``(K,)``, ascending flat (C-order) indices into ``shape``.
    outlier_value : ``(K,)`` float32 or float16, the outliers' values.
    bits, group_size, axis, shape.
    """

    codes: np.ndarray
    scale: np.ndarray
    centre: np.ndarray
    levels: np.ndarray
    outlier_index: np.ndarray
    outlier_value: np.ndarray
    bits: int
    group_size: int
    axis: str
    shape: Tuple[int, ...]

    def packed(self) -> np.ndarray:
        """Codes packed along D: uint32 ``(B, H, T, packed_length(D, b))`` (definition 2.4)."""
        return pack_codes(self.codes, self.bits)

    @property
    def num_outliers(self) -> int:
        return int(self.outlier_index.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form (definition 8.7)::

            4 * B*H*T * packed_length(D, b)             packed codes
          + 4 * scale.size + 4 * centre.size            float32 statistics
          + K * (4 + itemsize of outlier_value)         int32 index + value per outlier
        """
        words = math.prod(self.shape[:-1]) * packed_length(self.shape[-1], self.bits) * 4
        stats = 4 * (self.scale.size + self.centre.size)
        sparse = self.num_outliers * (4 + self.outlier_value.dtype.itemsize)
        return int(words + stats + sparse)


def _sparse_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"sparse_dtype must be float32 or float16, got {dt}")
    return dt


def _check_outliers(outliers, shape) -> np.ndarray:
    """bool ``shape``: the outlier mask (all False if None)."""
    if outliers is None:
        return np.zeros(shape, dtype=bool)
    out = np.asarray(outliers)
    if out.dtype != np.bool_ or out.shape != shape:
        raise ValueError(f"outliers must be a bool array of shape {shape}, got "
                         f"{out.dtype} {out.shape}")
    return out


def quantize_nonuniform(x, levels, bits: int, group_size: int, axis: str, *, outliers=None,
                        exclude=None, sparse_dtype=np.float32) -> KVQuantTensor:
    """Dense-and-sparse quantization of ``x`` ``(B, H, T, D)`` on a grid (definition 8.7).

    1. *counted* = not excluded and not an outlier;
    2. groups as definition 2.5 (``axis`` "channel": ``G`` consecutive tokens
       of one channel; "token": ``G`` consecutive channels of one token); per
       group ``lo, hi`` = min, max of the counted elements (0, 0 if none) and
       ``s, c = normalisation(lo, hi)``;
    3. counted element: ``q = nearest_level(normalised(x, s, c), levels)``, or
       ``q = 0`` if ``s == 0``; every other element ``q = 0``;
    4. outliers (``outliers & ~excluded``) are stored sparse: ascending flat
       indices (int32) and values (``sparse_dtype``: float32 keeps them exactly,
       float16 rounds them to nearest).

    ``levels`` ``(..., n)`` with ``n = 2**bits`` broadcasts against
    ``x.shape + (n,)``; ``outliers`` None or bool ``(B, H, T, D)``;
    ``exclude`` None or bool ``(B, T)``.
    """
    x32 = check_bhtd("x", x)
    bits = check_bits(bits)
    lv = check_levels(levels, bits)
    try:
        np.broadcast_shapes(lv.shape[:-1], x32.shape)
    except ValueError:
        raise ValueError(f"levels of shape {lv.shape} do not broadcast against x.shape + (n,)") from None
    group_size = check_group_size(group_size)
    if axis not in GROUP_AXIS:
        raise ValueError(f"axis={axis!r} is not allowed; choose one of {tuple(GROUP_AXIS)}")
    bsz, h, t, d = x32.shape
    excl = check_exclude_bt(exclude, bsz, t)
    excl4 = np.broadcast_to(excl[:, None, :, None], x32.shape)
    out = _check_outliers(outliers, x32.shape) & ~excl4
    sdt = _sparse_dtype(sparse_dtype)
    counted = ~excl4 & ~out
    gax = GROUP_AXIS[axis]
    n_axis = x32.shape[gax]
    lo, hi = group_min_max(split_groups(x32, group_size, gax, fill=0),
                           split_groups(counted, group_size, gax, fill=False), gax)
    s, c = normalisation(lo, hi)
    s_full = expand_groups(s, group_size, n_axis, gax)
    c_full = expand_groups(c, group_size, n_axis, gax)
    t_norm = normalised(np.where(counted, x32, c_full), s_full, c_full)
    q = nearest_level(t_norm, lv)
    codes = np.where(counted & (s_full != 0), q, 0).astype(np.uint8)
    index = np.flatnonzero(out)
    if index.size and index[-1] >= 2 ** 31:
        raise ValueError("x is too large for int32 outlier indices (>= 2**31 elements)")
    return KVQuantTensor(codes=codes, scale=s, centre=c, levels=lv, outlier_index=index.astype(np.int32),
                         outlier_value=x32.reshape(-1)[index].astype(sdt), bits=bits,
                         group_size=group_size, axis=axis, shape=tuple(x32.shape))


def dequantize_nonuniform(qt: KVQuantTensor) -> np.ndarray:
    """float32 ``qt.shape``: ``fl32(fl32(l_q * s) + c)``, then the outliers written back exactly.

    Excluded slots hold the placeholder ``l_0 * s + c`` of their group (0 for
    an empty group); callers read preserved tokens from their own store.
    """
    if not isinstance(qt, KVQuantTensor):
        raise TypeError(f"qt must be a KVQuantTensor, got {type(qt).__name__}")
    gax = GROUP_AXIS[qt.axis]
    n = qt.shape[gax]
    s_full = expand_groups(qt.scale, qt.group_size, n, gax)
    c_full = expand_groups(qt.centre, qt.group_size, n, gax)
    xh = level_dequantize(qt.codes, qt.levels, s_full, c_full)
    flat = xh.reshape(-1)
    flat[qt.outlier_index.astype(np.intp)] = qt.outlier_value.astype(_F32)
    return flat.reshape(qt.shape)
