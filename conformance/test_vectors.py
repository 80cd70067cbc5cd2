"""Golden vectors (conformance/vectors/, format in make_vectors.py and docs/13-conformance.md).

* the stored arrays match their manifest checksums, and regenerating the
  vectors from the reference reproduces the manifest exactly;
* the implementation under test reproduces every case, under the rules of
  docs/09-tolerances.md (the same rules as the property tests).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reference import attention as ra
from reference import kvquant as rkv
from reference import quantize as rq

from . import kvquant_checks as kq
from . import make_vectors as mv
from . import tolerances as tol
from .adapter import as_bfloat16, replay_cache_ops

MANIFEST = json.loads((mv.VECTORS_DIR / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}

PART = {"pack_codes": "packing", "quantize": "quantize", "predict_sinks": "predictor",
        "preserve_first_n": "preserve", "cap_preserved": "preserve", "attention_oracle": "preserve",
        "preserved_set": "preserve", "attention": "attention", "split_attention": "split_attention",
        "cache": "cache", "kvquant_nf_levels": "kvquant", "kvquant_nearest_level": "kvquant",
        "kvquant_key_outliers": "kvquant", "kvquant_value_outliers": "kvquant",
        "kvquant_quantize_block": "kvquant", "kvquant_rope": "kvquant", "kvquant_cache": "kvquant_cache"}


def load(name):
    with np.load(mv.VECTORS_DIR / CASES[name]["file"]) as z:
        return {k: z[k] for k in z.files}


def test_manifest_format():
    assert MANIFEST["format"] == mv.FORMAT and MANIFEST["version"] == mv.VERSION
    size = sum(p.stat().st_size for p in mv.VECTORS_DIR.iterdir())
    assert size < 2 * 1024 * 1024, f"vectors take {size} bytes; keep them under 2 MB"
    assert {c["function"] for c in MANIFEST["cases"]} == set(PART), "every function has vectors"


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_arrays_match_checksums(name):
    arrays = load(name)
    listed = CASES[name]["arrays"]
    assert set(arrays) == set(listed), f"{name}: arrays {sorted(arrays)} != manifest {sorted(listed)}"
    for key, meta in listed.items():
        a = arrays[key]
        assert list(a.shape) == meta["shape"] and mv.dtype_str(a) == meta["dtype"], \
            f"{name}/{key}: {a.shape} {a.dtype} != manifest {meta['shape']} {meta['dtype']}"
        assert mv.sha256(a) == meta["sha256"], f"{name}/{key}: checksum mismatch"


def test_regenerating_reproduces_the_vectors():
    fresh = mv.manifest(mv.all_cases())
    assert len(fresh["cases"]) == len(MANIFEST["cases"])
    for new, old in zip(fresh["cases"], MANIFEST["cases"]):
        assert new == old, (f"case {old['name']}: a fresh generation differs from the stored vectors "
                            "(run `python -m conformance.make_vectors` after an intended change)")
    assert fresh == MANIFEST


#: functions whose results are not bit-reproducible across numpy versions and CPUs (libm / SIMD
#: transcendentals, the polar method's ``log``, float powers): none may generate an input
INEXACT = {"exp", "expm1", "exp2", "log", "log1p", "log2", "log10", "sin", "cos", "tan", "tanh",
           "power", "float_power", "sqrt", "standard_normal", "normal", "lognormal", "gamma",
           "exponential", "rope_inv_freq", "inv_cdf"}


def test_the_generator_uses_exact_arithmetic_only():
    """make_vectors (and its case modules) builds inputs from integer draws, dyadic rationals, IEEE products and stored
    literals only (docs/13-conformance.md 13.5), so a regeneration is bit-exact everywhere."""
    import ast
    import inspect
    from . import vector_cases, vector_cases_kvquant, vector_format
    tree = ast.Module(body=[node for m in (mv, vector_format, vector_cases, vector_cases_kvquant)
                            for node in ast.parse(inspect.getsource(m)).body], type_ignores=[])
    used = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in INEXACT}
                  | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in INEXACT})
    assert not used, f"make_vectors calls {used}: not bit-reproducible across numpy versions and CPUs"
    powers = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow)
              and not (isinstance(n.left, ast.Constant) and n.left.value in (2, 2.0))]
    assert not powers, f"make_vectors raises to a power other than of 2: {powers}"


# --------------------------------------------------------------------------- the port

def _check_quantize(port, case, a):
    p = case["params"]
    x = a["x"]
    x_in = as_bfloat16(x) if p["input_dtype"] == "bfloat16" else x
    exclude = a.get("exclude")
    got = port.quantize(x_in, p["bits"], p["group_size"], p["axis"], symmetric=p["symmetric"],
                        exclude=exclude)
    tol.assert_identical(got.scale, a["scale"], "scale")
    if "zero" in a:
        tol.assert_identical(got.zero, a["zero"], "zero")
    else:
        assert got.zero is None, "symmetric: zero must be None"
    x32 = np.asarray(x, np.float64).astype(np.float32)
    gax = rq.GROUP_AXIS[p["axis"]]
    n = x32.shape[gax]
    excl = np.zeros(x32.shape[:-1], bool) if exclude is None else exclude
    counted = np.broadcast_to(~excl[..., None], x32.shape)
    s = rq.expand_groups(a["scale"], p["group_size"], n, gax)
    z = None if p["symmetric"] else rq.expand_groups(a["zero"], p["group_size"], n, gax)
    t, exact = tol.uniform_ratio(x32, s, z, counted)
    tol.check_codes(got.codes, a["codes"], t, counted, "codes", exact=exact)
    deq = port.dequantize(a["codes"], a["scale"], a.get("zero"), bits=p["bits"],
                          group_size=p["group_size"], axis=p["axis"], symmetric=p["symmetric"])
    tol.check_dequantized(deq, a["dequantized"], a["codes"], s, p["symmetric"], "dequantized")


def _attention_check(got, a, want_name, query, keys, values, qp, kp, key_valid, dtype):
    want = a[want_name].astype(np.float64)
    n_vis = ra.visible_keys(qp, kp, key_valid).sum(-1)
    bound = tol.attention_bound(query, keys, values, n_vis, None, dtype) + 2.0**-24 * np.abs(want)
    tol.check_attention(got, want, bound, n_vis, want_name)


def _check_cache(port, case, a):
    p = case["params"]
    cfg = mv.config_from_dict(p["config"])
    cache = port.make_cache(cfg, p["dtype"])
    replay_cache_ops(cache, p["ops"], a)
    _check_preserved(cache, a)
    assert cache.nbytes() == int(a["nbytes"]), f"nbytes {cache.nbytes()} != {int(a['nbytes'])}"
    blocks = cache.quantized_blocks()
    assert len(blocks) == len(p["blocks"]), f"{len(blocks)} blocks, want {len(p['blocks'])}"
    codes, scales = {"keys": [], "values": []}, {"keys": [], "values": []}
    for i, (g, meta) in enumerate(zip(blocks, p["blocks"])):
        assert (g.start, g.num_slots) == (meta["start"], meta["num_slots"]), \
            f"block {i}: (start, num_slots) = {(g.start, g.num_slots)} != {(meta['start'], meta['num_slots'])}"
        tol.assert_identical(g.coded, a[f"block{i}_coded"], f"block {i} coded")
        k = meta["num_slots"]
        for side, gq in (("keys", g.keys), ("values", g.values)):
            pre = f"block{i}_{side}"
            tol.assert_identical(gq.scale, a[f"{pre}_scale"], f"{pre} scale")
            if f"{pre}_zero" in a:
                tol.assert_identical(gq.zero, a[f"{pre}_zero"], f"{pre} zero")
            prefix = "key" if side == "keys" else "value"
            axis, grp = getattr(cfg, f"{prefix}_axis"), getattr(cfg, f"{prefix}_group_size")
            gax = rq.GROUP_AXIS[axis]
            want_codes = a[f"{pre}_codes"]
            s = rq.expand_groups(a[f"{pre}_scale"], grp, want_codes.shape[gax], gax)
            x = a[f"{pre}_x"]
            coded = np.zeros(want_codes.shape[:1] + want_codes.shape[2:3], bool)
            coded[:, :k] = a[f"block{i}_coded"][:, :k]
            counted = np.broadcast_to(coded[:, None, :, None], x.shape)
            z = rq.expand_groups(a[f"{pre}_zero"], grp, want_codes.shape[gax], gax) \
                if f"{pre}_zero" in a else None
            t, exact = tol.uniform_ratio(x, s, z, counted)
            tol.check_codes(np.asarray(gq.codes)[:, :, :k], want_codes[:, :, :k], t[:, :, :k],
                            counted[:, :, :k], f"{pre} codes", exact=exact[:, :, :k])
            codes[side].append((np.asarray(gq.codes), want_codes))
            scales[side].append(s)
    segs = cache.segments()
    assert len(segs) == 3, f"segments() returned {len(segs)} segments, want 3"
    _check_segments_and_attend(cache, segs, a, p["dtype"], codes, scales)


def _check_preserved(cache, a):
    got_p = cache.preserved_positions()
    rows = sorted(k for k in a if k.startswith("preserved_positions_"))
    assert len(got_p) == len(rows), f"{len(got_p)} rows of preserved positions, want {len(rows)}"
    for i, key in enumerate(rows):
        assert np.array_equal(np.asarray(got_p[i], np.int64), a[key]), \
            f"row {i}: preserved positions {np.asarray(got_p[i]).tolist()} != {a[key].tolist()}"


def _check_segments_and_attend(cache, segs, a, dtype, codes=None, scales=None, quantized_check=None):
    """Segments (positions exact, full precision parts exact, the quantized one by
    ``quantized_check(got_segment, want_segment)`` or the uniform rule 9.4) and one ``attend``."""
    if quantized_check is not None:
        quantized_check(segs[0], (a["seg0_keys"], a["seg0_values"], a["seg0_positions"]))
    for i, (gk, gv, gp) in enumerate(segs):
        tol.assert_identical(gp, a[f"seg{i}_positions"], f"segment {i} positions")
        live = (a[f"seg{i}_positions"] >= 0)[:, None, :, None]
        for side, got in (("keys", gk), ("values", gv)):
            want = a[f"seg{i}_{side}"]
            got = np.where(live, np.asarray(got, np.float32), 0)
            want = np.where(live, want, 0)
            if i == 0 and quantized_check is not None:
                continue
            if i == 0 and codes[side]:
                gc = np.concatenate([c[0] for c in codes[side]], 2)
                wc = np.concatenate([c[1] for c in codes[side]], 2)
                tol.check_dequantized_near(got, want, gc, wc, np.concatenate(scales[side], 2),
                                           f"segment 0 {side}")
            else:
                tol.assert_identical(got, want, f"segment {i} {side}")
    got = np.asarray(cache.attend(a["query"], a["query_positions"]))
    keys = np.concatenate([np.asarray(s[0], np.float64) for s in segs], 2)
    values = np.concatenate([np.asarray(s[1], np.float64) for s in segs], 2)
    kp = np.concatenate([np.asarray(s[2], np.int64) for s in segs], 1)
    # attend against the stored reference output: the attention bound plus the dequantization
    # differences the port's segments were allowed (docs/09-tolerances.md 9.3, "dequantizes on the fly")
    want = a["attend"].astype(np.float64)
    live = (kp >= 0)[:, None, :, None]          # empty slots (-1) never enter attention
    dk = np.where(live, np.abs(keys - np.concatenate([a[f"seg{i}_keys"] for i in range(3)], 2)), 0)
    dv = np.where(live, np.abs(values - np.concatenate([a[f"seg{i}_values"] for i in range(3)], 2)), 0)
    dk, dv = dk.max(initial=0), dv.max(initial=0)
    q = a["query"]
    n_vis = ra.visible_keys(a["query_positions"], kp).sum(-1)
    c = 1 / math.sqrt(q.shape[-1])
    extra = 2.5 * np.abs(values).max(initial=0) * c * np.abs(q).sum(-1, keepdims=True) * dk + dv
    bound = tol.attention_bound(q, keys, values, n_vis, None, dtype) + 2.0**-24 * np.abs(want) + extra
    tol.check_attention(got, want, bound, n_vis, "cache.attend")


# --------------------------------------------------------------------------- kvquant

def _kvquant_block(port, p, a):
    cfg = mv.config_from_dict(p["config"])
    cal = mv.calibration_from_arrays(cfg, a)
    wrap = as_bfloat16 if p["input_dtype"] == "bfloat16" else (lambda x: x)
    keys, values, exclude = wrap(a["keys_pre_rope"]), wrap(a["values"]), a.get("exclude")
    got_k, got_v = port.kvquant_quantize_block(keys, values, cal, cfg, exclude=exclude,
                                               sparse_dtype=p["sparse_dtype"])
    t = keys.shape[2]
    coded = np.ones((keys.shape[0], t), bool) if exclude is None else ~exclude
    for side, got, levels, bits, grp, axis in (
            ("keys", got_k, cal.key_levels_for(), cfg.key_bits, cfg.key_group_size, "channel"),
            ("values", got_v, cal.value_levels_for(), cfg.value_bits, cfg.value_group_size, "token")):
        want = mv.kvquant_tensor_from_arrays(a, side, levels, bits, grp, axis)
        x32 = np.asarray(a["keys_pre_rope" if side == "keys" else "values"], np.float64).astype(np.float32)
        tol.check_kvquant_side(got, want, x32, levels, coded, side)
        deq = port.kvquant_dequantize(want.codes, want.scale, want.centre, want.levels,
                                      want.outlier_index, want.outlier_value, bits=bits,
                                      group_size=grp, axis=axis)
        tol.check_kvquant_dequantized(np.asarray(deq), want, f"{side} dequantized")
        tol.assert_identical(rkv.dequantize_nonuniform(want), a[f"{side}_dequantized"],
                             f"{side} dequantized (the vectors' own consistency)")
        if "packing" in port.parts:
            tol.assert_identical(port.pack_codes(a[f"{side}_codes"], bits), a[f"{side}_words"],
                                 f"{side} packed words")


def _kvquant_cache(port, p, a):
    cfg = mv.config_from_dict(p["config"])
    cal = mv.calibration_from_arrays(cfg, a)
    inv = a.get("rope_inv_freq")
    cache = port.make_cache(cfg, p["dtype"], kvquant_calibration=cal, rope_inv_freq=inv)
    replay_cache_ops(cache, p["ops"], a)
    _check_preserved(cache, a)
    blocks = cache.quantized_blocks()
    assert len(blocks) == len(p["blocks"]), f"{len(blocks)} blocks, want {len(p['blocks'])}"
    want_blocks = []
    for i, (g, meta) in enumerate(zip(blocks, p["blocks"])):
        pre = f"block{i}"
        wk = mv.kvquant_tensor_from_arrays(a, f"{pre}_keys", cal.key_levels_for(), cfg.key_bits,
                                           cfg.key_group_size, "channel")
        wv = mv.kvquant_tensor_from_arrays(a, f"{pre}_values", cal.value_levels_for(), cfg.value_bits,
                                           cfg.value_group_size, "token")
        want_blocks.append((wk, wv))
        kq.check_kvquant_block(g, wk, wv, start=meta["start"], num_slots=meta["num_slots"],
                               coded=a[f"{pre}_coded"], rope_positions=a[f"{pre}_rope_positions"],
                               keys=a[f"{pre}_keys_x"], values=a[f"{pre}_values_x"],
                               keys_pre_rope=a.get(f"{pre}_keys_x_pre_rope", a[f"{pre}_keys_x"]),
                               calibration=cal, inv_freq=inv, what=f"block {i}")
    want_nbytes = kq.expected_nbytes(int(a["nbytes"]), blocks, [w[0].num_outliers for w in want_blocks])
    assert cache.nbytes() == want_nbytes, f"nbytes {cache.nbytes()} != {want_nbytes} (definition 6.22)"
    segs = cache.segments()
    assert len(segs) == 3, f"segments() returned {len(segs)} segments, want 3"
    _check_segments_and_attend(
        cache, segs, a, p["dtype"],
        quantized_check=lambda g, w: kq.check_kvquant_quantized_segment(g, w, blocks, want_blocks, cal,
                                                                        cfg, inv))


def _check_kvquant(port, case, a):
    fn, p = case["function"], case["params"]
    if fn == "kvquant_nf_levels":
        for bits in p["bits"]:
            got = np.asarray(port.kvquant_nf_levels(bits))
            assert got.dtype == np.float32, f"nf_levels({bits}) must be float32"
            tol.assert_identical(got, a[f"levels_b{bits}"], f"nf_levels({bits})")
    elif fn == "kvquant_nearest_level":
        got = np.asarray(port.kvquant_nearest_level(a["t"], a["levels"]))
        assert got.dtype == np.uint8, "nearest_level must return uint8"
        tol.assert_identical(got, a["codes"], "nearest_level (ties to the lower level)")
    elif fn == "kvquant_key_outliers":
        ex, ex_new = a.get("exclude"), a.get("exclude_new")
        lo, hi = port.kvquant_key_outlier_thresholds(a["keys"], p["fraction"], ex)
        tol.assert_identical(lo, a["lower"], "key_outlier_thresholds lower")
        tol.assert_identical(hi, a["upper"], "key_outlier_thresholds upper")
        tol.assert_identical(port.kvquant_key_outliers(a["keys"], a["lower"], a["upper"], ex), a["mask"],
                             "key_outliers (calibration keys)")
        tol.assert_identical(port.kvquant_key_outliers(a["keys_new"], a["lower"], a["upper"], ex_new),
                             a["mask_new"], "key_outliers (new keys)")
    elif fn == "kvquant_value_outliers":
        tol.assert_identical(port.kvquant_value_outliers(a["values"], p["fraction"], a["exclude"]),
                             a["mask"], "value_outliers")
    elif fn == "kvquant_quantize_block":
        _kvquant_block(port, p, a)
    elif fn == "kvquant_rope":
        x, pos, inv = a["x"], a["positions"], a["inv_freq"]
        tol.check_rope(port.kvquant_apply_rope(x, pos, inv), a["applied"], x, "apply_rope")
        tol.check_rope(port.kvquant_unapply_rope(x, pos, inv), a["unapplied"], x, "unapply_rope")
        back = np.asarray(port.kvquant_unapply_rope(port.kvquant_apply_rope(x, pos, inv), pos, inv))
        tol.check_within(back, x, rkv.rope_roundtrip_bound(x), True, "unapply(apply(x))", "(8.1)")
    elif fn == "kvquant_cache":
        _kvquant_cache(port, p, a)
    else:
        raise AssertionError(f"no check for function {fn!r}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_port_matches_vector(port, name):
    case = CASES[name]
    fn, p = case["function"], case["params"]
    part = PART[fn]
    if part not in port.parts:
        pytest.skip(f"{port.name} does not implement part {part!r}")
    a = load(name)
    if fn == "pack_codes":
        tol.assert_identical(port.pack_codes(a["codes"], p["bits"]), a["words"], "words")
        tol.assert_identical(port.unpack_codes(a["words"], p["bits"], p["n"]), a["codes"], "codes")
    elif fn == "quantize":
        _check_quantize(port, case, a)
    elif fn == "predict_sinks":
        tol.assert_identical(port.outlier_scores(a["hidden"], p["channels"]), a["scores"], "scores")
        tol.assert_identical(port.predict_sinks(a["hidden"], p["channels"], p["threshold"]),
                             a["sinks"], "sinks")
    elif fn == "preserve_first_n":
        tol.assert_identical(port.preserve_first_n(a["valid"], p["n"]), a["mask"], "mask")
    elif fn == "cap_preserved":
        tol.assert_identical(port.cap_preserved(a["flags"], p["max_count"]), a["mask"], "mask")
    elif fn == "attention_oracle":
        tol.assert_identical(port.attention_oracle(a["probs"], p["ratio"], a["valid"]), a["mask"], "mask")
    elif fn == "preserved_set":
        cfg = mv.config_from_dict(p["config"])
        tol.assert_identical(port.preserved_set(cfg, a["valid"], a["predicted"], a["oracle"]),
                             a["mask"], "mask")
    elif fn == "attention":
        kv_ = a.get("key_valid")
        got = port.attention(a["query"], a["keys"], a["values"], query_positions=a["query_positions"],
                             key_positions=a["key_positions"], key_valid=kv_)
        _attention_check(got, a, "output", a["query"], a["keys"], a["values"], a["query_positions"],
                         a["key_positions"], kv_, p["input_dtype"])
    elif fn == "split_attention":
        segs = [(a[f"seg{j}_keys"], a[f"seg{j}_values"], a[f"seg{j}_positions"])
                for j in range(p["num_segments"])]
        got = port.split_attention(a["query"], segs, query_positions=a["query_positions"])
        keys = np.concatenate([s[0] for s in segs], 2)
        values = np.concatenate([s[1] for s in segs], 2)
        kp = np.concatenate([s[2] for s in segs], 1)
        _attention_check(got, a, "output", a["query"], keys, values, a["query_positions"], kp, None,
                         p["input_dtype"])
    elif fn == "cache":
        _check_cache(port, case, a)
    elif fn.startswith("kvquant"):
        _check_kvquant(port, case, a)
    else:
        raise AssertionError(f"no check for function {fn!r}")
