"""The quantized KV cache, streaming semantics: docs/06-cache.md.

This module is the specification every port's cache is checked against.  One
layer's cache, :class:`QuantizedKVCacheLayer`, holds three stores:

* the **quantized store** (definition 6.5): flushed blocks, each
  ``token_block`` consecutive slots quantized at once, codes kept packed;
* the **preserved store** (definition 6.6): the tokens marked "preserve" (the
  attention sinks), at full precision, with their positions;
* the **residual window** (definition 6.3): the most recent tokens at full
  precision, whose preservation status may still be *pending*.

Life of a token (docs/06-cache.md §6.0)::

    update()  -> residual, status pending
    resolve() -> residual, status "preserve" or "quantize"
    flush()   -> quantized store (its code is written exactly once)
                 or preserved store (full precision, until crop/reset)

Nothing is ever re-quantized and nothing is dropped, except by :meth:`crop`,
:meth:`select_batch` and :meth:`reset`, which the caller asks for.

:func:`quantize_sequence` gives the same contents in one shot (definition
6.10); the streaming operations are specified so that prefill + decode steps
produce exactly the one-shot result (theorem 6.11).

Layout
------
* ``reference.cache`` (this module): :class:`QuantizedKVCache`, one layer
  per decoder layer (definition 6.18), and every public name below.
* ``reference.cache_layer``: :class:`QuantizedKVCacheLayer`, the behaviour
  every quantizer shares (update, resolve, the flush loop, crop, reorder /
  select_batch, reset, segments, attend, nbytes); :func:`make_store`, the
  one place that looks at ``config.quantizer``; :func:`quantize_sequence`.
* ``reference.cache_state``: the full-precision state as records,
  :class:`ResidualWindow`, :class:`PreservedStore`, and the flush-step
  arithmetic :func:`flushed_length`, :func:`admit_preserved`.
* ``reference.cache_store``: :class:`QuantizedStore`, the quantized store's
  base class and its small per-quantizer interface, and :class:`UniformStore`
  (blocks :class:`QuantizedBlock` of :class:`PackedQuantized`).
* ``reference.cache_kvquant``: :class:`KVQuantStore` (blocks
  :class:`KVQuantCacheBlock`).
* ``reference.cache_checks``: the argument checks.

Their classes and cache functions are importable from here too (the
argument checks and small helpers stay in their modules).

Shapes: ``B`` batch rows, ``H`` KV heads, ``D`` head dimension, all fixed by
the first :meth:`~QuantizedKVCacheLayer.update`; ``n`` tokens of one update;
``blk = config.token_block``; ``R = config.residual_length``.
"""

from __future__ import annotations

from typing import List

import numpy as np

from .cache_checks import STORAGE_DTYPES, is_int
from .cache_kvquant import KVQuantCacheBlock, KVQuantStore, quantize_block_kvquant_cache
from .cache_layer import STORES, QuantizedKVCacheLayer, make_store, quantize_sequence
from .cache_state import PreservedStore, ResidualWindow, admit_preserved, flushed_length
from .cache_store import PackedQuantized, QuantizedBlock, QuantizedStore, UniformStore, quantize_block
from .config import KVSinkConfig

__all__ = [
    "STORAGE_DTYPES",
    "PackedQuantized",
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
    "quantize_block",
    "quantize_block_kvquant_cache",
    "admit_preserved",
    "flushed_length",
    "quantize_sequence",
]


# --------------------------------------------------------------------------
# Definition 6.18: all layers of a model
# --------------------------------------------------------------------------

def layer_calibrations(kvquant_calibration, num_layers: int) -> list:
    """The per-layer KVQuant calibrations of a ``num_layers``-layer cache (6.18).

    ``kvquant_calibration`` is None (every layer gets None) or a sequence of
    exactly ``num_layers`` calibrations; ``num_layers`` an int >= 1.
    """
    if not is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if kvquant_calibration is None:
        return [None] * int(num_layers)
    cals = list(kvquant_calibration)
    if len(cals) != num_layers:
        raise ValueError(f"kvquant_calibration must hold one KVQuantCalibration per layer "
                         f"({num_layers}), got {len(cals)}")
    return cals


class QuantizedKVCache:
    """One :class:`QuantizedKVCacheLayer` per decoder layer, operated together (6.18).

    ``update`` is per layer (attention runs layer by layer); ``resolve``,
    ``flush``, ``crop``, ``reorder``, ``select_batch`` and ``reset`` apply to
    every layer; ``nbytes`` is the sum over layers.  kvquant:
    ``kvquant_calibration`` is None or a list with one ``KVQuantCalibration``
    per layer; ``rope_inv_freq`` is shared by the layers.
    """

    def __init__(self, config: KVSinkConfig, num_layers: int, *, dtype=np.float32,
                 kvquant_calibration=None, rope_inv_freq=None):
        self.config = config
        self.layers = [QuantizedKVCacheLayer(config, dtype=dtype, kvquant_calibration=cal,
                                             rope_inv_freq=rope_inv_freq)
                       for cal in layer_calibrations(kvquant_calibration, num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> QuantizedKVCacheLayer:
        return self.layers[self._check_layer(layer_idx)]

    def _check_layer(self, layer_idx) -> int:
        if not is_int(layer_idx) or not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx must be an int in [0, {len(self.layers)}), "
                             f"got {layer_idx!r}")
        return int(layer_idx)

    def update(self, layer_idx: int, keys, values, valid=None, rope_positions=None) -> None:
        """:meth:`QuantizedKVCacheLayer.update` of layer ``layer_idx``."""
        self.layers[self._check_layer(layer_idx)].update(keys, values, valid, rope_positions)

    def resolve(self, preserve) -> None:
        """Resolve the pending tokens of every layer with the same ``preserve`` (B, n_pending).

        All layers must hold the same number of pending tokens (every layer
        was updated with the same tokens); checked before any layer changes.
        """
        counts = {layer.num_pending for layer in self.layers}
        if len(counts) != 1:
            raise RuntimeError(f"layers hold different numbers of pending tokens {sorted(counts)}; "
                               "update every layer before resolve()")
        preserve = np.asarray(preserve)
        for layer in self.layers:        # validate everywhere first: all or nothing
            if layer.batch_size is not None:
                layer.check_preserve(preserve)
        for layer in self.layers:
            layer.resolve(preserve)

    def flush(self) -> int:
        """Flush every layer; returns the total number of blocks flushed.

        Checked for pending tokens in every layer before any layer changes.
        """
        for layer in self.layers:
            layer.check_flushable()
        return sum(layer.flush() for layer in self.layers)

    def segments(self, layer_idx: int):
        return self.layers[self._check_layer(layer_idx)].segments()

    def attend(self, layer_idx: int, query, query_positions, scale=None) -> np.ndarray:
        return self.layers[self._check_layer(layer_idx)].attend(query, query_positions, scale)

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)

    def reorder(self, beam_idx) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)

    def select_batch(self, indices) -> None:
        for layer in self.layers:
            layer.select_batch(indices)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def seq_length(self) -> int:
        """Slots of layer 0 (all layers agree between forward passes)."""
        return self.layers[0].seq_length

    def preserved_positions(self, layer_idx: int = 0) -> List[np.ndarray]:
        return self.layers[self._check_layer(layer_idx)].preserved_positions()
