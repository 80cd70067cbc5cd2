"""Unit tests of reference/quantize.py (docs/02-quantization.md, docs/09-tolerances.md §a-b,
docs/10-worked-example.md)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from reference.packing import pack_codes
from reference.quantize import (
    QuantizedTensor, asymmetric_ratio, dequantize, distance_to_tie_ulps, quantization_levels,
    quantize, quantize_per_channel, quantize_per_token, symmetric_offset,
)

F32 = np.float32
U = 2.0 ** -24          # float32 unit roundoff
ETA = 2.0 ** -149       # smallest float32 subnormal
DOCS = Path(__file__).resolve().parents[1] / "docs"


def expanded(qt, stat):
    """Per-element copy of a per-group statistic (test-side, independent of expand_groups)."""
    t, d = qt.shape[-2:]
    if qt.axis == "token":
        return stat[..., np.arange(d) // qt.group_size]
    return stat[..., np.arange(t) // qt.group_size, :]


def round_trip_bound(qt, x_hat):
    """docs/09-tolerances.md (09.1): |x - x_hat| <= s/2 + 4u (L s + |x_hat|) + (L + 2) eta."""
    levels = quantization_levels(qt.bits, qt.symmetric)
    s = expanded(qt, qt.scale).astype(np.float64)
    return s / 2 + 4 * U * (levels * s + np.abs(x_hat.astype(np.float64))) + (levels + 2) * ETA


# --------------------------------------------------------------------------- hand-computed examples

def test_levels():
    assert [quantization_levels(b) for b in (1, 2, 4, 8)] == [1, 3, 15, 255]
    assert [symmetric_offset(b) for b in (2, 3, 8)] == [1, 3, 127]
    assert quantization_levels(3, symmetric=True) == 6


def test_two_bit_group_exact():
    x = np.array([[0.0, 1.0, 2.0, 3.0]], F32)
    qt = quantize_per_token(x, 2, 4)
    assert qt.scale.tolist() == [[1.0]] and qt.zero.tolist() == [[0.0]]
    assert qt.codes.tolist() == [[0, 1, 2, 3]]
    assert qt.codes.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(qt), x)


def test_ties_round_half_to_even():
    # min 0, max 3, L = 3 -> s = 1: t = 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half away from zero would give 1, 2, 3)
    x = np.array([[0.0, 0.5, 1.5, 2.5, 3.0]], F32)
    qt = quantize_per_token(x, 2, 5)
    assert qt.codes.tolist() == [[0, 0, 2, 2, 3]]
    assert dequantize(qt).tolist() == [[0.0, 0.0, 2.0, 2.0, 3.0]]


def test_symmetric_hand_example():
    # b = 3: M = 3, absmax 3 -> s = 1; t = -3, -1.5, .5, 2.5, 3 -> -3, -2, 0, 2, 3 -> codes +3
    x = np.array([[-3.0, -1.5, 0.5, 2.5, 3.0]], F32)
    qt = quantize_per_token(x, 3, 8, symmetric=True)
    assert qt.zero is None and qt.scale.tolist() == [[1.0]]
    assert qt.codes.tolist() == [[0, 1, 3, 5, 6]]
    assert dequantize(qt).tolist() == [[-3.0, -2.0, 0.0, 2.0, 3.0]]


def test_division_not_reciprocal_multiplication():
    # s = 0.1f (not exact); (x - z) / s and (x - z) * (1/s) differ for some x: the reference uses division
    rng = np.random.default_rng(0)
    x = np.concatenate([[0.0, 0.3], rng.uniform(0, 0.3, 4094)]).astype(F32)[None, :]
    qt = quantize_per_token(x, 2, x.shape[1])
    s, z = qt.scale[0, 0], qt.zero[0, 0]
    t = asymmetric_ratio(x, s, z)
    np.testing.assert_array_equal(t, ((x - z) / s).astype(F32))
    np.testing.assert_array_equal(qt.codes, np.clip(np.rint(t), 0, 3).astype(np.uint8))


def test_dequantize_is_two_roundings():
    # q * s + z without FMA: fl(fl(q s) + z), checked against float64 arithmetic rounded twice
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 64)).astype(F32) * F32(7.3)
    qt = quantize_per_token(x, 3, 16)
    s = expanded(qt, qt.scale)
    z = expanded(qt, qt.zero)
    two_roundings = (qt.codes.astype(np.float64) * s).astype(F32).astype(np.float64) + z
    np.testing.assert_array_equal(dequantize(qt), two_roundings.astype(F32))


# --------------------------------------------------------------------------- edge cases of 2.5 / 2.6

def test_zero_range_group_is_exact():
    x = np.array([[2.5, 2.5, 2.5, -1.0, 4.0, 0.0]], F32)
    qt = quantize_per_token(x, 4, 3)
    assert qt.scale[0, 0] == 0 and qt.zero[0, 0] == F32(2.5)
    assert qt.codes[0, :3].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(dequantize(qt)[0, :3], x[0, :3])
    qs = quantize_per_token(np.zeros((2, 4), F32), 4, 4, symmetric=True)
    assert qs.scale.tolist() == [[0.0], [0.0]]
    assert (qs.codes == symmetric_offset(4)).all()
    assert (dequantize(qs) == 0).all()


def test_partial_last_group_per_token():
    x = np.array([[0.0, 3.0, 1.0, 10.0, 12.0, 16.0, -5.0]], F32)   # D = 7, G = 3: groups 3, 3, 1
    qt = quantize_per_token(x, 2, 3)
    assert qt.scale.shape == (1, 3)
    assert qt.zero.tolist() == [[0.0, 10.0, -5.0]]
    assert qt.scale.tolist() == [[1.0, 2.0, 0.0]]
    assert qt.codes.tolist() == [[0, 3, 1, 0, 1, 3, 0]]
    assert dequantize(qt)[0, -1] == F32(-5.0)


def test_partial_last_group_per_channel_uses_own_elements():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 10, 5)).astype(F32)                 # T = 10, G = 4: 4, 4, 2 tokens
    qt = quantize_per_channel(x, 3, 4)
    assert qt.scale.shape == (2, 3, 3, 5)
    last = quantize_per_channel(x[..., 8:, :], 3, 4)
    np.testing.assert_array_equal(qt.scale[..., 2:, :], last.scale)
    np.testing.assert_array_equal(qt.zero[..., 2:, :], last.zero)
    np.testing.assert_array_equal(qt.codes[..., 8:, :], last.codes)
    np.testing.assert_array_equal(qt.zero[..., 2, :], x[..., 8:, :].min(axis=-2))


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_group_larger_than_axis_is_one_partial_group(axis):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 6, 5)).astype(F32)
    n = 5 if axis == "token" else 6
    a, b = quantize(x, 2, 1000, axis), quantize(x, 2, n, axis)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_excluded_sink_does_not_change_other_tokens():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 8, 4)).astype(F32)
    exclude = np.zeros((2, 8), bool)
    exclude[:, 0] = True
    with_sink = x.copy()
    with_sink[:, 0, :] = 1e4
    a = quantize_per_channel(x, 2, 8, exclude=exclude)
    b = quantize_per_channel(with_sink, 2, 8, exclude=exclude)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.zero, b.zero)
    np.testing.assert_array_equal(a.codes, b.codes)
    # statistics are those of the non-excluded tokens alone
    np.testing.assert_array_equal(b.zero[:, 0, :], x[:, 1:, :].min(axis=1))
    assert (b.codes[:, 0, :] == 0).all()
    # and without exclusion the sink inflates the scale of every channel
    c = quantize_per_channel(with_sink, 2, 8)
    assert (c.scale > 100 * a.scale).all()


def test_excluded_codes_and_empty_groups():
    x = np.arange(24, dtype=F32).reshape(6, 4)
    exclude = np.array([True, True, False, False, True, True])
    qa = quantize_per_channel(x, 2, 2, exclude=exclude)           # token groups {0,1} {2,3} {4,5}
    assert qa.scale[0].tolist() == [0.0] * 4 and qa.zero[0].tolist() == [0.0] * 4
    assert qa.scale[2].tolist() == [0.0] * 4 and qa.zero[2].tolist() == [0.0] * 4
    assert (qa.codes[exclude] == 0).all()
    deq = dequantize(qa)
    assert (deq[exclude] == 0).all()
    np.testing.assert_array_equal(deq[2:4], x[2:4])               # 2-token groups, 2 bits: exact
    qs = quantize_per_channel(x, 2, 2, symmetric=True, exclude=exclude)
    assert (qs.codes[exclude] == symmetric_offset(2)).all()
    assert (dequantize(qs)[exclude] == 0).all()
    qt = quantize_per_token(x, 3, 4, exclude=exclude)
    assert (qt.scale[exclude] == 0).all() and (qt.zero[exclude] == 0).all()
    assert (qt.codes[exclude] == 0).all()


def test_input_dtypes():
    rng = np.random.default_rng(5)
    x64 = rng.normal(size=(4, 8)) * 3
    a = quantize_per_token(x64, 4, 8)
    b = quantize_per_token(x64.astype(F32), 4, 8)               # float64 is rounded to float32 first
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    x16 = x64.astype(np.float16)
    c = quantize_per_token(x16, 4, 8)
    np.testing.assert_array_equal(c.scale, quantize_per_token(x16.astype(F32), 4, 8).scale)
    assert dequantize(c).dtype == F32


def test_quantize_dispatch():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 6, 8)).astype(F32)
    for axis, fn in (("token", quantize_per_token), ("channel", quantize_per_channel)):
        a, b = quantize(x, 3, 4, axis, symmetric=True), fn(x, 3, 4, symmetric=True)
        assert a.axis == axis
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)


def test_packed_round_trip_and_bytes():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 8, 64)).astype(F32)
    qt = quantize_per_token(x, 2, 32)
    words = qt.packed()
    assert words.dtype == np.uint32 and words.shape == (2, 3, 8, 4)
    np.testing.assert_array_equal(words, pack_codes(qt.codes, 2))
    back = QuantizedTensor.from_packed(words, qt.scale, qt.zero, bits=2, group_size=32,
                                       axis="token", symmetric=False, shape=qt.shape)
    np.testing.assert_array_equal(dequantize(back), dequantize(qt))
    # 48 rows x 4 words x 4 B + (48 x 2 scales + 48 x 2 zeros) x 4 B
    assert qt.nbytes_packed == 48 * 4 * 4 + 2 * 48 * 2 * 4 == 1536
    qs = quantize_per_channel(x, 3, 8, symmetric=True)
    assert qs.nbytes_packed == 48 * 7 * 4 + 2 * 3 * 1 * 64 * 4


# --------------------------------------------------------------------------- invariants (Hypothesis)

finite32 = st.floats(-2.0 ** 100, 2.0 ** 100, width=32, allow_subnormal=True)


@st.composite
def quant_case(draw):
    symmetric = draw(st.booleans())
    bits = draw(st.integers(2 if symmetric else 1, 8))
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e6, 1e-40]))
    x = draw(hnp.arrays(F32, shape, elements=finite32)) if draw(st.booleans()) else \
        draw(hnp.arrays(F32, shape, elements=st.floats(-4, 4, width=32))) * F32(scale)
    group_size = draw(st.integers(1, 10))
    axis = draw(st.sampled_from(["token", "channel"]))
    exclude = draw(st.none() | hnp.arrays(bool, shape[:-1]))
    return x.astype(F32), bits, group_size, axis, symmetric, exclude


@settings(max_examples=200, deadline=None)
@given(quant_case())
def test_round_trip_error_bound(case):
    x, bits, group_size, axis, symmetric, exclude = case
    qt = quantize(x, bits, group_size, axis, symmetric=symmetric, exclude=exclude)
    levels = quantization_levels(bits, symmetric)
    assert qt.codes.dtype == np.uint8 and int(qt.codes.max(initial=0)) <= levels
    x_hat = dequantize(qt)
    assert x_hat.dtype == F32 and x_hat.shape == x.shape
    err = np.abs(x.astype(np.float64) - x_hat.astype(np.float64))
    keep = np.ones(x.shape, bool) if exclude is None else np.broadcast_to(~exclude[..., None], x.shape)
    assert (err[keep] <= round_trip_bound(qt, x_hat)[keep]).all()


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(F32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=40),
                    elements=st.floats(-100, 100, width=32)))
def test_eight_bits_nearly_lossless(x):
    qt = quantize_per_token(x, 8, 16)
    width = expanded(qt, (qt.scale * F32(255)).astype(np.float64))
    err = np.abs(x.astype(np.float64) - dequantize(qt))
    assert (err <= width / 510 + 4 * U * (width + np.abs(x)) + 257 * ETA).all()


@settings(max_examples=60, deadline=None)
@given(case=quant_case(), noise=st.floats(-2.0 ** 60, 2.0 ** 60, width=32))
def test_excluded_values_never_matter(case, noise):
    x, bits, group_size, axis, symmetric, exclude = case
    if exclude is None:
        return
    y = x.copy()
    y[exclude] = noise
    a = quantize(x, bits, group_size, axis, symmetric=symmetric, exclude=exclude)
    b = quantize(y, bits, group_size, axis, symmetric=symmetric, exclude=exclude)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(dequantize(a), dequantize(b))
    neutral = symmetric_offset(bits) if symmetric else 0
    assert (a.codes[exclude] == neutral).all()


def test_distance_to_tie_ulps():
    t = np.array([0.5, 1.5, np.nextafter(F32(2.5), F32(3)), 1.0], F32)
    d = distance_to_tie_ulps(t)
    assert d[0] == 0 and d[1] == 0 and d[2] == 1
    assert d[3] == 0.5 / np.spacing(F32(1.0))


# --------------------------------------------------------------------------- docs/09-tolerances.md §9.2

def _random_groups(seed, n=20000):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n // 16, 16)) * rng.uniform(1e-3, 1e3, (n // 16, 1))
         + rng.uniform(-50, 50, (n // 16, 1))).astype(F32)
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rule_a_reciprocal_port(bits):
    """A port computing t = (x - z) * (1/s) obeys rule (a) of docs/09-tolerances.md with K = 3."""
    x = _random_groups(bits)
    qt = quantize_per_token(x, bits, 16)
    s, z = expanded(qt, qt.scale), expanded(qt, qt.zero)
    t_ref = asymmetric_ratio(x, s, z)
    recip = (F32(1) / s).astype(F32)
    t_port = ((x - z).astype(F32) * recip).astype(F32)
    q_port = np.clip(np.rint(t_port), 0, quantization_levels(bits)).astype(np.uint8)
    diff = np.abs(q_port.astype(int) - qt.codes.astype(int))
    assert diff.max() <= 1
    assert (diff[distance_to_tie_ulps(t_ref) > 3] == 0).all()
    assert (t_port != t_ref).any()          # the simulated port really differs somewhere


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rule_b_fma_port(bits):
    """A port computing q * s + z with one rounding (FMA) obeys (9.3) of docs/09-tolerances.md."""
    x = _random_groups(10 + bits)
    qt = quantize_per_token(x, bits, 16)
    s, z = expanded(qt, qt.scale), expanded(qt, qt.zero)
    qs = qt.codes.astype(np.float64) * s            # exact in float64 (<= 8 + 24 bits)
    fma = (qs + z.astype(np.float64)).astype(F32)   # one final rounding (float64 sum is exact or
    ref = dequantize(qt).astype(np.float64)         # rounds far below float32's ulp)
    bound = 2 * U * (np.abs(qs) + np.abs(ref)) + ETA
    assert (np.abs(fma - ref) <= bound).all()
    assert (fma != ref).any()               # (for 1 bit q * s is exact and FMA changes nothing)


# --------------------------------------------------------------------------- bad inputs

GOOD = np.ones((2, 4), F32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_x(bad):
    x = GOOD.copy()
    x[1, 2] = bad
    with pytest.raises(ValueError, match="x"):
        quantize_per_token(x, 2, 2)


def test_float64_outside_float32_range():
    with pytest.raises(ValueError, match="x"):
        quantize_per_token(np.array([[1e39, 0.0]]), 2, 2)


def test_rank_one_x():
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        quantize_per_token(np.ones(4, F32), 2, 2)


def test_integer_x():
    with pytest.raises(TypeError, match="x"):
        quantize_per_channel(np.ones((2, 4), np.int32), 2, 2)


@pytest.mark.parametrize("bits", [0, 9, 2.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_per_token(GOOD, bits, 2)


def test_symmetric_one_bit():
    with pytest.raises(ValueError, match="bits"):
        quantize_per_token(GOOD, 1, 2, symmetric=True)


@pytest.mark.parametrize("group_size", [0, -1, 2.5])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        quantize_per_channel(GOOD, 2, group_size)


def test_bad_exclude():
    with pytest.raises(ValueError, match="exclude"):
        quantize_per_token(GOOD, 2, 2, exclude=np.zeros(4, bool))
    with pytest.raises(ValueError, match="exclude"):
        quantize_per_token(GOOD, 2, 2, exclude=np.zeros((2, 4), bool))
    with pytest.raises(TypeError, match="exclude"):
        quantize_per_token(GOOD, 2, 2, exclude=np.zeros(2, np.int8))


def test_bad_axis():
    with pytest.raises(ValueError, match="axis"):
        quantize(GOOD, 2, 2, "head")


def test_range_overflow():
    with pytest.raises(ValueError, match="x: a group's range"):
        quantize_per_channel(np.array([[-3e38], [3e38]], F32), 2, 2)
    # max - min finite but L * s + z rounds above the float32 maximum (5 bits: L = 31)
    top = np.array([[0.0, np.finfo(F32).max]], F32)
    with pytest.raises(ValueError, match="x: the largest dequantized value"):
        quantize_per_token(top, 5, 2)


def test_dequantize_type():
    with pytest.raises(TypeError, match="qt"):
        dequantize(np.ones((2, 2)))


# --------------------------------------------------------------------------- worked example page

SINK_KEYS = np.array([[2.0, -0.5, 96.0, 1.0],       # token 0: the sink (preserved)
                      [0.5, 1.0, -1.5, -0.125],
                      [-1.0, -0.5, 0.75, 3.0],
                      [1.25, -2.0, 1.5, -0.75]], F32)
SINK = np.array([True, False, False, False])


def _fmt(v) -> str:
    text = format(float(v), "g")
    assert float(text) == float(v), "the page must show exact values"
    return text


def _table(rows, header, labels):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in zip(labels, rows):
        cells = [v if isinstance(v, str) else _fmt(v) for v in row]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def render_worked_example(exclude) -> str:
    """The numbers of docs/10-worked-example.md for one case, as markdown tables."""
    qt = quantize_per_channel(SINK_KEYS, 2, 4, exclude=exclude)
    x_hat = dequantize(qt)
    words = qt.packed()[:, 0]
    ch = ["ch " + str(d) for d in range(4)]
    tok = ["token " + str(t) for t in range(4)]
    top = (qt.zero[0] + qt.scale[0] * F32(3)).astype(F32)
    stats = _table([qt.zero[0], top, qt.scale[0]], ["group of tokens 0..3"] + ch,
                   ["min = z", "max", "s = (max - min) / 3"])
    code_rows = [list(qt.codes[t]) + [f"0x{int(words[t]):08x}"] for t in range(4)]
    codes = _table(code_rows, ["q"] + ch + ["packed word"], tok)
    return "\n\n".join([stats, codes, _table(x_hat, ["x_hat"] + ch, tok),
                         _table(x_hat - SINK_KEYS, ["x_hat - x"] + ch, tok)])


def test_worked_example_hand_values():
    plain = quantize_per_channel(SINK_KEYS, 2, 4)
    kept = quantize_per_channel(SINK_KEYS, 2, 4, exclude=SINK)
    assert plain.scale[0].tolist() == [1.0, 1.0, 32.5, 1.25]
    assert kept.scale[0].tolist() == [0.75, 1.0, 1.0, 1.25]
    assert plain.codes[:, 2].tolist() == [3, 0, 0, 0]         # the sink flattens channel 2
    assert kept.codes[:, 2].tolist() == [0, 0, 2, 3]
    assert plain.codes[1, 0] == 2 and kept.codes[2, 1] == 2 and kept.codes[1, 3] == 0  # ties -> even
    assert kept.packed()[:, 0].tolist() == [0x00, 0x0E, 0xE8, 0x33]
    err_plain = np.abs(dequantize(plain) - SINK_KEYS)[1:]
    err_kept = np.abs(dequantize(kept) - SINK_KEYS)[1:]
    assert err_plain.max() == 3.0 and err_kept.max() == 0.625
    assert err_plain.sum() == 7.125 and err_kept.sum() == 1.375     # means 0.59375, 0.114583...
    assert plain.nbytes_packed == kept.nbytes_packed == 48


def test_worked_example_page_is_current():
    page = (DOCS / "10-worked-example.md").read_text(encoding="utf-8")
    tables = [_table(SINK_KEYS, ["x"] + ["ch " + str(d) for d in range(4)],
                     ["token " + str(t) for t in range(4)])]
    for exclude in (None, SINK):
        tables += render_worked_example(exclude).split("\n\n")
    assert len(tables) == 9
    for table in tables:
        assert table in page, ("docs/10-worked-example.md is out of date; paste this table "
                               "(render_worked_example):\n" + table)


# --------------------------------------------------------------------------- G larger than the axis

@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_group_size_beyond_the_axis_is_one_group_without_padding(axis, symmetric):
    rs = np.random.RandomState(0)
    x = rs.standard_normal((2, 12, 20)).astype(np.float32)
    n = 20 if axis == "token" else 12
    whole = quantize(x, 4, n, axis, symmetric=symmetric)
    huge = quantize(x, 4, 10**9, axis, symmetric=symmetric)   # padding to G would need 4 GB per row
    assert huge.group_size == 10**9 and huge.scale.shape == whole.scale.shape
    np.testing.assert_array_equal(huge.codes, whole.codes)
    np.testing.assert_array_equal(huge.scale, whole.scale)
    np.testing.assert_array_equal(dequantize(huge), dequantize(whole))


@pytest.mark.parametrize("bad", ["yes", 0, 1, None, "False"])
def test_symmetric_must_be_a_bool(bad):
    x = np.ones((2, 4), np.float32)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        quantize(x, 4, 2, "token", symmetric=bad)
