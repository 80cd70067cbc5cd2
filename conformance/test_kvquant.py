"""KVQuant-style quantization (CONTRACT: reference/kvquant.py; docs/08-kvquant.md).

Differential: the port's nf grid, nearest level, key thresholds, key and value
outliers, dense-and-sparse block quantization, dequantization and RoPE against
the reference, on inputs drawn like real keys and values (planted outlier
channels and sink tokens, exact ties, zero-range groups, fp16 / bf16 / fp64
inputs, excluded tokens, random per-channel codebooks).  The rules are those
of docs/08-kvquant.md §8.11 ("What a port must match"):

* nf grid, boundaries' choices, key thresholds, outlier masks, outlier indices
  and values, ``s`` and ``c``: **identical**;
* codes: the nearest-level code of some ``t'`` within 3 ulps of the reference's
  normalised value ``t`` (a port with an approximate division; docs/09-tolerances.md
  9.2(a), K = 3, and §9.6: one level either way near a boundary, several where a
  k-means codebook repeats a level), and identical where every permitted
  arithmetic computes ``t`` exactly;
* dequantization from the reference's codes:
  ``|x_port - x_ref| <= 2u(|l_q s| + |x_ref|) + eta`` (a fused multiply-add),
  outliers exact;
* RoPE: ``|x_port - x_ref| <= 7u(|a| + |b|) + 8 eta`` per element of a pair
  ``(a, b)`` (a port whose float32 cos / sin are faithful), and the port's own
  round trip within (8.1).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note, strategies as st

from reference import kvquant as rkv
from reference.config import KVSinkConfig

from . import tolerances as tol
from .profiles import examples
from .strategies import cast_input, exclude_masks, group_sizes, input_dtypes, kv_tensors, seeds

pytestmark = pytest.mark.part("kvquant")

FRACTIONS = (0.0, 0.001, 0.01, 0.05, 0.2, 0.45)


def _identical(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    bad = got != want
    if np.any(bad):
        i = tuple(int(j) for j in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements differ from the "
                             f"reference (docs/08-kvquant.md 8.11: identical); first at {i}: got "
                             f"{got[i]!r}, want {want[i]!r}")


# --------------------------------------------------------------------------- strategies

@st.composite
def level_grids(draw, bits: int, lead=()):
    """Sorted levels in [-1, 1], float32 ``lead + (2**bits,)``: the nf grid or k-means-like
    random codebooks (ends at +-1 or inside, sometimes repeated levels)."""
    n = 1 << bits
    kind = draw(st.sampled_from(["nf", "random", "random_ends", "repeats"]), label="levels_kind")
    if kind == "nf":
        return np.broadcast_to(rkv.nf_levels(bits), lead + (n,)).copy()
    rng = np.random.default_rng(draw(seeds, label="levels_seed"))
    lv = np.sort(rng.uniform(-1, 1, size=lead + (n,)), axis=-1).astype(np.float32)
    if kind == "random_ends":
        lv[..., 0], lv[..., -1] = -1.0, 1.0
    if kind == "repeats" and n >= 2:
        lv[..., 1] = lv[..., 0]
    return np.sort(lv, axis=-1).astype(np.float32)


@st.composite
def kvquant_cases(draw):
    """A ``quantize_block_kvquant`` call: config, keys/values (any dtype), calibration, exclude."""
    b = draw(st.integers(1, 2), label="B")
    h = draw(st.integers(1, 3), label="H")
    t = draw(st.integers(1, 12), label="T")
    d = draw(st.sampled_from((1, 2, 3, 4, 7, 8, 16, 32, 64)), label="D")
    kb = draw(st.integers(1, 8), label="key_bits")
    vb = draw(st.integers(1, 8), label="value_bits")
    config = KVSinkConfig(quantizer="kvquant", key_bits=kb, value_bits=vb,
                          key_group_size=draw(st.sampled_from((1, 2, 3, 4, 8, 16, 32)), label="key_group"),
                          value_group_size=draw(group_sizes, label="value_group"),
                          outlier_fraction=draw(st.sampled_from(FRACTIONS), label="p"),
                          kvquant_datatype=draw(st.sampled_from(["nf", "kmeans"]), label="datatype"))
    shape = (b, h, t, d)
    dtype = draw(input_dtypes, label="dtype")
    keys = cast_input(draw(kv_tensors(shape), label="keys"), dtype)
    values = cast_input(draw(kv_tensors(shape), label="values"), dtype)
    exclude = draw(exclude_masks((b, t)))
    k32 = np.asarray(keys, dtype=np.float64).astype(np.float32)
    # thresholds from the block itself or from other calibration keys
    if draw(st.booleans(), label="thresholds_from_block") and (exclude is None or not exclude.all()):
        lower, upper = rkv.key_outlier_thresholds(k32, config.outlier_fraction, exclude)
    else:
        cal_keys = draw(kv_tensors((2, h, 8, d), allow_special=False), label="calibration_keys")
        lower, upper = rkv.key_outlier_thresholds(cal_keys, config.outlier_fraction)
    if config.kvquant_datatype == "nf":
        key_levels, value_levels = rkv.nf_levels(kb), rkv.nf_levels(vb)
    else:
        key_levels = draw(level_grids(kb, (h, d)), label="key_levels")
        value_levels = draw(level_grids(vb, (h,)), label="value_levels")
    cal = rkv.KVQuantCalibration(key_lower=lower, key_upper=upper, key_levels=key_levels,
                                 value_levels=value_levels, datatype=config.kvquant_datatype,
                                 key_bits=kb, value_bits=vb, outlier_fraction=float(config.outlier_fraction),
                                 key_group_size=config.key_group_size,
                                 value_group_size=config.value_group_size)
    sparse = draw(st.sampled_from(["float32", "float16"]), label="sparse_dtype")
    return dict(config=config, keys=keys, values=values, exclude=exclude, calibration=cal,
                sparse_dtype=sparse, dtype=dtype)


def _note(case):
    c = case["config"]
    note(f"quantize_block_kvquant(shape={np.shape(case['keys'])}, dtype={case['dtype']}, "
         f"key_bits={c.key_bits}, value_bits={c.value_bits}, key_group={c.key_group_size}, "
         f"value_group={c.value_group_size}, p={c.outlier_fraction}, datatype={c.kvquant_datatype}, "
         f"sparse={case['sparse_dtype']}, exclude="
         f"{'None' if case['exclude'] is None else int(case['exclude'].sum())})")


# --------------------------------------------------------------------------- 8.2, 8.3

@pytest.mark.parametrize("bits", range(1, 9))
def test_nf_levels_identical(port, bits):
    got = port.kvquant_nf_levels(bits)
    assert np.asarray(got).dtype == np.float32, "nf_levels must be float32"
    _identical(got, rkv.nf_levels(bits), f"nf_levels({bits})")


@examples(150)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(st.just(b), level_grids(b, ()), level_grids(b, (3,)))),
       seeds, st.booleans())
def test_nearest_level_identical(port, grids, seed, per_row):
    """Values on the boundaries, one ulp either side, beyond the end levels, and random."""
    bits, flat, rows = grids
    levels = rows[:, None, :] if per_row else flat          # (3, 1, n) against t (3, m), or (n,)
    beta = rkv.level_boundaries(rows if per_row else flat[None, :])       # (3 or 1, n - 1)
    rng = np.random.default_rng(seed)
    t = np.concatenate([beta, np.nextafter(beta, np.float32(2)), np.nextafter(beta, np.float32(-2)),
                        rng.uniform(-1.2, 1.2, size=(beta.shape[0], 7)).astype(np.float32),
                        np.broadcast_to(np.float32([-1.5, 1.5, -1, 1, 0]), (beta.shape[0], 5))],
                       axis=-1).astype(np.float32)
    if not per_row:
        t = t.reshape(-1)
    lv = levels
    want = rkv.nearest_level(t, lv)
    got = port.kvquant_nearest_level(t, lv)
    assert np.asarray(got).dtype == np.uint8, "nearest_level must return uint8"
    _identical(got, want, "nearest_level")


# --------------------------------------------------------------------------- 8.5, 8.6

@examples(150)
@given(st.data())
def test_outliers_identical(port, data):
    b, h, t, d = (data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 3), label="H"),
                  data.draw(st.integers(1, 16), label="T"), data.draw(st.sampled_from((1, 3, 8, 64)), label="D"))
    dtype = data.draw(input_dtypes, label="dtype")
    x = cast_input(data.draw(kv_tensors((b, h, t, d)), label="x"), dtype)
    x32 = np.asarray(x, dtype=np.float64).astype(np.float32)
    p = data.draw(st.sampled_from(FRACTIONS), label="p")
    exclude = data.draw(exclude_masks((b, t)))
    note(f"shape={(b, h, t, d)}, dtype={dtype}, p={p}")
    # every token excluded (docs/08 8.5): no data, thresholds -inf/+inf as for p = 0
    lo, hi = port.kvquant_key_outlier_thresholds(x, p, exclude)
    want_lo, want_hi = rkv.key_outlier_thresholds(x32, p, exclude)
    _identical(lo, want_lo, "key_outlier_thresholds lower")
    _identical(hi, want_hi, "key_outlier_thresholds upper")
    _identical(port.kvquant_key_outliers(x, want_lo, want_hi, exclude),
               rkv.key_outliers(x32, want_lo, want_hi, exclude), "key_outliers")
    _identical(port.kvquant_value_outliers(x, p, exclude), rkv.value_outliers(x32, p, exclude),
               "value_outliers (ties to the lower flat index)")


# --------------------------------------------------------------------------- 8.7, 8.10

def _check_side(got, want, x32, levels, exclude, what):
    """docs/08-kvquant.md §8.11 / docs/09-tolerances.md §9.6, same input (``tolerances.check_kvquant_side``)."""
    coded = (np.ones(x32.shape[:1] + x32.shape[2:3], bool) if exclude is None
             else ~np.asarray(exclude, bool))
    tol.check_kvquant_side(got, want, x32, levels, coded, what)


@examples(200)
@given(kvquant_cases())
def test_quantize_block_matches_reference(port, case):
    _note(case)
    config, cal = case["config"], case["calibration"]
    want = rkv.quantize_block_kvquant(case["keys"], case["values"], cal, config, exclude=case["exclude"],
                                      sparse_dtype=np.dtype(case["sparse_dtype"]))
    got_k, got_v = port.kvquant_quantize_block(case["keys"], case["values"], cal, config,
                                               exclude=case["exclude"], sparse_dtype=case["sparse_dtype"])
    k32 = np.asarray(case["keys"], dtype=np.float64).astype(np.float32)
    v32 = np.asarray(case["values"], dtype=np.float64).astype(np.float32)
    _check_side(got_k, want.keys, k32, cal.key_levels_for(), case["exclude"], "keys")
    _check_side(got_v, want.values, v32, cal.value_levels_for(), case["exclude"], "values")


@examples(150)
@given(kvquant_cases())
def test_dequantize_matches_reference(port, case):
    """Dequantizing the reference's block: ``fl32(fl32(l_q s) + c)`` (a port may fuse it), outliers exact."""
    _note(case)
    config, cal = case["config"], case["calibration"]
    blk = rkv.quantize_block_kvquant(case["keys"], case["values"], cal, config, exclude=case["exclude"],
                                     sparse_dtype=np.dtype(case["sparse_dtype"]))
    for what, qt in (("keys", blk.keys), ("values", blk.values)):
        got = port.kvquant_dequantize(qt.codes, qt.scale, qt.centre, qt.levels, qt.outlier_index,
                                      qt.outlier_value, bits=qt.bits, group_size=qt.group_size,
                                      axis=qt.axis)
        tol.check_kvquant_dequantized(got, qt, what)


# --------------------------------------------------------------------------- 8.1

@st.composite
def rope_cases(draw):
    d = draw(st.sampled_from((2, 4, 8, 16, 64, 128)), label="D")
    base = draw(st.sampled_from((10000.0, 500000.0, 100.0)), label="base")
    lead = draw(st.sampled_from([(5,), (2, 3, 4), (1, 2, 6)]), label="shape")
    dtype = draw(input_dtypes, label="dtype")
    x = cast_input(draw(kv_tensors(lead + (d,), allow_special=False), label="x"), dtype)
    rng = np.random.default_rng(draw(seeds, label="positions_seed"))
    top = draw(st.sampled_from([64, 4096, rkv.MAX_POSITION]), label="max_position")
    if len(lead) == 3:                      # keys (B, H, T, D): positions (B, 1, T)
        pos = rng.integers(0, top, size=(lead[0], 1, lead[2]))
    else:
        pos = rng.integers(0, top, size=lead[-1:])
    return x, pos.astype(np.int64), rkv.rope_inv_freq(d, base), dtype


@examples(200)
@given(rope_cases())
def test_rope_matches_reference(port, case):
    x, pos, inv, dtype = case
    x32 = np.asarray(x, dtype=np.float64).astype(np.float32)
    note(f"x shape={x32.shape} dtype={dtype}, positions max={int(pos.max())}")
    for name, ref_fn, fn in (("apply_rope", rkv.apply_rope, port.kvquant_apply_rope),
                             ("unapply_rope", rkv.unapply_rope, port.kvquant_unapply_rope)):
        tol.check_rope(fn(x, pos, inv), ref_fn(x32, pos, inv), x32, name)
    # the port's own round trip: bound (8.1)
    back = np.asarray(port.kvquant_unapply_rope(port.kvquant_apply_rope(x, pos, inv), pos, inv))
    err = np.abs(back.astype(np.float64) - x32)
    assert np.all(err <= rkv.rope_roundtrip_bound(x32)), "unapply(apply(x)) beyond bound (8.1)"


# --------------------------------------------------------------------------- errors

def test_errors(port):
    config = KVSinkConfig(quantizer="kvquant", outlier_fraction=0.0, key_group_size=4)
    x = np.ones((1, 1, 4, 8), np.float32)
    bad = x.copy()
    bad[0, 0, 1, 2] = np.nan
    with pytest.raises(ValueError):
        port.kvquant_quantize_block(bad, x, None, config)
    with pytest.raises(ValueError):
        port.kvquant_quantize_block(x, x, None, config.replace(key_bits=3, kvquant_datatype="kmeans"))
    with pytest.raises(ValueError):
        port.kvquant_apply_rope(x, np.array([0, 1, -1, 2]), rkv.rope_inv_freq(8))
    with pytest.raises(ValueError):
        port.kvquant_unapply_rope(x, np.array([0, 1, 2, 2**24]), rkv.rope_inv_freq(8))
