"""The transformers ``Cache`` of kvsink: :class:`KVSinkCache` (docs/11-transformers.md).

Construction checks the model (:mod:`accelerated.hf.support`), calibrates what the config leaves
open (the KVSink predictor, KVQuant's per-layer levels: :mod:`accelerated.calibration`), builds one
:class:`~accelerated.hf.layer.KVSinkLayer` per full-attention layer (transformers'
``DynamicSlidingWindowLayer`` per sliding-window layer) and installs the hooks
(:mod:`accelerated.hf.hooks`).  During a forward, :meth:`KVSinkCache.update` hands each layer's new
tokens to the per-forward state (:class:`accelerated.hf.step.StepState`, ``cache.steps``), which
resolves and flushes them; the attention function (:mod:`accelerated.hf.attention`) reads the
layers.  This module holds the transformers Cache API and the kvsink inspection API only.
"""

from __future__ import annotations

import warnings
import weakref
from typing import List, Optional

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from reference.config import KVSinkConfig

from .. import calibration as CAL
from .hooks import install, uninstall
from .attention import ATTENTION_NAME
from .layer import KVSinkLayer, new_store
from .step import ForwardStep, StepState
from .support import (check_kvquant_calibrations, check_supported, decoder_layers, kvquant_inv_freq,
                      layer_types, sliding_window, text_config)

__all__ = ["KVSinkCache"]


def _kvquant_calibrations(model, config: KVSinkConfig, text_cfg, num_layers: int, given,
                          calibration_ids, calibration_text, tokenizer, fisher: bool):
    """``(config, per-layer calibrations, inv_freq)`` for ``quantizer="kvquant"``: the given
    calibrations checked, or calibrated here when the datatype or outliers need one."""
    cals, inv_freq = [None] * num_layers, None
    if config.quantizer != "kvquant":
        if given is not None:
            raise ValueError("kvquant_calibration is only used by quantizer='kvquant' (the config has "
                             f"quantizer={config.quantizer!r}); leave it None")
        return config, cals, inv_freq
    inv_freq = kvquant_inv_freq(model)
    if given is not None:
        cals = check_kvquant_calibrations(given, config, text_cfg, num_layers)
    elif config.kvquant_datatype != "nf" or config.outlier_fraction != 0:
        config, cals = CAL.calibrate_kvquant_model(
            model, config, calibration_ids, text=calibration_text, tokenizer=tokenizer, fisher=fisher)
        if len(cals) != num_layers:
            raise ValueError(f"captured keys of {len(cals)} attention layers, the model "
                             f"has {num_layers}; pass kvquant_calibration=...")
    return config, cals, inv_freq


def _check_max_cache_len(max_cache_len) -> Optional[int]:
    if max_cache_len is None:
        return None
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
        raise ValueError(f"max_cache_len must be a positive int (the most tokens, prompt and "
                         f"generated, a sequence will hold) or None, got {max_cache_len!r}")
    return max_cache_len


def _build_layers(config: KVSinkConfig, text_cfg, types: List[str], cals, inv_freq,
                  max_cache_len: Optional[int] = None) -> list:
    """One ``KVSinkLayer`` per full-attention layer, a ``DynamicSlidingWindowLayer`` per other."""
    layers = []
    for i, kind in enumerate(types):
        if kind == "full_attention":
            layers.append(KVSinkLayer(config, i, kvquant_calibration=cals[i], rope_inv_freq=inv_freq,
                                      max_cache_len=max_cache_len))
        else:  # sliding_attention (checked by check_supported)
            layers.append(DynamicSlidingWindowLayer(sliding_window=sliding_window(text_cfg, i)))
    return layers


def _probe_store(config: KVSinkConfig, kvquant_calibration=None, rope_inv_freq=None) -> None:
    """Build a streaming layer once so that an option it does not support raises at construction."""
    try:
        from .. import cache as _C  # noqa: F401
    except ImportError as e:
        raise ImportError(f"accelerated.cache is needed by KVSinkCache: {e}") from e
    new_store(config, torch.empty(0), kvquant_calibration, rope_inv_freq)


def _make_predictor(config: KVSinkConfig, text_cfg, num_layers: int):
    """The ``SinkPredictor`` of ``config`` checked against the model, or None without ``"kvsink"``."""
    if "kvsink" not in config.preserve:
        return None
    from reference.predictor import SinkPredictor
    predictor = SinkPredictor.from_config(config)
    if predictor.layer > num_layers:
        raise ValueError(
            f"config.predictor_layer={predictor.layer} is out of range: the model has "
            f"hidden states 0..{num_layers} (0 = embeddings, l = output of decoder layer l-1)")
    hidden_size = getattr(text_cfg, "hidden_size", None)
    if hidden_size is not None and max(predictor.channels) >= hidden_size:
        raise ValueError(
            f"config.predictor_channels={predictor.channels} names a channel >= the "
            f"model's hidden_size={hidden_size}")
    return predictor


class KVSinkCache(Cache):
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
    eager_checks : bool, default False.  When the value checks of a forward (keys, values,
        queries, the predictor's hidden state finite) are read on the host
        (docs/11-transformers.md §11.3 "Validation"): False reads them only when a step
        flushes a block (before anything is quantized), before ``crop`` / ``reorder_cache`` /
        ``batch_select_indices`` change the tokens, at :meth:`check` and when ``generate``
        returns, so a decode step that flushes nothing never waits for the device; True reads
        them at the end of every forward (one synchronisation per step).
    max_cache_len : None (default: the growing cache) or a positive int, the most tokens (prompt and
        generated) a sequence will hold: the compileable cache, which ``generate`` compiles like
        transformers' ``StaticCache`` (docs/11-transformers.md §11.11); its decode steps on CUDA are
        captured whole in one CUDA graph (§11.12, the packed store then sized for ``max_cache_len``).

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
                 calibration_text: Optional[str] = None, tokenizer=None, kvquant_fisher: bool = False,
                 eager_checks: bool = False, max_cache_len: Optional[int] = None):
        if not isinstance(config, KVSinkConfig):
            raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
        if not isinstance(eager_checks, bool):
            raise TypeError(f"eager_checks must be a bool (True: read the value checks at the end of "
                            f"every forward), got {eager_checks!r}")
        max_cache_len = _check_max_cache_len(max_cache_len)
        kvquant_fisher = CAL.check_kvquant_fisher(kvquant_fisher, config,
                                                  calibration_given=kvquant_calibration is not None)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        text_cfg = text_config(model)
        check_supported(model, text_cfg, config)
        types = layer_types(text_cfg)
        base = model.base_model
        num_decoder_layers = len(decoder_layers(base, text_cfg))
        num_layers = len(types)
        # predictor and KVQuant calibration (one full-precision pass over the calibration ids)
        config, cals, inv_freq = _kvquant_calibrations(
            model, config, text_cfg, num_layers, kvquant_calibration, calibration_ids,
            calibration_text, tokenizer, kvquant_fisher)
        if "kvsink" in config.preserve and not config.predictor_ready:
            config = CAL.calibrate_config(model, config, calibration_ids, text=calibration_text,
                                          tokenizer=tokenizer)
        layers = _build_layers(config, text_cfg, types, cals, inv_freq, max_cache_len)
        super().__init__(layers=layers)
        self.num_hidden_layers = num_layers
        self.has_full_precision_layers = any(not isinstance(l, KVSinkLayer) for l in layers)
        if max_cache_len is not None and self.has_full_precision_layers:
            raise ValueError("max_cache_len (the compileable KVSinkCache) needs a model whose every "
                             "layer is full attention; this one has sliding-window layers (kept at "
                             "full precision, shapes growing per step): leave max_cache_len None")
        # quantization options the streaming layer refuses surface now, not mid-generate
        _probe_store(config, cals[types.index("full_attention")], inv_freq)
        self.predictor = _make_predictor(config, text_cfg, num_layers)
        self.config = config
        self._model_ref = weakref.ref(model)
        self._base_ref = weakref.ref(base)
        self._decoder_layers = num_decoder_layers
        self.steps = StepState(config, self.predictor,
                               [l for l in layers if isinstance(l, KVSinkLayer)], num_layers,
                               eager_checks=eager_checks, max_length=max_cache_len,
                               query_heads=getattr(text_cfg, "num_attention_heads", None))
        install(model)
        if getattr(model, "training", False):
            warnings.warn("the model is in training mode; KVSinkCache is for inference (call "
                          "model.eval()): its attention ignores dropout", stacklevel=2)

    @property
    def _step(self) -> Optional[ForwardStep]:
        """The current forward's step (None between forwards); ``steps.current``."""
        return self.steps.current

    # ------------------------------------------------------------------ transformers Cache API
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not isinstance(layer, KVSinkLayer):
            return layer.update(key_states, value_states)
        if torch.compiler.is_compiling():
            return key_states, value_states   # appended by kvsink::cache_attention (hf/compiled.py)
        step = self.steps.current             # or by the captured step (hf/captured.py)
        if step is not None and step.captured:
            return key_states, value_states
        if self.steps.current is None:
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
        self.steps.update_layer(layer, key_states, value_states)
        return key_states, value_states

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.check()                  # rows may be dropped: their checks are read first
        super().reorder_cache(beam_idx)
        self.steps.history.transform(lambda h: h.index_select(0, beam_idx.to(h.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.steps.history.transform(lambda h: h.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self.check()
        super().batch_select_indices(indices)
        self.steps.history.transform(
            lambda h: h[indices.to(h.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        self.check()                  # a crop never drops tokens whose checks were not read
        n = self.steps.history.length
        keep = n - abs(tokens_to_remove) if tokens_to_remove <= 0 else min(tokens_to_remove, n)
        super().crop(tokens_to_remove)
        keep = max(keep, 0)
        self.steps.history.transform(lambda h: h[:, :keep])

    def reset(self):
        super().reset()
        self.steps.reset()

    # ------------------------------------------------------------------ kvsink API
    def check(self) -> None:
        """Read the value checks of the forwards since the last flush now (docs/11 §11.3): raises
        the ``ValueError`` of the first failed one (naming the argument: keys, values, query,
        hidden), after which the cache refuses forwards until :meth:`reset`.  Called by
        ``crop``, ``reorder_cache``, ``batch_select_indices`` and when ``generate`` returns."""
        self.steps.read_checks()

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
        return self.steps.history.flags

    @property
    def predicted_sinks(self) -> Optional[torch.Tensor]:
        """bool ``(B, T)``: the KVSink predictor's output per slot (None without ``"kvsink"``)."""
        return self.steps.history.predicted

    @property
    def valid_mask(self) -> Optional[torch.Tensor]:
        """bool ``(B, T)``: False for padding slots."""
        return self.steps.history.valid

    def preserved_positions(self) -> List[List[int]]:
        """Per batch row, the sorted slot positions that are preserved."""
        flags = self.steps.history.flags
        if flags is None:
            return []
        return [torch.nonzero(row).flatten().tolist() for row in flags.cpu()]

    def detach(self) -> None:
        """Remove the kvsink hooks from the model and restore its previous attention implementation."""
        model = self._model_ref()
        if model is not None:
            uninstall(model)
