"""accelerated/kvquant.py against the reference (docs/08-kvquant.md §8.11)."""

import numpy as np
import pytest
import torch

import accelerated.kvquant as A
import reference.kvquant as R
from reference.config import KVSinkConfig
from tests.conftest import DEVICES

F32 = np.float32
U = 2.0 ** -24


def cfg(**kw):
    base = dict(quantizer="kvquant", key_bits=3, value_bits=2, key_group_size=5, value_group_size=8,
                outlier_fraction=0.05, kvquant_datatype="nf")
    base.update(kw)
    return KVSinkConfig(**base)


def data(seed, shape=(2, 3, 17, 8), ties=False):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=shape).astype(F32)
    v = rng.normal(size=shape).astype(F32)
    if ties:   # few distinct values: ties in magnitudes, in order statistics and on level boundaries
        k, v = np.round(k * 2) / 2, np.round(v * 2) / 2
    excl = rng.random(shape[:1] + shape[2:3]) < 0.15
    fisher = (rng.random(shape), rng.random(shape))
    return k, v, excl, fisher


def t(a, device="cpu"):
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def same_tensor(ref, acc):
    acc = acc.to_reference()
    for name in ("codes", "scale", "centre", "outlier_index", "outlier_value", "levels"):
        np.testing.assert_array_equal(getattr(ref, name), getattr(acc, name), err_msg=name)
    assert ref.nbytes == acc.nbytes


@pytest.mark.parametrize("bits", range(1, 9))
def test_nf_grid_is_the_reference(bits):
    np.testing.assert_array_equal(A.nf_levels(bits).numpy(), R.nf_levels(bits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("datatype", ["nf", "kmeans"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_block_bit_identical(device, datatype, ties, seed):
    k, v, excl, (fk, fv) = data(seed, ties=ties)
    c = cfg(kvquant_datatype=datatype, outlier_fraction=[0.0, 0.05][seed])
    cal = R.calibrate_kvquant(k, v, c, exclude=excl, key_fisher=fk, value_fisher=fv)
    ref = R.quantize_block_kvquant(k, v, cal, c, exclude=excl)
    acc = A.quantize_block_kvquant(t(k, device), t(v, device), A.KVQuantCalibration.from_reference(cal, device),
                                   c, exclude=t(excl, device))
    same_tensor(ref.keys, acc.keys)
    same_tensor(ref.values, acc.values)
    rk, rv = R.dequantize_block_kvquant(ref)
    ak, av = A.dequantize_block_kvquant(acc)
    np.testing.assert_array_equal(rk, ak.cpu().numpy())
    np.testing.assert_array_equal(rv, av.cpu().numpy())
    fk_, fv_ = A.fake_quantize_kvquant(t(k, device), t(v, device), cal, c, preserved=t(excl, device))
    rk_, rv_ = R.fake_quantize_kvquant(k, v, cal, c, preserved=excl)
    np.testing.assert_array_equal(rk_, fk_.cpu().numpy())
    np.testing.assert_array_equal(rv_, fv_.cpu().numpy())
    np.testing.assert_array_equal(R.pack_codes(ref.keys.codes, 3).view(np.int32),
                                  acc.keys.packed().cpu().numpy())


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.1, 0.3])
def test_outliers_identical(fraction):
    k, v, excl, _ = data(3, (2, 2, 30, 6), ties=True)
    lo, hi = R.key_outlier_thresholds(k, fraction, excl)
    alo, ahi = A.key_outlier_thresholds(t(k), fraction, t(excl))
    np.testing.assert_array_equal(lo, alo.numpy())
    np.testing.assert_array_equal(hi, ahi.numpy())
    np.testing.assert_array_equal(R.key_outliers(k, lo, hi, excl), A.key_outliers(t(k), alo, ahi, t(excl)).numpy())
    np.testing.assert_array_equal(R.value_outliers(v, fraction, excl),
                                  A.value_outliers(t(v), fraction, t(excl)).numpy())


@pytest.mark.parametrize("fraction", [0.0, 0.1])
def test_thresholds_with_every_token_excluded_match_reference(fraction):
    k, _, _, _ = data(5, (2, 2, 9, 4))
    excl = np.ones((2, 9), bool)
    lo, hi = R.key_outlier_thresholds(k, fraction, excl)
    alo, ahi = A.key_outlier_thresholds(t(k), fraction, t(excl))
    assert np.all(lo == -np.inf) and np.all(hi == np.inf)
    np.testing.assert_array_equal(lo, alo.numpy())
    np.testing.assert_array_equal(hi, ahi.numpy())


def test_nearest_level_ties_identical():
    lv = np.array([-1, -0.5, 0.5, 1], F32)
    x = np.array([-0.75, 0.0, 0.75, 0.7500001, -3.0, 3.0], F32)
    np.testing.assert_array_equal(R.nearest_level(x, lv), A.nearest_level(t(x), t(lv)).numpy())
    assert A.nearest_level(t(x), t(lv)).tolist() == [0, 1, 2, 3, 0, 3]


def test_calibration_matches_reference():
    k, v, excl, (fk, fv) = data(4, (2, 3, 40, 8))
    c = cfg(kvquant_datatype="kmeans", key_group_size=8)
    ref = R.calibrate_kvquant(k, v, c, exclude=excl, key_fisher=fk, value_fisher=fv)
    acc = A.calibrate_kvquant(t(k), t(v), c, exclude=t(excl), key_fisher=t(fk), value_fisher=t(fv))
    np.testing.assert_array_equal(ref.key_lower, acc.key_lower.numpy())
    np.testing.assert_array_equal(ref.key_upper, acc.key_upper.numpy())
    # k-means: float64 sums in another order (prefix-sum differences): the float32 levels agree
    # to one float32 ulp of 1 (2**-23), §8.11
    assert np.abs(ref.key_levels - acc.key_levels.numpy()).max() <= 2.0 ** -23
    assert np.abs(ref.value_levels - acc.value_levels.numpy()).max() <= 2.0 ** -23
    assert ref.nbytes == acc.nbytes
    layers = A.calibrate_kvquant_layers([t(k), t(k[:, ::-1].copy())], [t(v), t(v)], c, exclude=t(excl),
                                        fisher=[(t(fk), t(fv)), (t(fk), t(fv))])
    np.testing.assert_array_equal(layers[0].key_levels.numpy(), acc.key_levels.numpy())
    np.testing.assert_array_equal(layers[0].value_levels.numpy(), acc.value_levels.numpy())
    one = A.calibrate_kvquant(t(k[:, ::-1].copy()), t(v), c, exclude=t(excl), key_fisher=t(fk),
                              value_fisher=t(fv))
    np.testing.assert_array_equal(layers[1].key_levels.numpy(), one.key_levels.numpy())


def test_kmeans_matches_reference_and_is_monotone():
    rng = np.random.default_rng(5)
    p = np.clip(rng.normal(scale=0.4, size=(6, 300)), -1, 1)
    w = rng.exponential(size=(6, 300))
    for bits in (1, 2, 3, 4):
        lr = R.kmeans_levels(p, w, bits)
        la, hist = A.kmeans_levels(t(p), t(w), bits, return_history=True)
        assert np.abs(lr - la.numpy()).max() <= 2.0 ** -23
        h = hist.numpy()
        tol = 300 * 2.0 ** -52 * h[:-1] + w.sum(-1) * (301 * 2.0 ** -53) ** 2
        assert np.all(h[1:] <= h[:-1] + tol)
    np.testing.assert_array_equal(A.kmeans_levels(t(np.full(5, 0.25)), t(np.ones(5)), 2).numpy(), [0.25] * 4)


def test_rope_matches_reference():
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(2, 3, 20, 16)) * 5).astype(F32)
    pos = rng.integers(0, 1 << 22, size=(2, 1, 20))
    f = R.rope_inv_freq(16, 100000.0)
    np.testing.assert_array_equal(f, A.rope_inv_freq(16, 100000.0).numpy())
    # both evaluate cos/sin in float64 and round once; they may differ by 1 float32 ulp where the
    # float64 values straddle a float32 rounding boundary: |difference| <= 2u (|a| + |b|) + rounding
    bound = 4 * U * (np.abs(x[..., :8]) + np.abs(x[..., 8:]))
    bound = np.concatenate([bound, bound], axis=-1)
    for fn in ("apply_rope", "unapply_rope"):
        r = getattr(R, fn)(x, pos, f)
        a = getattr(A, fn)(t(x), t(pos), t(f)).numpy()
        assert np.all(np.abs(r - a) <= bound)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rope_theta=10000.0)
    return LlamaForCausalLM(conf).eval()


def test_unapply_transformers_rope_within_bound():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model = tiny_llama()
    rot = model.model.rotary_emb
    k = torch.randn(1, 2, 50, 8) * 3
    pos = torch.arange(50)[None] * 37
    cos, sin = rot(k, pos)                                        # transformers' float32 cos / sin
    _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    back = A.unapply_rope(k_rot, pos[:, None, :], A.model_inv_freq(model))
    assert torch.all((back - k).abs().double() <= A.rope_roundtrip_bound(k))
    again = A.apply_rope(back, pos[:, None, :], A.model_inv_freq(model))
    assert torch.all((again - k_rot).abs().double() <= A.rope_roundtrip_bound(k_rot))


def test_fisher_weights_are_squared_gradients():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    fisher = A.fisher_weights(model, ids)
    assert len(fisher) == 2
    # independent computation: retain_grad on the projections' outputs
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: (o.retain_grad(), outs.append(o))[1])
             for layer in model.model.layers for m in (layer.self_attn.k_proj, layer.self_attn.v_proj)]
    logits = model(input_ids=ids, use_cache=False).logits
    loss = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).sum()
    loss.backward()
    for h in hooks:
        h.remove()
    for i, (kf, vf) in enumerate(fisher):
        assert kf.shape == (2, 2, 12, 8) and vf.shape == (2, 2, 12, 8)
        gk = outs[2 * i].grad.reshape(2, 12, 2, 8).transpose(1, 2)
        gv = outs[2 * i + 1].grad.reshape(2, 12, 2, 8).transpose(1, 2)
        torch.testing.assert_close(kf, gk ** 2, rtol=1e-5, atol=0)
        torch.testing.assert_close(vf, gv ** 2, rtol=1e-5, atol=0)
        assert bool((kf[:, :, -1] == 0).all())     # the last token's key influences no prediction


def test_bad_inputs_name_the_argument():
    k, v, excl, _ = data(7)
    c = cfg(outlier_fraction=0.0)
    with pytest.raises(ValueError, match="keys_pre_rope"):
        A.quantize_block_kvquant(t(k[0]), t(v), None, c)
    with pytest.raises(TypeError, match="exclude"):
        A.quantize_block_kvquant(t(k), t(v), None, c, exclude=t(excl.astype(np.int64)))
    bad = k.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="values"):
        A.quantize_block_kvquant(t(k), t(bad), None, c)
    with pytest.raises(TypeError, match="positions"):
        A.apply_rope(t(k), torch.arange(17.0), A.rope_inv_freq(8))
    with pytest.raises(ValueError, match="positions"):
        A.apply_rope(t(k), -torch.ones(17, dtype=torch.long), A.rope_inv_freq(8))
    with pytest.raises(ValueError, match="key_fisher"):
        A.calibrate_kvquant(t(k), t(v), c.replace(kvquant_datatype="kmeans"))
    with pytest.raises(ValueError, match="weights"):
        A.kmeans_levels(torch.zeros(3), -torch.ones(3), 2)
    with pytest.raises(ValueError, match="value_bits"):
        cal = A.calibrate_kvquant(t(k), t(v), c)
        A.quantize_block_kvquant(t(k), t(v), cal, c.replace(value_bits=4))


def test_kmeans_levels_with_weights_spanning_45_orders_match_the_reference():
    """Fisher weights span tens of orders of magnitude (1e-46 .. 0.4 measured on a tiny model).
    The torch k-means must still take each cluster's own sums: differences of prefix sums over
    the row cancelled and gave levels up to 0.42 off the reference, some unsorted (which
    quantize_block_kvquant refuses).  With direct sums the float64 means agree to rounding, so
    the float32 levels to one ulp of 1 (docs/08 §8.11)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 300, generator=g, dtype=torch.float64) * 2 - 1
    w = 10.0 ** (-45 * torch.rand(8, 300, generator=g, dtype=torch.float64))
    got = A.kmeans_levels(x, w, 4)
    ref = torch.from_numpy(R.kmeans_levels(x.numpy(), w.numpy(), 4))
    assert bool((got[:, 1:] >= got[:, :-1]).all())
    torch.testing.assert_close(got, ref, rtol=0, atol=2.0 ** -23)
