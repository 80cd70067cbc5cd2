"""The reference cache holds memory for the tokens it holds, never for a configured maximum
(docs/06-cache.md definition 6.17; issue 13).

``nbytes()`` (definition 6.17) counts the arrays a layer holds.  These tests check that the
memory those arrays keep alive -- each distinct underlying buffer once, numpy views included --
is exactly that: a view must not keep the flushed or cropped-away part of a larger buffer alive.
"""

import numpy as np
import pytest

from reference.cache import QuantizedKVCacheLayer
from reference.config import KVSinkConfig
from reference.kvquant import rope_inv_freq

B, H, D = 2, 2, 8


def _owner(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (``a`` itself unless ``a`` is a view)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def kept_alive_bytes(arrays) -> int:
    """Bytes of memory ``arrays`` keep alive: each distinct owning buffer counted once."""
    owners = {}
    for a in arrays:
        o = _owner(a)
        owners[id(o)] = o
    return sum(o.nbytes for o in owners.values())


def full_precision_arrays(layer):
    """The residual window's and the preserved store's arrays (the rotary positions with kvquant)."""
    arrays = list(layer.residual) + list(layer.preserved)
    if layer.kvquant:
        arrays.append(layer.residual_rope_positions)
    return arrays


def block_arrays(layer):
    """Every array of the uniform quantizer's blocks (codes, statistics, masks)."""
    out = []
    for blk in layer.blocks:
        out.append(blk.coded)
        for side in (blk.keys, blk.values):
            out += [side.words, side.scale] + ([] if side.zero is None else [side.zero])
    return out


def assert_holds_what_it_stores(layer):
    fp = full_precision_arrays(layer)
    assert kept_alive_bytes(fp) == sum(a.nbytes for a in fp)
    if not layer.kvquant:
        arrays = block_arrays(layer)
        assert kept_alive_bytes(arrays) == sum(a.nbytes for a in arrays)
        assert kept_alive_bytes(fp + arrays) == layer.nbytes()


def make_layer(quantizer, **kw):
    if quantizer == "kvquant":
        config = KVSinkConfig(quantizer="kvquant", key_bits=3, value_bits=3, key_group_size=4,
                              value_group_size=8, outlier_fraction=0, **kw)
        return QuantizedKVCacheLayer(config, rope_inv_freq=rope_inv_freq(D))
    config = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=8, **kw)
    return QuantizedKVCacheLayer(config)


def feed(layer, t, seed=0, sinks=(0, 3)):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, H, t, D)).astype(np.float32)
    v = rng.standard_normal((B, H, t, D)).astype(np.float32)
    layer.update(k, v)
    preserve = np.zeros((B, t), bool)
    preserve[:, [s for s in sinks if s < t]] = True
    layer.resolve(preserve)
    return layer.flush()


@pytest.mark.parametrize("quantizer", ["uniform", "kvquant"])
def test_after_a_prefill_flush_only_the_window_is_kept(quantizer):
    """A 200-token prefill with R = 8 (blk = 4): after its flush the full-precision parts keep only the
    residual window and the sinks alive, not the 200 prefill tokens."""
    layer = make_layer(quantizer, residual_length=8)
    assert feed(layer, 200) > 0
    assert layer.num_residual < 8 + layer.config.token_block
    assert_holds_what_it_stores(layer)
    feed(layer, 1, seed=1)                                   # a decode step
    assert_holds_what_it_stores(layer)


@pytest.mark.parametrize("quantizer", ["uniform", "kvquant"])
def test_after_crop_reorder_and_select_only_what_is_held_is_kept(quantizer):
    layer = make_layer(quantizer, residual_length=40)
    feed(layer, 60)
    layer.crop(layer.seq_length - 30)                        # into the residual window
    assert_holds_what_it_stores(layer)
    layer.crop(5)                                            # into the quantized store
    assert_holds_what_it_stores(layer)
    feed(layer, 20, seed=2, sinks=())
    layer.reorder(np.array([1, 1]))
    assert_holds_what_it_stores(layer)
    layer.select_batch(np.array([0]))
    assert_holds_what_it_stores(layer)


@pytest.mark.parametrize("quantizer", ["uniform", "kvquant"])
def test_a_large_residual_length_allocates_nothing_for_it(quantizer):
    """residual_length=100000 and 14 tokens: 14 tokens' worth of memory (the probe of issue 13)."""
    layer = make_layer(quantizer, residual_length=100000)
    assert feed(layer, 14) == 0
    itemsize = 4
    exact = 2 * B * H * 14 * D * itemsize + 2 * B * 14               # keys, values, valid, statuses
    if quantizer == "kvquant":
        exact += 4 * B * 14 + layer.kvquant_calibration.nbytes      # rotary positions, calibration
    p = max(len(x) for x in layer.preserved_positions())
    exact += 2 * B * H * p * D * itemsize + 8 * B * p                 # the preserved store (empty)
    assert p == 0 and layer.nbytes() == exact
    assert_holds_what_it_stores(layer)
