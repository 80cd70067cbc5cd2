"""KVQuant's dense-and-sparse tensor (definitions 8.5-8.7), torch twin of ``reference/kvquant_tensor.py``.

Key outlier thresholds are order statistics (exact); value outliers use a
stable sort (the reference's tie rule); the quantizer performs the
reference's float32 operations one by one, so codes, ``scale``, ``centre``,
outlier indices and values are bit-identical to the reference for the same
levels.

Triton path (docs/08-kvquant.md "Triton path"): on CUDA tensors the dense part
of :func:`quantize_nonuniform` (normalisation, nearest level, neutral codes) and
of :func:`dequantize_nonuniform` (``l_q * s + c``) run as one kernel each
(``accelerated/kvquant_kernels.py``), bit-identical to the torch path; outlier
selection, the sparse lists and input validation stay in torch.  Keyword
``use_kernel`` (None = when possible, True = required, False = torch);
the environment variable ``KVSINK_KVQUANT_KERNEL=0`` forces the torch path where
``use_kernel`` is None.  CPU tensors always take the torch path (except under
``TRITON_INTERPRET=1``, for testing the kernels without a GPU).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from reference import kvquant as _ref
from reference import quantize as _rquantize
from reference.packing import check_bits, packed_length

from . import kvquant_kernels as _kk
from .kvquant_levels import check_levels, check_range, level_dequantize, normalisation, normalised
from .kvquant_rope import check_float
from .packing import pack_codes
from .quantize import expand_groups, group_min_max, split_groups

__all__ = ["check_outlier_fraction", "check_exclude_bt", "check_bhtd", "check_kv_pair", "outlier_count",
           "key_outlier_thresholds", "key_outliers", "value_outliers", "KVQuantTensor",
           "quantize_nonuniform", "dequantize_nonuniform",
           # accelerated only: the unchecked steps other modules call, the kernel switch
           "GROUP_AXIS", "key_outlier_mask", "value_outlier_mask", "quantize_checked", "check_sparse_dtype",
           "kernel_path", "KERNEL_ENV"]

_F32 = torch.float32
outlier_count = _ref.outlier_count
check_outlier_fraction = _ref.check_outlier_fraction     # the reference's check
GROUP_AXIS = {"token": -1, "channel": -2}


def check_bhtd(name: str, x) -> torch.Tensor:
    """``x`` as float32 ``(B, H, T, D)`` (:func:`check_float`, 4 dimensions)."""
    x32 = check_float(name, x)
    if x32.ndim != 4:
        raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(x32.shape)}")
    return x32


def check_kv_pair(keys_name: str, keys, values) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as :func:`check_bhtd` tensors of one shape, errors naming ``keys_name``."""
    k = check_bhtd(keys_name, keys)
    v = check_bhtd("values", values)
    if v.shape != k.shape:
        raise ValueError(f"values must have the shape of {keys_name} {tuple(k.shape)}, got "
                         f"{tuple(v.shape)}")
    return k, v


def check_exclude_bt(exclude, b: int, t: int, device) -> torch.Tensor:
    """bool ``(B, T)`` on ``device``: ``exclude``, or all False when None."""
    if exclude is None:
        return torch.zeros(b, t, dtype=torch.bool, device=device)
    if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.bool:
        raise TypeError(f"exclude must be a bool tensor (B, T), got "
                        f"{getattr(exclude, 'dtype', type(exclude).__name__)}")
    if tuple(exclude.shape) != (b, t):
        raise ValueError(f"exclude must have shape (B, T) = {(b, t)}, got {tuple(exclude.shape)}")
    return exclude.to(device)


# =========================================================================== 8.5 - 8.6 outliers

def key_outlier_thresholds(keys: torch.Tensor, fraction: float, exclude=None):
    """Per-channel ``(lower, upper)`` float32 ``(H, D)``: order statistics ``k`` and ``N-1-k``
    of the non-excluded calibration entries, ``k = outlier_count(fraction / 2, N)`` (definition 8.5)."""
    x = check_bhtd("keys", keys)
    f = check_outlier_fraction(fraction)
    bsz, h, t, d = x.shape
    excl = check_exclude_bt(exclude, bsz, t, x.device)
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
    x = check_bhtd("keys", keys)
    bsz, h, t, d = x.shape
    excl = check_exclude_bt(exclude, bsz, t, x.device)
    if tuple(lower.shape) != (h, d) or tuple(upper.shape) != (h, d):
        raise ValueError(f"lower and upper must have shape (H, D) = {(h, d)}, got "
                         f"{tuple(lower.shape)}, {tuple(upper.shape)}")
    return key_outlier_mask(x, lower, upper, excl)


def key_outlier_mask(x, lower, upper, excl):
    """:func:`key_outliers` of checked float32 ``x`` and bool ``(B, T)`` ``excl``."""
    lo = lower.to(device=x.device, dtype=_F32)[:, None, :]
    hi = upper.to(device=x.device, dtype=_F32)[:, None, :]
    return ((x < lo) | (x > hi)) & ~excl[:, None, :, None]


def value_outliers(values: torch.Tensor, fraction: float, exclude=None) -> torch.Tensor:
    """Exactly ``outlier_count(fraction, H*D)`` largest-``|x|`` entries per non-excluded token,
    ties to the lower flat index ``h*D + d`` (stable sort); bool ``(B, H, T, D)`` (definition 8.6)."""
    x = check_bhtd("values", values)
    f = check_outlier_fraction(fraction)
    excl = check_exclude_bt(exclude, x.shape[0], x.shape[2], x.device)
    return value_outlier_mask(x, f, excl)


def value_outlier_mask(x, f, excl):
    """:func:`value_outliers` of checked float32 ``x``, fraction ``f`` and bool ``(B, T)`` ``excl``."""
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


def check_sparse_dtype(dtype) -> torch.dtype:
    """The outlier values' dtype: float32 or float16."""
    if dtype in (torch.float32, np.float32):
        return torch.float32
    if dtype in (torch.float16, np.float16):
        return torch.float16
    raise ValueError(f"sparse_dtype must be float32 or float16, got {dtype}")


#: Environment variable: "0" forces the torch path wherever ``use_kernel`` is None; "1" or unset:
#: the Triton kernels where they can run (CUDA tensor, triton installed, see kvquant_kernels.py).
KERNEL_ENV = "KVSINK_KVQUANT_KERNEL"


def kernel_path(x: torch.Tensor, group_size: int, axis: str, use_kernel) -> bool:
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
    x32 = check_bhtd("x", x)
    bits = check_bits(bits)
    lv = check_levels(levels, bits).to(x32.device)
    try:
        torch.broadcast_shapes(lv.shape[:-1], x32.shape)
    except RuntimeError:
        raise ValueError(f"levels of shape {tuple(lv.shape)} do not broadcast against x.shape + (n,)") from None
    group_size = _rquantize.check_group_size(group_size)
    if axis not in GROUP_AXIS:
        raise ValueError(f"axis={axis!r} is not allowed; choose one of {tuple(GROUP_AXIS)}")
    bsz, h, t, d = x32.shape
    excl = check_exclude_bt(exclude, bsz, t, x32.device)
    if outliers is None:
        out = torch.zeros(x32.shape, dtype=torch.bool, device=x32.device)
    else:
        if not isinstance(outliers, torch.Tensor) or outliers.dtype != torch.bool \
                or tuple(outliers.shape) != tuple(x32.shape):
            raise ValueError(f"outliers must be a bool tensor of shape {tuple(x32.shape)}")
        out = outliers.to(x32.device)
    return quantize_checked(x32, lv, bits, group_size, axis, out, excl, check_sparse_dtype(sparse_dtype),
                                use_kernel)


def quantize_checked(x32, lv, bits, group_size, axis, out, excl, sdt, use_kernel=None):
    """:func:`quantize_nonuniform` of checked arguments: float32 ``x32``, levels ``lv``, bool
    outliers ``out`` (B, H, T, D) and ``excl`` (B, T), sparse dtype ``sdt``."""
    excl4 = excl[:, None, :, None].expand(x32.shape)
    out = out & ~excl4
    beta = (lv[..., :-1] + lv[..., 1:]) / torch.full_like(lv[..., 1:], 2.0)
    if kernel_path(x32, group_size, axis, use_kernel):
        codes, _, s, c = _kk.quantize_dense(x32, excl, out, beta, bits, group_size, axis)
        check_range(s, c)                 # normalisation's overflow check, on the kernel's s and c
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
    if kernel_path(qt.codes, qt.group_size, qt.axis, use_kernel):
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
