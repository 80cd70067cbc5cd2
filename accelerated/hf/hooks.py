"""The hooks that bind a :class:`~accelerated.hf.KVSinkCache` to a model's forward
(docs/11-transformers.md §11.3 "Hooks"), installed once per model by :func:`install`.

* a forward pre-hook on the base model finds the ``KVSinkCache`` of the call, pushes it as the
  active cache (:mod:`accelerated.hf.step`) and begins its step with the 2-D ``attention_mask`` and
  the ``position_ids`` (or ``cache_position``);
* a forward pre-hook on every decoder layer hands ``hidden_states[p]`` to the cache when the layer
  is the predictor layer ``p`` (layers ``< p`` have appended their tokens already, layers ``>= p``
  are resolved at their update);
* (a prefill's layers are flushed one by one as they finish: ``StepState.flush_early``, called by
  the attention function and by ``set_flags``;)
* a forward hook on the base model ends the step (deferred checks, flush), and an always-called
  one pops the active cache and abandons a step the forward left unfinished;
* ``model.generate`` is wrapped so that, when it returns, the value checks of the steps since the
  last flush are read (``KVSinkCache.check``): a NaN never goes unreported because no flush
  followed it (docs/11-transformers.md §11.3 "Validation"), and ``model.create_masks_for_generate``
  so that ``generate`` hands a compileable KVSinkCache the 2-D mask (docs/11 §11.11).

Under ``torch.compile`` the base-model hooks run eagerly between the compiled graphs
(``torch.compiler.disable``) and the layer hook becomes the operator ``kvsink::layer_input``
(:mod:`accelerated.hf.compiled`), or, in a captured decode step, the predictor's traced code
(:mod:`accelerated.hf.captured`).

The per-step logic is :class:`accelerated.hf.step.StepState`; these hooks only route the calls.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from .attention import ATTENTION_NAME, register
from .captured import captured_layer_input
from .compiled import layer_input, observe_layer_input
from .step import active_cache, compiled_view, pop_active, push_active, refresh_view

__all__ = ["install", "uninstall", "find_cache"]


def find_cache(kwargs):
    """The ``KVSinkCache`` passed to a forward as ``cache`` / ``past_key_values``, or None."""
    from .cache import KVSinkCache
    for key in ("cache", "past_key_values"):
        c = kwargs.get(key)
        if isinstance(c, KVSinkCache):
            return c
    return None


def _tokens(params):
    """``(batch, n)`` of a forward's ``input_ids`` / ``inputs_embeds``, or None."""
    for key in ("input_ids", "inputs_embeds"):
        x = params.get(key)
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.shape[0]), int(x.shape[1])
    return None


class _ModelHooks:
    """The hook functions of one model (its base model's ``forward`` signature binds the arguments)."""

    def __init__(self, base):
        self.signature = inspect.signature(base.forward)

    def bind(self, args, kwargs) -> dict:
        if args:
            try:
                return dict(self.signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                return kwargs
        return kwargs

    def pre_forward(self, module, args, kwargs):
        params = self.bind(args, kwargs)
        cache = find_cache(params)
        push_active(cache)
        if cache is not None:
            pos = params.get("position_ids")
            if pos is None:
                pos = params.get("cache_position")
            cache.steps.begin(params.get("attention_mask"), pos, _tokens(params))
            refresh_view()

    def post_forward(self, module, args, kwargs, output):
        cache = active_cache()
        if cache is not None:
            last = getattr(output, "last_hidden_state", None)
            if last is None and isinstance(output, (tuple, list)) and output:
                last = output[0]
            cache.steps.end(last)

    def cleanup(self, module, args, kwargs, output):
        cache = pop_active()
        if cache is not None:
            cache.steps.abandon()      # no-op after end(); else the forward raised

    def layer_pre(self, idx: int):
        """Decoder layer ``idx``'s pre-hook: its input reaches the predictor of the active cache
        when ``idx`` is the predictor's layer.  Traced by torch.compile: the operator
        ``kvsink::layer_input`` at the predictor's layer (its copy of the input replaces it), nothing
        at the others (accelerated/hf/compiled.py)."""
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not torch.compiler.is_compiling():
                observe_layer_input(active_cache(), idx, hidden)
                return None
            view = compiled_view()
            if view is None or view[1] != idx:
                return None
            if view[2] is not None:               # a captured step: traced into the graph
                captured_layer_input(hidden, view[2])
                return None
            hidden = layer_input(hidden, idx)
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return hook


def _wrap_mask_creation(model) -> None:
    """``model.create_masks_for_generate`` (what ``generate`` calls for a cache that
    ``is_compileable``) hands a KVSinkCache's forward the 2-D padding mask itself, as an eager
    ``generate`` does: the cache reads each new token's validity from it (docs/11 §11.11)."""
    from transformers.masking_utils import create_masks_for_generate
    original = getattr(model, "create_masks_for_generate", create_masks_for_generate)

    def create_masks(*args, **kwargs):
        if find_cache(kwargs) is not None:
            return kwargs.get("attention_mask")
        return original(*args, **kwargs)
    create_masks.kvsink_wrapper = True
    model.create_masks_for_generate = create_masks


def _unwrap_mask_creation(model) -> None:
    if getattr(model.__dict__.get("create_masks_for_generate"), "kvsink_wrapper", False):
        del model.create_masks_for_generate


def _wrap_generate(model) -> None:
    """``model.generate`` (if any) reads the pending value checks of the cache it was given
    before returning (an instance attribute over the class's method; :func:`uninstall` removes it)."""
    original = getattr(type(model), "generate", None)
    if original is None:
        return

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        cache = find_cache(kwargs)
        if cache is not None:
            cache.check()
        return out
    generate.kvsink_wrapper = True
    model.generate = types.MethodType(generate, model)    # a bound method: a deepcopy rebinds it


def _unwrap_generate(model) -> None:
    if getattr(model.__dict__.get("generate"), "kvsink_wrapper", False):
        del model.generate


def _set_attention(model) -> str:
    """Set ``model``'s attention implementation to ``"kvsink"``; returns the previous one."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{type(model).__name__} refused attn_implementation={ATTENTION_NAME!r} "
                         f"(it stays {model.config._attn_implementation!r}); it does not support "
                         "setting its attention implementation through AttentionInterface")
    return previous


def install(model) -> None:
    """Register the ``"kvsink"`` attention, set it on ``model`` and add the hooks (idempotent)."""
    register()
    if getattr(model, "_kvsink_hooks", None) is not None:
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        return
    previous = _set_attention(model)
    base = model.base_model
    hooks = _ModelHooks(base)
    eager = torch.compiler.disable      # they run between a compiled forward's graphs
    handles = [
        base.register_forward_pre_hook(eager(hooks.pre_forward), with_kwargs=True),
        base.register_forward_hook(eager(hooks.post_forward), with_kwargs=True),
        base.register_forward_hook(eager(hooks.cleanup), with_kwargs=True, always_call=True),
    ]
    for i, layer in enumerate(base.layers):
        handles.append(layer.register_forward_pre_hook(hooks.layer_pre(i), with_kwargs=True))
    model._kvsink_hooks = handles
    model._kvsink_previous_attn = previous
    _wrap_generate(model)
    _wrap_mask_creation(model)


def uninstall(model) -> None:
    """Remove the kvsink hooks from ``model`` and restore its previous attention implementation."""
    handles = getattr(model, "_kvsink_hooks", None)
    if handles is None:
        return
    for h in handles:
        h.remove()
    previous = getattr(model, "_kvsink_previous_attn", None)
    model._kvsink_hooks = None
    _unwrap_generate(model)
    _unwrap_mask_creation(model)
    if previous is not None and model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous)
