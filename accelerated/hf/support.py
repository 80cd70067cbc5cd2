"""Which transformers models :class:`~accelerated.hf.KVSinkCache` supports, checked at construction.

Everything here reads the model and its config and raises a ``ValueError`` / ``TypeError`` naming
what is unsupported and what to do instead (docs/11-transformers.md §11.2 "Supported models"):
encoder-decoder models, multi-head latent attention, no ``num_key_value_heads``, logit
soft-capping, layer types other than full / sliding-window attention, models that do not route
their attention through ``AttentionInterface``, ``preserve="oracle"``; and, for
``quantizer="kvquant"``, the model's rotary frequencies and the per-layer calibrations.

The Cache classes live in :mod:`accelerated.hf.layer` / :mod:`accelerated.hf.cache`, the
attention function in :mod:`accelerated.hf.attention`, the hooks in :mod:`accelerated.hf.hooks`.
"""

from __future__ import annotations

from typing import List

import torch

from reference.config import KVSinkConfig
from reference.kvquant import KVQuantCalibration

__all__ = [
    "text_config",
    "check_supported",
    "layer_types",
    "sliding_window",
    "decoder_layers",
    "kvquant_inv_freq",
    "check_kvquant_calibrations",
]


def text_config(model):
    """The decoder's text config of ``model`` (``ValueError`` for an encoder-decoder model)."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; KVSinkCache supports "
                         "decoder-only models (it quantizes the self-attention cache only)")
    try:
        return cfg.get_text_config(decoder=True)
    except TypeError:  # pragma: no cover - older signature
        return cfg.get_text_config()


def _check_attention_kind(name: str, text_config) -> None:
    """MLA, missing ``num_key_value_heads`` and logit soft-capping are refused."""
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


def _check_layer_types(name: str, text_config) -> None:
    """Only full-attention (quantized) and sliding-window (full precision) layers, at least one full."""
    types = layer_types(text_config)
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


def check_supported(model, text_config, config: KVSinkConfig) -> None:
    """``ValueError`` naming what of ``model`` / ``config`` ``KVSinkCache`` does not support."""
    name = type(model).__name__
    if "oracle" in config.preserve:
        raise ValueError(
            "preserve='oracle' is not supported during generation: the attention oracle needs the "
            "attention every token will receive from later queries; use 'kvsink' and/or 'pfn' "
            "(the oracle is available in the evaluation code, accelerated/evaluate.py)")
    _check_attention_kind(name, text_config)
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{name} does not route its attention through transformers' "
                         "AttentionInterface (_supports_attention_backend is False); KVSinkCache "
                         "needs it to attend over the quantized cache")
    _check_layer_types(name, text_config)


def layer_types(text_config) -> List[str]:
    """One attention type per decoder layer (``config.layer_types``, or derived from the config)."""
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


def sliding_window(text_config, i: int) -> int:
    """The window of sliding-window layer ``i``."""
    w = getattr(text_config, "sliding_window", None)
    if w is None:
        raise ValueError(f"layer {i} is a sliding-window layer but config.sliding_window is None")
    return int(w)


def decoder_layers(base, text_config):
    """The base model's ``layers`` ModuleList (one decoder layer per config layer)."""
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(base).__name__} has no `layers` ModuleList of decoder layers; "
                         "KVSinkCache supports models laid out as transformers' decoder-only models")
    if len(layers) < int(text_config.num_hidden_layers):
        raise ValueError(f"{type(base).__name__}.layers has {len(layers)} layers, config says "
                         f"{text_config.num_hidden_layers}")
    return layers


def kvquant_inv_freq(model) -> torch.Tensor:
    """The model's one rotary ``inv_freq`` buffer, which quantizer='kvquant' un-rotates the keys with."""
    from ..kvquant import model_inv_freq
    try:
        return model_inv_freq(model)
    except ValueError:
        raise ValueError(
            f"quantizer='kvquant' needs the model's one rotary frequency buffer to un-rotate the keys, "
            f"and {type(model).__name__} has no 'rotary_emb.inv_freq' (e.g. Gemma-3's per-layer-type "
            "rotary embeddings); use quantizer='uniform' with this model") from None


def check_kvquant_calibrations(cals, config: KVSinkConfig, text_config, num_layers: int) -> list:
    """``kvquant_calibration=``: a list of one ``KVQuantCalibration`` per decoder layer (an entry of a
    sliding-window layer may be None), each fitting the config and the model's KV heads / head dim."""
    if isinstance(cals, KVQuantCalibration) or not isinstance(cals, (list, tuple)):
        raise TypeError("kvquant_calibration must be a list with one KVQuantCalibration per decoder "
                        "layer (accelerated.kvquant.calibrate_kvquant_layers or "
                        f"accelerated.calibration.calibrate_kvquant_model), got {type(cals).__name__}")
    if len(cals) != num_layers:
        raise ValueError(f"kvquant_calibration has {len(cals)} entries; the model has {num_layers} "
                         "decoder layers (one calibration per layer)")
    types = layer_types(text_config)
    h = int(text_config.num_key_value_heads)
    d = (getattr(text_config, "head_dim", None)
         or int(text_config.hidden_size) // int(text_config.num_attention_heads))
    for i, cal in enumerate(cals):
        if types[i] != "full_attention" and cal is None:
            continue
        if not isinstance(cal, KVQuantCalibration):
            raise TypeError(f"kvquant_calibration[{i}] must be a KVQuantCalibration, got "
                            f"{type(cal).__name__}")
        try:
            cal.check(config, h, int(d))
        except ValueError as exc:
            raise ValueError(f"kvquant_calibration[{i}] does not fit: {exc}") from None
    return list(cals)
