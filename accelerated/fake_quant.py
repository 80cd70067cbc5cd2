"""Fake quantization inside a model's attention (docs/12-evaluation.md §12.2).

:func:`fake_quantize_kv` quantizes and dequantizes a layer's whole keys and
values (preserved tokens kept exact); :func:`attention_state` routes every
attention call of a model through the function registered as
:data:`FAKE_QUANT_ATTENTION` in transformers' ``AttentionInterface``, which
applies it (mode ``"quant"``) or records the attention oracle's scores of a
full-precision pass (mode ``"probe"``).  Used by the perplexity protocols of
``accelerated.evaluate``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Optional, Tuple

import torch

from reference.config import KVSinkConfig

__all__ = ["FAKE_QUANT_ATTENTION", "attention_state", "current_state", "fake_quantize_kv"]

#: Name under which the fake-quantizing attention function is registered in
#: transformers' ``AttentionInterface`` (and the sdpa mask in ``AttentionMaskInterface``).
FAKE_QUANT_ATTENTION = "kvsink_fake_quant"


# =========================================================================== attention hook

_STATE = threading.local()


def current_state():
    return getattr(_STATE, "value", None)


@contextmanager
def attention_state(model, state):
    """Route every attention call of ``model`` through the fake-quant function with ``state``."""
    _register()
    config = model.config
    previous_impl = config._attn_implementation
    if previous_impl == FAKE_QUANT_ATTENTION:
        raise RuntimeError("perplexity evaluation is not re-entrant")
    state["inner"] = "eager" if previous_impl == "eager" else "sdpa"
    previous_state = current_state()
    config._attn_implementation = FAKE_QUANT_ATTENTION
    _STATE.value = state
    try:
        yield state
    finally:
        _STATE.value = previous_state
        config._attn_implementation = previous_impl


_REGISTERED = False


def _register():
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register(FAKE_QUANT_ATTENTION, _fake_quant_attention)
    AttentionMaskInterface.register(FAKE_QUANT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED = True


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _eager(module, query, key, value, attention_mask, scaling, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask, float("-inf"))
        else:
            w = w + attention_mask
    elif query.shape[2] > 1:
        tq, tk = query.shape[2], key.shape[2]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=w.device).tril(tk - tq)
        w = w.masked_fill(~causal, float("-inf"))
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), p


def _attention_probs(query, key, attention_mask, scaling) -> torch.Tensor:
    """Full-precision causal attention probabilities ``(B, Hq, Tq, T)`` (float32)."""
    n_rep = query.shape[1] // key.shape[1]
    k = _repeat_kv(key, n_rep).float()
    w = torch.matmul(query.float(), k.transpose(2, 3)) * scaling
    tq, tk = query.shape[2], key.shape[2]
    causal = torch.ones(tq, tk, dtype=torch.bool, device=w.device).tril(tk - tq)
    w = w.masked_fill(~causal, float("-inf"))
    return torch.softmax(w, dim=-1)


def _fake_quant_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function registered as :data:`FAKE_QUANT_ATTENTION`.

    Mode ``"probe"`` (full-precision pass): computes the attention oracle's
    per-layer scores when needed, then plain attention.  Mode ``"quant"``:
    fake-quantizes ``key``/``value`` ``(B, H, T, D)`` per the config, keeping
    the preserved tokens exact, then plain attention (sdpa, or eager when the
    model was loaded with ``attn_implementation="eager"``).
    """
    state = current_state()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if state is None:
        raise RuntimeError(f"attention implementation {FAKE_QUANT_ATTENTION!r} is only usable "
                           "inside accelerated.evaluate's perplexity functions (attention_state)")
    if state["mode"] == "probe" and state.get("oracle"):
        from . import preserve as P
        probs = _attention_probs(query, key, attention_mask, scaling)
        valid = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
        state["oracle_scores"].append(P.oracle_scores(probs, valid).to(torch.float64))
    elif state["mode"] == "quant":
        if state["config"].quantizer == "kvquant":
            key, value = _fake_quantize_kvquant_post_rope(module, key, value, state)
        else:
            key, value = fake_quantize_kv(key, value, state["config"], state["preserved"])
    if state["inner"] == "eager":
        return _eager(module, query, key, value, attention_mask, scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


# =========================================================================== fake quantization

def fake_quantize_kv(keys: torch.Tensor, values: torch.Tensor, config: KVSinkConfig,
                     preserved: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize then dequantize a layer's whole keys and values, preserved tokens kept exact.

    Parameters
    ----------
    keys, values : ``(B, H, T, D)`` floating tensors.
    config : quantization settings (``key_bits``/``key_group_size``/``key_axis``,
        ``value_*``, ``scheme``); ``config.quantizer`` must be ``"uniform"``.
    preserved : ``None`` or bool ``(B, T)``: tokens kept at full precision and
        excluded from the statistics of their groups.

    Returns
    -------
    ``(keys_hat, values_hat)`` in the input dtype: ``dequantize(quantize(x))``
    (float32 arithmetic of accelerated.quantize, then cast back) except at
    preserved tokens, where the input is returned unchanged.  The token axis is
    quantized whole: groups along tokens (axis ``"channel"``) start at token 0
    and the last one may be partial.
    """
    from . import quantize as Q
    if config.quantizer != "uniform":
        raise ValueError(f"config.quantizer={config.quantizer!r}: the fake-quant protocol "
                         "implements the 'uniform' quantizer only")
    if keys.ndim != 4 or values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"keys and values must be (B, H, T, D) with the same B, H, T; got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    b, h, t, _ = keys.shape
    symmetric = config.scheme == "symmetric"
    exclude = None
    if preserved is not None:
        if preserved.dtype != torch.bool or tuple(preserved.shape) != (b, t):
            raise ValueError(f"preserved must be a bool tensor (B, T) = {(b, t)}, got "
                             f"{preserved.dtype} {tuple(preserved.shape)}")
        preserved = preserved.to(keys.device)
        exclude = preserved[:, None, :].expand(b, h, t)
    out = []
    for x, bits, group, axis in ((keys, config.key_bits, config.key_group_size, config.key_axis),
                                 (values, config.value_bits, config.value_group_size,
                                  config.value_axis)):
        xq = Q.dequantize(Q.quantize(x, bits, group, axis, symmetric=symmetric, exclude=exclude))
        xq = xq.to(x.dtype)
        if exclude is not None:
            xq = torch.where(exclude[..., None], x, xq)
        out.append(xq)
    return out[0], out[1]


def _fake_quantize_kvquant_post_rope(module, key: torch.Tensor, value: torch.Tensor, state):
    """KVQuant-style fake quantization of one layer's post-RoPE keys and values ``(B, H, T, D)``.

    The protocol of bench/kvquant_table.py (docs/08-kvquant.md §8.12): the keys
    are un-rotated with the model's ``inv_freq`` at rotary positions ``0..T-1``
    (each window is an independent sequence), quantized and dequantized with
    ``quantize_block_kvquant`` / ``dequantize_block_kvquant`` under the layer's
    calibration (``module.layer_idx``; None: the nf grid with
    ``outlier_fraction=0``), rotated back; the preserved tokens keep their
    original keys and values exactly and are excluded from every statistic.
    """
    from . import kvquant as KQ
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx: the per-layer KVQuant "
                         "calibration cannot be looked up")
    cal = state["kvquant_calibration"][layer]
    inv_freq = state["inv_freq"].to(key.device)
    pos = torch.arange(key.shape[2], device=key.device)[None, None, :]
    preserved = state["preserved"].to(key.device)
    block = KQ.quantize_block_kvquant(KQ.unapply_rope(key, pos, inv_freq), value, cal, state["config"],
                                      exclude=preserved)
    kh, vh = KQ.dequantize_block_kvquant(block)
    kh = KQ.apply_rope(kh, pos, inv_freq)
    keep = preserved[:, None, :, None]
    return torch.where(keep, key, kh.to(key.dtype)), torch.where(keep, value, vh.to(value.dtype))
