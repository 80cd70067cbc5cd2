"""Unit tests of reference/attention.py (docs/05-attention.md)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from reference.attention import (
    attention,
    attention_scores,
    kv_head_index,
    merge_partials,
    partial_attention,
    split_attention,
    visible_keys,
)


def naive_attention(q, k, v, qp, kp, kvalid=None, scale=None):
    """Loop-by-loop transcription of Definition 5.3 with math.exp."""
    b, hq, tq, d = q.shape
    h = k.shape[1]
    g = hq // h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((b, hq, tq, d))
    for bi in range(b):
        for hi in range(hq):
            for t in range(tq):
                vis = [s for s in range(k.shape[2])
                       if kp[bi, s] >= 0 and kp[bi, s] <= qp[bi, t]
                       and (kvalid is None or kvalid[bi, s])]
                if not vis:
                    continue
                e = [scale * sum(float(q[bi, hi, t, j]) * float(k[bi, hi // g, s, j])
                                 for j in range(d)) for s in vis]
                m = max(e)
                w = [math.exp(x - m) for x in e]
                z = sum(w)
                for s, wi in zip(vis, w):
                    out[bi, hi, t] += wi / z * v[bi, hi // g, s].astype(np.float64)
    return out


def random_case(rng, b=2, hq=4, h=2, tq=3, s=5, d=4, dtype=np.float32):
    q = rng.standard_normal((b, hq, tq, d)).astype(dtype)
    k = rng.standard_normal((b, h, s, d)).astype(dtype)
    v = rng.standard_normal((b, h, s, d)).astype(dtype)
    kp = np.tile(np.arange(s), (b, 1))
    qp = np.tile(np.arange(s - tq, s), (b, 1))
    return q, k, v, qp, kp


# ---------------------------------------------------------------- hand examples

def test_single_key_outputs_its_value():
    q = np.ones((1, 1, 1, 2))
    k = np.array([[[[3.0, -1.0]]]])
    v = np.array([[[[0.25, 7.0]]]])
    out = attention(q, k, v, query_positions=[[0]], key_positions=[[0]])
    np.testing.assert_array_equal(out, v)


def test_two_keys_hand_computed():
    # scores scale * <q, k>: q=(1,0), k0=(0,0), k1=(2,0), D=2 -> scale 1/sqrt(2)
    q = np.array([[[[1.0, 0.0]]]])
    k = np.array([[[[0.0, 0.0], [2.0, 0.0]]]])
    v = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = attention(q, k, v, query_positions=[[1]], key_positions=[[0, 1]])
    e1 = 2.0 / math.sqrt(2.0)
    p1 = math.exp(e1) / (1.0 + math.exp(e1))
    np.testing.assert_allclose(out[0, 0, 0], [1 - p1, p1], rtol=1e-15)


def test_explicit_scale():
    q = np.array([[[[1.0]]]])
    k = np.array([[[[0.0], [1.0]]]])
    v = np.array([[[[0.0], [1.0]]]])
    out = attention(q, k, v, query_positions=[[5]], key_positions=[[0, 1]], scale=math.log(3.0))
    # weights 1 : 3
    np.testing.assert_allclose(out[0, 0, 0, 0], 0.75, rtol=1e-15)


def test_output_dtype_float64_and_float16_inputs():
    rng = np.random.default_rng(0)
    q, k, v, qp, kp = random_case(rng, dtype=np.float16)
    out = attention(q, k, v, query_positions=qp, key_positions=kp)
    assert out.dtype == np.float64
    ref = naive_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), qp, kp)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- vs naive loop

@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    b, hq, h, tq, s, d = 2, 6, 3, 4, 7, 5
    q, k, v, _, _ = random_case(rng, b, hq, h, tq, s, d, dtype=np.float64)
    kp = rng.integers(-1, 8, size=(b, s))
    qp = rng.integers(0, 8, size=(b, tq))
    kvalid = rng.random((b, s)) < 0.8
    out = attention(q, k, v, query_positions=qp, key_positions=kp, key_valid=kvalid)
    ref = naive_attention(q, k, v, qp, kp, kvalid)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- masking rules

def test_visible_keys_rule():
    qp = np.array([[2, 0]])
    kp = np.array([[0, 1, 2, 3, -1]])
    valid = np.array([[True, False, True, True, True]])
    vis = visible_keys(qp, kp, valid)
    expected = np.array([[[True, False, True, False, False],
                          [True, False, False, False, False]]])
    np.testing.assert_array_equal(vis, expected)


def test_causal_future_keys_do_not_change_output():
    rng = np.random.default_rng(1)
    q, k, v, qp, kp = random_case(rng, b=1, hq=2, h=2, tq=1, s=6)
    qp = np.array([[3]])
    out = attention(q, k, v, query_positions=qp, key_positions=kp)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 4:] = 100.0          # keys at positions 4, 5 are in the future of position 3
    v2[:, :, 4:] = -50.0
    out2 = attention(q, k2, v2, query_positions=qp, key_positions=kp)
    np.testing.assert_array_equal(out, out2)
    out3 = attention(q, k[:, :, :4], v[:, :, :4], query_positions=qp, key_positions=kp[:, :4])
    np.testing.assert_array_equal(out, out3)


def test_negative_position_and_invalid_key_hidden():
    rng = np.random.default_rng(2)
    q, k, v, qp, kp = random_case(rng, b=1, hq=1, h=1, tq=1, s=4)
    qp = np.array([[10]])
    kp_neg = kp.copy()
    kp_neg[0, 1] = -1
    valid = np.array([[True, False, True, True]])
    a = attention(q, k, v, query_positions=qp, key_positions=kp_neg)
    b = attention(q, k, v, query_positions=qp, key_positions=kp, key_valid=valid)
    keep = [0, 2, 3]
    c = attention(q, k[:, :, keep], v[:, :, keep], query_positions=qp, key_positions=kp[:, keep])
    np.testing.assert_allclose(a, c, rtol=1e-15, atol=0)
    np.testing.assert_allclose(b, c, rtol=1e-15, atol=0)


def test_query_seeing_nothing_outputs_zero():
    rng = np.random.default_rng(3)
    q, k, v, _, _ = random_case(rng, b=1, hq=2, h=1, tq=2, s=3)
    kp = np.array([[5, 6, -1]])
    qp = np.array([[4, 6]])        # query 0 precedes every key
    out = attention(q, k, v, query_positions=qp, key_positions=kp)
    np.testing.assert_array_equal(out[0, :, 0], 0.0)
    assert np.all(np.abs(out[0, :, 1]) > 0)


def test_empty_cache_outputs_zero():
    q = np.ones((1, 2, 3, 4))
    k = np.zeros((1, 1, 0, 4))
    out = attention(q, k, k, query_positions=np.zeros((1, 3), int),
                    key_positions=np.zeros((1, 0), int))
    assert out.shape == (1, 2, 3, 4)
    np.testing.assert_array_equal(out, 0.0)


def test_large_scores_do_not_overflow():
    q = np.array([[[[1000.0]]]])
    k = np.array([[[[1000.0], [999.0]]]])
    v = np.array([[[[1.0], [0.0]]]])
    out = attention(q, k, v, query_positions=[[1]], key_positions=[[0, 1]], scale=1.0)
    # scores 1e6 and 999000: the second weight is exp(-1000) = 0 in float64
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 0, 0, 0], 1.0)


# ---------------------------------------------------------------- GQA

def test_kv_head_index():
    np.testing.assert_array_equal(kv_head_index(9, 3), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(kv_head_index(4, 4), [0, 1, 2, 3])


def test_gqa_equals_repeated_kv_heads():
    rng = np.random.default_rng(4)
    q, k, v, qp, kp = random_case(rng, b=2, hq=6, h=2, tq=3, s=5)
    out = attention(q, k, v, query_positions=qp, key_positions=kp)
    k_rep = np.repeat(k, 3, axis=1)        # head h -> h // 3
    v_rep = np.repeat(v, 3, axis=1)
    ref = attention(q, k_rep, v_rep, query_positions=qp, key_positions=kp)
    np.testing.assert_array_equal(out, ref)


def test_attention_scores_gqa():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 2, 3))
    k = rng.standard_normal((1, 2, 5, 3))
    e = attention_scores(q, k, scale=0.5)
    for h in range(4):
        np.testing.assert_allclose(e[0, h], 0.5 * q[0, h] @ k[0, h // 2].T, rtol=1e-14)


# ---------------------------------------------------------------- split form

def _split(q, k, v, qp, kp, cuts, kvalid=None):
    bounds = [0] + list(cuts) + [k.shape[2]]
    segs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        kpos = kp[:, a:b].copy()
        if kvalid is not None:
            kpos[~kvalid[:, a:b]] = -1
        segs.append((k[:, :, a:b], v[:, :, a:b], kpos))
    return split_attention(q, segs, query_positions=qp)


def test_split_hand_example_two_segments():
    rng = np.random.default_rng(6)
    q, k, v, qp, kp = random_case(rng)
    direct = attention(q, k, v, query_positions=qp, key_positions=kp)
    split = _split(q, k, v, qp, kp, [2])
    np.testing.assert_allclose(split, direct, rtol=1e-13, atol=1e-15)


def test_partial_of_empty_segment():
    q = np.ones((1, 2, 3, 4))
    k = np.zeros((1, 1, 0, 4))
    m, l, acc = partial_attention(q, k, k, query_positions=np.zeros((1, 3), int),
                                  key_positions=np.zeros((1, 0), int))
    assert m.shape == (1, 2, 3) and acc.shape == (1, 2, 3, 4)
    assert np.all(m == -np.inf)
    np.testing.assert_array_equal(l, 0.0)
    np.testing.assert_array_equal(acc, 0.0)


def test_partial_statistics_definition():
    rng = np.random.default_rng(7)
    q, k, v, qp, kp = random_case(rng, b=1, hq=1, h=1, tq=1, s=4)
    qp = np.array([[3]])
    m, l, acc = partial_attention(q, k, v, query_positions=qp, key_positions=kp, scale=0.3)
    e = 0.3 * (q[0, 0, 0].astype(float) @ k[0, 0].astype(float).T)
    assert m[0, 0, 0] == e.max()
    np.testing.assert_allclose(l[0, 0, 0], np.exp(e - e.max()).sum(), rtol=1e-15)
    np.testing.assert_allclose(acc[0, 0, 0], np.exp(e - e.max()) @ v[0, 0].astype(float),
                               rtol=1e-14)


def test_merge_with_empty_and_invisible_parts():
    rng = np.random.default_rng(8)
    q, k, v, qp, kp = random_case(rng)
    full = partial_attention(q, k, v, query_positions=qp, key_positions=kp)
    empty = partial_attention(q, k[:, :, :0], v[:, :, :0], query_positions=qp,
                              key_positions=kp[:, :0])
    hidden = partial_attention(q, k, v, query_positions=qp, key_positions=np.full_like(kp, -1))
    direct = attention(q, k, v, query_positions=qp, key_positions=kp)
    np.testing.assert_allclose(merge_partials([empty, full, hidden]), direct,
                               rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(merge_partials([empty, hidden]), 0.0)


def test_split_with_no_segment_outputs_zero():
    q = np.ones((1, 2, 3, 4))
    out = split_attention(q, [], query_positions=np.zeros((1, 3), int))
    np.testing.assert_array_equal(out, np.zeros((1, 2, 3, 4)))


@st.composite
def split_cases(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    tq = draw(st.integers(1, 3))
    s = draw(st.integers(0, 9))
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    n_cuts = draw(st.integers(0, 4))
    cuts = sorted(draw(st.lists(st.integers(0, s), min_size=n_cuts, max_size=n_cuts)))
    mag = draw(st.sampled_from([0.1, 1.0, 10.0]))
    return b, h, g, tq, s, d, seed, cuts, mag


@settings(max_examples=60, deadline=None)
@given(split_cases())
def test_direct_equals_split_any_segmentation(case):
    b, h, g, tq, s, d, seed, cuts, mag = case
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h * g, tq, d)) * mag
    k = rng.standard_normal((b, h, s, d)) * mag
    v = rng.standard_normal((b, h, s, d))
    kp = rng.integers(-1, s + 1, size=(b, s))
    qp = rng.integers(0, s + 2, size=(b, tq))
    kvalid = rng.random((b, s)) < 0.85
    direct = attention(q, k, v, query_positions=qp, key_positions=kp, key_valid=kvalid)
    split = _split(q, k, v, qp, kp, cuts, kvalid)
    # Both forms compute the same exact quantity in float64; each is within the
    # bound of docs/09-tolerances.md §9.3 (u = 2**-53, no narrow formats) of
    # it, so they differ by at most twice that bound (docs/05-attention.md §5.7).
    u = 2.0 ** -53
    c = 1.0 / math.sqrt(d)
    V = float(np.max(np.abs(v), initial=0.0))
    A = float(np.max(np.abs(q) @ np.abs(np.repeat(k, g, axis=1)).swapaxes(-1, -2), initial=0.0))
    one = V * (2.5 * (c * A * (d + 1) * u + u * (3 * math.log(max(s, 1)) + 2 * s + 4)) + 2 * u)
    tol = 2 * one
    np.testing.assert_allclose(split, direct, rtol=0, atol=tol)
    # queries that see nothing are exactly 0 in both forms
    vis = visible_keys(qp, kp, kvalid).any(axis=2)          # (B, Tq)
    assert np.all(split.transpose(0, 2, 1, 3)[~vis] == 0.0)


# ---------------------------------------------------------------- bad inputs

def _ok():
    rng = np.random.default_rng(9)
    return random_case(rng)


def test_rejects_wrong_rank():
    q, k, v, qp, kp = _ok()
    with pytest.raises(ValueError, match="query"):
        attention(q[0], k, v, query_positions=qp, key_positions=kp)
    with pytest.raises(ValueError, match="keys"):
        attention(q, k[0], v, query_positions=qp, key_positions=kp)


def test_rejects_heads_not_multiple():
    rng = np.random.default_rng(10)
    q, k, v, qp, kp = random_case(rng, hq=3, h=2)
    with pytest.raises(ValueError, match=r"query heads \(3\).*keys heads \(2\)"):
        attention(q, k, v, query_positions=qp, key_positions=kp)


def test_rejects_head_dim_mismatch():
    q, k, v, qp, kp = _ok()
    with pytest.raises(ValueError, match="head dimension"):
        attention(q[..., :3], k, v, query_positions=qp, key_positions=kp)


def test_rejects_values_shape_mismatch():
    q, k, v, qp, kp = _ok()
    with pytest.raises(ValueError, match="values"):
        attention(q, k, v[:, :, :-1], query_positions=qp, key_positions=kp)


def test_rejects_bad_positions():
    q, k, v, qp, kp = _ok()
    with pytest.raises(ValueError, match="query_positions"):
        attention(q, k, v, query_positions=qp[:, :-1], key_positions=kp)
    with pytest.raises(ValueError, match="key_positions"):
        attention(q, k, v, query_positions=qp, key_positions=kp[:, :-1])
    with pytest.raises(TypeError, match="key_positions"):
        attention(q, k, v, query_positions=qp, key_positions=kp.astype(float))
    with pytest.raises(ValueError, match="key_valid"):
        attention(q, k, v, query_positions=qp, key_positions=kp,
                  key_valid=np.ones((2, 4), bool))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["query", "keys", "values"])
def test_rejects_non_finite(bad, name):
    q, k, v, qp, kp = _ok()
    arrays = {"query": q, "keys": k, "values": v}
    arrays[name] = arrays[name].copy()
    arrays[name][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=name):
        attention(arrays["query"], arrays["keys"], arrays["values"],
                  query_positions=qp, key_positions=kp)


def test_rejects_bad_scale_and_int_arrays():
    q, k, v, qp, kp = _ok()
    with pytest.raises(ValueError, match="scale"):
        attention(q, k, v, query_positions=qp, key_positions=kp, scale=0.0)
    with pytest.raises(TypeError, match="query"):
        attention(q.astype(np.int32), k, v, query_positions=qp, key_positions=kp)


def test_split_rejects_bad_segment():
    q, k, v, qp, kp = _ok()
    with pytest.raises(ValueError, match="segments"):
        split_attention(q, [(k, v)], query_positions=qp)
    with pytest.raises(ValueError, match="parts"):
        merge_partials([])
