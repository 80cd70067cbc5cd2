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
from reference import quantize as rq

from . import make_vectors as mv
from . import tolerances as tol
from .adapter import as_bfloat16

MANIFEST = json.loads((mv.VECTORS_DIR / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}

PART = {"pack_codes": "packing", "quantize": "quantize", "predict_sinks": "predictor",
        "preserve_first_n": "preserve", "cap_preserved": "preserve", "attention_oracle": "preserve",
        "preserved_set": "preserve", "attention": "attention", "split_attention": "split_attention",
        "cache": "cache"}


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
    if p["symmetric"]:
        t = rq.symmetric_ratio(np.where(counted, x32, np.float32(0)), s)
    else:
        z = rq.expand_groups(a["zero"], p["group_size"], n, gax)
        t = rq.asymmetric_ratio(np.where(counted, x32, z), s, z)
    tol.check_codes(got.codes, a["codes"], t, counted, "codes")
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
    for op in p["ops"]:
        kind = op["op"]
        if kind == "update":
            cache.update(a[op["keys"]], a[op["values"]], None if op["valid"] is None else a[op["valid"]])
        elif kind == "resolve":
            cache.resolve(a[op["preserve"]])
        elif kind == "flush":
            cache.flush()
        elif kind == "crop":
            cache.crop(op["max_length"])
        elif kind == "reorder":
            cache.reorder(a[op["beam_idx"]])
        elif kind == "select_batch":
            cache.select_batch(a[op["indices"]])
        else:
            raise AssertionError(f"unknown op {kind!r} in the vectors")
    got_p = cache.preserved_positions()
    rows = sorted(k for k in a if k.startswith("preserved_positions_"))
    assert len(got_p) == len(rows), f"{len(got_p)} rows of preserved positions, want {len(rows)}"
    for i, key in enumerate(rows):
        assert np.array_equal(np.asarray(got_p[i], np.int64), a[key]), \
            f"row {i}: preserved positions {np.asarray(got_p[i]).tolist()} != {a[key].tolist()}"
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
            if f"{pre}_zero" in a:
                z = rq.expand_groups(a[f"{pre}_zero"], grp, want_codes.shape[gax], gax)
                t = rq.asymmetric_ratio(np.where(counted, x, z), s, z)
            else:
                t = rq.symmetric_ratio(np.where(counted, x, np.float32(0)), s)
            tol.check_codes(np.asarray(gq.codes)[:, :, :k], want_codes[:, :, :k], t[:, :, :k],
                            counted[:, :, :k], f"{pre} codes")
            codes[side].append((np.asarray(gq.codes), want_codes))
            scales[side].append(s)
    segs = cache.segments()
    assert len(segs) == 3, f"segments() returned {len(segs)} segments, want 3"
    for i, (gk, gv, gp) in enumerate(segs):
        tol.assert_identical(gp, a[f"seg{i}_positions"], f"segment {i} positions")
        live = (a[f"seg{i}_positions"] >= 0)[:, None, :, None]
        for side, got in (("keys", gk), ("values", gv)):
            want = a[f"seg{i}_{side}"]
            got = np.where(live, np.asarray(got, np.float32), 0)
            want = np.where(live, want, 0)
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
    dk = np.abs(keys - np.concatenate([a[f"seg{i}_keys"] for i in range(3)], 2)).max(initial=0)
    dv = np.abs(values - np.concatenate([a[f"seg{i}_values"] for i in range(3)], 2)).max(initial=0)
    q = a["query"]
    n_vis = ra.visible_keys(a["query_positions"], kp).sum(-1)
    c = 1 / math.sqrt(q.shape[-1])
    extra = 2.5 * np.abs(values).max(initial=0) * c * np.abs(q).sum(-1, keepdims=True) * dk + dv
    bound = tol.attention_bound(q, keys, values, n_vis, None, p["dtype"]) + 2.0**-24 * np.abs(want) + extra
    tol.check_attention(got, want, bound, n_vis, "cache.attend")


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
    else:
        raise AssertionError(f"no check for function {fn!r}")
