"""The conformance suite rejects the deliberately broken ports of conformance/examples/broken_ports.py
(issue 13): each bug once passed the suite; each check named here must now fail on it and pass on
the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from conformance import test_cache as TC
from conformance import test_preserve as TP
from conformance import test_vectors as TV
from conformance.examples import broken_ports as BP
from conformance.impls import reference_port
from reference import preserve as rpres

TIE_VECTORS = ["quantize_10", "quantize_11", "cache_ties"]


@pytest.mark.parametrize("name", TIE_VECTORS)
def test_vectors_reject_rounding_half_away_from_zero(name):
    TV.test_port_matches_vector(reference_port(), name)
    with pytest.raises(AssertionError, match="near-tie rule"):
        TV.test_port_matches_vector(BP.half_away_factory(), name)


def test_cache_state_machine_rejects_rounding_half_away_from_zero():
    """The machine's grid pattern puts codes on exact ties in the cache."""
    class Machine(TC.CacheMachine):
        port = BP.half_away_factory()
    with pytest.raises(AssertionError, match="near-tie rule"):
        run_state_machine_as_test(Machine, settings=settings(
            max_examples=300, stateful_step_count=12, derandomize=True, database=None, deadline=None,
            phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck)))


def test_vectors_reject_a_strict_oracle():
    TV.test_port_matches_vector(reference_port(), "attention_oracle_on_ratio")
    with pytest.raises(AssertionError, match="mask"):
        TV.test_port_matches_vector(BP.strict_oracle_factory(), "attention_oracle_on_ratio")


def test_oracle_property_check_decides_on_the_ratio():
    """The property check's near-tie band leaves a score exactly on the ratio to ``>=``."""
    a = TV.load("attention_oracle_on_ratio")
    ratio = TV.CASES["attention_oracle_on_ratio"]["params"]["ratio"]
    probs, valid = a["probs"], a["valid"]
    TP._oracle_check(rpres.attention_oracle(probs, ratio, valid), probs, valid, ratio)
    with pytest.raises(AssertionError, match="attention_oracle differs"):
        TP._oracle_check(BP.strict_oracle_factory().attention_oracle(probs, ratio, valid), probs,
                         valid, ratio)
    # a score a rounding away from the ratio stays undecided: either answer passes
    near = np.nextafter(ratio, 0.0)
    TP._oracle_check(rpres.oracle_scores(probs, valid) > near, probs, valid, near)


@pytest.mark.parametrize("residual_length", [0, 4])
def test_cache_check_rejects_preserve_on_padding(residual_length):
    TC.test_resolve_rejects_preserve_on_padding(reference_port(), residual_length)
    with pytest.raises(pytest.fail.Exception):
        TC.test_resolve_rejects_preserve_on_padding(BP.padding_preserve_factory(), residual_length)
