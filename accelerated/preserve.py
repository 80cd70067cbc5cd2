"""Sets of preserved tokens, torch twin of ``reference/preserve.py`` (docs/03-preservation.md).

Masks are bool tensors ``(B, T)`` on any device.  Counting is done with
integer cumulative sums (exact); the oracle scores are computed in float64
like the reference's (on a device without float64 they are computed on the
CPU), so the masks are identical to the reference's.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

from reference.config import KVSinkConfig
from reference.preserve import check_count

__all__ = [
    "preserve_first_n",
    "oracle_scores",
    "attention_oracle",
    "union",
    "cap_preserved",
    "preserved_set",
    "preserved_step",
    "step_statuses",
    "check_count",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _bool_mask(name: str, x, shape=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch tensor, got {type(x).__name__}")
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool array, got dtype {x.dtype}")
    if shape is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(x.shape)}")
    elif tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (B, T), got {tuple(x.shape)}")
    return x




def preserve_first_n(valid: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` valid tokens of each row (Definition 3.1), bool ``(B, T)``."""
    valid = _bool_mask("valid", valid)
    n = check_count("n", n)
    rank = torch.cumsum(valid.to(torch.int64), dim=1)
    return valid & (rank <= n)


def _check_probs(probs, valid):
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a floating-point torch tensor, got {type(probs).__name__}")
    if probs.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"probs must be a floating-point array, got dtype {probs.dtype}")
    if probs.dim() != 4:
        raise ValueError(f"probs must have shape (B, Hq, Tq, T), got {tuple(probs.shape)}")
    b, hq, tq, t = probs.shape
    if tq > t:
        raise ValueError(f"probs has more queries (Tq={tq}) than keys (T={t}); the queries "
                         f"must be the last Tq of the T tokens")
    if hq == 0:
        raise ValueError("probs must have at least one head (Hq >= 1)")
    if probs.numel() and not bool(torch.isfinite(probs).all()):
        raise ValueError("probs contains NaN or Inf; pass finite attention probabilities")
    if probs.numel() and bool((probs < 0).any()):
        raise ValueError("probs contains negative values; pass softmax probabilities")
    if valid is None:
        valid = torch.ones((b, t), dtype=torch.bool, device=probs.device)
    else:
        valid = _bool_mask("valid", valid, (b, t)).to(probs.device)
    return probs, valid


def oracle_scores(probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Relative attention received by each token (Definition 3.2), float64 ``(B, T)``.

    See the reference for the formula; computed in float64 (on the CPU when
    the device has no float64).
    """
    p, valid = _check_probs(probs, valid)
    device = p.device
    if device.type == "mps":
        p, valid = p.cpu(), valid.cpu()
    p = p.to(torch.float64)
    b, hq, tq, t = p.shape
    ar = torch.arange(t, device=p.device)
    slots = torch.arange(t - tq, t, device=p.device)
    vis = valid[:, None, :] & (ar[None, None, :] <= slots[None, :, None])          # (B, Tq, T)
    n = vis.sum(dim=2).to(torch.float64)                                             # (B, Tq)
    q_real = valid[:, t - tq:]
    weight = torch.where(vis & q_real[:, :, None], n[:, :, None], torch.zeros((), dtype=torch.float64,
                                                                            device=p.device))
    total = torch.einsum("bhji,bji->bi", p, weight)
    n_queries = q_real.sum(dim=1).to(torch.float64)
    denom = hq * torch.clamp(n_queries, min=1.0)
    out = torch.where(valid, total / denom[:, None], torch.zeros((), dtype=torch.float64, device=p.device))
    return out.to(device)


def attention_oracle(probs: torch.Tensor, ratio: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``oracle_scores(probs, valid) >= ratio`` (Definition 3.2), bool ``(B, T)``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(ratio)) or ratio <= 0:
        raise ValueError(f"ratio must be a finite float > 0, got {ratio!r}")
    return oracle_scores(probs, valid) >= float(ratio)


def union(*masks) -> torch.Tensor:
    """Element-wise OR of one or more bool masks of the same shape (Definition 3.4)."""
    if len(masks) == 0:
        raise ValueError("union needs at least one mask")
    out = None
    for i, m in enumerate(masks):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{i}] must be a bool array, got dtype "
                            f"{getattr(m, 'dtype', type(m).__name__)}")
        if out is None:
            out = m.clone()
        elif tuple(m.shape) != tuple(out.shape):
            raise ValueError(f"masks[{i}] has shape {tuple(m.shape)}, masks[0] has {tuple(out.shape)}; "
                             "all masks must have the same shape")
        else:
            out |= m.to(out.device)
    return out


def cap_preserved(flags: torch.Tensor, max_count: Optional[int]) -> torch.Tensor:
    """Keep the earliest ``max_count`` True entries of each row (Definition 3.5)."""
    flags = _bool_mask("flags", flags)
    if max_count is None:
        return flags.clone()
    max_count = check_count("max_count", max_count)
    return flags & (torch.cumsum(flags.to(torch.int64), dim=1) <= max_count)


def preserved_set(config: KVSinkConfig, valid: torch.Tensor, predicted=None, oracle=None) -> torch.Tensor:
    """The tokens kept at full precision under ``config`` (Definition 3.6), bool ``(B, T)``."""
    if not isinstance(config, KVSinkConfig):
        raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
    valid = _bool_mask("valid", valid)
    sets = [torch.zeros_like(valid)]
    for policy in config.preserve:
        if policy == "pfn":
            sets.append(preserve_first_n(valid, config.preserve_first_n))
        elif policy == "kvsink":
            if predicted is None:
                raise ValueError("config.preserve includes 'kvsink' but predicted is None; pass "
                                 "predicted=predict_sinks(hidden, channels, threshold) (B, T)")
            sets.append(_bool_mask("predicted", predicted, valid.shape).to(valid.device))
        elif policy == "oracle":
            if oracle is None:
                raise ValueError("config.preserve includes 'oracle' but oracle is None; pass "
                                 "oracle=attention_oracle(probs, config.oracle_ratio, valid) (B, T)")
            sets.append(_bool_mask("oracle", oracle, valid.shape).to(valid.device))
        else:  # pragma: no cover - KVSinkConfig validates the names
            raise ValueError(f"unknown policy {policy!r}")
    flags = union(*sets) & valid
    return cap_preserved(flags, config.max_preserved)


def _count(name: str, x, b: int, device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.shape != (b,) or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape ({b},) (one count per row), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return x.to(device=device, dtype=torch.int64)


def preserved_step(config: KVSinkConfig, valid: torch.Tensor, valid_before: torch.Tensor,
                   preserved_before: torch.Tensor, predicted: Optional[torch.Tensor] = None):
    """The preserved set of the ``n`` newest tokens from per-row counts of the earlier ones
    (Proposition 3.7); torch twin of the reference's, exact (integer cumulative sums).

    ``valid`` bool ``(B, n)``; ``valid_before``, ``preserved_before`` int ``(B,)``; ``predicted``
    bool ``(B, n)`` (``"kvsink"``).  Returns ``(flags (B, n), valid count after, preserved count
    after)`` on ``valid``'s device, no device->host synchronisation (a decode step's statuses in a
    fixed number of operations, whatever the history's length)."""
    if not isinstance(config, KVSinkConfig):
        raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
    if "oracle" in config.preserve:
        raise ValueError("preserved_step cannot apply preserve='oracle' (its scores depend on "
                         "later queries); use preserved_set over the whole sequence")
    valid = _bool_mask("valid", valid)
    b, dev = valid.shape[0], valid.device
    v0 = _count("valid_before", valid_before, b, dev)
    p0 = _count("preserved_before", preserved_before, b, dev)
    if "kvsink" in config.preserve:
        if predicted is None:
            raise ValueError("config.preserve includes 'kvsink' but predicted is None; pass "
                             "predicted=predict_sinks(hidden, channels, threshold) (B, n)")
        predicted = _bool_mask("predicted", predicted, valid.shape).to(dev)
    return step_statuses(valid, v0, p0, predicted, preserve=config.preserve,
                         preserve_first_n=config.preserve_first_n, max_preserved=config.max_preserved)


def step_statuses(valid: torch.Tensor, valid_before: torch.Tensor, preserved_before: torch.Tensor,
                  predicted: Optional[torch.Tensor], *, preserve: Tuple[str, ...], preserve_first_n: int,
                  max_preserved: Optional[int]):
    """The arithmetic of :func:`preserved_step` on checked tensors and plain settings (what a
    traced, captured decode step calls: accelerated/hf/captured.py): ``valid``, ``predicted``
    bool ``(B, n)`` on one device (``predicted`` None without ``"kvsink"`` in ``preserve``),
    ``valid_before``, ``preserved_before`` int64 ``(B,)``; returns ``(flags, valid count after,
    preserved count after)``."""
    flags = torch.zeros_like(valid)
    if "pfn" in preserve:
        rank = torch.cumsum(valid, dim=1).add_(valid_before[:, None])
        flags |= valid & (rank <= preserve_first_n)
    if "kvsink" in preserve:
        flags |= predicted & valid
    if max_preserved is not None:
        flags &= torch.cumsum(flags, dim=1).add_(preserved_before[:, None]) <= max_preserved
    return flags, valid_before + valid.sum(dim=1), preserved_before + flags.sum(dim=1)
