"""kvsink inside Hugging Face transformers: :class:`KVSinkCache` (docs/11-transformers.md).

Usage::

    from accelerated.hf import KVSinkCache
    from reference.config import KVSinkConfig

    cache = KVSinkCache(model, KVSinkConfig(key_bits=2, value_bits=2, preserve="kvsink"),
                        tokenizer=tokenizer)            # tokenizer: only to calibrate the predictor
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Where each concern lives (docs/ARCHITECTURE.md draws how a token flows through them):

* :mod:`accelerated.hf.cache` -- :class:`KVSinkCache`, a transformers ``Cache`` whose
  full-attention layers are :class:`KVSinkLayer` objects; construction and the Cache API.
* :mod:`accelerated.hf.layer` -- :class:`KVSinkLayer`, transformers' ``CacheLayerMixin`` around one
  ``accelerated.cache`` streaming layer (the quantized store, preserved tokens, residual window).
  Sliding-window layers (Gemma-3 local layers) stay transformers' full-precision
  ``DynamicSlidingWindowLayer``: they never hold more than the window.
* :mod:`accelerated.hf.step` -- the per-forward state (``cache.steps``): new tokens appended as
  pending, their preservation status resolved once per forward (after the predictor read
  ``hidden_states[p]``, from per-row counts on the device), every layer flushed when the forward
  ends (in a prefill, each layer as soon as it has attended and its tokens are resolved); the
  deferred value checks are read by the first flush that quantizes (a step that flushes nothing
  reads nothing from the device) or at once with ``eager_checks=True`` (docs/11-transformers.md
  §11.3 "Validation", "Flush timing in a prefill").
* :mod:`accelerated.hf.attention` -- the ``"kvsink"`` attention and mask functions registered in
  transformers' ``AttentionInterface``: a kvsink layer's ``attend`` (no dequantized copy of the
  cache), ``sdpa`` for any other layer or a forward without a ``KVSinkCache``.
* :mod:`accelerated.hf.hooks` -- :func:`install` / :func:`uninstall`: the forward hooks that bind a
  cache to a forward call and drive ``cache.steps``.
* :mod:`accelerated.hf.compiled` -- the cache inside ``torch.compile``: its work as two custom
  operators kept out of CUDA graphs, so that ``KVSinkCache(..., max_cache_len=N)`` is compiled by
  ``generate`` (docs/11-transformers.md §11.11).
* :mod:`accelerated.hf.registration` -- ``kvsink_cache`` / ``kvsink_generate_kwargs``: the cache from
  a ``cache_config`` dict for ``generate`` and ``pipeline`` (transformers has no registration
  point for a cache implementation, docs/11-transformers.md §11.9).
* :mod:`accelerated.hf.support` -- the construction checks (supported models, KVQuant's rotary
  frequencies and per-layer calibrations, docs/11-transformers.md §11.8).
"""

from ..calibration import CALIBRATION_TOKENS, DEFAULT_CALIBRATION_FILE
from .attention import ATTENTION_NAME, kvsink_attention
from .cache import KVSinkCache
from .hooks import install, uninstall
from .layer import KVSinkLayer, dynamic_cache_nbytes

__all__ = [
    "KVSinkCache",
    "KVSinkLayer",
    "ATTENTION_NAME",
    "kvsink_attention",
    "install",
    "uninstall",
    "dynamic_cache_nbytes",
    "CALIBRATION_TOKENS",
    "DEFAULT_CALIBRATION_FILE",
]
