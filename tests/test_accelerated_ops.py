"""Differential tests of accelerated/ (torch; Triton on CUDA) against reference/ (numpy).

Rules (docs/09-tolerances.md): packed words, codes, scales, zero points,
dequantized values, predictor and preservation masks are compared for
*identity*; attention outputs within the bound of §9.3 (computed here from the
test's own inputs by :func:`attention_bound`), plus, for the Triton kernel,
the input differences of §9.2 (b) (FMA in dequantization).  Tests that need a
GPU are skipped with the reason "needs CUDA".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference import packing as RPk, quantize as RQ
from reference import attention as RA
from reference import predictor as RPd
from reference import preserve as RPs
from reference.config import KVSinkConfig

from accelerated import attention as AA
from accelerated import attention_kernels as AK
from accelerated import packing as AP
from accelerated import predictor as APd
from accelerated import preserve as APs
from accelerated import quantize as AQ
from tests.conftest import CUDA, KERNEL_DEVICE, needs_cuda, needs_kernel
U = 2.0 ** -24
ETA = 2.0 ** -149


def t(a, device="cpu"):
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def bits_of(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# --------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_codes_bit_identical(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 5, 31, 32, 33, 64, 100, 129):
        codes = rng.integers(0, 2 ** bits, size=(2, 3, n)).astype(np.uint8)
        want = RPk.pack_codes(codes, bits)
        got = AP.pack_codes(t(codes), bits)
        assert got.dtype == torch.int32
        np.testing.assert_array_equal(AP.words_to_reference(got), want)
        back = AP.unpack_codes(AP.words_from_reference(want), bits, n)
        assert back.dtype == torch.uint8
        np.testing.assert_array_equal(back.numpy(), codes)


def test_words_mapping_is_a_reinterpretation():
    words = np.array([0, 1, 2 ** 31, 2 ** 32 - 1, 0x39], dtype=np.uint32)
    tw = AP.words_from_reference(words)
    assert tw.tolist() == [0, 1, -2 ** 31, -1, 0x39]
    np.testing.assert_array_equal(AP.words_to_reference(tw), words)
    # the highest field of a full word (2-bit code 3 at bits 30-31) sits in the sign bit
    codes = np.zeros((1, 16), dtype=np.uint8)
    codes[0, 15] = 3
    assert AP.pack_codes(t(codes), 2).item() == -(2 ** 30)
    assert AP.unpack_codes(AP.pack_codes(t(codes), 2), 2, 16)[0, 15].item() == 3


def test_packing_errors():
    with pytest.raises(ValueError, match="codes must lie in"):
        AP.pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="integer dtype"):
        AP.pack_codes(torch.tensor([[1.0]]), 2)
    with pytest.raises(ValueError, match="bits"):
        AP.pack_codes(torch.tensor([[1]], dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="int32"):
        AP.unpack_codes(torch.tensor([[1]], dtype=torch.int64), 2, 3)
    with pytest.raises(ValueError, match="packed_length"):
        AP.unpack_codes(torch.tensor([[1, 2]], dtype=torch.int32), 2, 3)
    with pytest.raises(ValueError, match="padding codes"):
        AP.unpack_codes(torch.tensor([[1 << 8]], dtype=torch.int32), 2, 3)
    with pytest.raises(ValueError, match="unused high bits"):
        AP.unpack_codes(torch.tensor([[-(1 << 31)]], dtype=torch.int32), 3, 10)
    with pytest.raises(TypeError, match="uint32"):
        AP.words_from_reference(np.zeros(3, dtype=np.int32))


# --------------------------------------------------------------------------- quantize

def _check_same_quantization(got, want):
    """got: accelerated QuantizedTensor or PackedQuantizedTensor; want: reference QuantizedTensor."""
    if isinstance(got, AQ.PackedQuantizedTensor):
        np.testing.assert_array_equal(AP.words_to_reference(got.words), want.packed())
        got = got.unpack()
    np.testing.assert_array_equal(got.codes.cpu().numpy(), want.codes)
    np.testing.assert_array_equal(bits_of(got.scale.cpu().numpy()), bits_of(want.scale))
    if want.zero is None:
        assert got.zero is None
    else:
        np.testing.assert_array_equal(bits_of(got.zero.cpu().numpy()), bits_of(want.zero))


def _input(rng, shape, dtype):
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
    x.reshape(-1)[:: 7] *= 40.0                                      # outliers
    if dtype == "float16":
        xr = x.astype(np.float16)
        return xr, t(xr)
    if dtype == "bfloat16":
        tb = t(x).to(torch.bfloat16)
        return tb.float().numpy(), tb                                # same numbers on both sides
    if dtype == "float64":
        x64 = rng.standard_normal(shape) * 3.0
        return x64, t(x64)
    return x, t(x)


CASES = [  # bits, group, axis, symmetric, shape
    (2, 32, "channel", False, (1, 2, 70, 64)),
    (2, 32, "token", False, (2, 1, 9, 128)),
    (4, 5, "channel", True, (2, 3, 12, 20)),
    (3, 8, "token", False, (2, 1, 5, 50)),
    (1, 3, "channel", False, (1, 1, 7, 70)),
    (8, 16, "token", True, (3, 9, 64)),
    (5, 64, "channel", False, (2, 10, 33)),
    (6, 7, "token", False, (4, 3, 31)),
    (7, 4, "channel", True, (3, 9, 10)),
]


@pytest.mark.parametrize("bits,group,axis,symmetric,shape", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_quantize_identical_to_reference(bits, group, axis, symmetric, shape, dtype):
    rng = np.random.default_rng(abs(hash((bits, group, axis, symmetric, dtype))) % 2 ** 32)
    x_np, x_t = _input(rng, shape, dtype)
    excl = rng.random(shape[:-1]) < 0.25
    want = RQ.quantize(x_np, bits, group, axis, symmetric=symmetric, exclude=excl)
    got = AQ.quantize(x_t, bits, group, axis, symmetric=symmetric, exclude=t(excl))
    _check_same_quantization(got, want)
    packed = AQ.quantize_packed(x_t, bits, group, axis, symmetric=symmetric, exclude=t(excl))
    _check_same_quantization(packed, want)
    np.testing.assert_array_equal(bits_of(AQ.dequantize(got).numpy()), bits_of(RQ.dequantize(want)))
    np.testing.assert_array_equal(bits_of(AQ.dequantize(packed).numpy()), bits_of(RQ.dequantize(want)))


def test_quantize_ties_round_half_to_even():
    # group min 0, max 3 at 2 bits: s = 1, z = 0; t = 0.5, 1.5, 2.5 are exact ties
    x = np.array([[0.0, 0.5, 1.5, 2.5, 3.0, 1.0]], dtype=np.float32)
    want = RQ.quantize_per_token(x, 2, 6)
    got = AQ.quantize_per_token(t(x), 2, 6)
    assert got.codes.tolist() == [[0, 0, 2, 2, 3, 1]]
    _check_same_quantization(got, want)
    # symmetric: M = 1 at 2 bits; max|x| = 1 -> s = 1; x = -0.5, 0.5 are ties -> 0 -> code M
    xs = np.array([[-1.0, -0.5, 0.5, 1.0]], dtype=np.float32)
    gs = AQ.quantize_per_token(t(xs), 2, 4, symmetric=True)
    assert gs.codes.tolist() == [[0, 1, 1, 2]]
    _check_same_quantization(gs, RQ.quantize_per_token(xs, 2, 4, symmetric=True))


def test_quantize_zero_range_and_empty_groups():
    x = np.full((1, 8, 4), 2.5, dtype=np.float32)
    excl = np.zeros((1, 8), dtype=bool)
    excl[0, 4:] = True                                               # second channel group empty
    for sym in (False, True):
        want = RQ.quantize_per_channel(x, 3, 4, symmetric=sym, exclude=excl)
        got = AQ.quantize_packed(t(x), 3, 4, "channel", symmetric=sym, exclude=t(excl))
        _check_same_quantization(got, want)
        assert float(got.scale[0, 1].abs().max()) == 0.0


def test_quantize_errors():
    x = torch.zeros((2, 4))
    with pytest.raises(ValueError, match="NaN"):
        AQ.quantize(torch.tensor([[1.0, float("nan")]]), 2, 2, "token")
    with pytest.raises(TypeError, match="floating"):
        AQ.quantize(torch.zeros((2, 4), dtype=torch.int32), 2, 2, "token")
    with pytest.raises(TypeError, match="torch tensor"):
        AQ.quantize(np.zeros((2, 4), dtype=np.float32), 2, 2, "token")
    with pytest.raises(ValueError, match="bits"):
        AQ.quantize(x, 0, 2, "token")
    with pytest.raises(ValueError, match="bits"):
        AQ.quantize(x, 1, 2, "token", symmetric=True)
    with pytest.raises(ValueError, match="group_size"):
        AQ.quantize(x, 2, 0, "token")
    with pytest.raises(ValueError, match="axis"):
        AQ.quantize(x, 2, 2, "tokens")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        AQ.quantize(torch.zeros(4), 2, 2, "token")
    with pytest.raises(ValueError, match="exclude must have shape"):
        AQ.quantize(x, 2, 2, "token", exclude=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="exclude"):
        AQ.quantize(x, 2, 2, "token", exclude=torch.zeros(2))
    with pytest.raises(ValueError, match="overflows"):
        AQ.quantize(torch.tensor([[-3e38, 3e38]]), 2, 2, "token")
    with pytest.raises(ValueError, match="float32 range"):
        AQ.quantize(torch.tensor([[1e39, 1.0]], dtype=torch.float64), 2, 2, "token")


def test_quantize_packed_kernel_unavailable_on_cpu():
    if CUDA:
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ValueError, match="use_kernel=True"):
        AQ.quantize_packed(torch.zeros((2, 4)), 2, 2, "token", use_kernel=True)


def test_containers_round_trip_through_reference():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 40, 24)).astype(np.float32)
    want = RQ.quantize(x, 3, 16, "channel")
    p = AQ.PackedQuantizedTensor.from_reference(want)
    _check_same_quantization(p, want)
    back = p.to_reference()
    np.testing.assert_array_equal(back.codes, want.codes)
    assert p.nbytes_packed == want.nbytes_packed


# --------------------------------------------------------------------------- predictor

def test_predictor_identical():
    rng = np.random.default_rng(7)
    h = (rng.standard_normal((2, 60, 32)) * 10).astype(np.float32)
    h[0, 3, 5] = 800.0
    h[1, 9, 7] = -12.5
    chans = (5, 7, 30)
    np.testing.assert_array_equal(APd.outlier_scores(t(h), chans).numpy(), RPd.outlier_scores(h, chans))
    thresholds = [12.5, float(np.nextafter(np.float32(12.5), np.float32(0))), 12.5 + 1e-9, 12.499999999, 30.0]
    for thr in thresholds:                    # exactly at a score, between two float32 numbers, ...
        np.testing.assert_array_equal(APd.predict_sinks(t(h), chans, thr).numpy(),
                                      RPd.predict_sinks(h, chans, thr))
    # the float32-rounded-down threshold gives the same strict comparison
    assert APd.threshold_float32(12.5 + 1e-9) == 12.5
    p = APd.SinkPredictor(3, chans, 12.5)
    np.testing.assert_array_equal(p.predict(t(h)).numpy(), RPd.predict_sinks(h, chans, 12.5))
    with pytest.raises(ValueError, match="channel"):
        APd.outlier_scores(t(h), (40,))
    with pytest.raises(ValueError, match="NaN"):
        APd.outlier_scores(torch.tensor([[float("inf")]]), (0,))
    with pytest.raises(ValueError, match="threshold"):
        APd.predict_sinks(t(h), chans, -1.0)


def test_calibration_matches_reference():
    rng = np.random.default_rng(8)
    states = [rng.standard_normal((40, 16)).astype(np.float32) for _ in range(9)]
    for s in states[2:8]:
        s[0, 11] = 5000.0
    want = RPd.calibrate_predictor(states, window=3)
    got = APd.calibrate_predictor([t(s) for s in states], window=3)
    assert (got.layer, got.channels, got.threshold) == (want.layer, want.channels, want.threshold)


# --------------------------------------------------------------------------- preserve

def test_preserve_identical():
    rng = np.random.default_rng(9)
    b, tt = 3, 40
    valid = rng.random((b, tt)) < 0.8
    valid[:, -1] = True
    pred = rng.random((b, tt)) < 0.1
    np.testing.assert_array_equal(APs.preserve_first_n(t(valid), 3).numpy(), RPs.preserve_first_n(valid, 3))
    np.testing.assert_array_equal(APs.cap_preserved(t(pred), 2).numpy(), RPs.cap_preserved(pred, 2))
    np.testing.assert_array_equal(APs.union(t(valid), t(pred)).numpy(), RPs.union(valid, pred))
    probs = rng.random((b, 2, 5, tt))
    probs[..., 0] *= 30.0
    probs /= probs.sum(-1, keepdims=True)
    want_s = RPs.oracle_scores(probs, valid)
    got_s = APs.oracle_scores(t(probs), t(valid)).numpy()
    np.testing.assert_allclose(got_s, want_s, rtol=1e-12, atol=0)   # float64, summation order only
    for ratio in (1.5, 8.0):
        np.testing.assert_array_equal(APs.attention_oracle(t(probs), ratio, t(valid)).numpy(),
                                      RPs.attention_oracle(probs, ratio, valid))
    oracle = RPs.attention_oracle(probs, 2.0, valid)
    for preserve in ("none", "pfn", "kvsink", "pfn+kvsink+oracle"):
        for cap in (None, 1):
            cfg = KVSinkConfig(preserve=preserve, preserve_first_n=2, max_preserved=cap)
            np.testing.assert_array_equal(
                APs.preserved_set(cfg, t(valid), t(pred), t(oracle)).numpy(),
                RPs.preserved_set(cfg, valid, pred, oracle))
    with pytest.raises(ValueError, match="predicted is None"):
        APs.preserved_set(KVSinkConfig(preserve="kvsink"), t(valid))
    # Proposition 3.7: the streaming form, chunk by chunk with the counts carried, equals the reference's
    for preserve in ("pfn", "kvsink", "pfn+kvsink"):
        for cap in (None, 1, 3):
            cfg = KVSinkConfig(preserve=preserve, preserve_first_n=2, max_preserved=cap)
            v, p = torch.zeros(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int32)
            rv, rp = np.zeros(b, np.int64), np.zeros(b, np.int64)
            for lo, hi in ((0, 3), (3, 4), (4, tt)):
                got, v, p = APs.preserved_step(cfg, t(valid[:, lo:hi]), v, p, t(pred[:, lo:hi]))
                want, rv, rp = RPs.preserved_step(cfg, valid[:, lo:hi], rv, rp, pred[:, lo:hi])
                np.testing.assert_array_equal(got.numpy(), want)
                np.testing.assert_array_equal(p.numpy(), rp)
    with pytest.raises(ValueError, match="oracle"):
        APs.preserved_step(KVSinkConfig(preserve="oracle"), t(valid), v, p)
    with pytest.raises(TypeError, match="bool"):
        APs.preserve_first_n(t(valid.astype(np.int8)), 1)


# --------------------------------------------------------------------------- attention

def attention_bound(q, k_list, v_list, scale=None, u_in=0.0, u_p=0.0, u_v=0.0, dk=None, dv=0.0,
                    u_acc=None):
    """docs/09-tolerances.md §9.3 test rule (float32 port), global maxima over the test's inputs.

    ``k_list``/``v_list``: float64 arrays (B, H, S_i, D) of the keys/values the reference
    saw; ``dk``: optional list of per-element key differences (§9.2 b) of a port that
    dequantizes on the fly, ``dv``: max value difference; ``u_acc``: the roundoff per term of the
    sums (default ``u``; tensor cores: §9.5's ``6u``).  Returns an absolute tolerance.
    """
    u_acc = U if u_acc is None else u_acc
    q = np.asarray(q, dtype=np.float64)
    b, hq, tq, d = q.shape
    c = 1.0 / math.sqrt(d) if scale is None else scale
    A, AD, V, S = 0.0, 0.0, 0.0, 0
    for i, k in enumerate(k_list):
        k = np.asarray(k, dtype=np.float64)
        if k.shape[2] == 0:
            continue
        g = hq // k.shape[1]
        kr = np.repeat(np.abs(k), g, axis=1)                          # (B, Hq, S, D)
        A = max(A, float(np.einsum("bhtd,bhsd->bhts", np.abs(q), kr).max()))
        if dk is not None and dk[i] is not None:
            dkr = np.repeat(np.asarray(dk[i], dtype=np.float64), g, axis=1)
            AD = max(AD, float(np.einsum("bhtd,bhsd->bhts", np.abs(q), dkr).max()))
        V = max(V, float(np.abs(np.asarray(v_list[i], dtype=np.float64)).max()))
        S += k.shape[2]
    S = max(S, 1)
    bracket = 2.5 * (c * A * (2 * u_in + (d + 1) * u_acc) + U * (3 * math.log(S) + 4) + 2 * S * u_acc
                     + u_p + c * AD) + u_v + U + U
    return V * bracket + dv * (1 + 1e-6)


def _attn_inputs(rng, b=2, hq=6, h=2, tq=3, s=300, d=16, sink=True):
    q = rng.standard_normal((b, hq, tq, d)).astype(np.float32)
    k = rng.standard_normal((b, h, s, d)).astype(np.float32)
    v = rng.standard_normal((b, h, s, d)).astype(np.float32)
    if sink:
        k[:, :, 0] *= 6.0                                            # a sink-like key
    kp = np.tile(np.arange(s), (b, 1))
    kp[0, 1:4] = -1                                                  # empty slots
    qp = np.stack([np.array([s - 3, s - 2, s - 1]), np.array([2, s - 2, -1])])[:b, :tq]
    kv = rng.random((b, s)) < 0.9
    return q, k, v, kp, qp, kv


@pytest.mark.parametrize("block", [1, 37, 512])
def test_attention_within_tolerance(block):
    rng = np.random.default_rng(block)
    q, k, v, kp, qp, kv = _attn_inputs(rng)
    want = RA.attention(q, k, v, query_positions=qp, key_positions=kp, key_valid=kv)
    got = AA.attention(t(q), t(k), t(v), query_positions=t(qp), key_positions=t(kp), key_valid=t(kv),
                       block_size=block)
    assert got.dtype == torch.float32
    tol = attention_bound(q, [k], [v])
    err = np.abs(got.numpy() - want).max()
    assert err <= tol, (err, tol)
    # the query at position -1 sees nothing: exactly 0
    assert float(got[1, :, 2].abs().max()) == 0.0
    m, l, acc = AA.partial_attention(t(q), t(k), t(v), query_positions=t(qp), key_positions=t(kp),
                                     key_valid=t(kv), block_size=block)
    rm, rl, racc = RA.partial_attention(q, k, v, query_positions=qp, key_positions=kp, key_valid=kv)
    np.testing.assert_array_equal(np.isfinite(m.numpy()), np.isfinite(rm))
    fin = np.isfinite(rm)
    # m is one scaled dot product: step 1 of §9.3
    assert np.abs(m.numpy()[fin] - rm[fin]).max() <= attention_bound(q, [k], [np.ones((1, 1, 1, 1))])


def test_split_attention_and_merge():
    rng = np.random.default_rng(11)
    q, k, v, kp, qp, kv = _attn_inputs(rng, s=120)
    segs_np = [(k[:, :, :50], v[:, :, :50], kp[:, :50]), (k[:, :, 50:50], v[:, :, 50:50], kp[:, 50:50]),
               (k[:, :, 50:], v[:, :, 50:], kp[:, 50:])]
    want = RA.split_attention(q, segs_np, query_positions=qp)
    got = AA.split_attention(t(q), [(t(a), t(b_), t(c)) for a, b_, c in segs_np], query_positions=t(qp))
    assert np.abs(got.numpy() - want).max() <= attention_bound(q, [k], [v])
    parts = [AA.partial_attention(t(q), t(a), t(b_), query_positions=t(qp), key_positions=t(c))
             for a, b_, c in segs_np]
    merged = AA.merge_partials(parts)
    assert np.abs(merged.numpy() - want).max() <= attention_bound(q, [k], [v])
    empty = AA.split_attention(t(q), [], query_positions=t(qp))
    assert empty.shape == q.shape and float(empty.abs().max()) == 0.0


def test_attention_errors():
    q = torch.zeros((1, 3, 1, 4))
    k = torch.zeros((1, 2, 5, 4))
    pos = torch.zeros((1, 5), dtype=torch.int64)
    qp = torch.zeros((1, 1), dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple"):
        AA.attention(q, k, k, query_positions=qp, key_positions=pos)
    with pytest.raises(ValueError, match="NaN"):
        AA.attention(torch.full((1, 2, 1, 4), float("nan")), k, k, query_positions=qp, key_positions=pos)
    with pytest.raises(TypeError, match="integer"):
        AA.attention(q[:, :2], k, k, query_positions=qp.float(), key_positions=pos)
    with pytest.raises(ValueError, match="shape"):
        AA.attention(q[:, :2], k, k, query_positions=qp, key_positions=pos[:, :3])
    with pytest.raises(ValueError, match="scale"):
        AA.attention(q[:, :2], k, k, query_positions=qp, key_positions=pos, scale=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        AA.merge_partials([])


# --------------------------------------------------------------------------- quantized segment

QSEG = [  # key (bits, G, axis, sym), value (bits, G, axis, sym)
    ((2, 32, "channel", False), (2, 32, "token", False)),
    ((4, 16, "channel", True), (4, 8, "token", True)),
    ((3, 8, "token", False), (3, 16, "channel", False)),
    ((1, 5, "channel", False), (8, 64, "token", False)),
]


def quantized_case(rng, kspec, vspec, s=200, d=64, tq=3):
    q, k, v, kp, qp, kv = _attn_inputs(rng, s=s, d=d, tq=tq)
    excl = rng.random(kp.shape) < 0.05                               # preserved tokens leave the stats
    excl4 = np.broadcast_to(excl[:, None, :], k.shape[:3])
    kq = RQ.quantize(k, kspec[0], kspec[1], kspec[2], symmetric=kspec[3], exclude=excl4)
    vq = RQ.quantize(v, vspec[0], vspec[1], vspec[2], symmetric=vspec[3], exclude=excl4)
    kp = np.where(excl, -1, kp)                                      # ... and their slots are empty
    return q, kq, vq, kp, qp, kv


@pytest.mark.parametrize("kspec,vspec", QSEG)
def test_quantized_segment_attention_torch(kspec, vspec):
    rng = np.random.default_rng(kspec[0] * 10 + vspec[0])
    q, kq, vq, kp, qp, kv = quantized_case(rng, kspec, vspec)
    kd, vd = RQ.dequantize(kq), RQ.dequantize(vq)
    pk = AQ.PackedQuantizedTensor.from_reference(kq)
    pv = AQ.PackedQuantizedTensor.from_reference(vq)
    # a full-precision residual segment merged with the quantized one
    kr = rng.standard_normal(kd.shape[:2] + (7, kd.shape[-1])).astype(np.float32)
    vr = rng.standard_normal(kr.shape).astype(np.float32)
    rp = np.tile(np.arange(200, 207), (2, 1))
    qp = qp + 7 * (qp >= 0)
    want = RA.split_attention(q, [(np.where(kv[:, None, :, None], kd, 0), vd, np.where(kv, kp, -1)),
                                  (kr, vr, rp)], query_positions=qp)
    for block in (16, 256):
        m, l, acc = AA.quantized_segment_attention(t(q), pk, pv, query_positions=t(qp), key_positions=t(kp),
                                                   key_valid=t(kv), block_size=block, use_kernel=False)
        res = AA.partial_attention(t(q), t(kr), t(vr), query_positions=t(qp), key_positions=t(rp))
        got = AA.merge_partials([(m, l, acc), res]).numpy()
        tol = attention_bound(q, [kd, kr], [vd, vr])
        assert np.abs(got - want).max() <= tol


def test_quantized_segment_attention_errors():
    rng = np.random.default_rng(3)
    q, kq, vq, kp, qp, kv = quantized_case(rng, *QSEG[0], s=40)
    pk = AQ.PackedQuantizedTensor.from_reference(kq)
    with pytest.raises(TypeError, match="PackedQuantizedTensor"):
        AA.quantized_segment_attention(t(q), kq, pk, query_positions=t(qp), key_positions=t(kp))
    with pytest.raises(ValueError, match="key_positions"):
        AA.quantized_segment_attention(t(q), pk, pk, query_positions=t(qp), key_positions=t(kp[:, :5]))
    with pytest.raises(ValueError, match="precision"):
        AA.quantized_segment_attention(t(q), pk, pk, query_positions=t(qp), key_positions=t(kp),
                                       precision="tf32")


# --------------------------------------------------------------------------- CUDA (Triton kernels)

@needs_cuda
@pytest.mark.parametrize("bits,group,axis,symmetric,shape", CASES)
def test_quantize_kernel_identical_cuda(bits, group, axis, symmetric, shape):
    rng = np.random.default_rng(bits * 100 + group)
    for dtype in ("float32", "bfloat16"):
        x_np, x_t = _input(rng, shape, dtype)
        excl = rng.random(shape[:-1]) < 0.25
        want = RQ.quantize(x_np, bits, group, axis, symmetric=symmetric, exclude=excl)
        if axis == "token" and -(-shape[-1] // group) > 16:
            continue
        got = AQ.quantize_packed(x_t.cuda(), bits, group, axis, symmetric=symmetric,
                                 exclude=t(excl, "cuda"), use_kernel=True)
        _check_same_quantization(got, want)


@needs_cuda
@pytest.mark.parametrize("kspec,vspec", QSEG)
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("tq", [1, 3])     # 3 rows per KV head: CUDA-core path; 9 rows: tl.dot path
def test_quantized_segment_attention_kernel_cuda(kspec, vspec, precision, tq):
    rng = np.random.default_rng(kspec[0] * 10 + vspec[0] + 1)
    q, kq, vq, kp, qp, kv = quantized_case(rng, kspec, vspec, s=1000, d=64, tq=tq)
    pk = AQ.PackedQuantizedTensor.from_reference(kq, "cuda")
    pv = AQ.PackedQuantizedTensor.from_reference(vq, "cuda")
    m, l, acc = AA.quantized_segment_attention(t(q, "cuda"), pk, pv, query_positions=t(qp, "cuda"),
                                               key_positions=t(kp, "cuda"), key_valid=t(kv, "cuda"),
                                               use_kernel=True, precision=precision)
    _within_kernel_bound((m, l, acc), q, kq, vq, qp, kp, kv, precision)


def _within_kernel_bound(partial, q, kq, vq, qp, kp, kv, precision="ieee"):
    """The kernel's (m, l, acc) normalised is within docs/09 §9.3's bound of the reference attention,
    with §9.2 (b)'s FMA allowance for the dequantization."""
    kd, vd = RQ.dequantize(kq), RQ.dequantize(vq)
    got = AA.merge_partials([tuple(x.cpu() for x in partial)]).numpy()
    want = RA.attention(q, kd, vd, query_positions=qp, key_positions=np.where(kv, kp, -1))

    def fma_diff(qt, xd):                                  # §9.2 (b): 2u(|q s| + |x|) + eta
        if qt.symmetric:
            return np.zeros_like(xd, dtype=np.float64)
        gax = RQ.GROUP_AXIS[qt.axis]
        s = RQ.expand_groups(qt.scale, qt.group_size, qt.shape[gax], gax).astype(np.float64)
        return 2 * U * (qt.codes * s + np.abs(xd)) + ETA

    u_in = 2.0 ** -21 if precision == "tf32x3" else 0.0
    tol = attention_bound(q, [kd], [vd], u_in=u_in, u_p=u_in, u_v=u_in,
                          dk=[fma_diff(kq, kd)], dv=float(fma_diff(vq, vd).max()))
    assert np.abs(got - want).max() <= tol


class _Counting:
    """A kernel stand-in recording the rows ``R`` of each launch, then launching the real kernel."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(**kw):
            self.calls.append(kw["R"])
            return self.kernel[grid](**kw)
        return launch


@needs_kernel
def test_many_query_rows_split_into_launches(monkeypatch):
    """A chunk of many queries (a chunked prefill's, g * Tq rows per KV head beyond what one tile
    of the many-rows kernel holds) is attended in launches of at most ``DOT_MAX_ROWS`` rows, each
    within the kernel's bound of the reference."""
    from accelerated import attention_launch as AL
    rng = np.random.default_rng(7)
    q, kq, vq, kp, qp, kv = quantized_case(rng, *QSEG[0], s=300, tq=3)
    q = rng.standard_normal((2, 6, 40, 64)).astype(np.float32)          # 40 queries, positions 0..312
    qp = np.stack([np.linspace(0, 299, 40).astype(np.int64), np.arange(40) * 8])
    dev = KERNEL_DEVICE
    pk = AQ.PackedQuantizedTensor.from_reference(kq, dev)
    pv = AQ.PackedQuantizedTensor.from_reference(vq, dev)

    def run():
        return AA.quantized_segment_attention(t(q, dev), pk, pv, query_positions=t(qp, dev),
                                              key_positions=t(kp, dev), key_valid=t(kv, dev),
                                              use_kernel=True)
    monkeypatch.setattr(AL, "DOT_MAX_ROWS", 16)            # g = 3: 5 queries per launch, 8 launches
    calls = []
    real = AK.quantized_attention_kernel
    monkeypatch.setattr(AK, "quantized_attention_kernel", _Counting(real, calls))
    _within_kernel_bound(run(), q, kq, vq, qp, kp, kv)
    assert len(calls) == 8 and max(calls) == 15            # 5 queries x 3 rows per launch


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_pack_codes_takes_wide_unsigned_codes(dtype):
    codes = np.array([[0, 3, 1, 2, 3]], np.uint8)
    got = AP.pack_codes(torch.from_numpy(codes.astype(np.int64)).to(dtype), 2)
    np.testing.assert_array_equal(AP.words_to_reference(got), RPk.pack_codes(codes, 2))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        AP.pack_codes(torch.tensor([[4]], dtype=torch.int64).to(dtype), 2)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_group_size_beyond_the_axis_is_one_group_without_padding(axis):
    x = torch.from_numpy(np.random.RandomState(1).standard_normal((2, 12, 20)).astype(np.float32))
    n = 20 if axis == "token" else 12
    huge, whole = AQ.quantize(x, 3, 10**9, axis), AQ.quantize(x, 3, n, axis)
    assert huge.group_size == 10**9
    torch.testing.assert_close(huge.codes, whole.codes, rtol=0, atol=0)
    torch.testing.assert_close(AQ.dequantize(huge), AQ.dequantize(whole), rtol=0, atol=0)
    torch.testing.assert_close(AQ.dequantize(AQ.quantize_packed(x, 3, 10**9, axis)),
                               AQ.dequantize(whole), rtol=0, atol=0)
