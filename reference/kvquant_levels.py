"""KVQuant, definitions 8.2 - 8.4: the level grid and group normalisation (docs/08-kvquant.md).

* 8.2 :func:`nf_levels`, the normal-float grid of ``2**b`` levels in ``[-1, 1]``;
* 8.3 :func:`level_boundaries`, :func:`nearest_level` (ties to the lower level);
* 8.4 :func:`normalisation`, :func:`normalised`, :func:`level_dequantize`
  (a group mapped to ``[-1, 1]`` by its centre ``c`` and half-width ``s``).

``levels`` are float32, sorted, last axis ``n = 2**b``; codes are uint8 in
``[0, n)``.  Numerics: IEEE float32, each operation rounded separately.
(Split from ``reference.kvquant``, which re-exports these names.)
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Optional, Tuple

import numpy as np

from .packing import check_bits

__all__ = ["nf_levels", "check_levels", "level_boundaries", "nearest_level",
           "normalisation", "normalised", "level_dequantize"]

_F32 = np.float32


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

def check_levels(levels, bits: Optional[int] = None) -> np.ndarray:
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
    lv = check_levels(levels)
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
