"""KVQuant's calibration (definitions 8.8-8.9), torch twin of ``reference/kvquant_calibration.py``.

``kmeans_levels`` sums in float64 in another order than numpy: the levels
agree to float64 rounding (``<= M * 2**-53`` relative per mean), hence to the
last float32 bit except near a float32 rounding boundary (docs/08-kvquant.md
§8.11).  Only here: :func:`calibrate_kvquant_layers` (every layer in one batch)
and :func:`fisher_weights` (squared gradients of the loss w.r.t. every layer's
pre-RoPE keys and values, by autograd).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

from reference import kvquant as _ref
from reference.config import KVSinkConfig
from reference.packing import check_bits

from .kvquant_levels import nf_levels, normalisation, normalised
from .kvquant_tensor import (GROUP_AXIS, check_exclude_bt, check_kv_pair, key_outlier_mask,
                             key_outlier_thresholds, value_outlier_mask)
from .quantize import expand_groups, group_min_max, split_groups

__all__ = ["kmeans_init", "kmeans_assign", "kmeans_objective", "kmeans_levels", "KVQuantCalibration",
           "check_kvquant_config", "calibrate_kvquant", "nf_calibration", "DATATYPES", "KMEANS_MAX_ITER",
           # accelerated only
           "calibrate_kvquant_layers", "fisher_weights", "attention_modules"]

_F32 = torch.float32
_F64 = torch.float64
KMEANS_MAX_ITER = _ref.KMEANS_MAX_ITER
DATATYPES = _ref.DATATYPES
check_kvquant_config = _ref.check_kvquant_config   # the reference's check


# =========================================================================== 8.8 k-means

def _check_points(points, weights):
    for name, a in (("points", points), ("weights", weights)):
        if not isinstance(a, torch.Tensor) or not a.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor (..., M)")
    if points.ndim < 1 or points.shape != weights.shape:
        raise ValueError(f"points and weights must have the same shape (..., M), got "
                         f"{tuple(points.shape)} and {tuple(weights.shape)}")
    p, w = points.to(_F64), weights.to(_F64)
    if not bool(torch.isfinite(p).all()):
        raise ValueError("points contains NaN or Inf")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and >= 0 (squared gradients)")
    return p, w


def kmeans_init(points: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Weighted quantiles at ``(k + 1/2) / n`` (definition 8.8), float64 ``(..., n)``."""
    p, w = _check_points(points, weights)
    return _kmeans_init(p, w, n)


def _kmeans_init(p, w, n, sorted_=None):
    if n < 2 or n & (n - 1):
        raise ValueError(f"n must be 2**bits with bits in 1..8, got {n}")
    if sorted_ is None:
        ps, order = torch.sort(p, dim=-1, stable=True)
        cw = torch.cumsum(torch.gather(w, -1, order), dim=-1)
    else:
        ps, cw = sorted_
    total = cw[..., -1:]
    targets = (torch.arange(n, dtype=_F64, device=p.device) + 0.5) / n * total
    idx = torch.searchsorted(cw.contiguous(), targets.contiguous(), right=False)
    idx = idx.clamp_(max=p.shape[-1] - 1)
    init = torch.gather(ps, -1, idx)
    grid = nf_levels(n.bit_length() - 1, p.device).to(_F64)
    return torch.where(total > 0, init, grid)


def kmeans_assign(points: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``#{k : x > (l_k + l_{k+1}) / 2}`` in float64, int64 ``(..., M)`` (definition 8.8)."""
    lv = levels.to(_F64)
    beta = ((lv[..., :-1] + lv[..., 1:]) / 2).contiguous()
    p = points.to(_F64)
    if beta.ndim == 1:
        return torch.searchsorted(beta, p.contiguous(), right=False)
    return torch.searchsorted(beta, p.expand(beta.shape[:-1] + p.shape[-1:]).contiguous(), right=False)


def kmeans_objective(points: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i (x_i - l_{a(i)})**2`` per row, float64."""
    p, w = _check_points(points, weights)
    lv = levels.to(_F64)
    a = kmeans_assign(p, lv)
    return (w * (p - torch.gather(lv.expand(p.shape[:-1] + lv.shape[-1:]), -1, a)) ** 2).sum(-1)


def kmeans_levels(points: torch.Tensor, weights: torch.Tensor, bits: int, *,
                  max_iter: int = KMEANS_MAX_ITER, return_history: bool = False):
    """Sensitivity-weighted 1-D Lloyd k-means, batched over leading axes (definition 8.8).

    Same algorithm as the reference (initialisation, nearest level with ties to
    the lower level, weighted means, empty clusters keep their level, stop when
    no level changes or after ``max_iter`` steps).  The cluster sums are
    computed differently: the points of a row are sorted once, each point's
    cluster (``x`` in ``(beta_{k-1}, beta_k]``) is found with ``searchsorted``,
    and a cluster's weight and weighted sum are float64 sums over its own points
    (``scatter_add``; not differences of prefix sums, which cancel when a
    cluster's weight is tiny next to the row's, as Fisher weights spanning 40
    orders of magnitude make it).  The result agrees with the reference up to float64
    rounding (docs/08-kvquant.md §8.11).  Returns float32 ``(..., 2**bits)``
    (and the objective history ``(iterations + 1, ...)`` with ``return_history``).
    """
    bits = check_bits(bits)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    p, w = _check_points(points, weights)
    return _kmeans_fit(p, w, bits, max_iter, return_history)


def _kmeans_fit(p, w, bits, max_iter, return_history=False):
    """:func:`kmeans_levels` on checked float64 ``p``, ``w``."""
    n = 1 << bits
    lead = p.shape[:-1]
    m = p.shape[-1]
    pf = p.reshape(-1, m)
    wf = w.reshape(-1, m)
    ps, order = torch.sort(pf, dim=-1, stable=True)
    ws = torch.gather(wf, -1, order)
    wx = ws * ps
    cw = torch.cumsum(ws, dim=-1)                                        # for the initialisation only
    lv = _kmeans_init(pf, wf, n, (ps, cw))
    history = [kmeans_objective(pf, wf, lv)] if return_history else []
    for _ in range(int(max_iter)):
        beta = ((lv[:, :-1] + lv[:, 1:]) / 2).contiguous()
        cluster = torch.searchsorted(beta, ps, right=False)               # #{k : x > beta_k}
        wsum = torch.zeros(pf.shape[0], n, dtype=_F64, device=pf.device).scatter_add_(-1, cluster, ws)
        xsum = torch.zeros(pf.shape[0], n, dtype=_F64, device=pf.device).scatter_add_(-1, cluster, wx)
        nonempty = wsum > 0
        new = torch.where(nonempty, xsum / torch.where(nonempty, wsum, torch.ones_like(wsum)), lv)
        changed = bool((new != lv).any())
        lv = new
        if return_history:
            history.append(kmeans_objective(pf, wf, lv))
        if not changed:
            break
    out = lv.to(_F32).clamp(-1.0, 1.0).reshape(lead + (n,))
    if return_history:
        return out, torch.stack(history).reshape((len(history),) + lead)
    return out


# =========================================================================== 8.9 calibration

@dataclass(frozen=True, eq=False)
class KVQuantCalibration(_ref.KVQuantCalibration):
    """Torch twin of ``reference.kvquant.KVQuantCalibration`` (tensors instead of arrays)."""

    @property
    def nbytes(self) -> int:
        n = 4 * (self.key_lower.numel() + self.key_upper.numel())
        if self.datatype == "kmeans":
            n += 4 * (self.key_levels.numel() + self.value_levels.numel())
        return int(n)

    def check(self, config, num_heads, head_dim):
        for name, v in dict(datatype=config.kvquant_datatype, key_bits=config.key_bits,
                            value_bits=config.value_bits,
                            outlier_fraction=float(config.outlier_fraction),
                            key_group_size=config.key_group_size,
                            value_group_size=config.value_group_size).items():
            if getattr(self, name) != v:
                raise ValueError(f"calibration was made for {name}={getattr(self, name)!r} but the "
                                 f"config has {v!r}; calibrate again with this config")
        if tuple(self.key_lower.shape) != (num_heads, head_dim):
            raise ValueError(f"calibration is for (H, D) = {tuple(self.key_lower.shape)}, the keys "
                             f"have {(num_heads, head_dim)}")

    def to_reference(self):
        n = lambda a: a.detach().cpu().numpy()  # noqa: E731
        return _ref.KVQuantCalibration(
            key_lower=n(self.key_lower), key_upper=n(self.key_upper), key_levels=n(self.key_levels),
            value_levels=n(self.value_levels), datatype=self.datatype, key_bits=self.key_bits,
            value_bits=self.value_bits, outlier_fraction=self.outlier_fraction,
            key_group_size=self.key_group_size, value_group_size=self.value_group_size)

    @classmethod
    def from_reference(cls, cal, device=None):
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return cls(key_lower=t(cal.key_lower), key_upper=t(cal.key_upper), key_levels=t(cal.key_levels),
                   value_levels=t(cal.value_levels), datatype=cal.datatype, key_bits=cal.key_bits,
                   value_bits=cal.value_bits, outlier_fraction=cal.outlier_fraction,
                   key_group_size=cal.key_group_size, value_group_size=cal.value_group_size)


def _normalised_calibration(x, outl, excl, group_size, axis):
    counted = ~excl[:, None, :, None].expand(x.shape) & ~outl
    gax = GROUP_AXIS[axis]
    lo, hi = group_min_max(split_groups(x, group_size, gax, 0.0),
                           split_groups(counted, group_size, gax, False), gax)
    s, c = normalisation(lo, hi)
    s_full = expand_groups(s, group_size, x.shape[gax], gax)
    c_full = expand_groups(c, group_size, x.shape[gax], gax)
    return normalised(torch.where(counted, x, c_full), s_full, c_full), s_full, counted


def _check_fisher(name, fisher, shape, device):
    if fisher is None:
        raise ValueError(f"{name} is required for kvquant_datatype='kmeans' (squared gradients, "
                         f"shape {tuple(shape)}); fisher_weights computes it")
    if not isinstance(fisher, torch.Tensor) or not fisher.dtype.is_floating_point \
            or tuple(fisher.shape) != tuple(shape):
        raise ValueError(f"{name} must be a float tensor of shape {tuple(shape)}")
    if not bool(torch.isfinite(fisher).all()) or bool((fisher < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    return fisher.to(device=device, dtype=_F64)


def _calibration_data(keys, values, config, exclude, key_fisher, value_fisher):
    """Checked inputs of one layer -> thresholds and (for kmeans) the k-means points and weights."""
    k, v = check_kv_pair("keys", keys, values)
    bsz, h, t, d = k.shape
    excl = check_exclude_bt(exclude, bsz, t, k.device)
    frac = float(config.outlier_fraction)
    lower, upper = key_outlier_thresholds(k, frac, excl)
    if config.kvquant_datatype == "nf":
        return lower, upper, None
    kf = _check_fisher("key_fisher", key_fisher, k.shape, k.device)
    vf = _check_fisher("value_fisher", value_fisher, v.shape, k.device)
    tk, sk, ck = _normalised_calibration(k, key_outlier_mask(k, lower, upper, excl), excl,
                                         config.key_group_size, "channel")
    wk = torch.where(ck, kf * sk.to(_F64) ** 2, torch.zeros((), dtype=_F64, device=k.device))
    tv, sv, cv = _normalised_calibration(v, value_outlier_mask(v, frac, excl), excl,
                                         config.value_group_size, "token")
    wv = torch.where(cv, vf * sv.to(_F64) ** 2, torch.zeros((), dtype=_F64, device=k.device))
    fit = (tk.permute(1, 3, 0, 2).reshape(h, d, bsz * t), wk.permute(1, 3, 0, 2).reshape(h, d, bsz * t),
           tv.transpose(0, 1).reshape(h, -1), wv.transpose(0, 1).reshape(h, -1))
    return lower, upper, fit


def _make_calibration(config, lower, upper, key_levels, value_levels):
    return KVQuantCalibration(key_lower=lower, key_upper=upper, key_levels=key_levels,
                              value_levels=value_levels, datatype=config.kvquant_datatype,
                              key_bits=config.key_bits, value_bits=config.value_bits,
                              outlier_fraction=float(config.outlier_fraction),
                              key_group_size=config.key_group_size,
                              value_group_size=config.value_group_size)


def calibrate_kvquant(keys: torch.Tensor, values: torch.Tensor, config: KVSinkConfig, *, exclude=None,
                      key_fisher=None, value_fisher=None, max_iter: int = KMEANS_MAX_ITER) -> KVQuantCalibration:
    """Calibrate one layer (definition 8.9); arguments as the reference, tensors ``(B, H, T, D)``."""
    config = check_kvquant_config(config)
    lower, upper, fit = _calibration_data(keys, values, config, exclude, key_fisher, value_fisher)
    if fit is None:
        dev = lower.device
        return _make_calibration(config, lower, upper, nf_levels(config.key_bits, dev),
                                 nf_levels(config.value_bits, dev))
    kp, kw, vp, vw = fit
    return _make_calibration(config, lower, upper, _kmeans_fit(kp, kw, config.key_bits, max_iter),
                             _kmeans_fit(vp, vw, config.value_bits, max_iter))


def calibrate_kvquant_layers(keys, values, config: KVSinkConfig, *, exclude=None, fisher=None,
                             max_iter: int = KMEANS_MAX_ITER) -> List[KVQuantCalibration]:
    """:func:`calibrate_kvquant` for every layer of a model at once (accelerated only).

    ``keys``, ``values``: sequences over layers of ``(B, H, T, D)`` tensors of the
    same shape; ``exclude`` None or bool ``(B, T)`` (shared by all layers);
    ``fisher``: None (nf) or the list of ``(key_fisher, value_fisher)`` of
    :func:`fisher_weights`.  The k-means fits of all layers run as one batch
    (rows are independent, so the result equals per-layer calls).
    """
    config = check_kvquant_config(config)
    if len(keys) != len(values) or (fisher is not None and len(fisher) != len(keys)):
        raise ValueError("keys, values (and fisher) must have one entry per layer")
    parts = [_calibration_data(k, v, config, exclude, *(fisher[i] if fisher is not None else (None, None)))
             for i, (k, v) in enumerate(zip(keys, values))]
    if config.kvquant_datatype == "nf":
        return [_make_calibration(config, lo, hi, nf_levels(config.key_bits, lo.device),
                                  nf_levels(config.value_bits, lo.device)) for lo, hi, _ in parts]
    kl = _kmeans_fit(torch.stack([p[2][0] for p in parts]).to(_F64),
                     torch.stack([p[2][1] for p in parts]), config.key_bits, max_iter)
    vl = _kmeans_fit(torch.stack([p[2][2] for p in parts]).to(_F64),
                     torch.stack([p[2][3] for p in parts]), config.value_bits, max_iter)
    return [_make_calibration(config, lo, hi, kl[i], vl[i]) for i, (lo, hi, _) in enumerate(parts)]


def nf_calibration(config: KVSinkConfig, num_heads: int, head_dim: int, device=None) -> KVQuantCalibration:
    """Calibration of nf with ``outlier_fraction == 0`` (no data needed)."""
    return KVQuantCalibration.from_reference(_ref.nf_calibration(config, num_heads, head_dim), device)


# =========================================================================== Fisher weights

def attention_modules(model) -> List[torch.nn.Module]:
    """The Llama-style attention modules of ``model`` (those with ``k_proj``, ``v_proj``, ``head_dim``)."""
    mods = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")
            and hasattr(m, "head_dim")]
    if not mods:
        raise ValueError("model has no attention modules with k_proj / v_proj (Llama-style) to hook")
    return mods


def fisher_weights(model, input_ids: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Squared gradients of the loss w.r.t. every layer's pre-RoPE keys and values.

    KVQuant's sensitivity (a diagonal Fisher information approximation):
    ``F = (dL / dA)**2`` for every activation entry ``A``, with ``L`` the sum
    of the next-token negative log-likelihoods of ``input_ids`` (natural log).
    The keys are the output of ``k_proj`` (before RoPE), the values that of
    ``v_proj``; forward hooks add a zero leaf tensor that requires grad to each
    output (``dL/d zero == dL/d output``; detaching the output instead would cut
    the paths through later layers), so the model's parameters need no gradient.

    Parameters
    ----------
    model : a transformers causal LM whose attention modules have ``k_proj``,
        ``v_proj`` and ``head_dim`` (Llama family).
    input_ids : int ``(B, T)``.

    Returns
    -------
    list over layers of ``(key_fisher, value_fisher)``, float32 ``(B, H, T, D)``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.ndim != 2:
        raise ValueError("input_ids must be an integer tensor (B, T)")
    mods = attention_modules(model)
    grads = _projection_grads(model, input_ids, mods)
    out = []
    for i, m in enumerate(mods):
        pair = []
        for g in grads[2 * i: 2 * i + 2]:
            b, t, hd = g.shape
            pair.append((g.float() ** 2).reshape(b, t, hd // m.head_dim, m.head_dim).transpose(1, 2).contiguous())
        out.append(tuple(pair))
    return out


def _projection_grads(model, input_ids: torch.Tensor, mods) -> Tuple[torch.Tensor, ...]:
    """``dL / d output`` of every module's ``k_proj`` then ``v_proj`` (``(B, T, H*D)`` each), ``L``
    the summed next-token negative log-likelihood of ``input_ids``."""
    captured: List[torch.Tensor] = []
    hooks = []

    def hook(_module, _inputs, output):
        # output + zero leaf: d loss / d zero == d loss / d output, and every path of the graph
        # (through later layers' projections as well) is kept
        zero = torch.zeros_like(output, requires_grad=True)
        captured.append(zero)
        return output + zero

    for m in mods:
        hooks.append(m.k_proj.register_forward_hook(hook))
        hooks.append(m.v_proj.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            ids = input_ids.to(next(model.parameters()).device)
            logits = model(input_ids=ids, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            loss = -logp.gather(-1, ids[:, 1:, None]).sum()
            return torch.autograd.grad(loss, captured)
    finally:
        for hk in hooks:
            hk.remove()
