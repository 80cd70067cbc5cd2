"""KVQuant-style quantization, torch twin of ``reference/kvquant.py`` (docs/08-kvquant.md).

Same names, same semantics, torch tensors on CPU or CUDA.  The quantizer
performs the reference's float32 operations one by one (tensor / tensor
divisions, separate multiply and add, exact min/max and comparisons), so:

* codes, ``scale``, ``centre``, outlier indices and values are **bit-identical**
  to the reference for the same levels (CPU; CUDA eager division is
  ``div.rn.f32`` as well);
* the nf grid is the reference's constant;
* key thresholds are order statistics (exact);
* value outliers use a stable sort: the same tie rule;
* ``rope_cos_sin`` evaluates cos/sin in float64 and rounds once, as the
  reference; numpy's and torch's float64 ``cos`` may differ by one float64
  ulp, which changes the float32 result only when it lies within ``2**-29``
  relative of a float32 rounding boundary (docs/08-kvquant.md §8.11);
* ``kmeans_levels`` sums in float64 in another order than numpy: the levels
  agree to float64 rounding (``<= M * 2**-53`` relative per mean), hence to the
  last float32 bit except near a float32 rounding boundary (§8.11).

Only here: :func:`fisher_weights` (squared gradients of the loss w.r.t. every
layer's pre-RoPE keys and values, by autograd) and
:func:`model_inv_freq` (the model's RoPE buffer).

Triton path (docs/08-kvquant.md "Triton path"): on CUDA tensors the dense part
of :func:`quantize_nonuniform` (normalisation, nearest level, neutral codes) and
of :func:`dequantize_nonuniform` (``l_q * s + c``) run as one kernel each
(``accelerated/kvquant_kernels.py``), bit-identical to the torch path; outlier
selection, the sparse lists and input validation stay in torch.  Keyword
``use_kernel`` (None = when possible, True = required, False = torch) on those two
functions and on :func:`quantize_block_kvquant` / :func:`dequantize_block_kvquant`;
the environment variable ``KVSINK_KVQUANT_KERNEL=0`` forces the torch path where
``use_kernel`` is None (e.g. inside the cache).  CPU tensors always take the torch path
(except under ``TRITON_INTERPRET=1``, for testing the kernels without a GPU).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from reference import kvquant as _ref
from reference.config import KVSinkConfig
from reference.packing import check_bits, packed_length

from . import kvquant_kernels as _kk
from .packing import pack_codes

__all__ = [
    "rope_inv_freq", "rope_angles", "rope_cos_sin", "rotate_half", "apply_rope", "unapply_rope",
    "rope_roundtrip_bound",
    "nf_levels", "level_boundaries", "nearest_level",
    "normalisation", "normalised", "level_dequantize",
    "outlier_count", "key_outlier_thresholds", "key_outliers", "value_outliers",
    "KVQuantTensor", "quantize_nonuniform", "dequantize_nonuniform",
    "kmeans_init", "kmeans_assign", "kmeans_objective", "kmeans_levels",
    "KVQuantCalibration", "calibrate_kvquant", "calibrate_kvquant_layers", "nf_calibration",
    "KVQuantBlock", "quantize_block_kvquant", "dequantize_block_kvquant", "fake_quantize_kvquant",
    "fisher_weights", "model_inv_freq",
]

_F32 = torch.float32
_F64 = torch.float64
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
outlier_count = _ref.outlier_count
MAX_POSITION = _ref.MAX_POSITION
KMEANS_MAX_ITER = _ref.KMEANS_MAX_ITER
U32, ETA32 = _ref.U32, _ref.ETA32


def _check_float(name: str, x, min_ndim: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}; convert it with .float()")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or +-Inf; quantization needs finite values")
    if x.dtype == _F32:
        return x
    x32 = x.to(_F32)
    if x.dtype == _F64 and x32.numel() and not bool(torch.isfinite(x32).all()):
        raise ValueError(f"{name} has values outside the float32 range (|x| > 3.4e38)")
    return x32


def _check_bhtd(name: str, x) -> torch.Tensor:
    x32 = _check_float(name, x)
    if x32.ndim != 4:
        raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(x32.shape)}")
    return x32


def _check_exclude_bt(exclude, b: int, t: int, device) -> torch.Tensor:
    if exclude is None:
        return torch.zeros(b, t, dtype=torch.bool, device=device)
    if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.bool:
        raise TypeError(f"exclude must be a bool tensor (B, T), got "
                        f"{getattr(exclude, 'dtype', type(exclude).__name__)}")
    if tuple(exclude.shape) != (b, t):
        raise ValueError(f"exclude must have shape (B, T) = {(b, t)}, got {tuple(exclude.shape)}")
    return exclude.to(device)


# =========================================================================== 8.1 RoPE

def rope_inv_freq(head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """float32 ``(D/2,)``: ``fl32(base ** (-2 i / D))`` (float64 then one rounding), as the reference."""
    return torch.from_numpy(_ref.rope_inv_freq(head_dim, base)).to(device)


def model_inv_freq(model) -> torch.Tensor:
    """The RoPE ``inv_freq`` buffer of a transformers Llama-style model (float32 ``(D/2,)``).

    Use it to invert the model's own rotation (definition 8.1)."""
    for name, buf in model.named_buffers():
        if name.endswith("rotary_emb.inv_freq"):
            return buf.detach().to(_F32)
    raise ValueError("model has no 'rotary_emb.inv_freq' buffer; pass inv_freq = "
                     "rope_inv_freq(head_dim, rope_theta) instead")


def _check_positions(positions) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point \
            or positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"positions must be an integer tensor, got "
                        f"{getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= MAX_POSITION):
        raise ValueError(f"positions must lie in [0, 2**24) (exact in float32); got values in "
                         f"[{int(positions.min())}, {int(positions.max())}]; empty slots (-1) must not be rotated")
    return positions.to(torch.int64)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``fl32(float32(pos) * inv_freq)``, float32 ``(*positions.shape, D/2)``."""
    p = _check_positions(positions)
    return p.to(_F32)[..., None] * inv_freq.to(device=p.device, dtype=_F32)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` float32 ``(*positions.shape, D)``, evaluated in float64, rounded once."""
    theta = rope_angles(positions, inv_freq).to(_F64)
    emb = torch.cat([theta, theta], dim=-1)
    return emb.cos().to(_F32), emb.sin().to(_F32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., D/2:], x[..., :D/2])``."""
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _rope_inputs(x, positions, inv_freq):
    x32 = _check_float("x", x, 2)
    d = x32.shape[-1]
    if d % 2:
        raise ValueError(f"x: the head dimension D={d} must be even for RoPE")
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.dtype.is_floating_point:
        raise TypeError("inv_freq must be a float tensor (D/2,)")
    if tuple(inv_freq.shape) != (d // 2,):
        raise ValueError(f"inv_freq must have shape (D/2,) = ({d // 2},), got {tuple(inv_freq.shape)}")
    p = _check_positions(positions).to(x32.device)
    try:
        torch.broadcast_shapes(p.shape, x32.shape[:-1])
    except RuntimeError:
        raise ValueError(f"positions of shape {tuple(p.shape)} do not broadcast against x.shape[:-1]="
                         f"{tuple(x32.shape[:-1])}; for keys (B, H, T, D) pass positions[:, None, :]") from None
    cos, sin = rope_cos_sin(p, inv_freq.to(x32.device))
    return x32, cos, sin


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate by ``+theta``: ``fl32(x * cos) + fl32(rotate_half(x) * sin)`` (float32)."""
    x32, cos, sin = _rope_inputs(x, positions, inv_freq)
    return x32 * cos + rotate_half(x32) * sin


def unapply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate by ``-theta``: ``fl32(x * cos) - fl32(rotate_half(x) * sin)`` (float32)."""
    x32, cos, sin = _rope_inputs(x, positions, inv_freq)
    return x32 * cos - rotate_half(x32) * sin


def rope_roundtrip_bound(x: torch.Tensor) -> torch.Tensor:
    """``10 u (|a| + |b|) + 8 eta`` per element (float64), as the reference."""
    a = x.detach().to(_F64).abs()
    h = a.shape[-1] // 2
    pair = a[..., :h] + a[..., h:]
    return 10 * U32 * torch.cat([pair, pair], dim=-1) + 8 * ETA32


# =========================================================================== 8.2 - 8.4

def nf_levels(bits: int, device=None) -> torch.Tensor:
    """The reference's nf grid (definition 8.2) as a float32 tensor ``(2**b,)``."""
    return torch.from_numpy(_ref.nf_levels(bits)).to(device)


def _check_levels(levels, bits: Optional[int] = None) -> torch.Tensor:
    if not isinstance(levels, torch.Tensor) or not levels.dtype.is_floating_point:
        raise TypeError(f"levels must be a float tensor (..., n), got "
                        f"{getattr(levels, 'dtype', type(levels).__name__)}")
    if levels.ndim < 1 or levels.shape[-1] < 2:
        raise ValueError(f"levels must have shape (..., n) with n >= 2, got {tuple(levels.shape)}")
    lv = levels.to(_F32)
    if not bool(torch.isfinite(lv).all()) or bool((lv.abs() > 1).any()):
        raise ValueError("levels must be finite and lie in [-1, 1]")
    if bool((lv[..., 1:] < lv[..., :-1]).any()):
        raise ValueError("levels must be sorted in non-decreasing order along the last axis")
    if bits is not None and lv.shape[-1] != 1 << bits:
        raise ValueError(f"levels has {lv.shape[-1]} entries along its last axis, but bits={bits} "
                         f"needs 2**bits = {1 << bits}")
    return lv


def level_boundaries(levels: torch.Tensor) -> torch.Tensor:
    """``fl32(fl32(l_k + l_{k+1}) / 2)``, float32 ``(..., n-1)`` (definition 8.3)."""
    lv = _check_levels(levels)
    s = lv[..., :-1] + lv[..., 1:]
    return s / torch.full_like(s, 2.0)


def nearest_level(t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``#{k : t > beta_k}`` as uint8 (ties to the lower level; definition 8.3)."""
    beta = level_boundaries(levels).to(t.device)
    return (t.to(_F32)[..., None] > beta).sum(dim=-1).to(torch.uint8)


def normalisation(lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s = fl32(fl32(hi - lo) / 2)``, ``c = fl32(lo + s)`` (definition 8.4)."""
    lo, hi = lo.to(_F32), hi.to(_F32)
    width = hi - lo
    s = width / torch.full_like(width, 2.0)
    c = lo + s
    _check_range(s, c)
    return s, c


def _check_range(s: torch.Tensor, c: torch.Tensor) -> None:
    """``ValueError`` if a group's range overflowed: ``hi - lo`` overflows <=> ``s`` is inf (halving a
    finite width stays finite); ``lo + s`` overflows <=> ``c + s`` is not finite.  One synchronisation."""
    if s.numel() and not bool((torch.isfinite(s) & torch.isfinite(c + s)).all()):
        raise ValueError("x: a group's dense range max - min overflows float32; rescale x")


def normalised(x: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``fl32(fl32(x - c) / s)``, 0 where ``s == 0`` (definition 8.4)."""
    diff = x.to(_F32) - c
    nz = s != 0
    safe = torch.where(nz, s, torch.ones((), dtype=_F32, device=s.device))
    return torch.where(nz, diff / safe, torch.zeros((), dtype=_F32, device=s.device))


def level_dequantize(q: torch.Tensor, levels: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``fl32(fl32(l_q * s) + c)``, two eager operations (definition 8.4)."""
    n = levels.shape[-1]
    lv = levels.to(device=q.device, dtype=_F32).expand(tuple(q.shape) + (n,))
    lq = torch.gather(lv, -1, q.to(torch.int64)[..., None])[..., 0]
    prod = lq * s
    return prod + c


# =========================================================================== groups (as accelerated.quantize)

from .quantize import expand_groups, group_min_max, split_groups  # noqa: E402

GROUP_AXIS = {"token": -1, "channel": -2}


# =========================================================================== 8.5 - 8.6 outliers

def key_outlier_thresholds(keys: torch.Tensor, fraction: float, exclude=None):
    """Per-channel ``(lower, upper)`` float32 ``(H, D)``: order statistics ``k`` and ``N-1-k``
    of the non-excluded calibration entries, ``k = outlier_count(fraction / 2, N)`` (definition 8.5)."""
    x = _check_bhtd("keys", keys)
    f = _ref._check_fraction(fraction)
    bsz, h, t, d = x.shape
    excl = _check_exclude_bt(exclude, bsz, t, x.device)
    keep = ~excl.reshape(-1)
    n = int(keep.sum())
    if f == 0 or n == 0:                  # no outliers; N = 0: no data to estimate from (8.5)
        inf = torch.full((h, d), float("inf"), dtype=_F32, device=x.device)
        return -inf, inf
    entries = x.permute(1, 3, 0, 2).reshape(h, d, bsz * t)[..., keep]     # (H, D, N)
    v = torch.sort(entries, dim=-1).values
    k = outlier_count(f / 2, n)
    return v[..., k].clone(), v[..., n - 1 - k].clone()


def key_outliers(keys: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, exclude=None) -> torch.Tensor:
    """``(x < lower) | (x > upper)`` per channel, never on excluded tokens; bool ``(B, H, T, D)``."""
    x = _check_bhtd("keys", keys)
    bsz, h, t, d = x.shape
    excl = _check_exclude_bt(exclude, bsz, t, x.device)
    if tuple(lower.shape) != (h, d) or tuple(upper.shape) != (h, d):
        raise ValueError(f"lower and upper must have shape (H, D) = {(h, d)}, got "
                         f"{tuple(lower.shape)}, {tuple(upper.shape)}")
    return _key_outliers(x, lower, upper, excl)


def _key_outliers(x, lower, upper, excl):
    lo = lower.to(device=x.device, dtype=_F32)[:, None, :]
    hi = upper.to(device=x.device, dtype=_F32)[:, None, :]
    return ((x < lo) | (x > hi)) & ~excl[:, None, :, None]


def value_outliers(values: torch.Tensor, fraction: float, exclude=None) -> torch.Tensor:
    """Exactly ``outlier_count(fraction, H*D)`` largest-``|x|`` entries per non-excluded token,
    ties to the lower flat index ``h*D + d`` (stable sort); bool ``(B, H, T, D)`` (definition 8.6)."""
    x = _check_bhtd("values", values)
    f = _ref._check_fraction(fraction)
    excl = _check_exclude_bt(exclude, x.shape[0], x.shape[2], x.device)
    return _value_outliers(x, f, excl)


def _value_outliers(x, f, excl):
    bsz, h, t, d = x.shape
    k = outlier_count(f, h * d)
    out = torch.zeros(bsz, t, h * d, dtype=torch.bool, device=x.device)
    if k:
        mag = x.transpose(1, 2).reshape(bsz, t, h * d).abs()
        order = torch.sort(mag, dim=-1, descending=True, stable=True).indices
        out.scatter_(-1, order[..., :k], True)
        out &= ~excl[..., None]
    return out.reshape(bsz, t, h, d).transpose(1, 2)


# =========================================================================== 8.7 tensor

@dataclass(frozen=True, eq=False)
class KVQuantTensor:
    """Torch twin of ``reference.kvquant.KVQuantTensor`` (same fields, torch tensors)."""

    codes: torch.Tensor
    scale: torch.Tensor
    centre: torch.Tensor
    levels: torch.Tensor
    outlier_index: torch.Tensor
    outlier_value: torch.Tensor
    bits: int
    group_size: int
    axis: str
    shape: Tuple[int, ...]

    def packed(self) -> torch.Tensor:
        """Codes packed along D: int32 words (uint32 bit pattern) ``(B, H, T, packed_length(D, b))``."""
        return pack_codes(self.codes, self.bits, validate=False)

    @property
    def num_outliers(self) -> int:
        return int(self.outlier_index.numel())

    @property
    def nbytes(self) -> int:
        """Same formula as the reference (definition 8.7)."""
        words = math.prod(self.shape[:-1]) * packed_length(self.shape[-1], self.bits) * 4
        stats = 4 * (self.scale.numel() + self.centre.numel())
        sparse = self.num_outliers * (4 + self.outlier_value.element_size())
        return int(words + stats + sparse)

    def to_reference(self):
        """The same tensor as a ``reference.kvquant.KVQuantTensor`` (numpy arrays)."""
        n = lambda a: a.detach().cpu().numpy()  # noqa: E731
        return _ref.KVQuantTensor(codes=n(self.codes), scale=n(self.scale), centre=n(self.centre),
                                  levels=n(self.levels), outlier_index=n(self.outlier_index),
                                  outlier_value=n(self.outlier_value), bits=self.bits,
                                  group_size=self.group_size, axis=self.axis, shape=self.shape)


def _sparse_dtype(dtype) -> torch.dtype:
    if dtype in (torch.float32, np.float32):
        return torch.float32
    if dtype in (torch.float16, np.float16):
        return torch.float16
    raise ValueError(f"sparse_dtype must be float32 or float16, got {dtype}")


#: Environment variable: "0" forces the torch path wherever ``use_kernel`` is None; "1" or unset:
#: the Triton kernels where they can run (CUDA tensor, triton installed, see kvquant_kernels.py).
KERNEL_ENV = "KVSINK_KVQUANT_KERNEL"


def _use_kernel(x: torch.Tensor, group_size: int, axis: str, use_kernel) -> bool:
    """Whether the Triton kernels run for tensor ``x`` (``use_kernel``: None, True or False)."""
    if use_kernel is not None and not isinstance(use_kernel, (bool, np.bool_)):
        raise TypeError(f"use_kernel must be None, True or False, got {use_kernel!r}")
    if use_kernel is not None and not use_kernel:
        return False
    if use_kernel is None:
        env = os.environ.get(KERNEL_ENV, "1")
        if env not in ("0", "1"):
            raise ValueError(f"environment variable {KERNEL_ENV}={env!r}: use '0' (torch path) or '1' "
                             "(Triton kernels where possible)")
        if env == "0":
            return False
    on_device = x.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and x.device.type == "cpu")
    ok = (on_device and importlib.util.find_spec("triton") is not None
          and _kk.kernel_supported(x.shape, group_size, axis))
    if use_kernel and not ok:
        raise ValueError("use_kernel=True but the Triton kvquant kernels cannot run here (they need a "
                         "non-empty CUDA tensor, triton, and ceil(D / G) <= "
                         f"{_kk.MAX_TOKEN_GROUPS} for axis 'token'); pass use_kernel=None")
    return ok


def quantize_nonuniform(x: torch.Tensor, levels: torch.Tensor, bits: int, group_size: int, axis: str,
                        *, outliers=None, exclude=None, sparse_dtype=torch.float32,
                        use_kernel: Optional[bool] = None) -> KVQuantTensor:
    """Dense-and-sparse quantization (definition 8.7); see the reference for the algorithm.

    ``use_kernel``: None (the Triton kernel on CUDA, unless ``KVSINK_KVQUANT_KERNEL=0``),
    True (required: ``ValueError`` if it cannot run) or False (torch).  Same numbers either way."""
    x32 = _check_bhtd("x", x)
    bits = check_bits(bits)
    lv = _check_levels(levels, bits).to(x32.device)
    try:
        torch.broadcast_shapes(lv.shape[:-1], x32.shape)
    except RuntimeError:
        raise ValueError(f"levels of shape {tuple(lv.shape)} do not broadcast against x.shape + (n,)") from None
    group_size = _ref._check_group_size(group_size)
    if axis not in GROUP_AXIS:
        raise ValueError(f"axis={axis!r} is not allowed; choose one of {tuple(GROUP_AXIS)}")
    bsz, h, t, d = x32.shape
    excl = _check_exclude_bt(exclude, bsz, t, x32.device)
    if outliers is None:
        out = torch.zeros(x32.shape, dtype=torch.bool, device=x32.device)
    else:
        if not isinstance(outliers, torch.Tensor) or outliers.dtype != torch.bool \
                or tuple(outliers.shape) != tuple(x32.shape):
            raise ValueError(f"outliers must be a bool tensor of shape {tuple(x32.shape)}")
        out = outliers.to(x32.device)
    return _quantize_nonuniform(x32, lv, bits, group_size, axis, out, excl, _sparse_dtype(sparse_dtype),
                                use_kernel)


def _quantize_nonuniform(x32, lv, bits, group_size, axis, out, excl, sdt, use_kernel=None):
    excl4 = excl[:, None, :, None].expand(x32.shape)
    out = out & ~excl4
    beta = (lv[..., :-1] + lv[..., 1:]) / torch.full_like(lv[..., 1:], 2.0)
    if _use_kernel(x32, group_size, axis, use_kernel):
        codes, _, s, c = _kk.quantize_dense(x32, excl, out, beta, bits, group_size, axis)
        _check_range(s, c)                 # normalisation's overflow check, on the kernel's s and c
    else:
        counted = ~excl4 & ~out
        gax = GROUP_AXIS[axis]
        n_axis = x32.shape[gax]
        lo, hi = group_min_max(split_groups(x32, group_size, gax, 0.0),
                               split_groups(counted, group_size, gax, False), gax)
        s, c = normalisation(lo, hi)
        s_full = expand_groups(s, group_size, n_axis, gax)
        c_full = expand_groups(c, group_size, n_axis, gax)
        t_norm = normalised(torch.where(counted, x32, c_full), s_full, c_full)
        q = (t_norm[..., None] > beta).sum(dim=-1).to(torch.uint8)
        codes = torch.where(counted & (s_full != 0), q, torch.zeros((), dtype=torch.uint8, device=q.device))
    index = torch.nonzero(out.reshape(-1)).reshape(-1)
    if index.numel() and int(index[-1]) >= 2 ** 31:
        raise ValueError("x is too large for int32 outlier indices (>= 2**31 elements)")
    return KVQuantTensor(codes=codes, scale=s, centre=c, levels=lv, outlier_index=index.to(torch.int32),
                         outlier_value=x32.reshape(-1)[index].to(sdt), bits=bits,
                         group_size=group_size, axis=axis, shape=tuple(x32.shape))


def dequantize_nonuniform(qt: KVQuantTensor, *, use_kernel: Optional[bool] = None) -> torch.Tensor:
    """``l_q * s + c`` then the outliers written back exactly; float32 ``qt.shape``.

    ``use_kernel`` as :func:`quantize_nonuniform` (the kernel computes the same two
    roundings, no FMA: bit-identical)."""
    if not isinstance(qt, KVQuantTensor):
        raise TypeError(f"qt must be a KVQuantTensor, got {type(qt).__name__}")
    if _use_kernel(qt.codes, qt.group_size, qt.axis, use_kernel):
        xh = _kk.dequantize_dense(qt.codes, qt.scale, qt.centre, qt.levels, qt.bits, qt.group_size,
                                  qt.axis, qt.shape).reshape(-1)
    else:
        gax = GROUP_AXIS[qt.axis]
        n = qt.shape[gax]
        s_full = expand_groups(qt.scale, qt.group_size, n, gax)
        c_full = expand_groups(qt.centre, qt.group_size, n, gax)
        xh = level_dequantize(qt.codes, qt.levels, s_full, c_full).reshape(-1).clone()
    xh[qt.outlier_index.to(torch.int64)] = qt.outlier_value.to(_F32)
    return xh.reshape(qt.shape)


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
    k = _check_bhtd("keys", keys)
    v = _check_bhtd("values", values)
    if v.shape != k.shape:
        raise ValueError(f"values must have the shape of keys {tuple(k.shape)}, got {tuple(v.shape)}")
    bsz, h, t, d = k.shape
    excl = _check_exclude_bt(exclude, bsz, t, k.device)
    frac = float(config.outlier_fraction)
    lower, upper = key_outlier_thresholds(k, frac, excl)
    if config.kvquant_datatype == "nf":
        return lower, upper, None
    kf = _check_fisher("key_fisher", key_fisher, k.shape, k.device)
    vf = _check_fisher("value_fisher", value_fisher, v.shape, k.device)
    tk, sk, ck = _normalised_calibration(k, _key_outliers(k, lower, upper, excl), excl,
                                         config.key_group_size, "channel")
    wk = torch.where(ck, kf * sk.to(_F64) ** 2, torch.zeros((), dtype=_F64, device=k.device))
    tv, sv, cv = _normalised_calibration(v, _value_outliers(v, frac, excl), excl,
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
    config = _ref._check_kvquant_config(config)
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
    config = _ref._check_kvquant_config(config)
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


# =========================================================================== 8.10 block API

@dataclass(frozen=True, eq=False)
class KVQuantBlock:
    """Torch twin of ``reference.kvquant.KVQuantBlock``."""

    keys: KVQuantTensor
    values: KVQuantTensor
    exclude: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def _levels_for(lv: torch.Tensor, side: str) -> torch.Tensor:
    if lv.ndim == 1:
        return lv
    return lv[:, None, :, :] if side == "keys" else lv[:, None, None, :]


def quantize_block_kvquant(keys_pre_rope: torch.Tensor, values: torch.Tensor,
                           calibration: Optional[KVQuantCalibration], config: KVSinkConfig, *,
                           exclude=None, sparse_dtype=torch.float32,
                           use_kernel: Optional[bool] = None) -> KVQuantBlock:
    """Quantize one ``(B, H, T, D)`` block KVQuant-style (definition 8.10); as the reference.

    ``use_kernel`` as :func:`quantize_nonuniform` (keys and values)."""
    config = _ref._check_kvquant_config(config)
    k = _check_bhtd("keys_pre_rope", keys_pre_rope)
    v = _check_bhtd("values", values)
    if v.shape != k.shape:
        raise ValueError(f"values must have the shape of keys_pre_rope {tuple(k.shape)}, got "
                         f"{tuple(v.shape)}")
    bsz, h, t, d = k.shape
    excl = _check_exclude_bt(exclude, bsz, t, k.device)
    if calibration is None:
        calibration = nf_calibration(config, h, d, k.device)
    if isinstance(calibration, _ref.KVQuantCalibration) and not isinstance(calibration, KVQuantCalibration):
        calibration = KVQuantCalibration.from_reference(calibration, k.device)
    if not isinstance(calibration, KVQuantCalibration):
        raise TypeError(f"calibration must be a KVQuantCalibration, got {type(calibration).__name__}")
    calibration.check(config, h, d)
    _check_levels(calibration.key_levels, config.key_bits)
    _check_levels(calibration.value_levels, config.value_bits)
    sdt = _sparse_dtype(sparse_dtype)
    k_out = _key_outliers(k, calibration.key_lower, calibration.key_upper, excl)
    v_out = _value_outliers(v, float(config.outlier_fraction), excl)
    kq = _quantize_nonuniform(k, _levels_for(calibration.key_levels.to(k.device), "keys"), config.key_bits,
                              config.key_group_size, "channel", k_out, excl, sdt, use_kernel)
    vq = _quantize_nonuniform(v, _levels_for(calibration.value_levels.to(k.device), "values"),
                              config.value_bits, config.value_group_size, "token", v_out, excl, sdt,
                              use_kernel)
    return KVQuantBlock(keys=kq, values=vq, exclude=excl.clone())


def dequantize_block_kvquant(block: KVQuantBlock, *, use_kernel: Optional[bool] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(keys_pre_rope, values)`` float32 ``(B, H, T, D)``; excluded slots are placeholders."""
    if not isinstance(block, KVQuantBlock):
        raise TypeError(f"block must be a KVQuantBlock, got {type(block).__name__}")
    return (dequantize_nonuniform(block.keys, use_kernel=use_kernel),
            dequantize_nonuniform(block.values, use_kernel=use_kernel))


def fake_quantize_kvquant(keys_pre_rope: torch.Tensor, values: torch.Tensor, calibration, config, *,
                          preserved=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize then dequantize a whole block; preserved tokens returned exactly (float32)."""
    block = quantize_block_kvquant(keys_pre_rope, values, calibration, config, exclude=preserved)
    kh, vh = dequantize_block_kvquant(block)
    keep = block.exclude[:, None, :, None]
    return (torch.where(keep, keys_pre_rope.to(_F32), kh), torch.where(keep, values.to(_F32), vh))


# =========================================================================== Fisher weights

def _attention_modules(model) -> List[torch.nn.Module]:
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
    mods = _attention_modules(model)
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
            grads = torch.autograd.grad(loss, captured)
    finally:
        for hk in hooks:
            hk.remove()
    out = []
    for i, m in enumerate(mods):
        pair = []
        for g in grads[2 * i: 2 * i + 2]:
            b, t, hd = g.shape
            pair.append((g.float() ** 2).reshape(b, t, hd // m.head_dim, m.head_dim).transpose(1, 2).contiguous())
        out.append(tuple(pair))
    return out
