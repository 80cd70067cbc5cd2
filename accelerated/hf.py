"""kvsink inside Hugging Face transformers: :class:`KVSinkCache` (docs/11-transformers.md).

Usage::

    from accelerated.hf import KVSinkCache
    from reference.config import KVSinkConfig

    cache = KVSinkCache(model, KVSinkConfig(key_bits=2, value_bits=2, preserve="kvsink"),
                        tokenizer=tokenizer)            # tokenizer: only to calibrate the predictor
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

How it plugs in (transformers >= 5.0):

* ``KVSinkCache`` is a transformers :class:`~transformers.cache_utils.Cache` whose
  full-attention layers are :class:`KVSinkLayer` objects (a ``CacheLayerMixin``)
  wrapping one ``accelerated.cache`` streaming layer each: new tokens are
  appended to a full-precision residual, their preservation status is resolved
  once per forward step, and after every forward step every layer is flushed
  (the oldest whole blocks beyond the residual window are quantized and stored
  *packed*; preserved tokens move to a full-precision store).  Sliding-window
  layers (Gemma-3 local layers) stay transformers' full-precision
  ``DynamicSlidingWindowLayer``: they never hold more than the window.
* The model's attention implementation is switched to ``"kvsink"``, a function
  registered in transformers' ``AttentionInterface``: for a kvsink layer it calls
  the cache layer's ``attend`` (attention over packed codes + preserved store +
  residual, no dequantized copy of the whole cache); for any other layer, or a
  forward without a ``KVSinkCache``, it is transformers' ``sdpa`` attention.
* Hooks installed once per model: a forward pre-hook on the base model binds
  the ``KVSinkCache`` of the call and its 2-D ``attention_mask`` (padding slots
  are invalid: never preserved, excluded from quantization statistics, never
  attended); a pre-hook on decoder layer ``p = config.predictor_layer`` reads
  ``hidden_states[p]`` (the input of decoder layer ``p``, i.e. the output of
  layer ``p - 1``; ``p = 0`` is the embeddings) and resolves the pending tokens
  of all layers (layers ``< p`` have appended them already, layers ``>= p`` are
  resolved at their update); a forward hook on the base model, when the forward
  ends, reads the step's deferred value checks (K/V/query/hidden finite: recorded
  per layer as device flags, read once per forward; docs/11-transformers.md §11.3
  "Validation") and flushes every layer.
* ``quantizer="kvquant"`` (docs/11-transformers.md §11.8): the stores un-rotate keys
  with ``model_inv_freq(model)`` and the rotary positions of the forward's
  ``position_ids`` (bound by the base-model pre-hook); the per-layer calibration
  is given or made by ``accelerated.calibration.calibrate_kvquant_model``.
"""

from __future__ import annotations

import inspect
import threading
import warnings
import weakref
from typing import List, Optional

import torch

from reference.config import KVSinkConfig

__all__ = [
    "KVSinkCache",
    "KVSinkLayer",
    "ATTENTION_NAME",
    "kvsink_attention",
    "install",
    "uninstall",
    "dynamic_cache_nbytes",
]

#: Name of the attention function in transformers' ``AttentionInterface`` (and mask interface).
ATTENTION_NAME = "kvsink"
from .calibration import CALIBRATION_TOKENS, DEFAULT_CALIBRATION_FILE as _DEFAULT_CALIBRATION_FILE  # noqa: E402,F401

_LOCAL = threading.local()


# ============================================================================ helpers on other modules

def _new_store(config: KVSinkConfig, key_states: torch.Tensor, kvquant_calibration=None,
               rope_inv_freq=None):
    """One ``accelerated.cache`` streaming layer for tokens like ``key_states`` (its device, its dtype);
    kvquant: with the layer's calibration and the model's rotary ``inv_freq``."""
    from . import cache as C
    cls = getattr(C, "QuantizedKVCacheLayer")
    params = inspect.signature(cls).parameters
    kwargs = {}
    if config.quantizer == "kvquant":
        kwargs["kvquant_calibration"] = kvquant_calibration
        kwargs["rope_inv_freq"] = rope_inv_freq
    if "dtype" in params:
        kwargs["dtype"] = key_states.dtype
    if "device" in params:
        kwargs["device"] = key_states.device
    return cls(config, **kwargs)


def _store_seq_length(store) -> int:
    n = store.seq_length
    return int(n() if callable(n) else n)


def _predict_sinks(hidden: torch.Tensor, channels, threshold, checks=None) -> torch.Tensor:
    """``predict_sinks`` (docs/04-predictor.md) on a torch ``(B, n, C)``: bool ``(B, n)`` on hidden's
    device; with ``checks`` (an ``accelerated.cache.DeferredChecks``) the finiteness of ``hidden``
    is recorded there instead of being read at once."""
    from . import predictor as P
    return P.predict_sinks(hidden, channels, threshold, checks=checks)


def _preserved_set(config: KVSinkConfig, valid: torch.Tensor, predicted: Optional[torch.Tensor]):
    """``preserved_set`` (docs/03-preservation.md) on torch bool ``(B, T)`` masks."""
    from . import preserve as P
    return P.preserved_set(config, valid, predicted=predicted)


def dynamic_cache_nbytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers ``DynamicCache`` (or any cache of such layers)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ============================================================================ cache layer

def _cache_utils():
    from transformers import cache_utils
    return cache_utils


def _layer_base():
    return _cache_utils().CacheLayerMixin


class KVSinkLayer(_layer_base()):
    """One full-attention layer of :class:`KVSinkCache` (a transformers ``CacheLayerMixin``).

    Holds one ``accelerated.cache`` streaming layer, created lazily on the
    device and in the dtype of the first key states it receives (so layers
    spread over devices with ``device_map`` keep their cache on their own
    device).  ``update`` appends the new tokens as *pending* and returns the
    new key/value states unchanged (the ``"kvsink"`` attention function reads
    the cache through :meth:`attend`, never through these tensors).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, config: KVSinkConfig, layer_idx: int, *, kvquant_calibration=None,
                 rope_inv_freq=None):
        super().__init__()
        self.kvsink_config = config
        self.layer_idx = layer_idx
        self.kvquant_calibration = kvquant_calibration   # kvquant only
        self.rope_inv_freq = rope_inv_freq               # kvquant only
        self.store = None
        self.device = None
        self._last_new = 0          # tokens appended by the current forward step

    def __repr__(self):
        return f"KVSinkLayer(layer_idx={self.layer_idx}, seq_length={self.get_seq_length()})"

    # -- transformers' layer contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.store = _new_store(self.kvsink_config, key_states, self.kvquant_calibration,
                                self.rope_inv_freq)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, valid=None, rope_positions=None, checks=None,
               **kwargs):
        """Append ``(B, H, n, D)`` tokens (pending); returns the inputs unchanged.

        ``rope_positions`` (kvquant only): int ``(B, n)``, the rotary positions of the
        new tokens (the model's ``position_ids``); None = their slot positions.
        ``checks``: an ``accelerated.cache.DeferredChecks`` recording the value checks
        (read once at the end of the forward), or None to check here."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if valid is not None:
            valid = valid.to(self.device)
        if rope_positions is None:
            self.store.update(key_states, value_states, valid=valid, checks=checks)
        else:
            self.store.update(key_states, value_states, valid=valid,
                              rope_positions=rope_positions.to(self.device), checks=checks)
        self._last_new = key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0 if self.store is None else _store_seq_length(self.store)

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = None
        self.is_initialized = False
        self._last_new = 0

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-n)`` drops the last ``n`` tokens; ``crop(m)`` with ``m > 0`` keeps the first ``m`` (legacy)."""
        if self.store is None:
            return
        n = self.get_seq_length()
        keep = n - abs(tokens_to_remove) if tokens_to_remove <= 0 else min(tokens_to_remove, n)
        if keep < n:
            self.store.crop(max(keep, 0))

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
        b = getattr(self.store, "batch_size", None)
        if b is None:
            raise RuntimeError("accelerated.cache layer exposes no batch_size")
        return int(b() if callable(b) else b)

    def resolve(self, preserve: torch.Tensor, checks=None) -> None:
        self.store.resolve(preserve.to(self.device), checks=checks)

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()

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
        out = self.store.attend(query, positions, scale=scale, checks=checks, shared=shared)
        return out.transpose(1, 2).to(query.dtype, memory_format=torch.contiguous_format).transpose(1, 2)

    def nbytes(self) -> int:
        return 0 if self.store is None else int(self.store.nbytes())


# ============================================================================ the per-forward step

class _Step:
    """What one forward pass of the model with a ``KVSinkCache`` shares between hooks."""

    def __init__(self, mask2d: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None):
        self.mask2d = mask2d
        self.position_ids = position_ids   # the forward's position_ids / cache_position (kvquant)
        self.n = None            # new tokens of the step
        self.valid = None        # bool (B, n)
        self.rope = None         # int (B, n): rotary positions of the new tokens (kvquant), or None
        self.flags = None        # bool (B, n): preservation status, once known
        self.waiting: List[KVSinkLayer] = []   # layers updated before the status was known
        self.qpos = {}           # device -> int64 (B, n): the slots of the step's tokens (queries)
        self.shared = {}         # visibility masks of the full-precision segments, shared by layers
        from .cache import DeferredChecks
        self.checks = DeferredChecks()   # value checks of every layer, read once at the end


# ============================================================================ the cache

def _cache_base():
    return _cache_utils().Cache


class KVSinkCache(_cache_base()):
    """A transformers ``Cache`` holding a kvsink quantized KV cache (docs/11-transformers.md).

    Parameters
    ----------
    model : a decoder-only transformers ``PreTrainedModel`` (``*ForCausalLM`` or
        its base model) whose attention uses transformers' ``AttentionInterface``
        (Llama, Qwen2, Mistral, Gemma-3 families...).  Its attention
        implementation is set to ``"kvsink"`` and hooks are added (once per model;
        :func:`uninstall` or :meth:`detach` removes them and restores the
        previous implementation).  Without a ``KVSinkCache`` in a forward call,
        the ``"kvsink"`` implementation behaves as ``"sdpa"``.
    config : KVSinkConfig.  ``preserve`` may be ``"none"``, ``"pfn"``,
        ``"kvsink"`` or a union; ``"oracle"`` needs attention probabilities of
        the future and is refused.  If ``"kvsink"`` is configured and the
        predictor fields are not all set, the predictor is calibrated here.
    kvquant_calibration : ``quantizer="kvquant"`` only: None, or a list with one
        ``KVQuantCalibration`` per decoder layer (``accelerated.kvquant.calibrate_kvquant_layers``,
        ``accelerated.calibration.calibrate_kvquant_model``).  None: for ``kvquant_datatype="nf"``
        with ``outlier_fraction=0`` none is needed; otherwise the layers are calibrated here on the
        calibration ids/text (pre-RoPE keys and values captured at ``k_proj`` / ``v_proj``, the
        calibration text's preserved tokens excluded, docs/08-kvquant.md §8.14).  The keys are
        un-rotated with ``model_inv_freq(model)`` and each token's rotary position (the forward's
        ``position_ids``) before quantization.
    kvquant_fisher : bool, default False.  When the cache calibrates ``kvquant_datatype="kmeans"``
        itself: True weights the k-means with ``accelerated.kvquant.fisher_weights`` of the
        calibration ids (KVQuant's sensitivity; one extra forward and backward pass), False fits a
        plain k-means (``calibrate_kvquant_model(..., fisher=...)``).  ``TypeError`` if not a bool;
        ``ValueError`` for True with ``quantizer="uniform"``, with ``kvquant_datatype="nf"`` (a
        fixed grid: nothing to weight) or with ``kvquant_calibration`` given (nothing is fitted).
    calibration_ids : optional token ids ``(N,)`` or ``(1, N)`` to calibrate on.
    calibration_text : optional text to calibrate on (needs ``tokenizer``).
    tokenizer : tokenizer of the model, to tokenize the calibration text; the
        default text is the first 512 tokens of ``accelerated/data/default_corpus.txt``.

    Attributes
    ----------
    config : the KVSinkConfig in use (predictor fields filled when calibrated).
    predictor : ``reference.predictor.SinkPredictor`` or None when ``"kvsink"``
        is not configured.
    layers : one ``KVSinkLayer`` per full-attention layer, transformers'
        ``DynamicSlidingWindowLayer`` (full precision) per sliding-window layer.

    Raises
    ------
    ValueError at construction for what is not supported: encoder-decoder
    models, multi-head latent attention (MLA), a config without
    ``num_key_value_heads``, attention logit soft-capping, linear / chunked /
    other non-standard layer types, models whose every layer is a sliding
    window, models that do not use transformers' attention interface,
    ``preserve`` containing ``"oracle"``, and a predictor layer out of range.
    """

    def __init__(self, model, config: KVSinkConfig, *, kvquant_calibration=None, calibration_ids=None,
                 calibration_text: Optional[str] = None, tokenizer=None, kvquant_fisher: bool = False):
        if not isinstance(config, KVSinkConfig):
            raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
        from . import calibration as CAL
        kvquant_fisher = CAL._check_kvquant_fisher(kvquant_fisher, config,
                                                   calibration_given=kvquant_calibration is not None)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        text_config = _text_config(model)
        _check_supported(model, text_config, config)
        layer_types = _layer_types(text_config)
        base = model.base_model
        decoder_layers = _decoder_layers(base, text_config)
        num_layers = len(layer_types)

        # predictor and KVQuant calibration (one full-precision pass over the calibration ids)
        kvq_cals, inv_freq = [None] * num_layers, None
        if config.quantizer == "kvquant":
            inv_freq = _kvquant_inv_freq(model)
            if kvquant_calibration is not None:
                kvq_cals = _check_kvquant_calibrations(kvquant_calibration, config, text_config,
                                                       num_layers)
            elif config.kvquant_datatype != "nf" or config.outlier_fraction != 0:
                config, kvq_cals = CAL.calibrate_kvquant_model(
                    model, config, calibration_ids, text=calibration_text, tokenizer=tokenizer,
                    fisher=kvquant_fisher)
                if len(kvq_cals) != num_layers:
                    raise ValueError(f"captured keys of {len(kvq_cals)} attention layers, the model "
                                     f"has {num_layers}; pass kvquant_calibration=...")
        elif kvquant_calibration is not None:
            raise ValueError("kvquant_calibration is only used by quantizer='kvquant' (the config has "
                             f"quantizer={config.quantizer!r}); leave it None")
        if "kvsink" in config.preserve and not config.predictor_ready:
            config = CAL.calibrate_config(model, config, calibration_ids, text=calibration_text,
                                          tokenizer=tokenizer)

        cu = _cache_utils()
        layers = []
        for i, kind in enumerate(layer_types):
            if kind == "full_attention":
                layers.append(KVSinkLayer(config, i, kvquant_calibration=kvq_cals[i],
                                          rope_inv_freq=inv_freq))
            else:  # sliding_attention (checked above)
                window = _sliding_window(text_config, i)
                layers.append(cu.DynamicSlidingWindowLayer(sliding_window=window))
        super().__init__(layers=layers)
        self.num_hidden_layers = num_layers
        self.has_full_precision_layers = any(not isinstance(l, KVSinkLayer) for l in layers)

        # quantization options the streaming layer refuses surface now, not mid-generate
        _probe_store(config, kvq_cals[next(i for i, k in enumerate(layer_types) if k == "full_attention")],
                     inv_freq)

        self.predictor = None
        if "kvsink" in config.preserve:
            from reference.predictor import SinkPredictor
            self.predictor = SinkPredictor.from_config(config)
            if self.predictor.layer > num_layers:
                raise ValueError(
                    f"config.predictor_layer={self.predictor.layer} is out of range: the model has "
                    f"hidden states 0..{num_layers} (0 = embeddings, l = output of decoder layer l-1)")
            hidden_size = getattr(text_config, "hidden_size", None)
            if hidden_size is not None and max(self.predictor.channels) >= hidden_size:
                raise ValueError(
                    f"config.predictor_channels={self.predictor.channels} names a channel >= the "
                    f"model's hidden_size={hidden_size}")
        self.config = config
        self._model_ref = weakref.ref(model)
        self._base_ref = weakref.ref(base)
        self._decoder_layers = len(decoder_layers)
        self._valid_hist: Optional[torch.Tensor] = None     # bool (B, T)
        self._pred_hist: Optional[torch.Tensor] = None      # bool (B, T), kvsink only
        self._flag_hist: Optional[torch.Tensor] = None      # bool (B, T): preservation status
        self._step: Optional[_Step] = None
        install(model)
        if getattr(model, "training", False):
            warnings.warn("the model is in training mode; KVSinkCache is for inference (call "
                          "model.eval()): its attention ignores dropout", stacklevel=2)

    # ------------------------------------------------------------------ transformers Cache API
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not isinstance(layer, KVSinkLayer):
            return layer.update(key_states, value_states)
        step = self._step
        if step is None:
            raise RuntimeError(
                "KVSinkCache.update was called outside a forward of the model the cache was built "
                "for (its hooks bind the cache to the forward call); pass the cache to that "
                "model's forward / generate as past_key_values")
        model = self._model_ref()
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl != ATTENTION_NAME:
            raise RuntimeError(
                f"the model's attention implementation is {impl!r}, not {ATTENTION_NAME!r}: the "
                "KVSinkCache only works with it (it was set at construction; did something call "
                "model.set_attn_implementation since?)")
        n = key_states.shape[-2]
        self._begin_tokens(step, n, key_states.shape[0], key_states.device)
        layer.update(key_states, value_states, valid=step.valid, rope_positions=step.rope,
                     checks=step.checks)
        if step.flags is not None:
            layer.resolve(step.flags, step.checks)
        else:
            step.waiting.append(layer)
        return key_states, value_states

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._valid_hist, self._pred_hist, self._flag_hist = (
            None if h is None else h.index_select(0, beam_idx.to(h.device))
            for h in (self._valid_hist, self._pred_hist, self._flag_hist))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._valid_hist, self._pred_hist, self._flag_hist = (
            None if h is None else h.repeat_interleave(repeats, dim=0)
            for h in (self._valid_hist, self._pred_hist, self._flag_hist))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._valid_hist, self._pred_hist, self._flag_hist = (
            None if h is None else h[indices.to(h.device) if isinstance(indices, torch.Tensor) else indices]
            for h in (self._valid_hist, self._pred_hist, self._flag_hist))

    def crop(self, tokens_to_remove: int) -> None:
        n = 0 if self._valid_hist is None else self._valid_hist.shape[1]
        keep = n - abs(tokens_to_remove) if tokens_to_remove <= 0 else min(tokens_to_remove, n)
        super().crop(tokens_to_remove)
        keep = max(keep, 0)
        self._valid_hist, self._pred_hist, self._flag_hist = (
            None if h is None else h[:, :keep]
            for h in (self._valid_hist, self._pred_hist, self._flag_hist))

    def reset(self):
        super().reset()
        self._valid_hist = self._pred_hist = self._flag_hist = None
        self._step = None
        self._broken = False

    # ------------------------------------------------------------------ kvsink API
    def nbytes(self) -> int:
        """Bytes actually held: the sum of :meth:`layer_nbytes` (docs/06-cache.md's formula for
        kvsink layers; key + value tensors for full-precision sliding-window layers)."""
        return sum(self.layer_nbytes())

    def layer_nbytes(self) -> List[int]:
        out = []
        for layer in self.layers:
            if isinstance(layer, KVSinkLayer):
                out.append(layer.nbytes())
            else:
                out.append(sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)
                               if isinstance(t, torch.Tensor)))
        return out

    @property
    def preserved_mask(self) -> Optional[torch.Tensor]:
        """bool ``(B, T)``: the tokens kept at full precision (the same in every kvsink layer)."""
        return self._flag_hist

    @property
    def predicted_sinks(self) -> Optional[torch.Tensor]:
        """bool ``(B, T)``: the KVSink predictor's output per slot (None without ``"kvsink"``)."""
        return self._pred_hist

    @property
    def valid_mask(self) -> Optional[torch.Tensor]:
        """bool ``(B, T)``: False for padding slots."""
        return self._valid_hist

    def preserved_positions(self) -> List[List[int]]:
        """Per batch row, the sorted slot positions that are preserved."""
        if self._flag_hist is None:
            return []
        return [torch.nonzero(row).flatten().tolist() for row in self._flag_hist.cpu()]

    def detach(self) -> None:
        """Remove the kvsink hooks from the model and restore its previous attention implementation."""
        model = self._model_ref()
        if model is not None:
            uninstall(model)

    # ------------------------------------------------------------------ step machinery (hooks)
    #: set when a forward that appended tokens raised (or failed its deferred checks): the layers
    #: may hold unresolved or unchecked tokens, so the next forward raises until reset()
    _broken = False

    def _begin_step(self, mask2d, position_ids=None) -> None:
        if self._step is not None or self._broken or any(
                isinstance(l, KVSinkLayer) and l.store is not None and _has_pending(l.store)
                for l in self.layers):
            raise RuntimeError("KVSinkCache: the previous forward pass did not finish (an exception, "
                               "e.g. NaN/Inf keys, values or queries), so some tokens were never "
                               "resolved or checked; call cache.reset() to start over")
        if mask2d is not None:
            if not isinstance(mask2d, torch.Tensor) or mask2d.dim() != 2:
                shape = getattr(mask2d, "shape", None)
                raise ValueError(
                    f"KVSinkCache needs a 2-D attention_mask (batch, past + new tokens) with 1 for "
                    f"real tokens and 0 for padding, got shape {shape}; pass the tokenizer's mask")
            mask2d = mask2d.bool()
        if self.config.quantizer != "kvquant":
            position_ids = None
        self._step = _Step(mask2d, position_ids)

    def _begin_tokens(self, step: _Step, n: int, batch: int, device) -> None:
        """First sight of the step's tokens (first layer update, or the predictor hook)."""
        if step.n is not None:
            if step.n != n:
                raise RuntimeError(f"KVSinkCache: a layer received {n} new tokens, another {step.n} "
                                   "in the same forward")
            return
        past = 0 if self._valid_hist is None else self._valid_hist.shape[1]
        if self._valid_hist is not None and self._valid_hist.shape[0] != batch:
            raise ValueError(f"KVSinkCache holds a batch of {self._valid_hist.shape[0]} sequences, the "
                             f"forward has {batch}")
        if step.mask2d is None:
            valid = torch.ones(batch, n, dtype=torch.bool, device=device)
        else:
            if step.mask2d.shape != (batch, past + n):
                raise ValueError(
                    f"attention_mask has shape {tuple(step.mask2d.shape)}; with {past} cached and {n} "
                    f"new tokens it must be ({batch}, {past + n}) (cached + new slots)")
            valid = step.mask2d[:, past:].to(device)
        step.n, step.valid = n, valid
        if self.config.quantizer == "kvquant":
            step.rope = _rope_positions(step.position_ids, batch, n, device)
        home = device if self._valid_hist is None else self._valid_hist.device
        self._valid_hist = _cat(self._valid_hist, valid.to(home))
        if self.predictor is None:
            self._set_flags(step, None)

    def _set_flags(self, step: _Step, predicted: Optional[torch.Tensor]) -> None:
        if predicted is not None:
            self._pred_hist = _cat(self._pred_hist, predicted.to(self._valid_hist.device))
        flags = _preserved_set(self.config, self._valid_hist, self._pred_hist)
        if flags.shape != self._valid_hist.shape:
            raise RuntimeError(f"preserved_set returned shape {tuple(flags.shape)}, expected "
                               f"{tuple(self._valid_hist.shape)}")
        n = step.n
        step.flags = flags[:, -n:] if n else flags[:, :0]
        prev = 0 if self._flag_hist is None else self._flag_hist.shape[1]
        if prev + n != flags.shape[1]:
            raise RuntimeError("KVSinkCache: preservation history out of step")
        self._flag_hist = flags
        for layer in step.waiting:
            layer.resolve(step.flags, step.checks)
        step.waiting.clear()

    def _query_positions(self, step: Optional[_Step], query: torch.Tensor) -> Optional[torch.Tensor]:
        """int64 ``(B, n)``: the slots of the step's ``n`` tokens, the attention's query positions;
        made once per forward (per device) and shared by every layer."""
        if step is None or step.n is None or query.shape[-2] != step.n:
            return None
        pos = step.qpos.get(query.device)
        if pos is None:
            end = self._valid_hist.shape[1]
            pos = torch.arange(end - step.n, end, device=query.device).expand(query.shape[0], step.n)
            pos = pos.contiguous()        # the attention kernel reads it contiguous
            step.qpos[query.device] = pos
        return pos

    def _on_predictor_input(self, hidden: torch.Tensor) -> None:
        step = self._step
        if step is None or step.flags is not None:
            return
        self._begin_tokens(step, hidden.shape[1], hidden.shape[0], hidden.device)
        p = self.predictor
        predicted = _predict_sinks(hidden, p.channels, p.threshold, step.checks)
        self._set_flags(step, predicted)

    def _end_step(self, last_hidden: Optional[torch.Tensor]) -> None:
        """End of the forward: read the step's deferred checks (the one device->host
        synchronisation of a step that flushes nothing), resolve what is left, flush every
        layer.  If anything raises, the step is abandoned and the cache refuses further
        forwards until ``reset()``."""
        step = self._step
        done = False
        try:
            if step is None or step.n is None:
                done = True
                return
            if step.flags is None:
                if self.predictor is not None and self.predictor.layer == self.num_hidden_layers \
                        and last_hidden is not None:
                    self._set_flags(step, _predict_sinks(last_hidden, self.predictor.channels,
                                                         self.predictor.threshold, step.checks))
                else:
                    raise RuntimeError("KVSinkCache: the forward ended before the predictor ran")
            step.checks.check()           # ValueError naming the argument (keys, values, query, ...)
            for layer in self.layers:
                if isinstance(layer, KVSinkLayer):
                    layer.flush()
            done = True
        finally:
            self._step = None
            if not done:
                self._broken = True

    def _abandon_step(self) -> None:
        """The forward raised before its end (cleanup hook): a step that appended tokens leaves
        the cache unusable until ``reset()``."""
        step = self._step
        self._step = None
        if step is not None and step.n is not None:
            self._broken = True


def _rope_positions(position_ids, batch: int, n: int, device) -> Optional[torch.Tensor]:
    """int64 ``(B, n)`` rotary positions of the step's tokens from the forward's ``position_ids``
    (``(B, n)`` or ``(1, n)``) or ``cache_position`` (``(n,)``); None = the slot positions (what the
    model computes itself when it receives neither)."""
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise TypeError(f"position_ids must be an integer tensor, got {type(position_ids).__name__}")
    p = position_ids
    if p.dim() == 1:
        p = p[None]
    if p.dim() != 2 or p.shape[-1] != n or p.shape[0] not in (1, batch):
        raise ValueError(f"KVSinkCache (quantizer='kvquant') needs position_ids of shape (B, n) = "
                         f"({batch}, {n}) or (1, {n}) to know each token's rotary position, got "
                         f"{tuple(position_ids.shape)} (multi-axis rotary positions are not supported)")
    return p.to(device=device, dtype=torch.int64).expand(batch, n)


def _kvquant_inv_freq(model) -> torch.Tensor:
    """The model's one rotary ``inv_freq`` buffer, which quantizer='kvquant' un-rotates the keys with."""
    from .kvquant import model_inv_freq
    try:
        return model_inv_freq(model)
    except ValueError:
        raise ValueError(
            f"quantizer='kvquant' needs the model's one rotary frequency buffer to un-rotate the keys, "
            f"and {type(model).__name__} has no 'rotary_emb.inv_freq' (e.g. Gemma-3's per-layer-type "
            "rotary embeddings); use quantizer='uniform' with this model") from None


def _check_kvquant_calibrations(cals, config: KVSinkConfig, text_config, num_layers: int) -> list:
    """``kvquant_calibration=``: a list of one ``KVQuantCalibration`` per decoder layer (an entry of a
    sliding-window layer may be None), each fitting the config and the model's KV heads / head dim."""
    from reference.kvquant import KVQuantCalibration as RefCal
    if isinstance(cals, RefCal) or not isinstance(cals, (list, tuple)):
        raise TypeError("kvquant_calibration must be a list with one KVQuantCalibration per decoder "
                        "layer (accelerated.kvquant.calibrate_kvquant_layers or "
                        f"accelerated.calibration.calibrate_kvquant_model), got {type(cals).__name__}")
    if len(cals) != num_layers:
        raise ValueError(f"kvquant_calibration has {len(cals)} entries; the model has {num_layers} "
                         "decoder layers (one calibration per layer)")
    types = _layer_types(text_config)
    h = int(text_config.num_key_value_heads)
    d = (getattr(text_config, "head_dim", None)
         or int(text_config.hidden_size) // int(text_config.num_attention_heads))
    for i, cal in enumerate(cals):
        if types[i] != "full_attention" and cal is None:
            continue
        if not isinstance(cal, RefCal):
            raise TypeError(f"kvquant_calibration[{i}] must be a KVQuantCalibration, got "
                            f"{type(cal).__name__}")
        try:
            cal.check(config, h, int(d))
        except ValueError as exc:
            raise ValueError(f"kvquant_calibration[{i}] does not fit: {exc}") from None
    return list(cals)


def _has_pending(store) -> bool:
    p = getattr(store, "n_pending", None)
    if p is None:
        return False
    return bool(p() if callable(p) else p)


def _cat(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b.clone() if a is None else torch.cat([a, b], dim=1)


# ============================================================================ construction checks

def _text_config(model):
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; KVSinkCache supports "
                         "decoder-only models (it quantizes the self-attention cache only)")
    try:
        return cfg.get_text_config(decoder=True)
    except TypeError:  # pragma: no cover - older signature
        return cfg.get_text_config()


def _check_supported(model, text_config, config: KVSinkConfig) -> None:
    name = type(model).__name__
    if "oracle" in config.preserve:
        raise ValueError(
            "preserve='oracle' is not supported during generation: the attention oracle needs the "
            "attention every token will receive from later queries; use 'kvsink' and/or 'pfn' "
            "(the oracle is available in the evaluation code, accelerated/evaluate.py)")
    if getattr(text_config, "kv_lora_rank", None) is not None or \
            getattr(text_config, "q_lora_rank", None) is not None:
        raise ValueError(f"{name} uses multi-head latent attention (MLA: kv_lora_rank is set); "
                         "KVSinkCache supports multi-head / grouped-query attention only")
    if getattr(text_config, "num_key_value_heads", None) is None:
        raise ValueError(f"{name}'s config has no num_key_value_heads; KVSinkCache supports "
                         "multi-head / grouped-query attention models that declare it "
                         "(Llama, Qwen2, Mistral, Gemma-3 families)")
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"{name} uses attention logit soft-capping "
                         f"(attn_logit_softcapping={text_config.attn_logit_softcapping}); "
                         "KVSinkCache's attention does not implement it")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{name} does not route its attention through transformers' "
                         "AttentionInterface (_supports_attention_backend is False); KVSinkCache "
                         "needs it to attend over the quantized cache")
    types = _layer_types(text_config)
    bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise ValueError(f"{name} has layer types {bad}; KVSinkCache supports 'full_attention' "
                         "(quantized) and 'sliding_attention' (kept at full precision) layers only")
    if "full_attention" not in types:
        raise ValueError(
            f"every attention layer of {name} uses a sliding window "
            f"(sliding_window={getattr(text_config, 'sliding_window', None)}); KVSinkCache "
            "quantizes full-attention layers only and keeps sliding-window layers at full precision "
            "(they hold at most the window), so nothing would be quantized.  If your sequences "
            "are never longer than the window, load the model with sliding_window=None")


def _layer_types(text_config) -> List[str]:
    n = int(text_config.num_hidden_layers)
    types = getattr(text_config, "layer_types", None)
    if types is None:
        if getattr(text_config, "sliding_window", None) is not None and \
                getattr(text_config, "use_sliding_window", True):
            types = ["sliding_attention"] * n
        elif getattr(text_config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    types = list(types)[:n]
    if len(types) != n:
        raise ValueError(f"config.layer_types has {len(types)} entries for {n} layers")
    return types


def _sliding_window(text_config, i: int) -> int:
    w = getattr(text_config, "sliding_window", None)
    if w is None:
        raise ValueError(f"layer {i} is a sliding-window layer but config.sliding_window is None")
    return int(w)


def _decoder_layers(base, text_config):
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(base).__name__} has no `layers` ModuleList of decoder layers; "
                         "KVSinkCache supports models laid out as transformers' decoder-only models")
    if len(layers) < int(text_config.num_hidden_layers):
        raise ValueError(f"{type(base).__name__}.layers has {len(layers)} layers, config says "
                         f"{text_config.num_hidden_layers}")
    return layers


def _probe_store(config: KVSinkConfig, kvquant_calibration=None, rope_inv_freq=None) -> None:
    """Build a streaming layer once so that an option it does not support raises at construction."""
    try:
        from . import cache as _C  # noqa: F401
    except ImportError as e:
        raise ImportError(f"accelerated.cache is needed by KVSinkCache: {e}") from e
    _new_store(config, torch.empty(0), kvquant_calibration, rope_inv_freq)


# ============================================================================ attention function + hooks

def _active_cache() -> Optional[KVSinkCache]:
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


def kvsink_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: Optional[float] = None, **kwargs):
    """transformers attention function ``"kvsink"`` (see ``AttentionInterface``).

    For a layer held by the active :class:`KVSinkCache` as a :class:`KVSinkLayer`:
    ``attend`` over its cache (``key``/``value`` are then only the step's new
    tokens, already in the cache, and ``attention_mask`` is ignored: causality is
    by cache slot, padding by the cache's validity flags).  Otherwise: transformers'
    ``sdpa_attention_forward``.  Returns ``(B, n, Hq, D), None``.
    """
    cache = _active_cache()
    layer_idx = getattr(module, "layer_idx", None)
    if cache is not None and layer_idx is not None and layer_idx < len(cache.layers) \
            and isinstance(cache.layers[layer_idx], KVSinkLayer):
        layer = cache.layers[layer_idx]
        step = cache._step
        if dropout:
            raise ValueError("kvsink attention is inference only (dropout > 0); call model.eval()")
        for name in ("softcap", "s_aux", "sinks"):
            if kwargs.get(name) is not None:
                raise ValueError(f"kvsink attention does not support {name!r}")
        if kwargs.get("sliding_window") is not None:
            raise ValueError(f"layer {layer_idx} received sliding_window={kwargs['sliding_window']} "
                             "but is a full-attention kvsink layer")
        if layer._last_new != query.shape[-2]:
            raise RuntimeError(f"kvsink attention: layer {layer_idx} got {query.shape[-2]} queries "
                               f"but {layer._last_new} new tokens")
        positions = cache._query_positions(step, query)
        out = layer.attend(query, scaling, positions=positions,
                           checks=None if step is None else step.checks,
                           shared=None if positions is None else step.shared)
        return out.transpose(1, 2).contiguous(), None      # contiguous already: no copy
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _kvsink_mask(*args, **kwargs):
    """Mask interface ``"kvsink"``: no mask while a KVSinkCache without full-precision layers is
    active (causality/padding live in the cache); transformers' sdpa mask otherwise."""
    cache = _active_cache()
    if cache is not None and not cache.has_full_precision_layers:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTENTION_NAME, kvsink_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _kvsink_mask)


def _find_cache(kwargs) -> Optional[KVSinkCache]:
    for key in ("cache", "past_key_values"):
        c = kwargs.get(key)
        if isinstance(c, KVSinkCache):
            return c
    return None


def install(model) -> None:
    """Register the ``"kvsink"`` attention, set it on ``model`` and add the hooks (idempotent)."""
    _register()
    if getattr(model, "_kvsink_hooks", None) is not None:
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        return
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{type(model).__name__} refused attn_implementation={ATTENTION_NAME!r} "
                         f"(it stays {model.config._attn_implementation!r}); it does not support "
                         "setting its attention implementation through AttentionInterface")
    base = model.base_model
    decoder_layers = base.layers
    sig = inspect.signature(base.forward)

    def bind(args, kwargs):
        if args:
            try:
                return dict(sig.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                return kwargs
        return kwargs

    def pre_forward(module, args, kwargs):
        params = bind(args, kwargs)
        cache = _find_cache(params)
        stack = _LOCAL.__dict__.setdefault("stack", [])
        stack.append(cache)
        if cache is not None:
            pos = params.get("position_ids")
            if pos is None:
                pos = params.get("cache_position")
            cache._begin_step(params.get("attention_mask"), pos)

    def post_forward(module, args, kwargs, output):
        cache = _active_cache()
        if cache is not None:
            last = getattr(output, "last_hidden_state", None)
            if last is None and isinstance(output, (tuple, list)) and output:
                last = output[0]
            cache._end_step(last)

    def cleanup(module, args, kwargs, output):
        stack = getattr(_LOCAL, "stack", None)
        if stack:
            cache = stack.pop()
            if cache is not None:
                cache._abandon_step()      # no-op after _end_step; else the forward raised

    def make_layer_hook(idx):
        def layer_pre(module, args, kwargs):
            cache = _active_cache()
            if cache is not None and cache.predictor is not None and cache.predictor.layer == idx:
                hidden = args[0] if args else kwargs.get("hidden_states")
                cache._on_predictor_input(hidden)
        return layer_pre

    handles = [
        base.register_forward_pre_hook(pre_forward, with_kwargs=True),
        base.register_forward_hook(post_forward, with_kwargs=True),
        base.register_forward_hook(cleanup, with_kwargs=True, always_call=True),
    ]
    for i, layer in enumerate(decoder_layers):
        handles.append(layer.register_forward_pre_hook(make_layer_hook(i), with_kwargs=True))
    model._kvsink_hooks = handles
    model._kvsink_previous_attn = previous


def uninstall(model) -> None:
    """Remove the kvsink hooks from ``model`` and restore its previous attention implementation."""
    handles = getattr(model, "_kvsink_hooks", None)
    if handles is None:
        return
    for h in handles:
        h.remove()
    previous = getattr(model, "_kvsink_previous_attn", None)
    model._kvsink_hooks = None
    if previous is not None and model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous)
