"""Preserved-token sets (CONTRACT: preserve; docs/03-preservation.md).

Masks are computed by counting (exact) and, for the attention oracle, by a
float64 average compared with the ratio.  Masks must be identical to the
reference's; the one exception is an oracle score within a few float64
rounding errors of the ratio (rule in docs/13-conformance.md §Tolerances,
derived like docs/09-tolerances.md: a sum of ``Hq * Tq`` products in a
different order moves it by at most ``(Hq * Tq + 4) * 2**-53`` relative), where
either answer is accepted -- except on the ratio exactly, where ``>=`` decides.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note, strategies as st

from reference import preserve as rpres
from reference.config import KVSinkConfig

from . import tolerances as tol
from .profiles import examples
from .strategies import probs_cases, seeds, valid_masks

pytestmark = pytest.mark.part("preserve")


@st.composite
def masks(draw):
    b = draw(st.integers(1, 3), label="B")
    t = draw(st.integers(0, 20), label="T")
    return b, t, draw(valid_masks(b, t))


@examples(100)
@given(masks(), st.integers(0, 6))
def test_preserve_first_n_identical(port, m, n):
    b, t, valid = m
    note(f"valid={valid.astype(int).tolist()}, n={n}")
    got = np.asarray(port.preserve_first_n(valid, n))
    tol.assert_identical(got, rpres.preserve_first_n(valid, n), "preserve_first_n")


@examples(100)
@given(masks(), st.one_of(st.none(), st.integers(0, 5)), seeds)
def test_cap_preserved_identical(port, m, max_count, seed):
    b, t, _ = m
    flags = np.random.default_rng(seed).random((b, t)) < 0.4
    note(f"flags={flags.astype(int).tolist()}, max_count={max_count}")
    got = np.asarray(port.cap_preserved(flags, max_count))
    tol.assert_identical(got, rpres.cap_preserved(flags, max_count), "cap_preserved")


def _oracle_check(got, probs, valid, ratio):
    want = rpres.attention_oracle(probs, ratio, valid)
    scores = rpres.oracle_scores(probs, valid)
    b, hq, tq, t = probs.shape
    band = (hq * tq + 4) * 2.0**-53 * ratio
    # near the ratio either answer is accepted, but not on it where the score is exact in every
    # summation order: there definition 3.2's ``>=`` decides, and a port using ``>`` fails
    undecided = np.abs(scores - ratio) <= band
    for i in zip(*np.nonzero(undecided & (scores == ratio))):
        undecided[i] = not tol.oracle_score_exact(probs, valid, *i)
    got = np.asarray(got)
    assert got.dtype == np.bool_ and got.shape == want.shape, \
        f"attention_oracle must return bool {want.shape}, got {got.dtype} {got.shape}"
    bad = (got != want) & ~undecided
    if np.any(bad):
        i = tol.first_index(bad)
        raise AssertionError(f"attention_oracle differs at {i}: got {got[i]}, want {want[i]} "
                             f"(reference score {scores[i]!r}, ratio {ratio})")


@examples(100)
@given(probs_cases())
def test_attention_oracle_identical(port, case):
    probs, valid, ratio = case
    note(f"probs shape={probs.shape} dtype={probs.dtype}, ratio={ratio}, "
         f"valid={None if valid is None else valid.astype(int).tolist()}")
    _oracle_check(port.attention_oracle(probs, ratio, valid), probs, valid, ratio)


@st.composite
def preserve_configs(draw):
    preserve = draw(st.sampled_from(["none", "pfn", "kvsink", "oracle", "pfn+kvsink",
                                     "kvsink+oracle", "pfn+kvsink+oracle"]), label="preserve")
    return KVSinkConfig(preserve=preserve, preserve_first_n=draw(st.integers(1, 4), label="n"),
                        max_preserved=draw(st.sampled_from([None, 0, 1, 2, 5]), label="max_preserved"))


@examples(150)
@given(preserve_configs(), masks(), seeds)
def test_preserved_set_identical(port, config, m, seed):
    b, t, valid = m
    rng = np.random.default_rng(seed)
    predicted = rng.random((b, t)) < 0.3
    oracle = rng.random((b, t)) < 0.2
    note(f"config={config}")
    note(f"valid={valid.astype(int).tolist()}, predicted={predicted.astype(int).tolist()}, "
         f"oracle={oracle.astype(int).tolist()}")
    got = np.asarray(port.preserved_set(config, valid, predicted, oracle))
    want = rpres.preserved_set(config, valid, predicted, oracle)
    tol.assert_identical(got, want, "preserved_set")
    assert not np.any(got & ~valid), "preserved_set marked a padding token"


@examples(20)
@given(st.sampled_from(["kvsink", "oracle"]))
def test_preserved_set_requires_policy_input(port, policy):
    with pytest.raises(ValueError):
        port.preserved_set(KVSinkConfig(preserve=policy), np.ones((1, 4), bool), None, None)
