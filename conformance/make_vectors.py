"""Generate the golden vectors of conformance/vectors/ from the reference (docs/13-conformance.md).

    python -m conformance.make_vectors            # (re)write conformance/vectors/
    python -m conformance.make_vectors --check    # regenerate in memory, compare checksums

Format (language-neutral)
-------------------------
``vectors/manifest.json``::

    {"format": "kvsink-conformance-vectors", "version": 1,
     "checksum": "sha256 of each array's bytes: C order, little-endian, dtype as listed",
     "cases": [{"name": "quantize_03", "function": "quantize", "file": "quantize_03.npz",
                "params": {...},                      # scalars and the config, JSON
                "arrays": {"x": {"role": "input", "shape": [2, 12, 20], "dtype": "<f4",
                                 "sha256": "..."},
                           "codes": {"role": "expected", ...}, ...}}, ...]}

Each case is one ``.npz`` file (a zip of ``.npy`` arrays: a 10-line reader in
any language) holding the arrays named in the manifest.  Inputs are generated
from the integer draws of ``numpy.random.RandomState`` (a frozen bit stream)
with exact arithmetic only: integers, dyadic rationals (sums of uniform
integers over a power of two instead of ``standard_normal``, whose polar method
calls ``log``), IEEE products and quotients of them, and stored literals.  No
transcendental function (``exp``, ``log``, ``cos``, a float power) enters an
input: those are not bit-reproducible across numpy versions and CPUs (SIMD
paths differ), and a regeneration must depend only on arithmetic the spec pins
down (docs/13-conformance.md §13.6).  Expected outputs are the reference's.  bfloat16 inputs are stored
as float32 arrays holding bfloat16 values (``params.input_dtype ==
"bfloat16"``); attention outputs are stored rounded to float32 (the bound of
docs/09-tolerances.md 9.3 is ~1e-4 relative, so the rounding, ``2^-24``
relative, is immaterial; compare with the bound plus ``2^-24 |o|``).

The ``ops`` of a ``cache`` case are replayed in order on a fresh layer:
``update`` (arrays ``keys``, ``values``, optional ``valid``), ``resolve``
(array ``preserve``), ``flush``, ``crop`` (``max_length``), ``reorder``
(``beam_idx``), ``select_batch`` (``indices``); then the expected state is
given: ``preserved_positions_<row>``, the three segments ``seg<i>_keys /
_values / _positions``, each block's ``block<i>_{keys,values}_{codes,scale,zero}``
and ``block<i>_coded`` (with ``start`` / ``num_slots`` in ``params.blocks``),
the pre-quantization values ``block<i>_{keys,values}_x`` (for the near-tie
rule), ``nbytes`` and one ``attend`` output for ``query`` at ``query_positions``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from reference import attention as ra
from reference import kvquant as rkv
from reference import packing as rpk
from reference import predictor as rp
from reference import preserve as rpres
from reference import quantize as rq
from reference.config import KVSinkConfig

from .adapter import round_to_bfloat16

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
FORMAT = "kvsink-conformance-vectors"
VERSION = 1


def sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.tobytes()).hexdigest()


def dtype_str(a: np.ndarray) -> str:
    return a.dtype.newbyteorder("<").str if a.dtype.itemsize > 1 else a.dtype.str


def normalish(rs: np.random.RandomState, shape) -> np.ndarray:
    """Near-normal float64 values, exactly: the sum of 4 uniform integers in [-256, 256) over 2^8
    (Irwin-Hall; mean 0, standard deviation 1.15), multiples of 2^-8 below 2^3 in magnitude.
    Integer draws and one exact division: the same bits on every numpy and CPU."""
    return rs.randint(-256, 256, size=(4,) + tuple(shape)).sum(axis=0) / 2.0**8


def kv(rs: np.random.RandomState, shape, *, outliers=True) -> np.ndarray:
    """Near-normal values (:func:`normalish`) with channel offsets and, like real models, 2 outlier
    channels x100-x1000 on 2 tokens; every value a multiple of 2^-8, exact in float32."""
    x = normalish(rs, shape) + normalish(rs, shape[-1:])
    if outliers and shape[-2] >= 2 and shape[-1] >= 2:
        ch = rs.choice(shape[-1], 2, replace=False)
        tok = rs.choice(shape[-2], 2, replace=False)
        x[..., tok[:, None], ch[None, :]] *= rs.choice([100.0, 300.0, 1000.0])
    return np.clip(x, -1e4, 1e4).astype(np.float32)


class Case:
    def __init__(self, name: str, function: str, params: dict):
        self.name, self.function, self.params = name, function, params
        self.arrays: Dict[str, np.ndarray] = {}
        self.roles: Dict[str, str] = {}

    def inp(self, name, a):
        self.arrays[name], self.roles[name] = np.array(a, order="C"), "input"
        return a

    def out(self, name, a):
        self.arrays[name], self.roles[name] = np.array(a, order="C"), "expected"
        return a

    def manifest(self) -> dict:
        return {"name": self.name, "function": self.function, "file": f"{self.name}.npz",
                "params": self.params,
                "arrays": {k: {"role": self.roles[k], "shape": list(v.shape), "dtype": dtype_str(v),
                               "sha256": sha256(v)} for k, v in self.arrays.items()}}


def _config_dict(cfg: KVSinkConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["preserve"] = list(d["preserve"])
    d["predictor_channels"] = list(d["predictor_channels"])
    return d


def config_from_dict(d: dict) -> KVSinkConfig:
    d = dict(d)
    d["preserve"] = tuple(d["preserve"])
    d["predictor_channels"] = tuple(d["predictor_channels"])
    return KVSinkConfig(**d)


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
    c = Case("preserved_set", "preserved_set", {"config": _config_dict(cfg)})
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


def _cache_case(name, cfg, dtype, script, kvquant=None) -> Case:
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
    c = Case(name, "cache", {"config": _config_dict(cfg), "dtype": dtype, "ops": []})
    if kvquant is None:
        from .impls import ReferenceCache       # reports a bfloat16 store's bytes (definition 6.17)
        target = ReferenceCache(cfg, dtype)
        layer = target.layer
    else:
        from .kvquant_checks import ReferenceKVQuantCache
        inv = kvquant["inv_freq"]
        cal = _kvquant_calibration(np.random.RandomState(kvquant["calibration_seed"]), cfg, h, d)
        c.params["has_rope"] = inv is not None
        if inv is not None:
            c.inp("rope_inv_freq", inv)
        _calibration_arrays(c, cal)
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
                _kvquant_tensor_arrays(c, f"block{i}_{side}", qt)
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
    return [_cache_case(*spec) for spec in CACHE_SPECS]


# --------------------------------------------------------------------------- kvquant (docs/08)

def _kvquant_calibration(rs, cfg: KVSinkConfig, h: int, d: int, t: int = 24):
    """A layer calibration (definition 8.9) from calibration text drawn with ``rs``: 2 rows of
    ``t`` tokens, the first token of each excluded (its sink); random Fisher weights for k-means."""
    keys, values = kv(rs, (2, h, t, d)), kv(rs, (2, h, t, d))
    exclude = np.zeros((2, t), bool)
    exclude[:, 0] = True
    fisher = {}
    if cfg.kvquant_datatype == "kmeans":
        r_k, r_v = rs.rand(2, h, t, d), rs.rand(2, h, t, d)     # dyadic; IEEE products
        fisher = dict(key_fisher=r_k * r_k, value_fisher=r_v * r_v)
    return rkv.calibrate_kvquant(keys, values, cfg, exclude=exclude, **fisher)


def _calibration_arrays(c: Case, cal) -> None:
    """A ``KVQuantCalibration`` as input arrays ``calibration_*`` (its settings are the config's)."""
    for name in ("key_lower", "key_upper", "key_levels", "value_levels"):
        c.inp(f"calibration_{name}", getattr(cal, name))


def calibration_from_arrays(cfg: KVSinkConfig, a: dict):
    """The ``reference.kvquant.KVQuantCalibration`` of a case's ``calibration_*`` arrays."""
    return rkv.KVQuantCalibration(
        key_lower=a["calibration_key_lower"], key_upper=a["calibration_key_upper"],
        key_levels=a["calibration_key_levels"], value_levels=a["calibration_value_levels"],
        datatype=cfg.kvquant_datatype, key_bits=cfg.key_bits, value_bits=cfg.value_bits,
        outlier_fraction=float(cfg.outlier_fraction), key_group_size=cfg.key_group_size,
        value_group_size=cfg.value_group_size)


def _kvquant_tensor_arrays(c: Case, prefix: str, qt) -> None:
    """Expected arrays of a ``KVQuantTensor``: ``<prefix>_codes`` (uint8, unpacked), ``_scale``,
    ``_centre`` (float32), ``_outlier_index`` (int32), ``_outlier_value`` (float32 / float16),
    ``_words`` (uint32, packed along D)."""
    c.out(f"{prefix}_codes", qt.codes)
    c.out(f"{prefix}_scale", qt.scale)
    c.out(f"{prefix}_centre", qt.centre)
    c.out(f"{prefix}_outlier_index", qt.outlier_index)
    c.out(f"{prefix}_outlier_value", qt.outlier_value)
    c.out(f"{prefix}_words", qt.packed())


def kvquant_tensor_from_arrays(a: dict, prefix: str, levels, bits: int, group_size: int, axis: str):
    """The reference ``KVQuantTensor`` of a case's ``<prefix>_*`` arrays."""
    codes = a[f"{prefix}_codes"]
    return rkv.KVQuantTensor(codes=codes, scale=a[f"{prefix}_scale"], centre=a[f"{prefix}_centre"],
                             levels=levels, outlier_index=a[f"{prefix}_outlier_index"],
                             outlier_value=a[f"{prefix}_outlier_value"], bits=bits,
                             group_size=group_size, axis=axis, shape=tuple(codes.shape))


def _cast(x32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return x32.astype(np.float16)
    if dtype == "bfloat16":
        return round_to_bfloat16(x32)
    if dtype == "float64":
        return x32.astype(np.float64) * (1 + 2.0**-30)
    return x32


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


def geometric_inv_freq(head_dim: int, ratio: float) -> np.ndarray:
    """RoPE frequencies ``ratio**i``, ``i = 0 .. D/2 - 1``, float32 ``(D/2,)``, by repeated float64
    products of a literal ``ratio`` (a stand-in for ``base**(-2/D)``): IEEE products only, so the
    same bits everywhere, where ``base ** (-i / D)`` (a float power) differs across numpy versions
    and CPUs.  Stored as an input of every case that uses it."""
    out, f = [], 1.0
    for _ in range(head_dim // 2):
        out.append(f)
        f *= ratio
    return np.array(out, np.float64).astype(np.float32)


#: ``base**(-2/D)`` to 4 digits for (D, base) = (8, 1e4), (8, 5e5), (64, 5e5)
ROPE_RATIO = {(8, 10000.0): 0.1, (8, 500000.0): 0.03761, (64, 500000.0): 0.6636}


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
        cal = _kvquant_calibration(rs, cfg, h, d)
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
        keys, values = _cast(keys, in_dtype), _cast(values, in_dtype)
        c = Case(name, "kvquant_quantize_block",
                 {"config": _config_dict(cfg), "input_dtype": in_dtype, "sparse_dtype": sparse,
                  "has_exclude": exclude is not None})
        c.inp("keys_pre_rope", keys)
        c.inp("values", values)
        if exclude is not None:
            c.inp("exclude", exclude)
        _calibration_arrays(c, cal)
        blk = rkv.quantize_block_kvquant(keys, values, cal, cfg, exclude=exclude,
                                         sparse_dtype=np.dtype(sparse))
        for side, qt in (("keys", blk.keys), ("values", blk.values)):
            _kvquant_tensor_arrays(c, side, qt)
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
        c = _cache_case(name, cfg, dtype, script, kvquant=opts)
        c.function = "kvquant_cache"
        cases.append(c)
    return cases


def all_cases() -> List[Case]:
    return packing_cases() + quantize_cases() + predictor_cases() + preserve_cases() + \
        attention_cases() + cache_cases() + kvquant_cases()


def manifest(cases) -> dict:
    return {"format": FORMAT, "version": VERSION,
            "generator": "python -m conformance.make_vectors",
            "checksum": "sha256 of each array's raw bytes: C order, little-endian, the listed dtype",
            "cases": [c.manifest() for c in cases]}


def write(directory: Path = VECTORS_DIR) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.npz"):
        old.unlink()
    cases = all_cases()
    for c in cases:
        buf = io.BytesIO()
        np.savez_compressed(buf, **c.arrays)
        (directory / f"{c.name}.npz").write_bytes(buf.getvalue())
    man = manifest(cases)
    (directory / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    return man


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="regenerate in memory and compare with vectors/manifest.json")
    ap.add_argument("--out", type=Path, default=VECTORS_DIR)
    args = ap.parse_args(argv)
    if args.check:
        stored = json.loads((args.out / "manifest.json").read_text())
        fresh = manifest(all_cases())
        if stored != fresh:
            print("vectors differ from a fresh generation", file=sys.stderr)
            return 1
        print(f"{len(fresh['cases'])} cases reproduce exactly")
        return 0
    man = write(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {len(man['cases'])} cases to {args.out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
