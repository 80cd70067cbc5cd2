"""Argument checks of the quantized KV cache (docs/06-cache.md).

Each returns the argument in the form the cache stores (a copy where the
cache keeps it) or raises an error naming the argument and the fix:

* :func:`check_storage_dtype` -- the storage dtype of the full-precision parts;
* :func:`check_kv` -- keys or values ``(B, H, n, D)``, finite, cast to it;
* :func:`check_mask` -- a bool ``(B, n)`` mask (``valid``, ``preserve``);
* :func:`check_index` -- batch-row indices (``reorder``, ``select_batch``);
* :func:`is_int` -- an integer that is not a bool.

The KVQuant-only checks (calibration, rotary frequencies and positions) live
with the KVQuant store in :mod:`reference.cache_kvquant`.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np

__all__ = ["STORAGE_DTYPES", "check_storage_dtype", "check_kv", "check_mask", "check_index",
           "is_int"]

#: Allowed storage dtypes of the full-precision parts (preserved store, residual).
STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def check_storage_dtype(dtype) -> np.dtype:
    """``dtype`` as a ``np.dtype`` of :data:`STORAGE_DTYPES`, or ``ValueError``."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be np.float32 or np.float16, got {dtype!r}") from None
    if dt not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be np.float32 or np.float16 (storage dtype of the "
                         f"full-precision parts), got {dt}")
    return dt


def check_kv(name: str, x, dtype: np.dtype) -> np.ndarray:
    """``x`` as a ``(B, H, n, D)`` array of the storage dtype, finite, or a clear error."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype "
                        f"{arr.dtype}")
    if arr.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (B, H, n, D), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; the cache stores finite values only")
    with np.errstate(over="ignore"):
        stored = arr.astype(dtype)
    if not np.all(np.isfinite(stored)):
        raise ValueError(f"{name} has values outside the range of the storage dtype {dtype} "
                         f"(|x| > {np.finfo(dtype).max}); use dtype=np.float32")
    return stored


def check_mask(name: str, x, shape: Tuple[int, ...]) -> np.ndarray:
    """A copy of ``x``, a bool array of ``shape`` (``(B, n)``), or a clear error."""
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array of shape {shape}, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (B, n), got {arr.shape}")
    return arr.copy()


def check_index(name: str, idx, batch: int, length: Optional[int]) -> np.ndarray:
    """int64 row indices in ``[0, batch)``, non-empty, of ``length`` entries if not None."""
    arr = np.asarray(idx)
    if arr.ndim == 1 and arr.shape[0] == 0:
        raise ValueError(f"{name} must select at least one row, got an empty list")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of row indices, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have length B={length} (one source row per row), "
                         f"got {arr.shape[0]}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must select at least one row")
    if np.any(arr < 0) or np.any(arr >= batch):
        raise ValueError(f"{name} must hold row indices in [0, {batch}), got {arr.tolist()}")
    return arr.astype(np.int64)


def is_int(x) -> bool:
    """True for an integer (Python or numpy) that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))
