"""The KVSink sink predictor (CONTRACT: predictor; docs/04-predictor.md).

``outlier_scores`` is an exact float32 computation (``|.|`` and ``max`` of the
float32 input) and ``predict_sinks`` an exact comparison with the float64
threshold, so both must be identical to the reference (docs/09-tolerances.md:
no rounding is involved).  The strategies plant outlier channels on a few
tokens and draw thresholds equal to a score or strictly between two adjacent
float32 numbers, where a port that compares in float32 with a
round-to-nearest threshold goes wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note, strategies as st

from reference import predictor as rp

from . import tolerances as tol
from .profiles import examples
from .strategies import hidden_states_cases, kv_tensors

pytestmark = pytest.mark.part("predictor")


def _note(x32, dtype, channels, threshold=None):
    note(f"hidden shape={x32.shape} dtype={dtype}, channels={channels}, threshold={threshold!r}")
    if x32.size <= 256:
        note(f"hidden (as float32) = {x32.tolist()!r}")


@examples(150)
@given(hidden_states_cases())
def test_outlier_scores_identical(port, case):
    x, x32, dtype, channels, _ = case
    _note(x32, dtype, channels)
    got = np.asarray(port.outlier_scores(x, channels))
    want = rp.outlier_scores(x32, channels)
    assert got.dtype == np.float32, f"outlier_scores must return float32, got {got.dtype}"
    tol.assert_identical(got, want, "outlier scores", rule="exact: max_c |h[t, c]| in float32")


@examples(200)
@given(hidden_states_cases())
def test_predict_sinks_identical(port, case):
    x, x32, dtype, channels, threshold = case
    _note(x32, dtype, channels, threshold)
    got = np.asarray(port.predict_sinks(x, channels, threshold))
    want = rp.predict_sinks(x32, channels, threshold)
    assert got.dtype == np.bool_, f"predict_sinks must return bool, got {got.dtype}"
    tol.assert_identical(got, want, "predicted sinks",
                         rule="exact: float32 score > float64 threshold (docs/04-predictor.md 4.2)")


@examples(60)
@given(hidden_states_cases(), st.data())
def test_predict_sinks_is_per_token(port, case, data):
    """Token t's prediction depends on hidden[..., t, :] only (works while decoding)."""
    x, x32, dtype, channels, threshold = case
    t = x32.shape[-2]
    k = data.draw(st.integers(0, t - 1), label="token")
    _note(x32, dtype, channels, threshold)
    full = np.asarray(port.predict_sinks(x32, channels, threshold))
    one = np.asarray(port.predict_sinks(np.ascontiguousarray(x32[..., k:k + 1, :]), channels, threshold))
    assert np.array_equal(one[..., 0], full[..., k]), \
        f"predicting token {k} alone gives {one[..., 0]}, within the sequence {full[..., k]}"


@examples(20)
@given(kv_tensors((4, 6), allow_special=False), st.sampled_from([(), (1, 1), (6,), (-1,)]))
def test_predictor_rejects_bad_channels(port, x, channels):
    with pytest.raises((ValueError, TypeError)):
        port.predict_sinks(x, channels, 1.0)


@examples(20)
@given(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
def test_predictor_rejects_bad_threshold(port, threshold):
    with pytest.raises((ValueError, TypeError)):
        port.predict_sinks(np.ones((3, 4), np.float32), (0,), threshold)


@examples(20)
@given(st.sampled_from(["nan", "inf"]))
def test_predictor_rejects_non_finite_hidden(port, bad):
    x = np.ones((3, 4), np.float32)
    x[1, 2] = float(bad)
    with pytest.raises(ValueError):
        port.outlier_scores(x, (2,))
