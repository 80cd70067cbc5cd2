"""One full-attention layer of :class:`~accelerated.hf.KVSinkCache`: transformers' layer contract
(``CacheLayerMixin``) around one streaming layer of :mod:`accelerated.cache` (docs/11-transformers.md).

The store (the quantized blocks, the preserved tokens, the residual window) and its attention live
in :mod:`accelerated.cache`; this module only adapts it to what transformers calls on a cache layer
(``update``, ``get_seq_length``, ``crop``, ``reorder_cache``, ...) and to what the step machinery of
:mod:`accelerated.hf.step` calls (``resolve``, ``flush``, ``attend``).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers.cache_utils import CacheLayerMixin

from reference.config import KVSinkConfig

__all__ = ["KVSinkLayer", "new_store", "dynamic_cache_nbytes"]


def new_store(config: KVSinkConfig, key_states: torch.Tensor, kvquant_calibration=None,
              rope_inv_freq=None):
    """One ``accelerated.cache`` streaming layer for tokens like ``key_states`` (its device, its dtype);
    kvquant: with the layer's calibration and the model's rotary ``inv_freq``."""
    from ..cache import QuantizedKVCacheLayer
    params = inspect.signature(QuantizedKVCacheLayer).parameters
    kwargs = {}
    if config.quantizer == "kvquant":
        kwargs["kvquant_calibration"] = kvquant_calibration
        kwargs["rope_inv_freq"] = rope_inv_freq
    if "dtype" in params:
        kwargs["dtype"] = key_states.dtype
    if "device" in params:
        kwargs["device"] = key_states.device
    return QuantizedKVCacheLayer(config, **kwargs)


def _read_int(store, name: str) -> Optional[int]:
    """``store.<name>`` as an int whether it is a property or a method (None if absent or None)."""
    v = getattr(store, name, None)
    if callable(v):
        v = v()
    return None if v is None else int(v)


def store_has_pending(store) -> bool:
    """Whether ``store`` holds tokens whose preservation status is not resolved yet."""
    return bool(_read_int(store, "n_pending"))


def dynamic_cache_nbytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers ``DynamicCache`` (or any cache of such layers)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class KVSinkLayer(CacheLayerMixin):
    """One full-attention layer of :class:`KVSinkCache` (a transformers ``CacheLayerMixin``).

    Holds one ``accelerated.cache`` streaming layer, created lazily on the
    device and in the dtype of the first key states it receives (so layers
    spread over devices with ``device_map`` keep their cache on their own
    device).  ``update`` appends the new tokens as *pending* and returns the
    new key/value states unchanged (the ``"kvsink"`` attention function reads
    the cache through :meth:`attend`, never through these tensors).
    ``last_new`` is the number of tokens appended by the current forward step.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, config: KVSinkConfig, layer_idx: int, *, kvquant_calibration=None,
                 rope_inv_freq=None, max_cache_len: Optional[int] = None):
        super().__init__()
        #: None: the growing layer; an int: the bound of the compileable cache (constant mask sizes)
        self.max_cache_len = max_cache_len
        self.is_compileable = max_cache_len is not None
        self.length_tensor = None     # compileable cache: the slots held, on the device
        self.kvsink_config = config
        self.layer_idx = layer_idx
        self.kvquant_calibration = kvquant_calibration   # kvquant only
        self.rope_inv_freq = rope_inv_freq               # kvquant only
        self.store = None
        self.device = None
        self.last_new = 0          # tokens appended by the current forward step

    def __repr__(self):
        return f"KVSinkLayer(layer_idx={self.layer_idx}, seq_length={self.get_seq_length()})"

    # -- transformers' layer contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.store = new_store(self.kvsink_config, key_states, self.kvquant_calibration,
                               self.rope_inv_freq)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, valid=None, rope_positions=None, checks=None,
               **kwargs):
        """Append ``(B, H, n, D)`` tokens (pending); returns the inputs unchanged.

        ``rope_positions`` (kvquant only): int ``(B, n)``, the rotary positions of the
        new tokens (the model's ``position_ids``); None = their slot positions.
        ``checks``: an ``accelerated.cache.DeferredChecks`` recording the value checks
        (read before the next flush quantizes, docs/11 §11.3), or None to check here."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if valid is not None:
            valid = valid.to(self.device)
        if rope_positions is None:
            self.store.update(key_states, value_states, valid=valid, checks=checks)
        else:
            self.store.update(key_states, value_states, valid=valid,
                              rope_positions=rope_positions.to(self.device), checks=checks)
        self.last_new = key_states.shape[-2]
        self.publish_length()
        return key_states, value_states

    def get_seq_length(self) -> int:
        """Slots held.  Traced by torch.compile (the compileable cache, ``max_cache_len``): a 0-d
        int64 tensor on the layer's device holding it (as transformers' ``StaticLayer``), so the
        traced code reads no Python int that changes per step."""
        if torch.compiler.is_compiling() and self.length_tensor is not None:
            return self.length_tensor
        return 0 if self.store is None else _read_int(self.store, "seq_length")

    def publish_length(self) -> None:
        """The compileable cache keeps :attr:`length_tensor` equal to the slots held (one fill)."""
        if self.max_cache_len is None or self.store is None:
            return
        if self.length_tensor is None:
            self.length_tensor = torch.zeros((), dtype=torch.int64, device=self.device)
        self.length_tensor.fill_(_read_int(self.store, "seq_length"))

    def share_length(self, layers) -> None:
        """Every layer of ``layers`` (holding the same slots) reads this layer's
        :attr:`length_tensor`: a captured step fills one (accelerated/hf/captured.py)."""
        self.publish_length()
        for layer in layers:
            layer.length_tensor = self.length_tensor

    def get_mask_sizes(self, query_length: int):
        """``(kv_length, kv_offset)``; with ``max_cache_len`` the constant ``(max_cache_len, 0)``, as
        transformers' ``StaticCache``, so a compiled forward's shapes do not change per step (the
        kvsink attention takes no mask: causality and padding live in the cache)."""
        if self.max_cache_len is not None:
            return self.max_cache_len, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def reset(self) -> None:
        self.store = None
        self.is_initialized = False
        self.last_new = 0
        self.length_tensor = None

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-n)`` drops the last ``n`` tokens; ``crop(m)`` with ``m > 0`` keeps the first ``m`` (legacy)."""
        if self.store is None:
            return
        n = self.get_seq_length()
        keep = n - abs(tokens_to_remove) if tokens_to_remove <= 0 else min(tokens_to_remove, n)
        if keep < n:
            self.store.crop(max(keep, 0))
            self.publish_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store is not None:
            self.store.reorder(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            b = self.store_batch_size()
            idx = torch.arange(b, device=self.device).repeat_interleave(repeats)
            self.store.select_batch(idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            if isinstance(indices, torch.Tensor):
                indices = indices.to(self.device)
            self.store.select_batch(indices)

    def offload(self):  # the packed store is not offloaded
        return None

    def prefetch(self):
        return None

    # -- kvsink
    def store_batch_size(self) -> int:
        b = _read_int(self.store, "batch_size")
        if b is None:
            raise RuntimeError("accelerated.cache layer exposes no batch_size")
        return b

    def has_pending(self) -> bool:
        """Whether the store holds tokens whose preservation status is not resolved yet."""
        return self.store is not None and store_has_pending(self.store)

    def resolve(self, preserve: torch.Tensor, checks=None, *, excludes_padding: bool = False) -> None:
        """The status of the pending tokens (``QuantizedKVCacheLayer.resolve``)."""
        self.store.resolve(preserve.to(self.device), checks=checks, excludes_padding=excludes_padding)

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()

    def num_due(self) -> int:
        """Tokens the next :meth:`flush` moves out of the residual (host arithmetic, no device read)."""
        return 0 if self.store is None else self.store.num_due

    def attend(self, query: torch.Tensor, scale: Optional[float], positions=None,
               checks=None, shared=None) -> torch.Tensor:
        """Attention of ``query (B, Hq, n, D)``, the step's ``n`` newest slots, over this layer's cache.

        ``positions``: int64 ``(B, n)``, those slots (computed here when None; the forward
        computes them once for all layers); ``checks``: see :meth:`update`; ``shared``: the
        step's dict of visibility masks shared by the layers (``QuantizedKVCacheLayer.attend``:
        every kvsink layer of a forward holds the same slots).  Returns ``(B, Hq,
        n, D)`` in the query's dtype, a transposed view of a contiguous ``(B, n, Hq, D)`` tensor
        (the layout the attention interface returns, so that no second copy is needed)."""
        if positions is None:
            n = query.shape[-2]
            seq = self.get_seq_length()
            positions = torch.arange(seq - n, seq, device=query.device).expand(query.shape[0], n)
        out = self.store.attend(query, positions, scale=scale, checks=checks, shared=shared,
                                out_dtype=query.dtype)
        return out.transpose(1, 2).to(query.dtype, memory_format=torch.contiguous_format).transpose(1, 2)

    def nbytes(self) -> int:
        return 0 if self.store is None else int(self.store.nbytes())
