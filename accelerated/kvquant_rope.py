"""KVQuant's rotary position embedding (definition 8.1), torch twin of ``reference/kvquant_rope.py``.

``rope_cos_sin`` evaluates cos/sin in float64 and rounds once, as the
reference; numpy's and torch's float64 ``cos`` may differ by one float64 ulp,
which changes the float32 result only when it lies within ``2**-29`` relative
of a float32 rounding boundary (docs/08-kvquant.md §8.11).  Only here:
:func:`model_inv_freq` (the model's RoPE buffer) and :func:`check_float` (the
float-tensor check the KVQuant modules share).
"""

from __future__ import annotations

from typing import Tuple

import torch

from reference import kvquant as _ref

__all__ = ["rope_inv_freq", "rope_angles", "rope_cos_sin", "rotate_half", "apply_rope", "unapply_rope",
           "rope_roundtrip_bound", "MAX_POSITION", "U32", "ETA32", "model_inv_freq", "check_float"]

_F32 = torch.float32
_F64 = torch.float64
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_POSITION = _ref.MAX_POSITION
U32, ETA32 = _ref.U32, _ref.ETA32


def check_float(name: str, x, min_ndim: int = 1) -> torch.Tensor:
    """``x`` (a finite float torch tensor of ``min_ndim`` dimensions at least) as float32; errors
    name the argument ``name``."""
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
    x32 = check_float("x", x, 2)
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
