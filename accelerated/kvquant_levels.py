"""KVQuant's levels and normalisation (definitions 8.2-8.4), torch twin of ``reference/kvquant_levels.py``.

The nf grid is the reference's constant; the operations are the reference's
float32 operations one by one (tensor / tensor divisions, separate multiply
and add), so the results are bit-identical.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from reference import kvquant as _ref

__all__ = ["nf_levels", "check_levels", "level_boundaries", "nearest_level", "normalisation", "normalised",
           "level_dequantize", "check_range"]

_F32 = torch.float32


def nf_levels(bits: int, device=None) -> torch.Tensor:
    """The reference's nf grid (definition 8.2) as a float32 tensor ``(2**b,)``."""
    return torch.from_numpy(_ref.nf_levels(bits)).to(device)


def check_levels(levels, bits: Optional[int] = None) -> torch.Tensor:
    """``levels`` as float32 ``(..., n)``: finite, in [-1, 1], sorted, ``n = 2**bits`` if given."""
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
    lv = check_levels(levels)
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
    check_range(s, c)
    return s, c


def check_range(s: torch.Tensor, c: torch.Tensor) -> None:
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
