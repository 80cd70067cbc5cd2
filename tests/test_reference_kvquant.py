"""Unit tests of reference/kvquant.py (docs/08-kvquant.md)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.stats import norm

from reference.config import KVSinkConfig
from reference.kvquant import (
    KVQuantBlock, KVQuantCalibration, apply_rope, calibrate_kvquant, dequantize_block_kvquant,
    dequantize_nonuniform, fake_quantize_kvquant, key_outlier_thresholds, key_outliers,
    kmeans_init, kmeans_levels, kmeans_objective, level_boundaries, nearest_level, nf_calibration,
    nf_levels, normalisation, outlier_count, quantize_block_kvquant, quantize_nonuniform,
    rope_cos_sin, rope_inv_freq, rope_roundtrip_bound, unapply_rope, value_outliers,
)
from reference.packing import packed_length, unpack_codes

F32 = np.float32
U = 2.0 ** -24
ETA = 2.0 ** -149


def cfg(**kw):
    base = dict(quantizer="kvquant", key_bits=2, value_bits=2, key_group_size=4, value_group_size=8,
                outlier_fraction=0.05, kvquant_datatype="nf")
    base.update(kw)
    return KVSinkConfig(**base)


def rand_kv(seed=0, shape=(2, 3, 12, 8)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(F32), rng.normal(size=shape).astype(F32)


def level_error(levels):
    """e(levels) of definition 8.7: the largest distance from a point of [-1, 1] to its level."""
    lv = np.asarray(levels, np.float64)
    gaps = np.diff(lv, axis=-1).max(axis=-1) / 2
    return np.maximum(np.maximum(lv[..., 0] + 1, 1 - lv[..., -1]), gaps)


# =========================================================================== 8.2 nf grid

def test_nf_grid_hand_values():
    np.testing.assert_allclose(nf_levels(2), [-1, -0.2769935, 0.2769935, 1], rtol=1e-6)
    # Phi^-1 at 9/16, 11/16, 13/16, 15/16 = 0.157311, 0.488776, 0.887147, 1.534121
    np.testing.assert_allclose(nf_levels(3)[4:], [0.1025413, 0.3186037, 0.5782769, 1.0], rtol=1e-6)
    assert nf_levels(1).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("bits", range(1, 9))
def test_nf_grid_definition(bits):
    n = 2 ** bits
    z = norm.ppf((np.arange(n) + 0.5) / n)          # an independent inverse normal CDF
    lv = nf_levels(bits)
    assert lv.dtype == F32 and lv.shape == (n,)
    np.testing.assert_allclose(lv, z / z[-1], rtol=2e-7, atol=1e-9)
    assert lv[0] == -1 and lv[-1] == 1
    np.testing.assert_array_equal(lv, -lv[::-1])    # exactly symmetric
    assert np.all(np.diff(lv) > 0)


# =========================================================================== 8.3 nearest level

def test_nearest_level_ties_go_down():
    lv = np.array([-1, -0.5, 0.5, 1], F32)
    assert level_boundaries(lv).tolist() == [-0.75, 0.0, 0.75]
    t = np.array([-2, -0.75, -0.7499999, 0.0, 1e-30, 0.75, np.nextafter(F32(0.75), F32(1)), 2], F32)
    assert nearest_level(t, lv).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_nearest_level_is_nearest():
    rng = np.random.default_rng(1)
    lv = np.sort(rng.uniform(-1, 1, 16)).astype(F32)
    t = rng.uniform(-1.2, 1.2, 2000).astype(F32)
    q = nearest_level(t, lv)
    d_chosen = np.abs(t - lv[q])
    d_best = np.abs(t[:, None] - lv[None]).min(axis=1)
    # the float32 boundary may misplace a value by its rounding (<= 1 ulp of 1 = 2u)
    assert np.all(d_chosen <= d_best + 2 * 2 * U)


def test_per_channel_levels_broadcast():
    lv = np.stack([nf_levels(1), np.array([-0.5, 0.5], F32)])          # (2, 2)
    t = np.array([[0.2, 0.2], [-0.2, -0.2]], F32)                       # (2 tokens, 2 channels)
    assert nearest_level(t, lv).tolist() == [[1, 1], [0, 0]]


# =========================================================================== 8.4 / 8.7 quantizer

def test_hand_example_nf2_per_token():
    x = np.array([0, 1, 2, 4], F32).reshape(1, 1, 1, 4)
    qt = quantize_nonuniform(x, nf_levels(2), 2, 4, "token")
    assert qt.scale.tolist() == [[[[2.0]]]] and qt.centre.tolist() == [[[[2.0]]]]
    # t = [-1, -0.5, 0, 1]; boundaries [-0.6385, 0, 0.6385]; t = 0 is a tie -> level 1
    assert qt.codes.ravel().tolist() == [0, 1, 1, 3]
    l1 = nf_levels(2)[1]
    expect = [0.0, F32(F32(l1 * F32(2)) + F32(2)), F32(F32(l1 * F32(2)) + F32(2)), 4.0]
    assert dequantize_nonuniform(qt).ravel().tolist() == expect


def test_zero_range_group_is_exact():
    x = np.full((1, 1, 5, 3), 7.25, F32)
    qt = quantize_nonuniform(x, nf_levels(3), 3, 5, "channel")
    assert np.all(qt.codes == 0) and np.all(qt.scale == 0)
    np.testing.assert_array_equal(dequantize_nonuniform(qt), x)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10 ** 6), bits=st.integers(1, 8), axis=st.sampled_from(["token", "channel"]),
       group=st.integers(1, 9), log_scale=st.integers(-20, 20), datatype=st.sampled_from(["nf", "random"]))
def test_round_trip_error_bound(seed, bits, axis, group, log_scale, datatype):
    """Definition 8.7 error bound: |x - x_hat| <= s e + 10 u s + 3 u |x_hat| + 4 eta (dense elements)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(1, 2, 7, 6)) * 2.0 ** log_scale + rng.normal() * 2.0 ** log_scale * 4).astype(F32)
    n = 2 ** bits
    if datatype == "nf":
        lv = nf_levels(bits)
    else:
        lv = np.sort(rng.uniform(-1, 1, (2, 1, 6, n)), axis=-1).astype(F32)
    out = rng.random(x.shape) < 0.1
    excl = rng.random((1, 7)) < 0.2
    qt = quantize_nonuniform(x, lv, bits, group, axis, outliers=out, exclude=excl)
    xh = dequantize_nonuniform(qt)
    s = np.repeat(qt.scale, group, axis=-2)[..., :7, :] if axis == "channel" \
        else np.repeat(qt.scale, group, axis=-1)[..., :6]
    e = level_error(lv)                   # scalar, or (2, 1, 6) per channel: broadcasts against x
    bound = s * e + 10 * U * s + 3 * U * np.abs(xh.astype(np.float64)) + 4 * ETA
    dense = ~out & ~excl[:, None, :, None]
    assert np.all(np.abs(x.astype(np.float64) - xh)[dense] <= bound[dense])
    # outliers (not excluded) come back exactly
    o = out & ~excl[:, None, :, None]
    np.testing.assert_array_equal(xh[o], x[o])
    assert qt.num_outliers == int(o.sum())


def test_excluded_and_outliers_leave_statistics():
    x, _ = rand_kv(3, (1, 2, 8, 4))
    excl = np.zeros((1, 8), bool)
    excl[0, 2] = True
    out = np.zeros(x.shape, bool)
    out[0, 1, 5, 3] = True
    a = quantize_nonuniform(x, nf_levels(3), 3, 4, "channel", outliers=out, exclude=excl)
    y = x.copy()
    y[:, :, 2, :] = 1e6            # an excluded token
    y[0, 1, 5, 3] = -1e6           # an outlier
    b = quantize_nonuniform(y, nf_levels(3), 3, 4, "channel", outliers=out, exclude=excl)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.centre, b.centre)
    assert np.all(a.codes[:, :, 2, :] == 0) and a.codes[0, 1, 5, 3] == 0
    assert b.outlier_value.tolist() == [-1e6]
    assert b.outlier_index.tolist() == [np.ravel_multi_index((0, 1, 5, 3), x.shape)]


def test_nbytes_formula_and_packing():
    x, v = rand_kv(4, (1, 2, 6, 8))
    c = cfg(key_bits=3, value_bits=2, key_group_size=4, value_group_size=8, outlier_fraction=0.0625)
    cal = calibrate_kvquant(x, v, c)
    blk = quantize_block_kvquant(x, v, cal, c)
    k, vq = blk.keys, blk.values
    # keys: 12 rows x packed_length(8, 3) = 1 word; stats (1, 2, 2, 8) x 2 float32
    assert k.nbytes == 4 * 12 * packed_length(8, 3) + 4 * 2 * 32 + 8 * k.num_outliers
    # values: 12 rows x 1 word; stats (1, 2, 6, 1) x 2; exactly rint(0.0625 * 16) = 1 outlier per token
    assert vq.num_outliers == 6
    assert vq.nbytes == 4 * 12 * 1 + 4 * 2 * 12 + 8 * 6
    assert blk.nbytes == k.nbytes + vq.nbytes
    np.testing.assert_array_equal(unpack_codes(k.packed(), 3, 8), k.codes)
    blk16 = quantize_block_kvquant(x, v, cal, c, sparse_dtype=np.float16)
    assert blk16.values.nbytes == vq.nbytes - 2 * 6
    assert cal.nbytes == 4 * 2 * 16          # thresholds only: the nf grid is a constant


# =========================================================================== 8.5 / 8.6 outliers

def test_outlier_count_rounding():
    assert outlier_count(0.01, 192) == 2
    assert outlier_count(0.005, 192) == 1
    assert outlier_count(0.001, 192) == 0
    assert outlier_count(0.125, 4) == 0       # 0.5 -> 0 (half to even)
    assert outlier_count(0.375, 4) == 2       # 1.5 -> 2
    assert outlier_count(0.0, 1000) == 0
    with pytest.raises(ValueError, match="outlier_fraction"):
        outlier_count(0.5, 10)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
def test_value_outlier_fraction_exact(fraction):
    _, v = rand_kv(5, (2, 3, 10, 16))
    excl = np.zeros((2, 10), bool)
    excl[1, 4] = True
    m = value_outliers(v, fraction, excl)
    per_token = m.sum(axis=(1, 3))
    k = outlier_count(fraction, 48)
    assert per_token[~excl].tolist() == [k] * 19 and per_token[excl].tolist() == [0]
    # they are the largest magnitudes of their token
    mag = np.abs(np.moveaxis(v, 1, 2).reshape(2, 10, 48))
    mm = np.moveaxis(m, 1, 2).reshape(2, 10, 48)
    for b, t in zip(*np.nonzero(~excl)):
        if k:
            assert mag[b, t][mm[b, t]].min() >= mag[b, t][~mm[b, t]].max()


def test_value_outlier_ties_lowest_index():
    v = np.ones((1, 2, 1, 4), F32)
    v[0, 1, 0, 2] = -1.0                   # same magnitude
    m = value_outliers(v, 0.3, None)       # rint(0.3 * 8) = 2
    assert np.argwhere(m).tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]


def test_key_thresholds_exact_on_calibration():
    k, _ = rand_kv(6, (2, 2, 50, 4))
    excl = np.zeros((2, 50), bool)
    excl[:, 0] = True
    lo, hi = key_outlier_thresholds(k, 0.1, excl)
    # per channel N = 98 entries, k = rint(0.05 * 98) = 5 per side
    m = key_outliers(k, lo, hi, excl)
    assert np.all(m.sum(axis=(0, 2)) == 10)
    # excluded tokens neither count nor are outliers; changing them changes nothing
    k2 = k.copy()
    k2[:, :, 0, :] = 1e9
    lo2, hi2 = key_outlier_thresholds(k2, 0.1, excl)
    np.testing.assert_array_equal(lo, lo2)
    assert not key_outliers(k2, lo2, hi2, excl)[:, :, 0].any()
    lo0, hi0 = key_outlier_thresholds(k, 0.0, excl)
    assert np.all(np.isneginf(lo0)) and np.all(np.isposinf(hi0))


def test_key_threshold_hand_example():
    k = np.arange(20, dtype=F32).reshape(1, 1, 20, 1)
    lo, hi = key_outlier_thresholds(k, 0.2, None)     # k = rint(0.1 * 20) = 2 per side
    assert lo.tolist() == [[2.0]] and hi.tolist() == [[17.0]]
    assert np.nonzero(key_outliers(k, lo, hi)[0, 0, :, 0])[0].tolist() == [0, 1, 18, 19]


# =========================================================================== 8.8 k-means

def test_kmeans_hand_example():
    p = np.array([-1, -0.9, 0.9, 1.0])
    lv = kmeans_levels(p, np.ones(4), 1)
    np.testing.assert_allclose(lv, [-0.95, 0.95], rtol=1e-7)
    lv = kmeans_levels(p, np.array([3.0, 1, 1, 3]), 1)
    np.testing.assert_allclose(lv, [-0.975, 0.975], rtol=1e-7)
    # initial levels: weighted quantiles at 1/4 and 3/4 of the total weight
    assert kmeans_init(p, np.ones(4), 2).tolist() == [-1.0, 0.9]


def test_kmeans_empty_clusters_and_zero_weight():
    lv = kmeans_levels(np.full(10, 0.5), np.ones(10), 2)
    assert lv.tolist() == [0.5] * 4
    np.testing.assert_array_equal(kmeans_levels(np.linspace(-1, 1, 9), np.zeros(9), 3), nf_levels(3))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10 ** 6), bits=st.integers(1, 5), m=st.integers(1, 200))
def test_kmeans_deterministic_and_monotone(seed, bits, m):
    rng = np.random.default_rng(seed)
    p = np.clip(rng.normal(scale=0.4, size=(3, m)), -1, 1)
    w = rng.exponential(size=(3, m)) * (rng.random((3, m)) < 0.9)
    lv, hist = kmeans_levels(p, w, bits, return_history=True)
    lv2 = kmeans_levels(p, w, bits)
    np.testing.assert_array_equal(lv, lv2)
    assert np.all(np.diff(lv, axis=-1) >= 0) and np.all(np.abs(lv) <= 1)
    # Lloyd: the weighted error never increases, up to float64 rounding: evaluating the objective
    # (m terms) errs by <= m 2**-52 relative; a mean of points in [-1, 1] errs by
    # eps <= (m + 1) 2**-53, which can raise the error of its cluster by <= W eps**2.
    tol = m * 2.0 ** -52 * hist[:-1] + w.sum(axis=-1) * ((m + 1) * 2.0 ** -53) ** 2
    assert np.all(hist[1:] <= hist[:-1] + tol)
    # the fit is no worse than its initialisation, evaluated on the float32 levels too
    assert np.all(kmeans_objective(p, w, lv) <= hist[0] * (1 + 1e-6) + 1e-12)


# =========================================================================== 8.1 RoPE

def test_rope_inv_freq_and_angles():
    np.testing.assert_array_equal(rope_inv_freq(4, 10000.0), np.array([1.0, 0.01], F32))
    cos, sin = rope_cos_sin(np.array([0, 1]), rope_inv_freq(4))
    assert cos.shape == (2, 4) and cos[0].tolist() == [1, 1, 1, 1] and sin[0].tolist() == [0, 0, 0, 0]
    assert cos[1, 0] == F32(np.cos(1.0)) and sin[1, 3] == F32(np.sin(F32(0.01)))


def test_rope_rotation_and_inverse():
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(2, 3, 40, 16)) * 10).astype(F32)
    pos = rng.integers(0, 1 << 20, size=(2, 1, 40))
    f = rope_inv_freq(16, 100000.0)
    y = apply_rope(x, pos, f)
    # the rotation of each pair (i, i + D/2) by theta, evaluated in float64 with the same cos/sin
    cos, sin = rope_cos_sin(pos, f)
    a, b = x[..., :8].astype(np.float64), x[..., 8:].astype(np.float64)
    c, s = cos[..., :8].astype(np.float64), sin[..., :8].astype(np.float64)
    exact = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    pair = np.concatenate([np.abs(a) + np.abs(b)] * 2, axis=-1)
    assert np.all(np.abs(y - exact) <= 3 * U * pair)
    back = unapply_rope(y, pos, f)
    assert np.all(np.abs(back - x) <= rope_roundtrip_bound(x))
    # norms of the pairs are kept
    np.testing.assert_allclose(np.hypot(y[..., :8], y[..., 8:]), np.hypot(x[..., :8], x[..., 8:]), rtol=1e-6)


def test_rope_bad_inputs():
    x = np.zeros((1, 4, 6), F32)
    f = rope_inv_freq(6)
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, np.array([-1, 0, 1, 2]), f)
    with pytest.raises(TypeError, match="positions"):
        apply_rope(x, np.arange(4.0), f)
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, np.arange(5), f)
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rope(x, np.arange(4), rope_inv_freq(4))
    with pytest.raises(ValueError, match="even"):
        apply_rope(np.zeros((4, 5), F32), np.arange(4), f)
    with pytest.raises(ValueError, match="head_dim"):
        rope_inv_freq(7)


# =========================================================================== 8.9 / 8.10 calibration, blocks

@pytest.mark.parametrize("datatype", ["nf", "kmeans"])
def test_block_round_trip_preserved_and_outliers_exact(datatype):
    k, v = rand_kv(8)
    k[0, 1, 3, 2] = 40.0                   # a key outlier
    excl = np.zeros((2, 12), bool)
    excl[:, 0] = True
    excl[1, 7] = True
    c = cfg(kvquant_datatype=datatype, key_bits=3, value_bits=2)
    rng = np.random.default_rng(0)
    fisher = dict(key_fisher=rng.random(k.shape), value_fisher=rng.random(k.shape)) \
        if datatype == "kmeans" else {}
    cal = calibrate_kvquant(k, v, c, exclude=excl, **fisher)
    if datatype == "kmeans":
        assert cal.key_levels.shape == (3, 8, 8) and cal.value_levels.shape == (3, 4)
        assert cal.nbytes == 4 * (2 * 24 + 3 * 8 * 8 + 3 * 4)
    blk = quantize_block_kvquant(k, v, cal, c, exclude=excl)
    kh, vh = fake_quantize_kvquant(k, v, cal, c, preserved=excl)
    keep = excl[:, None, :, None]
    np.testing.assert_array_equal(np.where(keep, kh, 0), np.where(keep, k, 0))
    np.testing.assert_array_equal(np.where(keep, vh, 0), np.where(keep, v, 0))
    dk, dv = dequantize_block_kvquant(blk)
    for qt, x, d in ((blk.keys, k, dk), (blk.values, v, dv)):
        idx = np.unravel_index(qt.outlier_index, x.shape)
        np.testing.assert_array_equal(d[idx], x[idx])
        assert not excl[idx[0], idx[2]].any()
    assert blk.keys.outlier_index.tolist().count(np.ravel_multi_index((0, 1, 3, 2), k.shape)) == 1
    assert blk.values.num_outliers == 21 * outlier_count(0.05, 24)      # 24 tokens, 3 excluded
    # the dense error respects the bound with the calibration's levels
    e_full = level_error(cal.key_levels_for())    # scalar (nf) or (H, 1, D) (kmeans)
    s = np.repeat(blk.keys.scale, 4, axis=-2)
    dense = ~keep & ~np.isin(np.arange(k.size).reshape(k.shape), blk.keys.outlier_index)
    bound = s * e_full + 10 * U * s + 3 * U * np.abs(dk.astype(np.float64))
    assert np.all(np.abs(k - dk)[dense] <= bound[dense])


def test_kmeans_beats_nf_on_its_weighted_objective():
    """Sensitivity weighting moves the levels toward the heavily weighted entries."""
    k, v = rand_kv(9, (4, 1, 64, 4))
    rng = np.random.default_rng(2)
    fk = rng.random(k.shape) * 1e-3
    fk[..., 0] = 10.0                     # channel 0 matters most
    c = cfg(kvquant_datatype="kmeans", key_bits=2, outlier_fraction=0.0, key_group_size=64)
    cal = calibrate_kvquant(k, v, c, key_fisher=fk, value_fisher=rng.random(k.shape))
    cal_nf = calibrate_kvquant(k, v, c.replace(kvquant_datatype="nf"))
    err = lambda cal_, cf: np.sum(fk * (dequantize_block_kvquant(quantize_block_kvquant(k, v, cal_, cf))[0] - k) ** 2)  # noqa: E731
    assert err(cal, c) < err(cal_nf, c.replace(kvquant_datatype="nf"))


def test_calibration_checks_and_bad_inputs():
    k, v = rand_kv(10)
    c = cfg()
    cal = calibrate_kvquant(k, v, c)
    with pytest.raises(ValueError, match="key_bits"):
        quantize_block_kvquant(k, v, cal, c.replace(key_bits=3))
    with pytest.raises(ValueError, match="outlier_fraction"):
        quantize_block_kvquant(k, v, cal, c.replace(outlier_fraction=0.1))
    with pytest.raises(ValueError, match="quantizer"):
        quantize_block_kvquant(k, v, cal, c.replace(quantizer="uniform"))
    with pytest.raises(ValueError, match="key_axis"):
        quantize_block_kvquant(k, v, cal, c.replace(key_axis="token"))
    with pytest.raises(ValueError, match="calibration"):
        quantize_block_kvquant(k, v, None, c)          # nf with outliers needs thresholds
    blk = quantize_block_kvquant(k, v, None, c.replace(outlier_fraction=0.0))
    assert blk.keys.num_outliers == 0 and isinstance(blk, KVQuantBlock)
    with pytest.raises(ValueError, match="keys_pre_rope"):
        quantize_block_kvquant(k[0], v, cal, c)
    bad = k.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="keys_pre_rope"):
        quantize_block_kvquant(bad, v, cal, c)
    with pytest.raises(TypeError, match="values"):
        quantize_block_kvquant(k, v.astype(np.int32), cal, c)
    with pytest.raises(ValueError, match="values"):
        quantize_block_kvquant(k, v[:, :, :5], cal, c)
    with pytest.raises(TypeError, match="exclude"):
        quantize_block_kvquant(k, v, cal, c, exclude=np.zeros((2, 12), int))
    with pytest.raises(ValueError, match="exclude"):
        quantize_block_kvquant(k, v, cal, c, exclude=np.zeros((2, 3, 12), bool))
    with pytest.raises(ValueError, match="sparse_dtype"):
        quantize_block_kvquant(k, v, cal, c, sparse_dtype=np.float64)
    with pytest.raises(ValueError, match="key_fisher"):
        calibrate_kvquant(k, v, c.replace(kvquant_datatype="kmeans"))
    with pytest.raises(ValueError, match="levels"):
        quantize_nonuniform(k, np.array([0.5, -0.5], F32), 1, 4, "token")
    with pytest.raises(ValueError, match="bits"):
        quantize_nonuniform(k, nf_levels(2), 3, 4, "token")
    with pytest.raises(ValueError, match="bits"):
        nf_levels(9)
    with pytest.raises(ValueError, match="weights"):
        kmeans_levels(np.zeros(3), -np.ones(3), 2)
    with pytest.raises(ValueError, match="max_iter"):
        kmeans_levels(np.zeros(3), np.ones(3), 2, max_iter=-1)
    with pytest.raises(ValueError, match="outliers"):
        quantize_nonuniform(k, nf_levels(2), 2, 4, "token", outliers=np.zeros(3, bool))
    with pytest.raises(ValueError, match="axis"):
        quantize_nonuniform(k, nf_levels(2), 2, 4, "tokens")
    assert isinstance(nf_calibration(c.replace(outlier_fraction=0.0), 3, 8), KVQuantCalibration)


def test_normalisation_exact_cases():
    s, c = normalisation(np.array([-2, 3], F32), np.array([6, 3], F32))
    assert s.tolist() == [4.0, 0.0] and c.tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="x"):
        normalisation(np.array([-3e38], F32), np.array([3e38], F32))


@pytest.mark.parametrize("datatype", ["nf", "kmeans"])
def test_calibration_with_every_token_excluded_is_defined(datatype):
    """docs/08 8.5/8.8: every calibration token excluded (each a predicted sink) leaves no data:
    thresholds -inf/+inf (no key outliers, as outlier_fraction 0) and the nf grid as codebooks."""
    rs = np.random.RandomState(3)
    k, v = (rs.standard_normal((2, 3, 12, 8)).astype(F32) for _ in range(2))
    c = KVSinkConfig(quantizer="kvquant", key_bits=2, value_bits=3, key_group_size=4,
                     value_group_size=8, kvquant_datatype=datatype, outlier_fraction=0.05)
    fisher = {} if datatype == "nf" else dict(key_fisher=rs.rand(*k.shape), value_fisher=rs.rand(*v.shape))
    cal = calibrate_kvquant(k, v, c, exclude=np.ones((2, 12), bool), **fisher)
    assert np.all(cal.key_lower == -np.inf) and np.all(cal.key_upper == np.inf)
    np.testing.assert_array_equal(np.broadcast_to(cal.key_levels, (3, 8, 4)), np.broadcast_to(nf_levels(2), (3, 8, 4)))
    np.testing.assert_array_equal(np.broadcast_to(cal.value_levels, (3, 8)), np.broadcast_to(nf_levels(3), (3, 8)))
    blk = quantize_block_kvquant(k, v, cal, c)          # the calibration quantizes new tokens
    assert blk.keys.num_outliers == 0
