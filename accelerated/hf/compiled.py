"""A :class:`~accelerated.hf.KVSinkCache` inside ``torch.compile`` (docs/11-transformers.md §11.11).

What dynamo traces of a forward with a ``KVSinkCache`` is the model's own computation (norms,
projections, rotary embedding, MLP); what the cache does (append, resolve, attend, flush) is Python
with state that changes every step, so it stays out of the traced graph as two **custom operators**
that run eagerly, tagged ``cudagraph_unsafe`` so that inductor's graph partitioning captures the
model's computation between them as CUDA graphs (``mode="reduce-overhead"``):

* ``kvsink::layer_input(hidden, layer_idx)``: the input of the predictor's decoder layer
  ``hidden_states[p]`` reaches the cache (``StepState.on_predictor_input``); returns a copy of
  ``hidden`` that the layer then reads, which orders the call before the layer's attention.
* ``kvsink::cache_attention(query, key, value, layer_idx, scaling)``: appends the step's keys and
  values to the layer (what ``KVSinkCache.update`` does in an eager forward; traced, ``update``
  returns its inputs untouched) and attends over it, exactly the eager ``"kvsink"`` attention.

The hooks that begin and end a forward (:mod:`accelerated.hf.hooks`) are excluded from tracing
(``torch.compiler.disable``): they run between the compiled graphs, outside the decoder-layer loop.
The traced code reads only :func:`accelerated.hf.step.compiled_view` (constants dynamo guards on), so
one compiled graph serves every step; a cache with ``max_cache_len`` reports constant mask sizes, so
transformers' ``generate`` compiles its decode forward (``is_compileable``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .step import active_cache

__all__ = ["cache_attention", "layer_input", "observe_layer_input", "attend_layer"]

#: the two operators are opaque to CUDA graphs: inductor partitions the graph around them (a torch
#: without the tag must fail here, not capture the cache's Python as a replayed graph)
_TAGS = (torch.Tag.cudagraph_unsafe,)


def observe_layer_input(cache, layer_idx: int, hidden: torch.Tensor) -> None:
    """Hand ``hidden`` (the input of decoder layer ``layer_idx``) to ``cache`` when it is its
    predictor's ``hidden_states[p]`` (``StepState.on_predictor_input``)."""
    if cache is not None and cache.predictor is not None and cache.predictor.layer == layer_idx:
        cache.steps.on_predictor_input(hidden)


def attend_layer(cache, layer, query: torch.Tensor, scaling: Optional[float]) -> torch.Tensor:
    """The eager ``"kvsink"`` attention of one kvsink ``layer`` of ``cache`` over its cache (the
    step's tokens already appended): ``(B, n, Hq, D)`` contiguous, in the query's dtype; a prefill
    then flushes the layer (``StepState.flush_early``)."""
    step = cache.steps.current
    positions = cache.steps.query_positions(query)
    out = layer.attend(query, scaling, positions=positions,
                       checks=None if step is None else step.checks,
                       shared=None if positions is None else step.shared)
    cache.steps.flush_early([layer])                     # a prefill: this layer is done
    return out.transpose(1, 2).contiguous()            # contiguous already: no copy


def _active_kvsink_cache(what: str):
    cache = active_cache()
    if cache is None:
        raise RuntimeError(f"kvsink::{what} ran outside a forward with a KVSinkCache (the compiled "
                           "graph was traced with one): pass the cache to the compiled model")
    return cache


@torch.library.custom_op("kvsink::layer_input", mutates_args=(), tags=_TAGS)
def layer_input(hidden: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """``hidden`` (copied) after the active cache has seen it as the input of layer ``layer_idx``."""
    observe_layer_input(_active_kvsink_cache("layer_input"), layer_idx, hidden)
    return hidden.clone()


@layer_input.register_fake
def _layer_input_fake(hidden, layer_idx):
    return torch.empty_like(hidden)


@torch.library.custom_op("kvsink::cache_attention", mutates_args=(), tags=_TAGS)
def cache_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                    scaling: Optional[float]) -> torch.Tensor:
    """Append ``key``/``value`` ``(B, H, n, D)`` to layer ``layer_idx`` of the active cache and
    attend ``query`` ``(B, Hq, n, D)`` over it: ``(B, n, Hq, D)`` in the query's dtype."""
    cache = _active_kvsink_cache("cache_attention")
    cache.update(key, value, layer_idx)           # not traced here: the eager append
    return attend_layer(cache, cache.layers[layer_idx], query, scaling)


@cache_attention.register_fake
def _cache_attention_fake(query, key, value, layer_idx, scaling):
    b, hq, n, d = query.shape
    return query.new_empty((b, n, hq, d))
