"""The accelerated port on CUDA: the Triton kernels of accelerated/*_kernels.py.

``--impl accelerated`` already runs on CUDA when a GPU is present (impls.py);
this module pins the device, so that the Triton path is exercised (and
reported) explicitly even when the default port runs elsewhere.  The kvquant
kernels (accelerated/kvquant_kernels.py) are also held to bit-identity, which is
stricter than the port rule of docs/08-kvquant.md 8.11.  Without CUDA
every test here is skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from . import test_attention as _attention_rules
from . import test_cache as _cache_rules
from . import test_kvquant as _kvquant_rules
from . import test_quantize as _quantize_rules
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
    _quantize_rules.test_quantize_matches_reference.hypothesis.inner_test(cuda_port, case)


@examples(150)
@given(attention_cases())
def test_cuda_attention_within_bound(cuda_port, case):
    _attention_rules.test_attention_within_bound.hypothesis.inner_test(cuda_port, case)


def test_cuda_cache_state_machine(cuda_port):
    _cache_rules.test_cache_state_machine(cuda_port)


# --------------------------------------------------------------------------- kvquant (kvquant_kernels.py)

def _kvquant_cases():
    return _kvquant_rules.kvquant_cases()


@examples(40)
@given(_kvquant_cases())
def test_triton_kvquant_block_matches_reference(cuda_port, case):
    """quantize_block_kvquant on CUDA (kernel where it applies) under the port rule of 8.11."""
    _kvquant_rules.test_quantize_block_matches_reference.hypothesis.inner_test(cuda_port, case)


@examples(30)
@given(_kvquant_cases())
def test_triton_kvquant_dequantize_matches_reference(cuda_port, case):
    _kvquant_rules.test_dequantize_matches_reference.hypothesis.inner_test(cuda_port, case)


@examples(60)
@given(_kvquant_cases())
def test_triton_kvquant_kernel_bit_identical(cuda_port, case):
    """Stricter than the port rule: the kernels' codes, packed words, ``s``, ``c`` and dequantized
    values equal the reference's bit for bit (docs/08-kvquant.md "Triton path": same float32
    operations, correctly rounded division, no FMA).  ``use_kernel=True`` on each side the
    kernels cover (keys always; values when ``ceil(D / G_v) <= 16``)."""
    from hypothesis import note
    from reference import kvquant as rkv
    from accelerated import kvquant as akv
    from accelerated import kvquant_kernels as kk
    from accelerated.packing import words_to_reference
    _identical = _kvquant_rules._identical
    torch_ = cuda_port.c.torch
    dev = cuda_port.c.device
    config, cal, excl = case["config"], case["calibration"], case["exclude"]
    sides = (("keys", config.key_bits, config.key_group_size, "channel", cal.key_levels_for()),
             ("values", config.value_bits, config.value_group_size, "token", cal.value_levels_for()))
    ran = []
    for name, bits, group, axis, levels in sides:
        x32 = np.asarray(case[name], dtype=np.float64).astype(np.float32)
        if not kk.kernel_supported(x32.shape, group, axis):
            continue
        ran.append(name)
        if axis == "channel":
            outl = rkv.key_outliers(x32, cal.key_lower, cal.key_upper, excl)
        else:
            outl = rkv.value_outliers(x32, config.outlier_fraction, excl)
        want = rkv.quantize_nonuniform(x32, levels, bits, group, axis, outliers=outl, exclude=excl)
        xt = cuda_port.c.any_in(x32)
        lt = cuda_port.c.any_in(levels, np.float32)
        et = None if excl is None else cuda_port.c.any_in(excl, bool)
        ot = cuda_port.c.any_in(outl, bool)
        got = akv.quantize_nonuniform(xt, lt, bits, group, axis, outliers=ot, exclude=et, use_kernel=True)
        _identical(got.codes.cpu().numpy(), want.codes, f"{name} codes (kernel)")
        _identical(got.scale.cpu().numpy().view(np.uint32), want.scale.view(np.uint32), f"{name} s (kernel)")
        _identical(got.centre.cpu().numpy().view(np.uint32), want.centre.view(np.uint32), f"{name} c (kernel)")
        beta = (lt[..., :-1] + lt[..., 1:]) / torch_.full_like(lt[..., 1:], 2.0)
        ex = torch_.zeros(x32.shape[0], x32.shape[2], dtype=torch_.bool, device=dev) if et is None else et
        _, words, _, _ = kk.quantize_dense(xt, ex, ot & ~ex[:, None, :, None], beta, bits, group, axis,
                                           codes=False, words=True)
        _identical(words_to_reference(words.cpu()), want.packed(), f"{name} packed words (kernel)")
        xh = akv.dequantize_nonuniform(got, use_kernel=True).cpu().numpy()
        _identical(xh.view(np.uint32), rkv.dequantize_nonuniform(want).view(np.uint32),
                   f"{name} dequantized (kernel)")
    note(f"kernel sides: {ran}")
