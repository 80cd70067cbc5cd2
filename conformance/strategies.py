"""Hypothesis strategies for the conformance suite: configs, shapes and tensors like real KV caches.

Design
------
Shapes and the *parameters* of a tensor (magnitude, offsets, outlier channels
and tokens, the special patterns below) are drawn by Hypothesis, so they
shrink to the smallest failing case.  The bulk values come from a numpy
generator seeded by a drawn integer (drawing thousands of floats one by one
would make the suite slow and the shrinking useless); small tensors are
sometimes drawn element by element instead, so Hypothesis can also shrink
individual values.  Every test ``note()``s what it drew, so a failure prints
the shrunk example and its configuration.

Value patterns (``kv_tensors``):

* ``gaussian``: N(offset_c, 1) * 10**e with the magnitude exponent ``e`` in
  -6..1 and optional per-channel offsets (real keys have channel biases);
* planted outliers, like real models: 1-3 channels multiplied by 100-1000
  on 1-3 tokens (the attention-sink tokens) — up to about 1e4;
* ``grid``: values on the half-integer grid ``z + s * k / 2`` with ``s`` a
  power of two, so ``(x - z) / s`` lands *exactly* on ties ``k + 1/2``
  (round-half-to-even is exercised) and on the group bounds;
* ``constant``: groups where every value is equal (zero range, ``s = 0``);
* ``zeros`` and ``tiny`` (subnormal float16 / float32 magnitudes).

Input dtypes: float32, float16, bfloat16 and float64.  numpy has no bfloat16,
so a bfloat16 input is a float32 array holding bfloat16 values, marked with
``adapter.as_bfloat16`` (the accelerated adapter then passes a real
``torch.bfloat16`` tensor).  The contract casts every quantizer input to
float32 first, so this loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference.config import KVSinkConfig

from .adapter import as_bfloat16

__all__ = [
    "BITS", "HEAD_DIMS", "GROUP_SIZES", "INPUT_DTYPES",
    "bits", "group_sizes", "head_dims", "input_dtypes", "seeds",
    "kv_tensors", "exclude_masks", "valid_masks", "quantize_cases", "QuantizeCase",
    "code_arrays", "hidden_states_cases", "attention_cases", "segment_lists",
    "probs_cases", "cache_configs", "kvquant_cache_configs", "cast_input",
]

BITS = tuple(range(1, 9))
#: Head dimensions: real ones (64, 80, 96, 128) and odd small ones.
HEAD_DIMS = (1, 2, 3, 4, 5, 7, 8, 12, 16, 24, 32, 64, 80, 96, 128)
#: Group sizes, including non-divisors of the head dims and sizes larger than the axis.
GROUP_SIZES = (1, 2, 3, 4, 5, 7, 8, 16, 24, 32, 64, 128)
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")

#: Largest magnitude drawn: 1e4 (the brief: values span 1e-6 .. 1e4).
MAX_ABS = 1.0e4

bits = st.sampled_from(BITS)
group_sizes = st.sampled_from(GROUP_SIZES)
head_dims = st.sampled_from(HEAD_DIMS)
input_dtypes = st.sampled_from(INPUT_DTYPES)
seeds = st.integers(0, 2**32 - 1)


def cast_input(x32: np.ndarray, dtype: str):
    """``x32`` (float32) as the given input dtype: the array handed to the ports.

    float16 values are first clipped to the float16 range; bfloat16 gives a
    marked float32 array (``adapter.as_bfloat16``); float64 widens the float32
    values and then adds a perturbation below float32 resolution, so that the
    float64 -> float32 rounding of the contract is exercised.
    """
    if dtype == "float32":
        return np.ascontiguousarray(x32, dtype=np.float32)
    if dtype == "float16":
        return np.clip(x32, -65504, 65504).astype(np.float16)
    if dtype == "bfloat16":
        return as_bfloat16(x32)
    if dtype == "float64":
        x64 = x32.astype(np.float64)
        return x64 + x64 * 2.0**-30
    raise ValueError(f"unknown input dtype {dtype!r}")


# --------------------------------------------------------------------------- tensors

@st.composite
def kv_tensors(draw, shape: Tuple[int, ...], *, allow_special: bool = True,
               grid_bits: Optional[int] = None, grid_symmetric: bool = False,
               subnormal: bool = False) -> np.ndarray:
    """A float32 array of ``shape`` (``(..., T, D)``) with values like real keys / values.

    See the module docstring for the patterns.  The result is finite, with
    ``|x| <= 1e4``.  ``grid_bits`` (and ``grid_symmetric``) match the ``grid``
    pattern to the quantizer under test, so that its ties are exact.  No float32
    subnormal is drawn unless ``subnormal=True`` (docs/09-tolerances.md 9.2(0): the
    strategies keep subnormals apart, where a port's flush-to-zero shows up by name).
    """
    if subnormal:
        seed = draw(seeds, label="seed")
        rng = np.random.default_rng(seed)
        exp = draw(st.sampled_from([-39, -41, -44, -45]), label="subnormal_exponent")
        x = rng.standard_normal(shape) * 10.0**exp
        if draw(st.booleans(), label="mixed_with_normal"):
            x = np.where(rng.random(shape) < 0.3, rng.standard_normal(shape) * 1e-37, x)
        return x.astype(np.float32)
    shape = tuple(int(n) for n in shape)
    size = int(np.prod(shape)) if shape else 1
    patterns = ["gaussian", "outliers"]
    if allow_special:
        patterns += ["grid", "constant", "zeros", "tiny"]
    pattern = draw(st.sampled_from(patterns), label="pattern")

    if pattern != "zeros" and size <= 48 and draw(st.booleans(), label="elementwise"):
        # small tensors: element by element, so single values shrink
        elements = st.floats(-MAX_ABS, MAX_ABS, allow_nan=False, allow_infinity=False, width=32)
        return draw(hnp.arrays(np.float32, shape, elements=elements), label="x")

    seed = draw(seeds, label="seed")
    rng = np.random.default_rng(seed)
    d = shape[-1]
    t = shape[-2] if len(shape) >= 2 else 1

    if pattern == "zeros":
        return np.zeros(shape, dtype=np.float32)
    if pattern == "tiny":
        # small but normal float32 (float16 subnormals for the fp16 inputs)
        exp = draw(st.sampled_from([-8, -7, -6, -30]), label="tiny_exponent")
        return (rng.standard_normal(shape) * 10.0**exp).astype(np.float32)
    if pattern == "grid":
        # asymmetric: z + 2**e * k / 2, k in 0..2L: with the group's min z and max z + 2**e * L,
        # s = 2**e exactly and (x - z) / s = k / 2: every odd k is an exact tie.
        # symmetric: 2**e * k / 2, k in -2M..2M, with max |x| = 2**e * M: x / s = k / 2.
        e = draw(st.integers(-6, 4), label="grid_log2_scale")
        b = grid_bits if grid_bits is not None else draw(st.integers(2, 8), label="grid_bits")
        if grid_symmetric:
            top = 2 ** (b - 1) - 1
            z, lo, hi = 0.0, -2 * top, 2 * top
        else:
            z = draw(st.sampled_from([0.0, -1.0, 0.75, -3.5]), label="grid_zero")
            lo, hi = 0, 2 * (2**b - 1)
        k = rng.integers(lo, hi + 1, size=shape)
        ends = rng.random(shape)
        k = np.where(ends < 0.25, lo, np.where(ends > 0.75, hi, k))
        return (z + (2.0**e) * k / 2.0).astype(np.float32)
    if pattern == "constant":
        value = draw(st.sampled_from([0.0, 1.0, -2.5, 1e-6, 300.0]), label="constant")
        x = np.full(shape, value, dtype=np.float32)
        if draw(st.booleans(), label="constant_partly"):
            mask = rng.random(shape) < 0.5
            x = np.where(mask, x, rng.standard_normal(shape).astype(np.float32))
        return x.astype(np.float32)

    exp = draw(st.integers(-6, 1), label="log10_magnitude")
    x = rng.standard_normal(shape)
    if draw(st.booleans(), label="channel_offsets"):
        x = x + rng.standard_normal(d) * 2.0
    x = x * 10.0**exp
    if pattern == "outliers":
        n_ch = draw(st.integers(1, min(3, d)), label="outlier_channels")
        n_tok = draw(st.integers(1, min(3, t)), label="outlier_tokens")
        factor = draw(st.sampled_from([100.0, 300.0, 1000.0]), label="outlier_factor")
        channels = rng.choice(d, size=n_ch, replace=False)
        tokens = rng.choice(t, size=n_tok, replace=False)
        sel = np.zeros(shape[-2:], dtype=bool)
        sel[np.ix_(tokens, channels)] = True
        x = np.where(sel, x * factor, x)
        # like real sinks, the planted values are large even where the gaussian was small
        x = np.where(sel & (np.abs(x) < factor * 10.0**exp), np.sign(x + 0.5) * factor * 10.0**exp, x)
    return np.clip(x, -MAX_ABS, MAX_ABS).astype(np.float32)


@st.composite
def exclude_masks(draw, shape: Tuple[int, ...]):
    """None, all-False, all-True or a random bool mask of ``shape`` (``(..., T)``)."""
    kind = draw(st.sampled_from(["none", "empty", "all", "random", "first"]), label="exclude_kind")
    if kind == "none":
        return None
    if kind == "empty":
        return np.zeros(shape, dtype=bool)
    if kind == "all":
        return np.ones(shape, dtype=bool)
    if kind == "first":
        m = np.zeros(shape, dtype=bool)
        m[..., :1] = True
        return m
    rng = np.random.default_rng(draw(seeds, label="exclude_seed"))
    p = draw(st.sampled_from([0.1, 0.3, 0.7]), label="exclude_p")
    return rng.random(shape) < p


@st.composite
def valid_masks(draw, batch: int, length: int):
    """bool ``(B, T)``: all valid, or left padding of random lengths, or random holes."""
    kind = draw(st.sampled_from(["all", "left_pad", "random"]), label="valid_kind")
    if kind == "all":
        return np.ones((batch, length), dtype=bool)
    if kind == "left_pad":
        pads = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch), label="pads")
        return np.arange(length)[None, :] >= np.asarray(pads)[:, None]
    rng = np.random.default_rng(draw(seeds, label="valid_seed"))
    return rng.random((batch, length)) < 0.8


# --------------------------------------------------------------------------- quantize

@dataclass
class QuantizeCase:
    x: np.ndarray            # the input handed to the port (any dtype / bf16 marker)
    x32: np.ndarray          # the float32 values it denotes
    dtype: str
    bits: int
    group_size: int
    axis: str
    symmetric: bool
    exclude: Optional[np.ndarray]

    def describe(self) -> str:
        return (f"quantize(x shape={self.x32.shape} dtype={self.dtype}, bits={self.bits}, "
                f"group_size={self.group_size}, axis={self.axis!r}, symmetric={self.symmetric}, "
                f"exclude={'None' if self.exclude is None else int(self.exclude.sum())} excluded)")


@st.composite
def quantize_cases(draw, *, max_tokens: int = 40, subnormal: bool = False):
    """A full quantizer call: input, bits 1-8, group sizes (non-divisors too), axis, scheme, exclude.

    ``subnormal=True``: float32 inputs of subnormal magnitude (float32 and float64 dtypes only).
    """
    symmetric = draw(st.booleans(), label="symmetric")
    b = draw(st.integers(2 if symmetric else 1, 8), label="bits")
    axis = draw(st.sampled_from(["token", "channel"]), label="axis")
    lead = draw(st.sampled_from([(), (1,), (2,), (1, 2), (2, 3)]), label="lead_shape")
    t = draw(st.integers(1, max_tokens), label="T")
    d = draw(head_dims, label="D")
    g = draw(group_sizes, label="group_size")
    shape = lead + (t, d)
    x32 = draw(kv_tensors(shape, grid_bits=b, grid_symmetric=symmetric, subnormal=subnormal))
    dtype = draw(st.sampled_from(["float32", "float64"]) if subnormal else input_dtypes, label="dtype")
    x = cast_input(x32, dtype)
    x32 = np.asarray(x, dtype=np.float64).astype(np.float32)   # the values the contract quantizes
    exclude = draw(exclude_masks(shape[:-1]))
    return QuantizeCase(x, x32, dtype, b, g, axis, symmetric, exclude)


@st.composite
def code_arrays(draw):
    """``(codes uint8 (..., n), bits)`` with codes in ``[0, 2**bits - 1]``; n = 0 allowed."""
    b = draw(bits, label="bits")
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 2)]), label="lead_shape")
    n = draw(st.integers(0, 70), label="n")
    shape = lead + (n,)
    if int(np.prod(shape)) <= 64:
        codes = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2**b - 1)), label="codes")
    else:
        rng = np.random.default_rng(draw(seeds, label="seed"))
        codes = rng.integers(0, 2**b, size=shape).astype(np.uint8)
        if draw(st.booleans(), label="extremes"):
            codes = np.where(rng.random(shape) < 0.5, 0, 2**b - 1).astype(np.uint8)
    return codes, b


# --------------------------------------------------------------------------- predictor

@st.composite
def hidden_states_cases(draw):
    """``(hidden, hidden32, dtype, channels, threshold)``: hidden ``(B?, T, C)`` with planted sinks.

    The threshold is sometimes exactly one of the scores (``score > threshold``
    is strict) or a float64 number between two float32 values (the contract
    compares in float64).
    """
    lead = draw(st.sampled_from([(), (1,), (2,)]), label="lead_shape")
    t = draw(st.integers(1, 24), label="T")
    c = draw(st.integers(1, 48), label="C")
    x32 = draw(kv_tensors(lead + (t, c), allow_special=False))
    dtype = draw(input_dtypes, label="dtype")
    x = cast_input(x32, dtype)
    x32 = np.asarray(x, dtype=np.float64).astype(np.float32)
    channels = tuple(draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=min(4, c),
                                   unique=True), label="channels"))
    scores = np.max(np.abs(x32[..., list(channels)]), axis=-1).ravel()
    positive = scores[scores > 0]
    kind = draw(st.sampled_from(["free", "equal_score", "between_floats"]), label="threshold_kind")
    if kind == "free" or positive.size == 0:
        threshold = draw(st.floats(1e-7, 2e4, allow_nan=False, allow_infinity=False), label="threshold")
    else:
        v = float(positive[draw(st.integers(0, positive.size - 1), label="score_index")])
        if kind == "equal_score":
            threshold = v
        else:
            below = float(np.nextafter(np.float32(v), np.float32(0)))
            threshold = below + (v - below) * draw(st.sampled_from([0.25, 0.5, 0.999]), label="frac")
            if not (below < threshold < v):
                threshold = v
    return x, x32, dtype, channels, float(threshold)


# --------------------------------------------------------------------------- attention

@st.composite
def attention_cases(draw, *, max_keys: int = 40):
    """Inputs of ``attention``: GQA shapes, positions with holes (-1), key_valid, scale.

    Returns a dict with query, keys, values (float32 or float16 values), the
    positions and key_valid, plus ``dtype``.
    """
    b = draw(st.integers(1, 2), label="B")
    h = draw(st.integers(1, 3), label="H")
    ratio = draw(st.sampled_from([1, 2, 3, 4]), label="gqa_ratio")
    hq = h * ratio
    d = draw(st.sampled_from((1, 2, 4, 8, 16, 32, 64, 128)), label="D")
    s = draw(st.integers(0, max_keys), label="S")
    tq = draw(st.integers(1, 4), label="Tq")
    query = draw(kv_tensors((b, hq, tq, d), allow_special=False), label="query")
    keys = draw(kv_tensors((b, h, s, d)), label="keys") if s else np.zeros((b, h, 0, d), np.float32)
    values = draw(kv_tensors((b, h, s, d)), label="values") if s else np.zeros((b, h, 0, d), np.float32)
    # keys of real models reach a few hundred; scores beyond ~1e3 only test exp underflow
    qk_scale = draw(st.sampled_from([1.0, 0.1, 0.01]), label="qk_magnitude")
    query = (np.clip(query, -100, 100) * qk_scale).astype(np.float32)
    keys = np.clip(keys, -100, 100).astype(np.float32)
    dtype = draw(st.sampled_from(["float32", "float16"]), label="dtype")
    if dtype == "float16":
        query, keys, values = (a.astype(np.float16) for a in (query, keys, values))
    rng = np.random.default_rng(draw(seeds, label="positions_seed"))
    kind = draw(st.sampled_from(["contiguous", "holes", "shuffled"]), label="positions_kind")
    kp = np.tile(np.arange(s), (b, 1))
    if kind == "holes" and s:
        kp = np.where(rng.random((b, s)) < 0.2, -1, kp)
    elif kind == "shuffled" and s:
        kp = np.stack([rng.permutation(s) for _ in range(b)])
    start = draw(st.integers(-1, s + 1), label="query_start")
    qp = np.tile(np.arange(start, start + tq), (b, 1))
    key_valid = None
    if draw(st.booleans(), label="has_key_valid"):
        key_valid = rng.random((b, s)) < 0.8
    scale = draw(st.sampled_from([None, None, 0.5, 0.01]), label="scale")
    return dict(query=query, keys=keys, values=values, query_positions=qp.astype(np.int64),
                key_positions=kp.astype(np.int64), key_valid=key_valid, scale=scale, dtype=dtype)


@st.composite
def segment_lists(draw):
    """``(case, cuts)``: an attention case and cut points splitting its keys into segments
    (empty segments included)."""
    case = draw(attention_cases())
    s = case["keys"].shape[2]
    n_cuts = draw(st.integers(0, 4), label="n_cuts")
    cuts = sorted(draw(st.lists(st.integers(0, s), min_size=n_cuts, max_size=n_cuts), label="cuts"))
    return case, cuts


# --------------------------------------------------------------------------- preserve

@st.composite
def probs_cases(draw):
    """``(probs float (B, Hq, Tq, T), valid (B, T) or None, ratio)``: softmax rows with sinks."""
    b = draw(st.integers(1, 2), label="B")
    hq = draw(st.integers(1, 4), label="Hq")
    t = draw(st.integers(1, 24), label="T")
    tq = draw(st.integers(1, t), label="Tq")
    rng = np.random.default_rng(draw(seeds, label="seed"))
    logits = rng.standard_normal((b, hq, tq, t)) * draw(st.sampled_from([0.5, 2.0, 5.0]), label="temp")
    n_sinks = draw(st.integers(0, min(3, t)), label="n_sinks")
    sinks = rng.choice(t, size=n_sinks, replace=False)
    logits[..., sinks] += draw(st.sampled_from([2.0, 5.0, 10.0]), label="sink_boost")
    slots = np.arange(t - tq, t)
    causal = np.arange(t)[None, :] <= slots[:, None]
    logits = np.where(causal, logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    valid = draw(st.one_of(st.none(), valid_masks(b, t)), label="valid")
    ratio = draw(st.sampled_from([1.5, 2.0, 4.0, 8.0]), label="ratio")
    dtype = draw(st.sampled_from(["float64", "float32"]), label="probs_dtype")
    return p.astype(dtype), valid, ratio


# --------------------------------------------------------------------------- configs

@st.composite
def cache_configs(draw, *, head_dim: int):
    """A uniform-quantizer ``KVSinkConfig`` for a cache of head dimension ``head_dim``."""
    scheme = draw(st.sampled_from(["asymmetric", "symmetric"]), label="scheme")
    lo = 2 if scheme == "symmetric" else 1
    key_bits = draw(st.integers(lo, 8), label="key_bits")
    value_bits = draw(st.integers(lo, 8), label="value_bits")
    key_axis = draw(st.sampled_from(["channel", "token"]), label="key_axis")
    value_axis = draw(st.sampled_from(["token", "channel"]), label="value_axis")
    kg = draw(st.sampled_from([1, 2, 3, 4, 8, 16]), label="key_group_size")
    vg = kg if (key_axis == value_axis == "channel") else \
        draw(st.sampled_from([1, 2, 3, 4, 8, 16]), label="value_group_size")
    residual = draw(st.sampled_from([0, 1, 2, 4, 8]), label="residual_length")
    preserve = draw(st.sampled_from(["none", "pfn", "kvsink", "pfn+kvsink", "oracle"]), label="preserve")
    n_first = draw(st.integers(1, 3), label="preserve_first_n")
    max_preserved = draw(st.sampled_from([None, None, 0, 1, 3]), label="max_preserved")
    return KVSinkConfig(key_bits=key_bits, value_bits=value_bits, key_group_size=kg,
                        value_group_size=vg, key_axis=key_axis, value_axis=value_axis,
                        scheme=scheme, residual_length=residual, preserve=preserve,
                        preserve_first_n=n_first, max_preserved=max_preserved)


#: Outlier fractions of the kvquant cache configs (docs/08-kvquant.md 8.5: 0 = none, 1 % as KVQuant).
KVQUANT_FRACTIONS = (0.0, 0.01, 0.05, 0.2)


@st.composite
def kvquant_cache_configs(draw):
    """A ``KVSinkConfig(quantizer="kvquant")`` for a cache (key groups = token blocks)."""
    kg = draw(st.sampled_from([1, 2, 3, 4, 8]), label="key_group_size (token block)")
    return KVSinkConfig(
        quantizer="kvquant", key_axis="channel", value_axis="token",
        key_bits=draw(st.integers(1, 8), label="key_bits"),
        value_bits=draw(st.integers(1, 8), label="value_bits"),
        key_group_size=kg,
        value_group_size=draw(st.sampled_from([1, 2, 3, 4, 8, 16]), label="value_group_size"),
        residual_length=draw(st.sampled_from([0, 1, 2, 4, 8]), label="residual_length"),
        max_preserved=draw(st.sampled_from([None, None, 0, 1, 3]), label="max_preserved"),
        outlier_fraction=draw(st.sampled_from(KVQUANT_FRACTIONS), label="outlier_fraction"),
        kvquant_datatype=draw(st.sampled_from(["nf", "kmeans"]), label="kvquant_datatype"))
