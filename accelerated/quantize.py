"""Uniform group quantization, torch twin of ``reference/quantize.py`` (docs/02-quantization.md).

Same functions, same semantics, torch tensors on any device.  The arithmetic
is the reference's, operation by operation, in float32:

* ``x`` is cast to float32 first (float64 rounded to nearest, float16/bfloat16 exact);
* asymmetric ``z = min``, ``s = fl32(fl32(max - min) / L)``,
  ``q = clip(rint(fl32(fl32(x - z) / s)), 0, L)``; symmetric ``s = fl32(max|x| / M)``,
  ``q = clip(rint(fl32(x / s)), -M, M) + M``;
* every division is a tensor / tensor division (``torch.div`` of two
  tensors).  A division by a Python scalar is avoided on purpose: PyTorch's
  CUDA kernel replaces ``a / c`` by ``a * (1 / c)`` when ``c`` is a CPU scalar,
  which is not the correctly rounded quotient;
* ``torch.round`` rounds half to even (= ``np.rint``);
* dequantization ``q * s + z`` is two separate eager operations (two roundings, no FMA).

Bit-identity: on CPU, torch float32 subtraction, division and the min/max
reductions are IEEE (correctly rounded, no flush-to-zero by default), so the
codes, scales and zero points are bit-identical to the reference for every
input.  On CUDA the same holds for the eager torch path (PyTorch is not
built with fast-math: ``/`` is ``div.rn.f32``) and for the Triton kernel of
``quantize_kernels.py`` (``tl.math.div_rn``), except possibly for subnormal
operands should the GPU flush them (not observed; see docs/09-tolerances.md,
accelerated section).  Other devices (MPS, ...) are not covered by the claim.

Two containers:

* :class:`QuantizedTensor` — unpacked uint8 codes, as the reference's;
* :class:`PackedQuantizedTensor` — codes packed along D into int32 words
  (uint32 bit pattern, ``accelerated/packing.py``): what the cache stores and
  what :func:`accelerated.attention.quantized_segment_attention` reads.
  :func:`quantize_packed` produces it, with the fused Triton kernel on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from reference import quantize as _ref
from reference.packing import check_bits, packed_length

from .packing import WORD_DTYPE, pack_codes, unpack_codes, words_from_reference, words_to_reference

__all__ = [
    "check_overflow_asymmetric",
    "check_quantize_input",
    "quantize_packed_deferred",
    "quantize_defers_validation",
    "check_overflow_symmetric",
    "QuantizedTensor",
    "PackedQuantizedTensor",
    "quantization_levels",
    "symmetric_offset",
    "check_x",
    "check_group_size",
    "check_axis",
    "check_symmetric",
    "effective_group_size",
    "split_groups",
    "expand_groups",
    "group_min_max",
    "group_absmax",
    "asymmetric_scale_zero",
    "symmetric_scale",
    "asymmetric_ratio",
    "symmetric_ratio",
    "asymmetric_codes",
    "symmetric_codes",
    "asymmetric_dequantize",
    "symmetric_dequantize",
    "quantize_per_token",
    "quantize_per_channel",
    "quantize",
    "quantize_packed",
    "dequantize",
]

AXES = ("token", "channel")
GROUP_AXIS = {"token": -1, "channel": -2}
_F32 = torch.float32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

quantization_levels = _ref.quantization_levels
symmetric_offset = _ref.symmetric_offset


def _full(like: torch.Tensor, value: float) -> torch.Tensor:
    """A float32 tensor of ``value`` shaped like ``like`` (so divisions are tensor / tensor)."""
    return torch.full_like(like, value, dtype=_F32)


# --------------------------------------------------------------------------- 2.5 groups

def split_groups(a: torch.Tensor, group_size: int, axis: int, fill) -> torch.Tensor:
    """``(..., n) -> (..., ceil(n/G), G)`` (axis -1) or ``(..., n, D) -> (..., ceil(n/G), G, D)`` (axis -2).

    The last group is completed with ``fill``; ``G`` larger than the axis is one group of the
    whole axis (``reference.quantize.effective_group_size``), not padded to ``G``.
    """
    n = a.shape[axis]
    group_size = _ref.effective_group_size(group_size, n)
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    if pad:
        pad_shape = list(a.shape)
        pad_shape[axis] = pad
        a = torch.cat([a, torch.full(pad_shape, fill, dtype=a.dtype, device=a.device)], dim=axis)
    if axis == -1:
        return a.reshape(tuple(a.shape[:-1]) + (n_groups, group_size))
    return a.reshape(tuple(a.shape[:-2]) + (n_groups, group_size, a.shape[-1]))


def expand_groups(stat: torch.Tensor, group_size: int, n: int, axis: int) -> torch.Tensor:
    """One value per group back to the ``n`` elements of ``axis``: element ``i`` gets group ``i // G``."""
    full = torch.repeat_interleave(stat, _ref.effective_group_size(group_size, n), dim=axis)
    return full[..., :n] if axis == -1 else full[..., :n, :]


def group_min_max(groups: torch.Tensor, counted: torch.Tensor, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Min and max of the counted elements of each group; ``0, 0`` for an empty group."""
    inf = torch.tensor(float("inf"), dtype=_F32, device=groups.device)
    mn = torch.where(counted, groups, inf).amin(dim=axis)
    mx = torch.where(counted, groups, -inf).amax(dim=axis)
    empty = ~counted.any(dim=axis)
    zero = torch.zeros((), dtype=_F32, device=groups.device)
    return torch.where(empty, zero, mn), torch.where(empty, zero, mx)


def group_absmax(groups: torch.Tensor, counted: torch.Tensor, axis: int) -> torch.Tensor:
    """``max |x|`` over the counted elements of each group; 0 for an empty group."""
    zero = torch.zeros((), dtype=_F32, device=groups.device)
    return torch.where(counted, groups.abs(), zero).amax(dim=axis)


# --------------------------------------------------------------------------- 2.2 / 2.3

def check_overflow_asymmetric(s: torch.Tensor, z: torch.Tensor, levels: int) -> None:
    """``ValueError`` if an asymmetric grid (scale ``s``, zero ``z``, ``levels`` steps) overflows
    float32 (definition 2.2); one device->host read each."""
    # width = max - min overflows  <=>  s = width / L is inf (width finite => s finite)
    if s.numel() and not bool(torch.isfinite(s).all()):
        raise ValueError("x: a group's range max - min overflows float32 (values of opposite sign "
                         "near +-3.4e38); rescale x or use a smaller group")
    top = s * _full(s, levels) + z
    if top.numel() and not bool(torch.isfinite(top).all()):
        raise ValueError("x: the largest dequantized value L * s + z overflows float32 "
                         "(values within a few ulp of the float32 maximum); rescale x")


def check_overflow_symmetric(s: torch.Tensor, m: int) -> None:
    """``ValueError`` if ``M * s`` overflows float32 (definition 2.3); one device->host read."""
    top = _full(s, m) * s
    if top.numel() and not bool(torch.isfinite(top).all()):
        raise ValueError("x: the largest dequantized magnitude M * s overflows float32 "
                         "(values within a few ulp of the float32 maximum); rescale x")


def asymmetric_scale_zero(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``z = mn``, ``s = fl32(fl32(mx - mn) / L)`` (definition 2.2); raises on float32 overflow."""
    levels = quantization_levels(bits)
    mn = mn.to(_F32)
    width = mx.to(_F32) - mn
    s = width / _full(width, levels)
    check_overflow_asymmetric(s, mn, levels)
    return s, mn


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """``s = fl32(max|x| / M)`` (definition 2.3); raises if ``M * s`` overflows float32."""
    m = symmetric_offset(bits)
    absmax = absmax.to(_F32)
    s = absmax / _full(absmax, m)
    check_overflow_symmetric(s, m)
    return s


def asymmetric_ratio(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``t = fl32(fl32(x - z) / s)``; 0 where ``s == 0``."""
    diff = x - z
    nz = s != 0
    safe = torch.where(nz, s, torch.ones((), dtype=_F32, device=s.device))
    return torch.where(nz, diff / safe, torch.zeros((), dtype=_F32, device=s.device))


def symmetric_ratio(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``t = fl32(x / s)``; 0 where ``s == 0``."""
    nz = s != 0
    safe = torch.where(nz, s, torch.ones((), dtype=_F32, device=s.device))
    return torch.where(nz, x / safe, torch.zeros((), dtype=_F32, device=s.device))


def asymmetric_codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """``q = clip(rint((x - z) / s), 0, L)`` uint8; 0 where ``s == 0``."""
    levels = quantization_levels(bits)
    return torch.round(asymmetric_ratio(x, s, z)).clamp_(0, levels).to(torch.uint8)


def symmetric_codes(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """``q = clip(rint(x / s), -M, M) + M`` uint8; ``M`` where ``s == 0``."""
    m = symmetric_offset(bits)
    return (torch.round(symmetric_ratio(x, s)).clamp_(-m, m) + m).to(torch.uint8)


def asymmetric_dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``fl32(fl32(q * s) + z)``: two eager float32 operations, no FMA."""
    prod = q.to(_F32) * s
    return prod + z


def symmetric_dequantize(q: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """``fl32((q - M) * s)``; ``q - M`` is exact."""
    m = symmetric_offset(bits)
    return (q.to(_F32) - m) * s


# --------------------------------------------------------------------------- validation

def check_x(x, check_finite: bool = True) -> torch.Tensor:
    """``x`` as float32 after checking it is a floating torch tensor with >= 2 dims (and finite
    unless ``check_finite=False``); the torch twin of ``reference.quantize.check_x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor (float16/bfloat16/float32/float64), got "
                        f"{type(x).__name__}; use torch.as_tensor(x)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float16, bfloat16, float32, float64), got "
                        f"dtype {x.dtype}; convert it with x.float()")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., T, D), got shape {tuple(x.shape)}")
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or +-Inf; quantization needs finite values")
    x32 = x.to(_F32)                       # exact for float16/bfloat16, rounds float64 to nearest
    if check_finite and x.dtype == torch.float64 and x.numel() and not bool(torch.isfinite(x32).all()):
        raise ValueError("x has values outside the float32 range (|x| > 3.4e38); "
                         "they become Inf when rounded to float32")
    return x32


check_group_size = _ref.check_group_size     # the reference's argument checks, shared


def _check_exclude(exclude, x: torch.Tensor) -> torch.Tensor:
    if exclude is None:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude must be a bool torch tensor of shape x.shape[:-1]="
                        f"{tuple(x.shape[:-1])}, got {type(exclude).__name__}")
    if exclude.dtype != torch.bool:
        raise TypeError(f"exclude must be a bool array of shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                        f"got dtype {exclude.dtype}")
    if tuple(exclude.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"exclude must have shape x.shape[:-1]={tuple(x.shape[:-1])} (..., T), "
                         f"got {tuple(exclude.shape)}")
    return exclude.to(x.device)


check_axis = _ref.check_axis
check_symmetric = _ref.check_symmetric
effective_group_size = _ref.effective_group_size


# --------------------------------------------------------------------------- containers

def _stat_shape(shape, group_size, axis):
    return _ref.QuantizedTensor.stat_shape(tuple(shape), group_size, axis)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized ``(..., T, D)`` tensor with unpacked uint8 codes (twin of the reference's).

    Attributes as :class:`reference.quantize.QuantizedTensor`, as torch tensors
    (``codes`` uint8, ``scale``/``zero`` float32, ``zero is None`` when symmetric).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    bits: int
    group_size: int
    axis: str
    symmetric: bool
    shape: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != self.shape:
            raise ValueError(f"codes must be uint8 of shape {self.shape}, got "
                             f"{self.codes.dtype} {tuple(self.codes.shape)}")
        _check_stats(self.scale, self.zero, self.symmetric, _stat_shape(self.shape, self.group_size, self.axis))

    def packed(self) -> torch.Tensor:
        """Codes packed along D: int32 words ``(..., T, packed_length(D, b))`` (uint32 bit pattern)."""
        return pack_codes(self.codes, self.bits, validate=False)

    def to_packed(self) -> "PackedQuantizedTensor":
        return PackedQuantizedTensor(words=self.packed(), scale=self.scale, zero=self.zero, bits=self.bits,
                                     group_size=self.group_size, axis=self.axis,
                                     symmetric=self.symmetric, shape=self.shape)

    def to_reference(self) -> _ref.QuantizedTensor:
        """The numpy reference container holding the same numbers."""
        return _ref.QuantizedTensor(
            codes=self.codes.cpu().numpy(), scale=self.scale.cpu().numpy(),
            zero=None if self.zero is None else self.zero.cpu().numpy(), bits=self.bits,
            group_size=self.group_size, axis=self.axis, symmetric=self.symmetric, shape=self.shape)

    @classmethod
    def from_reference(cls, qt: _ref.QuantizedTensor, device=None) -> "QuantizedTensor":
        return cls(codes=torch.from_numpy(qt.codes.copy()).to(device),
                   scale=torch.from_numpy(qt.scale.copy()).to(device),
                   zero=None if qt.zero is None else torch.from_numpy(qt.zero.copy()).to(device),
                   bits=qt.bits, group_size=qt.group_size, axis=qt.axis, symmetric=qt.symmetric,
                   shape=qt.shape)


def _check_stats(scale, zero, symmetric, expected):
    if scale.dtype != _F32 or tuple(scale.shape) != expected:
        raise ValueError(f"scale must be float32 of shape {expected}, got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if symmetric:
        if zero is not None:
            raise ValueError("zero must be None for the symmetric scheme")
    elif zero is None or zero.dtype != _F32 or tuple(zero.shape) != expected:
        raise ValueError(f"zero must be float32 of shape {expected} for the asymmetric scheme")


@dataclass(frozen=True, eq=False)
class PackedQuantizedTensor:
    """A quantized ``(..., T, D)`` tensor in its stored form (definition 2.7).

    Attributes
    ----------
    words : int32 ``(..., T, packed_length(D, b))``, codes packed along D
        (uint32 bit pattern; ``accelerated/packing.py``).
    scale, zero : float32, shapes of the reference (``zero`` None when symmetric).
    bits, group_size, axis, symmetric, shape : as :class:`QuantizedTensor`.
    """

    words: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    bits: int
    group_size: int
    axis: str
    symmetric: bool
    shape: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        expected_words = self.shape[:-1] + (packed_length(self.shape[-1], self.bits),)
        if self.words.dtype != WORD_DTYPE or tuple(self.words.shape) != expected_words:
            raise ValueError(f"words must be int32 of shape {expected_words}, got "
                             f"{self.words.dtype} {tuple(self.words.shape)}")
        _check_stats(self.scale, self.zero, self.symmetric, _stat_shape(self.shape, self.group_size, self.axis))

    def unpack(self) -> QuantizedTensor:
        codes = unpack_codes(self.words, self.bits, self.shape[-1], validate=False)
        return QuantizedTensor(codes=codes, scale=self.scale, zero=self.zero, bits=self.bits,
                               group_size=self.group_size, axis=self.axis, symmetric=self.symmetric,
                               shape=self.shape)

    def to_reference(self) -> _ref.QuantizedTensor:
        return _ref.QuantizedTensor.from_packed(
            words_to_reference(self.words), self.scale.cpu().numpy(),
            None if self.zero is None else self.zero.cpu().numpy(), bits=self.bits,
            group_size=self.group_size, axis=self.axis, symmetric=self.symmetric, shape=self.shape)

    @classmethod
    def from_reference(cls, qt: _ref.QuantizedTensor, device=None) -> "PackedQuantizedTensor":
        return cls(words=words_from_reference(qt.packed()).to(device),
                   scale=torch.from_numpy(qt.scale.copy()).to(device),
                   zero=None if qt.zero is None else torch.from_numpy(qt.zero.copy()).to(device),
                   bits=qt.bits, group_size=qt.group_size, axis=qt.axis, symmetric=qt.symmetric,
                   shape=qt.shape)

    @property
    def nbytes_packed(self) -> int:
        stats = self.scale.numel() * 4 + (0 if self.zero is None else self.zero.numel() * 4)
        return int(self.words.numel() * 4 + stats)


# --------------------------------------------------------------------------- quantizers

def _prepare(x, bits, group_size, axis, symmetric, exclude, check_finite: bool = True):
    axis = check_axis(axis)
    symmetric = check_symmetric(symmetric)
    bits = check_bits(bits, lo=2 if symmetric else 1, hi=8)
    group_size = check_group_size(group_size)
    x32 = check_x(x, check_finite)
    excl = _check_exclude(exclude, x32)
    return x32, bits, group_size, axis, symmetric, excl


def _quantize_torch(x32, bits, group_size, axis, symmetric, excl) -> QuantizedTensor:
    gax = GROUP_AXIS[axis]
    n = x32.shape[gax]
    counted = (~excl).unsqueeze(-1).expand(x32.shape)
    groups = split_groups(x32, group_size, gax, fill=0.0)
    counted_g = split_groups(counted, group_size, gax, fill=False)
    if symmetric:
        s = symmetric_scale(group_absmax(groups, counted_g, gax), bits)
        s_full = expand_groups(s, group_size, n, gax)
        x_eff = torch.where(counted, x32, torch.zeros((), dtype=_F32, device=x32.device))
        codes = symmetric_codes(x_eff, s_full, bits)
        z = None
    else:
        mn, mx = group_min_max(groups, counted_g, gax)
        s, z = asymmetric_scale_zero(mn, mx, bits)
        s_full = expand_groups(s, group_size, n, gax)
        z_full = expand_groups(z, group_size, n, gax)
        x_eff = torch.where(counted, x32, z_full)
        codes = asymmetric_codes(x_eff, s_full, z_full, bits)
    return QuantizedTensor(codes=codes, scale=s.contiguous(), zero=None if z is None else z.contiguous(),
                           bits=bits, group_size=group_size, axis=axis, symmetric=symmetric,
                           shape=tuple(x32.shape))


def quantize_per_token(x, bits: int, group_size: int, *, symmetric: bool = False,
                       exclude=None) -> QuantizedTensor:
    """Groups of ``G`` consecutive elements along D of each token; twin of the reference's."""
    return _quantize_torch(*_prepare(x, bits, group_size, "token", symmetric, exclude))


def quantize_per_channel(x, bits: int, group_size: int, *, symmetric: bool = False,
                         exclude=None) -> QuantizedTensor:
    """Groups of ``G`` consecutive tokens of each channel; twin of the reference's."""
    return _quantize_torch(*_prepare(x, bits, group_size, "channel", symmetric, exclude))


def quantize(x, bits: int, group_size: int, axis: str, *, symmetric: bool = False,
             exclude=None) -> QuantizedTensor:
    """Dispatch on ``axis`` ("token" / "channel"); returns unpacked codes."""
    return _quantize_torch(*_prepare(x, bits, group_size, axis, symmetric, exclude))


def _kernel_usable(x32: torch.Tensor, group_size: int, axis: str) -> bool:
    """True when the Triton kernel can run: CUDA tensor (or TRITON_INTERPRET=1 on CPU), triton installed."""
    import importlib.util
    import os
    if x32.numel() == 0:
        return False
    if not (x32.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and x32.device.type == "cpu")):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    return not (axis == "token" and -(-x32.shape[-1] // group_size) > 16)


def quantize_packed(x, bits: int, group_size: int, axis: str, *, symmetric: bool = False,
                    exclude=None, use_kernel: Optional[bool] = None,
                    validate: bool = True) -> PackedQuantizedTensor:
    """Quantize and pack in one step: the stored form the cache keeps.

    Same numbers as ``quantize(...).packed()``.  On a CUDA tensor (and when
    triton is importable) the fused kernel of ``quantize_kernels.py`` runs
    (``use_kernel=None`` means "when possible"; ``True`` forces it and raises
    if it cannot run; ``False`` forces the torch path).

    Validation on the kernel path costs ONE device->host synchronisation: the
    kernel itself screens ``x`` for NaN/Inf and the statistics for float32
    overflow into a one-word flag, read once; only if it is set are the exact
    torch checks run (:func:`check_quantize_input`), raising the same errors as
    the torch path.  ``validate=False`` skips that read (no synchronisation at
    all): allowed only where the caller has already checked ``x`` finite; a
    group whose float32 statistics overflow (|x| near 3.4e38) then goes
    undetected.  The torch path always validates.  A caller that reads the flag
    itself, with other values (the cache's flush), uses
    :func:`quantize_packed_deferred`.
    """
    if not isinstance(validate, (bool, np.bool_)):
        raise TypeError(f"validate must be a bool, got {validate!r}")
    pqt, flag = quantize_packed_deferred(x, bits, group_size, axis, symmetric=symmetric,
                                         exclude=exclude, use_kernel=use_kernel, flag=validate)
    if flag is not None and int(flag.item()):            # the one sync; rare slow path below
        check_quantize_input(x, pqt)
    return pqt


def quantize_packed_deferred(x, bits: int, group_size: int, axis: str, *, symmetric: bool = False,
                             exclude=None, use_kernel: Optional[bool] = None, flag: bool = True
                             ) -> Tuple[PackedQuantizedTensor, Optional[torch.Tensor]]:
    """:func:`quantize_packed` without its host read: ``(packed, flag)``.

    On the kernel path ``flag`` is the kernel's int32 ``(1,)`` screen on the device (``None`` with
    ``flag=False``): non-zero when ``x`` holds NaN/Inf or a group's float32 statistics overflow,
    and then the caller must run :func:`check_quantize_input` (which raises the torch path's
    error) before using ``packed``; zero guarantees it would pass.  The torch path validates as it
    goes (raising at once) and returns ``flag = None``.
    """
    if use_kernel is None or use_kernel:
        # shape/dtype checks only: finiteness is checked by the kernel (fused) or below
        x32, bits, group_size, axis, symmetric, excl = _prepare(x, bits, group_size, axis, symmetric,
                                                                exclude, check_finite=False)
        kernel = _kernel_usable(x32, group_size, axis)
        if use_kernel and not kernel:
            raise ValueError("use_kernel=True but the Triton quantize kernel cannot run here "
                             "(needs a CUDA tensor, triton, and ceil(D / G) <= 16 for axis 'token'); "
                             "pass use_kernel=None")
        if kernel:
            from . import quantize_kernels
            f = torch.zeros(1, dtype=torch.int32, device=x32.device) if flag else None
            g = _ref.effective_group_size(group_size, x32.shape[GROUP_AXIS[axis]])
            words, s, z = quantize_kernels.quantize_pack(x32, excl, bits, g, axis, symmetric, f)
            return PackedQuantizedTensor(words=words, scale=s, zero=z, bits=bits, group_size=group_size,
                                         axis=axis, symmetric=symmetric, shape=tuple(x32.shape)), f
    x32, bits, group_size, axis, symmetric, excl = _prepare(x, bits, group_size, axis, symmetric, exclude)
    return _quantize_torch(x32, bits, group_size, axis, symmetric, excl).to_packed(), None


def quantize_defers_validation(x, group_size: int, axis: str) -> bool:
    """Whether :func:`quantize_packed_deferred` takes the kernel path for ``x`` (a torch tensor of
    the shape it will quantize): it then validates through the device flag, not by host reads."""
    return _kernel_usable(x, group_size, axis)


def check_quantize_input(x, pqt: PackedQuantizedTensor) -> None:
    """The exact checks behind a set kernel flag: raise the torch path's ``ValueError`` for ``x``
    (NaN/Inf) or the float32 overflow of ``pqt``'s statistics; return if neither holds."""
    check_x(x)
    if pqt.symmetric:
        check_overflow_symmetric(pqt.scale, symmetric_offset(pqt.bits))
    else:
        check_overflow_asymmetric(pqt.scale, pqt.zero, quantization_levels(pqt.bits))


def dequantize(qt) -> torch.Tensor:
    """float32 tensor ``qt.shape``: ``q * s + z`` (asymmetric) or ``(q - M) * s`` (symmetric).

    Accepts a :class:`QuantizedTensor` or a :class:`PackedQuantizedTensor`.
    """
    if isinstance(qt, PackedQuantizedTensor):
        qt = qt.unpack()
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor or PackedQuantizedTensor, got {type(qt).__name__}")
    gax = GROUP_AXIS[qt.axis]
    n = qt.shape[gax]
    s_full = expand_groups(qt.scale, qt.group_size, n, gax)
    if qt.symmetric:
        return symmetric_dequantize(qt.codes, s_full, qt.bits)
    z_full = expand_groups(qt.zero, qt.group_size, n, gax)
    return asymmetric_dequantize(qt.codes, s_full, z_full)
