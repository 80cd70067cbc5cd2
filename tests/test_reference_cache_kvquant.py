"""The reference cache with the KVQuant-style quantizer (docs/06-cache.md 6.21-6.22, docs/08-kvquant.md)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.attention import split_attention
from reference.cache import (
    KVQuantCacheBlock,
    QuantizedKVCache,
    QuantizedKVCacheLayer,
    flushed_length,
    quantize_block_kvquant_cache,
    quantize_sequence,
)
from reference.config import KVSinkConfig
from reference.kvquant import (
    KVQuantCalibration,
    apply_rope,
    calibrate_kvquant,
    dequantize_block_kvquant,
    nf_calibration,
    quantize_block_kvquant,
    rope_inv_freq,
    rope_roundtrip_bound,
    unapply_rope,
)
from reference.packing import packed_length

from test_reference_cache import assert_same_full_precision  # tests/ is on sys.path (rootdir insertion)

H, D = 2, 16
INV = rope_inv_freq(D)


def kv_config(**kw):
    base = dict(quantizer="kvquant", key_bits=3, value_bits=3, key_group_size=4,
                value_group_size=8, residual_length=5, outlier_fraction=0.05)
    base.update(kw)
    return KVSinkConfig(**base)


def pre_rope_tokens(seed, b=2, t=37, sinks=(1, 9)):
    """Pre-RoPE keys with a per-channel offset and an outlier channel, values; sinks get huge entries."""
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((b, H, t, D)) + np.linspace(-3, 3, D)).astype(np.float32)
    k[..., 5] *= 8
    v = rng.standard_normal((b, H, t, D)).astype(np.float32)
    for s in (s for s in sinks if s < t):
        k[:, :, s, 3] = 300.0
        v[:, :, s, 7] = -200.0
    return k, v


def calibration_for(config, seed=100):
    """A calibration made from other (calibration) tokens, as docs/08 definition 8.9."""
    if config.kvquant_datatype == "nf" and config.outlier_fraction == 0:
        return None
    k, v = pre_rope_tokens(seed, b=2, t=48, sinks=())
    rng = np.random.default_rng(seed + 1)
    kf = vf = None
    if config.kvquant_datatype == "kmeans":
        kf = rng.random(k.shape).astype(np.float32)
        vf = rng.random(v.shape).astype(np.float32)
    return calibrate_kvquant(k, v, config, key_fisher=kf, value_fisher=vf)


def left_padded(b, t, pads):
    valid = np.ones((b, t), dtype=bool)
    for row, p in enumerate(pads):
        valid[row, :p] = False
    return valid


def rotary_positions(valid):
    """transformers' position_ids under left padding: cumsum(mask) - 1, 1 at padding."""
    pos = np.cumsum(valid, axis=1) - 1
    return np.where(valid, pos, 1).astype(np.int64)


def post_rope(k_pre, rope):
    return apply_rope(k_pre, np.maximum(rope, 0)[:, None, :], INV)


def stream(config, k, v, preserve, valid, chunks, rope=None, dtype=np.float32, layer=None, cal=None,
           inv=INV):
    if layer is None:
        layer = QuantizedKVCacheLayer(config, dtype=dtype, kvquant_calibration=cal, rope_inv_freq=inv)
    t0 = layer.seq_length
    for n in chunks:
        sl = slice(t0, t0 + n)
        layer.update(k[:, :, sl], v[:, :, sl], valid[:, sl], None if rope is None else rope[:, sl])
        layer.resolve(preserve[:, sl])
        layer.flush()
        t0 += n
    return layer


def assert_same_kvquant_tensor(x, y, what):
    for f in ("codes", "scale", "centre", "levels", "outlier_index", "outlier_value"):
        a, b = getattr(x, f), getattr(y, f)
        assert a.dtype == b.dtype, (what, f)
        np.testing.assert_array_equal(a, b, err_msg=f"{what} {f}")
    assert (x.bits, x.group_size, x.axis, x.shape) == (y.bits, y.group_size, y.axis, y.shape)


def assert_same_contents(a, b):
    assert (a.batch_size, a.num_heads, a.head_dim) == (b.batch_size, b.num_heads, b.head_dim)
    assert (a.seq_length, a.num_quantized, a.num_residual, a.num_pending) == \
        (b.seq_length, b.num_quantized, b.num_residual, b.num_pending)
    assert len(a.blocks) == len(b.blocks)
    for i, (x, y) in enumerate(zip(a.blocks, b.blocks)):
        assert isinstance(x, KVQuantCacheBlock) and isinstance(y, KVQuantCacheBlock)
        assert (x.start, x.num_slots) == (y.start, y.num_slots), i
        np.testing.assert_array_equal(x.coded, y.coded, err_msg=f"block {i} coded")
        np.testing.assert_array_equal(x.rope_positions, y.rope_positions, err_msg=f"block {i} rope")
        np.testing.assert_array_equal(x.block.exclude, ~x.coded)
        assert_same_kvquant_tensor(x.keys, y.keys, f"block {i} keys")
        assert_same_kvquant_tensor(x.values, y.values, f"block {i} values")
    assert_same_full_precision(a, b)
    np.testing.assert_array_equal(a.residual_rope_positions, b.residual_rope_positions)


CONFIGS = {
    "nf_p0": kv_config(outlier_fraction=0.0),                    # no calibration needed
    "nf_p5": kv_config(),
    "kmeans": kv_config(kvquant_datatype="kmeans", key_bits=2, value_bits=4),
    "R0": kv_config(residual_length=0, key_bits=4, value_group_size=5),
    "capped": kv_config(max_preserved=2, value_group_size=16, outlier_fraction=0.1),
    "bits1": kv_config(key_bits=1, value_bits=1, key_group_size=3, residual_length=2),
}


def sink_flags(valid, where=(0, 1, 9, 17, 25)):
    preserve = np.zeros(valid.shape, dtype=bool)
    for p in where:
        if p < valid.shape[1]:
            preserve[:, p] = True
    return preserve & valid


def rotated_scenario(seed, t, pads, sinks=(1, 9), where=(0, 1, 9, 17, 25)):
    """One row per entry of ``pads`` (left padding): ``(k, v, valid, rope, preserve)``.

    :func:`pre_rope_tokens` keys rotated (:func:`post_rope`) at their rotary positions
    ``rope`` (:func:`rotary_positions`), values, validity, :func:`sink_flags` at ``where``.
    """
    b = len(pads)
    k_pre, v = pre_rope_tokens(seed, b=b, t=t, sinks=sinks)
    valid = left_padded(b, t, pads)
    rope = rotary_positions(valid)
    return post_rope(k_pre, rope), v, valid, rope, sink_flags(valid, where)


# --------------------------------------------------------------------------
# Theorem 6.11 with the kvquant quantizer
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n_prefill", [1, 11])
def test_streaming_equals_one_shot(name, n_prefill):
    config = CONFIGS[name]
    cal = calibration_for(config)
    b, t = 2, 37
    k, v, valid, rope, preserve = rotated_scenario(3, t, [0, 4])
    streamed = stream(config, k, v, preserve, valid, [n_prefill] + [1] * (t - n_prefill), rope=rope,
                      cal=cal)
    one_shot = quantize_sequence(k, v, preserve, valid, config, kvquant_calibration=cal,
                                 rope_inv_freq=INV, rope_positions=rope)
    assert one_shot.num_quantized == flushed_length(t, config) > 0
    assert_same_contents(streamed, one_shot)


def test_streaming_equals_one_shot_float16_storage_no_rope():
    config = CONFIGS["nf_p5"]
    cal = calibration_for(config)
    b, t = 2, 30
    k, v = pre_rope_tokens(4, t=t)
    valid = left_padded(b, t, [2, 0])
    preserve = sink_flags(valid)
    streamed = stream(config, k, v, preserve, valid, [3] + [1] * 27, dtype=np.float16, cal=cal, inv=None)
    one_shot = quantize_sequence(k, v, preserve, valid, config, dtype=np.float16,
                                 kvquant_calibration=cal)
    assert_same_contents(streamed, one_shot)
    # without rope_inv_freq the keys are quantized as given (stored float16, cast to float32)
    blk = streamed.blocks[0]
    want = quantize_block_kvquant(k[:, :, :4].astype(np.float16), v[:, :, :4].astype(np.float16), cal,
                                  config, exclude=~blk.coded)
    assert_same_kvquant_tensor(blk.keys, want.keys, "keys")


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_streaming_equals_one_shot_any_chunking(data):
    blk = data.draw(st.integers(1, 5), label="blk")
    config = kv_config(key_group_size=blk, value_group_size=data.draw(st.integers(1, 17)),
                       key_bits=data.draw(st.integers(1, 8)), value_bits=data.draw(st.integers(1, 8)),
                       residual_length=data.draw(st.integers(0, 6), label="R"),
                       outlier_fraction=data.draw(st.sampled_from([0.0, 0.02, 0.2])),
                       max_preserved=data.draw(st.one_of(st.none(), st.integers(0, 3)), label="cap"))
    cal = calibration_for(config, seed=data.draw(st.integers(0, 1000)))
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 24))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    k_pre = (rng.standard_normal((b, H, t, D)) * 3).astype(np.float32)
    v = rng.standard_normal((b, H, t, D)).astype(np.float32)
    valid = rng.random((b, t)) < 0.8
    preserve = (rng.random((b, t)) < 0.25) & valid
    rope = rng.integers(-1, 5000, size=(b, t))              # arbitrary; -1 only where allowed
    rope = np.where(valid, np.abs(rope), rope)
    k = apply_rope(k_pre, np.abs(rope)[:, None, :], INV)
    chunks, left = [], t
    while left:
        n = data.draw(st.integers(1, left), label="chunk")
        chunks.append(n)
        left -= n
    streamed = stream(config, k, v, preserve, valid, chunks, rope=rope, cal=cal)
    assert_same_contents(streamed, quantize_sequence(k, v, preserve, valid, config,
                                                     kvquant_calibration=cal, rope_inv_freq=INV,
                                                     rope_positions=rope))


# --------------------------------------------------------------------------
# Definition 6.21: a block is quantize_block_kvquant of the un-rotated stored keys
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_block_is_definition_6_21_with_rotary_positions(dtype):
    config = CONFIGS["nf_p5"]
    cal = calibration_for(config)
    b, t = 2, 30
    # the rotary positions differ from the slot positions in row 1 (left padding)
    k, v, valid, rope, preserve = rotated_scenario(5, t, [0, 3])
    layer = stream(config, k, v, preserve, valid, [7] + [1] * 23, rope=rope, dtype=dtype, cal=cal)
    assert len(layer.blocks) >= 5
    for blk in layer.blocks:
        sl = slice(blk.start, blk.start + blk.num_codes)
        np.testing.assert_array_equal(blk.rope_positions, np.where(valid[:, sl], rope[:, sl], 0))
        ks, vs = k[:, :, sl].astype(dtype), v[:, :, sl].astype(dtype)
        pre = unapply_rope(ks, blk.rope_positions[:, None, :], INV)
        want = quantize_block_kvquant(pre, vs, cal, config, exclude=~blk.coded)
        assert_same_kvquant_tensor(blk.keys, want.keys, "keys")
        assert_same_kvquant_tensor(blk.values, want.values, "values")
        # the slot positions would be wrong: row 1 is shifted by its 3 padding tokens
        wrong = unapply_rope(ks, (blk.start + np.arange(blk.num_codes))[None, None, :], INV)
        assert not np.allclose(wrong[1], pre[1], atol=1e-2)
    # segments() rotates back with the same positions
    kh = np.concatenate([blk.dequantize()[0] for blk in layer.blocks], axis=2)
    pre_h = np.concatenate([dequantize_block_kvquant(blk.block)[0] for blk in layer.blocks], axis=2)
    rope_q = np.concatenate([blk.rope_positions for blk in layer.blocks], axis=1)
    np.testing.assert_array_equal(layer.segments()[0][0], kh)
    np.testing.assert_array_equal(kh, apply_rope(pre_h, rope_q[:, None, :], INV))


def all_outlier_calibration(config, h=H, d=D):
    """Every key entry is an outlier (lower = +inf > x, upper = -inf < x): keys stored exactly."""
    return KVQuantCalibration(key_lower=np.full((h, d), np.inf, np.float32),
                              key_upper=np.full((h, d), -np.inf, np.float32),
                              key_levels=np.asarray(nf_calibration(config.replace(outlier_fraction=0), h, d)
                                                    .key_levels),
                              value_levels=nf_calibration(config.replace(outlier_fraction=0), h, d)
                              .value_levels,
                              datatype="nf", key_bits=config.key_bits, value_bits=config.value_bits,
                              outlier_fraction=float(config.outlier_fraction),
                              key_group_size=config.key_group_size,
                              value_group_size=config.value_group_size)


def test_rope_round_trip_within_docs08_bound():
    """With every key entry stored sparse (exactly), the only key error left is the rotation
    there and back: |k_hat - k| <= rope_roundtrip_bound(k) (8.1) for the post-RoPE keys, and the
    stored pre-RoPE keys are within the bound of the true pre-RoPE keys."""
    config = CONFIGS["nf_p5"]
    cal = all_outlier_calibration(config)
    b, t = 2, 40
    k_pre, v = pre_rope_tokens(6, t=t)
    k_pre *= np.float32(1000.0)                       # large angles and magnitudes
    valid = left_padded(b, t, [0, 5])
    rope = rotary_positions(valid) + 3000              # positions far from 0
    k = post_rope(k_pre, rope)
    layer = stream(config, k, v, np.zeros((b, t), bool), valid, [t], rope=rope, cal=cal)
    (qk, _, qpos), _, _ = layer.segments()
    live = qpos >= 0
    assert live.sum() > 30
    n = qk.shape[2]
    err = np.abs(qk.astype(np.float64) - k[:, :, :n])
    bound = rope_roundtrip_bound(k[:, :, :n])
    assert np.all(err[np.broadcast_to(live[:, None, :, None], err.shape)]
                  <= bound[np.broadcast_to(live[:, None, :, None], err.shape)])
    assert err.max() > 0                                  # a real round trip, not a copy
    pre_stored = np.concatenate([dequantize_block_kvquant(blk.block)[0] for blk in layer.blocks], axis=2)
    m = np.broadcast_to(live[:, None, :, None], pre_stored.shape)
    e2 = np.abs(pre_stored.astype(np.float64) - k_pre[:, :, :n])
    assert np.all(e2[m] <= rope_roundtrip_bound(k_pre[:, :, :n])[m])


# --------------------------------------------------------------------------
# preserved tokens and statistics
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_preserved_tokens_exact_and_out_of_statistics(dtype):
    config = CONFIGS["nf_p5"].replace(residual_length=0)
    cal = calibration_for(config)
    b, t = 2, 24
    k, v, valid, rope, preserve = rotated_scenario(7, t, [0, 2], sinks=(0, 9), where=(0, 2, 9))
    layer = stream(config, k, v, preserve, valid, [3] + [1] * 21, rope=rope, dtype=dtype, cal=cal)
    assert layer.num_residual == 0
    (qk, qv, qpos), (pk, pv, ppos), _ = layer.segments()
    for row in range(b):
        expected = np.flatnonzero(preserve[row])
        np.testing.assert_array_equal(layer.preserved_positions()[row], expected)
        # the post-RoPE keys as given (one cast to dtype): never rotated back and forth
        np.testing.assert_array_equal(pk[row, :, :len(expected)], k[row][:, expected].astype(dtype))
        np.testing.assert_array_equal(pv[row, :, :len(expected)], v[row][:, expected].astype(dtype))
        np.testing.assert_array_equal(qpos[row] == -1, preserve[row] | ~valid[row])
    # huge preserved/padding entries change nothing in the blocks
    k2, v2 = k.copy(), v.copy()
    hidden = preserve | ~valid
    k2[np.broadcast_to(hidden[:, None, :, None], k.shape)] = 5e4
    v2[np.broadcast_to(hidden[:, None, :, None], v.shape)] = -5e4
    other = stream(config, k2, v2, preserve, valid, [t], rope=rope, dtype=dtype, cal=cal)
    for x, y in zip(layer.blocks, other.blocks):
        assert_same_kvquant_tensor(x.keys, y.keys, "keys")
        assert_same_kvquant_tensor(x.values, y.values, "values")
        # excluded slots: neutral code 0 and never an outlier
        ex = np.broadcast_to(~x.coded[:, None, :, None], x.keys.shape)
        assert np.all(x.keys.codes[ex] == 0) and np.all(x.values.codes[ex] == 0)
        for qt in (x.keys, x.values):
            flat = np.zeros(int(np.prod(qt.shape)), bool)
            flat[qt.outlier_index] = True
            assert not np.any(flat.reshape(qt.shape)[ex])


def test_attend_equals_attention_over_segments():
    config = CONFIGS["kmeans"]
    cal = calibration_for(config)
    b, t = 2, 33
    k, v, valid, rope, preserve = rotated_scenario(8, t, [0, 4])
    layer = stream(config, k, v, preserve, valid, [9] + [1] * 24, rope=rope, cal=cal)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, 4, 2, D)).astype(np.float32)
    qp = np.array([[31, 32], [31, 32]])
    np.testing.assert_array_equal(layer.attend(q, qp),
                                  split_attention(q, layer.segments(), query_positions=qp))
    # and the quantized keys are close to the true post-RoPE keys (3-bit quantization error)
    (qk, _, qpos), _, _ = layer.segments()
    live = np.broadcast_to((qpos >= 0)[:, None, :, None], qk.shape)
    assert np.abs(qk - k[:, :, :qk.shape[2]])[live].mean() < 0.5


# --------------------------------------------------------------------------
# crop, reorder, select_batch, reset
# --------------------------------------------------------------------------

def test_crop_then_continue_requantizes_nothing():
    config = CONFIGS["nf_p5"]
    cal = calibration_for(config)
    b, t = 2, 40
    k, v, valid, rope, preserve = rotated_scenario(9, t, [0, 3])
    layer = stream(config, k, v, preserve, valid, [30], rope=rope, cal=cal)
    before = list(layer.blocks)
    layer.crop(14)                                  # inside block [12, 16)
    assert layer.seq_length == 14 and layer.num_residual == 0
    assert [blk.start for blk in layer.blocks] == [0, 4, 8, 12]
    assert layer.blocks[-1].num_slots == 2
    for x, y in zip(layer.blocks, before):
        assert x.block is y.block                   # same codes, nothing re-quantized
    assert np.all(layer.segments()[0][2][:, 14:] == -1)
    assert all(np.all(p < 14) for p in layer.preserved_positions())
    # continue at position 14 with other tokens: blocks start at 14 + 4j, rotary positions kept
    k2_pre, v2 = pre_rope_tokens(10, t=t)
    rope2 = rope.copy()
    k2 = post_rope(k2_pre, rope2)
    stream(config, k2, v2, preserve, valid, [10, 1, 1, 1], rope=rope2, layer=layer)
    assert [blk.start for blk in layer.blocks][4:] == [14, 18]
    blk = layer.blocks[4]
    np.testing.assert_array_equal(blk.rope_positions, np.where(valid[:, 14:18], rope2[:, 14:18], 0))
    want = quantize_block_kvquant_cache(k2[:, :, 14:18], v2[:, :, 14:18], blk.coded,
                                        blk.rope_positions, cal, INV, config)
    assert_same_kvquant_tensor(blk.keys, want.keys, "keys")
    np.testing.assert_array_equal(layer.residual_rope_positions,
                                  np.where(valid[:, 22:27], rope2[:, 22:27], 0))


@pytest.mark.parametrize("rows", [[1, 0], [1], [1, 1, 0]])
def test_select_batch_and_reorder_equal_fresh_cache_of_rows(rows):
    config = CONFIGS["capped"]
    cal = calibration_for(config)
    b, t = 2, 31
    k, v, valid, rope, preserve = rotated_scenario(11, t, [0, 3])
    layer = stream(config, k, v, preserve, valid, [6] + [1] * 14, rope=rope, cal=cal)
    if len(rows) == b:
        layer.reorder(np.array(rows))
    else:
        layer.select_batch(np.array(rows))
    stream(config, k[rows], v[rows], preserve[rows], valid[rows], [1] * 11, rope=rope[rows], layer=layer)
    fresh = stream(config, k[rows], v[rows], preserve[rows], valid[rows], [6] + [1] * 25,
                   rope=rope[rows], cal=cal)
    assert_same_contents(layer, fresh)
    assert layer.nbytes() == fresh.nbytes()


def test_reset_forgets_shapes_and_nf_calibration():
    config = CONFIGS["nf_p0"]
    layer = QuantizedKVCacheLayer(config, rope_inv_freq=INV)
    k, v = pre_rope_tokens(12, b=1, t=12)
    layer.update(k, v)
    assert layer.kvquant_calibration.key_lower.shape == (H, D)
    layer.reset()
    assert layer.nbytes() == 0 and layer.kvquant_calibration is None
    layer2 = QuantizedKVCacheLayer(config)                      # no rope: any D
    k3 = np.ones((1, 3, 5, 7), np.float32)
    layer2.update(k3, k3)
    assert layer2.kvquant_calibration.key_lower.shape == (3, 7)


# --------------------------------------------------------------------------
# Definition 6.22: bytes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nbytes_formula(name, dtype):
    config = CONFIGS[name]
    cal = calibration_for(config)
    b, t = 2, 35
    k, v, valid, rope, preserve = rotated_scenario(13, t, [0, 2])
    layer = stream(config, k, v, preserve, valid, [5] + [1] * 30, rope=rope, dtype=dtype, cal=cal)
    s = np.dtype(dtype).itemsize
    n = config.token_block
    want = 0
    for blk in layer.blocks:
        kk, vv = blk.keys.num_outliers, blk.values.num_outliers
        want += 4 * b * H * n * packed_length(D, config.key_bits) + 2 * 4 * b * H * 1 * D + 8 * kk
        want += (4 * b * H * n * packed_length(D, config.value_bits)
                 + 2 * 4 * b * H * n * math.ceil(D / config.value_group_size) + 8 * vv)
        want += b * n + 4 * b * n                                  # coded + int32 rotary positions
    p = max(len(x) for x in layer.preserved_positions())
    r = layer.num_residual
    want += 2 * b * H * p * D * s + 8 * b * p
    want += 2 * b * H * r * D * s + b * r + b * r + 4 * b * r
    want += 4 * 2 * H * D                                          # calibration: thresholds
    if config.kvquant_datatype == "kmeans":
        want += 4 * (H * D * 2 ** config.key_bits + H * 2 ** config.value_bits)
    assert layer.nbytes() == want
    assert sum(blk.nbytes for blk in layer.blocks) > 0
    assert QuantizedKVCacheLayer(config, kvquant_calibration=cal).nbytes() == 0


def test_nbytes_smollm2_example():
    """The worked example of definition 6.22 (SmolLM2 layer, 2-bit nf, p = 0, T = 1024)."""
    config = KVSinkConfig(quantizer="kvquant", key_bits=2, value_bits=2, key_group_size=32,
                          value_group_size=64, residual_length=128, outlier_fraction=0.0)
    b, h, d, t = 1, 3, 64, 1024
    rng = np.random.default_rng(0)
    k = rng.standard_normal((b, h, t, d)).astype(np.float32)
    preserve = np.zeros((b, t), bool)
    preserve[0, 0] = True
    layer = quantize_sequence(k, k, preserve, None, config, dtype=np.float16,
                              rope_inv_freq=rope_inv_freq(d))
    assert layer.nbytes() == 256_392


# --------------------------------------------------------------------------
# errors and the multi-layer cache
# --------------------------------------------------------------------------

def test_errors():
    with pytest.raises(ValueError, match="kvquant_calibration"):
        QuantizedKVCacheLayer(kv_config())                              # p > 0 needs calibration
    with pytest.raises(ValueError, match="kvquant_calibration"):
        QuantizedKVCacheLayer(kv_config(outlier_fraction=0.0, kvquant_datatype="kmeans"))
    with pytest.raises(ValueError, match="channel"):
        QuantizedKVCacheLayer(kv_config(key_axis="token", outlier_fraction=0.0))
    cal = calibration_for(kv_config())
    with pytest.raises(ValueError, match="key_bits"):
        QuantizedKVCacheLayer(kv_config(key_bits=4), kvquant_calibration=cal)
    with pytest.raises(TypeError, match="kvquant_calibration"):
        QuantizedKVCacheLayer(kv_config(), kvquant_calibration={"a": 1})
    with pytest.raises(ValueError, match="kvquant"):
        QuantizedKVCacheLayer(KVSinkConfig(), kvquant_calibration=cal)
    with pytest.raises(ValueError, match="rope_inv_freq"):
        QuantizedKVCacheLayer(KVSinkConfig(), rope_inv_freq=INV)
    with pytest.raises(TypeError, match="rope_inv_freq"):
        QuantizedKVCacheLayer(kv_config(), kvquant_calibration=cal, rope_inv_freq=np.arange(8))
    k, v = pre_rope_tokens(0, b=1, t=3)
    uniform = QuantizedKVCacheLayer(KVSinkConfig())
    with pytest.raises(ValueError, match="rope_positions"):
        uniform.update(k, v, rope_positions=np.zeros((1, 3), int))
    layer = QuantizedKVCacheLayer(kv_config(), kvquant_calibration=cal, rope_inv_freq=INV)
    with pytest.raises(ValueError, match="rope_positions"):
        layer.update(k, v, rope_positions=np.zeros((1, 2), int))
    with pytest.raises(TypeError, match="rope_positions"):
        layer.update(k, v, rope_positions=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="rope_positions"):
        layer.update(k, v, rope_positions=np.array([[0, -1, 2]]))
    with pytest.raises(ValueError, match="rope_positions"):
        layer.update(k, v, rope_positions=np.array([[0, 1, 2 ** 24]]))
    assert layer.seq_length == 0                                         # nothing changed
    # -1 at a padding slot is fine (stored as 0)
    layer.update(k, v, valid=np.array([[False, True, True]]), rope_positions=np.array([[-1, 0, 1]]))
    np.testing.assert_array_equal(layer.residual_rope_positions, [[0, 0, 1]])
    bad_h = np.ones((1, 3, 2, D), np.float32)
    fresh = QuantizedKVCacheLayer(kv_config(), kvquant_calibration=cal, rope_inv_freq=INV)
    with pytest.raises(ValueError, match="calibration"):
        fresh.update(bad_h, bad_h)                                       # H = 3, calibrated for 2
    wrong_d = QuantizedKVCacheLayer(kv_config(outlier_fraction=0.0), rope_inv_freq=rope_inv_freq(8))
    with pytest.raises(ValueError, match="rope_inv_freq"):
        wrong_d.update(k, v)
    assert wrong_d.seq_length == 0 and wrong_d.batch_size is None
    with pytest.raises(ValueError, match="rope_positions"):
        quantize_sequence(k, v, np.zeros((1, 3), bool), None, KVSinkConfig(),
                          rope_positions=np.zeros((1, 3), int))
    with pytest.raises(AttributeError, match="rope"):
        uniform.update(k, v)
        uniform.residual_rope_positions


def test_multi_layer_cache():
    config = CONFIGS["nf_p5"]
    cals = [calibration_for(config, seed=s) for s in (1, 2)]
    cache = QuantizedKVCache(config, 2, kvquant_calibration=cals, rope_inv_freq=INV)
    with pytest.raises(ValueError, match="per layer"):
        QuantizedKVCache(config, 3, kvquant_calibration=cals)
    b, t = 2, 20
    k_pre, v = pre_rope_tokens(14, t=t)
    valid = left_padded(b, t, [0, 2])
    rope = rotary_positions(valid)
    k = post_rope(k_pre, rope)
    for i in range(2):
        cache.update(i, k * (i + 1), v, valid, rope)
    cache.resolve(sink_flags(valid))
    assert cache.flush() == 2 * (flushed_length(t, config) // 4)
    for i in range(2):
        one = quantize_sequence(k * (i + 1), v, sink_flags(valid), valid, config,
                                kvquant_calibration=cals[i], rope_inv_freq=INV, rope_positions=rope)
        assert_same_contents(cache[i], one)
    assert cache.nbytes() == sum(cache[i].nbytes() for i in range(2))
