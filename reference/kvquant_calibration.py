"""KVQuant, definitions 8.8 - 8.9: sensitivity-weighted k-means and calibration (docs/08-kvquant.md).

* 8.8 :func:`kmeans_init`, :func:`kmeans_assign`, :func:`kmeans_objective`,
  :func:`kmeans_levels`: the "kmeans" datatype's levels, fitted in float64 and
  rounded to float32 at the end;
* 8.9 :class:`KVQuantCalibration` (what one layer needs: key outlier
  thresholds and the levels), :func:`calibrate_kvquant`, :func:`nf_calibration`,
  and :func:`check_kvquant_config` (the config a KVQuant function accepts).

(Split from ``reference.kvquant``, which re-exports these names.)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from .config import KVSinkConfig
from .kvquant_levels import nf_levels, normalisation, normalised
from .kvquant_tensor import (check_exclude_bt, check_kv_pair, key_outlier_thresholds,
                             key_outliers, value_outliers)
from .packing import check_bits
from .quantize import GROUP_AXIS, expand_groups, group_min_max, split_groups

__all__ = ["kmeans_init", "kmeans_assign", "kmeans_objective", "kmeans_levels",
           "KVQuantCalibration", "check_kvquant_config", "calibrate_kvquant", "nf_calibration",
           "DATATYPES", "KMEANS_MAX_ITER"]

_F32 = np.float32
#: The non-uniform datatypes (``KVSinkConfig.kvquant_datatype``).
DATATYPES = ("nf", "kmeans")
#: Default iteration cap of :func:`kmeans_levels`.
KMEANS_MAX_ITER = 100


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


def check_kvquant_config(config) -> KVSinkConfig:
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
    config = check_kvquant_config(config)
    k, v = check_kv_pair("keys", keys, values)
    bsz, h, t, d = k.shape
    excl = check_exclude_bt(exclude, bsz, t)
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
    config = check_kvquant_config(config)
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
