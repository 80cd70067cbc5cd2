"""Skip conditions shared by tests/ (one place; the test files import them from here).

* ``needs_cuda`` / ``CUDA_DEVICE`` / ``DEVICES``: tests and ``device`` parameters that need a GPU;
* ``needs_kernel`` / ``KERNEL_DEVICE``: the Triton kernels run -- on CUDA with triton, or on CPU
  under ``TRITON_INTERPRET=1`` with triton installed;
* ``needs_hf``: ``accelerated.cache`` and ``accelerated.hf`` import (transformers installed).

Tests that load the pretrained SmolLM2 model carry the ``model`` marker (pyproject.toml); run
``-m "not model"`` to leave them out.  The conformance suite has its own conftest.py.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

__all__ = ["CUDA", "HAVE_TRITON", "INTERPRET", "KERNEL_DEVICE", "needs_cuda", "needs_kernel",
           "needs_cuda_kernel", "needs_hf", "CUDA_DEVICE", "CUDA_KERNEL_DEVICE", "DEVICES",
           "hf_available"]

CUDA = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if CUDA and HAVE_TRITON:
    KERNEL_DEVICE = "cuda"
elif INTERPRET and HAVE_TRITON:
    KERNEL_DEVICE = "cpu"
else:
    KERNEL_DEVICE = None

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
needs_kernel = pytest.mark.skipif(KERNEL_DEVICE is None,
                                  reason="needs CUDA and triton (or TRITON_INTERPRET=1 with triton "
                                         "installed): the Triton kernels cannot run")
needs_cuda_kernel = pytest.mark.skipif(
    not CUDA, reason="needs CUDA: the Triton decode-attention kernel (accelerated/attention_kernels.py) "
                     "runs only on a GPU; the CPU variant runs the torch path")

#: ``device`` parameters: the CPU always, CUDA where there is a GPU (else a skipped case)
CUDA_DEVICE = pytest.param("cuda", marks=needs_cuda)
CUDA_KERNEL_DEVICE = pytest.param("cuda", marks=needs_cuda_kernel)
DEVICES = ["cpu", CUDA_DEVICE]


def hf_available() -> bool:
    """Whether ``accelerated.cache`` and ``accelerated.hf`` import (transformers installed)."""
    try:
        import accelerated.cache  # noqa: F401
        import accelerated.hf  # noqa: F401
    except ImportError:
        return False
    return True


needs_hf = pytest.mark.skipif(not hf_available(), reason="accelerated.cache / accelerated.hf not importable")
