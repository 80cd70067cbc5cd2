"""The comparison rules of the conformance suite, as stated in docs/09-tolerances.md.

Every rule here is a transcription of a paragraph of docs/09-tolerances.md
(the paragraph is named in each docstring); nothing is tuned to make a port
pass, and a port cannot override any of them (adapter.py).  Each ``check_*``
function raises ``AssertionError`` with a message that names the first
offending element, the two values and the rule.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from reference import quantize as rq

#: float32 unit roundoff ``u = 2**-24``.
U32 = 2.0**-24
#: float16 unit roundoff.
U16 = 2.0**-11
#: bfloat16 unit roundoff.
UBF16 = 2.0**-8
#: smallest float32 subnormal.
ETA32 = 2.0**-149

#: docs/09-tolerances.md 9.2(a), equation (9.2): a port may compute ``t = (x - z) / s`` with an
#: approximate division or a reciprocal multiplication, ``|t' - t| <= K ulp(t)`` with K = 3; its
#: code may then differ by one where the reference's ``t`` lies within K ulps of a tie.  The
#: suite accepts every arithmetic the page allows, so it applies K = 3 to every port (a port
#: using the reference's IEEE division gets identical codes, K = 0, and passes a fortiori).
DIVISION_ULPS = 3


def first_index(mask: np.ndarray):
    idx = np.argwhere(mask)
    return tuple(int(i) for i in idx[0]) if idx.size else None


def assert_identical(got, want, what: str, rule: str = "bit-identical (docs/09-tolerances.md)") -> None:
    """Exact equality of shape, dtype kind and every element (NaN never occurs: inputs are finite)."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    if want.dtype.kind == "f":
        got_cmp = got.astype(want.dtype)
        assert np.all(np.asarray(got, dtype=np.float64) == got_cmp.astype(np.float64)), \
            f"{what}: values are not representable in {want.dtype}"
        bad = got_cmp != want            # value equality (+0 == -0)
    else:
        bad = got != want
    if np.any(bad):
        i = first_index(bad)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements differ from the "
                             f"reference ({rule}); first at {i}: got {got[i]!r}, want {want[i]!r}")


def check_codes(got_codes, want_codes, t_ref: np.ndarray, counted: np.ndarray, what: str) -> None:
    """Codes: equal, except a difference of one code where the reference's ``t`` is within
    :data:`DIVISION_ULPS` ulps of a tie (9.2(a)).  Uncounted (excluded) slots must be equal."""
    got = np.asarray(got_codes)
    want = np.asarray(want_codes)
    assert got.shape == want.shape, f"{what}: codes shape {got.shape} != reference {want.shape}"
    assert got.dtype == np.uint8, f"{what}: codes must be uint8, got {got.dtype}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    if DIVISION_ULPS > 0:
        near_tie = counted & (rq.distance_to_tie_ulps(t_ref) <= DIVISION_ULPS)
        bad = (diff > 1) | ((diff == 1) & ~near_tie)
    else:
        bad = diff != 0
    if np.any(bad):
        i = first_index(bad)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} codes differ from the reference beyond the "
            f"near-tie rule (docs/09-tolerances.md 9.2(a): |dq| <= 1, and 0 beyond K={DIVISION_ULPS} ulps of a tie); first at {i}: got "
            f"{got[i]}, want {want[i]}, reference t = (x - z) / s = {float(t_ref[i])!r} "
            f"({float(rq.distance_to_tie_ulps(t_ref)[i]):.3g} ulps from a tie)")


def check_dequantized(got, want, codes, scale_full, symmetric: bool, what: str) -> None:
    """Dequantized values from *equal* codes, docs/09-tolerances.md 9.2(b), rule (9.3).

    symmetric: one rounding, bit-identical; asymmetric (a port may fuse ``q * s + z``):
    ``|x_port - x_ref| <= 2u (|q s| + |x_ref|) + eta``.
    """
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    if symmetric:
        assert_identical(got, want, what, rule="symmetric (q - M) * s: one rounding, bit-identical "
                                               "(docs/09-tolerances.md 9.2(b))")
        return
    qs = np.abs(codes.astype(np.float64) * scale_full.astype(np.float64))
    bound = 2 * U32 * (qs + np.abs(want.astype(np.float64))) + ETA32
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = err > bound
    if np.any(bad):
        i = first_index(bad)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values beyond rule (9.3) "
            f"|x_port - x_ref| <= 2u(|q s| + |x_ref|) + eta (docs/09-tolerances.md 9.2(b)); first at "
            f"{i}: got {got[i]!r}, want {want[i]!r}, q={int(codes[i])}, s={float(scale_full[i])!r}, "
            f"|err|={err[i]:.3g} > bound {bound[i]:.3g}")


def check_dequantized_near(got, want, got_codes, want_codes, scale_full, what: str) -> None:
    """Dequantized values where the codes may differ by one (9.4, second dequantization row):
    ``|x_port - x_ref| <= s + 2u((q + 1) s + |x_ref| + s) + eta`` where the codes differ, (9.3)
    where they are equal (symmetric ports: equal codes give identical values, covered by (9.3))."""
    got = np.asarray(got, dtype=np.float64)
    want_f = np.asarray(want, dtype=np.float64)
    assert got.shape == want_f.shape, f"{what}: shape {got.shape} != reference {want_f.shape}"
    s = np.abs(scale_full.astype(np.float64))
    q = np.maximum(got_codes, want_codes).astype(np.float64)
    differ = got_codes != want_codes
    bound = np.where(differ, s + 2 * U32 * ((q + 1) * s + np.abs(want_f) + s),
                     2 * U32 * (q * s + np.abs(want_f))) + ETA32
    err = np.abs(got - want_f)
    bad = err > bound
    if np.any(bad):
        i = first_index(bad)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values beyond docs/09-tolerances.md 9.2(b)/9.4; "
            f"first at {i}: got {got[i]!r}, want {want_f[i]!r}, codes {int(got_codes[i])} vs "
            f"{int(want_codes[i])}, s={s[i]!r}, |err|={err[i]:.3g} > bound {bound[i]:.3g}")


#: docs/09-tolerances.md 9.3 table: (u_in, u_p, u_v, u_o) by the dtype of the inputs.  The
#: suite accepts every port the page allows: float32 inputs get the TF32 row (a float32 port
#: with TF32 off is within it a fortiori); fp16 / bf16 inputs the fp16 / bf16 rows.
ATTENTION_ROWS = {
    "float32": dict(u_in=2.0**-11, u_p=0.0, u_v=2.0**-11, u_o=U32, eta_o=ETA32),
    "float16": dict(u_in=0.0, u_p=2.0**-11, u_v=0.0, u_o=2.0**-11, eta_o=2.0**-24),
    "bfloat16": dict(u_in=0.0, u_p=2.0**-8, u_v=0.0, u_o=2.0**-8, eta_o=2.0**-133),
}


def attention_bound(query, keys, values, n_visible, scale, dtype: str) -> np.ndarray:
    """Per-element bound of docs/09-tolerances.md 9.3 ("Test rule (attention)"), float64 (B, Hq, Tq, 1).

    ``|o_port - o_ref| <= V [2.5 (c A (2u_in + (D+1)u) + u (3 ln S + 2S + 4) + u_p) + u_v + u_o + u]``
    with ``V = max |values|`` of the KV head read by the query, ``A = max_j sum_d |q_d k_jd|``
    over the keys of that head, ``S`` the query's visible keys and ``c`` the scale.
    The fp16 row's ``u_p`` is raised by ``S 2^-25`` (fp16 subnormal weights, 9.3).

    Plus the absolute term ``(S + 2) eta_o`` for subnormal results, which the relative
    bound of 9.3 does not cover: each of the ``S`` products ``e_j v_j`` (``e_j <= 1``) and the
    final division and rounding to the output format may add ``eta_o / 2`` absolute
    (9.3 preamble: ``|eps| <= eta / 2``), the sum being divided by ``W >= 1``; ``eta_o`` is
    the smallest subnormal of the output format (float32 ``2^-149``, fp16 ``2^-24``, bf16
    ``2^-133``).  It only matters for values below ~1e-37 (float32) or 6e-5 (fp16).
    """
    q = np.abs(np.asarray(query, dtype=np.float64))
    k = np.abs(np.asarray(keys, dtype=np.float64))
    v = np.abs(np.asarray(values, dtype=np.float64))
    b, hq, tq, d = q.shape
    h = k.shape[1]
    heads = np.arange(hq) // (hq // h)
    c = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    row = ATTENTION_ROWS[dtype]
    u = U32
    if k.shape[2] == 0:
        return np.zeros((b, hq, tq, 1))
    a = np.einsum("bhtd,bhsd->bhts", q, k[:, heads]).max(axis=-1)          # (B, Hq, Tq)
    vmax = v[:, heads].max(axis=(2, 3))[:, :, None]                          # (B, Hq, 1)
    s = np.maximum(np.asarray(n_visible, dtype=np.float64), 1.0)[:, None, :]  # (B, 1, Tq)
    u_p = row["u_p"] + (s * 2.0**-25 if dtype == "float16" else 0.0)
    inner = c * a * (2 * row["u_in"] + (d + 1) * u) + u * (3 * np.log(s) + 2 * s + 4) + u_p
    bound = vmax * (2.5 * inner + row["u_v"] + row["u_o"] + u) + (s + 2) * row["eta_o"]
    return bound[..., None]


def check_attention(got, want, bound, n_visible, what: str) -> None:
    """Attention outputs: within ``bound`` (attention_bound); exactly 0 where a query sees no key."""
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: output has NaN or Inf"
    got = got.astype(np.float64)
    blind = (np.asarray(n_visible) == 0)[:, None, :, None] & np.ones_like(got, dtype=bool)
    if np.any(blind & (got != 0)):
        i = first_index(blind & (got != 0))
        raise AssertionError(f"{what}: a query that sees no key must output exactly 0 "
                             f"(docs/05-attention.md); at {i} got {got[i]!r}")
    err = np.abs(got - want)
    bad = ~blind & (err > bound)
    if np.any(bad):
        i = first_index(bad)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} outputs beyond the bound of "
            f"docs/09-tolerances.md 9.3; first at {i}: got {got[i]!r}, want {want[i]!r}, "
            f"|err|={err[i]:.3g} > bound {np.broadcast_to(bound, got.shape)[i]:.3g}")
