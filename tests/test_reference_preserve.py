"""Unit tests of reference/preserve.py (docs/03-preservation.md)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from reference.config import KVSinkConfig
from reference.preserve import (
    attention_oracle,
    cap_preserved,
    oracle_scores,
    preserve_first_n,
    preserved_set,
    preserved_step,
    union,
)

T_, F_ = True, False


# ---------------------------------------------------------------- Preserve-First-N

def test_pfn_no_padding():
    valid = np.ones((1, 6), bool)
    np.testing.assert_array_equal(preserve_first_n(valid, 2), [[T_, T_, F_, F_, F_, F_]])


def test_pfn_skips_left_padding():
    valid = np.array([[F_, F_, T_, T_, T_, T_],
                      [T_, T_, T_, T_, T_, T_],
                      [F_, F_, F_, F_, F_, T_]])
    got = preserve_first_n(valid, 3)
    expected = np.array([[F_, F_, T_, T_, T_, F_],
                         [T_, T_, T_, F_, F_, F_],
                         [F_, F_, F_, F_, F_, T_]])     # fewer than n valid: all of them
    np.testing.assert_array_equal(got, expected)


def test_pfn_zero_and_large_n():
    valid = np.array([[F_, T_, T_]])
    np.testing.assert_array_equal(preserve_first_n(valid, 0), [[F_, F_, F_]])
    np.testing.assert_array_equal(preserve_first_n(valid, 100), valid)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=4),
       st.integers(0, 6))
def test_pfn_invariants(rows, n):
    valid = np.array(rows, bool)
    p = preserve_first_n(valid, n)
    assert not np.any(p & ~valid)                              # never padding
    np.testing.assert_array_equal(p.sum(1), np.minimum(valid.sum(1), n))
    for b in range(valid.shape[0]):                            # a prefix of the valid tokens
        idx = np.flatnonzero(valid[b])
        np.testing.assert_array_equal(np.flatnonzero(p[b]), idx[:n])


def test_pfn_bad_inputs():
    with pytest.raises(TypeError, match="valid"):
        preserve_first_n(np.ones((1, 3), int), 1)
    with pytest.raises(ValueError, match="valid"):
        preserve_first_n(np.ones(3, bool), 1)
    with pytest.raises(ValueError, match="n"):
        preserve_first_n(np.ones((1, 3), bool), -1)
    with pytest.raises(TypeError, match="n"):
        preserve_first_n(np.ones((1, 3), bool), 1.5)


# ---------------------------------------------------------------- attention oracle

def causal_uniform(t, heads=2):
    """Uniform causal attention: p[j, i] = 1/(j+1) for i <= j."""
    p = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    return np.broadcast_to(p, (1, heads, t, t)).copy()


def test_oracle_uniform_attention_scores():
    t = 5
    s = oracle_scores(causal_uniform(t))
    # token i is seen by the T - i queries j >= i, each giving p * n_j = 1; divided by T queries
    np.testing.assert_allclose(s[0], (t - np.arange(t)) / t, rtol=1e-15)
    assert not attention_oracle(causal_uniform(t), 1.5).any()


def test_oracle_planted_sink():
    t, sink = 12, 3
    probs = causal_uniform(t, heads=3)
    for j in range(sink, t):         # every query from the sink on gives it 80% of its attention
        row = np.zeros(t)
        row[: j + 1] = 0.2 / j
        row[sink] = 0.8
        probs[0, :, j] = row
    s = oracle_scores(probs)
    flags = attention_oracle(probs, 4.0)
    np.testing.assert_array_equal(np.flatnonzero(flags[0]), [sink])
    expected = sum(0.8 * (j + 1) for j in range(sink, t)) / t
    np.testing.assert_allclose(s[0, sink], expected, rtol=1e-14)


def test_oracle_one_head_out_of_two_is_averaged():
    probs = causal_uniform(4, heads=2)
    probs[0, 0, :, :] = 0.0
    probs[0, 0, :, 0] = 1.0           # head 0 puts everything on token 0
    s = oracle_scores(probs)
    # head 0 gives token 0 sum_j (j+1) = 10 over 4 queries; head 1 gives 1 per query
    np.testing.assert_allclose(s[0, 0], (10 / 4 + 4 / 4) / 2, rtol=1e-15)


def test_oracle_padding_never_sink_and_counts_only_valid_keys():
    t = 6
    valid = np.array([[F_, F_, T_, T_, T_, T_]])
    probs = np.zeros((1, 1, t, t))
    for j in range(2, t):
        probs[0, 0, j, 2] = 1.0      # all attention on the first real token
    probs[0, 0, :2, 0] = 1.0         # padding queries: garbage rows, must be ignored
    s = oracle_scores(probs, valid)
    assert s[0, 0] == 0 and s[0, 1] == 0
    # real queries j = 2..5 see n_j = j - 1 keys; 4 real queries
    np.testing.assert_allclose(s[0, 2], (1 + 2 + 3 + 4) / 4, rtol=1e-15)
    flags = attention_oracle(probs, 2.0, valid)
    np.testing.assert_array_equal(flags, [[F_, F_, T_, F_, F_, F_]])


def test_oracle_last_queries_only():
    # Tq < T: the 2 queries are the slots 3 and 4 of 5
    probs = np.zeros((1, 1, 2, 5))
    probs[0, 0, 0, :4] = [0.7, 0.1, 0.1, 0.1]
    probs[0, 0, 1, :] = [0.6, 0.1, 0.1, 0.1, 0.1]
    s = oracle_scores(probs)
    np.testing.assert_allclose(s[0, 0], (0.7 * 4 + 0.6 * 5) / 2, rtol=1e-15)
    np.testing.assert_allclose(s[0, 4], (0.1 * 5) / 2, rtol=1e-15)   # seen by one query only


def test_oracle_ignores_probability_on_invisible_keys():
    probs = causal_uniform(4, heads=1)
    noisy = probs.copy()
    noisy[0, 0, 0, 3] = 0.5            # query 0 cannot see key 3
    np.testing.assert_array_equal(oracle_scores(probs), oracle_scores(noisy))


def test_oracle_layers_pooled_along_heads():
    a = causal_uniform(5, heads=2)
    b = a.copy()
    b[0, :, :, :] = 0
    b[0, :, :, 0] = 1.0
    pooled = oracle_scores(np.concatenate([a, b], axis=1))
    np.testing.assert_allclose(pooled, (oracle_scores(a) + oracle_scores(b)) / 2, rtol=1e-15)


def test_oracle_bad_inputs():
    probs = causal_uniform(4)
    with pytest.raises(ValueError, match="probs"):
        oracle_scores(probs[0])
    bad = probs.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="probs"):
        oracle_scores(bad)
    with pytest.raises(ValueError, match="probs"):
        oracle_scores(-probs)
    with pytest.raises(ValueError, match="Tq"):
        oracle_scores(np.zeros((1, 1, 5, 4)))
    with pytest.raises(ValueError, match="valid"):
        oracle_scores(probs, np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="ratio"):
        attention_oracle(probs, 0.0)
    with pytest.raises(ValueError, match="ratio"):
        attention_oracle(probs, float("nan"))


# ---------------------------------------------------------------- union and cap

def test_union():
    a = np.array([[T_, F_, F_]])
    b = np.array([[F_, F_, T_]])
    np.testing.assert_array_equal(union(a, b), [[T_, F_, T_]])
    np.testing.assert_array_equal(union(a), a)
    assert union(a) is not a
    with pytest.raises(ValueError, match="at least one"):
        union()
    with pytest.raises(ValueError, match="shape"):
        union(a, np.ones((1, 2), bool))
    with pytest.raises(TypeError, match="masks"):
        union(a, np.ones((1, 3), int))


def test_cap_keeps_earliest():
    flags = np.array([[F_, T_, T_, F_, T_, T_],
                      [T_, F_, F_, F_, F_, T_]])
    np.testing.assert_array_equal(cap_preserved(flags, 2),
                                  [[F_, T_, T_, F_, F_, F_],
                                   [T_, F_, F_, F_, F_, T_]])
    np.testing.assert_array_equal(cap_preserved(flags, 0), np.zeros_like(flags))
    np.testing.assert_array_equal(cap_preserved(flags, None), flags)
    with pytest.raises(ValueError, match="max_count"):
        cap_preserved(flags, -1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=12), st.integers(0, 13))
def test_cap_equals_streaming(row, cap):
    """Tokens arrive one at a time; the store admits a preserved token while it has room."""
    flags = np.array([row], bool)
    store, kept = 0, []
    for f in row:
        take = bool(f) and store < cap
        store += take
        kept.append(take)
    np.testing.assert_array_equal(cap_preserved(flags, cap)[0], kept)


# ---------------------------------------------------------------- preserved_set

def test_preserved_set_union_of_policies_with_padding():
    valid = np.array([[F_, T_, T_, T_, T_, T_]])
    predicted = np.array([[T_, F_, F_, T_, F_, F_]])   # a prediction on padding is dropped
    cfg = KVSinkConfig(preserve="pfn+kvsink", preserve_first_n=1)
    got = preserved_set(cfg, valid, predicted=predicted)
    np.testing.assert_array_equal(got, [[F_, T_, F_, T_, F_, F_]])


def test_preserved_set_cap_and_oracle():
    valid = np.ones((1, 6), bool)
    predicted = np.array([[F_, F_, T_, F_, T_, F_]])
    oracle = np.array([[F_, T_, F_, F_, F_, T_]])
    cfg = KVSinkConfig(preserve=("kvsink", "oracle", "pfn"), preserve_first_n=1, max_preserved=3)
    got = preserved_set(cfg, valid, predicted=predicted, oracle=oracle)
    np.testing.assert_array_equal(got, [[T_, T_, T_, F_, F_, F_]])


def test_preserved_set_none_and_ignored_inputs():
    valid = np.ones((2, 4), bool)
    cfg = KVSinkConfig(preserve="none")
    assert not preserved_set(cfg, valid, predicted=np.ones((2, 4), bool)).any()
    cfg = KVSinkConfig(preserve="pfn", preserve_first_n=2)
    np.testing.assert_array_equal(preserved_set(cfg, valid), preserve_first_n(valid, 2))


def test_preserved_set_missing_inputs():
    valid = np.ones((1, 4), bool)
    with pytest.raises(ValueError, match="predicted"):
        preserved_set(KVSinkConfig(preserve="kvsink"), valid)
    with pytest.raises(ValueError, match="oracle"):
        preserved_set(KVSinkConfig(preserve="oracle"), valid)
    with pytest.raises(ValueError, match="predicted"):
        preserved_set(KVSinkConfig(preserve="kvsink"), valid, predicted=np.ones((1, 3), bool))
    with pytest.raises(TypeError, match="config"):
        preserved_set({"preserve": "pfn"}, valid)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_preserved_set_invariants(data):
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 8))
    bools = st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)
    valid = np.array(data.draw(bools), bool)
    pred = np.array(data.draw(bools), bool)
    orc = np.array(data.draw(bools), bool)
    cap = data.draw(st.one_of(st.none(), st.integers(0, 9)))
    n = data.draw(st.integers(1, 4))
    cfg = KVSinkConfig(preserve="pfn+kvsink+oracle", preserve_first_n=n, max_preserved=cap)
    got = preserved_set(cfg, valid, predicted=pred, oracle=orc)
    assert not np.any(got & ~valid)
    full = (preserve_first_n(valid, n) | pred | orc) & valid
    assert not np.any(got & ~full)
    if cap is None:
        np.testing.assert_array_equal(got, full)
    else:
        np.testing.assert_array_equal(got.sum(1), np.minimum(full.sum(1), cap))


# ---------------------------------------------------------------- Proposition 3.7 (streaming form)

@settings(max_examples=60, deadline=None)
@given(st.data())
def test_preserved_step_chained_equals_preserved_set(data):
    """Feeding a sequence to preserved_step in arbitrary chunks, carrying the counts, gives
    exactly preserved_set over the whole sequence (every policy but the oracle)."""
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
    bools = st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)
    valid = np.array(data.draw(bools), bool)
    pred = np.array(data.draw(bools), bool)
    preserve = data.draw(st.sampled_from(["none", "pfn", "kvsink", "pfn+kvsink"]))
    cfg = KVSinkConfig(preserve=preserve, preserve_first_n=data.draw(st.integers(1, 4)),
                       max_preserved=data.draw(st.one_of(st.none(), st.integers(0, 5))))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, t - 1), max_size=4)) if t > 1 else []))
    v, p, parts = np.zeros(b, np.int64), np.zeros(b, np.int64), []
    for lo, hi in zip([0] + cuts, cuts + [t]):
        flags, v, p = preserved_step(cfg, valid[:, lo:hi], v, p, predicted=pred[:, lo:hi])
        parts.append(flags)
    want = preserved_set(cfg, valid, predicted=pred)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), want)
    np.testing.assert_array_equal(v, valid.sum(1))
    np.testing.assert_array_equal(p, want.sum(1))


def test_preserved_step_refuses_what_it_cannot_do():
    valid, zero = np.ones((1, 2), bool), np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="oracle"):
        preserved_step(KVSinkConfig(preserve="pfn+oracle"), valid, zero, zero)
    with pytest.raises(ValueError, match="predicted is None"):
        preserved_step(KVSinkConfig(preserve="kvsink"), valid, zero, zero)
    with pytest.raises(ValueError, match="valid_before must be an integer array of shape \\(1,\\)"):
        preserved_step(KVSinkConfig(preserve="pfn"), valid, np.zeros(2, np.int64), zero)
