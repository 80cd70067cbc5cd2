"""Uniform group quantization (CONTRACT: quantize; docs/02-quantization.md).

Differential: the port's codes, scales and zero points against the reference
on inputs drawn by ``strategies.quantize_cases`` (bits 1-8, group sizes that
do not divide the axis, excluded tokens, planted outliers, exact ties, zero
ranges, fp16 / bf16 / fp64 inputs).  The rules are those of
docs/09-tolerances.md (conformance/tolerances.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note, strategies as st

from reference import quantize as rq

from . import tolerances as tol
from .profiles import examples
from .strategies import kv_tensors, quantize_cases

pytestmark = pytest.mark.part("quantize")


def _reference_t(case, qt):
    """The reference's pre-rounding ratio ``t`` of every element, the counted mask, and where
    ``t`` is exact in every permitted arithmetic (``tolerances.exact_ratio``)."""
    x32 = case.x32
    gax = rq.GROUP_AXIS[case.axis]
    n = x32.shape[gax]
    excl = np.zeros(x32.shape[:-1], bool) if case.exclude is None else case.exclude
    counted = np.broadcast_to(~excl[..., :, None], x32.shape)
    s = rq.expand_groups(qt.scale, case.group_size, n, gax)
    z = None if case.symmetric else rq.expand_groups(qt.zero, case.group_size, n, gax)
    t, exact = tol.uniform_ratio(x32, s, z, counted)
    return t, counted, exact


def _note_case(case):
    note(case.describe())
    if case.x32.size <= 256:
        note(f"x (as float32) = {case.x32.tolist()!r}")
    if case.exclude is not None and case.exclude.size <= 64:
        note(f"exclude = {case.exclude.tolist()!r}")


@examples(250)
@given(quantize_cases())
def test_quantize_matches_reference(port, case):
    _note_case(case)
    want = rq.quantize(case.x32, case.bits, case.group_size, case.axis, symmetric=case.symmetric,
                       exclude=case.exclude)
    got = port.quantize(case.x, case.bits, case.group_size, case.axis, symmetric=case.symmetric,
                        exclude=case.exclude)
    tol.assert_identical(got.scale, want.scale, "scale")
    assert np.asarray(got.scale).dtype == np.float32, f"scale must be float32, got {np.asarray(got.scale).dtype}"
    if case.symmetric:
        assert got.zero is None, "the symmetric scheme has no zero point (zero must be None)"
    else:
        assert got.zero is not None, "the asymmetric scheme must return a zero point"
        assert np.asarray(got.zero).dtype == np.float32, f"zero must be float32, got {np.asarray(got.zero).dtype}"
        tol.assert_identical(got.zero, want.zero, "zero")
    t_ref, counted, exact = _reference_t(case, want)
    tol.check_codes(got.codes, want.codes, t_ref, counted, "codes", exact=exact)


@examples(100)
@given(quantize_cases(subnormal=True))
def test_quantize_subnormal_inputs_match_reference(port, case):
    """float32 subnormal inputs (magnitudes 1e-39 .. 1e-45): the contract covers them, and a port
    that flushes subnormals to zero (GPU ``.ftz``) or divides by a reciprocal fails here, by name
    (docs/09-tolerances.md 9.2(0): such a port must document it)."""
    test_quantize_matches_reference.hypothesis.inner_test(port, case)


@examples(150)
@given(quantize_cases())
def test_dequantize_matches_reference(port, case):
    """Dequantizing the reference's codes: ``q * s + z`` with two roundings (09.3)."""
    _note_case(case)
    qt = rq.quantize(case.x32, case.bits, case.group_size, case.axis, symmetric=case.symmetric,
                     exclude=case.exclude)
    got = port.dequantize(qt.codes, qt.scale, qt.zero, bits=qt.bits, group_size=qt.group_size,
                          axis=qt.axis, symmetric=qt.symmetric)
    want = rq.dequantize(qt)
    assert np.asarray(got).dtype == np.float32, f"dequantize must return float32, got {np.asarray(got).dtype}"
    gax = rq.GROUP_AXIS[qt.axis]
    s_full = rq.expand_groups(qt.scale, qt.group_size, qt.shape[gax], gax)
    tol.check_dequantized(got, want, qt.codes, s_full, qt.symmetric, "dequantized values")


@examples(100)
@given(quantize_cases(max_tokens=12))
def test_quantize_prefix_of_tokens_per_token_axis(port, case):
    """Per-token groups depend on their own token only: quantizing a prefix of the tokens
    gives the prefix of the result (what the cache relies on when it flushes token by token)."""
    if case.axis != "token" or case.x32.shape[-2] < 2:
        return
    _note_case(case)
    cut = case.x32.shape[-2] // 2
    full = port.quantize(case.x32, case.bits, case.group_size, "token", symmetric=case.symmetric,
                         exclude=case.exclude)
    part = port.quantize(np.ascontiguousarray(case.x32[..., :cut, :]), case.bits, case.group_size,
                         "token", symmetric=case.symmetric,
                         exclude=None if case.exclude is None else np.ascontiguousarray(case.exclude[..., :cut]))
    tol.assert_identical(part.codes, np.asarray(full.codes)[..., :cut, :], "codes of a token prefix")
    tol.assert_identical(part.scale, np.asarray(full.scale)[..., :cut, :], "scale of a token prefix")


# --------------------------------------------------------------------------- errors

@examples(30)
@given(st.sampled_from(["nan", "inf", "-inf"]), st.sampled_from(["token", "channel"]),
       st.integers(0, 11))
def test_quantize_rejects_non_finite(port, bad, axis, where):
    x = np.ones((3, 4), dtype=np.float32)
    x.flat[where] = float(bad)
    with pytest.raises(ValueError):
        port.quantize(x, 4, 2, axis)


@examples(30)
@given(st.sampled_from([0, 9, -1, 16]), st.booleans())
def test_quantize_rejects_bits_out_of_range(port, bits, symmetric):
    with pytest.raises(ValueError):
        port.quantize(np.ones((2, 4), np.float32), bits, 2, "token", symmetric=symmetric)


@examples(10)
@given(st.just(1))
def test_symmetric_rejects_one_bit(port, bits):
    with pytest.raises(ValueError):
        port.quantize(np.ones((2, 4), np.float32), bits, 2, "token", symmetric=True)


@examples(20)
@given(st.sampled_from([0, -3]), st.sampled_from(["token", "channel"]))
def test_quantize_rejects_bad_group_size(port, group_size, axis):
    with pytest.raises(ValueError):
        port.quantize(np.ones((2, 4), np.float32), 4, group_size, axis)


@examples(20)
@given(st.sampled_from(["tokens", "", "rows"]))
def test_quantize_rejects_bad_axis(port, axis):
    with pytest.raises(ValueError):
        port.quantize(np.ones((2, 4), np.float32), 4, 2, axis)


@examples(20)
@given(kv_tensors((2, 3, 4), allow_special=False))
def test_quantize_rejects_bad_exclude_shape(port, x):
    with pytest.raises((ValueError, TypeError)):
        port.quantize(x, 4, 2, "channel", exclude=np.zeros((2, 4), dtype=bool))


@examples(10)
@given(st.just(None))
def test_quantize_rejects_one_dimensional_input(port, _):
    with pytest.raises(ValueError):
        port.quantize(np.ones((8,), np.float32), 4, 2, "token")


@st.composite
def exact_tie_cases(draw):
    """Groups whose min and max make ``s`` a power of two, with values on the half-integer grid:
    ``(x - z) / s`` is then an exact tie ``k + 1/2`` for odd ``k`` (see the test)."""
    symmetric = draw(st.booleans(), label="symmetric")
    b = draw(st.integers(2 if symmetric else 1, 8), label="bits")
    axis = draw(st.sampled_from(["token", "channel"]), label="axis")
    g = draw(st.integers(2, 16), label="group_size")
    t = draw(st.integers(1, 20), label="T") if axis == "token" else draw(st.integers(2, 20), label="T")
    d = draw(st.integers(2, 40), label="D") if axis == "token" else draw(st.integers(1, 16), label="D")
    e = draw(st.integers(-8, 8), label="log2_scale")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    if symmetric:
        top = 2 ** (b - 1) - 1
        lo, hi, z = -2 * top, 2 * top, 0.0
    else:
        lo, hi = 0, 2 * (2**b - 1)
        z = draw(st.sampled_from([0.0, -1.0, 2.5, -40.0]), label="zero")
    k = rng.integers(lo, hi + 1, size=(t, d))
    gax = 1 if axis == "token" else 0
    n = k.shape[gax]
    for start in range(0, n, g):
        if min(g, n - start) >= 2:        # pin each group's extremes: s = 2**e exactly
            if gax == 1:
                k[:, start], k[:, start + 1] = lo, hi
            else:
                k[start, :], k[start + 1, :] = lo, hi
    x = (z + 2.0**e * k / 2.0).astype(np.float32)
    return x, b, g, axis, symmetric


@examples(100)
@given(exact_tie_cases())
def test_exact_ties_round_half_to_even(port, case):
    """Ties round half to even (docs/02-quantization.md 2.2: half away from zero is
    non-conforming).  Here ``x - z`` is exact and ``s`` a power of two, so ``t`` is the exact tie
    in every arithmetic that docs/09-tolerances.md 9.2(a) permits (IEEE division, reciprocal
    multiplication: ``1/s`` is exact; approximate hardware division: a power-of-two divisor
    has an exact reciprocal) and the near-tie allowance of 9.2(a) does not apply: codes must
    be identical (rule stated in docs/13-conformance.md, Tolerances)."""
    x, b, g, axis, symmetric = case
    note(f"quantize(x {x.shape}, bits={b}, group_size={g}, axis={axis!r}, symmetric={symmetric}); "
         f"x={x.tolist()}")
    want = rq.quantize(x, b, g, axis, symmetric=symmetric)
    got = port.quantize(x, b, g, axis, symmetric=symmetric)
    tol.assert_identical(got.codes, want.codes, "codes at exact ties",
                         rule="round half to even at exact ties (docs/02-quantization.md 2.2)")
