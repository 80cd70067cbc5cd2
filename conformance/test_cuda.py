"""The accelerated port on CUDA: the Triton kernels of accelerated/*_kernels.py.

``--impl accelerated`` already runs on CUDA when a GPU is present (impls.py);
this module pins the device, so that the Triton path is exercised (and
reported) explicitly even when the default port runs elsewhere.  Without CUDA
every test here is skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from . import tolerances as tol
from .profiles import examples
from .strategies import attention_cases, quantize_cases

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="CUDA is not available: the Triton path of accelerated/ is not exercised here"),
]


@pytest.fixture(scope="module")
def cuda_port(request):
    from .conftest import _spec
    if _spec(request.config) != "accelerated":
        pytest.skip(f"the CUDA checks concern accelerated/; --impl {_spec(request.config)!r} is tested "
                    "through the adapter on its own device")
    from .impls import AcceleratedPort
    return AcceleratedPort("cuda")


@examples(150)
@given(quantize_cases())
def test_triton_quantize_matches_reference(cuda_port, case):
    from .test_quantize import test_quantize_matches_reference
    test_quantize_matches_reference.hypothesis.inner_test(cuda_port, case)


@examples(150)
@given(attention_cases())
def test_cuda_attention_within_bound(cuda_port, case):
    from .test_attention import test_attention_within_bound
    test_attention_within_bound.hypothesis.inner_test(cuda_port, case)


def test_cuda_cache_state_machine(cuda_port):
    from .test_cache import test_cache_state_machine
    test_cache_state_machine(cuda_port)
