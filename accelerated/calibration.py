"""Model-level calibration: the KVSink predictor fields and the KVQuant calibration of a model.

One full-precision forward pass of the model over calibration tokens feeds
both calibrations:

* :func:`calibrate_config` fills the ``predictor_*`` fields of a
  ``KVSinkConfig`` with ``reference.predictor.calibrate_predictor`` applied to
  the pass's ``output_hidden_states`` (docs/04-predictor.md).  Used by
  ``accelerated.hf.KVSinkCache``, ``accelerated.evaluate`` and the CLI.
* :func:`calibrate_kvquant_model` captures every attention layer's pre-RoPE
  keys (``k_proj`` output) and values (``v_proj`` output) and calls
  ``accelerated.kvquant.calibrate_kvquant_layers`` with the preserved tokens
  of the calibration text (the config's own policy, docs/08-kvquant.md
  definition 8.9) excluded from every statistic.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import torch

from reference.config import KVSinkConfig

__all__ = ["CALIBRATION_TOKENS", "DEFAULT_CALIBRATION_FILE", "calibration_ids", "calibrate_config",
           "calibrate_kvquant_model", "check_kvquant_fisher"]

#: Tokens of the default calibration text.
CALIBRATION_TOKENS = 512
DEFAULT_CALIBRATION_FILE = Path(__file__).resolve().parent / "data" / "default_corpus.txt"
_SHORT_TEXT = (
    "The history of written knowledge is in large part a history of copying. For most of the "
    "time in which people have written things down, every book that existed had been produced "
    "by a person who sat with a pen and reproduced a text by hand, one letter after another.")


def calibration_ids(input_ids=None, *, text: Optional[str] = None, tokenizer=None,
                    what: str = "calibration") -> torch.Tensor:
    """int64 ``(1, N)`` calibration token ids.

    ``input_ids`` (``(N,)`` or ``(1, N)``, ``N >= 2``) if given; else ``text``
    tokenized with ``tokenizer``; else the first :data:`CALIBRATION_TOKENS`
    tokens of ``accelerated/data/default_corpus.txt`` tokenized with
    ``tokenizer``.  ``ValueError`` if both ids and text are given, or neither
    ids nor a tokenizer.
    """
    if input_ids is None:
        if tokenizer is None:
            raise ValueError(
                f"{what} needs token ids: pass calibration_ids=... (input_ids), or tokenizer=... (with "
                "calibration_text=... or the built-in text)")
        if text is None:
            text = DEFAULT_CALIBRATION_FILE.read_text(encoding="utf-8") \
                if DEFAULT_CALIBRATION_FILE.exists() else _SHORT_TEXT
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :CALIBRATION_TOKENS]
        else:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
    elif text is not None:
        raise ValueError("pass calibration_ids or calibration_text, not both")
    else:
        ids = input_ids
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2 or ids.dtype.is_floating_point:
        raise ValueError(f"calibration_ids must be integer token ids (N,) or (1, N) with N >= 2, got "
                         f"shape {tuple(ids.shape)}, dtype {ids.dtype}")
    return ids.long()


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _attention_modules(model) -> List[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")
            and hasattr(m, "head_dim")]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules with k_proj / v_proj / "
                         "head_dim (Llama-style) whose keys and values could be captured for "
                         "KVQuant calibration; pass kvquant_calibration=...")
    return mods


def _full_precision_pass(model, ids: torch.Tensor, capture_kv: bool = False):
    """One forward with ``output_hidden_states``: (hidden states list of float32 ``(T, C)`` on CPU,
    keys, values: lists over attention layers of float32 ``(1, H, T, D)`` pre-RoPE, or None)."""
    keys: List[torch.Tensor] = []
    values: List[torch.Tensor] = []
    hooks = []
    if capture_kv:
        def make(store, head_dim):
            def hook(_module, _inputs, output):
                b, t, hd = output.shape
                store.append(output.detach().float().reshape(b, t, hd // head_dim, head_dim)
                             .transpose(1, 2).contiguous())
            return hook
        for m in _attention_modules(model):
            hooks.append(m.k_proj.register_forward_hook(make(keys, m.head_dim)))
            hooks.append(m.v_proj.register_forward_hook(make(values, m.head_dim)))
    try:
        with torch.no_grad():
            out = model(input_ids=ids.to(_device(model)), output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hidden = [h[0].detach().float().cpu().numpy() for h in out.hidden_states]
    return hidden, (keys if capture_kv else None), (values if capture_kv else None)


def _predictor_fields(config: KVSinkConfig, hidden) -> KVSinkConfig:
    """``config`` with the predictor fields filled from the hidden states (fields given win)."""
    from reference import predictor as RP
    layer, channels, threshold = config.predictor_layer, config.predictor_channels, \
        config.predictor_threshold
    if layer is not None and layer >= len(hidden):
        raise ValueError(f"config.predictor_layer={layer} is out of range: the model has hidden "
                         f"states 0..{len(hidden) - 1}")
    if layer is None or not channels:
        pred = RP.calibrate_predictor(hidden)
        layer = pred.layer if layer is None else layer
        channels = pred.channels if not channels else channels
        if threshold is None and (layer, tuple(channels)) == (pred.layer, tuple(pred.channels)):
            threshold = pred.threshold
    if threshold is None:
        threshold = RP.sink_threshold(hidden[layer])            # Definition 4.5: ratio x the layer's median
    return config.replace(predictor_layer=int(layer), predictor_channels=tuple(int(c) for c in channels),
                          predictor_threshold=float(threshold))


def calibrate_config(model, config: KVSinkConfig, input_ids=None, *, text: Optional[str] = None,
                     tokenizer=None) -> KVSinkConfig:
    """``config`` with the KVSink predictor fields filled in (returned as is if already set).

    Calibration runs one full-precision forward pass with
    ``output_hidden_states=True`` over the calibration ids (:func:`calibration_ids`:
    ``input_ids``, or ``text`` tokenized with ``tokenizer``, by default the first
    512 tokens of the packaged default corpus) and applies
    ``reference.predictor.calibrate_predictor`` (docs/04-predictor.md).  Fields the
    config already sets win: if the layer and the channels are given but not the
    threshold, the threshold is ``sink_threshold(outlier_scores(hidden[layer],
    channels))`` over the calibration tokens.  Raises ``ValueError`` (from the
    predictor) when the model shows no stable outlier channel, e.g. a randomly
    initialised model, or when ``config.predictor_layer`` is out of range.
    """
    if not isinstance(config, KVSinkConfig):
        raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
    if config.predictor_ready:
        return config
    ids = calibration_ids(input_ids, text=text, tokenizer=tokenizer,
                          what="calibrating the KVSink predictor (predictor_layer, predictor_channels, "
                               "predictor_threshold not all set in the config)")
    hidden, _, _ = _full_precision_pass(model, ids)
    return _predictor_fields(config, hidden)


def check_kvquant_fisher(fisher, config: KVSinkConfig, *, name: str = "kvquant_fisher",
                          calibration_given: bool = False) -> bool:
    """Validate the Fisher switch of a KVQuant calibration (``fisher=`` / ``kvquant_fisher=``).

    ``fisher`` must be a bool.  ``True`` is only meaningful where k-means levels are
    fitted here: ``ValueError`` for ``quantizer="uniform"``, for
    ``kvquant_datatype="nf"`` (the normal-float grid is fixed; the weights would be
    computed by an extra backward pass and thrown away) and when the calibrations
    are given (``calibration_given=True``: nothing is fitted).
    """
    if not isinstance(fisher, bool):
        raise TypeError(f"{name} must be True or False, got {type(fisher).__name__} {fisher!r}")
    if not fisher:
        return False
    if config.quantizer != "kvquant":
        raise ValueError(f"{name}=True weights the k-means of quantizer='kvquant'; the config has "
                         f"quantizer={config.quantizer!r}: leave {name} False")
    if config.kvquant_datatype != "kmeans":
        raise ValueError(f"{name}=True has no effect with kvquant_datatype={config.kvquant_datatype!r} "
                         "(the normal-float grid is fixed, nothing is fitted): use "
                         f"kvquant_datatype='kmeans' or leave {name} False")
    if calibration_given:
        raise ValueError(f"{name}=True applies when the KVQuant calibration is computed here; "
                         "kvquant_calibration=... was given (already fitted): leave it False, or "
                         "fit the given calibrations with calibrate_kvquant_model(..., fisher=True)")
    return True


def calibrate_kvquant_model(model, config: KVSinkConfig, input_ids=None, *, text: Optional[str] = None,
                            tokenizer=None, fisher: bool = False) -> Tuple[KVSinkConfig, list]:
    """KVQuant calibration of every attention layer of ``model`` (docs/08-kvquant.md def. 8.9).

    One full-precision pass over the calibration ids (:func:`calibration_ids`)
    captures each layer's pre-RoPE keys (``k_proj`` output) and values
    (``v_proj`` output), ``(1, H, T, D)`` float32.  The excluded tokens are the
    calibration text's preserved tokens under the config's own policy,
    ``preserved_set(config, valid, predicted)`` (PFN and/or the KVSink
    predictor's sinks, capped by ``max_preserved``); when ``"kvsink"`` is
    configured and the predictor fields are not all set they are calibrated
    from the same pass (as :func:`calibrate_config`).  ``kvquant_datatype="kmeans"``:
    ``fisher=True`` weights the k-means by ``accelerated.kvquant.fisher_weights``
    (KVQuant's sensitivity; one extra forward and backward pass), ``fisher=False``
    (default) fits a plain k-means (every counted entry has weight 1).
    ``fisher`` must be a bool; ``fisher=True`` with ``kvquant_datatype="nf"`` is a
    ``ValueError`` (the grid is fixed: the weights would change nothing).
    ``"oracle"`` in ``config.preserve`` is a ``ValueError``: the oracle set of the
    calibration text (attention of future queries) is not computed here.

    Returns ``(config, calibrations)``: the config (predictor fields filled if
    calibrated) and one ``accelerated.kvquant.KVQuantCalibration`` per attention
    layer, in layer order.
    """
    from reference import predictor as RP
    from reference import preserve as RPS
    from . import kvquant as KQ
    if not isinstance(config, KVSinkConfig):
        raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
    if config.quantizer != "kvquant":
        raise ValueError(f"calibrate_kvquant_model needs quantizer='kvquant', got {config.quantizer!r}")
    fisher = check_kvquant_fisher(fisher, config, name="fisher")
    if "oracle" in config.preserve:
        raise ValueError("KVQuant calibration excludes the calibration text's preserved tokens, and "
                         "preserve='oracle' (attention of future queries) has no set on the "
                         "calibration text here; use preserve 'pfn' and/or 'kvsink' with quantizer='kvquant'")
    ids = calibration_ids(input_ids, text=text, tokenizer=tokenizer,
                          what=f"calibrating KVQuant (kvquant_datatype={config.kvquant_datatype!r}, "
                               f"outlier_fraction={config.outlier_fraction})")
    hidden, keys, values = _full_precision_pass(model, ids, capture_kv=True)
    t = ids.shape[1]
    predicted = None
    if "kvsink" in config.preserve:
        if not config.predictor_ready:
            config = _predictor_fields(config, hidden)
        predicted = RP.predict_sinks(hidden[config.predictor_layer][None], config.predictor_channels,
                                     config.predictor_threshold)
    import numpy as np
    valid = np.ones((1, t), dtype=bool)
    preserved = RPS.preserved_set(config, valid, predicted=predicted)
    exclude = torch.from_numpy(np.ascontiguousarray(preserved)).to(keys[0].device)
    if fisher:
        weights = KQ.fisher_weights(model, ids)
    elif config.kvquant_datatype == "kmeans":
        # plain (unweighted) k-means: every counted entry weighs 1
        weights = [(torch.ones_like(k), torch.ones_like(v)) for k, v in zip(keys, values)]
    else:
        weights = None
    cals = KQ.calibrate_kvquant_layers(keys, values, config, exclude=exclude, fisher=weights)
    return config, cals
