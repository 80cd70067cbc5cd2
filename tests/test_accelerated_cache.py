"""accelerated/cache.py against reference/cache.py (docs/06-cache.md).

The same sequence of operations (prefill with left padding, resolve, flush,
decode steps, crop, reorder, select_batch, reset) drives the reference cache
(numpy) and the torch twin; after every step the two must hold the same
contents:

* quantized store: same blocks (start, ``coded``), bit-identical packed words,
  codes, scales and zero points (docs/09-tolerances.md 9.4: the torch quantizer
  uses the reference's operations, so codes are identical, K = 0);
* preserved store: same positions, bit-identical keys and values;
* residual: identical keys, values, validity and statuses; same pending count;
* ``segments()``: identical (the dequantization is the same two roundings);
* ``nbytes()``: equal (definition 6.17);
* ``attend()``: within the bound of docs/09-tolerances.md 9.3, row "float32
  throughout" (the CPU port has no TF32 and reads the same dequantized values
  as the reference); exactly 0 for a query that sees no key.

The CUDA variants run the same scenario on the GPU against the CPU reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accelerated.cache import QuantizedKVCache, QuantizedKVCacheLayer
from accelerated.packing import words_to_reference
from reference import cache as ref_cache
from reference.config import KVSinkConfig
from tests.conftest import CUDA_KERNEL_DEVICE as CUDA_KERNEL, DEVICES

U32 = 2.0 ** -24

#: (id, config) pairs: bits 1..8, keys per channel and per token, symmetric,
#: R = 0 and R not a multiple of the block, caps, partial groups along D.
CONFIGS = [
    ("kivi-2bit", KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=8,
                               residual_length=8)),
    ("1bit-R0", KVSinkConfig(key_bits=1, value_bits=1, key_group_size=4, value_group_size=4,
                             residual_length=0)),
    ("3-5bit-R7-cap2", KVSinkConfig(key_bits=3, value_bits=5, key_group_size=4, value_group_size=8,
                                    residual_length=7, max_preserved=2)),
    ("sym-8bit-token-keys", KVSinkConfig(key_bits=8, value_bits=8, key_group_size=8, value_group_size=8,
                                         key_axis="token", value_axis="token", scheme="symmetric",
                                         residual_length=3)),
    ("4-6bit-channel-both", KVSinkConfig(key_bits=4, value_bits=6, key_group_size=3, value_group_size=3,
                                         key_axis="channel", value_axis="channel", residual_length=5)),
    ("7bit-values-channel", KVSinkConfig(key_bits=7, value_bits=3, key_group_size=5, value_group_size=4,
                                         key_axis="token", value_axis="channel", residual_length=2,
                                         max_preserved=1)),
    ("sym-2-4bit-cap0", KVSinkConfig(key_bits=2, value_bits=4, key_group_size=4, value_group_size=6,
                                     scheme="symmetric", residual_length=6, max_preserved=0)),
]
CONFIG_IDS = [c[0] for c in CONFIGS]

B, H, HQ, D = 3, 2, 4, 12


# --------------------------------------------------------------------------- helpers

def _np(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def attention_bound(query, segments, query_positions, scale=None):
    """Per-output bound of docs/09-tolerances.md 9.3, row "float32 throughout", and visible counts.

    ``|o_port - o_ref| <= V [2.5 (c A (D + 1) u + u (3 ln S + 2 S + 4)) + 2u]`` (u_in = u_p = u_v = 0,
    u_o = u) with ``V`` the largest |value| and ``A = max_j sum_d |q_d k_jd|`` over the keys the
    query sees, ``S`` their number.  Returns (bound (B, Hq, Tq, 1), S (B, Hq, Tq)).
    """
    q = np.abs(np.asarray(query, dtype=np.float64))
    b, hq, tq, d = q.shape
    ks = [np.asarray(k, dtype=np.float64) for k, _, _ in segments]
    vs = [np.asarray(v, dtype=np.float64) for _, v, _ in segments]
    ps = [np.asarray(p) for _, _, p in segments]
    k = np.concatenate(ks, axis=2)
    v = np.concatenate(vs, axis=2)
    kp = np.concatenate(ps, axis=1)
    heads = np.arange(hq) // (hq // k.shape[1])
    qp = np.asarray(query_positions)
    vis = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])           # (B, Tq, S)
    a = np.einsum("bhtd,bhsd->bhts", q, np.abs(k[:, heads]))                      # (B, Hq, Tq, S)
    a = np.where(vis[:, None], a, 0.0).max(axis=-1, initial=0.0)
    vmax = np.where(vis[:, None, :, :, None], np.abs(v[:, heads])[:, :, None], 0.0).max(axis=(3, 4),
                                                                                      initial=0.0)
    s_vis = np.broadcast_to(vis.sum(axis=-1)[:, None, :], (b, hq, tq)).astype(np.float64)
    s = np.maximum(s_vis, 1.0)
    c = 1.0 / math.sqrt(d) if scale is None else scale
    inner = c * a * (d + 1) * U32 + U32 * (3 * np.log(s) + 2 * s + 4)
    return (vmax * (2.5 * inner + 2 * U32))[..., None], s_vis


def assert_attention_close(ours, ref, query, qp, scale=None):
    got = _np(ours).astype(np.float64)
    bound, n_visible = attention_bound(query, ref.segments(), qp, scale)
    want = ref.attend(query, qp, scale)
    assert got.shape == want.shape
    blind = np.broadcast_to((n_visible == 0)[..., None], got.shape)
    assert np.all(got[blind] == 0), "a query that sees no key must output exactly 0"
    err = np.abs(got - want)
    bad = ~blind & (err > bound)
    assert not bad.any(), (f"{int(bad.sum())} outputs beyond docs/09-tolerances.md 9.3; "
                           f"max err {err[~blind].max():.3g}, bound there {np.broadcast_to(bound, err.shape)[bad].min():.3g}")


def assert_same_state(ours: QuantizedKVCacheLayer, ref: ref_cache.QuantizedKVCacheLayer):
    """Everything the reference holds, and what ``nbytes`` / ``segments`` report, agree."""
    assert ours.seq_length == ref.seq_length
    assert ours.num_quantized == ref.num_quantized
    assert ours.num_residual == ref.num_residual
    assert ours.num_pending == ref.num_pending
    assert ours.batch_size == ref.batch_size
    assert ours.nbytes() == ref.nbytes()
    ours_segs, ref_segs = ours.segments(), ref.segments()
    assert len(ours_segs) == len(ref_segs)
    if ref.batch_size is None:
        assert ours.blocks == [] and ours.preserved_positions() == []
        return
    # buffer slots beyond the used ones are empty (attend may read the whole buffer)
    if ours.quantized.slot_pos is not None:
        assert bool(torch.all(ours.quantized.slot_pos[:, ours.quantized.num_codes:] == -1))
    # quantized store, block by block: bit-identical words, codes, statistics
    assert len(ours.blocks) == len(ref.blocks)
    for j, (ob, rb) in enumerate(zip(ours.blocks, ref.blocks)):
        assert (ob.start, ob.num_slots, ob.num_codes) == (rb.start, rb.num_slots, rb.num_codes), f"block {j}"
        np.testing.assert_array_equal(_np(ob.positions()), rb.positions(), err_msg=f"block {j} positions")
        np.testing.assert_array_equal(_np(ob.coded), rb.coded, err_msg=f"block {j} coded")
        for side in ("keys", "values"):
            o, r = getattr(ob, side), getattr(rb, side)
            np.testing.assert_array_equal(words_to_reference(o.words), r.words,
                                          err_msg=f"block {j} {side} words")
            np.testing.assert_array_equal(_np(o.unpack().codes), r.unpack().codes,
                                          err_msg=f"block {j} {side} codes")
            np.testing.assert_array_equal(_np(o.scale), r.scale, err_msg=f"block {j} {side} scale")
            if r.zero is None:
                assert o.zero is None
            else:
                np.testing.assert_array_equal(_np(o.zero), r.zero, err_msg=f"block {j} {side} zero")
    # preserved store: positions and bit-exact values
    for o, r in zip(ours.preserved, ref.preserved):
        np.testing.assert_array_equal(_np(o), r)
    for o, r in zip(ours.preserved_positions(), ref.preserved_positions()):
        np.testing.assert_array_equal(_np(o), r)
    # residual: keys, values, validity, statuses
    for o, r in zip(ours.residual, ref.residual):
        np.testing.assert_array_equal(_np(o), r)
    # segments (dequantized quantized store, preserved store, residual)
    for (ok, ov, op), (rk, rv, rp) in zip(ours_segs, ref_segs):
        np.testing.assert_array_equal(_np(op), rp)
        np.testing.assert_array_equal(_np(ok), rk)
        np.testing.assert_array_equal(_np(ov), rv)


class Pair:
    """The reference layer and ours, driven together with the same numpy inputs."""

    def __init__(self, config, device="cpu", dtype=np.float32, seed=0):
        self.ref = ref_cache.QuantizedKVCacheLayer(config, dtype=dtype)
        tdtype = {np.float32: torch.float32, np.float16: torch.float16}[dtype]
        self.ours = QuantizedKVCacheLayer(config, dtype=tdtype, device=device)
        self.device = device
        self.dtype = dtype
        self.rng = np.random.default_rng(seed)

    def t(self, x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def tokens(self, b, n, sink_every=0):
        k = self.rng.standard_normal((b, H, n, D)).astype(np.float32)
        v = self.rng.standard_normal((b, H, n, D)).astype(np.float32)
        if sink_every:
            k[:, :, ::sink_every, 0] *= 40.0        # sink-like outliers in one channel
        return k, v

    def update(self, n, valid=None, pres_prob=0.25, resolve=True, flush=True):
        b = self.ref.batch_size or B
        k, v = self.tokens(b, n, sink_every=7)
        self.ref.update(k, v, valid)
        self.ours.update(self.t(k), self.t(v), None if valid is None else self.t(valid))
        if resolve:
            vld = np.ones((b, n), bool) if valid is None else valid
            flags = (self.rng.random((b, self.ref.num_pending)) < pres_prob)
            flags &= self.ref.residual[2][:, self.ref.num_residual - self.ref.num_pending:]
            self.ref.resolve(flags)
            self.ours.resolve(self.t(flags))
            del vld
        if flush:
            assert self.ours.flush() == self.ref.flush()

    def check(self, scale=None):
        assert_same_state(self.ours, self.ref)
        if self.ref.batch_size is None:
            return
        b = self.ref.batch_size
        q = self.rng.standard_normal((b, HQ, 3, D)).astype(np.float32)
        s = self.ref.seq_length
        # the newest slot, a slot in the middle, and one before every key (sees nothing)
        qp = np.stack([np.full(b, s - 1), self.rng.integers(0, max(s, 1), b), np.full(b, -1)], axis=1)
        out = self.ours.attend(self.t(q), self.t(qp.astype(np.int64)), scale=scale)
        assert out.dtype == torch.float32 and out.shape == (b, HQ, 3, D)
        assert_attention_close(out, self.ref, q, qp, scale)


def left_padding(b, n, pads):
    valid = np.ones((b, n), bool)
    for row, p in enumerate(pads):
        valid[row, :p] = False
    return valid


def run_scenario(pair: Pair):
    """Prefill, decode, crop, reorder, select_batch, reset: compare after every step."""
    pair.update(23, valid=left_padding(B, 23, [0, 3, 6]))
    pair.check()
    for _ in range(7):
        pair.update(1)
        pair.check()
    pair.update(3)                          # a multi-token step (e.g. speculative decoding)
    pair.check()
    # an update whose status arrives later: flush must refuse, nothing changes
    pair.update(2, resolve=False, flush=False)
    pair.check()
    b = pair.ref.batch_size
    flags = np.zeros((b, 2), bool)
    flags[0, 1] = True
    pair.ref.resolve(flags)
    pair.ours.resolve(pair.t(flags))
    assert pair.ours.flush() == pair.ref.flush()
    pair.check(scale=0.3)
    # crop inside a quantized block (straddling), then decode again
    blk = pair.ref.config.token_block
    if pair.ref.blocks:
        last = pair.ref.blocks[-1]
        cut = last.start + max(1, blk // 2) if blk > 1 else last.start
    else:
        cut = pair.ref.seq_length - 2
    pair.ref.crop(cut)
    pair.ours.crop(cut)
    pair.check()
    for _ in range(6):
        pair.update(1)
        pair.check()
    pair.ref.crop(-2)
    pair.ours.crop(-2)
    pair.check()
    pair.update(2)
    pair.check()
    beam = np.array([2, 0, 0])
    pair.ref.reorder(beam)
    pair.ours.reorder(pair.t(beam))
    pair.check()
    for _ in range(3):
        pair.update(1)
    pair.check()
    rows = np.array([1, 2])
    pair.ref.select_batch(rows)
    pair.ours.select_batch(pair.t(rows))
    pair.check()
    for _ in range(5):
        pair.update(1)
        pair.check()
    pair.ref.reset()
    pair.ours.reset()
    pair.check()
    assert pair.ours.nbytes() == 0 and pair.ours.seq_length == 0
    pair.update(9, valid=left_padding(B, 9, [2, 0, 0]))   # a fresh batch after reset
    pair.check()
    for _ in range(4):
        pair.update(1)
    pair.check()


# --------------------------------------------------------------------------- differential tests

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [c[1] for c in CONFIGS], ids=CONFIG_IDS)
def test_matches_reference(cfg, device):
    run_scenario(Pair(cfg, device=device, seed=hash(str(cfg)) % 2 ** 32))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_float16_storage(device):
    cfg = KVSinkConfig(key_bits=2, value_bits=4, key_group_size=4, value_group_size=4,
                       residual_length=5, max_preserved=3)
    run_scenario(Pair(cfg, device=device, dtype=np.float16, seed=7))


@pytest.mark.parametrize("device", DEVICES)
def test_token_by_token_equals_prefill(device):
    """Theorem 6.11: streaming one token at a time ends where quantize_sequence does."""
    cfg = KVSinkConfig(key_bits=3, value_bits=2, key_group_size=4, value_group_size=8,
                       residual_length=6, max_preserved=4)
    rng = np.random.default_rng(3)
    t = 41
    k = rng.standard_normal((2, H, t, D)).astype(np.float32)
    v = rng.standard_normal((2, H, t, D)).astype(np.float32)
    valid = left_padding(2, t, [0, 5])
    flags = (rng.random((2, t)) < 0.3) & valid
    ref = ref_cache.quantize_sequence(k, v, flags, valid, cfg)
    ours = QuantizedKVCacheLayer(cfg, device=device)
    for i in range(t):
        ours.update(torch.from_numpy(k[:, :, i:i + 1]).to(device), torch.from_numpy(v[:, :, i:i + 1]).to(device),
                    torch.from_numpy(valid[:, i:i + 1]).to(device))
        ours.resolve(torch.from_numpy(flags[:, i:i + 1]).to(device))
        ours.flush()
    assert_same_state(ours, ref)


def test_multi_layer_cache_matches_reference():
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=4,
                       residual_length=4, max_preserved=2)
    rng = np.random.default_rng(11)
    ref = ref_cache.QuantizedKVCache(cfg, 3)
    ours = QuantizedKVCache(cfg, 3)
    for n in (13, 1, 1, 1, 5, 1):
        for layer in range(3):
            k = rng.standard_normal((2, H, n, D)).astype(np.float32)
            v = rng.standard_normal((2, H, n, D)).astype(np.float32)
            ref.update(layer, k, v)
            ours.update(layer, torch.from_numpy(k), torch.from_numpy(v))
        flags = rng.random((2, n)) < 0.3
        ref.resolve(flags)
        ours.resolve(torch.from_numpy(flags))
        assert ours.flush() == ref.flush()
        assert ours.nbytes() == ref.nbytes()
        for layer in range(3):
            assert_same_state(ours[layer], ref[layer])
    q = rng.standard_normal((2, HQ, 1, D)).astype(np.float32)
    qp = np.full((2, 1), ref.seq_length - 1)
    assert_attention_close(ours.attend(1, torch.from_numpy(q), torch.from_numpy(qp)), ref[1], q, qp)
    ours.crop(10)
    ref.crop(10)
    ours.select_batch(torch.tensor([1]))
    ref.select_batch(np.array([1]))
    for layer in range(3):
        assert_same_state(ours[layer], ref[layer])


# --------------------------------------------------------------------------- storage

def _all_tensors(obj):
    """Every tensor reachable from the object's attributes (lists, tuples, dicts followed)."""
    found, stack = [], list(vars(obj).values())
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif type(x).__module__.startswith("accelerated.cache"):   # the layer's records and stores
            stack.extend(_fields(x))
    return found


def _fields(obj) -> list:
    """The attribute values of a record (``__dict__`` and ``__slots__``)."""
    names = [n for cls in type(obj).__mro__ for n in getattr(cls, "__slots__", ())]
    return list(getattr(obj, "__dict__", {}).values()) + [getattr(obj, n, None) for n in names]


def _long_run(dtype, cfg, steps=300):
    rng = np.random.default_rng(5)
    layer = QuantizedKVCacheLayer(cfg, dtype=dtype)
    k = torch.from_numpy(rng.standard_normal((2, H, 200, D)).astype(np.float32))
    layer.update(k, -k)
    flags = torch.zeros((2, 200), dtype=torch.bool)
    flags[:, 0] = True
    flags[1, 17] = True
    layer.resolve(flags)
    layer.flush()
    for _ in range(steps):
        x = torch.from_numpy(rng.standard_normal((2, H, 1, D)).astype(np.float32))
        layer.update(x, x)
        layer.resolve(torch.zeros((2, 1), dtype=torch.bool))
        layer.flush()
    return layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_no_full_precision_copy_of_quantized_tokens(dtype):
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=8, value_group_size=8,
                       residual_length=16)
    layer = _long_run(dtype, cfg)
    assert layer.num_quantized >= 480 and layer.num_residual < 16 + 8
    b, h, d = 2, H, D
    tensors = _all_tensors(layer)
    # float32 statistics (scale / zero) of the quantized store: one per group, not per element
    stats = {id(layer.quantized.keys.scale), id(layer.quantized.keys.zero), id(layer.quantized.values.scale), id(layer.quantized.values.zero)}
    assert all(t.dtype == torch.float32 for t in tensors if id(t) in stats)
    # the other tensors of the model dtype are exactly the residual and preserved buffers
    model_dtype = [t for t in tensors if t.dtype == dtype and id(t) not in stats]
    expected = {id(layer._residual.keys), id(layer._residual.values), id(layer._preserved.keys), id(layer._preserved.values)}
    assert {id(t) for t in model_dtype} == expected
    fp_elements = sum(t.numel() for t in model_dtype)
    assert fp_elements == 2 * b * h * d * (layer._residual.capacity + layer._preserved.capacity + 1)
    # ... whose capacity is far below one full-precision copy of the quantized tokens
    assert fp_elements < 2 * b * h * d * layer.num_quantized / 4
    # no other floating tensor at all
    assert all(id(t) in stats or id(t) in expected for t in tensors if t.is_floating_point())
    # the codes are int32 words: 2 bits per element
    words = [t for t in tensors if t.dtype == torch.int32]
    assert {id(t) for t in words} == {id(layer.quantized.keys.words), id(layer.quantized.values.words)}


def test_nbytes_and_allocated_bytes():
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=8, value_group_size=8,
                       residual_length=16)
    layer = _long_run(torch.float16, cfg)
    # spec count, by hand (definition 6.17): 2-bit D=12 -> 1 word per token per head
    nb = layer.num_quantized // 8
    b, h, d = 2, H, D
    q = nb * 8
    expected = (4 * b * h * q * 1 * 2                      # key and value words
                + 4 * b * h * nb * d * 2                   # key scale + zero (per channel, one row per block)
                + 4 * b * h * q * 2 * 2                    # value scale + zero (per token, ceil(12/8) = 2 groups)
                + b * q                                    # coded flags
                + 2 * b * h * 2 * d * 2 + 8 * b * 2        # preserved store: P = 2 (row 1), float16
                + 2 * b * h * layer.num_residual * d * 2 + 2 * b * layer.num_residual)
    assert layer.nbytes() == expected
    alloc = layer.allocated_bytes()
    assert alloc >= layer.nbytes()
    # geometric growth: the quantized buffers hold at most twice the slots in use,
    # and the residual buffer left by the 200-token prefill was given back
    assert layer.quantized.capacity <= 2 * layer.quantized.num_codes
    window = cfg.residual_length + cfg.token_block
    assert layer._residual.capacity <= 2 * max(64, window + max(16, window // 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [512, 4096])
def test_allocated_bytes_bounded_after_prefill_and_decode(n, bits, dtype):
    """Growth policy (docs/06-cache.md "Accelerated layout"): after a flush
    ``allocated_bytes() <= 1.5 * nbytes() + C``, ``C`` the residual's sliding room, the preserved
    store's minimum and one block of rounding; a prefill is held exactly (no spare room for a
    multiple of ``n``), decoding reallocates only by amortised geometric steps."""
    cfg = KVSinkConfig(key_bits=bits, value_bits=bits, key_group_size=32, value_group_size=32)
    b, h, d = 1, 3, 64                                   # one SmolLM2-135M layer
    blk, r = cfg.token_block, cfg.residual_length
    esize = torch.empty((), dtype=dtype).element_size()
    window = r + blk
    steady = max(64, window + max(16, window // 2))      # residual capacity while decoding
    token_bytes = 2 * b * h * d * esize + 2 * b          # residual K, V, valid, status
    column_bytes = 2 * b * h * d * esize + 8 * b         # preserved K, V, position
    slot_bytes = 9 * b                                   # int64 position + coded flag
    for group, axis in ((cfg.key_group_size, cfg.key_axis), (cfg.value_group_size, cfg.value_axis)):
        stats = 2 * (d / blk if axis == "channel" else -(-d // group))
        slot_bytes += 4 * b * h * (-(-d // (32 // bits)) + stats)
    slack = (steady - r) * token_bytes + 5 * column_bytes + blk * slot_bytes + 8 * b

    gen = torch.Generator().manual_seed(n + bits)
    layer = QuantizedKVCacheLayer(cfg, dtype=dtype)
    layer.update(torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen))
    assert layer._residual.capacity == n                              # the prefill fits exactly
    flags = torch.zeros(b, n, dtype=torch.bool)
    flags[:, [0, 3]] = True                              # two preserved tokens
    layer.resolve(flags)
    layer.flush()
    assert layer.num_quantized == (n - r) // blk * blk and layer._preserved.used == 2
    assert layer._residual.capacity == steady and layer.quantized.capacity == layer.num_quantized
    assert layer.allocated_bytes() <= 1.5 * layer.nbytes() + slack

    moves = {"residual": 0, "quantized": 0}
    for _ in range(100):
        rk, kw = layer._residual.keys.data_ptr(), layer.quantized.keys.words.data_ptr()
        layer.update(torch.randn(b, h, 1, d, generator=gen), torch.randn(b, h, 1, d, generator=gen))
        layer.resolve(torch.zeros(b, 1, dtype=torch.bool))
        layer.flush()
        moves["residual"] += layer._residual.keys.data_ptr() != rk
        moves["quantized"] += layer.quantized.keys.words.data_ptr() != kw
        assert layer._residual.capacity == steady
        assert layer.quantized.capacity < max(1.25 * layer.num_quantized, 64) + blk
        assert layer.allocated_bytes() <= 1.5 * layer.nbytes() + slack
    # a compaction every max(16, W // 2) steps at most; the quantized store grew x1.25 at most twice
    assert moves["residual"] <= -(-100 // max(16, window // 2))
    assert moves["quantized"] <= 2


@pytest.mark.parametrize("residual_length", [100000, 1000])
def test_buffers_follow_the_tokens_held_not_the_configured_residual_length(residual_length):
    """Issue 13: a 14-token sequence with ``residual_length=100000`` held ~77 MB per SmolLM2 layer
    (a residual buffer of ``S = 1.5 (R + blk)`` slots) while ``nbytes()`` said 6.7 KB.  Before any
    flush the residual holds ``max(64, 1.5 * tokens)`` slots at most, growing x1.5 (amortised)."""
    cfg = KVSinkConfig(key_bits=4, value_bits=4, residual_length=residual_length)
    b, h, d = 1, 3, 64                                   # one SmolLM2-135M layer
    dtype = torch.float16
    token_bytes = 2 * b * h * d * 2 + 2 * b              # residual K, V, valid, status
    fixed = 2 * b * h * d * 2 + 8 * b + 8 * b            # preserved scratch column + counts
    gen = torch.Generator().manual_seed(13)
    layer = QuantizedKVCacheLayer(cfg, dtype=dtype)
    layer.update(torch.randn(b, h, 14, d, generator=gen), torch.randn(b, h, 14, d, generator=gen))
    assert layer.num_residual == 14
    assert layer.allocated_bytes() <= 64 * token_bytes + fixed
    assert layer.allocated_bytes() < 5 * layer.nbytes()
    moves = 0
    for t in range(15, 801):                             # decode: no flush is ever due
        before = layer.residual[0].data_ptr()
        layer.update(torch.randn(b, h, 1, d, generator=gen), torch.randn(b, h, 1, d, generator=gen))
        moves += layer.residual[0].data_ptr() != before
        assert layer.num_residual == t
        assert layer.allocated_bytes() <= max(64, 1.5 * t + 1) * token_bytes + fixed
    assert moves <= 12                                   # x1.5 steps from 64 to 800: amortised


def test_preserved_store_respects_cap_and_order():
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=2, value_group_size=2,
                       residual_length=0, max_preserved=2)
    layer = QuantizedKVCacheLayer(cfg)
    k = torch.arange(2 * 1 * 6 * 4, dtype=torch.float32).reshape(2, 1, 6, 4)
    layer.update(k, k + 0.5)
    flags = torch.tensor([[True, False, True, True, False, True],
                          [False, False, False, False, False, True]])
    layer.resolve(flags)
    assert layer.flush() == 3
    pos = layer.preserved_positions()
    assert pos[0].tolist() == [0, 2] and pos[1].tolist() == [5]
    ppos, pk, pv = layer.preserved
    assert torch.equal(pk[0, 0, :2], k[0, 0, [0, 2]]) and torch.equal(pv[1, 0, :1], k[1, 0, [5]] + 0.5)
    assert ppos[1].tolist() == [5, -1] and torch.all(pk[1, 0, 1] == 0)
    # beyond the cap, token 3 and 5 of row 0 were quantized: coded, and in the statistics
    coded = torch.cat([blk.coded for blk in layer.blocks], dim=1)
    assert coded[0].tolist() == [False, True, False, True, True, True]


# --------------------------------------------------------------------------- errors

def _filled(cfg=None, n=5):
    cfg = cfg or KVSinkConfig(key_bits=2, value_bits=2, key_group_size=2, value_group_size=2,
                              residual_length=1)
    layer = QuantizedKVCacheLayer(cfg)
    layer.update(torch.ones(2, 1, n, 4), torch.ones(2, 1, n, 4),
                 torch.tensor([[False] + [True] * (n - 1), [True] * n]))
    return layer


def test_errors():
    # kvquant needs a calibration unless nf with outlier_fraction 0 (tests/test_reference_cache_kvquant.py)
    with pytest.raises(ValueError, match="kvquant_calibration"):
        QuantizedKVCacheLayer(KVSinkConfig(quantizer="kvquant"))
    with pytest.raises(TypeError, match="dtype"):
        QuantizedKVCacheLayer(KVSinkConfig(), dtype=torch.int32)
    with pytest.raises(TypeError, match="config"):
        QuantizedKVCacheLayer({"key_bits": 2})
    layer = QuantizedKVCacheLayer(KVSinkConfig())
    with pytest.raises(RuntimeError, match="update"):
        layer.resolve(torch.zeros((1, 0), dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        layer.update(torch.ones(2, 1, 3), torch.ones(2, 1, 3))
    with pytest.raises(TypeError, match="floating"):
        layer.update(torch.ones(1, 1, 3, 4, dtype=torch.int64), torch.ones(1, 1, 3, 4, dtype=torch.int64))
    bad = torch.ones(1, 1, 3, 4)
    bad[0, 0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="values contains NaN"):
        layer.update(torch.ones(1, 1, 3, 4), bad)
    with pytest.raises(ValueError, match="storage dtype"):
        QuantizedKVCacheLayer(KVSinkConfig(), dtype=torch.float16).update(
            torch.full((1, 1, 1, 4), 1e6), torch.ones(1, 1, 1, 4))
    layer = _filled()
    with pytest.raises(ValueError, match="must have the same shape"):
        layer.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 2, 4))
    with pytest.raises(ValueError, match="D \\(axis 3\\)|do not match"):
        layer.update(torch.ones(2, 1, 1, 5), torch.ones(2, 1, 1, 5))
    with pytest.raises(ValueError, match="valid"):
        layer.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid"):
        layer.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4), torch.ones(2, 1))
    # flushing pending tokens: refused, nothing changes
    before = (layer.nbytes(), layer.seq_length, layer.num_pending)
    with pytest.raises(RuntimeError, match="resolve"):
        layer.flush()
    assert (layer.nbytes(), layer.seq_length, layer.num_pending) == before
    with pytest.raises(ValueError, match="shape"):
        layer.resolve(torch.zeros((2, 4), dtype=torch.bool))
    with pytest.raises(ValueError, match="padding"):
        layer.resolve(torch.tensor([[True] + [False] * 4, [False] * 5]))
    assert layer.num_pending == 5                               # unchanged by the failed resolve
    layer.resolve(torch.zeros((2, 5), dtype=torch.bool))
    assert layer.flush() == 2
    with pytest.raises(TypeError, match="max_length"):
        layer.crop(2.5)
    with pytest.raises(ValueError, match="drops more"):
        layer.crop(-6)
    with pytest.raises(ValueError, match="length B=2"):
        layer.reorder(torch.tensor([0]))
    with pytest.raises(ValueError, match="row indices in"):
        layer.select_batch(torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="integer"):
        layer.select_batch(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="at least one row"):
        layer.select_batch(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="query"):
        layer.attend(torch.ones(3, 2, 1, 4), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="query_positions"):
        layer.attend(torch.ones(2, 2, 1, 4), torch.zeros(2, 2, dtype=torch.int64))
    cache = QuantizedKVCache(KVSinkConfig(), 2)
    with pytest.raises(ValueError, match="layer_idx"):
        cache.update(2, torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    cache.update(0, torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    with pytest.raises(RuntimeError, match="pending"):
        cache.resolve(torch.zeros((1, 1), dtype=torch.bool))


def test_empty_cache_behaviour():
    layer = QuantizedKVCacheLayer(KVSinkConfig())
    assert layer.seq_length == 0 and layer.nbytes() == 0 and layer.segments() == []
    assert layer.flush() == 0 and layer.preserved_positions() == []
    layer.crop(0)
    layer.reorder(torch.tensor([0]))
    out = layer.attend(torch.ones(1, 2, 1, 4), torch.zeros(1, 1, dtype=torch.int64))
    assert out.shape == (1, 2, 1, 4) and torch.all(out == 0)
    with pytest.raises(RuntimeError, match="empty"):
        layer.preserved


# --------------------------------------------------------------------------- deferred checks

def _error(fn):
    """The ValueError message ``fn()`` raises (None if it raises nothing)."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _nan_at(shape, index, value=float("nan"), device="cpu"):
    x = torch.ones(shape, device=device)
    x[index] = value
    return x


@pytest.mark.parametrize("device", DEVICES)
def test_deferred_checks_raise_the_eager_errors(device):
    """With ``checks=DeferredChecks()`` update / resolve / attend record their value checks
    instead of reading them (no sync); ``check()`` raises the ValueError the eager call raises,
    same message; ``flush`` runs the checks first and changes nothing when they fail.  Large
    tensors with one bad element check that the device reduction propagates NaN and Inf."""
    from accelerated.cache import DeferredChecks
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=4,
                       residual_length=0)
    shape = (2, 2, 300, 64)
    ok = torch.ones(shape, device=device)
    cases = {
        "nan keys": lambda L, c: L.update(_nan_at(shape, (1, 0, 257, 3), device=device), ok, checks=c),
        "inf values": lambda L, c: L.update(ok, _nan_at(shape, (0, 1, 5, 63), float("-inf"), device), checks=c),
        "nan query": lambda L, c: L.attend(_nan_at((2, 4, 1, 64), (1, 3, 0, 0), device=device),
                                           torch.full((2, 1), 299, device=device), checks=c),
    }
    for name, call in cases.items():
        eager_layer = QuantizedKVCacheLayer(cfg)
        eager_layer.update(ok, ok)
        eager = _error(lambda: call(eager_layer, None))
        assert eager is not None and "NaN or Inf" in eager, name
        layer = QuantizedKVCacheLayer(cfg)
        layer.update(ok, ok)
        checks = DeferredChecks()
        call(layer, checks)                     # recorded, not raised
        assert _error(checks.check) == eager
        assert _error(checks.check) == eager    # idempotent
    # float16 storage overflow, and a preserve flag on padding (resolve)
    small = QuantizedKVCacheLayer(cfg, dtype=torch.float16)
    big = torch.full((1, 1, 1, 4), 1e6, device=device)
    eager = _error(lambda: small.update(big, torch.ones(1, 1, 1, 4, device=device)))
    checks = DeferredChecks()
    small.update(big, torch.ones(1, 1, 1, 4, device=device), checks=checks)
    assert "storage dtype" in eager and _error(checks.check) == eager
    layer = QuantizedKVCacheLayer(cfg)
    layer.update(torch.ones(2, 1, 5, 4, device=device), torch.ones(2, 1, 5, 4, device=device),
                 torch.tensor([[False] + [True] * 4, [True] * 5], device=device))
    bad = torch.tensor([[True] + [False] * 4, [False] * 5], device=device)
    eager = _error(lambda: layer.resolve(bad))
    checks = DeferredChecks()
    layer.resolve(bad, checks=checks)
    assert "padding" in eager and _error(checks.check) == eager
    # flush refuses tokens whose deferred checks failed, and changes nothing
    layer = QuantizedKVCacheLayer(cfg, device=device)
    checks = DeferredChecks()
    layer.update(ok, _nan_at(shape, (0, 0, 0, 0), device=device), checks=checks)
    layer.resolve(torch.zeros((2, 300), dtype=torch.bool, device=device))
    before = (layer.nbytes(), layer.num_quantized, layer.num_residual)
    with pytest.raises(ValueError, match="values contains NaN"):
        layer.flush()
    assert (layer.nbytes(), layer.num_quantized, layer.num_residual) == before
    # passing checks: flush quantizes as without them
    layer = QuantizedKVCacheLayer(cfg, device=device)
    checks = DeferredChecks()
    layer.update(ok, ok, checks=checks)
    layer.resolve(torch.zeros((2, 300), dtype=torch.bool, device=device), checks=checks)
    assert layer.flush() == 75 and checks.checked


@pytest.mark.parametrize("device", DEVICES)
def test_checks_recorded_by_slot_survive_crop_reorder_and_reset(device):
    """Keys and values recorded with ``checks`` (no conversion) are tested from the residual
    window when the checks are read (``DeferredChecks.finite_slots``: no operation per update);
    a crop, a row selection or a reset that drops the offending token evaluates them first, so
    the error is still raised; the first failure in recording order wins."""
    from accelerated.cache import DeferredChecks
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=4, residual_length=8)
    ok = torch.ones((2, 2, 1, 4), device=device)

    def layer_with(bad_step, side, bad_row=1):
        layer, checks = QuantizedKVCacheLayer(cfg, device=device), DeferredChecks()
        for step in range(6):
            bad = _nan_at(ok.shape, (bad_row, 1, 0, 2), device=device) if step == bad_step else ok
            k, v = (bad, ok) if side == "keys" else (ok, bad)
            layer.update(k, v, checks=checks)
            layer.resolve(torch.zeros((2, 1), dtype=torch.bool, device=device), checks=checks)
        return layer, checks

    for side in ("keys", "values"):
        layer, checks = layer_with(3, side)
        assert _error(checks.check) == f"{side} contains NaN or Inf; the cache stores finite values only"
        for drop in (lambda L: L.crop(3), lambda L: L.select_batch([0]), lambda L: L.reset()):
            layer, checks = layer_with(3, side)
            drop(layer)                          # the NaN token (position 3, row 1) is gone ...
            assert "NaN or Inf" in _error(checks.check)   # ... its check is not
    layer, checks = QuantizedKVCacheLayer(cfg, device=device), DeferredChecks()
    layer.update(ok, _nan_at(ok.shape, (0, 0, 0, 0), device=device), checks=checks)
    layer.update(_nan_at(ok.shape, (0, 0, 0, 0), device=device), ok, checks=checks)
    assert _error(checks.check).startswith("values contains")     # recorded first
    layer, checks = layer_with(4, "keys")        # the flush reads them, quantizes nothing
    while layer.num_residual < cfg.residual_length + cfg.token_block:
        layer.update(ok, ok, checks=checks)
        layer.resolve(torch.zeros((2, 1), dtype=torch.bool, device=device), checks=checks)
    with pytest.raises(ValueError, match="keys contains NaN"):
        layer.flush()
    assert layer.num_quantized == 0


class _SyncCounter:
    """Counts the Tensor methods that read device data on the host (a device->host sync on
    CUDA): item, tolist, bool/int/float conversions, cpu, numpy, nonzero."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
             "nonzero")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def method(t, *args, **kwargs):
            self.count += 1
            return original(t, *args, **kwargs)
        return method


def test_deferred_checks_do_not_sync_and_shared_visibility_is_exact(monkeypatch):
    """Layers updated, resolved and attended with one DeferredChecks and one ``shared`` dict
    read nothing on the host until ``check()`` (exactly one read), and give bit-identical
    attention to eager, unshared calls."""
    from accelerated.cache import DeferredChecks
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=4,
                       residual_length=5, max_preserved=3)
    g = torch.Generator().manual_seed(3)
    pre = [torch.randn(B, H, 23, D, generator=g) for _ in range(3)]
    valid = torch.ones(B, 23, dtype=torch.bool)
    valid[1, :4] = False
    flags = torch.zeros(B, 23, dtype=torch.bool)
    flags[:, 7] = True
    flags[0, 0] = flags[2, 13] = True
    eager = [QuantizedKVCacheLayer(cfg) for _ in range(3)]
    deferred = [QuantizedKVCacheLayer(cfg) for _ in range(3)]
    for layers in (eager, deferred):
        for layer, k in zip(layers, pre):
            layer.update(k, -k, valid)
            layer.resolve(flags & valid)
            layer.flush()
    new = [torch.randn(B, H, 1, D, generator=g) for _ in range(3)]
    queries = [torch.randn(B, HQ, 1, D, generator=g) for _ in range(3)]
    qp = torch.full((B, 1), 23)
    expected = []
    for layer, k, q in zip(eager, new, queries):
        layer.update(k, k)
        layer.resolve(torch.zeros(B, 1, dtype=torch.bool))
        expected.append(layer.attend(q, qp))
    counter = _SyncCounter(monkeypatch)
    checks, shared, got = DeferredChecks(), {}, []
    for layer, k, q in zip(deferred, new, queries):
        layer.update(k, k, checks=checks)
        layer.resolve(torch.zeros(B, 1, dtype=torch.bool), checks=checks)
        got.append(layer.attend(q, qp, checks=checks, shared=shared))
    assert counter.count == 0
    assert len(shared) == 2                 # preserved and residual visibility, made once
    checks.check()
    assert counter.count == 1
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- small D, zero-range groups

#: (key bits, value bits).  b = 3, 5, 6 pad a word's codes (CPW = 10, 6, 5) to 16, 8, 8 lanes whose
#: shift j*b would reach 33..45: LLVM poison, which folded the scores of the D = 1 decode kernel away
#: (accelerated/attention_kernels.py, "SHIFTS"); 1-bit values fill a word with 32 codes.
SMALL_BITS = [(3, 1), (1, 1), (5, 1), (6, 1), (2, 3), (1, 6)]


def _single_element_groups(key_bits, value_bits):
    """Groups of ONE element on both sides (keys per channel G = 1, values per token G = 1): every
    group has zero range, s = 0 and z = x, so each dequantized value is its input exactly."""
    return KVSinkConfig(key_bits=key_bits, value_bits=value_bits, key_group_size=1, value_group_size=1,
                        key_axis="channel", value_axis="token", scheme="asymmetric",
                        quantizer="uniform", residual_length=0, preserve=(), preserve_first_n=1)


@pytest.mark.parametrize("device", ["cpu", CUDA_KERNEL])
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("bits", SMALL_BITS, ids=[f"k{k}v{v}" for k, v in SMALL_BITS])
def test_small_head_dim_zero_range_groups(bits, d, device):
    """The H100 failure of conformance/test_cuda.py::test_cuda_cache_state_machine, and neighbours.

    Exactly that case first (D = 1, B = H = Hq = 1, float32, 3-bit keys, 1-bit values, one token
    0.12573022, nothing preserved, residual 0, flushed): attention of one visible key is that key's
    value, bit for bit (softmax weight exp(0) = 1, l = 1; the zero-range group dequantizes to z = x
    exactly, FMA or not: q*0 + z = z); CUDA gave 0.  Then, same kernel specialisation, several
    tokens with random values (still exact: single-element groups) and padding, attended at every
    position and before the first (nothing visible: exactly 0), against the reference within
    docs/09-tolerances.md 9.3.  On CUDA the kernel is required (``use_kernel=True``).
    """
    kb, vb = bits
    cfg = _single_element_groups(kb, vb)
    use_kernel = True if device == "cuda" else None
    x = np.float32(0.12573022)
    # 1. the failing case
    ours = QuantizedKVCacheLayer(cfg, dtype=torch.float32, device=device)
    tok = torch.full((1, 1, 1, d), float(x), device=device)
    ours.update(tok, tok.clone())
    ours.resolve(torch.zeros((1, 1), dtype=torch.bool, device=device))
    assert ours.flush() == 1 and ours.num_quantized == 1 and ours.num_residual == 0
    assert ours.preserved_positions()[0].numel() == 0
    keys, values, pos = ours.segments()[0]
    assert _np(pos).tolist() == [[0]]
    assert np.all(_np(keys)[:, :, :1] == x) and np.all(_np(values)[:, :, :1] == x)
    out = ours.attend(tok.clone(), torch.zeros((1, 1), dtype=torch.int64, device=device),
                      use_kernel=use_kernel)
    np.testing.assert_array_equal(_np(out), np.full((1, 1, 1, d), x, np.float32),
                                  err_msg="one visible key: the output is its value exactly")
    # 2. several tokens, random values, padding, two batch rows: still exact dequantization
    pair = Pair(cfg, device=device, seed=1000 * kb + 10 * vb + d)
    rng = pair.rng
    b, n = 2, 6
    k = rng.standard_normal((b, 1, n, d)).astype(np.float32)
    v = rng.standard_normal((b, 1, n, d)).astype(np.float32)
    k[:, :, 2] = v[:, :, 2] = x                       # a repeated value: zero range however grouped
    valid = np.ones((b, n), bool)
    valid[1, :2] = False                              # left padding of row 1
    for lo, hi in ((0, 4), (4, 5), (5, 6)):           # a prefill, then two decode steps
        pair.ref.update(k[:, :, lo:hi], v[:, :, lo:hi], valid[:, lo:hi])
        pair.ours.update(pair.t(k[:, :, lo:hi]), pair.t(v[:, :, lo:hi]), pair.t(valid[:, lo:hi]))
        none = np.zeros((b, hi - lo), bool)
        pair.ref.resolve(none)
        pair.ours.resolve(pair.t(none))
        assert pair.ours.flush() == pair.ref.flush() == hi - lo
    assert_same_state(pair.ours, pair.ref)
    qk, qv, qpos = pair.ours.segments()[0]
    live = _np(qpos) >= 0
    np.testing.assert_array_equal(_np(qk)[:, 0][live], k[:, 0][live], err_msg="keys dequantize exactly")
    np.testing.assert_array_equal(_np(qv)[:, 0][live], v[:, 0][live], err_msg="values dequantize exactly")
    for p in range(-1, n):
        q = rng.standard_normal((b, 1, 1, d)).astype(np.float32)
        qp = np.full((b, 1), p, np.int64)
        got = pair.ours.attend(pair.t(q), pair.t(qp), use_kernel=use_kernel)
        assert_attention_close(got, pair.ref, q, qp)
        if p == 0:                                    # row 0 sees one key: its value, exactly
            np.testing.assert_array_equal(_np(got)[0, 0, 0], v[0, 0, 0])
