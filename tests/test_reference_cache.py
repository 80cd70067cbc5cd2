"""The reference quantized KV cache (reference/cache.py, docs/06-cache.md)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.attention import attention
from reference.cache import (
    QuantizedKVCache,
    QuantizedKVCacheLayer,
    admit_preserved,
    flushed_length,
    quantize_block,
    quantize_sequence,
)
from reference.config import KVSinkConfig
from reference.packing import codes_per_word
from reference.preserve import cap_preserved
from reference.quantize import dequantize, quantize


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def tokens(seed, b=2, h=2, t=40, d=16, sinks=(), sink_value=400.0):
    """Random keys/values; tokens in ``sinks`` get a huge channel 3 (an attention-sink-like outlier)."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((b, h, t, d)).astype(np.float32)
    v = rng.standard_normal((b, h, t, d)).astype(np.float32)
    for s in sinks:
        k[:, :, s, 3] = sink_value
        v[:, :, s, 5] = -sink_value
    return k, v


def left_padded(b, t, pads):
    """valid (B, T) with ``pads[i]`` padding slots at the start of row ``i``."""
    valid = np.ones((b, t), dtype=bool)
    for row, p in enumerate(pads):
        valid[row, :p] = False
    return valid


def stream(config, k, v, preserve, valid, chunks, dtype=np.float32, layer=None):
    """Feed the tokens in consecutive chunks of the given sizes; resolve and flush after each."""
    if layer is None:
        layer = QuantizedKVCacheLayer(config, dtype=dtype)
    t0 = layer.seq_length
    for n in chunks:
        sl = slice(t0, t0 + n)
        layer.update(k[:, :, sl], v[:, :, sl], valid[:, sl])
        layer.resolve(preserve[:, sl])
        layer.flush()
        t0 += n
    return layer


def prefill_then_decode(n_prefill, total):
    return [n_prefill] + [1] * (total - n_prefill)


def assert_same_full_precision(a, b):
    """The preserved stores and the residual windows of two layers: same dtypes, identical."""
    for x, y, name in zip(a.preserved, b.preserved, ("positions", "keys", "values")):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg=f"preserved {name}")
    for x, y, name in zip(a.residual, b.residual, ("keys", "values", "valid", "preserve")):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg=f"residual {name}")


def assert_same_contents(a: QuantizedKVCacheLayer, b: QuantizedKVCacheLayer):
    assert (a.batch_size, a.num_heads, a.head_dim) == (b.batch_size, b.num_heads, b.head_dim)
    assert a.seq_length == b.seq_length
    assert a.num_quantized == b.num_quantized and a.num_residual == b.num_residual
    assert a.num_pending == b.num_pending
    assert len(a.blocks) == len(b.blocks)
    for i, (x, y) in enumerate(zip(a.blocks, b.blocks)):
        assert x.start == y.start, i
        np.testing.assert_array_equal(x.coded, y.coded, err_msg=f"block {i} coded")
        for side in ("keys", "values"):
            px, py = getattr(x, side), getattr(y, side)
            assert px.words.dtype == np.uint32
            np.testing.assert_array_equal(px.words, py.words, err_msg=f"block {i} {side} codes")
            np.testing.assert_array_equal(px.scale, py.scale, err_msg=f"block {i} {side} scale")
            if px.zero is None:
                assert py.zero is None
            else:
                np.testing.assert_array_equal(px.zero, py.zero, err_msg=f"block {i} {side} zero")
            assert (px.bits, px.group_size, px.axis, px.symmetric, px.shape) == \
                (py.bits, py.group_size, py.axis, py.symmetric, py.shape)
    assert_same_full_precision(a, b)
    for pa, pb in zip(a.preserved_positions(), b.preserved_positions()):
        np.testing.assert_array_equal(pa, pb)


CONFIGS = {
    # KIVI layout: keys per channel (block = 4 tokens), values per token; R not a multiple of blk
    "kivi_R6": KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=8,
                            residual_length=6),
    "kivi_R0": KVSinkConfig(key_bits=4, value_bits=2, key_group_size=4, value_group_size=16,
                            residual_length=0),
    # both per token: block of 1 token; value group 5 does not divide D = 16 (partial last group)
    "per_token": KVSinkConfig(key_axis="token", value_axis="token", key_group_size=8,
                              value_group_size=5, key_bits=3, value_bits=4, residual_length=3),
    "per_token_R0": KVSinkConfig(key_axis="token", value_axis="token", key_group_size=16,
                                 value_group_size=16, residual_length=0),
    "symmetric": KVSinkConfig(scheme="symmetric", key_bits=3, value_bits=2, key_group_size=4,
                              value_group_size=8, residual_length=5),
    "both_channel": KVSinkConfig(key_axis="channel", value_axis="channel", key_group_size=3,
                                 value_group_size=3, residual_length=4),
    "values_channel": KVSinkConfig(key_axis="token", value_axis="channel", key_group_size=16,
                                   value_group_size=5, residual_length=2),
    "capped": KVSinkConfig(key_group_size=4, value_group_size=8, residual_length=3,
                           max_preserved=2),
    "cap0": KVSinkConfig(key_group_size=4, value_group_size=8, residual_length=3,
                         max_preserved=0),
}


def sink_flags(b, t, valid, where=(0, 1, 9, 17, 25)):
    preserve = np.zeros((b, t), dtype=bool)
    for p in where:
        if p < t:
            preserve[:, p] = True
    return preserve & valid


# --------------------------------------------------------------------------
# Theorem 6.11: streaming == one-shot
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n_prefill", [1, 7, 23])
def test_streaming_equals_one_shot(name, n_prefill):
    config = CONFIGS[name]
    b, t = 2, 37
    k, v = tokens(1, b=b, t=t, sinks=(1, 9, 25))
    valid = left_padded(b, t, [0, 4])
    preserve = sink_flags(b, t, valid)
    streamed = stream(config, k, v, preserve, valid, prefill_then_decode(n_prefill, t))
    one_shot = quantize_sequence(k, v, preserve, valid, config)
    assert one_shot.num_quantized == flushed_length(t, config)
    assert_same_contents(streamed, one_shot)


@pytest.mark.parametrize("bits", range(1, 9))
def test_streaming_equals_one_shot_every_bit_width(bits):
    config = KVSinkConfig(key_bits=bits, value_bits=9 - bits, key_group_size=4,
                          value_group_size=16, residual_length=5)
    b, t = 2, 30
    k, v = tokens(bits, b=b, t=t, sinks=(0, 11))
    valid = left_padded(b, t, [3, 0])
    preserve = sink_flags(b, t, valid, where=(0, 3, 11))
    streamed = stream(config, k, v, preserve, valid, prefill_then_decode(5, t))
    assert_same_contents(streamed, quantize_sequence(k, v, preserve, valid, config))


@pytest.mark.parametrize("bits", range(2, 9))
def test_streaming_equals_one_shot_symmetric(bits):
    config = KVSinkConfig(scheme="symmetric", key_bits=bits, value_bits=bits,
                          key_axis="token", value_axis="channel", key_group_size=7,
                          value_group_size=4, residual_length=6)
    b, t = 2, 29
    k, v = tokens(10 + bits, b=b, t=t, sinks=(2,))
    valid = left_padded(b, t, [0, 2])
    preserve = sink_flags(b, t, valid, where=(2, 13))
    streamed = stream(config, k, v, preserve, valid, prefill_then_decode(9, t))
    assert_same_contents(streamed, quantize_sequence(k, v, preserve, valid, config))


def test_streaming_equals_one_shot_float16_storage():
    config = CONFIGS["kivi_R6"]
    b, t = 2, 33
    k, v = tokens(3, b=b, t=t, sinks=(0,))
    k64, v64 = k.astype(np.float64) * 1.1, v.astype(np.float64) / 3   # float64 inputs
    valid = left_padded(b, t, [0, 5])
    preserve = sink_flags(b, t, valid)
    streamed = stream(config, k64, v64, preserve, valid, prefill_then_decode(4, t),
                      dtype=np.float16)
    one_shot = quantize_sequence(k64, v64, preserve, valid, config, dtype=np.float16)
    assert_same_contents(streamed, one_shot)
    pk = streamed.preserved[1]
    assert pk.dtype == np.float16 and streamed.residual[0].dtype == np.float16
    # stored = one round-to-nearest cast of the input to float16
    np.testing.assert_array_equal(streamed.residual[0], k64[:, :, streamed.num_quantized:].astype(np.float16))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_streaming_equals_one_shot_any_chunking(data):
    """Any update sizes, any padding pattern, any statuses: same contents as one shot."""
    key_axis = data.draw(st.sampled_from(["channel", "token"]), label="key_axis")
    value_axis = data.draw(st.sampled_from(["channel", "token"]), label="value_axis")
    blk = data.draw(st.integers(1, 5), label="blk")
    symmetric = data.draw(st.booleans(), label="symmetric")
    lo = 2 if symmetric else 1
    config = KVSinkConfig(
        key_axis=key_axis, value_axis=value_axis,
        key_group_size=blk if key_axis == "channel" else data.draw(st.integers(1, 9)),
        value_group_size=blk if value_axis == "channel" else data.draw(st.integers(1, 9)),
        key_bits=data.draw(st.integers(lo, 8)), value_bits=data.draw(st.integers(lo, 8)),
        scheme="symmetric" if symmetric else "asymmetric",
        residual_length=data.draw(st.integers(0, 7), label="R"),
        max_preserved=data.draw(st.one_of(st.none(), st.integers(0, 4)), label="cap"))
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 24))
    d = data.draw(st.integers(1, 9))
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((b, 2, t, d)).astype(np.float32) * 3
    v = rng.standard_normal((b, 2, t, d)).astype(np.float32)
    valid = rng.random((b, t)) < 0.8
    preserve = (rng.random((b, t)) < 0.25) & valid
    chunks, left = [], t
    while left:
        n = data.draw(st.integers(1, left), label="chunk")
        chunks.append(n)
        left -= n
    streamed = stream(config, k, v, preserve, valid, chunks)
    assert_same_contents(streamed, quantize_sequence(k, v, preserve, valid, config))


def test_flushed_length_and_residual_window():
    c = KVSinkConfig(key_group_size=4, value_group_size=4, residual_length=6)
    assert [flushed_length(t, c) for t in range(0, 16)] == \
        [0] * 10 + [4, 4, 4, 4, 8, 8]
    c0 = KVSinkConfig(key_axis="token", value_axis="token", residual_length=0)
    assert [flushed_length(t, c0) for t in range(5)] == [0, 1, 2, 3, 4]
    # the streamed residual stays in [R, R + blk) once the sequence is long enough
    k, v = tokens(0, b=1, t=30)
    valid = np.ones((1, 30), bool)
    layer = QuantizedKVCacheLayer(c)
    for i in range(30):
        stream(c, k, v, np.zeros((1, 30), bool), valid, [1], layer=layer)
        n = i + 1
        assert layer.num_residual == n - flushed_length(n, c)
        assert (layer.num_residual < 6 + 4) and (n < 6 or layer.num_residual >= 6)
        assert layer.num_quantized % 4 == 0


def test_every_valid_token_stored_exactly_once():
    config = CONFIGS["capped"]
    b, t = 2, 31
    k, v = tokens(5, b=b, t=t)
    valid = left_padded(b, t, [0, 3])
    preserve = sink_flags(b, t, valid)
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(6, t))
    positions = np.concatenate([seg[2] for seg in layer.segments()], axis=1)
    for row in range(b):
        seen = positions[row][positions[row] >= 0]
        np.testing.assert_array_equal(np.sort(seen), np.flatnonzero(valid[row]))


# --------------------------------------------------------------------------
# Definitions 6.6 / 6.9: the preserved store and the statistics
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_preserved_tokens_come_back_bit_exact(dtype):
    config = CONFIGS["kivi_R0"]
    b, t = 2, 24
    k, v = tokens(7, b=b, t=t, sinks=(0, 9))
    valid = left_padded(b, t, [0, 2])
    preserve = sink_flags(b, t, valid, where=(0, 2, 9))
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(3, t), dtype=dtype)
    assert layer.num_residual == 0                     # R = 0, t multiple of blk: all flushed
    (qk, qv, qpos), (pk, pv, ppos), (rk, rv, rpos) = layer.segments()
    for row in range(b):
        expected = np.flatnonzero(preserve[row])
        np.testing.assert_array_equal(layer.preserved_positions()[row], expected)
        n = len(expected)
        np.testing.assert_array_equal(ppos[row, :n], expected)
        assert np.all(ppos[row, n:] == -1)
        np.testing.assert_array_equal(pk[row, :, :n], k[row][:, expected].astype(dtype))
        np.testing.assert_array_equal(pv[row, :, :n], v[row][:, expected].astype(dtype))
        # in the quantized segment the preserved and padding slots are empty (-1)
        hidden = preserve[row] | ~valid[row]
        np.testing.assert_array_equal(qpos[row] == -1, hidden)
        np.testing.assert_array_equal(qpos[row][~hidden], np.flatnonzero(~hidden))


@pytest.mark.parametrize("name", ["kivi_R6", "per_token", "symmetric", "both_channel",
                                  "values_channel"])
def test_preserved_and_padding_leave_statistics(name):
    """A block's codes/scales are those of the block without its preserved and padding tokens."""
    config = CONFIGS[name]
    b, t = 2, 30
    k, v = tokens(11, b=b, t=t, sinks=(1, 9, 17))
    valid = left_padded(b, t, [0, 3])
    preserve = sink_flags(b, t, valid)
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(8, t))
    sym = config.scheme == "symmetric"
    for blk in layer.blocks:
        n = blk.num_slots
        sl = slice(blk.start, blk.start + n)
        for side, x, bits, g, axis in (("keys", k, config.key_bits, config.key_group_size, config.key_axis),
                                       ("values", v, config.value_bits, config.value_group_size,
                                        config.value_axis)):
            qt = getattr(blk, side).unpack()
            deq = dequantize(qt)
            for row in range(b):
                keep = np.flatnonzero(blk.coded[row])
                if keep.size == 0:
                    continue
                alone = x[row:row + 1, :, sl][:, :, keep]       # (1, H, m, D): the coded tokens only
                # on axis "channel" the whole block is one group: so are the coded tokens alone
                ref = quantize(alone, bits, len(keep) if axis == "channel" else g, axis,
                               symmetric=sym)
                np.testing.assert_array_equal(qt.codes[row][:, keep], ref.codes[0])
                np.testing.assert_array_equal(deq[row][:, keep], dequantize(ref)[0])
                if axis == "channel":
                    np.testing.assert_array_equal(qt.scale[row][:, 0], ref.scale[0][:, 0])
                else:
                    np.testing.assert_array_equal(qt.scale[row][:, keep], ref.scale[0])


def test_sink_outlier_does_not_inflate_scale():
    """With the sink quantized (no preservation) the block scale is ~100x larger."""
    base = KVSinkConfig(key_group_size=4, value_group_size=4, residual_length=0)
    k, v = tokens(2, b=1, t=8, sinks=(1,))
    valid = np.ones((1, 8), bool)
    keep_sink = np.zeros((1, 8), bool)
    keep_sink[0, 1] = True
    pres = quantize_sequence(k, v, keep_sink, valid, base)
    nopres = quantize_sequence(k, v, np.zeros_like(keep_sink), valid, base)
    s_pres = pres.blocks[0].keys.scale[0, :, 0, 3]
    s_nopres = nopres.blocks[0].keys.scale[0, :, 0, 3]
    assert np.all(s_nopres > 50 * s_pres)
    # the other block is identical either way
    np.testing.assert_array_equal(pres.blocks[1].keys.words, nopres.blocks[1].keys.words)


def test_cap_keeps_earliest_and_quantizes_the_rest():
    config = CONFIGS["capped"]                                 # max_preserved = 2
    b, t = 2, 28
    k, v = tokens(4, b=b, t=t)
    valid = left_padded(b, t, [0, 1])
    preserve = sink_flags(b, t, valid, where=(0, 1, 5, 9, 17))
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(2, t))
    f = layer.num_quantized
    capped = cap_preserved(preserve[:, :f], 2)
    for row in range(b):
        np.testing.assert_array_equal(layer.preserved_positions()[row], np.flatnonzero(capped[row]))
        assert len(layer.preserved_positions()[row]) == 2
    # over-the-cap flagged tokens are quantized like the others (their slots are coded)
    coded = np.concatenate([blk.coded for blk in layer.blocks], axis=1)
    np.testing.assert_array_equal(coded, valid[:, :f] & ~capped)
    assert coded[0, 5] and coded[0, 9] and not coded[0, 0]


def test_admit_preserved_counts_what_a_row_holds():
    flags = np.array([[True, False, True, True], [True, True, False, False]])
    held = np.array([1, 0])
    np.testing.assert_array_equal(admit_preserved(flags, held, 2),
                                  [[True, False, False, False], [True, True, False, False]])
    np.testing.assert_array_equal(admit_preserved(flags, held, None), flags)
    np.testing.assert_array_equal(admit_preserved(flags, held, 0), np.zeros_like(flags))


def test_preserve_on_padding_rejected():
    config = CONFIGS["kivi_R6"]
    layer = QuantizedKVCacheLayer(config)
    k, v = tokens(0, b=2, t=5)
    valid = left_padded(2, 5, [0, 2])
    layer.update(k, v, valid)
    bad = np.zeros((2, 5), bool)
    bad[1, 0] = True
    with pytest.raises(ValueError, match="padding"):
        layer.resolve(bad)
    assert layer.num_pending == 5
    with pytest.raises(ValueError, match="padding"):
        quantize_sequence(k, v, bad, valid, config)


# --------------------------------------------------------------------------
# Definition 6.3: flush needs resolved statuses
# --------------------------------------------------------------------------

def test_flush_with_pending_tokens_raises_and_changes_nothing():
    config = KVSinkConfig(key_group_size=4, value_group_size=4, residual_length=2)
    k, v = tokens(0, b=1, t=12)
    layer = QuantizedKVCacheLayer(config)
    layer.update(k[:, :, :3], v[:, :, :3])
    assert layer.flush() == 0                         # 3 < R + blk: nothing to flush, pending is fine
    layer.update(k[:, :, 3:8], v[:, :, 3:8])
    before = layer.nbytes()
    with pytest.raises(RuntimeError, match=r"resolve\(\) the status of tokens before flushing"):
        layer.flush()
    assert layer.num_quantized == 0 and layer.num_pending == 8 and layer.nbytes() == before
    layer.resolve(np.zeros((1, 8), bool))
    assert layer.flush() == 1 and layer.num_quantized == 4 and layer.num_residual == 4
    # pending tokens that stay in the residual do not block a flush
    layer.update(k[:, :, 8:10], v[:, :, 8:10])      # residual 6, pending the last 2
    layer.update(k[:, :, 10:12], v[:, :, 10:12])    # residual 8, pending the last 4: block 4..7 resolved
    assert layer.flush() == 1 and layer.num_pending == 4


def test_resolve_shape_and_dtype():
    layer = QuantizedKVCacheLayer(CONFIGS["kivi_R6"])
    with pytest.raises(RuntimeError):
        layer.resolve(np.zeros((1, 0), bool))
    k, v = tokens(0, b=2, t=3)
    layer.update(k, v)
    with pytest.raises(ValueError, match="preserve"):
        layer.resolve(np.zeros((2, 2), bool))
    with pytest.raises(TypeError, match="preserve"):
        layer.resolve(np.zeros((2, 3), int))
    layer.resolve(np.zeros((2, 3), bool))
    layer.resolve(np.zeros((2, 0), bool))             # nothing pending: an empty status is fine


# --------------------------------------------------------------------------
# Definition 6.12 / 6.13: segments and attention
# --------------------------------------------------------------------------

def dequantized_cache_by_hand(config, k, v, preserve, valid, dtype=np.float32):
    """Keys, values (B, H, T, D) float64 and positions of the cache, built token by token."""
    b, h, t, d = k.shape
    f = flushed_length(t, config)
    kept = cap_preserved(preserve[:, :f], config.max_preserved)
    ks, vs = k.astype(dtype).astype(np.float64), v.astype(dtype).astype(np.float64)
    blk = config.token_block
    sym = config.scheme == "symmetric"
    for j in range(0, f, blk):
        sl = slice(j, j + blk)
        exclude = np.broadcast_to((~valid[:, sl] | kept[:, sl])[:, None, :], (b, h, blk))
        for x, bits, g, axis in ((ks, config.key_bits, config.key_group_size, config.key_axis),
                                 (vs, config.value_bits, config.value_group_size, config.value_axis)):
            deq = dequantize(quantize(x[:, :, sl].astype(dtype), bits, g, axis, symmetric=sym,
                                      exclude=exclude))
            x[:, :, sl] = np.where(exclude[..., None], x[:, :, sl], deq)
    positions = np.where(valid, np.arange(t)[None, :], -1)
    return ks, vs, positions


@pytest.mark.parametrize("name", ["kivi_R6", "per_token", "symmetric", "capped"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attend_equals_attention_over_dequantized_cache(name, dtype):
    config = CONFIGS[name]
    b, h, hq, t, d = 2, 2, 6, 33, 16
    k, v = tokens(21, b=b, h=h, t=t, d=d, sinks=(1, 17), sink_value=20.0)
    valid = left_padded(b, t, [0, 4])
    preserve = sink_flags(b, t, valid)
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(12, t), dtype=dtype)
    rng = np.random.default_rng(0)
    query = rng.standard_normal((b, hq, 3, d))
    qpos = np.array([[20, 31, 32], [4, 25, 32]])
    got = layer.attend(query, qpos)
    kk, vv, pos = dequantized_cache_by_hand(config, k, v, preserve, valid, dtype)
    want = attention(query, kk, vv, query_positions=qpos, key_positions=pos)
    # split vs direct attention differ only by float64 rounding (docs/05-attention.md §5.7)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # and the cache differs from the unquantized one (the test is not vacuous)
    exact = attention(query, k.astype(np.float64), v.astype(np.float64), query_positions=qpos,
                      key_positions=pos)
    assert np.max(np.abs(exact - got)) > 1e-3


def test_segments_layout_and_empty_cache():
    config = CONFIGS["kivi_R6"]
    layer = QuantizedKVCacheLayer(config)
    assert layer.segments() == [] and layer.seq_length == 0 and layer.nbytes() == 0
    out = layer.attend(np.ones((1, 2, 1, 4)), np.zeros((1, 1), int))
    np.testing.assert_array_equal(out, 0)
    k, v = tokens(0, b=1, h=2, t=3, d=4)
    layer.update(k, v)
    segs = layer.segments()
    assert [s[0].shape for s in segs] == [(1, 2, 0, 4), (1, 2, 0, 4), (1, 2, 3, 4)]
    assert [s[2].shape for s in segs] == [(1, 0), (1, 0), (1, 3)]
    np.testing.assert_array_equal(segs[2][2], [[0, 1, 2]])
    assert segs[0][0].dtype == np.float32 and segs[2][2].dtype == np.int64


# --------------------------------------------------------------------------
# Definition 6.14: crop
# --------------------------------------------------------------------------

def snapshot(layer):
    return [(blk.start, blk.keys.words.copy(), blk.keys.scale.copy(), blk.values.words.copy(),
             blk.values.scale.copy()) for blk in layer.blocks]


def test_crop_then_continue_requantizes_nothing():
    config = KVSinkConfig(key_group_size=4, value_group_size=8, residual_length=3)
    b, t = 2, 40
    k, v = tokens(9, b=b, t=t, sinks=(1, 13))
    valid = left_padded(b, t, [0, 2])
    preserve = sink_flags(b, t, valid, where=(1, 13, 22))
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(6, 30))
    assert layer.num_quantized == 24 and layer.num_residual == 6
    before = snapshot(layer)
    layer.crop(14)                                     # straddles block [12, 16)
    assert layer.seq_length == 14 and layer.num_quantized == 14 and layer.num_residual == 0
    assert [blk.num_slots for blk in layer.blocks] == [4, 4, 4, 2]
    for old, blk in zip(before, layer.blocks):        # codes and statistics untouched
        assert old[0] == blk.start
        for a, x in zip(old[1:], (blk.keys.words, blk.keys.scale, blk.values.words, blk.values.scale)):
            np.testing.assert_array_equal(a, x)
    assert layer.blocks[3].keys.shape[2] == 4         # straddling block keeps its 4 codes
    expected = [[1, 13], [13]]                         # row 1: position 1 is padding
    for row in range(b):
        np.testing.assert_array_equal(layer.preserved_positions()[row], expected[row])
    qpos = layer.segments()[0][2]
    assert qpos.shape == (b, 16)                       # the cut block's slots 14, 15 are -1
    assert np.all(qpos[:, 14:] == -1) and np.all(qpos[0, [0, 2, 12, 13]] == [0, 2, 12, -1])
    # continue from position 14 with new tokens
    k2, v2 = tokens(99, b=b, t=20)
    valid2 = np.ones((b, 20), bool)
    pres2 = np.zeros((b, 20), bool)
    pres2[:, 3] = True                                 # position 17
    # stream() feeds from position seq_length = 14: put the new tokens there
    stream(config, np.concatenate([k[:, :, :14], k2], axis=2),
           np.concatenate([v[:, :, :14], v2], axis=2),
           np.concatenate([preserve[:, :14], pres2], axis=1),
           np.concatenate([valid[:, :14], valid2], axis=1), [5] + [1] * 15, layer=layer)
    assert layer.seq_length == 34
    for old, blk in zip(before[:4], layer.blocks[:4]):
        np.testing.assert_array_equal(old[1], blk.keys.words)
    starts = [blk.start for blk in layer.blocks]
    assert starts == [0, 4, 8, 12, 14, 18, 22, 26]    # blocks start where the residual started
    for row in range(b):
        np.testing.assert_array_equal(layer.preserved_positions()[row], expected[row] + [17])
    # a block after the crop is the block of those tokens quantized directly
    blk = layer.blocks[5]
    coded = np.ones((b, 4), bool)
    kq, vq = quantize_block(k2[:, :, 4:8], v2[:, :, 4:8], coded, config)
    np.testing.assert_array_equal(blk.keys.words, kq.words)
    np.testing.assert_array_equal(blk.values.scale, vq.scale)
    # every position present exactly once
    positions = np.concatenate([seg[2] for seg in layer.segments()], axis=1)
    for row in range(b):
        seen = np.sort(positions[row][positions[row] >= 0])
        np.testing.assert_array_equal(seen, [p for p in range(34) if p >= 14 or valid[row, p]])


def test_crop_negative_noop_and_errors():
    config = CONFIGS["kivi_R6"]
    b, t = 2, 30
    k, v = tokens(3, b=b, t=t)
    valid = np.ones((b, t), bool)
    preserve = sink_flags(b, t, valid)
    a = stream(config, k, v, preserve, valid, [t])
    c = stream(config, k, v, preserve, valid, [t])
    a.crop(-7)
    c.crop(t - 7)
    assert_same_contents(a, c)
    n = a.nbytes()
    a.crop(100)                                        # beyond the end: no change
    a.crop(a.seq_length)
    assert a.seq_length == t - 7 and a.nbytes() == n
    with pytest.raises(ValueError, match="max_length"):
        a.crop(-(t - 7) - 1)
    with pytest.raises(TypeError, match="max_length"):
        a.crop(3.0)
    a.crop(-a.seq_length)
    assert a.seq_length == 0 and a.blocks == [] and a.nbytes() == 0
    assert all(len(p) == 0 for p in a.preserved_positions())
    a.update(k[:, :, :2], v[:, :, :2])                # B, H, D are kept after a crop to 0
    assert a.seq_length == 2 and a.segments()[2][2].tolist() == [[0, 1], [0, 1]]


def test_crop_inside_residual_truncates_pending():
    config = KVSinkConfig(key_group_size=4, value_group_size=4, residual_length=8)
    k, v = tokens(0, b=1, t=10)
    layer = QuantizedKVCacheLayer(config)
    layer.update(k[:, :, :6], v[:, :, :6])
    layer.resolve(np.zeros((1, 6), bool))
    layer.update(k[:, :, 6:10], v[:, :, 6:10])        # pending: positions 6..9
    layer.crop(8)
    assert layer.num_pending == 2 and layer.seq_length == 8
    layer.crop(5)
    assert layer.num_pending == 0 and layer.seq_length == 5
    np.testing.assert_array_equal(layer.residual[0], k[:, :, :5])


def test_crop_frees_cap_room():
    config = KVSinkConfig(key_group_size=2, value_group_size=2, residual_length=0, max_preserved=1)
    k, v = tokens(0, b=1, t=8)
    valid = np.ones((1, 8), bool)
    pres = np.zeros((1, 8), bool)
    pres[0, [2, 6]] = True
    layer = stream(config, k, v, pres, valid, [4])
    np.testing.assert_array_equal(layer.preserved_positions()[0], [2])
    layer.crop(2)                                      # position 2 leaves the cache
    assert len(layer.preserved_positions()[0]) == 0
    stream(config, k, v, pres, valid, [6], layer=layer)   # positions 2..7 again
    np.testing.assert_array_equal(layer.preserved_positions()[0], [2])
    layer.crop(4)
    pres2 = np.zeros((1, 8), bool)
    pres2[0, 6] = True
    stream(config, k, v, pres2, valid, [4], layer=layer)
    np.testing.assert_array_equal(layer.preserved_positions()[0], [2])   # cap full: 6 quantized
    assert layer.blocks[3].coded[0].tolist() == [True, True]


# --------------------------------------------------------------------------
# Definition 6.15 / 6.16: batch rows, reset
# --------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [[2, 0], [1], [0, 1, 2], [2, 2, 0, 1]])
def test_select_batch_equals_fresh_cache_of_rows(rows):
    config = CONFIGS["capped"]
    b, t = 3, 26
    k, v = tokens(13, b=b, t=t, sinks=(0, 5))
    valid = left_padded(b, t, [0, 3, 6])
    preserve = sink_flags(b, t, valid, where=(0, 3, 5, 6, 9, 17))
    preserve[2, 20] = True
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(9, 20))
    layer.select_batch(np.array(rows))
    assert layer.batch_size == len(rows)
    r = np.array(rows)
    fresh = stream(config, k[r], v[r], preserve[r], valid[r], prefill_then_decode(9, 20))
    assert_same_contents(layer, fresh)
    # and they stay equal while decoding on
    stream(config, k[r], v[r], preserve[r], valid[r], [1] * 6, layer=layer)
    stream(config, k[r], v[r], preserve[r], valid[r], [1] * 6, layer=fresh)
    assert_same_contents(layer, fresh)


@pytest.mark.parametrize("beam_idx", [[1, 1, 0], [2, 1, 0], [0, 1, 2]])
def test_reorder_equals_fresh_cache_of_rows(beam_idx):
    config = CONFIGS["kivi_R6"]
    b, t = 3, 27
    k, v = tokens(17, b=b, t=t, sinks=(2,))
    valid = left_padded(b, t, [1, 0, 4])
    preserve = sink_flags(b, t, valid, where=(2, 4, 11))
    preserve[0, 19] = True
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(5, t))
    layer.reorder(beam_idx)
    r = np.array(beam_idx)
    fresh = stream(config, k[r], v[r], preserve[r], valid[r], prefill_then_decode(5, t))
    assert layer.batch_size == b
    assert_same_contents(layer, fresh)


def test_batch_index_errors():
    layer = stream(CONFIGS["kivi_R6"], *tokens(0, b=2, t=12), np.zeros((2, 12), bool),
                   np.ones((2, 12), bool), [12])
    with pytest.raises(ValueError, match="beam_idx"):
        layer.reorder([0])
    with pytest.raises(ValueError, match="beam_idx"):
        layer.reorder([0, 2])
    with pytest.raises(TypeError, match="beam_idx"):
        layer.reorder([0.0, 1.0])
    with pytest.raises(ValueError, match="indices"):
        layer.select_batch([])
    with pytest.raises(ValueError, match="indices"):
        layer.select_batch([-1])
    assert layer.batch_size == 2


def test_reset_forgets_everything():
    config = CONFIGS["kivi_R6"]
    k, v = tokens(0, b=2, t=20)
    layer = stream(config, k, v, sink_flags(2, 20, np.ones((2, 20), bool)), np.ones((2, 20), bool),
                   [20])
    assert layer.nbytes() > 0 and layer.blocks
    layer.reset()
    assert layer.seq_length == 0 and layer.nbytes() == 0 and layer.blocks == []
    assert layer.segments() == [] and layer.batch_size is None and layer.num_pending == 0
    k3, v3 = tokens(1, b=3, h=1, t=9, d=8)            # other B, H, D
    layer.update(k3, v3)
    assert (layer.batch_size, layer.num_heads, layer.head_dim) == (3, 1, 8)
    assert layer.seq_length == 9


# --------------------------------------------------------------------------
# Definition 6.17: bytes
# --------------------------------------------------------------------------

def expected_nbytes(config, b, h, d, blocks, p, r, itemsize):
    """Definition 6.17 from shapes only: blocks is a list of (code slots n, live slots k)."""
    total = 0
    for n, kept in blocks:
        for bits, g, axis in ((config.key_bits, config.key_group_size, config.key_axis),
                              (config.value_bits, config.value_group_size, config.value_axis)):
            words = b * h * n * math.ceil(d / codes_per_word(bits))
            stats = b * h * (n * math.ceil(d / g) if axis == "token" else math.ceil(n / g) * d)
            total += 4 * words + 4 * stats * (1 if config.scheme == "symmetric" else 2)
        total += b * n                                          # coded mask (every code slot)
    total += 2 * b * h * p * d * itemsize + 8 * b * p            # preserved store
    total += 2 * b * h * r * d * itemsize + b * r + b * r        # residual, valid, statuses
    return total


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nbytes_formula(name, dtype):
    config = CONFIGS[name]
    b, h, t, d = 2, 3, 29, 12
    k, v = tokens(8, b=b, h=h, t=t, d=d)
    valid = left_padded(b, t, [0, 3])
    preserve = sink_flags(b, t, valid)
    preserve[0, 11] = True                                       # rows hold different counts
    layer = stream(config, k, v, preserve, valid, prefill_then_decode(4, t), dtype=dtype)
    blk = config.token_block
    f = flushed_length(t, config)
    p = max(len(x) for x in layer.preserved_positions())
    capped = cap_preserved(preserve[:, :f], config.max_preserved)
    assert p == capped.sum(axis=1).max()
    itemsize = np.dtype(dtype).itemsize
    assert layer.nbytes() == expected_nbytes(config, b, h, d, [(blk, blk)] * (f // blk), p,
                                             t - f, itemsize)
    # after a crop inside a block: the block keeps its codes and its mask
    if f >= 2 and blk > 1:
        cut = f - blk + 1
        layer.crop(cut)
        p = max(len(x) for x in layer.preserved_positions())
        blocks = [(blk, blk)] * (f // blk - 1) + [(blk, 1)]
        assert layer.nbytes() == expected_nbytes(config, b, h, d, blocks, p, 0, itemsize)
    # with pending statuses
    layer.update(k[:, :, :2], v[:, :, :2])
    assert layer.num_pending == 2
    assert layer.nbytes() == sum(x.nbytes for x in layer.residual) + sum(
        x.nbytes for x in layer.preserved) + sum(blk.nbytes for blk in layer.blocks)


def test_nbytes_shrinks_with_bits():
    k, v = tokens(0, b=1, h=2, t=64, d=64)
    valid = np.ones((1, 64), bool)
    sizes = []
    for bits in (8, 4, 2):
        c = KVSinkConfig(key_bits=bits, value_bits=bits, residual_length=0)
        sizes.append(quantize_sequence(k, v, np.zeros((1, 64), bool), valid, c).nbytes())
    full = k.nbytes + v.nbytes
    assert full > sizes[0] > sizes[1] > sizes[2]


# --------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------

def test_update_rejects_bad_inputs():
    layer = QuantizedKVCacheLayer(CONFIGS["kivi_R6"])
    k, v = tokens(0, b=2, h=2, t=4, d=8)
    with pytest.raises(ValueError, match="keys"):
        layer.update(k[0], v)                                    # rank 3
    with pytest.raises(ValueError, match="values"):
        layer.update(k, v[..., None])
    with pytest.raises(ValueError, match="keys and values"):
        layer.update(k, v[:, :1])
    with pytest.raises(TypeError, match="keys"):
        layer.update(k.astype(np.int32), v)
    bad = k.copy()
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="keys.*NaN"):
        layer.update(bad, v)
    bad = v.copy()
    bad[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="values"):
        layer.update(k, bad)
    with pytest.raises(ValueError, match="valid"):
        layer.update(k, v, np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="valid"):
        layer.update(k, v, np.ones((4,), bool))
    with pytest.raises(TypeError, match="valid"):
        layer.update(k, v, np.ones((2, 4), np.int8))
    assert layer.batch_size is None and layer.seq_length == 0   # nothing was stored
    layer.update(k, v)
    k2, v2 = tokens(1, b=2, h=3, t=1, d=8)
    with pytest.raises(ValueError, match="H"):
        layer.update(k2, v2)
    k2, v2 = tokens(1, b=2, h=2, t=1, d=4)
    with pytest.raises(ValueError, match="D"):
        layer.update(k2, v2)
    k2, v2 = tokens(1, b=3, h=2, t=1, d=8)
    with pytest.raises(ValueError, match="B"):
        layer.update(k2, v2)
    assert layer.seq_length == 4


def test_float16_storage_overflow_and_bad_dtype():
    layer = QuantizedKVCacheLayer(CONFIGS["kivi_R6"], dtype=np.float16)
    k, v = tokens(0, b=1, t=2)
    with pytest.raises(ValueError, match="keys.*float16"):
        layer.update(k * 1e5, v)
    with pytest.raises(ValueError, match="dtype"):
        QuantizedKVCacheLayer(CONFIGS["kivi_R6"], dtype=np.float64)
    with pytest.raises(TypeError, match="config"):
        QuantizedKVCacheLayer({"key_bits": 2})
    # kvquant needs a calibration unless nf with outlier_fraction 0 (tests/test_reference_cache_kvquant.py)
    with pytest.raises(ValueError, match="kvquant_calibration"):
        QuantizedKVCacheLayer(KVSinkConfig(quantizer="kvquant"))


# --------------------------------------------------------------------------
# Definition 6.18: all layers
# --------------------------------------------------------------------------

def test_multi_layer_cache():
    config = CONFIGS["kivi_R6"]
    b, t, n_layers = 2, 25, 3
    data = [tokens(30 + i, b=b, t=t) for i in range(n_layers)]
    valid = left_padded(b, t, [0, 2])
    preserve = sink_flags(b, t, valid)
    cache = QuantizedKVCache(config, n_layers)
    assert len(cache) == n_layers
    start = 0
    for n in prefill_then_decode(7, t):
        sl = slice(start, start + n)
        for i, (k, v) in enumerate(data):
            cache.update(i, k[:, :, sl], v[:, :, sl], valid[:, sl])
        cache.resolve(preserve[:, sl])
        cache.flush()
        start += n
    for i, (k, v) in enumerate(data):
        assert_same_contents(cache[i], quantize_sequence(k, v, preserve, valid, config))
    assert cache.seq_length == t
    assert cache.nbytes() == sum(cache[i].nbytes() for i in range(n_layers))
    # resolve needs every layer updated; flush is all-or-nothing
    k, v = data[0]
    cache.update(0, k[:, :, :1], v[:, :, :1])
    with pytest.raises(RuntimeError, match="pending"):
        cache.resolve(np.zeros((b, 1), bool))
    for i in (1, 2):
        cache.update(i, k[:, :, :1], v[:, :, :1])
    for i in range(n_layers):
        cache.update(i, k[:, :, :8], v[:, :, :8])
    before = [cache[i].num_quantized for i in range(n_layers)]
    with pytest.raises(RuntimeError, match="resolve"):
        cache.flush()
    assert [cache[i].num_quantized for i in range(n_layers)] == before
    cache.resolve(np.zeros((b, 9), bool))
    assert cache.flush() > 0
    cache.crop(10)
    assert all(cache[i].seq_length == 10 for i in range(n_layers))
    cache.select_batch([1])
    assert all(cache[i].batch_size == 1 for i in range(n_layers))
    q = np.ones((1, 4, 1, 16))
    np.testing.assert_array_equal(cache.attend(2, q, np.array([[9]])),
                                  cache[2].attend(q, np.array([[9]])))
    cache.reset()
    assert cache.seq_length == 0 and cache.nbytes() == 0
    with pytest.raises(ValueError, match="layer_idx"):
        cache.update(3, k, v)
    with pytest.raises(ValueError, match="num_layers"):
        QuantizedKVCache(config, 0)
