"""Where a model's attention sinks are and why: the paper's figures for any model (docs/14-sinks.md).

One eager forward pass over a text gives every decoder layer's hidden state,
attention probabilities, queries, keys, values and attention output.  From
them :func:`analyze` measures, with the project's own definitions:

(a) :func:`channel_profile` -- the largest hidden-state channels per layer on
    sink and on non-sink tokens (where the massive activations settle, and in
    which channels; docs/04 definition 4.3);
(b) :func:`attention_received` -- the attention each token receives, per layer
    and pooled (``reference.preserve.oracle_scores``, docs/03 definition 3.2);
(c) :func:`predictor_vs_oracle` -- the KVSink prediction
    (``reference.predictor.calibrate_predictor`` / ``predict_sinks``) against the
    attention oracle of every decoder layer: precision and recall;
(d) :func:`quantization_effect` -- the relative error of a layer's attention
    output when only one token's K and V are quantized (``accelerated.quantize``,
    per token), for the sinks and for ordinary tokens.

Sinks, in (a) and (d), are the attention oracle of all layers pooled
(``attention_oracle`` on the probabilities stacked along the head axis).
The figures are drawn by ``accelerated.analyze_figures`` (matplotlib, the
``plot`` extra); the command line is :func:`analyze_main` (``kvsink analyze``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from reference import predictor as RP
from reference import preserve as RPS
from reference.attention import kv_head_index
from reference.config import KVSinkConfig

__all__ = [
    "LayerCapture",
    "text_ids",
    "capture_pass",
    "pooled_oracle",
    "channel_profile",
    "attention_received",
    "predictor_vs_oracle",
    "token_quantization_error",
    "quantization_effect",
    "analyze",
    "analyze_main",
]

#: The attention-oracle ratio of the project's default configuration (docs/03 definition 3.2).
DEFAULT_ORACLE_RATIO = KVSinkConfig().oracle_ratio
#: Group size of the per-token quantization in (d): the configuration's default.
DEFAULT_GROUP_SIZE = KVSinkConfig().key_group_size


@dataclass
class LayerCapture:
    """One decoder layer's attention, as the model's eager attention computed it (batch row 0).

    query : float32 ``(Hq, T, D)`` (after RoPE and any q-norm);
    key, value : float32 ``(H, T, D)`` (the cache's K and V, after RoPE);
    probs : float32 ``(Hq, T, T)`` attention probabilities (query, key);
    output : float32 ``(Hq, T, D)`` the attention output ``probs @ V`` per head;
    scaling : float, the logit scale; softcap : None or float (logit soft-capping).
    """

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    probs: np.ndarray
    output: np.ndarray
    scaling: float
    softcap: Optional[float]


# --------------------------------------------------------------------------- the forward pass

def text_ids(tokenizer, text: str, tokens: int, bos: Optional[bool] = None) -> torch.Tensor:
    """int64 ``(1, N)``: the first ``tokens`` tokens of ``text``, BOS first where the model wants it.

    ``bos=None`` follows the tokenizer: the BOS token is prepended when the
    tokenizer itself adds it to a text (Gemma; not SmolLM2), as the model was
    trained — the rule of the evaluation windows, ``accelerated.corpus.window_bos``;
    ``True``/``False`` force it.  The BOS token counts in ``tokens``.
    """
    from .corpus import window_bos
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 2:
        raise ValueError(f"tokens must be an int >= 2, got {tokens!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = window_bos(tokenizer) is not None
    if bos and bos_id is None:
        raise ValueError("bos=True but the tokenizer has no BOS token; pass bos=False")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos:
        ids = [int(bos_id)] + ids
    if len(ids) < 2:
        raise ValueError(f"the text gives {len(ids)} token(s); analyze needs at least 2")
    return torch.tensor([ids[:tokens]], dtype=torch.long)


@contextlib.contextmanager
def _recording_attention(model, store: List[LayerCapture]):
    """Wrap the ``eager_attention_forward`` of every attention module's file so that each call
    records its inputs and outputs into ``store`` (in call order = layer order)."""
    if getattr(model.config, "_attn_implementation", None) != "eager":
        raise ValueError("analyze needs the attention weights: load the model with "
                         "attn_implementation='eager'")
    modules = {sys.modules[type(m).__module__] for m in model.modules()
               if hasattr(sys.modules[type(m).__module__], "eager_attention_forward")
               and hasattr(m, "head_dim")}
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention module calls a module-level "
                         "eager_attention_forward (transformers' layout); analyze cannot see its K/V")
    originals = {mod: mod.eager_attention_forward for mod in modules}

    def wrap(original):
        def recorder(module, query, key, value, attention_mask, *args, **kwargs):
            out, weights = original(module, query, key, value, attention_mask, *args, **kwargs)
            scaling = kwargs.get("scaling") or module.head_dim ** -0.5
            f = lambda x: x[0].detach().float().cpu().numpy()      # noqa: E731  (batch row 0)
            store.append(LayerCapture(f(query), f(key), f(value), f(weights),
                                      f(out.transpose(1, 2)), float(scaling), kwargs.get("softcap")))
            return out, weights
        return recorder

    try:
        for mod, original in originals.items():
            mod.eager_attention_forward = wrap(original)
        yield
    finally:
        for mod, original in originals.items():
            mod.eager_attention_forward = original


def capture_pass(model, ids: torch.Tensor):
    """One eager forward over ``ids`` ``(1, T)``: (hidden states, captures).

    hidden states : list of float32 ``(T, C)`` numpy arrays, index 0 = embeddings,
    ``l`` = output of decoder layer ``l - 1`` (docs/04's indexing);
    captures : list of :class:`LayerCapture`, one per decoder layer.
    """
    store: List[LayerCapture] = []
    device = model.get_input_embeddings().weight.device
    with _recording_attention(model, store), torch.no_grad():
        out = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
    hidden = [h[0].detach().float().cpu().numpy() for h in out.hidden_states]
    if len(store) != len(hidden) - 1:
        raise RuntimeError(f"recorded {len(store)} attention calls for {len(hidden) - 1} decoder "
                           "layers; this architecture is not supported by analyze")
    return hidden, store


def pooled_oracle(captures: Sequence[LayerCapture], ratio: float) -> np.ndarray:
    """Oracle sinks of all layers pooled (definition 3.2, layers stacked on the head axis): bool ``(T,)``."""
    probs = np.concatenate([c.probs for c in captures], axis=0)[None]
    return RPS.attention_oracle(probs, ratio)[0]


# --------------------------------------------------------------------------- (a) channels

def channel_profile(hidden: Sequence[np.ndarray], sinks: np.ndarray, top: int = 3,
                    ratio: float = RP.DEFAULT_OUTLIER_RATIO) -> List[dict]:
    """Per hidden state ``l``: its median ``|h|``, the outlier channels of definition 4.3,
    and the ``top`` channels by peak ``|h|`` over the sink tokens and over the others.

    ``sinks`` is bool ``(T,)``.  Each entry of ``top_sink`` / ``top_other`` is
    ``[channel, peak, token]`` (the token carrying the peak).
    """
    rows = []
    for l, h in enumerate(hidden):
        a = np.abs(h.astype(np.float32))
        row = {"layer": l, "median": float(np.median(a.astype(np.float64))),
               "outlier_channels": RP.layer_outlier_channels(h, ratio).tolist()}
        for key, mask in (("sink", sinks), ("other", ~sinks)):
            sub = a[mask]
            if sub.shape[0] == 0:
                row[f"top_{key}"], row[f"peak_{key}"] = [], None
                continue
            peak = sub.max(axis=0)
            order = np.argsort(-peak, kind="stable")[:top]
            tokens = np.nonzero(mask)[0]
            row[f"top_{key}"] = [[int(c), float(peak[c]), int(tokens[np.argmax(sub[:, c])])]
                                 for c in order]
            row[f"peak_{key}"] = float(peak[order[0]])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- (b) attention

def attention_received(captures: Sequence[LayerCapture]) -> np.ndarray:
    """float64 ``(L, T)``: ``oracle_scores`` of each decoder layer (multiples of uniform attention)."""
    return np.stack([RPS.oracle_scores(c.probs[None])[0] for c in captures])


# --------------------------------------------------------------------------- (c) predictor

def _ratio_or_none(num: int, den: int) -> Optional[float]:
    return None if den == 0 else num / den


def predictor_vs_oracle(predicted: Optional[np.ndarray], captures: Sequence[LayerCapture],
                        ratio: float, pooled: np.ndarray) -> List[dict]:
    """Per decoder layer (and ``"all"`` pooled): oracle count, hits, precision, recall.

    ``precision = |P ∩ O| / |P|`` and ``recall = |P ∩ O| / |O|`` (``None`` when
    the denominator is 0); ``P`` the predicted sinks (bool ``(T,)``, or None
    when no predictor: then only PFN-1's recall is given), ``O`` the layer's
    oracle (definition 3.2 on that layer's probabilities).
    """
    t = pooled.shape[0]
    pfn1 = RPS.preserve_first_n(np.ones((1, t), dtype=bool), 1)[0]
    rows = []
    layers = [(i, RPS.attention_oracle(c.probs[None], ratio)[0]) for i, c in enumerate(captures)]
    for name, oracle in layers + [("all", pooled)]:
        row = {"layer": name, "oracle": int(oracle.sum()),
               "oracle_tokens": np.nonzero(oracle)[0].tolist(),
               "pfn1_recall": _ratio_or_none(int((pfn1 & oracle).sum()), int(oracle.sum()))}
        if predicted is not None:
            hits = int((predicted & oracle).sum())
            row.update(predicted=int(predicted.sum()), hits=hits,
                       precision=_ratio_or_none(hits, int(predicted.sum())),
                       recall=_ratio_or_none(hits, int(oracle.sum())))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- (d) quantization

def _dequantized_token(x: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """``x`` ``(H, n, D)`` quantized per token (definition 2.5, asymmetric) and dequantized."""
    from . import quantize as AQ
    return AQ.dequantize(AQ.quantize_per_token(torch.from_numpy(np.ascontiguousarray(x)), bits,
                                               group_size)).numpy()


def _softcapped(z: np.ndarray, softcap: Optional[float]) -> np.ndarray:
    return z if softcap is None else softcap * np.tanh(z / softcap)


def token_quantization_error(c: LayerCapture, token: int, bits: int, group_size: int) -> float:
    """Relative error ``||O' - O||_F / ||O||_F`` of one layer's attention output over all heads
    and the queries ``j >= token``, when only ``token``'s K and V are quantized.

    Changing one key ``s`` changes one logit per query, so with ``p = probs[h, j, s]``,
    ``Δ = z'_{js} - z_{js}`` (the logit change, after soft-capping) and ``v̂`` the
    quantized value, exactly:  ``O'_j = (O_j + p (e^Δ v̂_s - v_s)) / (1 + p (e^Δ - 1))``,
    evaluated as ``r (O_j - p v_s) + w v̂_s`` with ``r = 1 / D``, ``w = p e^Δ / D`` and
    ``log D = logaddexp(log(1 - p), log p + Δ)``, so a logit change too large for ``e^Δ``
    (a 2-bit key of a token with massive activations) gives ``w -> 1``, not inf / inf.
    ``O_j - p v_s`` and ``1 - p`` are formed from the OTHER keys (``Σ_{s'≠s} p_{js'} v_{s'}`` and
    ``Σ_{s'≠s} p_{js'}``), not by subtraction: where the float32 ``p`` rounds to 1 (a query
    attending to one key), the subtraction leaves only rounding error, which ``r = e^{-Δ}`` would
    then amplify without bound; ``O_j`` itself is recomputed from the same terms (float64), so
    quantizing nothing gives 0, not the model's float32 rounding.  Masked keys (``p = 0``, e.g.
    outside a sliding window) leave ``O_j`` unchanged.
    """
    kv = kv_head_index(c.query.shape[0], c.key.shape[0])
    k, v = c.key[:, token:token + 1], c.value[:, token:token + 1]
    kq = _dequantized_token(k, bits, group_size)[:, 0].astype(np.float64)[kv]     # (Hq, D)
    vq = _dequantized_token(v, bits, group_size)[:, 0].astype(np.float64)[kv]
    k0 = k[:, 0].astype(np.float64)[kv]
    q = c.query[:, token:].astype(np.float64)                                      # (Hq, Tj, D)
    z0 = _softcapped(c.scaling * np.einsum("hjd,hd->hj", q, k0), c.softcap)
    z1 = _softcapped(c.scaling * np.einsum("hjd,hd->hj", q, kq), c.softcap)
    delta = (z1 - z0)[..., None]                                                   # (Hq, Tj, 1)
    probs = c.probs[:, token:].astype(np.float64)                                 # (Hq, Tj, T)
    p = probs[:, :, token][..., None]
    others = probs.copy()
    others[:, :, token] = 0.0
    o_rest = np.einsum("hjs,hsd->hjd", others, c.value.astype(np.float64)[kv])   # O_j - p v_s
    v0 = v[:, 0].astype(np.float64)[kv]
    o = o_rest + p * v0[:, None]             # O_j, in float64 from the same terms as O'_j
    with np.errstate(divide="ignore"):                                             # log 0 = -inf
        log_p, log_rest = np.log(p), np.log(others.sum(axis=-1, keepdims=True))
    log_d = np.logaddexp(log_rest, log_p + delta)
    new = np.exp(-log_d) * o_rest + np.exp(log_p + delta - log_d) * vq[:, None]
    norm = float(np.linalg.norm(o))
    return float(np.linalg.norm(new - o) / norm) if norm > 0 else 0.0


def quantization_effect(captures: Sequence[LayerCapture], sinks: Sequence[int],
                        controls: Sequence[int], bits: Sequence[int] = (2, 4),
                        group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """(d): for each bit width and decoder layer, the mean relative error
    (:func:`token_quantization_error`) over the ``sinks`` and over the ``controls``.

    Returns ``{"bits": [...], "sink_tokens", "control_tokens", "group_size",
    "sink": {b: [per layer]}, "control": {b: [per layer]}, "ratio": {b: mean sink / mean control}}``.
    """
    out = {"bits": list(bits), "group_size": group_size, "sink_tokens": list(map(int, sinks)),
           "control_tokens": list(map(int, controls)), "sink": {}, "control": {}, "ratio": {}}
    for b in bits:
        for key, tokens in (("sink", sinks), ("control", controls)):
            out[key][str(b)] = [float(np.mean([token_quantization_error(c, t, b, group_size)
                                               for t in tokens])) if len(tokens) else None
                                for c in captures]
        s, o = out["sink"][str(b)], out["control"][str(b)]
        out["ratio"][str(b)] = (float(np.mean(s) / np.mean(o))
                                if s and s[0] is not None and o and o[0] is not None
                                and np.mean(o) > 0 else None)
    return out


def _control_tokens(sinks: np.ndarray, predicted: Optional[np.ndarray], n: int, seed: int) -> List[int]:
    """``n`` ordinary tokens (neither oracle nor predicted sinks, seen by >= 1/4 of the queries)."""
    t = sinks.shape[0]
    ordinary = ~sinks if predicted is None else ~(sinks | predicted)
    pool = np.nonzero(ordinary[: max(1, t - t // 4)])[0]
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(pool, size=min(n, pool.size), replace=False).tolist())


# --------------------------------------------------------------------------- the whole analysis

def _calibrated(hidden, predictor):
    if predictor is not None:
        return predictor, None
    try:
        return RP.calibrate_predictor(hidden), None
    except ValueError as exc:
        return None, str(exc)


def analyze(model, tokenizer, text: str, out_dir, *, tokens: int = 256, bos: Optional[bool] = None,
            oracle_ratio: float = DEFAULT_ORACLE_RATIO, bits: Sequence[int] = (2, 4),
            group_size: int = DEFAULT_GROUP_SIZE, controls: int = 8, seed: int = 0,
            predictor: Optional[RP.SinkPredictor] = None, model_name: str = "") -> dict:
    """Run the sink analysis of ``model`` on the first ``tokens`` tokens of ``text``.

    Writes ``channels.png``, ``attention.png``, ``predictor.png``,
    ``quantization.png`` and ``summary.json`` into ``out_dir`` (created) and
    returns the summary.  ``predictor`` (a ``reference.predictor.SinkPredictor``)
    defaults to ``calibrate_predictor`` on this pass's hidden states; when that
    finds no stable outlier the summary's ``predictor`` is None and
    ``predictor_error`` says why.  The model must use eager attention.
    Raises ``ImportError`` (naming the ``plot`` extra) without matplotlib.
    """
    from . import analyze_figures as F
    F.require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = text_ids(tokenizer, text, tokens, bos)
    hidden, captures = capture_pass(model, ids)
    sinks = pooled_oracle(captures, oracle_ratio)
    pred, error = _calibrated(hidden, predictor)
    predicted = None if pred is None else pred.predict(hidden[pred.layer])
    received = attention_received(captures)
    sink_tokens = np.nonzero(sinks)[0][:4].tolist()
    summary = {
        "model": model_name or type(model).__name__, "tokens": int(ids.shape[1]),
        "bos": bool(getattr(tokenizer, "bos_token_id", None) is not None
                    and int(ids[0, 0]) == tokenizer.bos_token_id),
        "decoder_layers": len(captures), "hidden_size": int(hidden[0].shape[1]),
        "oracle_ratio": float(oracle_ratio),
        "oracle_sinks": np.nonzero(sinks)[0].tolist(),
        "predictor": None if pred is None else {
            "layer": pred.layer, "channels": list(pred.channels), "threshold": pred.threshold,
            "predicted": np.nonzero(predicted)[0].tolist()},
        "predictor_error": error,
        "channels": channel_profile(hidden, sinks),
        "attention": {"pooled_top": _top_scores(received.mean(axis=0), 10),
                      "per_layer_top": [_top_scores(r, 3) for r in received]},
        "predictor_vs_oracle": predictor_vs_oracle(predicted, captures, oracle_ratio, sinks),
        "quantization": quantization_effect(
            captures, sink_tokens, _control_tokens(sinks, predicted, controls, seed), bits, group_size),
        "tokens_text": [tokenizer.decode([int(i)]) for i in ids[0, :64]],
    }
    summary["figures"] = F.draw_all(summary, hidden, received, sinks, predicted, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def _top_scores(scores: np.ndarray, n: int) -> List[list]:
    order = np.argsort(-scores, kind="stable")[:n]
    return [[int(i), float(scores[i])] for i in order]


# --------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvsink analyze",
        description="The KVSink paper's figures for a model: outlier channels across layers, "
                    "attention received per token, predicted sinks against the attention oracle, "
                    "and the effect of quantizing one token's K/V (docs/14-sinks.md).")
    p.add_argument("--model", default=None,
                   help="short name (smollm2-135m, gemma-3-270m, qwen2.5-coder-0.5b, "
                        "qwen2.5-coder-1.5b), a .gguf file, a folder or a hub id (default smollm2-135m)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", default=None, help="the text to analyze")
    src.add_argument("--data", default=None, metavar="FILE",
                     help="a UTF-8 text file to analyze (default: the packaged corpus)")
    p.add_argument("--out", default="kvsink-analysis", metavar="DIR",
                   help="folder for the PNG figures and summary.json (default ./kvsink-analysis)")
    p.add_argument("--tokens", type=int, default=256, metavar="N",
                   help="tokens to analyze, BOS included (default 256; >= 2)")
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="prepend the BOS token: auto = as the tokenizer does (default)")
    return p


def _fail(msg: str) -> int:
    print(f"kvsink analyze: error: {msg}", file=sys.stderr)
    return 2


def _read_text(args) -> str:
    if args.text is not None:
        if not args.text.strip():
            raise ValueError("--text is empty; pass some text or --data FILE")
        return args.text
    path = Path(args.data) if args.data is not None else \
        Path(__file__).resolve().parent / "data" / "default_corpus.txt"
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r} is not a file; pass the path of a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--data {str(path)!r} is not UTF-8 text") from None


def _load_eager(name: Optional[str]):
    """(model, tokenizer) with eager attention (attention weights are read)."""
    from .models import load_model
    return load_model(name, attn_implementation="eager")


def analyze_main(argv: Optional[Sequence[str]] = None) -> int:
    """``kvsink analyze``: parse ``argv``, run :func:`analyze`, print where the figures are.

    Returns the exit status (0, or 2 with a one-line error for a user mistake).
    """
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.tokens < 2:
        return _fail(f"--tokens must be >= 2, got {args.tokens}")
    try:
        text = _read_text(args)
        from . import analyze_figures as F
        F.require_matplotlib()
    except (ValueError, ImportError) as exc:
        return _fail(str(exc))
    print(f"loading {args.model or 'smollm2-135m'} (eager attention)", file=sys.stderr, flush=True)
    try:
        model, tokenizer = _load_eager(args.model)
    except (OSError, ValueError, KeyError) as exc:
        return _fail(f"cannot load --model {args.model!r}: {exc}")
    bos = {"auto": None, "yes": True, "no": False}[args.bos]
    print(f"analyzing up to {args.tokens} tokens into {args.out}", file=sys.stderr, flush=True)
    try:
        summary = analyze(model, tokenizer, text, args.out, tokens=args.tokens, bos=bos,
                          model_name=args.model or "smollm2-135m")
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(_report(summary, args.out))
    return 0


def _report(s: dict, out) -> str:
    p = s["predictor"]
    pred = (f"predictor: layer {p['layer']}, channels {p['channels']}, threshold {p['threshold']:.4g}, "
            f"{len(p['predicted'])} predicted {p['predicted'][:12]}") if p else \
        f"predictor: none ({s['predictor_error']})"
    pooled = s["predictor_vs_oracle"][-1]
    q = s["quantization"]
    lines = [f"{s['model']}: {s['tokens']} tokens (BOS {'yes' if s['bos'] else 'no'}), "
             f"{s['decoder_layers']} decoder layers",
             f"oracle sinks (all layers, ratio {s['oracle_ratio']:g}): {s['oracle_sinks'][:12]}", pred]
    if p:
        lines.append(f"against the pooled oracle: precision {pooled['hits']}/{pooled['predicted']}, "
                     f"recall {pooled['hits']}/{pooled['oracle']}")
    for b in q["bits"]:
        lines.append(f"{b}-bit K/V of one token, attention-output error sink / ordinary: "
                     f"x{q['ratio'][str(b)]:.3g}" if q["ratio"][str(b)] else
                     f"{b}-bit: no sink or no ordinary token to compare")
    lines.append(f"figures and summary.json in {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(analyze_main())
