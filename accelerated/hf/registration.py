"""Using ``KVSinkCache`` from ``model.generate`` and ``pipeline`` (docs/11-transformers.md §11.9).

transformers (5.25, read in its source) has **no registration point for a custom
cache implementation**:

* ``generation/configuration_utils.py``: ``GenerationConfig.validate`` refuses any
  ``cache_implementation`` outside the module-level tuple
  ``ALL_CACHE_IMPLEMENTATIONS = ALL_STATIC_CACHE_IMPLEMENTATIONS +
  DYNAMIC_CACHE_IMPLEMENTATIONS`` (plus ``"paged"``) with
  ``ValueError("Invalid `cache_implementation` ...")``; there is no function to add
  a name, and ``generation/utils.py`` imports the tuples by value;
* ``generation/utils.py``: ``GenerationMixin._prepare_cache_for_generation`` builds
  the cache with a fixed ``if``/``elif`` over the names (static, ``"quantized"``,
  else ``DynamicCache``); for ``cache_implementation="quantized"`` it pops
  ``backend`` from ``cache_config`` and calls ``QuantizedCache(backend=...,
  **cache_config)``;
* ``cache_utils.py``: ``QuantizedCache.__init__`` picks its layer class with a
  fixed ``if backend == "quanto" / "hqq" / "fp8"`` (there is no
  ``QUANT_BACKEND_CLASSES_MAPPING`` or other table in this version), so no
  backend can be added either.

The supported route — the one ``_prepare_cache_for_generation`` calls a
*user-defined cache* — is to pass a ``Cache`` object to ``generate``:
``model.generate(..., cache=KVSinkCache(...))`` (``past_key_values=`` on
transformers before 5.2x), and to a text-generation pipeline as a keyword of
its call, which it hands to ``generate``: ``pipe(text, cache=KVSinkCache(...))``.
(In 5.25 the pipeline's documented ``generate_kwargs={...}`` dict is not
unpacked by ``TextGenerationPipeline._sanitize_parameters``: it reaches
``generate`` as one keyword named ``generate_kwargs`` and is refused by
``GenerationMixin._validate_model_kwargs``; and a cache given to ``pipeline(...)``
at construction would be shared by every call.)
:func:`kvsink_cache` builds that cache from a ``cache_config`` dict as
transformers' quantized cache takes one, and :func:`kvsink_generate_kwargs`
returns the keyword argument under the name the model's ``generate`` expects.
A cache holds one generation's sequences: build a new one for every
``generate`` / pipeline call.
"""

from __future__ import annotations

import inspect
from typing import Optional, Union

from reference.config import KVSinkConfig

from .cache import KVSinkCache

__all__ = ["REGISTRATION_POINT", "cache_argument_name", "kvsink_cache", "kvsink_generate_kwargs",
           "registered"]

#: transformers' registration point for custom cache implementations: none in 5.25 (see above).
REGISTRATION_POINT = None


def cache_argument_name(model) -> str:
    """``"cache"`` where the model's forward takes it (transformers >= 5.2x), else
    ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kvsink_cache(model, cache_config: Union[None, dict, KVSinkConfig] = None, *, tokenizer=None,
                 **cache_kwargs) -> KVSinkCache:
    """A fresh ``KVSinkCache`` for ``model`` from a ``cache_config``.

    ``cache_config``: a ``KVSinkConfig``, or a dict of its fields (``{"key_bits": 2,
    "value_bits": 2, "residual_length": 64}``, as transformers' ``cache_config`` of
    ``cache_implementation="quantized"`` holds its cache's arguments), default
    ``preserve="kvsink"``; unknown keys are a ``TypeError`` naming them.  ``tokenizer``
    and ``cache_kwargs`` (``calibration_ids``, ``calibration_text``,
    ``kvquant_calibration``, ``kvquant_fisher``, ``eager_checks``, ``max_cache_len`` -- the
    compileable cache, docs/11 §11.11) go to ``KVSinkCache``.
    """
    if isinstance(cache_config, KVSinkConfig):
        config = cache_config
    elif cache_config is None or isinstance(cache_config, dict):
        fields = {"preserve": "kvsink", **(cache_config or {})}
        known = set(KVSinkConfig.__dataclass_fields__)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"cache_config has keys {unknown} that are not KVSinkConfig fields; "
                            f"use some of {sorted(known)}")
        config = KVSinkConfig(**fields)
    else:
        raise TypeError(f"cache_config must be None, a dict of KVSinkConfig fields or a KVSinkConfig, "
                        f"got {type(cache_config).__name__}")
    return KVSinkCache(model, config, tokenizer=tokenizer, **cache_kwargs)


def kvsink_generate_kwargs(model, cache_config: Union[None, dict, KVSinkConfig] = None, *,
                           tokenizer=None, **cache_kwargs) -> dict:
    """``{name: kvsink_cache(...)}`` with the name ``model.generate`` takes
    (:func:`cache_argument_name`): ``model.generate(ids, **kvsink_generate_kwargs(model, {...}))``,
    ``pipe(text, **kvsink_generate_kwargs(pipe.model, {...}))``."""
    cache = kvsink_cache(model, cache_config, tokenizer=tokenizer, **cache_kwargs)
    return {cache_argument_name(model): cache}


def registered(name: str = "kvsink") -> Optional[bool]:
    """Whether transformers accepts ``cache_implementation=name`` (False in 5.25)."""
    from transformers.generation import configuration_utils as CU
    return name in getattr(CU, "ALL_CACHE_IMPLEMENTATIONS", ())
