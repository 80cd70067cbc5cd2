"""KVQuant, definition 8.1: the rotary embedding (docs/08-kvquant.md §8.1).

Part of the KVQuant specification split by concern (``reference.kvquant``
re-exports every public name):

* ``kvquant_rope``        8.1        rotary embedding, applied and undone (this module)
* ``kvquant_levels``      8.2 - 8.4  the nf grid, nearest level, group normalisation
* ``kvquant_tensor``      8.5 - 8.7  outliers and the dense-and-sparse tensor
* ``kvquant_calibration`` 8.8 - 8.9  weighted k-means and one layer's calibration
* ``kvquant``             8.10       one block of the cache; fake quantization

Llama / transformers "rotate half" convention.  ``x`` is ``(..., T, D)``;
positions are integers in ``[0, 2**24)`` (exact in float32) broadcastable to
``x.shape[:-1]`` (keys ``(B, H, T, D)``: ``positions[:, None, :]``).  Numerics
as docs/02-quantization.md: IEEE float32, each operation rounded separately.
"""

from __future__ import annotations

import math
import numbers
from typing import Tuple

import numpy as np

from .quantize import check_x

__all__ = ["rope_inv_freq", "rope_angles", "rope_cos_sin", "rotate_half", "apply_rope",
           "unapply_rope", "rope_roundtrip_bound", "MAX_POSITION", "U32", "ETA32"]

_F32 = np.float32
#: float32 unit roundoff.
U32 = 2.0 ** -24
#: Smallest float32 subnormal.
ETA32 = 2.0 ** -149
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
    x32 = check_x(x)
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
