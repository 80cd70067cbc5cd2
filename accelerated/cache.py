"""Streaming quantized KV cache, torch twin of ``reference/cache.py`` (docs/06-cache.md).

Same classes, same methods, same semantics as the reference, the state on the
tensors' device, the quantized part stored packed (no full-precision copy of
a quantized token is kept).  The modules (docs/06-cache.md, "Accelerated layout"):

* ``accelerated/cache_layer.py``: :class:`QuantizedKVCacheLayer`, the layer
  shared by both quantizers, and :func:`make_store`;
* ``accelerated/cache_state.py``: the residual window and preserved store records;
* ``accelerated/cache_store.py``: the quantized store's base class and the
  uniform (KIVI-style) store in the packed layout the Triton kernel reads;
* ``accelerated/cache_kvquant.py``: the KVQuant-style store;
* ``accelerated/cache_checks.py``: argument checks and :class:`DeferredChecks`.

This module holds :class:`QuantizedKVCache` (all layers) and re-exports the
public names of those modules, so ``from accelerated.cache import X`` keeps working.
"""

from __future__ import annotations

from typing import Optional

import torch

from reference import cache as _rcache
from reference.config import KVSinkConfig

from .cache_checks import DeferredChecks
from .cache_flush import flush_layers
from .cache_kvquant import KVQuantCacheBlock, KVQuantStore, PackedKVQuantTensor, quantize_block_kvquant_cache
from .cache_layer import STORES, QuantizedKVCacheLayer, make_store
from .cache_state import PreservedStore, ResidualWindow, admit_preserved, flushed_length, steady_capacity
from .cache_store import PackedBuffers, QuantizedBlock, QuantizedStore, UniformStore

__all__ = [
    "QuantizedBlock",
    "KVQuantCacheBlock",
    "QuantizedStore",
    "UniformStore",
    "KVQuantStore",
    "STORES",
    "make_store",
    "ResidualWindow",
    "PreservedStore",
    "QuantizedKVCacheLayer",
    "QuantizedKVCache",
    "layer_calibrations",
    "quantize_block_kvquant_cache",
    "admit_preserved",
    "flushed_length",
    # accelerated only (docs/06-cache.md "Accelerated layout"; tests/test_layout.py INTENDED says why)
    "DeferredChecks",
    "PackedKVQuantTensor",
    "PackedBuffers",
    "steady_capacity",
]

#: The per-layer calibration list's check, shared with the reference (definition 6.18).
layer_calibrations = _rcache.layer_calibrations


class QuantizedKVCache(_rcache.QuantizedKVCache):
    """One :class:`QuantizedKVCacheLayer` per decoder layer, operated together (definition 6.18).

    ``update`` is per layer; ``resolve``, ``flush``, ``crop``, ``reorder``,
    ``select_batch`` and ``reset`` apply to every layer; ``nbytes`` is the sum.
    The per-layer loops are the reference's (``reference.cache.QuantizedKVCache``);
    this class builds torch layers and adds the torch-side arguments.
    """

    def __init__(self, config: KVSinkConfig, num_layers: int, *, dtype=torch.float32, device=None,
                 kvquant_calibration=None, rope_inv_freq=None):
        self.config = config
        self.layers = [QuantizedKVCacheLayer(config, dtype=dtype, device=device, kvquant_calibration=cal,
                                             rope_inv_freq=rope_inv_freq)
                       for cal in _rcache.layer_calibrations(kvquant_calibration, num_layers)]

    def update(self, layer_idx: int, keys, values, valid=None, rope_positions=None, *,
               checks: Optional[DeferredChecks] = None) -> None:
        """:meth:`QuantizedKVCacheLayer.update` of layer ``layer_idx``."""
        self.layers[self._check_layer(layer_idx)].update(keys, values, valid, rope_positions,
                                                         checks=checks)

    def resolve(self, preserve) -> None:
        """Resolve the pending tokens of every layer with the same ``preserve`` (B, n_pending).

        All layers must hold the same number of pending tokens; everything is
        checked before any layer changes.
        """
        counts = {layer.num_pending for layer in self.layers}
        if len(counts) != 1:
            raise RuntimeError(f"layers hold different numbers of pending tokens {sorted(counts)}; "
                               "update every layer before resolve()")
        for layer in self.layers:        # validate everywhere first: all or nothing
            if layer.batch_size is not None:
                layer.check_preserve(preserve)
        for layer in self.layers:
            layer.resolve(preserve)

    def flush(self) -> int:
        """Flush every layer; returns the total blocks flushed.  Every layer is planned (checked
        for pending due tokens) and its checks read before any changes, with one device->host
        read for all of them on the kernel path (:func:`accelerated.cache_flush.flush_layers`)."""
        return flush_layers(self.layers)

    def attend(self, layer_idx: int, query, query_positions, scale=None, **kwargs) -> torch.Tensor:
        return self.layers[self._check_layer(layer_idx)].attend(query, query_positions, scale, **kwargs)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)
