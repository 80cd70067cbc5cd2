"""Deliberately broken ports: the reference with one bug each, bugs that once passed the suite
(issue 13).  ``tests/test_broken_ports.py`` runs the checks that must catch them and requires
that they fail; a conformance suite is only as good as the bugs it rejects.

* :func:`half_away_factory`: codes rounded half away from zero (``floor(|t| + 1/2)``) instead
  of half to even, in ``quantize`` and in the cache.  Caught at exact ties (the ``grid``
  quantize vectors, ``cache_ties``, the cache state machine's grid pattern).
* :func:`strict_oracle_factory`: the attention oracle with ``score > ratio`` instead of ``>=``.
  Caught by ``attention_oracle_on_ratio`` (a score exactly on the ratio).
* :func:`padding_preserve_factory`: a cache whose ``resolve`` silently drops ``preserve`` flags
  on padding slots instead of raising ``ValueError``.

Each is a valid ``--impl`` (``conformance.examples.broken_ports:half_away_factory``), so the
whole suite can be pointed at it too.
"""

from __future__ import annotations

import contextlib

import numpy as np

from conformance.impls import ReferenceCache, ReferencePort
from reference import preserve as rpres
from reference import quantize as rq


def _half_away(t: np.ndarray) -> np.ndarray:
    return np.sign(t) * np.floor(np.abs(t) + 0.5)


@contextlib.contextmanager
def _rounding_half_away():
    """The reference's code functions replaced by half-away-from-zero rounding (for one call)."""
    saved = rq.asymmetric_codes, rq.symmetric_codes

    def asymmetric_codes(x, s, z, bits):
        t = rq.asymmetric_ratio(x, s, z)
        return np.clip(_half_away(t), 0, rq.quantization_levels(bits)).astype(np.uint8)

    def symmetric_codes(x, s, bits):
        m = rq.symmetric_offset(bits)
        return (np.clip(_half_away(rq.symmetric_ratio(x, s)), -m, m) + m).astype(np.uint8)

    rq.asymmetric_codes, rq.symmetric_codes = asymmetric_codes, symmetric_codes
    try:
        yield
    finally:
        rq.asymmetric_codes, rq.symmetric_codes = saved


class _HalfAwayCache(ReferenceCache):
    def update(self, *args, **kw):
        with _rounding_half_away():
            super().update(*args, **kw)

    def flush(self):
        with _rounding_half_away():
            super().flush()


class HalfAwayPort(ReferencePort):
    name = "broken: rounds half away from zero"

    def quantize(self, *args, **kw):
        with _rounding_half_away():
            return super().quantize(*args, **kw)

    def make_cache(self, config, dtype="float32", **kw):
        return _HalfAwayCache(config, dtype, **kw)


class StrictOraclePort(ReferencePort):
    name = "broken: attention oracle with > at the ratio"

    def attention_oracle(self, probs, ratio, valid=None):
        return rpres.oracle_scores(probs, valid) > float(ratio)


class _PaddingPreserveCache(ReferenceCache):
    def resolve(self, preserve):
        layer = self.layer
        pending_valid = layer.residual[2][:, layer.num_residual - layer.num_pending:]
        super().resolve(np.asarray(preserve) & pending_valid)     # the bug: drops them silently


class PaddingPreservePort(ReferencePort):
    name = "broken: resolve accepts preserve on padding"

    def make_cache(self, config, dtype="float32", **kw):
        return _PaddingPreserveCache(config, dtype, **kw)


def half_away_factory() -> HalfAwayPort:
    return HalfAwayPort()


def strict_oracle_factory() -> StrictOraclePort:
    return StrictOraclePort()


def padding_preserve_factory() -> PaddingPreservePort:
    return PaddingPreservePort()
