"""Golden-vector cases of docs/08 (KVQuant): nf grids, nearest levels, outliers, blocks, RoPE and
KVQuant cache traces (conformance/make_vectors.py writes them)."""

from __future__ import annotations

from typing import List

import numpy as np

from reference import kvquant as rkv
from reference.config import KVSinkConfig

from .vector_cases import cache_case
from .vector_format import (ROPE_RATIO, Case, calibration_arrays, cast_input, config_dict,
                            geometric_inv_freq, kv, kvquant_calibration, kvquant_tensor_arrays)


def _nearest_level_case(name, rs, levels, t_lead):
    beta = rkv.level_boundaries(levels)
    flat = beta.reshape(-1, beta.shape[-1])
    t = np.concatenate([flat, np.nextafter(flat, np.float32(2)), np.nextafter(flat, np.float32(-2)),
                        rs.uniform(-1.2, 1.2, size=(flat.shape[0], 9)).astype(np.float32),
                        np.broadcast_to(np.float32([-1.5, 1.5, -1, 1, 0]), (flat.shape[0], 5))],
                       axis=-1).astype(np.float32).reshape(t_lead + (-1,))
    c = Case(name, "kvquant_nearest_level", {"bits": int(levels.shape[-1]).bit_length() - 1})
    c.inp("t", t)
    c.inp("levels", levels)
    c.out("boundaries", beta)
    c.out("codes", rkv.nearest_level(t, levels))
    return c


#: quantize_block_kvquant cases: name, datatype, key/value bits, key/value groups, p, exclude,
#: input dtype, sparse dtype, (B, H, T, D)
KVQUANT_BLOCK_SPECS = [
    ("kvquant_block_nf", "nf", 4, 3, 8, 16, 0.01, "preserved", "float32", "float32", (2, 2, 8, 16)),
    ("kvquant_block_kmeans", "kmeans", 2, 2, 4, 8, 0.05, "random", "float32", "float32", (2, 2, 12, 16)),
    ("kvquant_block_nf_fp16", "nf", 1, 8, 5, 7, 0.0, None, "float16", "float32", (1, 3, 13, 16)),
    ("kvquant_block_kmeans_bf16", "kmeans", 3, 4, 8, 64, 0.2, "first", "bfloat16", "float16", (2, 1, 8, 64)),
    ("kvquant_block_nf_ties", "nf", 2, 2, 4, 4, 0.0, None, "float32", "float32", (1, 2, 8, 8)),
]

KVQUANT_CACHE_SPECS = [
    # name, config, storage dtype, script, kvquant options
    ("cache_kvquant_nf_rope",
     KVSinkConfig(quantizer="kvquant", key_bits=4, value_bits=3, key_group_size=4, value_group_size=8,
                  residual_length=3, outlier_fraction=0.05, max_preserved=2), "float16", "crop_reorder",
     dict(inv_freq=geometric_inv_freq(8, ROPE_RATIO[8, 10000.0]), rope="shifted", calibration_seed=900)),
    ("cache_kvquant_kmeans",
     KVSinkConfig(quantizer="kvquant", key_bits=2, value_bits=2, key_group_size=3, value_group_size=4,
                  residual_length=0, outlier_fraction=0.01, kvquant_datatype="kmeans"), "float32",
     "padding_select", dict(inv_freq=None, rope="default", calibration_seed=901)),
    ("cache_kvquant_nf_decode",
     KVSinkConfig(quantizer="kvquant", key_bits=2, value_bits=4, key_group_size=2, value_group_size=3,
                  residual_length=2, outlier_fraction=0.0), "float32", "prefill_decode",
     dict(inv_freq=geometric_inv_freq(8, ROPE_RATIO[8, 500000.0]), rope="default", calibration_seed=902)),
]


def kvquant_cases() -> List[Case]:
    """docs/08-kvquant.md: nf grids, nearest levels, outliers, blocks, RoPE, kvquant cache traces."""
    cases = []
    c = Case("kvquant_nf_levels", "kvquant_nf_levels", {"bits": list(range(1, 9))})
    for bits in range(1, 9):
        c.out(f"levels_b{bits}", rkv.nf_levels(bits))
    cases.append(c)
    # 8.3: on the boundaries, one ulp either side, beyond the ends, 0 (a boundary of the nf grid)
    rs = np.random.RandomState(600)
    cases.append(_nearest_level_case("kvquant_nearest_level_nf", rs, rkv.nf_levels(3), ()))
    rows = np.sort(rs.uniform(-1, 1, size=(3, 1, 4)), axis=-1).astype(np.float32)
    rows[0, 0, 1] = rows[0, 0, 0]                      # a repeated level (k-means: an empty cluster)
    rows[1, 0, 0], rows[1, 0, -1] = -1.0, 1.0
    cases.append(_nearest_level_case("kvquant_nearest_level_rows", rs, rows, (3,)))
    # 8.5: key thresholds from calibration keys; outlier masks on them and on new keys
    for i, (p, excl, ties) in enumerate([(0.05, "first", False), (0.2, "random", True), (0.0, None, False)]):
        rs = np.random.RandomState(610 + i)
        keys = kv(rs, (2, 2, 25, 8))
        new = kv(rs, (2, 2, 6, 8))
        if ties:                                       # repeated values: order statistics with ties
            # (+ 0.0: no -0.0, whose place among the zeros a sort leaves to its algorithm)
            keys, new = np.round(keys * 2) / 2 + 0.0, np.round(new * 2) / 2 + 0.0
        exclude = {None: None, "first": np.isin(np.arange(25), [0])[None, :].repeat(2, 0),
                   "random": rs.rand(2, 25) < 0.3}[excl]
        exclude_new = None if exclude is None else rs.rand(2, 6) < 0.3
        c = Case(f"kvquant_key_outliers_{i}", "kvquant_key_outliers",
                 {"fraction": p, "has_exclude": exclude is not None})
        c.inp("keys", keys)
        c.inp("keys_new", new)
        if exclude is not None:
            c.inp("exclude", exclude)
            c.inp("exclude_new", exclude_new)
        lower, upper = rkv.key_outlier_thresholds(keys, p, exclude)
        c.out("lower", lower)
        c.out("upper", upper)
        c.out("mask", rkv.key_outliers(keys, lower, upper, exclude))
        c.out("mask_new", rkv.key_outliers(new, lower, upper, exclude_new))
        cases.append(c)
    # 8.6: per-token value outliers, ties in |x| to the lower flat index h*D + d
    for i, (p, ties) in enumerate([(0.05, False), (0.1, True)]):
        rs = np.random.RandomState(620 + i)
        values = kv(rs, (2, 2, 7, 16))
        if ties:
            values = (rs.randint(1, 4, size=values.shape) * rs.choice([-1.0, 1.0], size=values.shape))
            values = values.astype(np.float32)
        exclude = rs.rand(2, 7) < 0.3
        c = Case(f"kvquant_value_outliers_{i}", "kvquant_value_outliers", {"fraction": p})
        c.inp("values", values)
        c.inp("exclude", exclude)
        c.out("mask", rkv.value_outliers(values, p, exclude))
        cases.append(c)
    # 8.10: quantize_block_kvquant (and 8.7 dequantization of its result)
    for i, (name, dt, kb, vb, kg, vg, p, excl, in_dtype, sparse, shape) in enumerate(KVQUANT_BLOCK_SPECS):
        rs = np.random.RandomState(630 + i)
        b, h, t, d = shape
        cfg = KVSinkConfig(quantizer="kvquant", key_bits=kb, value_bits=vb, key_group_size=kg,
                           value_group_size=vg, outlier_fraction=p, kvquant_datatype=dt)
        cal = kvquant_calibration(rs, cfg, h, d)
        if name.endswith("_ties"):    # group ranges [0, 2]: x = 1 is t = 0 exactly, the middle boundary
            keys = rs.randint(0, 5, size=shape).astype(np.float32) / 2
            keys[:, :, ::kg] = 0.0
            keys[:, :, 1::kg] = 2.0
            values = keys.copy()
        else:
            keys, values = kv(rs, shape), kv(rs, shape)
        exclude = {None: None, "preserved": np.isin(np.arange(t), [0, 5])[None, :].repeat(b, 0),
                   "random": rs.rand(b, t) < 0.3,
                   "first": np.isin(np.arange(t), [0])[None, :].repeat(b, 0)}[excl]
        keys, values = cast_input(keys, in_dtype), cast_input(values, in_dtype)
        c = Case(name, "kvquant_quantize_block",
                 {"config": config_dict(cfg), "input_dtype": in_dtype, "sparse_dtype": sparse,
                  "has_exclude": exclude is not None})
        c.inp("keys_pre_rope", keys)
        c.inp("values", values)
        if exclude is not None:
            c.inp("exclude", exclude)
        calibration_arrays(c, cal)
        blk = rkv.quantize_block_kvquant(keys, values, cal, cfg, exclude=exclude,
                                         sparse_dtype=np.dtype(sparse))
        for side, qt in (("keys", blk.keys), ("values", blk.values)):
            kvquant_tensor_arrays(c, side, qt)
            c.out(f"{side}_dequantized", rkv.dequantize_nonuniform(qt))
        c.out("nbytes", np.array(blk.nbytes, np.int64))
        cases.append(c)
    # 8.1: apply / unapply RoPE (numpy or transformers-style float32 inv_freq)
    for i, (d, base, lead, style) in enumerate([(8, 10000.0, (6,), "geometric"),
                                                (64, 500000.0, (2, 3, 5), "geometric")]):
        rs = np.random.RandomState(640 + i)
        x = kv(rs, lead + (d,))
        inv = geometric_inv_freq(d, ROPE_RATIO[d, base])
        if len(lead) == 3:
            pos = rs.randint(0, 4096, size=(lead[0], 1, lead[2])).astype(np.int64)
        else:
            pos = np.array([0, 1, 7, 4095, 123457, rkv.MAX_POSITION - 1], np.int64)[:lead[0]]
        c = Case(f"kvquant_rope_{i}", "kvquant_rope", {"inv_freq_style": style, "base": base})
        c.inp("x", x)
        c.inp("positions", pos)
        c.inp("inv_freq", inv)
        c.out("applied", rkv.apply_rope(x, pos, inv))
        c.out("unapplied", rkv.unapply_rope(x, pos, inv))
        cases.append(c)
    for name, cfg, dtype, script, opts in KVQUANT_CACHE_SPECS:
        c = cache_case(name, cfg, dtype, script, kvquant=opts)
        c.function = "kvquant_cache"
        cases.append(c)
    return cases

