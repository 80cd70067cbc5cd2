"""accelerated/cache.py with the KVQuant-style quantizer against the reference (docs/06-cache.md 6.21)."""

import numpy as np
import pytest
import torch

import accelerated.kvquant as akv
from accelerated.cache import KVQuantCacheBlock, QuantizedKVCache, QuantizedKVCacheLayer
from reference import cache as rcache
from reference import kvquant as rkv
from tests.conftest import DEVICES

from test_reference_cache_kvquant import (  # tests/ is on sys.path (pytest rootdir insertion)
    CONFIGS, D, H, INV, calibration_for, pre_rope_tokens, rotated_scenario,
)

TORCH_DTYPE = {np.float32: torch.float32, np.float16: torch.float16}


def run_both(config, k, v, preserve, valid, rope, chunks, *, cal, dtype=np.float32, device="cpu",
             ops=()):
    """Feed the same chunks to the reference and the accelerated layer; apply ``ops`` after."""
    ref = rcache.QuantizedKVCacheLayer(config, dtype=dtype, kvquant_calibration=cal, rope_inv_freq=INV)
    acc = QuantizedKVCacheLayer(config, dtype=TORCH_DTYPE[dtype], device=device,
                                kvquant_calibration=None if cal is None else
                                akv.KVQuantCalibration.from_reference(cal, device),
                                rope_inv_freq=torch.from_numpy(INV))
    t0 = 0
    for n in chunks:
        sl = slice(t0, t0 + n)
        ref.update(k[:, :, sl], v[:, :, sl], valid[:, sl], rope[:, sl])
        acc.update(torch.from_numpy(k[:, :, sl]), torch.from_numpy(v[:, :, sl]),
                   torch.from_numpy(valid[:, sl]), torch.from_numpy(rope[:, sl]))
        ref.resolve(preserve[:, sl])
        acc.resolve(torch.from_numpy(preserve[:, sl]))
        ref.flush()
        acc.flush()
        t0 += n
    return ref, acc


def np_(t):
    return t.detach().cpu().numpy()


def assert_matches(ref, acc, *, rope_bound=True):
    assert (ref.seq_length, ref.num_quantized, ref.num_residual, ref.num_pending) == \
        (acc.seq_length, acc.num_quantized, acc.num_residual, acc.num_pending)
    assert len(ref.blocks) == len(acc.blocks)
    for i, (x, y) in enumerate(zip(ref.blocks, acc.blocks)):
        assert isinstance(y, KVQuantCacheBlock)
        assert (x.start, x.num_slots) == (y.start, y.num_slots)
        np.testing.assert_array_equal(x.coded, np_(y.coded))
        np.testing.assert_array_equal(x.rope_positions, np_(y.rope_positions))
        for side in ("keys", "values"):
            a, b = getattr(x, side), getattr(y, side).unpack()
            for f in ("codes", "scale", "centre", "outlier_index", "outlier_value"):
                np.testing.assert_array_equal(getattr(a, f), np_(getattr(b, f)),
                                              err_msg=f"block {i} {side} {f}")
            np.testing.assert_array_equal(rkv.pack_codes(a.codes, a.bits).view(np.int32),
                                          np_(getattr(y, side).words))
    for x, y in zip(ref.preserved, acc.preserved):
        np.testing.assert_array_equal(x, np_(y).astype(x.dtype))
    for x, y in zip(ref.residual, acc.residual):
        np.testing.assert_array_equal(x, np_(y).astype(x.dtype))
    np.testing.assert_array_equal(ref.residual_rope_positions, np_(acc.residual_rope_positions))
    rs, as_ = ref.segments(), acc.segments()
    for j, ((rk, rv, rp), (ak, av, ap)) in enumerate(zip(rs, as_)):
        np.testing.assert_array_equal(rp, np_(ap))
        np.testing.assert_array_equal(rv, np_(av).astype(rv.dtype))
        if j == 0:
            # keys rotated back: numpy and torch cos/sin may differ by one float64 ulp
            # (docs/08-kvquant.md 8.11): within 4u(|a| + |b|) of the reference
            a = np.abs(rk.astype(np.float64))
            pair = a[..., :D // 2] + a[..., D // 2:]
            bound = 4 * 2.0**-24 * np.concatenate([pair, pair], axis=-1) + 2.0**-140
            assert np.all(np.abs(np_(ak) - rk) <= bound)
        else:
            np.testing.assert_array_equal(rk, np_(ak).astype(rk.dtype))
    assert ref.nbytes() == acc.nbytes()
    assert acc.allocated_bytes() >= acc.nbytes()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_reference(name, device):
    config = CONFIGS[name]
    cal = calibration_for(config)
    b, t = 2, 37
    k, v, valid, rope, preserve = rotated_scenario(21, t, [0, 4])
    # precondition of bit-identical codes: the two sides' float32 cos/sin agree (docs/08 8.11)
    pos = np.arange(64)
    for x, y in zip(rkv.rope_cos_sin(pos, INV), akv.rope_cos_sin(torch.from_numpy(pos), torch.from_numpy(INV))):
        np.testing.assert_array_equal(x, np_(y))
    ref, acc = run_both(config, k, v, preserve, valid, rope, [9] + [1] * 28, cal=cal, device=device)
    assert len(ref.blocks) >= 5
    assert_matches(ref, acc)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((b, 4, 2, D)).astype(np.float32)
    qp = np.array([[35, 36], [35, 36]])
    want = ref.attend(q, qp)
    got = np_(acc.attend(torch.from_numpy(q).to(device), torch.from_numpy(qp).to(device)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_matches_reference_after_crop_reorder_select(dtype):
    config = CONFIGS["capped"]
    cal = calibration_for(config)
    b, t = 3, 40
    k, v, valid, rope, preserve = rotated_scenario(22, t, [0, 3, 1])
    ref, acc = run_both(config, k, v, preserve, valid, rope, [12] + [1] * 18, cal=cal, dtype=dtype)
    ref.crop(17), acc.crop(17)
    assert_matches(ref, acc)
    ref.reorder(np.array([2, 0, 0])), acc.reorder(torch.tensor([2, 0, 0]))
    assert_matches(ref, acc)
    ref.select_batch(np.array([1, 0])), acc.select_batch(torch.tensor([1, 0]))
    assert_matches(ref, acc)
    rows = [0, 2]                   # the old rows now in the batch: [0, 2][::-1] order
    for i in range(17, 30):
        kk, vv = k[[0, 2][::-1]][:, :, i:i + 1], v[[0, 2][::-1]][:, :, i:i + 1]
        rr = rope[[0, 2][::-1]][:, i:i + 1]
        vd = valid[[0, 2][::-1]][:, i:i + 1]
        ref.update(kk, vv, vd, rr)
        acc.update(torch.from_numpy(kk), torch.from_numpy(vv), torch.from_numpy(vd), torch.from_numpy(rr))
        pr = np.zeros((2, 1), bool)
        ref.resolve(pr), acc.resolve(torch.from_numpy(pr))
        ref.flush(), acc.flush()
    assert rows and len(ref.blocks) > 4
    assert_matches(ref, acc)


def test_token_by_token_equals_one_shot():
    config = CONFIGS["kmeans"]
    cal = calibration_for(config)
    b, t = 2, 30
    k, v, valid, rope, preserve = rotated_scenario(23, t, [2, 0])
    one = rcache.quantize_sequence(k, v, preserve, valid, config, kvquant_calibration=cal,
                                   rope_inv_freq=INV, rope_positions=rope)
    _, acc = run_both(config, k, v, preserve, valid, rope, [1] * t, cal=cal)
    assert_matches(one, acc)


def test_nf_without_calibration_errors_and_multi_layer():
    config = CONFIGS["nf_p0"]
    layer = QuantizedKVCacheLayer(config, rope_inv_freq=torch.from_numpy(INV))
    k = torch.from_numpy(pre_rope_tokens(24, b=1, t=10)[0])
    layer.update(k, k)
    assert layer.kvquant_calibration.datatype == "nf"
    with pytest.raises(ValueError, match="kvquant_calibration"):
        QuantizedKVCacheLayer(CONFIGS["nf_p5"])
    with pytest.raises(ValueError, match="rope_positions"):
        QuantizedKVCacheLayer(rcache.KVSinkConfig()).update(k, k, rope_positions=torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="rope_positions"):
        layer.update(k, k, rope_positions=torch.full((1, 10), -1))
    with pytest.raises(TypeError, match="rope_positions"):
        layer.update(k, k, rope_positions=torch.zeros(1, 10))
    assert layer.seq_length == 10
    wrong = QuantizedKVCacheLayer(config, rope_inv_freq=torch.ones(4))
    with pytest.raises(ValueError, match="rope_inv_freq"):
        wrong.update(k, k)
    with pytest.raises(AttributeError, match="kvquant"):
        layer.quantized_keys
    cal = calibration_for(CONFIGS["nf_p5"])
    cache = QuantizedKVCache(CONFIGS["nf_p5"], 2, kvquant_calibration=[cal, cal],
                             rope_inv_freq=torch.from_numpy(INV))
    for i in range(2):
        cache.update(i, k, k, None, torch.arange(10)[None])
    cache.resolve(torch.zeros(1, 10, dtype=torch.bool))
    assert cache.flush() == 2
    ref = rcache.QuantizedKVCache(CONFIGS["nf_p5"], 2, kvquant_calibration=[cal, cal], rope_inv_freq=INV)
    for i in range(2):
        ref.update(i, k.numpy(), k.numpy(), None, np.arange(10)[None])
    ref.resolve(np.zeros((1, 10), bool))
    ref.flush()
    assert cache.nbytes() == ref.nbytes() > 0
