"""The KVSink sink predictor, torch twin of ``reference/predictor.py`` (docs/04-predictor.md).

The online rule (:func:`outlier_scores`, :func:`predict_sinks`) runs on torch
tensors on any device and gives exactly the reference's answer: ``|.|`` and
``max`` are exact in float32, and the strict comparison ``score > threshold``
(threshold a float64 number) is done in float32 against the threshold
rounded *down* to float32, which is equivalent for every float32 score (if
``t0 <= thr < t1`` are consecutive float32 numbers around a non-float32
``thr``, then ``score > thr  <=>  score >= t1  <=>  score > t0``).  This
avoids float64 on devices without it.

Calibration (:func:`calibrate_predictor` and its parts) runs once per model,
offline: the tensors are moved to numpy and the reference's functions are
called, so the medians are the reference's by construction.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from reference import predictor as _ref
from reference.predictor import check_channels, check_threshold

__all__ = [
    "outlier_scores",
    "channel_scores",
    "predict_sinks",
    "SinkPredictor",
    "threshold_float32",
    "layer_outlier_channels",
    "sink_channels",
    "stable_outlier_channels",
    "sink_threshold",
    "check_channels",
    "check_threshold",
    "calibrate_predictor",
    "DEFAULT_OUTLIER_RATIO",
    "DEFAULT_WINDOW",
    "DEFAULT_GROWTH",
    "DEFAULT_MAX_FRACTION",
]

DEFAULT_OUTLIER_RATIO = _ref.DEFAULT_OUTLIER_RATIO
DEFAULT_WINDOW = _ref.DEFAULT_WINDOW
DEFAULT_GROWTH = _ref.DEFAULT_GROWTH
DEFAULT_MAX_FRACTION = _ref.DEFAULT_MAX_FRACTION
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _hidden(name: str, x, checks=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor (float16/bfloat16/float32/float64), "
                        f"got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., T, C) with at least 2 dims, got {tuple(x.shape)}")
    if checks is not None:        # recorded, read later (accelerated.cache.DeferredChecks): no sync
        checks.finite(x, f"{name} contains NaN or Inf; pass finite hidden states")
    elif x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; pass finite hidden states")
    return x.to(torch.float32)


def threshold_float32(threshold) -> float:
    """The largest float32 number ``<= threshold`` (as a Python float), for exact float32 comparison."""
    thr = check_threshold(threshold)
    t32 = np.float32(thr)
    if float(t32) > thr:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return float(t32)


@functools.lru_cache(maxsize=16)
def _channel_index(channels: tuple, device: torch.device) -> torch.Tensor:
    """The channels as an int64 tensor on ``device``, made once: a host->device copy on every
    decode step would synchronise (a copy from pageable host memory waits for the stream)."""
    return torch.tensor(channels, dtype=torch.long, device=device)


def outlier_scores(hidden: torch.Tensor, channels, *, checks=None) -> torch.Tensor:
    """``s_t = max_{c in channels} |h[..., t, c]|``, float32 ``(..., T)`` (Definition 4.1).

    ``checks``: None (a NaN/Inf in ``hidden`` raises ``ValueError`` here, one device->host
    synchronisation) or an ``accelerated.cache.DeferredChecks`` that records the test instead."""
    h = _hidden("hidden", hidden, checks)
    return channel_scores(h, _channel_index(tuple(check_channels(channels, h.shape[-1])), h.device))


def channel_scores(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Definition 4.1's arithmetic, ``max_{c in index} |h[..., t, c]|`` (``(..., T)``), for a float32
    ``hidden`` and the channels as an int64 tensor on its device, both checked by the caller
    (:func:`outlier_scores`; a captured decode step, accelerated/hf/captured.py)."""
    return hidden.index_select(-1, index).abs().amax(dim=-1)


def predict_sinks(hidden: torch.Tensor, channels, threshold, *, checks=None) -> torch.Tensor:
    """bool ``(..., T)``: ``outlier_scores(hidden, channels) > threshold`` (Definition 4.2).

    The comparison is with the float32 threshold (:func:`threshold_float32`, exact in float32);
    ``checks`` as :func:`outlier_scores`."""
    return outlier_scores(hidden, channels, checks=checks) > threshold_float32(threshold)


class SinkPredictor(_ref.SinkPredictor):
    """The reference's predictor record whose :meth:`predict` takes torch tensors."""

    def predict(self, hidden):
        if isinstance(hidden, torch.Tensor):
            return predict_sinks(hidden, self.channels, self.threshold)
        return _ref.predict_sinks(hidden, self.channels, self.threshold)

    @classmethod
    def from_reference(cls, p) -> "SinkPredictor":
        return cls(p.layer, p.channels, p.threshold)


def _np(x):
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.detach().cpu().numpy()
    return x


def layer_outlier_channels(hidden, ratio: float = DEFAULT_OUTLIER_RATIO, *, valid=None) -> np.ndarray:
    """Reference Definition 4.3 on a torch (or numpy) input; sorted int64 numpy array."""
    return _ref.layer_outlier_channels(_np(hidden), ratio, valid=_np(valid))


def sink_channels(hidden, ratio: float = DEFAULT_OUTLIER_RATIO,
                  max_fraction: float = DEFAULT_MAX_FRACTION, *, valid=None) -> np.ndarray:
    """Reference Definition 4.3b on a torch (or numpy) input; sorted int64 numpy array."""
    return _ref.sink_channels(_np(hidden), ratio, max_fraction, valid=_np(valid))


def stable_outlier_channels(hidden_states: Sequence, ratio: float = DEFAULT_OUTLIER_RATIO, *,
                            window: int = DEFAULT_WINDOW, valid=None,
                            max_fraction: float = DEFAULT_MAX_FRACTION):
    """Reference Definition 4.4 on torch (or numpy) hidden states."""
    return _ref.stable_outlier_channels([_np(h) for h in hidden_states], ratio, window=window,
                                        valid=_np(valid), max_fraction=max_fraction)


def sink_threshold(hidden, ratio: float = DEFAULT_OUTLIER_RATIO, *, valid=None) -> float:
    """Reference Definition 4.5 on a torch (or numpy) input."""
    return _ref.sink_threshold(_np(hidden), ratio, valid=_np(valid))


def calibrate_predictor(hidden_states: Sequence, *, ratio: float = DEFAULT_OUTLIER_RATIO,
                        window: int = DEFAULT_WINDOW, growth: float = DEFAULT_GROWTH,
                        valid=None, max_fraction: float = DEFAULT_MAX_FRACTION) -> SinkPredictor:
    """Reference Definition 4.6 on torch (or numpy) hidden states; returns a torch-aware predictor."""
    try:
        states = [_np(h) for h in hidden_states]
    except TypeError:
        raise TypeError("hidden_states must be a sequence of (T, C) or (B, T, C) arrays, "
                        "index 0 = embeddings") from None
    p = _ref.calibrate_predictor(states, ratio=ratio, window=window, growth=growth,
                                 valid=_np(valid), max_fraction=max_fraction)
    return SinkPredictor.from_reference(p)
