"""Attention, direct and split (CONTRACT: attention; docs/05-attention.md).

The port's output is compared with the float64 reference under the bound of
docs/09-tolerances.md §9.3 (conformance/tolerances.py ``attention_bound``),
computed per query from the drawn inputs; a query that sees no key must
output exactly 0.  The cases cover grouped-query attention (Hq/H = 1..4),
empty key sets, holes (-1 positions), shuffled positions, ``key_valid``,
custom scales, float16 inputs and keys with planted outlier channels.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note, strategies as st

from reference import attention as ra

from . import tolerances as tol
from .profiles import examples
from .strategies import attention_cases, segment_lists


def _note(case):
    q, k = case["query"], case["keys"]
    note(f"query {q.shape} keys {k.shape} dtype={case['dtype']} scale={case['scale']} "
         f"query_positions={case['query_positions'].tolist()} key_positions={case['key_positions'].tolist()} "
         f"key_valid={None if case['key_valid'] is None else case['key_valid'].astype(int).tolist()}")


def _expected(case, key_positions=None):
    kp = case["key_positions"] if key_positions is None else key_positions
    want = ra.attention(case["query"], case["keys"], case["values"],
                        query_positions=case["query_positions"], key_positions=kp,
                        key_valid=case["key_valid"], scale=case["scale"])
    n_vis = ra.visible_keys(case["query_positions"], kp, case["key_valid"]).sum(axis=-1)
    bound = tol.attention_bound(case["query"], case["keys"], case["values"], n_vis, case["scale"],
                                case["dtype"])
    return want, bound, n_vis


@pytest.mark.part("attention")
@examples(200)
@given(attention_cases())
def test_attention_within_bound(port, case):
    _note(case)
    got = port.attention(case["query"], case["keys"], case["values"],
                         query_positions=case["query_positions"], key_positions=case["key_positions"],
                         key_valid=case["key_valid"], scale=case["scale"])
    want, bound, n_vis = _expected(case)
    tol.check_attention(got, want, bound, n_vis, "attention")


@pytest.mark.part("split_attention")
@examples(150)
@given(segment_lists())
def test_split_attention_equals_attention_over_concatenation(port, sc):
    case, cuts = sc
    _note(case)
    note(f"segment cuts along the keys: {cuts}")
    # key_valid is folded into the positions: split_attention has no key_valid argument
    kp = case["key_positions"]
    if case["key_valid"] is not None:
        kp = np.where(case["key_valid"], kp, -1)
    bounds = [0] + list(cuts) + [case["keys"].shape[2]]
    segments = [(np.ascontiguousarray(case["keys"][:, :, a:b]), np.ascontiguousarray(case["values"][:, :, a:b]),
                 np.ascontiguousarray(kp[:, a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    got = port.split_attention(case["query"], segments, query_positions=case["query_positions"],
                               scale=case["scale"])
    case = dict(case, key_valid=None)
    want, bound, n_vis = _expected(case, key_positions=kp)
    tol.check_attention(got, want, bound, n_vis, f"split_attention over {len(segments)} segments")


@pytest.mark.part("split_attention")
@examples(20)
@given(attention_cases(max_keys=4))
def test_split_attention_without_segments_is_zero(port, case):
    got = np.asarray(port.split_attention(case["query"], [], query_positions=case["query_positions"],
                                          scale=case["scale"]))
    assert got.shape == case["query"].shape, f"shape {got.shape} != {case['query'].shape}"
    assert np.all(got == 0), "with no segment every query sees no key: the output must be 0"


@pytest.mark.part("attention")
@examples(20)
@given(st.sampled_from(["query", "keys", "values"]), st.sampled_from(["nan", "inf"]))
def test_attention_rejects_non_finite(port, which, bad):
    arrays = dict(query=np.ones((1, 2, 1, 4), np.float32), keys=np.ones((1, 1, 3, 4), np.float32),
                  values=np.ones((1, 1, 3, 4), np.float32))
    arrays[which][0, 0, 0, 1] = float(bad)
    with pytest.raises(ValueError):
        port.attention(arrays["query"], arrays["keys"], arrays["values"],
                       query_positions=np.array([[3]]), key_positions=np.array([[0, 1, 2]]))


@pytest.mark.part("attention")
@examples(10)
@given(st.sampled_from([3, 5]))
def test_attention_rejects_bad_head_ratio(port, hq):
    with pytest.raises(ValueError):
        port.attention(np.ones((1, hq, 1, 4), np.float32), np.ones((1, 2, 3, 4), np.float32),
                       np.ones((1, 2, 3, 4), np.float32), query_positions=np.array([[3]]),
                       key_positions=np.array([[0, 1, 2]]))
