"""KVQuant-style quantization, the specification (docs/08-kvquant.md).

KVQuant (Hooper et al., 2024) quantizes the KV cache with four ideas, all
defined here, one small function per definition:

=====  ==============================================  ==========================================
 def   concept                                         function
=====  ==============================================  ==========================================
 8.1   rotary embedding (Llama / transformers)         :func:`rope_inv_freq`, :func:`rope_angles`,
                                                       :func:`rope_cos_sin`, :func:`rotate_half`,
                                                       :func:`apply_rope`, :func:`unapply_rope`,
                                                       :func:`rope_roundtrip_bound`
 8.2   normal-float grid ("nf")                        :func:`nf_levels`
 8.3   nearest level, ties to the lower level          :func:`level_boundaries`, :func:`nearest_level`
 8.4   group normalisation to [-1, 1]                  :func:`normalisation`, :func:`normalised`,
                                                       :func:`level_dequantize`
 8.5   outlier counts and key thresholds               :func:`outlier_count`,
                                                       :func:`key_outlier_thresholds`, :func:`key_outliers`
 8.6   per-token value outliers                        :func:`value_outliers`
 8.7   dense-and-sparse tensor                         :class:`KVQuantTensor`, :func:`quantize_nonuniform`,
                                                       :func:`dequantize_nonuniform`
 8.8   sensitivity-weighted k-means ("kmeans")         :func:`kmeans_init`, :func:`kmeans_assign`,
                                                       :func:`kmeans_objective`, :func:`kmeans_levels`
 8.9   calibration of one layer                        :class:`KVQuantCalibration`, :func:`calibrate_kvquant`
 8.10  one block of the cache; fake quantization       :class:`KVQuantBlock`, :func:`quantize_block_kvquant`,
                                                       :func:`dequantize_block_kvquant`,
                                                       :func:`fake_quantize_kvquant`
=====  ==============================================  ==========================================

Numerics: as docs/02-quantization.md, every quantization operation is IEEE
float32 (inputs cast to float32 first, float64 rounded), each operation
rounded separately (no FMA), divisions correctly rounded.  The k-means fit
runs in float64 and its levels are rounded to float32 at the end.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from statistics import NormalDist
from typing import Optional, Tuple

import numpy as np

from .config import KVSinkConfig
from .packing import check_bits, pack_codes, packed_length
from .quantize import GROUP_AXIS, _check_group_size, _check_x, expand_groups, group_min_max, split_groups

__all__ = [
    "rope_inv_freq", "rope_angles", "rope_cos_sin", "rotate_half", "apply_rope", "unapply_rope",
    "rope_roundtrip_bound",
    "nf_levels", "level_boundaries", "nearest_level",
    "normalisation", "normalised", "level_dequantize",
    "outlier_count", "key_outlier_thresholds", "key_outliers", "value_outliers",
    "KVQuantTensor", "quantize_nonuniform", "dequantize_nonuniform",
    "kmeans_init", "kmeans_assign", "kmeans_objective", "kmeans_levels",
    "KVQuantCalibration", "calibrate_kvquant", "nf_calibration",
    "KVQuantBlock", "quantize_block_kvquant", "dequantize_block_kvquant", "fake_quantize_kvquant",
    "DATATYPES", "KMEANS_MAX_ITER", "MAX_POSITION",
]

_F32 = np.float32
U32 = 2.0 ** -24            # float32 unit roundoff
ETA32 = 2.0 ** -149         # smallest float32 subnormal
#: The non-uniform datatypes (``KVSinkConfig.kvquant_datatype``).
DATATYPES = ("nf", "kmeans")
#: Default iteration cap of :func:`kmeans_levels`.
KMEANS_MAX_ITER = 100
#: Positions must be < 2**24 so that they are exact in float32 (definition 8.1).
MAX_POSITION = 1 << 24


# =========================================================================== 8.1 RoPE

def rope_inv_freq(head_dim: int, base: float = 10000.0) -> np.ndarray:
    """Inverse frequencies of the rotary embedding (definition 8.1), float32 ``(D/2,)``.

    ``inv_freq[i] = fl32(base ** (-2 i / D))``, ``i = 0 .. D/2 - 1``, evaluated in
    float64 and rounded once.  transformers computes the same quantity in
    float32 (``1 / base ** (arange(0, D, 2) / D)``), which may differ in the
    last bit: to invert a model's rotation pass *the model's* buffer
    (``model.model.rotary_emb.inv_freq``) as ``inv_freq``.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) \
            or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not math.isfinite(base) \
            or base <= 1:
        raise ValueError(f"base must be a finite number > 1 (rope_theta), got {base!r}")
    i = np.arange(0, head_dim, 2, dtype=np.float64)
    return (float(base) ** (-i / head_dim)).astype(_F32)


def _check_inv_freq(inv_freq, head_dim: int) -> np.ndarray:
    f = np.asarray(inv_freq)
    if f.dtype.kind != "f":
        raise TypeError(f"inv_freq must be a float array (D/2,), got dtype {f.dtype}")
    if f.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must have shape (D/2,) = ({head_dim // 2},), got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("inv_freq contains NaN or Inf")
    return f.astype(_F32)


def _check_positions(positions) -> np.ndarray:
    p = np.asarray(positions)
    if p.dtype == np.bool_ or p.dtype.kind not in "ui":
        raise TypeError(f"positions must be an integer array, got dtype {p.dtype}")
    if p.size and (p.min() < 0 or p.max() >= MAX_POSITION):
        raise ValueError(f"positions must lie in [0, 2**24) (exact in float32); got values in "
                         f"[{p.min()}, {p.max()}]; empty slots (-1) must not be rotated")
    return p.astype(np.int64)


def rope_angles(positions, inv_freq) -> np.ndarray:
    """``theta[..., t, i] = fl32(float32(pos_t) * inv_freq[i])``, float32 ``(*positions.shape, D/2)``.

    ``pos`` is exact in float32 (``pos < 2**24``); the product is one rounded
    float32 multiplication, exactly as transformers' ``LlamaRotaryEmbedding``.
    """
    p = _check_positions(positions)
    f = np.asarray(inv_freq, dtype=_F32)
    return (p.astype(_F32)[..., None] * f).astype(_F32)


def rope_cos_sin(positions, inv_freq) -> Tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` float32 ``(*positions.shape, D)``: ``fl32(cos(theta))``, ``fl32(sin(theta))``
    evaluated in float64 and rounded once, each half repeated (``emb = cat(theta, theta)``).
    """
    theta = rope_angles(positions, inv_freq).astype(np.float64)
    emb = np.concatenate([theta, theta], axis=-1)
    return np.cos(emb).astype(_F32), np.sin(emb).astype(_F32)


def rotate_half(x) -> np.ndarray:
    """``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])`` (Llama convention); exact."""
    x = np.asarray(x)
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _rope_inputs(x, positions, inv_freq):
    x32 = _check_x(x)
    d = x32.shape[-1]
    if d % 2:
        raise ValueError(f"x: the head dimension D={d} must be even for RoPE")
    f = _check_inv_freq(inv_freq, d)
    p = _check_positions(positions)
    try:
        np.broadcast_shapes(p.shape, x32.shape[:-1])
    except ValueError:
        raise ValueError(f"positions of shape {p.shape} do not broadcast against x.shape[:-1]="
                         f"{x32.shape[:-1]}; for keys (B, H, T, D) pass positions[:, None, :]") from None
    cos, sin = rope_cos_sin(p, f)
    return x32, cos, sin


def apply_rope(x, positions, inv_freq) -> np.ndarray:
    """Rotate by ``+theta`` (definition 8.1): ``fl32(fl32(x * cos) + fl32(rotate_half(x) * sin))``.

    Parameters
    ----------
    x : float ``(..., T, D)``, ``D`` even (cast to float32).
    positions : int ``>= 0``, broadcastable to ``x.shape[:-1]`` (e.g. ``(T,)``,
        or ``(B, 1, T)`` for keys ``(B, H, T, D)``).
    inv_freq : float ``(D/2,)`` (:func:`rope_inv_freq` or the model's buffer).

    Channels ``i`` and ``i + D/2`` form one rotated pair ``(a, b)``:
    ``a' = a cos - b sin``, ``b' = b cos + a sin``.
    """
    x32, cos, sin = _rope_inputs(x, positions, inv_freq)
    return ((x32 * cos).astype(_F32) + (rotate_half(x32) * sin).astype(_F32)).astype(_F32)


def unapply_rope(x, positions, inv_freq) -> np.ndarray:
    """Rotate by ``-theta``: ``fl32(fl32(x * cos) - fl32(rotate_half(x) * sin))``.

    Recovers pre-RoPE keys from post-RoPE keys;
    ``|unapply_rope(apply_rope(x)) - x| <= rope_roundtrip_bound(x)``
    (definition 8.1), also when ``apply`` used transformers' float32
    ``cos``/``sin`` (faithfully rounded, <= 1 ulp) instead of ours.
    """
    x32, cos, sin = _rope_inputs(x, positions, inv_freq)
    return ((x32 * cos).astype(_F32) - (rotate_half(x32) * sin).astype(_F32)).astype(_F32)


def rope_roundtrip_bound(x) -> np.ndarray:
    """Bound of ``|unapply_rope(apply_rope(x)) - x|``, float64 ``x.shape`` (definition 8.1).

    ``10 u (|a| + |b|) + 8 eta`` for both elements of each pair ``(a, b)`` =
    ``(x[..., i], x[..., i + D/2])``, ``u = 2**-24``, ``eta = 2**-149``.
    Derived in docs/08-kvquant.md §8.1 (``(4 + 4 sqrt 2) u = 9.66 u`` at first order).
    """
    x64 = np.abs(np.asarray(x, dtype=np.float64))
    h = x64.shape[-1] // 2
    pair = x64[..., :h] + x64[..., h:]
    pair = np.concatenate([pair, pair], axis=-1)
    return 10 * U32 * pair + 8 * ETA32


# =========================================================================== 8.2 nf grid

def nf_levels(bits: int) -> np.ndarray:
    """The normal-float grid of ``n = 2**b`` levels in ``[-1, 1]`` (definition 8.2), float32 ``(n,)``.

    .. math::  z_k = \\Phi^{-1}\\left(\\frac{k + 1/2}{n}\\right), \\quad
               \\ell_k = \\mathrm{fl32}(z_k / z_{n-1}), \\quad k = 0 .. n-1

    The quantiles of the standard normal at the centres of ``n`` equal-probability
    bins, scaled so that ``l_0 = -1`` and ``l_{n-1} = 1`` exactly; symmetric
    (``l_k = -l_{n-1-k}``), strictly increasing, no level at 0.  ``Phi^{-1}``
    is ``statistics.NormalDist().inv_cdf`` (float64); the quotient is float64,
    rounded to float32 once.  ``bits`` in 1..8 (``b = 1`` gives ``[-1, 1]``).

    >>> nf_levels(2).tolist()                     # doctest: +ELLIPSIS
    [-1.0, -0.27699..., 0.27699..., 1.0]
    """
    bits = check_bits(bits)
    n = 1 << bits
    nd = NormalDist()
    z = np.array([nd.inv_cdf((k + 0.5) / n) for k in range(n)], dtype=np.float64)
    levels = (z / z[-1]).astype(_F32)
    # exact symmetry (inv_cdf is symmetric to the last bit in practice; make it a definition)
    levels = np.where(np.arange(n) < n // 2, -levels[::-1], levels).astype(_F32)
    return levels


# =========================================================================== 8.3 nearest level

def _check_levels(levels, bits: Optional[int] = None) -> np.ndarray:
    lv = np.asarray(levels)
    if lv.dtype.kind != "f":
        raise TypeError(f"levels must be a float array (..., n), got dtype {lv.dtype}")
    if lv.ndim < 1 or lv.shape[-1] < 2:
        raise ValueError(f"levels must have shape (..., n) with n >= 2, got {lv.shape}")
    lv = lv.astype(_F32)
    if not np.all(np.isfinite(lv)) or np.any(np.abs(lv) > 1):
        raise ValueError("levels must be finite and lie in [-1, 1]")
    if np.any(np.diff(lv, axis=-1) < 0):
        raise ValueError("levels must be sorted in non-decreasing order along the last axis")
    if bits is not None and lv.shape[-1] != 1 << bits:
        raise ValueError(f"levels has {lv.shape[-1]} entries along its last axis, but bits={bits} "
                         f"needs 2**bits = {1 << bits}")
    return lv


def level_boundaries(levels) -> np.ndarray:
    """Decision boundaries ``beta_k = fl32(fl32(l_k + l_{k+1}) / 2)``, float32 ``(..., n-1)`` (definition 8.3)."""
    lv = _check_levels(levels)
    return ((lv[..., :-1] + lv[..., 1:]).astype(_F32) / _F32(2)).astype(_F32)


def nearest_level(t, levels) -> np.ndarray:
    """Index of the nearest level, uint8 ``t.shape`` (definition 8.3).

    .. math::  q = \\#\\{k : t > \\beta_k\\}

    with the boundaries of :func:`level_boundaries`.  A value exactly on a
    boundary goes to the **lower** level (ties toward -inf); values below
    ``l_0`` or above ``l_{n-1}`` go to the end levels.  ``levels`` is ``(n,)``
    or any ``(..., n)`` whose leading axes broadcast against ``t.shape``.
    """
    beta = level_boundaries(levels)
    t = np.asarray(t, dtype=_F32)
    return (t[..., None] > beta).sum(axis=-1).astype(np.uint8)


# =========================================================================== 8.4 normalisation

def normalisation(lo, hi) -> Tuple[np.ndarray, np.ndarray]:
    """Half-range and centre of a group (definition 8.4), float32.

    ``s = fl32(fl32(hi - lo) / 2)``, ``c = fl32(lo + s)``.  ``s = 0`` exactly
    when ``hi == lo`` (then ``c = lo``).  Raises ``ValueError`` naming ``x``
    if ``hi - lo`` or ``c + s`` overflows float32.
    """
    lo = np.asarray(lo, dtype=_F32)
    hi = np.asarray(hi, dtype=_F32)
    with np.errstate(over="ignore"):
        width = (hi - lo).astype(_F32)
        s = (width / _F32(2)).astype(_F32)
        c = (lo + s).astype(_F32)
        top = (c + s).astype(_F32)
    if not np.all(np.isfinite(width)) or not np.all(np.isfinite(top)):
        raise ValueError("x: a group's dense range max - min overflows float32; rescale x")
    return s, c


def normalised(x, s, c) -> np.ndarray:
    """``t = fl32(fl32(x - c) / s)``, ``t = 0`` where ``s == 0`` (definition 8.4), float32 broadcast shape.

    For a dense element of its group, ``t`` lies in ``[-1, 1]`` up to a few ulps.
    """
    diff = (np.asarray(x, dtype=_F32) - c).astype(_F32)
    out = np.zeros(np.broadcast(diff, s).shape, dtype=_F32)
    np.divide(diff, s, out=out, where=(s != 0))
    return out


def level_dequantize(q, levels, s, c) -> np.ndarray:
    """``x_hat = fl32(fl32(l_q * s) + c)`` (definition 8.4), two roundings, no FMA.

    ``levels`` ``(..., n)`` broadcasts against ``q.shape + (n,)``.
    """
    q = np.asarray(q)
    lv = np.broadcast_to(np.asarray(levels, dtype=_F32), q.shape + (np.shape(levels)[-1],))
    lq = np.take_along_axis(lv, q[..., None].astype(np.intp), axis=-1)[..., 0]
    return ((lq * s).astype(_F32) + c).astype(_F32)


# =========================================================================== 8.5 key outliers

def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not (0 <= float(fraction) < 0.5):
        raise ValueError(f"outlier_fraction must be a number in [0, 0.5), got {fraction!r}")
    return float(fraction)


def outlier_count(fraction: float, n: int) -> int:
    """Number of outliers among ``n`` entries (definition 8.5): ``rint(fraction * n)``.

    The product is float64; ``rint`` rounds half to even (``0.5 -> 0``,
    ``1.5 -> 2``).  ``fraction`` in ``[0, 0.5)``, ``n >= 0``.
    """
    f = _check_fraction(fraction)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return int(np.rint(f * int(n)))


def _check_exclude_bt(exclude, b: int, t: int) -> np.ndarray:
    if exclude is None:
        return np.zeros((b, t), dtype=bool)
    e = np.asarray(exclude)
    if e.dtype != np.bool_:
        raise TypeError(f"exclude must be a bool array (B, T), got dtype {e.dtype}")
    if e.shape != (b, t):
        raise ValueError(f"exclude must have shape (B, T) = {(b, t)}, got {e.shape}")
    return e


def _check_bhtd(name: str, x) -> np.ndarray:
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


def _check_kv_pair(keys_name: str, keys, values) -> Tuple[np.ndarray, np.ndarray]:
    """Keys and values as :func:`_check_bhtd` arrays of one shape, errors naming ``keys_name``."""
    k = _check_bhtd(keys_name, keys)
    v = _check_bhtd("values", values)
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
    x = _check_bhtd("keys", keys)
    f = _check_fraction(fraction)
    bsz, h, t, d = x.shape
    excl = _check_exclude_bt(exclude, bsz, t)
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
    x = _check_bhtd("keys", keys)
    bsz, h, t, d = x.shape
    excl = _check_exclude_bt(exclude, bsz, t)
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
    x = _check_bhtd("values", values)
    f = _check_fraction(fraction)
    bsz, h, t, d = x.shape
    excl = _check_exclude_bt(exclude, bsz, t)
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
    x32 = _check_bhtd("x", x)
    bits = check_bits(bits)
    lv = _check_levels(levels, bits)
    try:
        np.broadcast_shapes(lv.shape[:-1], x32.shape)
    except ValueError:
        raise ValueError(f"levels of shape {lv.shape} do not broadcast against x.shape + (n,)") from None
    group_size = _check_group_size(group_size)
    if axis not in GROUP_AXIS:
        raise ValueError(f"axis={axis!r} is not allowed; choose one of {tuple(GROUP_AXIS)}")
    bsz, h, t, d = x32.shape
    excl = _check_exclude_bt(exclude, bsz, t)
    excl4 = np.broadcast_to(excl[:, None, :, None], x32.shape)
    if outliers is None:
        out = np.zeros(x32.shape, dtype=bool)
    else:
        out = np.asarray(outliers)
        if out.dtype != np.bool_ or out.shape != x32.shape:
            raise ValueError(f"outliers must be a bool array of shape {x32.shape}, got "
                             f"{out.dtype} {out.shape}")
    sdt = _sparse_dtype(sparse_dtype)
    out = out & ~excl4
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


# =========================================================================== 8.8 weighted k-means

def _check_points(points, weights):
    p = np.asarray(points)
    w = np.asarray(weights)
    if p.dtype.kind != "f":
        raise TypeError(f"points must be a float array (..., M), got dtype {p.dtype}")
    if w.dtype.kind != "f":
        raise TypeError(f"weights must be a float array (..., M), got dtype {w.dtype}")
    if p.ndim < 1 or p.shape != w.shape:
        raise ValueError(f"points and weights must have the same shape (..., M), got {p.shape} "
                         f"and {w.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("points contains NaN or Inf")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0 (squared gradients)")
    return p.astype(np.float64), w.astype(np.float64)


def kmeans_init(points, weights, n: int) -> np.ndarray:
    """Initial levels: weighted quantiles at ``(k + 1/2) / n`` (definition 8.8), float64 ``(..., n)``.

    Per row, sort the points ascending (stable: ties keep index order), let
    ``W_j`` be the cumulative weight of the first ``j + 1`` sorted points and
    ``W = W_{M-1}``; level ``k`` is the first sorted point with
    ``W_j >= (k + 1/2) / n * W``.  Rows with ``W = 0`` get the nf grid.
    """
    p, w = _check_points(points, weights)
    order = np.argsort(p, axis=-1, kind="stable")
    ps = np.take_along_axis(p, order, axis=-1)
    cw = np.cumsum(np.take_along_axis(w, order, axis=-1), axis=-1)
    total = cw[..., -1:]
    targets = (np.arange(n, dtype=np.float64) + 0.5) / n * total        # (..., n)
    idx = np.empty(targets.shape, dtype=np.intp)
    for row in np.ndindex(p.shape[:-1]):
        idx[row] = np.searchsorted(cw[row], targets[row], side="left")
    idx = np.minimum(idx, p.shape[-1] - 1)
    init = np.take_along_axis(ps, idx, axis=-1)
    if n < 2 or n & (n - 1):
        raise ValueError(f"n must be 2**bits with bits in 1..8, got {n}")
    grid = nf_levels(n.bit_length() - 1).astype(np.float64)
    return np.where(total > 0, init, grid)


def kmeans_assign(points, levels) -> np.ndarray:
    """Cluster of each point, int64 ``(..., M)``: ``#{k : x > (l_k + l_{k+1}) / 2}`` in float64
    (nearest level, ties to the lower level; definition 8.8)."""
    p = np.asarray(points, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.float64)
    beta = (lv[..., :-1] + lv[..., 1:]) / 2
    return (p[..., :, None] > beta[..., None, :]).sum(axis=-1)


def kmeans_objective(points, weights, levels) -> np.ndarray:
    """Weighted squared error ``sum_i w_i (x_i - l_{a(i)})**2`` per row, float64 ``(...)`` (definition 8.8)."""
    p, w = _check_points(points, weights)
    lv = np.asarray(levels, dtype=np.float64)
    a = kmeans_assign(p, lv)
    return (w * (p - np.take_along_axis(lv, a, axis=-1)) ** 2).sum(axis=-1)


def kmeans_levels(points, weights, bits: int, *, max_iter: int = KMEANS_MAX_ITER,
                  return_history: bool = False):
    """Sensitivity-weighted 1-D k-means (Lloyd), deterministic (definition 8.8).

    Parameters
    ----------
    points : float ``(..., M)``, normalised entries (in ``[-1, 1]``); one fit per row.
    weights : float ``(..., M)``, ``>= 0``; weight 0 removes a point.
    bits : ``n = 2**bits`` levels, 1..8.
    max_iter : int >= 0, iteration cap.

    Algorithm (float64): ``l = kmeans_init``; repeat ``max_iter`` times:
    ``a = kmeans_assign(x, l)``; for each cluster ``k`` with total weight
    ``> 0``, ``l_k = sum w x / sum w`` over its points, an empty cluster keeps
    its level; stop early when no level changed.  Returns float32 ``(..., n)``
    (the float64 levels rounded once, then clipped to ``[-1, 1]``: a normalised
    point may exceed 1 by a few ulps, definition 8.4), sorted; with ``return_history`` also the
    objective ``(iterations + 1, ...)`` after the initialisation and each step,
    which is non-increasing (Lloyd's property; up to float64 rounding).
    """
    bits = check_bits(bits)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    p, w = _check_points(points, weights)
    n = 1 << bits
    lv = kmeans_init(p, w, n)
    history = [kmeans_objective(p, w, lv)]
    for _ in range(int(max_iter)):
        a = kmeans_assign(p, lv)
        onehot = a[..., None] == np.arange(n)                       # (..., M, n)
        wsum = (w[..., None] * onehot).sum(axis=-2)                 # (..., n)
        xsum = ((w * p)[..., None] * onehot).sum(axis=-2)
        new = np.where(wsum > 0, xsum / np.where(wsum > 0, wsum, 1.0), lv)
        changed = bool(np.any(new != lv))
        lv = new
        history.append(kmeans_objective(p, w, lv))
        if not changed:
            break
    out = np.clip(lv.astype(_F32), _F32(-1), _F32(1))
    if return_history:
        return out, np.stack(history)
    return out


# =========================================================================== 8.9 calibration

@dataclass(frozen=True, eq=False)
class KVQuantCalibration:
    """What one layer needs to quantize KVQuant-style (definition 8.9).

    key_lower, key_upper : float32 ``(H, D)`` per-channel key outlier thresholds
        (``-inf``/``+inf`` when ``outlier_fraction == 0``).
    key_levels : float32 ``(n_k,)`` (nf) or ``(H, D, n_k)`` (kmeans), ``n_k = 2**key_bits``.
    value_levels : float32 ``(n_v,)`` (nf) or ``(H, n_v)`` (kmeans).
    datatype, key_bits, value_bits, outlier_fraction, key_group_size,
    value_group_size : the settings it was made for (checked against the config).
    """

    key_lower: np.ndarray
    key_upper: np.ndarray
    key_levels: np.ndarray
    value_levels: np.ndarray
    datatype: str
    key_bits: int
    value_bits: int
    outlier_fraction: float
    key_group_size: int
    value_group_size: int

    @property
    def nbytes(self) -> int:
        """Bytes held per layer: float32 thresholds, plus the codebooks for "kmeans"
        (the nf grid is a constant of the format: 0 bytes)."""
        n = 4 * (self.key_lower.size + self.key_upper.size)
        if self.datatype == "kmeans":
            n += 4 * (self.key_levels.size + self.value_levels.size)
        return int(n)

    def key_levels_for(self) -> np.ndarray:
        """``key_levels`` shaped to broadcast against ``(B, H, T, D, n)``."""
        lv = self.key_levels
        return lv if lv.ndim == 1 else lv[:, None, :, :]

    def value_levels_for(self) -> np.ndarray:
        """``value_levels`` shaped to broadcast against ``(B, H, T, D, n)``."""
        lv = self.value_levels
        return lv if lv.ndim == 1 else lv[:, None, None, :]

    def check(self, config: KVSinkConfig, num_heads: int, head_dim: int) -> None:
        """Raise ``ValueError`` naming ``calibration`` if it was made for other settings."""
        want = dict(datatype=config.kvquant_datatype, key_bits=config.key_bits,
                    value_bits=config.value_bits, outlier_fraction=float(config.outlier_fraction),
                    key_group_size=config.key_group_size, value_group_size=config.value_group_size)
        for name, v in want.items():
            if getattr(self, name) != v:
                raise ValueError(f"calibration was made for {name}={getattr(self, name)!r} but the "
                                 f"config has {v!r}; calibrate again with this config")
        if self.key_lower.shape != (num_heads, head_dim):
            raise ValueError(f"calibration is for (H, D) = {self.key_lower.shape}, the keys have "
                             f"{(num_heads, head_dim)}")


def _check_kvquant_config(config) -> KVSinkConfig:
    if not isinstance(config, KVSinkConfig):
        raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
    if config.quantizer != "kvquant":
        raise ValueError(f"config.quantizer={config.quantizer!r}; set quantizer='kvquant'")
    if config.key_axis != "channel" or config.value_axis != "token":
        raise ValueError(f"the kvquant quantizer groups keys per channel and values per token; got "
                         f"key_axis={config.key_axis!r}, value_axis={config.value_axis!r}")
    return config


def _normalised_calibration(x, outl, excl, bits, group_size, axis):
    """(t, s_full, counted) of the calibration data under definition 8.7's grouping."""
    counted = ~np.broadcast_to(excl[:, None, :, None], x.shape) & ~outl
    gax = GROUP_AXIS[axis]
    lo, hi = group_min_max(split_groups(x, group_size, gax, fill=0),
                           split_groups(counted, group_size, gax, fill=False), gax)
    s, c = normalisation(lo, hi)
    s_full = expand_groups(s, group_size, x.shape[gax], gax)
    c_full = expand_groups(c, group_size, x.shape[gax], gax)
    t = normalised(np.where(counted, x, c_full), s_full, c_full)
    return t, s_full, counted


def _check_fisher(name, fisher, shape):
    if fisher is None:
        raise ValueError(f"{name} is required for kvquant_datatype='kmeans' (squared gradients, "
                         f"shape {shape}); accelerated.kvquant.fisher_weights computes it")
    f = np.asarray(fisher)
    if f.dtype.kind != "f" or f.shape != shape:
        raise ValueError(f"{name} must be a float array of shape {shape}, got {f.dtype} {f.shape}")
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(f"{name} must be finite and >= 0")
    return f.astype(np.float64)


def calibrate_kvquant(keys, values, config: KVSinkConfig, *, exclude=None, key_fisher=None,
                      value_fisher=None, max_iter: int = KMEANS_MAX_ITER) -> KVQuantCalibration:
    """Calibrate one layer (definition 8.9).

    Parameters
    ----------
    keys : float ``(B, H, T, D)`` **pre-RoPE** calibration keys of the layer.
    values : float ``(B, H, T, D)``.
    config : ``KVSinkConfig`` with ``quantizer="kvquant"``.
    exclude : None or bool ``(B, T)``: preserved tokens (PFN / KVSink sets of
        the calibration text) and padding, left out of every statistic.
    key_fisher, value_fisher : float ``(B, H, T, D)`` >= 0, squared gradients of
        the loss w.r.t. the keys / values (needed for "kmeans" only).

    Steps: key thresholds (8.5); for "kmeans", normalise the calibration data
    as quantization will (8.7: key groups of ``key_group_size`` tokens per
    channel without the key outliers, value groups of ``value_group_size``
    channels per token without the value outliers) and fit, with weights
    ``F * s**2`` (so that the normalised objective equals ``sum F (x - x_hat)**2``):
    one codebook per key channel ``(h, d)`` over its counted entries, one per
    value head ``h`` over its counted entries.
    """
    config = _check_kvquant_config(config)
    k, v = _check_kv_pair("keys", keys, values)
    bsz, h, t, d = k.shape
    excl = _check_exclude_bt(exclude, bsz, t)
    frac = float(config.outlier_fraction)
    lower, upper = key_outlier_thresholds(k, frac, excl)
    if config.kvquant_datatype == "nf":
        key_levels, value_levels = nf_levels(config.key_bits), nf_levels(config.value_bits)
    else:
        kf = _check_fisher("key_fisher", key_fisher, k.shape)
        vf = _check_fisher("value_fisher", value_fisher, v.shape)
        tk, sk, ck = _normalised_calibration(k, key_outliers(k, lower, upper, excl), excl,
                                             config.key_bits, config.key_group_size, "channel")
        wk = np.where(ck, kf * sk.astype(np.float64) ** 2, 0.0)
        # rows (H, D), points over (B, T)
        pts = np.moveaxis(tk, (1, 3), (0, 1)).reshape(h, d, bsz * t)
        wts = np.moveaxis(wk, (1, 3), (0, 1)).reshape(h, d, bsz * t)
        key_levels = kmeans_levels(pts, wts, config.key_bits, max_iter=max_iter)
        tv, sv, cv = _normalised_calibration(v, value_outliers(v, frac, excl), excl,
                                             config.value_bits, config.value_group_size, "token")
        wv = np.where(cv, vf * sv.astype(np.float64) ** 2, 0.0)
        pts = np.moveaxis(tv, 1, 0).reshape(h, -1)
        wts = np.moveaxis(wv, 1, 0).reshape(h, -1)
        value_levels = kmeans_levels(pts, wts, config.value_bits, max_iter=max_iter)
    return KVQuantCalibration(key_lower=lower, key_upper=upper, key_levels=key_levels,
                              value_levels=value_levels, datatype=config.kvquant_datatype,
                              key_bits=config.key_bits, value_bits=config.value_bits,
                              outlier_fraction=frac, key_group_size=config.key_group_size,
                              value_group_size=config.value_group_size)


def nf_calibration(config: KVSinkConfig, num_heads: int, head_dim: int) -> KVQuantCalibration:
    """The calibration of ``datatype="nf"`` with ``outlier_fraction == 0``: needs no data."""
    config = _check_kvquant_config(config)
    if config.kvquant_datatype != "nf" or config.outlier_fraction != 0:
        raise ValueError("config: only kvquant_datatype='nf' with outlier_fraction=0 needs no "
                         "calibration data; use calibrate_kvquant")
    return KVQuantCalibration(key_lower=np.full((num_heads, head_dim), -np.inf, _F32),
                              key_upper=np.full((num_heads, head_dim), np.inf, _F32),
                              key_levels=nf_levels(config.key_bits),
                              value_levels=nf_levels(config.value_bits), datatype="nf",
                              key_bits=config.key_bits, value_bits=config.value_bits,
                              outlier_fraction=0.0, key_group_size=config.key_group_size,
                              value_group_size=config.value_group_size)



# =========================================================================== 8.10 block API

@dataclass(frozen=True, eq=False)
class KVQuantBlock:
    """One quantized block of a layer's cache (definition 8.10): ``keys`` (pre-RoPE) and ``values``,
    each a :class:`KVQuantTensor` ``(B, H, T, D)``; ``exclude`` bool ``(B, T)``."""

    keys: KVQuantTensor
    values: KVQuantTensor
    exclude: np.ndarray

    @property
    def nbytes(self) -> int:
        """``keys.nbytes + values.nbytes`` (the calibration is counted once per layer, apart)."""
        return self.keys.nbytes + self.values.nbytes


def quantize_block_kvquant(keys_pre_rope, values, calibration: Optional[KVQuantCalibration],
                           config: KVSinkConfig, *, exclude=None,
                           sparse_dtype=np.float32) -> KVQuantBlock:
    """Quantize one block of ``T`` tokens KVQuant-style (definition 8.10).

    Parameters
    ----------
    keys_pre_rope, values : float ``(B, H, T, D)``; keys **before** RoPE
        (:func:`unapply_rope` recovers them from post-RoPE keys).
    calibration : the layer's :class:`KVQuantCalibration`; ``None`` is
        allowed only for ``nf`` with ``outlier_fraction == 0``.
    config : ``KVSinkConfig`` (``quantizer="kvquant"``): ``key_bits``,
        ``value_bits``, ``key_group_size`` (tokens per key group),
        ``value_group_size`` (channels per value group), ``outlier_fraction``,
        ``kvquant_datatype``.
    exclude : None or bool ``(B, T)``: preserved and padding tokens — no
        statistic, no outlier, neutral code 0; the caller stores them.
    sparse_dtype : float32 (exact) or float16, storage of the outlier values.

    Keys: outliers = outside the calibrated per-channel thresholds (8.5);
    values: top ``outlier_count(p, H*D)`` per token (8.6); both then
    :func:`quantize_nonuniform` with the calibration's levels.
    """
    config = _check_kvquant_config(config)
    k, v = _check_kv_pair("keys_pre_rope", keys_pre_rope, values)
    bsz, h, t, d = k.shape
    excl = _check_exclude_bt(exclude, bsz, t)
    if calibration is None:
        calibration = nf_calibration(config, h, d)
    if not isinstance(calibration, KVQuantCalibration):
        raise TypeError(f"calibration must be a KVQuantCalibration, got {type(calibration).__name__}")
    calibration.check(config, h, d)
    k_out = key_outliers(k, calibration.key_lower, calibration.key_upper, excl)
    v_out = value_outliers(v, config.outlier_fraction, excl)
    kq = quantize_nonuniform(k, calibration.key_levels_for(), config.key_bits, config.key_group_size,
                             "channel", outliers=k_out, exclude=excl, sparse_dtype=sparse_dtype)
    vq = quantize_nonuniform(v, calibration.value_levels_for(), config.value_bits,
                             config.value_group_size, "token", outliers=v_out, exclude=excl,
                             sparse_dtype=sparse_dtype)
    return KVQuantBlock(keys=kq, values=vq, exclude=excl.copy())


def dequantize_block_kvquant(block: KVQuantBlock) -> Tuple[np.ndarray, np.ndarray]:
    """``(keys_pre_rope, values)`` float32 ``(B, H, T, D)`` of a block; excluded slots are placeholders."""
    if not isinstance(block, KVQuantBlock):
        raise TypeError(f"block must be a KVQuantBlock, got {type(block).__name__}")
    return dequantize_nonuniform(block.keys), dequantize_nonuniform(block.values)


def fake_quantize_kvquant(keys_pre_rope, values, calibration, config: KVSinkConfig, *,
                          preserved=None) -> Tuple[np.ndarray, np.ndarray]:
    """Quantize then dequantize a whole ``(B, H, T, D)`` block, preserved tokens returned exactly
    (the fake-quantization protocol of the perplexity table, definition 8.10)."""
    block = quantize_block_kvquant(keys_pre_rope, values, calibration, config, exclude=preserved)
    kh, vh = dequantize_block_kvquant(block)
    keep = block.exclude[:, None, :, None]
    return (np.where(keep, _check_bhtd("keys_pre_rope", keys_pre_rope), kh).astype(_F32),
            np.where(keep, _check_bhtd("values", values), vh).astype(_F32))
