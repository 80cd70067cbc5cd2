"""The comparison rules of the conformance suite, as stated in docs/09-tolerances.md.

Every rule here is a transcription of a paragraph of docs/09-tolerances.md
(the paragraph is named in each docstring); nothing is tuned to make a port
pass, and a port cannot override any of them (adapter.py).  Each ``check_*``
function raises ``AssertionError`` with a message that names the first
offending element, the two values and the rule.
"""

from __future__ import annotations

import math

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


def uniform_ratio(x, s, z, counted):
    """The reference's ``t`` of a uniform quantization (definitions 2.2, 2.3) and where every
    permitted arithmetic computes it exactly (:func:`exact_ratio`): ``(t, exact)``.  ``x``, ``s``
    and ``z`` (``None`` for the symmetric scheme) float32, broadcast to one shape; an uncounted
    element takes ``z`` (resp. 0), as in the reference."""
    c = np.float32(0) if z is None else z
    x_eff = np.where(counted, x, c).astype(np.float32)
    t = rq.symmetric_ratio(x_eff, s) if z is None else rq.asymmetric_ratio(x_eff, s, z)
    return t, exact_ratio(x_eff, s, c, t)


def check_codes(got_codes, want_codes, t_ref: np.ndarray, counted: np.ndarray, what: str, *,
                exact: np.ndarray) -> None:
    """Codes: equal, except a difference of one code where the reference's ``t`` is within
    :data:`DIVISION_ULPS` ulps of a tie (9.2(a)) and some permitted arithmetic computes a
    different ``t`` there: not where ``exact`` (:func:`exact_ratio`: every permitted arithmetic
    gives the reference's ``t``, so an exact tie rounds half to even in every port).  Uncounted
    (excluded) slots must be equal."""
    got = np.asarray(got_codes)
    want = np.asarray(want_codes)
    assert got.shape == want.shape, f"{what}: codes shape {got.shape} != reference {want.shape}"
    assert got.dtype == np.uint8, f"{what}: codes must be uint8, got {got.dtype}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    if DIVISION_ULPS > 0:
        near_tie = counted & (rq.distance_to_tie_ulps(t_ref) <= DIVISION_ULPS) & ~np.asarray(exact)
        bad = (diff > 1) | ((diff == 1) & ~near_tie)
    else:
        bad = diff != 0
    if np.any(bad):
        i = first_index(bad)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} codes differ from the reference beyond the "
            f"near-tie rule (docs/09-tolerances.md 9.2(a): |dq| <= 1, and 0 beyond K={DIVISION_ULPS} ulps of a tie "
            f"or where t is exact in every arithmetic: exact ties round half to even); first at {i}: got "
            f"{got[i]}, want {want[i]}, reference t = (x - z) / s = {float(t_ref[i])!r} "
            f"({float(rq.distance_to_tie_ulps(t_ref)[i]):.3g} ulps from a tie)")


def oracle_score_exact(probs, valid, b: int, i: int) -> bool:
    """Whether the oracle score of token ``i`` of row ``b`` (definition 3.2) is exact in every
    summation order: its terms ``p * n_j`` are multiples of one power of two whose total stays below
    2^53 of it, and ``Hq * |Q|`` is a power of two.  There a score equal to the ratio is equal in
    every port, and ``>=`` must decide; elsewhere a port's order may move it by a rounding."""
    from fractions import Fraction
    p = np.asarray(probs, np.float64)
    _, hq, tq, t = p.shape
    ok = np.ones(t, bool) if valid is None else np.asarray(valid)[b]
    slots = np.arange(t - tq, t)
    real = ok[slots]
    n = np.array([(ok[:s + 1]).sum() for s in slots])
    terms = [Fraction(float(p[b, h, j, i])) * int(n[j]) for h in range(hq) for j in range(tq)
             if real[j] and ok[i] and i <= slots[j]]
    denom = hq * max(int(real.sum()), 1)
    if denom & (denom - 1) or not terms:
        return False
    scale = max(f.denominator for f in terms)              # powers of two (floats are dyadic)
    return all(float(f) == f for f in terms) and sum(abs(f) for f in terms) * scale < 2**53


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


# =========================================================================== kvquant
# docs/08-kvquant.md §8.11 (a port's quantizer on the same input) and docs/09-tolerances.md
# §9.6 (the kvquant cache: keys un-rotated by the port's RoPE, so the quantizer input differs).

from reference import kvquant as rkv  # noqa: E402

#: docs/08-kvquant.md §8.11 / docs/09-tolerances.md 9.2(a), §9.6: a port may divide within K ulps,
#: so its code may be that of any ``t'`` within K ulps of the reference's ``t``.
KVQUANT_BOUNDARY_ULPS = DIVISION_ULPS


def rope_port_error(y) -> np.ndarray:
    """docs/08-kvquant.md §8.11: ``|rope_port(y) - rope_ref(y)| <= 7u(|a| + |b|) + 8 eta`` for each
    element of a pair ``(a, b) = (y[..., i], y[..., i + D/2])`` of the input; float64 ``y.shape``."""
    a = np.abs(np.asarray(y, dtype=np.float64))
    h = a.shape[-1] // 2
    pair = a[..., :h] + a[..., h:]
    return 7 * U32 * np.concatenate([pair, pair], axis=-1) + 8 * ETA32


def rope_propagated_bound(delta, x_hat) -> np.ndarray:
    """docs/09-tolerances.md (9.9): bound of ``|R'(x') - R(x)|`` for the port's rotation ``R'`` of an
    input within ``delta`` (per element) of the reference's input ``x_hat`` rotated by the
    reference's ``R``: ``(1 + 4u)(delta_a + delta_b) + 8u(|x_a| + |x_b|) + 16 eta`` per pair."""
    d = np.asarray(delta, dtype=np.float64)
    a = np.abs(np.asarray(x_hat, dtype=np.float64))
    h = a.shape[-1] // 2
    dp = d[..., :h] + d[..., h:]
    ap = a[..., :h] + a[..., h:]
    pair = (1 + 4 * U32) * dp + 8 * U32 * ap + 16 * ETA32
    return np.concatenate([pair, pair], axis=-1)


def _outlier_mask(index, shape, what) -> np.ndarray:
    idx = np.asarray(index)
    assert idx.ndim == 1 and idx.dtype.kind in "ui", \
        f"{what}: outlier_index must be a 1-D integer array, got {idx.dtype} {idx.shape}"
    idx = idx.astype(np.int64)
    size = int(np.prod(shape))
    assert np.all((idx >= 0) & (idx < size)), f"{what}: outlier indices outside [0, {size})"
    assert np.all(np.diff(idx) > 0), \
        f"{what}: outlier indices must be strictly ascending flat C-order indices (docs/08 8.7)"
    mask = np.zeros(size, bool)
    mask[idx] = True
    return mask.reshape(shape)


def _kvq_levels_full(levels, shape) -> np.ndarray:
    lv = np.asarray(levels, dtype=np.float32)
    return np.broadcast_to(lv, tuple(shape) + (lv.shape[-1],))


def _level_of(codes, levels, shape) -> np.ndarray:
    """``l_q`` float64 of the codes (codes clipped into range: callers check the range first)."""
    lv = _kvq_levels_full(levels, shape)
    q = np.minimum(np.asarray(codes).astype(np.intp), lv.shape[-1] - 1)
    return np.take_along_axis(lv, q[..., None], axis=-1)[..., 0].astype(np.float64)


def _code_range(t, w, levels, shape):
    """``(q_lo, q_hi)``: the smallest and largest nearest-level code (definition 8.3, float32
    boundaries compared in float64) of a value in ``[t - w, t + w]``."""
    beta = np.broadcast_to(rkv.level_boundaries(levels).astype(np.float64),
                           tuple(shape) + (np.shape(levels)[-1] - 1,))
    return ((beta < (t - w)[..., None]).sum(axis=-1), (beta < (t + w)[..., None]).sum(axis=-1))


def exact_ratio(x, s, c, t) -> np.ndarray:
    """Where every arithmetic docs/09-tolerances.md 9.2(a) permits computes the reference's
    ``t = fl32(fl32(x - c) / s)`` exactly (docs/09-tolerances.md §9.6, exact ties): ``x - c`` is
    exact in float32, and either ``x - c == 0`` or ``s`` is a power of two with an exact
    quotient.  There the code is fixed by definition 8.3 (a ``t`` on a boundary goes to the
    lower level) and must be identical; the one-level allowance near a boundary does not apply."""
    x64, s64, c64 = (np.asarray(a, np.float64) for a in (x, s, c))
    diff = x64 - c64
    exact_diff = (np.asarray(x, np.float32) - np.asarray(c, np.float32)).astype(np.float64) == diff
    pow2 = np.frexp(s64)[0] == 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        exact_q = np.where(s64 != 0, diff / np.where(s64 != 0, s64, 1.0), np.nan) == np.asarray(t, np.float64)
    return (s64 != 0) & exact_diff & ((diff == 0) | (pow2 & exact_q))


#: the kvquant name of :func:`exact_ratio` (``c`` the group centre)
kvquant_exact_ratio = exact_ratio


def _first_bad(bad, what, rule, got, want, extra=""):
    if np.any(bad):
        i = first_index(bad)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements break {rule}; first at "
                             f"{i}: got {got[i]!r}, want {want[i]!r}{extra(i) if callable(extra) else extra}")


def check_kvquant_side(got, want, x, levels, coded, what: str, *, input_error=None,
                       thresholds=None) -> None:
    """One side (keys or values) of a kvquant block of a port against the reference's.

    got : ``adapter.KVQuantized`` (the port's codes, ``s``, ``c``, sparse outliers).
    want : ``reference.kvquant.KVQuantTensor`` (the reference's block side).
    x : float32 ``(B, H, T, D)``, the values the **reference** quantized.
    levels : the codebook, broadcastable against ``x.shape + (n,)``.
    coded : bool ``(B, T)`` (``~exclude``).

    ``input_error=None``: the port quantized the same ``x``; the rules of
    docs/08-kvquant.md §8.11 and docs/09-tolerances.md §9.6 (``s``, ``c``, outlier indices and
    values identical; a code that of some ``t'`` within K = 3 ulps of the reference's ``t``,
    and identical where every permitted arithmetic computes ``t`` exactly).

    ``input_error`` float64 ``x.shape``: the port quantized ``x'`` with
    ``|x' - x| <= input_error`` (keys un-rotated by the port's RoPE in a cache), and
    ``thresholds = (lower, upper)`` ``(H, D)`` are the key outlier thresholds (definition
    8.5): the rules (9.5)-(9.7) of docs/09-tolerances.md §9.6.
    """
    x = np.asarray(x, dtype=np.float32)
    shape = x.shape
    n_levels = np.shape(levels)[-1]
    codes = np.asarray(got.codes)
    assert codes.dtype == np.uint8 and codes.shape == shape, \
        f"{what}: codes must be uint8 {shape}, got {codes.dtype} {codes.shape}"
    assert np.all(codes < n_levels), f"{what}: codes beyond the {n_levels} levels"
    for name in ("scale", "centre"):
        a = np.asarray(getattr(got, name))
        assert a.dtype == np.float32 and a.shape == getattr(want, name).shape, \
            f"{what}: {name} must be float32 {getattr(want, name).shape}, got {a.dtype} {a.shape}"
    ov = np.asarray(got.outlier_value)
    assert ov.dtype == want.outlier_value.dtype, \
        f"{what}: outlier values must be {want.outlier_value.dtype}, got {ov.dtype}"
    assert ov.shape == np.shape(got.outlier_index), f"{what}: outlier_index / outlier_value lengths differ"
    mask = _outlier_mask(got.outlier_index, shape, what)
    coded4 = np.broadcast_to(np.asarray(coded, bool)[:, None, :, None], shape)
    gax = rkv.GROUP_AXIS[want.axis]
    g, n_axis = want.group_size, shape[gax]
    full = lambda stat: rkv.expand_groups(np.asarray(stat), g, n_axis, gax)  # noqa: E731

    if input_error is None:                                    # docs/08-kvquant.md §8.11
        assert_identical(np.asarray(got.outlier_index).astype(np.int64),
                         want.outlier_index.astype(np.int64), f"{what} outlier indices",
                         "identical (docs/08-kvquant.md 8.11)")
        assert_identical(ov, want.outlier_value, f"{what} outlier values", "identical (8.11)")
        assert_identical(got.scale, want.scale, f"{what} half-range s", "identical (8.11)")
        assert_identical(got.centre, want.centre, f"{what} centre c", "identical (8.11)")
        counted = coded4 & ~mask
        s, c = full(want.scale), full(want.centre)
        t = rkv.normalised(np.where(counted, x, c), s, c)
        # a port's t' within K ulps of t (9.2(a)): the codes of [t - K ulp, t + K ulp]; one level
        # either side of a boundary, more where levels repeat (equal levels decode alike)
        k_ulp = KVQUANT_BOUNDARY_ULPS * np.spacing(np.abs(t)).astype(np.float64)
        q_lo, q_hi = _code_range(t.astype(np.float64), k_ulp, levels, shape)
        free = counted & (s != 0) & ~kvquant_exact_ratio(x, s, c, t)   # exact ties: identical
        bad = np.where(free, (codes < q_lo) | (codes > q_hi), codes != want.codes)
        _first_bad(bad, f"{what} codes",
                   "docs/08-kvquant.md 8.11 (identical, or the code of a t' within 3 ulps of the "
                   "reference's t; identical at exact ties, docs/09-tolerances.md 9.6)",
                   codes, want.codes, lambda i: f", reference t = {float(t[i])!r}, allowed "
                   + (f"[{q_lo[i]}, {q_hi[i]}]" if free[i] else "only the reference's code (exact "
                      "ratio, excluded, outlier or zero-range group)"))
        return

    eps = np.asarray(input_error, dtype=np.float64)
    lower, upper = (np.asarray(a, np.float64)[None, :, None, :] for a in thresholds)
    ref_mask = _outlier_mask(want.outlier_index, shape, what + " (reference)")
    x64 = x.astype(np.float64)
    # (9.5) outliers: a decision may flip only where a threshold is within eps of x
    near_threshold = (np.abs(x64 - lower) <= eps) | (np.abs(x64 - upper) <= eps)
    _first_bad(mask & ~coded4, f"{what} outliers", "8.5 (no outlier on an excluded token)", mask,
               ref_mask)
    _first_bad((mask != ref_mask) & ~near_threshold, f"{what} outlier mask",
               "docs/09-tolerances.md (9.5) (a flip only where |x - threshold| <= eps)", mask, ref_mask,
               lambda i: f", x = {x[i]!r}, eps = {eps[i]:.3g}")
    idx = np.asarray(got.outlier_index).astype(np.int64)
    err = np.abs(ov.astype(np.float64) - x64.reshape(-1)[idx])
    bad = err > eps.reshape(-1)[idx]
    if np.any(bad):
        j = int(np.argmax(bad))
        raise AssertionError(f"{what}: outlier value at flat index {idx[j]} is {ov[j]!r}, the reference's "
                             f"input there is {x.reshape(-1)[idx[j]]!r}: beyond eps = "
                             f"{eps.reshape(-1)[idx[j]]:.3g} (docs/09-tolerances.md (9.5))")
    # (9.6) statistics: the reference's, on the port's counted set
    counted = coded4 & ~mask
    lo, hi = rkv.group_min_max(rkv.split_groups(x, g, gax, fill=0),
                               rkv.split_groups(counted, g, gax, fill=False), gax)
    s_ref, c_ref = rkv.normalisation(lo, hi)
    e_grp = np.where(rkv.split_groups(counted, g, gax, fill=False),
                     rkv.split_groups(eps, g, gax, fill=0.0), 0.0).max(axis=gax)
    s_got = np.asarray(got.scale, np.float64)
    c_got = np.asarray(got.centre, np.float64)
    s64, c64 = s_ref.astype(np.float64), c_ref.astype(np.float64)
    d_s = np.abs(s_got - s64)
    d_c = np.abs(c_got - c64)
    bound_s = e_grp + 2 * U32 * (s64 + s_got) + 2 * ETA32
    bound_c = e_grp + d_s + U32 * (np.abs(c64) + np.abs(c_got))
    _first_bad(d_s > bound_s, f"{what} half-range s", "docs/09-tolerances.md (9.6)", got.scale, s_ref,
               lambda i: f", |ds| = {d_s[i]:.3g} > {bound_s[i]:.3g}")
    _first_bad(d_c > bound_c, f"{what} centre c", "docs/09-tolerances.md (9.6)", got.centre, c_ref,
               lambda i: f", |dc| = {d_c[i]:.3g} > {bound_c[i]:.3g}")
    # (9.7) codes: those of some t within W of the reference's t (on the port's counted set)
    sf, cf = full(s_ref), full(c_ref)
    sg, ds_f, dc_f = full(s_got), full(d_s), full(d_c)
    t = rkv.normalised(np.where(counted, x, cf), sf, cf).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_tau = (eps + dc_f + (1 + 3 * U32) * np.abs(t) * ds_f) / sg
    w = (1 + 7 * U32) * d_tau + 10 * U32 * np.abs(t) + 2 * ETA32
    q_lo, q_hi = _code_range(t, w, levels, shape)
    free = counted & (sf == 0) & (sg != 0)                 # the reference's group has zero range
    must_zero = ~counted | (sg == 0)                        # definition 8.7 step 3
    bad = np.where(must_zero, codes != 0,
                   ~free & ((codes < q_lo) | (codes > q_hi)))
    _first_bad(bad, f"{what} codes", "docs/09-tolerances.md (9.7)", codes, want.codes,
               lambda i: f", allowed [{q_lo[i]}, {q_hi[i]}] (t = {t[i]!r}, W = {w[i]:.3g})")


def kvquant_exact_values(side, levels, group_size: int, axis: str, shape):
    """``(X, dense, |l_q s|)`` float64 of one kvquant block side (``adapter.KVQuantized`` or a
    reference ``KVQuantTensor``): ``X = l_q s + c`` at dense elements (float64 products of float32
    numbers are exact; the sum is rounded once, ``2^-53`` relative), the stored outlier value at
    outliers (``dense`` False there)."""
    gax = rkv.GROUP_AXIS[axis]
    n = shape[gax]
    s = rkv.expand_groups(np.asarray(side.scale), group_size, n, gax).astype(np.float64)
    c = rkv.expand_groups(np.asarray(side.centre), group_size, n, gax).astype(np.float64)
    lqs = _level_of(side.codes, levels, shape) * s
    out = _outlier_mask(side.outlier_index, shape, "outliers")
    x = (lqs + c).reshape(-1)
    x[np.asarray(side.outlier_index).astype(np.int64)] = np.asarray(side.outlier_value, np.float64)
    return x.reshape(shape), ~out, np.where(out, 0.0, np.abs(lqs))


def kvquant_dequantized_bound(got, want, levels, group_size: int, axis: str, x_hat_ref) -> np.ndarray:
    """docs/09-tolerances.md (9.8): bound of ``|x_hat_port - x_hat_ref|`` per element of a block side,
    given both blocks (the port's ``got``, checked by :func:`check_kvquant_side`, and the
    reference's ``want``) and the reference's dequantized values ``x_hat_ref`` (float32)::

        (1 + u)|X' - X| + 2u(|l_q s|_ref + |l_q' s'|_port + |x_hat_ref|) + eta

    with ``X``, ``X'`` the exact values of :func:`kvquant_exact_values` (the ``|l s|`` terms
    and ``eta`` only where that side is dense; an outlier is written back exactly).  With
    equal codes, statistics and outliers this is rule 8.11 ``2u(|l_q s| + |x|) + eta`` (a port
    may fuse ``l_q s + c``) up to the extra ``2u|l_q s|`` for the port's product.
    """
    shape = np.shape(x_hat_ref)
    xg, dg, lg = kvquant_exact_values(got, levels, group_size, axis, shape)
    xw, dw, lw = kvquant_exact_values(want, levels, group_size, axis, shape)
    xh = np.abs(np.asarray(x_hat_ref, np.float64))
    either = dg | dw
    return (1 + U32) * np.abs(xg - xw) + 2 * U32 * (lw + lg + np.where(either, xh, 0.0)) \
        + np.where(either, ETA32, 0.0)


def check_within(got, want, bound, live, what: str, rule: str) -> None:
    """``|got - want| <= bound`` where ``live`` (float64 comparison); NaN/Inf in ``got`` fail."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    live = np.broadcast_to(live, got.shape)
    assert np.all(np.isfinite(got[live])), f"{what}: NaN or Inf"
    err = np.abs(got - want)
    bad = live & ~(err <= bound)
    if np.any(bad):
        i = first_index(bad)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} values beyond {rule}; first at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}, |err| = {err[i]:.3g} > bound "
                             f"{np.broadcast_to(bound, got.shape)[i]:.3g}")


def check_kvquant_dequantized(got, want_qt, what: str) -> None:
    """Dequantization of the reference's kvquant codes (docs/08-kvquant.md §8.11): outliers written
    back exactly, dense elements ``|x_port - x_ref| <= 2u(|l_q s| + |x_ref|) + eta`` (a port may
    fuse ``l_q s + c``)."""
    got = np.asarray(got)
    want = rkv.dequantize_nonuniform(want_qt)
    assert got.dtype == np.float32 and got.shape == want.shape, \
        f"{what}: dequantized values must be float32 {want.shape}, got {got.dtype} {got.shape}"
    out = _outlier_mask(want_qt.outlier_index, want.shape, what)
    assert_identical(got[out], want[out], f"{what}: outliers written back", "identical (8.11)")
    gax = rkv.GROUP_AXIS[want_qt.axis]
    s = rkv.expand_groups(want_qt.scale, want_qt.group_size, want.shape[gax], gax).astype(np.float64)
    lqs = np.abs(_level_of(want_qt.codes, want_qt.levels, want.shape) * s)
    bound = 2 * U32 * (lqs + np.abs(want.astype(np.float64))) + ETA32
    check_within(got, want, bound, ~out, what, "docs/08-kvquant.md 8.11 (2u(|l_q s| + |x|) + eta)")


def check_rope(got, want, x, what: str) -> None:
    """A port's RoPE against the reference's (docs/08-kvquant.md §8.11):
    ``|x_port - x_ref| <= 7u(|a| + |b|) + 8 eta`` per element of each input pair ``(a, b)``."""
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == np.shape(want), \
        f"{what}: must be float32 {np.shape(want)}, got {got.dtype} {got.shape}"
    check_within(got, want, rope_port_error(x), True, what,
                 "docs/08-kvquant.md 8.11 (7u(|a| + |b|) + 8 eta)")
