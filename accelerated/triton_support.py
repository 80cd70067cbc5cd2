"""What the Triton kernel modules share: ``triton`` / ``tl`` (or, without triton, a stand-in so that
the modules import and only a launch fails), the device properties launch choices are made from,
and the power-of-two helpers of their tilings.

The kernels themselves live beside the torch code that calls them: ``attention_kernels.py``
(``attention.py``), ``quantize_kernels.py`` (``quantize.py``), ``kvquant_kernels.py``
(``kvquant.py``).  Each opens with its memory layout and bytes-moved budget, and each chooses its
launch settings (a frozen dataclass) in one function from :func:`device_properties`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["HAVE_TRITON", "triton", "tl", "DeviceProperties", "device_properties", "CPU_NOMINAL_SMS",
           "next_pow2", "floor_pow2"]

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:                                   # CPU-only install: kernels defined, never run
    HAVE_TRITON = False
    tl = None

    class _Unlaunchable:
        """Stands for a ``@triton.jit`` function when triton is not installed."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")
            self.__doc__ = getattr(fn, "__doc__", None)

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.__name__} is a Triton kernel and triton is not installed; "
                               "install triton (CUDA) or use the torch path (use_kernel=None)")

    class _MissingTriton:
        """``triton.jit`` / ``triton.jit(...)`` without triton: wraps the function, never compiles it."""

        @staticmethod
        def jit(fn=None, **options):
            if fn is None:
                return _Unlaunchable
            return _Unlaunchable(fn)

    triton = _MissingTriton()


@dataclass(frozen=True)
class DeviceProperties:
    """What the launch choices read of a device."""

    name: str
    sm_count: int          # streaming multiprocessors (CPU / interpreter: a nominal 16)
    capability: tuple      # (major, minor); (0, 0) off CUDA


#: SM count assumed off CUDA (the Triton interpreter on CPU): only the number of splits depends on it
CPU_NOMINAL_SMS = 16


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> DeviceProperties:
    p = torch.cuda.get_device_properties(index)
    return DeviceProperties(name=p.name, sm_count=int(p.multi_processor_count),
                            capability=(int(p.major), int(p.minor)))


def device_properties(device) -> DeviceProperties:
    """The properties of ``device`` (a ``torch.device`` or string), read once per CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceProperties(name=device.type, sm_count=CPU_NOMINAL_SMS, capability=(0, 0))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_properties(index)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def floor_pow2(n: int) -> int:
    """Largest power of two <= max(n, 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)
