"""The ``"kvsink"`` attention and mask functions of transformers' ``AttentionInterface`` /
``AttentionMaskInterface`` (docs/11-transformers.md §11.3), and their registration.

For a layer held by the active :class:`~accelerated.hf.KVSinkCache` (:func:`accelerated.hf.step.active_cache`)
as a :class:`~accelerated.hf.KVSinkLayer`, attention is the cache layer's ``attend`` (packed codes +
preserved store + residual, :mod:`accelerated.cache`); for any other layer, or a forward without a
``KVSinkCache``, it is transformers' ``sdpa`` attention.  In a captured decode step
(:mod:`accelerated.hf.captured`) it is ``captured_attention_step``, traced into the step's graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from .captured import captured_attention_step
from .compiled import attend_layer, cache_attention
from .layer import KVSinkLayer
from .step import active_cache, compiled_view

__all__ = ["ATTENTION_NAME", "kvsink_attention", "kvsink_mask", "register"]

#: Name of the attention function in transformers' ``AttentionInterface`` (and mask interface).
ATTENTION_NAME = "kvsink"


def _kvsink_layer(cache, module) -> Optional[KVSinkLayer]:
    """The ``KVSinkLayer`` of ``cache`` that ``module`` (an attention module) reads, or None."""
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or layer_idx is None or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    return layer if isinstance(layer, KVSinkLayer) else None


def _check_options(dropout: float, kwargs) -> None:
    """What the kvsink attention refuses: dropout, soft-capping, attention sinks."""
    if dropout:
        raise ValueError("kvsink attention is inference only (dropout > 0); call model.eval()")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"kvsink attention does not support {name!r}")


def _check_call(layer: KVSinkLayer, query, dropout: float, kwargs) -> None:
    """:func:`_check_options`, a sliding window, and the query count against the layer's update."""
    _check_options(dropout, kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"layer {layer.layer_idx} received sliding_window={kwargs['sliding_window']} "
                         "but is a full-attention kvsink layer")
    if layer.last_new != query.shape[-2]:
        raise RuntimeError(f"kvsink attention: layer {layer.layer_idx} got {query.shape[-2]} queries "
                           f"but {layer.last_new} new tokens")


def kvsink_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: Optional[float] = None, **kwargs):
    """transformers attention function ``"kvsink"`` (see ``AttentionInterface``).

    For a layer held by the active :class:`KVSinkCache` as a :class:`KVSinkLayer`:
    ``attend`` over its cache (``key``/``value`` are then only the step's new
    tokens, already in the cache, and ``attention_mask`` is ignored: causality is
    by cache slot, padding by the cache's validity flags).  Otherwise: transformers'
    ``sdpa_attention_forward``.  Returns ``(B, n, Hq, D), None``.  Traced by ``torch.compile``:
    the custom operator ``kvsink::cache_attention`` (which also appends ``key``/``value``,
    :mod:`accelerated.hf.compiled`) for a full-attention layer of a forward with a KVSinkCache.
    """
    if torch.compiler.is_compiling():
        view = compiled_view()
        if view is not None and kwargs.get("sliding_window") is None:
            _check_options(dropout, kwargs)
            if view[2] is not None:           # a captured step: the cache work in the graph
                return captured_attention_step(query, key, value, module.layer_idx, scaling), None
            return cache_attention(query, key, value, module.layer_idx, scaling), None
    else:
        cache = active_cache()
        layer = _kvsink_layer(cache, module)
        if layer is not None:
            if cache.steps.current is not None and cache.steps.current.captured:
                _check_options(dropout, kwargs)
                return captured_attention_step(query, key, value, module.layer_idx, scaling), None
            _check_call(layer, query, dropout, kwargs)
            return attend_layer(cache, layer, query, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def kvsink_mask(*args, **kwargs):
    """Mask interface ``"kvsink"``: no mask while a KVSinkCache without full-precision layers is
    active (causality/padding live in the cache); transformers' sdpa mask otherwise."""
    if torch.compiler.is_compiling():
        view = compiled_view()
        if view is not None and not view[0]:
            return None
    else:
        cache = active_cache()
        if cache is not None and not cache.has_full_precision_layers:
            return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register :func:`kvsink_attention` and :func:`kvsink_mask` under :data:`ATTENTION_NAME`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTENTION_NAME, kvsink_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, kvsink_mask)
