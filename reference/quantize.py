"""Uniform group quantization, the specification (docs/02-quantization.md).

Every definition of docs/02-quantization.md is one small function here:

=====  ==========================================  ===========================================
 def   concept                                     function
=====  ==========================================  ===========================================
 2.1   levels ``L``, symmetric offset ``M``        :func:`quantization_levels`, :func:`symmetric_offset`
 2.2   asymmetric scale / zero, codes, inverse     :func:`group_min_max`, :func:`asymmetric_scale_zero`,
                                                   :func:`asymmetric_ratio`, :func:`asymmetric_codes`,
                                                   :func:`asymmetric_dequantize`
 2.3   symmetric scale, codes, inverse             :func:`group_absmax`, :func:`symmetric_scale`,
                                                   :func:`symmetric_ratio`, :func:`symmetric_codes`,
                                                   :func:`symmetric_dequantize`
 2.4   bit packing                                 ``reference/packing.py``, :meth:`QuantizedTensor.packed`
 2.5   groups per token / per channel              :func:`split_groups`, :func:`expand_groups`,
                                                   :func:`quantize_per_token`, :func:`quantize_per_channel`
 2.6   excluded tokens, empty groups               ``exclude`` of the quantizers, :func:`group_min_max`
 2.7   storage, bytes                              :class:`QuantizedTensor`
=====  ==========================================  ===========================================

Numerics (fixed, see docs/CONTRACT.md): all arithmetic is IEEE float32; inputs
are cast to float32 first (float64 is rounded to nearest float32); rounding is
half to even (``np.rint``); the division is the correctly rounded float32
``(x - z) / s``; dequantization is ``q * s + z`` as two separately rounded
float32 operations (no fused multiply-add).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .packing import check_bits, pack_codes, packed_length, unpack_codes

__all__ = [
    "QuantizedTensor",
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
    "distance_to_tie_ulps",
    "quantize_per_token",
    "quantize_per_channel",
    "quantize",
    "dequantize",
]

#: Axis names; "token": groups along the head dimension D of one token,
#: "channel": groups of consecutive tokens (axis -2) of one channel.
AXES = ("token", "channel")
#: The array axis along which the groups of each quantization axis run.
GROUP_AXIS = {"token": -1, "channel": -2}

_F32 = np.float32
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# --------------------------------------------------------------------------- 2.1 levels

def quantization_levels(bits: int, symmetric: bool = False) -> int:
    """Largest code of a ``b``-bit quantizer (definition 2.1).

    asymmetric: ``L = 2**b - 1`` (codes ``0 .. L``, ``b`` in 1..8);
    symmetric:  ``2 * M = 2**b - 2`` with ``M = 2**(b-1) - 1`` (codes ``0 .. 2M``,
    ``b`` in 2..8; code ``2**b - 1`` is never used so that the grid is
    symmetric about zero).

    >>> quantization_levels(2), quantization_levels(2, symmetric=True)
    (3, 2)
    """
    if symmetric:
        return 2 * symmetric_offset(bits)
    return (1 << check_bits(bits)) - 1


def symmetric_offset(bits: int) -> int:
    """``M = 2**(b-1) - 1``, the code of the value 0 in the symmetric scheme (definition 2.1).

    >>> symmetric_offset(2), symmetric_offset(4), symmetric_offset(8)
    (1, 7, 127)
    """
    bits = check_bits(bits, lo=2, hi=8)
    return (1 << (bits - 1)) - 1


# --------------------------------------------------------------------------- 2.5 groups

def effective_group_size(group_size: int, n: int) -> int:
    """``min(G, n)`` (at least 1): the elements a group of an axis of length ``n`` can hold.

    ``G >= n`` is one group of the whole axis (definition 2.5); grouping by
    ``min(G, n)`` gives the same groups without padding them to ``G``.

    >>> effective_group_size(32, 64), effective_group_size(10**9, 64), effective_group_size(8, 0)
    (32, 64, 1)
    """
    return max(1, min(int(group_size), int(n)))


def split_groups(a: np.ndarray, group_size: int, axis: int, fill) -> np.ndarray:
    """Split ``axis`` (-1 or -2) of ``a`` into ``ceil(n / G)`` groups of ``G``.

    ``(..., n)       -> (..., ceil(n/G), G)``        for ``axis = -1``
    ``(..., n, D)    -> (..., ceil(n/G), G, D)``     for ``axis = -2``

    The last group is completed with ``fill`` when ``n % G != 0``; callers
    pass a ``fill`` that the group statistics ignore (a ``False`` "counted"
    flag).  The elements of a group lie along ``axis`` of the result.  A ``G``
    larger than the axis is one group of the whole axis, not padded to ``G``
    (its length is :func:`effective_group_size`).
    """
    n = a.shape[axis]
    group_size = effective_group_size(group_size, n)
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    if pad:
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        a = np.pad(a, widths, constant_values=fill)
    if axis == -1:
        return a.reshape(a.shape[:-1] + (n_groups, group_size))
    return a.reshape(a.shape[:-2] + (n_groups, group_size, a.shape[-1]))


def expand_groups(stat: np.ndarray, group_size: int, n: int, axis: int) -> np.ndarray:
    """Broadcast one value per group back to the ``n`` elements of the axis.

    ``(..., ceil(n/G))    -> (..., n)``      for ``axis = -1``
    ``(..., ceil(n/G), D) -> (..., n, D)``   for ``axis = -2``

    Element ``i`` of the axis gets the value of group ``i // G``.
    """
    full = np.repeat(stat, effective_group_size(group_size, n), axis=axis)
    return full[..., :n] if axis == -1 else full[..., :n, :]


# --------------------------------------------------------------------------- group statistics

def group_min_max(groups: np.ndarray, counted: np.ndarray, axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum of the counted elements of each group (definitions 2.2, 2.6).

    Parameters
    ----------
    groups : float32 ``(..., G)`` (``axis=-1``) or ``(..., G, D)`` (``axis=-2``), finite.
    counted : bool, same shape: ``False`` for padding of a partial group and
        for excluded tokens.
    axis : the group-element axis (-1 or -2).

    Returns
    -------
    (mn, mx) : float32, ``groups`` with ``axis`` removed.  A group with no
        counted element (empty group) gets ``mn = mx = 0``.
    """
    mn = np.where(counted, groups, _F32(np.inf)).min(axis=axis)
    mx = np.where(counted, groups, _F32(-np.inf)).max(axis=axis)
    empty = ~counted.any(axis=axis)
    return np.where(empty, _F32(0), mn).astype(_F32), np.where(empty, _F32(0), mx).astype(_F32)


def group_absmax(groups: np.ndarray, counted: np.ndarray, axis: int) -> np.ndarray:
    """``max |x|`` over the counted elements of each group; 0 for an empty group (definition 2.3).

    Shapes as in :func:`group_min_max`.
    """
    return np.where(counted, np.abs(groups), _F32(0)).max(axis=axis).astype(_F32)


# --------------------------------------------------------------------------- 2.2 asymmetric

def asymmetric_scale_zero(mn: np.ndarray, mx: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of the asymmetric scheme (definition 2.2).

    ``z = mn``,  ``s = fl32(fl32(mx - mn) / L)``  with ``L = 2**b - 1``.

    Parameters
    ----------
    mn, mx : float32 arrays of the same shape (group minimum and maximum).
    bits : int ``b`` in 1..8.

    Returns
    -------
    (s, z) : float32 arrays, shape of ``mn``.  ``s == 0`` exactly when
        ``mx == mn`` (or when the range underflows, ``mx - mn <= L * 2**-150``).

    Raises
    ------
    ValueError
        (naming ``x``) if ``mx - mn`` overflows float32, or if the largest
        dequantized value ``L * s + z`` does not fit in float32.
    """
    levels = _F32(quantization_levels(bits))
    mn = np.asarray(mn, dtype=_F32)
    mx = np.asarray(mx, dtype=_F32)
    with np.errstate(over="ignore"):
        width = mx - mn
        s = width / levels
        top = levels * s + mn
    if not np.all(np.isfinite(width)):
        raise ValueError("x: a group's range max - min overflows float32 (values of opposite sign "
                         "near +-3.4e38); rescale x or use a smaller group")
    if not np.all(np.isfinite(top)):
        raise ValueError("x: the largest dequantized value L * s + z overflows float32 "
                         "(values within a few ulp of the float32 maximum); rescale x")
    return s.astype(_F32), mn.astype(_F32)


def asymmetric_ratio(x: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The value before rounding, ``t = fl32(fl32(x - z) / s)``; ``t = 0`` where ``s == 0``.

    All arrays float32 of one (broadcast) shape; ``x >= z`` for counted elements.
    Exposed so that conformance tests can tell where a port's approximate
    division may round differently (docs/09-tolerances.md, part a).
    """
    diff = (x - z).astype(_F32)
    out = np.zeros(np.broadcast(diff, s).shape, dtype=_F32)
    np.divide(diff, s, out=out, where=(s != 0))
    return out


def asymmetric_codes(x: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
    """``q = clip(rint((x - z) / s), 0, L)`` as uint8; ``q = 0`` where ``s == 0`` (definition 2.2).

    ``rint`` rounds half to even: ``t = 0.5 -> 0``, ``1.5 -> 2``, ``2.5 -> 2``.
    """
    levels = quantization_levels(bits)
    t = asymmetric_ratio(x, s, z)
    return np.clip(np.rint(t), 0, levels).astype(np.uint8)


def asymmetric_dequantize(q: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``x_hat = fl32(fl32(q * s) + z)``, two rounded float32 operations, no FMA (definition 2.2)."""
    prod = (q.astype(_F32) * s).astype(_F32)
    return (prod + z).astype(_F32)


# --------------------------------------------------------------------------- 2.3 symmetric

def symmetric_scale(absmax: np.ndarray, bits: int) -> np.ndarray:
    """``s = fl32(a / M)`` with ``a = max |x|`` and ``M = 2**(b-1) - 1`` (definition 2.3).

    ``bits`` in 2..8.  ``s == 0`` exactly when ``a == 0`` (or ``a <= M * 2**-150``).

    Raises
    ------
    ValueError
        (naming ``x``) if the largest dequantized magnitude ``M * s`` overflows float32.
    """
    m = _F32(symmetric_offset(bits))
    s = (np.asarray(absmax, dtype=_F32) / m).astype(_F32)
    with np.errstate(over="ignore"):
        top = m * s
    if not np.all(np.isfinite(top)):
        raise ValueError("x: the largest dequantized magnitude M * s overflows float32 "
                         "(values within a few ulp of the float32 maximum); rescale x")
    return s


def symmetric_ratio(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``t = fl32(x / s)``; ``t = 0`` where ``s == 0``.  Float32, broadcast shape."""
    out = np.zeros(np.broadcast(x, s).shape, dtype=_F32)
    np.divide(x, s, out=out, where=(s != 0))
    return out


def symmetric_codes(x: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    """``q = clip(rint(x / s), -M, M) + M`` as uint8 (codes ``0 .. 2M``); ``q = M`` where ``s == 0``."""
    m = symmetric_offset(bits)
    t = symmetric_ratio(x, s)
    return (np.clip(np.rint(t), -m, m) + m).astype(np.uint8)


def symmetric_dequantize(q: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    """``x_hat = fl32((q - M) * s)``; ``q - M`` is exact (definition 2.3)."""
    m = symmetric_offset(bits)
    centred = (q.astype(_F32) - _F32(m)).astype(_F32)
    return (centred * s).astype(_F32)


# --------------------------------------------------------------------------- tolerance helper

def distance_to_tie_ulps(t: np.ndarray) -> np.ndarray:
    """Distance of float32 ``t`` to the nearest half-integer ``k + 1/2``, in ulps of ``t``.

    Used by conformance tests (docs/09-tolerances.md, part a): a port whose
    division differs from the reference by at most ``K`` ulps can round to a
    different code only where this distance is ``<= K``.  Returns float64
    ``(shape of t)``; ``ulp(t) = np.spacing(|t|)`` in float32.
    """
    t = np.asarray(t, dtype=_F32)
    t64 = t.astype(np.float64)
    tie = np.floor(t64) + 0.5
    return np.abs(t64 - tie) / np.spacing(np.abs(t)).astype(np.float64)


# --------------------------------------------------------------------------- validation

def check_x(x) -> np.ndarray:
    """``x`` as a finite float32 array with >= 2 dims, or a clear error."""
    x = np.asarray(x)
    if x.dtype.name not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating array ({', '.join(_FLOAT_DTYPES)}), got dtype "
                        f"{x.dtype}; convert it with x.astype(np.float32)")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., T, D), got shape {x.shape}")
    if not np.all(np.isfinite(x.astype(np.float64))):
        raise ValueError("x contains NaN or +-Inf; quantization needs finite values")
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float64).astype(_F32)   # exact for float16/bfloat16, rounds float64
    if not np.all(np.isfinite(x32)):
        raise ValueError("x has values outside the float32 range (|x| > 3.4e38); "
                         "they become Inf when rounded to float32")
    return x32


def check_group_size(group_size) -> int:
    """``group_size`` as an int >= 1, or ``ValueError`` naming it."""
    if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size, numbers.Integral):
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r} "
                         f"({type(group_size).__name__})")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} is out of range; allowed: >= 1")
    return int(group_size)


def check_symmetric(symmetric) -> bool:
    """``symmetric`` as a bool, or ``TypeError``: only ``True``/``False`` (Python or numpy bool)."""
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"symmetric must be a bool (True or False), got {symmetric!r} "
                        f"({type(symmetric).__name__})")
    return bool(symmetric)


def _check_exclude(exclude, x: np.ndarray) -> np.ndarray:
    """``exclude`` as a bool array ``x.shape[:-1]`` (all False when None)."""
    if exclude is None:
        return np.zeros(x.shape[:-1], dtype=bool)
    exclude = np.asarray(exclude)
    if exclude.dtype != np.bool_:
        raise TypeError(f"exclude must be a bool array of shape x.shape[:-1]={x.shape[:-1]}, "
                        f"got dtype {exclude.dtype}")
    if exclude.shape != x.shape[:-1]:
        raise ValueError(f"exclude must have shape x.shape[:-1]={x.shape[:-1]} (..., T), "
                         f"got {exclude.shape}")
    return exclude


def check_axis(axis) -> str:
    """``axis`` if it is one of :data:`AXES` (``token``, ``channel``), else ``ValueError``."""
    if axis not in AXES:
        raise ValueError(f"axis={axis!r} is not allowed; choose one of {AXES}")
    return axis


# --------------------------------------------------------------------------- 2.7 container

@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized ``(..., T, D)`` array (definition 2.7).

    Attributes
    ----------
    codes : uint8 ``shape`` (unpacked codes; see :meth:`packed`).
    scale : float32, ``(..., T, ceil(D/G))`` for axis "token",
        ``(..., ceil(T/G), D)`` for axis "channel".
    zero : float32, same shape as ``scale``; ``None`` for the symmetric scheme.
    bits : int ``b``.
    group_size : int ``G``.
    axis : "token" or "channel".
    symmetric : bool.
    shape : tuple, shape of the quantized array ``(..., T, D)``.

    Bytes of the stored form (:attr:`nbytes_packed`)::

        4 * prod(shape[:-1]) * ceil(D / (32 // b))        packed codes
      + 4 * scale.size  (+ 4 * zero.size if asymmetric)  float32 statistics
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: Optional[np.ndarray]
    bits: int
    group_size: int
    axis: str
    symmetric: bool
    shape: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if self.codes.dtype != np.uint8 or self.codes.shape != self.shape:
            raise ValueError(f"codes must be uint8 of shape {self.shape}, got "
                             f"{self.codes.dtype} {self.codes.shape}")
        expected = self.stat_shape(self.shape, self.group_size, self.axis)
        if self.scale.dtype != _F32 or self.scale.shape != expected:
            raise ValueError(f"scale must be float32 of shape {expected}, got "
                             f"{self.scale.dtype} {self.scale.shape}")
        if self.symmetric:
            if self.zero is not None:
                raise ValueError("zero must be None for the symmetric scheme")
        elif self.zero is None or self.zero.dtype != _F32 or self.zero.shape != expected:
            raise ValueError(f"zero must be float32 of shape {expected} for the asymmetric scheme")

    @staticmethod
    def stat_shape(shape: Tuple[int, ...], group_size: int, axis: str) -> Tuple[int, ...]:
        """Shape of ``scale``/``zero`` for an input of ``shape`` (definition 2.5)."""
        *lead, t, d = shape
        if axis == "token":
            return tuple(lead) + (t, -(-d // group_size))
        return tuple(lead) + (-(-t // group_size), d)

    def packed(self) -> np.ndarray:
        """Codes packed along D: uint32 ``(..., T, packed_length(D, b))`` (definition 2.4)."""
        return pack_codes(self.codes, self.bits)

    @classmethod
    def from_packed(cls, words, scale, zero, *, bits, group_size, axis, symmetric, shape) -> "QuantizedTensor":
        """Rebuild from packed words (inverse of :meth:`packed`); arguments as the attributes."""
        codes = unpack_codes(words, bits, tuple(shape)[-1]).reshape(tuple(shape))
        return cls(codes=codes, scale=np.asarray(scale), zero=None if zero is None else np.asarray(zero),
                   bits=bits, group_size=group_size, axis=axis, symmetric=symmetric, shape=tuple(shape))

    @property
    def nbytes_packed(self) -> int:
        """Bytes of the stored form: packed uint32 words + float32 scale (+ zero)."""
        words = math.prod(self.shape[:-1]) * packed_length(self.shape[-1], self.bits) * 4
        stats = self.scale.size * 4 + (0 if self.zero is None else self.zero.size * 4)
        return int(words + stats)


# --------------------------------------------------------------------------- quantizers

def _quantize(x, bits, group_size, axis, symmetric, exclude) -> QuantizedTensor:
    axis = check_axis(axis)
    bits = check_bits(bits)
    symmetric = check_symmetric(symmetric)
    if symmetric and bits < 2:
        raise ValueError(f"bits={bits} is not allowed with symmetric=True; allowed: 2..8 "
                         "(M = 2**(bits-1) - 1 must be >= 1)")
    group_size = check_group_size(group_size)
    x32 = check_x(x)
    excl = _check_exclude(exclude, x32)
    gax = GROUP_AXIS[axis]
    n = x32.shape[gax]

    # counted[..., t, d]: the element enters its group's statistics
    counted = np.broadcast_to(~excl[..., :, None], x32.shape)
    groups = split_groups(x32, group_size, gax, fill=0)
    counted_g = split_groups(counted, group_size, gax, fill=False)

    if symmetric:
        s = symmetric_scale(group_absmax(groups, counted_g, gax), bits)
        s_full = expand_groups(s, group_size, n, gax)
        # excluded elements take the value 0, whose code is M (the zero-range code)
        x_eff = np.where(counted, x32, _F32(0))
        codes = symmetric_codes(x_eff, s_full, bits)
        z = None
    else:
        mn, mx = group_min_max(groups, counted_g, gax)
        s, z = asymmetric_scale_zero(mn, mx, bits)
        s_full = expand_groups(s, group_size, n, gax)
        z_full = expand_groups(z, group_size, n, gax)
        # excluded elements take the value z, whose code is 0 (the zero-range code)
        x_eff = np.where(counted, x32, z_full)
        codes = asymmetric_codes(x_eff, s_full, z_full, bits)
    return QuantizedTensor(codes=codes, scale=s, zero=z, bits=bits, group_size=group_size,
                           axis=axis, symmetric=bool(symmetric), shape=x32.shape)


def quantize_per_token(x, bits: int, group_size: int, *, symmetric: bool = False,
                       exclude=None) -> QuantizedTensor:
    """Quantize groups of ``G`` consecutive elements along D of each token (definition 2.5).

    Parameters
    ----------
    x : float array ``(..., T, D)``, at least 2 dims, finite (float16, bfloat16,
        float32 or float64; rounded to float32 first).
    bits : ``b`` in 1..8 (symmetric: 2..8).
    group_size : ``G >= 1``.  ``D % G`` need not be 0: the last group of each
        token then has ``D % G`` elements; ``G > D`` gives one group of ``D``.
    symmetric : absmax scheme (definition 2.3) instead of min/max (2.2).
    exclude : None or bool ``(..., T)``; excluded tokens (preserved, padding)
        get the neutral code (0 asymmetric, ``M`` symmetric).  Per token the
        group holds only that token, so an excluded token has empty groups:
        ``scale = zero = 0``.

    Returns
    -------
    QuantizedTensor with ``scale.shape == (..., T, ceil(D/G))``.

    Raises
    ------
    TypeError for a non-float ``x`` or non-bool ``exclude``; ValueError for a
    bad shape, ``bits``, ``group_size``, non-finite ``x`` or range overflow.
    """
    return _quantize(x, bits, group_size, "token", symmetric, exclude)


def quantize_per_channel(x, bits: int, group_size: int, *, symmetric: bool = False,
                         exclude=None) -> QuantizedTensor:
    """Quantize groups of ``G`` consecutive tokens (axis -2) of each channel (definition 2.5).

    Parameters as :func:`quantize_per_token`, except that ``T % G`` need not
    be 0 (partial last token group; ``G > T`` gives one group of ``T``), and
    that excluded tokens leave the statistics of their group (definition 2.6)
    so that one huge preserved token does not inflate the scale of the others.

    Returns
    -------
    QuantizedTensor with ``scale.shape == (..., ceil(T/G), D)``.
    """
    return _quantize(x, bits, group_size, "channel", symmetric, exclude)


def quantize(x, bits: int, group_size: int, axis: str, *, symmetric: bool = False,
             exclude=None) -> QuantizedTensor:
    """Dispatch on ``axis``: "token" -> :func:`quantize_per_token`, "channel" -> :func:`quantize_per_channel`."""
    axis = check_axis(axis)
    if axis == "token":
        return quantize_per_token(x, bits, group_size, symmetric=symmetric, exclude=exclude)
    return quantize_per_channel(x, bits, group_size, symmetric=symmetric, exclude=exclude)


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """float32 array ``qt.shape``: ``q * s + z`` (asymmetric) or ``(q - M) * s`` (symmetric).

    Excluded slots dequantize to ``z`` of their group (asymmetric) or 0
    (symmetric); a group without counted elements has ``s = z = 0``, so its
    slots dequantize to 0.  Callers replace excluded slots by the preserved
    values or mask them out; they never read these numbers as data.
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    gax = GROUP_AXIS[qt.axis]
    n = qt.shape[gax]
    s_full = expand_groups(qt.scale, qt.group_size, n, gax)
    if qt.symmetric:
        return symmetric_dequantize(qt.codes, s_full, qt.bits)
    z_full = expand_groups(qt.zero, qt.group_size, n, gax)
    return asymmetric_dequantize(qt.codes, s_full, z_full)
