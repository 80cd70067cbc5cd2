"""Golden-vector cases of docs/02-06: packing, quantize, predictor, preservation, attention and
cache traces (conformance/make_vectors.py writes them)."""

from __future__ import annotations

from typing import List

import numpy as np

from reference import attention as ra
from reference import kvquant as rkv
from reference import packing as rpk
from reference import predictor as rp
from reference import preserve as rpres
from reference import quantize as rq
from reference.config import KVSinkConfig

from .adapter import round_to_bfloat16
from .vector_format import (Case, calibration_arrays, config_dict, kv, kvquant_calibration,
                            kvquant_tensor_arrays, normalish)


# --------------------------------------------------------------------------- cases

def packing_cases() -> List[Case]:
    cases = []
    for bits in range(1, 9):
        rs = np.random.RandomState(100 + bits)
        c = Case(f"packing_b{bits}", "pack_codes", {"bits": bits, "n": 37})
        codes = c.inp("codes", rs.randint(0, 2**bits, size=(3, 37)).astype(np.uint8))
        c.out("words", rpk.pack_codes(codes, bits))
        cases.append(c)
    return cases


QUANTIZE_SPECS = [
    # bits, G, axis, symmetric, exclude, input dtype
    (2, 32, "token", False, None, "float32"),
    (2, 32, "channel", False, "preserved", "float32"),
    (4, 7, "token", False, "random", "float16"),
    (4, 5, "channel", False, "random", "bfloat16"),
    (1, 3, "token", False, None, "float32"),
    (8, 16, "channel", False, "all", "float32"),
    (3, 64, "token", True, None, "float64"),
    (5, 3, "channel", True, "random", "float32"),
    (6, 20, "token", False, "first", "float16"),
    (7, 1, "channel", False, None, "float32"),
    (2, 12, "token", False, "ties", "float32"),
    (4, 4, "token", True, "ties", "float32"),
]


def quantize_cases() -> List[Case]:
    cases = []
    for i, (bits, g, axis, sym, excl, dtype) in enumerate(QUANTIZE_SPECS):
        rs = np.random.RandomState(200 + i)
        shape = (2, 12, 20)
        if excl == "ties":       # exact half-integer grid with power-of-two scales
            top = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
            k = rs.randint(-2 * top if sym else 0, 2 * top + 1, size=shape)
            k[..., ::g] = -2 * top if sym else 0
            k[..., 1::g] = 2 * top
            x32 = (0.25 * k / 2.0).astype(np.float32)
            excl = None
        else:
            x32 = kv(rs, shape)
        if dtype == "float16":
            x = x32.astype(np.float16)
        elif dtype == "bfloat16":
            x = round_to_bfloat16(x32)
        elif dtype == "float64":
            x = x32.astype(np.float64) * (1 + 2.0**-30)
        else:
            x = x32
        exclude = {None: None, "preserved": np.isin(np.arange(12), [0, 5])[None, :].repeat(2, 0),
                   "random": rs.rand(2, 12) < 0.3, "all": np.ones((2, 12), bool),
                   "first": np.isin(np.arange(12), [0])[None, :].repeat(2, 0)}[excl]
        c = Case(f"quantize_{i:02d}", "quantize",
                 {"bits": bits, "group_size": g, "axis": axis, "symmetric": sym,
                  "input_dtype": dtype, "has_exclude": exclude is not None})
        c.inp("x", x)
        if exclude is not None:
            c.inp("exclude", exclude)
        qt = rq.quantize(x, bits, g, axis, symmetric=sym, exclude=exclude)
        c.out("codes", qt.codes)
        c.out("scale", qt.scale)
        if qt.zero is not None:
            c.out("zero", qt.zero)
        c.out("words", qt.packed())
        c.out("dequantized", rq.dequantize(qt))
        cases.append(c)
    return cases


def predictor_cases() -> List[Case]:
    cases = []
    for i, (channels, dtype) in enumerate([((3, 7), "float32"), ((0,), "float16"), ((1, 2, 30), "float32")]):
        rs = np.random.RandomState(300 + i)
        h = normalish(rs, (2, 16, 32)).astype(np.float32)
        h[:, [0, 9], channels[0]] = 800.0 * (i + 1)
        h[:, 4, channels[-1]] = -450.0
        h = h.astype(dtype)
        scores = rp.outlier_scores(h, channels)
        threshold = float(scores.ravel()[5])          # a threshold equal to a score (strict >)
        c = Case(f"predictor_{i}", "predict_sinks", {"channels": list(channels), "threshold": threshold,
                                                    "input_dtype": dtype})
        c.inp("hidden", h)
        c.out("scores", scores)
        c.out("sinks", rp.predict_sinks(h, channels, threshold))
        cases.append(c)
    return cases


def dyadic_probs(rs: np.random.RandomState, lead, sinks=()) -> np.ndarray:
    """Causal attention probabilities ``(*lead, T)`` (``lead[-1] = T`` queries over ``T`` keys), every
    row a set of dyadic rationals summing to 1 exactly: integer weights 1..8 (x8 on ``sinks``) on the
    visible keys, the last visible key topped up so the row's total is a power of two, divided by it.
    Exact arithmetic (no ``exp``): the same bits on every numpy and CPU."""
    t = lead[-1]
    w = rs.randint(1, 9, size=tuple(lead) + (t,)).astype(np.int64)
    w[..., list(sinks)] *= 8
    w = np.where(np.tril(np.ones((t, t), bool)), w, 0)
    total = w.sum(-1)
    top = np.array([1 << int(n - 1).bit_length() for n in total.ravel()],
                   np.int64).reshape(total.shape)                 # the smallest 2^k >= total
    diag = np.arange(t)
    w[..., diag, diag] += top - total
    return w / top[..., None].astype(np.float64)


def _oracle_on_the_ratio(rs: np.random.RandomState) -> Case:
    """An attention-oracle case whose ratio equals a token's score exactly (definition 3.2 is
    ``score >= ratio``: a port using ``>`` fails it), with padding queries (row 1 is left-padded,
    so its first 8 queries are padding and ignored).  Hq * |Q| is a power of two (2 * 16, 2 * 8)
    and the probabilities dyadic, so every score is exact in any summation order."""
    valid = np.arange(16)[None, :] >= np.array([[0], [8]])
    probs = dyadic_probs(rs, (2, 2, 16), sinks=(0, 9))
    scores = rpres.oracle_scores(probs, valid)
    ratio = float(np.sort(scores[0][valid[0]])[-2])          # on the second-highest score, exactly
    c = Case("attention_oracle_on_ratio", "attention_oracle", {"ratio": ratio})
    c.inp("probs", probs)
    c.inp("valid", valid)
    mask = rpres.attention_oracle(probs, ratio, valid)
    assert np.any(scores == ratio) and np.array_equal(mask, scores >= ratio)
    c.out("mask", mask)
    c.out("scores", scores)
    return c


def preserve_cases() -> List[Case]:
    rs = np.random.RandomState(400)
    valid = np.arange(14)[None, :] >= np.array([[0], [3], [6]])
    cases = []
    c = Case("preserve_first_n", "preserve_first_n", {"n": 2})
    c.inp("valid", valid)
    c.out("mask", rpres.preserve_first_n(valid, 2))
    cases.append(c)
    flags = rs.rand(3, 14) < 0.4
    c = Case("cap_preserved", "cap_preserved", {"max_count": 2})
    c.inp("flags", flags)
    c.out("mask", rpres.cap_preserved(flags, 2))
    cases.append(c)
    probs = dyadic_probs(rs, (3, 4, 14), sinks=(0, 5))
    c = Case("attention_oracle", "attention_oracle", {"ratio": 2.0})
    c.inp("probs", probs)
    c.inp("valid", valid)
    c.out("mask", rpres.attention_oracle(probs, 2.0, valid))
    c.out("scores", rpres.oracle_scores(probs, valid))
    cases.append(c)
    cases.append(_oracle_on_the_ratio(rs))
    cfg = KVSinkConfig(preserve="pfn+kvsink+oracle", preserve_first_n=1, max_preserved=3)
    predicted, oracle = rs.rand(3, 14) < 0.3, rs.rand(3, 14) < 0.2
    c = Case("preserved_set", "preserved_set", {"config": config_dict(cfg)})
    c.inp("valid", valid)
    c.inp("predicted", predicted)
    c.inp("oracle", oracle)
    c.out("mask", rpres.preserved_set(cfg, valid, predicted, oracle))
    cases.append(c)
    return cases


def attention_cases() -> List[Case]:
    cases = []
    specs = [(1, 2, 4, 16, 24, 3, "float32", False), (2, 1, 1, 64, 40, 1, "float32", True),
             (2, 2, 6, 8, 17, 2, "float16", False), (1, 3, 6, 32, 33, 4, "float32", True),
             (2, 2, 4, 16, 20, 3, "float32", True)]
    for i, (b, h, hq, d, s, tq, dtype, holes) in enumerate(specs):
        rs = np.random.RandomState(500 + i)
        q = np.clip(kv(rs, (b, hq, tq, d), outliers=False), -100, 100)
        k = np.clip(kv(rs, (b, h, s, d)), -100, 100) / 8
        if i == 4:
            # scores of order 10^3 (q.k / sqrt(D) up to ~2000): exp overflows float32 beyond 88.7
            # and float64 beyond 709, so a softmax without max-subtraction returns NaN or Inf
            q, k = q * 32, np.clip(kv(rs, (b, h, s, d), outliers=False), -100, 100) * 32
        v = kv(rs, (b, h, s, d))
        q, k, v = (a.astype(dtype) for a in (q, k, v))
        kp = np.tile(np.arange(s), (b, 1))
        if holes:
            kp = np.where(rs.rand(b, s) < 0.2, -1, kp)
        qp = np.tile(np.arange(s - tq - 2, s - 2), (b, 1))
        key_valid = rs.rand(b, s) < 0.9 if i == 2 else None
        c = Case(f"attention_{i}", "attention", {"scale": None, "input_dtype": dtype,
                                                 "has_key_valid": key_valid is not None})
        for name, a in (("query", q), ("keys", k), ("values", v), ("query_positions", qp),
                        ("key_positions", kp)):
            c.inp(name, a)
        if key_valid is not None:
            c.inp("key_valid", key_valid)
        c.out("output", ra.attention(q, k, v, query_positions=qp, key_positions=kp,
                                     key_valid=key_valid).astype(np.float32))
        cases.append(c)
        cuts = [0, s // 3, s // 3, s]       # an empty middle segment
        c = Case(f"split_attention_{i}", "split_attention", {"scale": None, "input_dtype": dtype,
                                                             "num_segments": 3})
        c.inp("query", q)
        c.inp("query_positions", qp)
        kpv = kp if key_valid is None else np.where(key_valid, kp, -1)
        segs = []
        for j, (a, z) in enumerate(zip(cuts[:-1], cuts[1:])):
            segs.append((c.inp(f"seg{j}_keys", k[:, :, a:z]), c.inp(f"seg{j}_values", v[:, :, a:z]),
                         c.inp(f"seg{j}_positions", kpv[:, a:z])))
        c.out("output", ra.split_attention(q, segs, query_positions=qp).astype(np.float32))
        cases.append(c)
    return cases


CACHE_SPECS = [
    # name, config, storage dtype, script
    ("cache_kivi", KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=8,
                                residual_length=3), "float32", "prefill_decode"),
    ("cache_symmetric_token", KVSinkConfig(key_bits=4, value_bits=3, key_group_size=5, value_group_size=3,
                                           key_axis="token", value_axis="token", scheme="symmetric",
                                           residual_length=2, max_preserved=2), "float16", "crop_reorder"),
    ("cache_channel_values", KVSinkConfig(key_bits=3, value_bits=1, key_group_size=3, value_group_size=3,
                                          key_axis="channel", value_axis="channel", residual_length=0,
                                          max_preserved=1), "float32", "padding_select"),
    # bfloat16 storage: the port keeps what a bfloat16 store holds (inputs are bfloat16 values)
    ("cache_bfloat16", KVSinkConfig(key_bits=3, value_bits=2, key_group_size=4, value_group_size=4,
                                    residual_length=2), "bfloat16", "prefill_decode"),
    # exact ties in the cache: per-token groups of the whole head on a grid of 1/8 with the group
    # range [0, L/4] planted, so s = 1/4 and t = (x - 0) / s = k/2 exactly: half the codes sit on a
    # tie that every permitted arithmetic computes exactly (rounding half away from zero fails)
    ("cache_ties", KVSinkConfig(key_bits=2, value_bits=3, key_group_size=8, value_group_size=8,
                                key_axis="token", value_axis="token", residual_length=1),
     "float32", "crop_reorder"),
]


def tie_grid(bits: int):
    """A generator like :func:`kv` of values ``k / 8``, ``k`` in ``0 .. 2L`` (``L = 2^bits - 1``),
    with element 0 of every token 0 and element 1 ``2L / 8`` (each token's group range ``[0, L/4]``)."""
    top = 2 * ((1 << bits) - 1)

    def gen(rs, shape):
        x = rs.randint(0, top + 1, size=shape).astype(np.float64)
        x[..., 0], x[..., 1] = 0, top
        return (x / 8).astype(np.float32)
    return gen


def cache_case(name, cfg, dtype, script, kvquant=None) -> Case:
    """A cache trace; ``kvquant`` (quantizer="kvquant"): ``dict(inv_freq=None | (D/2,),
    rope=<"default" | "shifted">, calibration_seed=int)``."""
    rs = np.random.RandomState(sum(map(ord, name)))
    b, h, d = 2, 2, 8
    if name.endswith("_ties"):
        gen_k, gen_v = tie_grid(cfg.key_bits), tie_grid(cfg.value_bits)
    else:
        gen_k = gen_v = kv
    if dtype == "bfloat16":              # inputs are bfloat16 values (stored as float32)
        gen_k, gen_v = (lambda g: lambda rs_, sh: round_to_bfloat16(g(rs_, sh)))(gen_k), \
            (lambda g: lambda rs_, sh: round_to_bfloat16(g(rs_, sh)))(gen_v)
    c = Case(name, "cache", {"config": config_dict(cfg), "dtype": dtype, "ops": []})
    if kvquant is None:
        from .impls import ReferenceCache       # reports a bfloat16 store's bytes (definition 6.17)
        target = ReferenceCache(cfg, dtype)
        layer = target.layer
    else:
        from .kvquant_checks import ReferenceKVQuantCache
        inv = kvquant["inv_freq"]
        cal = kvquant_calibration(np.random.RandomState(kvquant["calibration_seed"]), cfg, h, d)
        c.params["has_rope"] = inv is not None
        if inv is not None:
            c.inp("rope_inv_freq", inv)
        calibration_arrays(c, cal)
        target = ReferenceKVQuantCache(cfg, dtype, kvquant_calibration=cal, rope_inv_freq=inv)
        layer = target.layer
        rope_rs = np.random.RandomState(kvquant["calibration_seed"] + 1)
    store = (lambda a: a.astype(np.float16).astype(np.float32)) if dtype == "float16" else (lambda a: a)
    # (bfloat16: the inputs are bfloat16 values already, so storing them is exact)
    shadow = {"keys": np.zeros((b, h, 0, d), np.float32), "values": np.zeros((b, h, 0, d), np.float32)}
    state = {"b": b, "n_ops": 0}

    def op(kind, **kw):
        c.params["ops"].append(dict(op=kind, **kw))
        state["n_ops"] += 1

    def update(n, pad=False):
        i = state["n_ops"]
        k, v = gen_k(rs, (state["b"], h, n, d)), gen_v(rs, (state["b"], h, n, d))
        valid = None
        if pad:
            valid = np.arange(n)[None, :] >= np.arange(state["b"])[:, None] * 2
            c.inp(f"op{i}_valid", valid)
        if kvquant is None:
            c.inp(f"op{i}_keys", k)
            c.inp(f"op{i}_values", v)
            target.update(k, v, valid)
            rope_name = None
        else:
            # rotary positions: the slots (None), or left-padding style (each row's count of
            # real tokens, -1 at padding) given explicitly; model keys rotated with them
            slots = np.broadcast_to(layer.seq_length + np.arange(n), (state["b"], n))
            vmask = np.ones((state["b"], n), bool) if valid is None else valid
            rope = None
            if kvquant["rope"] == "shifted":
                off = rope_rs.randint(0, 3, size=(state["b"], 1))
                rope = np.where(vmask, np.maximum(slots - off, 0), -1).astype(np.int64)
            eff = slots if rope is None else np.where(vmask, rope, 0)
            if inv is not None:
                k = rkv.apply_rope(k, eff[:, None, :], inv)
            c.inp(f"op{i}_keys", k)
            c.inp(f"op{i}_values", v)
            rope_name = None
            if rope is not None:
                rope_name = f"op{i}_rope_positions"
                c.inp(rope_name, rope)
            target.update(k, v, valid, rope)
        shadow["keys"] = np.concatenate([shadow["keys"], store(k)], 2)
        shadow["values"] = np.concatenate([shadow["values"], store(v)], 2)
        extra = {} if kvquant is None else {"rope_positions": rope_name}
        op("update", keys=f"op{i}_keys", values=f"op{i}_values",
           valid=None if valid is None else f"op{i}_valid", **extra)
        pending_valid = layer.residual[2][:, layer.num_residual - layer.num_pending:]
        j = state["n_ops"]
        flags = (rs.rand(*pending_valid.shape) < 0.25) & pending_valid
        flags[:, 0] |= pending_valid[:, 0] & (j < 2)        # the first token is a sink
        c.inp(f"op{j}_preserve", flags)
        target.resolve(flags)
        op("resolve", preserve=f"op{j}_preserve")
        target.flush()
        op("flush")

    def take(kind, idx):
        i = state["n_ops"]
        idx = np.asarray(idx, np.int64)
        c.inp(f"op{i}_{kind}", idx)
        getattr(target, kind)(idx)
        for key in shadow:
            shadow[key] = shadow[key][idx]
        state["b"] = len(idx)
        op(kind, **{"beam_idx" if kind == "reorder" else "indices": f"op{i}_{kind}"})

    def crop(m):
        target.crop(m)
        for key in shadow:
            shadow[key] = shadow[key][:, :, :layer.seq_length]
        op("crop", max_length=m)

    if script == "prefill_decode":
        update(13)
        for _ in range(6):
            update(1)
    elif script == "crop_reorder":
        update(9)
        update(1)
        crop(-3)
        take("reorder", [1, 1])
        update(4)
        update(1)
    else:
        update(10, pad=True)
        crop(4)
        update(5)
        take("select_batch", [1])
        update(1)

    for row, p in enumerate(layer.preserved_positions()):
        c.out(f"preserved_positions_{row}", p)
    for i, (k, v, p) in enumerate(layer.segments()):
        c.out(f"seg{i}_keys", np.asarray(k, np.float32))
        c.out(f"seg{i}_values", np.asarray(v, np.float32))
        c.out(f"seg{i}_positions", p)
    blocks = []
    for i, blk in enumerate(layer.blocks):
        blocks.append({"start": int(blk.start), "num_slots": int(blk.num_slots)})
        c.out(f"block{i}_coded", blk.coded)
        if kvquant is not None:
            # the whole block as quantized (a crop keeps a cut block's codes): the stored keys
            # (post-RoPE with RoPE), the reference's pre-RoPE keys, the stored values
            c.out(f"block{i}_rope_positions", blk.rope_positions)
            keys, values, pre = target.inputs[i]
            for side, qt, x in (("keys", blk.keys, keys), ("values", blk.values, values)):
                kvquant_tensor_arrays(c, f"block{i}_{side}", qt)
                c.out(f"block{i}_{side}_x", x)
            if inv is not None:
                c.out(f"block{i}_keys_x_pre_rope", pre)
            continue
        for side, pq in (("keys", blk.keys), ("values", blk.values)):
            qt = pq.unpack()
            c.out(f"block{i}_{side}_codes", qt.codes)
            c.out(f"block{i}_{side}_scale", qt.scale)
            if qt.zero is not None:
                c.out(f"block{i}_{side}_zero", qt.zero)
            x = np.zeros(qt.shape, np.float32)
            live = blk.num_slots
            x[:, :, :live] = shadow[side][:, :, blk.start:blk.start + live]
            c.out(f"block{i}_{side}_x", x)
    c.params["blocks"] = blocks
    c.out("nbytes", np.array(target.nbytes(), np.int64))
    q = np.clip(kv(rs, (state["b"], 2 * h, 2, d), outliers=False), -100, 100)
    if dtype == "float16":
        q = q.astype(np.float16).astype(np.float32)
    elif dtype == "bfloat16":
        q = round_to_bfloat16(q)
    qp = np.tile(np.array([layer.seq_length - 2, layer.seq_length]), (state["b"], 1))
    c.inp("query", q)
    c.inp("query_positions", qp)
    c.out("attend", layer.attend(q, qp).astype(np.float32))
    return c


def cache_cases() -> List[Case]:
    return [cache_case(*spec) for spec in CACHE_SPECS]
