"""Perplexity of a language model whose KV cache is quantized (docs/12-evaluation.md).

Two protocols, both returning a :class:`PerplexityResult`:

``perplexity_fake_quant`` — the papers' protocol (KIVI, KVQuant, KVSink).
    One forward pass per window.  In every layer the window's keys and values
    are quantized *whole* and dequantized again ("fake quantization") before
    causal attention; the preserved tokens keep their full-precision keys and
    values and are excluded from the group statistics.  There is no residual
    window: every token except the preserved ones is quantized, and the last
    group along the token axis may be partial.

``perplexity_streaming`` — faithful to decoding.
    The window is fed through :class:`accelerated.hf.KVSinkCache` ``chunk``
    tokens at a time; with ``chunk=1`` each query sees exactly the cache it
    would see while generating (quantized groups, full-precision residual
    window, preserved tokens).

Corpus and windowing (both protocols): :func:`load_corpus` reads WikiText-2's
test split (or the packaged offline corpus), :func:`tokenize_corpus` joins its
lines with ``"\\n\\n"`` and tokenizes once, :func:`make_windows` cuts the token
stream into non-overlapping windows of ``seq_len`` tokens.  In each window the
``seq_len - 1`` next-token predictions are scored; perplexity is
``exp(sum of NLL / number of predicted tokens)`` over all windows.

Calibration (both protocols, once per call, before the first window): the
KVSink predictor when ``"kvsink"`` is configured without its fields, and the
KVQuant calibration of ``quantizer="kvquant"`` (key thresholds, k-means
levels) unless given.  The calibration text is ``calibration_ids``, else
``calibration_text``, else (with a ``tokenizer``) the first 512 tokens of the
packaged default text that ``KVSinkCache`` uses — never the evaluation
windows for KVQuant; only the predictor, with none of these given, falls back
to the first evaluation window.  ``PerplexityResult.calibration`` says what was used.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from reference.config import KVSinkConfig

__all__ = [
    "PerplexityResult",
    "DEFAULT_CORPUS_NAME",
    "default_corpus_path",
    "load_corpus",
    "corpus_documents",
    "tokenize_corpus",
    "make_windows",
    "fake_quantize_kv",
    "calibrate_config",
    "perplexity_full_precision",
    "perplexity_fake_quant",
    "perplexity_streaming",
    "FAKE_QUANT_ATTENTION",
]

#: Name under which the fake-quantizing attention function is registered in
#: transformers' ``AttentionInterface`` (and the sdpa mask in ``AttentionMaskInterface``).
FAKE_QUANT_ATTENTION = "kvsink_fake_quant"
#: Name reported for the packaged offline corpus.
DEFAULT_CORPUS_NAME = "kvsink default corpus (accelerated/data/default_corpus.txt)"
_WIKITEXT_ENV = "KVSINK_WIKITEXT"


# =========================================================================== result

@dataclass
class PerplexityResult:
    """Perplexity of one configuration on one corpus.

    ppl : ``exp(nll_sum / tokens)``.
    nll_sum : sum over scored tokens of ``-log p(token | prefix)`` (natural log, float64).
    tokens : number of scored tokens (``seq_len - 1`` per window).
    protocol : ``"fp"`` (no quantization), ``"fake"`` or ``"streaming"``.
    config : the ``KVSinkConfig`` used (``None`` for ``"fp"``), predictor fields
        filled in when it was calibrated.
    corpus : name of the corpus (see :func:`load_corpus`).
    seq_len, windows : window length and number of windows evaluated.
    preserved_positions : per window, the positions (0-based within the window)
        kept at full precision.
    preserved_count : total number of preserved tokens over all windows.
    chunk : tokens fed per step (streaming protocol only).
    calibration : what was calibrated on what (empty for ``"fp"``), a JSON-able dict:
        ``text``: the calibration text (``"calibration_ids"``, ``"calibration_text"``,
        ``"default text"`` = the first 512 tokens of the packaged default corpus,
        ``"first window"`` = the first evaluation window, or None when nothing was
        calibrated); ``tokens``: its length (None when nothing was calibrated);
        ``predictor``: None (``"kvsink"`` not configured), ``"config"`` (fields given)
        or ``"calibrated"``; ``kvquant``: None (uniform quantizer), ``"given"``
        (``kvquant_calibration=``), ``"calibrated"`` or ``"not needed"`` (nf grid with
        ``outlier_fraction=0``); ``kvquant_fisher``: whether the k-means was
        Fisher-weighted.
    """

    ppl: float
    nll_sum: float
    tokens: int
    protocol: str
    config: Optional[KVSinkConfig] = None
    corpus: str = ""
    seq_len: int = 0
    windows: int = 0
    preserved_positions: List[List[int]] = field(default_factory=list)
    preserved_count: int = 0
    chunk: Optional[int] = None
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the config as a dict of its fields)."""
        d = asdict(self)
        d["config"] = None if self.config is None else {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}
        return d


def _finish(nll_sum: float, tokens: int, **kw) -> PerplexityResult:
    ppl = math.exp(nll_sum / tokens) if tokens else float("nan")
    preserved = kw.get("preserved_positions", [])
    kw.setdefault("preserved_count", sum(len(p) for p in preserved))
    return PerplexityResult(ppl=ppl, nll_sum=float(nll_sum), tokens=int(tokens), **kw)


# =========================================================================== corpus

def default_corpus_path() -> Path:
    """Path of the packaged offline corpus (original prose, ~2,300 words)."""
    return Path(__file__).resolve().parent / "data" / "default_corpus.txt"


def _repo_wikitext() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def load_corpus(path=None) -> Tuple[str, str]:
    """Return ``(text, name)`` of the evaluation corpus.

    Search order:

    1. ``path`` if given (a WikiText-2 ``wiki.test.raw`` or any UTF-8 text file);
       a missing file raises ``FileNotFoundError`` — an explicit path is never
       silently replaced;
    2. the file named by the environment variable ``KVSINK_WIKITEXT``
       (missing file: ``FileNotFoundError``);
    3. ``../shared/data/wikitext-2-raw/wiki.test.raw`` relative to the
       repository root, if present;
    4. the packaged offline corpus ``accelerated/data/default_corpus.txt``.

    ``name`` says which was used: ``"wikitext-2 test (<path>)"`` for a file named
    ``wiki.test.raw``, ``"<path>"`` for another file, :data:`DEFAULT_CORPUS_NAME`
    for the packaged one.
    """
    def named(p: Path) -> Tuple[str, str]:
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"corpus file {p} is empty")
        label = f"wikitext-2 test ({p})" if p.name == "wiki.test.raw" else str(p)
        return text, label

    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"corpus file {p} does not exist; pass the path of WikiText-2's "
                                    "wiki.test.raw (or any text file), or omit it to use the default")
        return named(p)
    env = os.environ.get(_WIKITEXT_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${_WIKITEXT_ENV}={env} does not exist; fix or unset it")
        return named(p)
    p = _repo_wikitext()
    if p.is_file():
        return named(p)
    return default_corpus_path().read_text(encoding="utf-8"), DEFAULT_CORPUS_NAME


def corpus_documents(text: str) -> List[str]:
    """Rows of a raw text file as the Hugging Face ``wikitext`` dataset gives them.

    One row per line; a non-blank line keeps its trailing ``"\\n"``, a blank
    line becomes ``""`` (the ``wikitext-2-raw-v1`` loading script).
    """
    rows = []
    for line in text.splitlines(keepends=True):
        rows.append(line if line.strip() else "")
    return rows


def tokenize_corpus(text: str, tokenizer) -> torch.Tensor:
    """Token ids ``(1, N)`` of the whole corpus, tokenized once.

    The rows of :func:`corpus_documents` are joined with ``"\\n\\n"`` (the
    common practice for WikiText raw in GPTQ / KIVI / lm-eval style
    perplexity scripts) and tokenized with the tokenizer's defaults (a BOS
    token is added at the very start only if the tokenizer adds one).
    """
    joined = "\n\n".join(corpus_documents(text))
    enc = tokenizer(joined, return_tensors="pt", verbose=False)
    return enc["input_ids"].to(torch.long)


def make_windows(input_ids, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows ``(W, seq_len)`` of a token stream.

    ``input_ids`` is ``(N,)`` or ``(1, N)``.  Window ``w`` holds tokens
    ``[w * seq_len, (w + 1) * seq_len)``; a trailing partial window is dropped;
    the first ``max_windows`` are kept (``None``: all).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one prediction needs two tokens), got {seq_len!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be None or an int >= 1, got {max_windows!r}")
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"input_ids must have shape (N,) or (1, N), got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {ids.dtype}")
    n = ids.shape[0] // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {ids.shape[0]} tokens, fewer than seq_len={seq_len}; "
                         "use a smaller seq_len or a longer corpus")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len).to(torch.long)


# =========================================================================== attention hook

_STATE = threading.local()


def _current_state():
    return getattr(_STATE, "value", None)


@contextmanager
def _attention_state(model, state):
    """Route every attention call of ``model`` through the fake-quant function with ``state``."""
    _register()
    config = model.config
    previous_impl = config._attn_implementation
    if previous_impl == FAKE_QUANT_ATTENTION:
        raise RuntimeError("perplexity evaluation is not re-entrant")
    state["inner"] = "eager" if previous_impl == "eager" else "sdpa"
    previous_state = _current_state()
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
    state = _current_state()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if state is None:
        raise RuntimeError(f"attention implementation {FAKE_QUANT_ATTENTION!r} is only usable "
                           "inside accelerated.evaluate's perplexity functions")
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


# =========================================================================== predictor

# calibrate_config lives in accelerated/calibration.py (shared with accelerated.hf); re-exported here.
from .calibration import calibrate_config  # noqa: E402


# =========================================================================== protocols

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _calibrate(model, config: KVSinkConfig, windows: torch.Tensor, *, kvquant_calibration,
               calibration_ids, calibration_text, tokenizer, kvquant_fisher):
    """Calibrate once before the windows: ``(config, kvquant calibrations or None, record)``.

    The calibration text is ``calibration_ids``, else ``calibration_text``
    (tokenized with ``tokenizer``), else, with a ``tokenizer``, the first 512
    tokens of the packaged default text (``accelerated.calibration.calibration_ids``,
    the default of ``KVSinkCache``).  ``quantizer="kvquant"`` needing a calibration
    (k-means, or ``outlier_fraction > 0``) and not given one: one
    ``calibrate_kvquant_model`` pass over that text, which also fills the
    predictor fields when needed (same pass); without calibration text this is
    a ``ValueError`` (the evaluation windows are never used for it).  Otherwise
    a missing predictor is calibrated with ``calibrate_config`` on the
    calibration text, or — none given — on the first evaluation window.
    """
    from . import calibration as CAL
    fisher = CAL.check_kvquant_fisher(kvquant_fisher, config,
                                      calibration_given=kvquant_calibration is not None)
    kvquant = config.quantizer == "kvquant"
    if kvquant_calibration is not None and not kvquant:
        raise ValueError("kvquant_calibration is only used by quantizer='kvquant' (the config has "
                         f"quantizer={config.quantizer!r}); leave it None")
    need_pred = "kvsink" in config.preserve and not config.predictor_ready
    need_kvq = kvquant and kvquant_calibration is None and (
        config.kvquant_datatype != "nf" or config.outlier_fraction != 0)
    record = {"text": None, "tokens": None,
              "predictor": None if "kvsink" not in config.preserve else
              ("calibrated" if need_pred else "config"),
              "kvquant": None if not kvquant else ("given" if kvquant_calibration is not None else
                                                   "calibrated" if need_kvq else "not needed"),
              "kvquant_fisher": fisher}
    ids = None
    if (need_pred or need_kvq) and (calibration_ids is not None or calibration_text is not None
                                    or tokenizer is not None):
        ids = CAL.calibration_ids(calibration_ids, text=calibration_text, tokenizer=tokenizer)
        record["text"] = ("calibration_ids" if calibration_ids is not None else
                          "calibration_text" if calibration_text is not None else "default text")
        record["tokens"] = int(ids.shape[1])
    cals = kvquant_calibration
    if need_kvq:
        if ids is None:
            raise ValueError(
                f"quantizer='kvquant' with kvquant_datatype={config.kvquant_datatype!r}, "
                f"outlier_fraction={config.outlier_fraction} needs a KVQuant calibration, computed on "
                "held-out text, never on the evaluation windows: pass tokenizer=... (the packaged "
                "default text), calibration_ids=... or calibration_text=... (with tokenizer), or "
                "kvquant_calibration=[one per layer] (accelerated.calibration.calibrate_kvquant_model)")
        config, cals = CAL.calibrate_kvquant_model(model, config, ids, fisher=fisher)
    elif need_pred:
        if ids is None:
            ids = windows[:1]
            record["text"], record["tokens"] = "first window", int(ids.shape[1])
        config = calibrate_config(model, config, ids)
    return config, cals, record


def _check_config(config):
    if not isinstance(config, KVSinkConfig):
        raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")


def _progress(iterable, enabled: bool, desc: str, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``-log softmax(logits)[target]`` in float64; logits ``(T, V)``, targets ``(T,)``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-logp.gather(-1, targets[:, None]).sum())


def perplexity_full_precision(model, input_ids, *, seq_len: int = 512,
                              max_windows: Optional[int] = None, corpus: str = "",
                              progress: bool = False) -> PerplexityResult:
    """Perplexity without quantization (one plain forward pass per window)."""
    windows = make_windows(input_ids, seq_len, max_windows)
    dev = _device(model)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in _progress(windows, progress, "fp"):
            ids = w[None].to(dev)
            logits = model(input_ids=ids, use_cache=False).logits[0]
            nll += _window_nll(logits[:-1], ids[0, 1:])
            count += seq_len - 1
    return _finish(nll, count, protocol="fp", corpus=corpus, seq_len=seq_len,
                   windows=len(windows))


def _preserved_for_window(model, ids: torch.Tensor, config: KVSinkConfig) -> torch.Tensor:
    """Preserved set ``(1, T)`` of one window (fake-quant protocol), from a full-precision pass."""
    from . import predictor as PR
    from . import preserve as PS
    t = ids.shape[1]
    valid = torch.ones(1, t, dtype=torch.bool, device=ids.device)
    predicted = oracle = None
    need_kvsink = "kvsink" in config.preserve
    need_oracle = "oracle" in config.preserve
    if need_kvsink or need_oracle:
        state = {"mode": "probe", "oracle": need_oracle, "oracle_scores": []}
        with _attention_state(model, state):
            out = model(input_ids=ids, output_hidden_states=need_kvsink, use_cache=False)
        if need_kvsink:
            n_states = len(out.hidden_states)
            if config.predictor_layer >= n_states:
                raise ValueError(f"config.predictor_layer={config.predictor_layer} but the model "
                                 f"has hidden states 0..{n_states - 1}")
            hidden = out.hidden_states[config.predictor_layer]
            predicted = PR.predict_sinks(hidden.float(), config.predictor_channels,
                                         config.predictor_threshold).to(torch.bool)
        if need_oracle:
            # Layers pooled along the head axis = mean of the per-layer scores
            # (reference.preserve.oracle_scores, "to pool several layers").
            scores = torch.stack(state["oracle_scores"]).mean(dim=0)
            oracle = scores >= float(config.oracle_ratio)
    return PS.preserved_set(config, valid, predicted=predicted, oracle=oracle).to(torch.bool)


def perplexity_fake_quant(model, input_ids, config: KVSinkConfig, *, seq_len: int = 512,
                          max_windows: Optional[int] = None, corpus: str = "",
                          progress: bool = False, kvquant_calibration=None, calibration_ids=None,
                          calibration_text: Optional[str] = None, tokenizer=None,
                          kvquant_fisher: bool = False) -> PerplexityResult:
    """Perplexity under the papers' fake-quantization protocol (docs/12-evaluation.md §1).

    For each window of ``seq_len`` tokens:

    1. the preserved set ``P`` (bool ``(1, T)``) is computed: the union of
       ``config.preserve`` — ``pfn``: the first ``preserve_first_n`` positions
       of the window; ``kvsink``: ``predict_sinks`` applied to hidden state
       ``config.predictor_layer`` of a **full-precision** pass over the window
       (this equals what a streaming cache sees at prefill, where attention is
       full precision until the prediction layer has run); ``oracle``: the
       per-layer ``oracle_scores`` of that full-precision pass averaged over
       layers, ``>= config.oracle_ratio``; then capped by ``max_preserved``;
    2. one forward pass in which every layer quantizes and dequantizes its whole
       keys ``(B, H, T, D)`` and values with :func:`fake_quantize_kv` (``P``
       excluded from the statistics and kept exact), then runs causal attention
       (sdpa, or eager when the model was loaded with ``attn_implementation="eager"``);
       there is no residual window.  ``quantizer="kvquant"``: the protocol of
       bench/kvquant_table.py (docs/08-kvquant.md §8.12) instead — keys
       un-rotated with the model's ``inv_freq`` at positions ``0..T-1``,
       quantized pre-RoPE per channel and values per token with
       ``quantize_block_kvquant`` under the layer's calibration (``P``
       excluded), dequantized, keys rotated back, ``P`` kept exact;
    3. the NLL of tokens ``1 .. T-1`` given the logits at ``0 .. T-2``.

    Calibration, once before the first window (module docstring): a missing
    KVSink predictor on ``calibration_ids`` / ``calibration_text`` / the
    packaged default text (with ``tokenizer``), else on the first window; the
    KVQuant calibration (``quantizer="kvquant"``, unless ``kvquant_calibration``
    — one ``KVQuantCalibration`` per decoder layer — is given, or the nf grid
    with ``outlier_fraction=0`` needs none) with
    ``accelerated.calibration.calibrate_kvquant_model(..., fisher=kvquant_fisher)``
    on the calibration text, whose preserved tokens (the config's policy) are
    excluded; without ``calibration_ids`` / ``calibration_text`` / ``tokenizer``
    that is a ``ValueError``: the evaluation windows are never used for it.
    ``kvquant_fisher=True`` (k-means only) weights the k-means with
    ``fisher_weights``.  ``result.calibration`` records the choices.
    ``input_ids`` is the token stream ``(N,)`` or ``(1, N)`` (see
    :func:`make_windows`).
    """
    _check_config(config)
    windows = make_windows(input_ids, seq_len, max_windows)
    dev = _device(model)
    inv_freq = None
    if config.quantizer == "kvquant":
        if "oracle" in config.preserve:
            raise ValueError("preserve='oracle' with quantizer='kvquant': the KVQuant calibration "
                             "excludes the calibration text's preserved tokens and has no oracle set "
                             "for it; use preserve 'pfn' and/or 'kvsink'")
        from .hf.support import kvquant_inv_freq
        inv_freq = kvquant_inv_freq(model)
    config, cals, record = _calibrate(model, config, windows, kvquant_calibration=kvquant_calibration,
                                      calibration_ids=calibration_ids, calibration_text=calibration_text,
                                      tokenizer=tokenizer, kvquant_fisher=kvquant_fisher)
    if config.quantizer == "kvquant":
        cals = _check_layer_calibrations(model, config, cals)
    nll, count, preserved_positions = 0.0, 0, []
    with torch.no_grad():
        for w in _progress(windows, progress, f"fake {config.key_bits}/{config.value_bits}-bit"):
            ids = w[None].to(dev)
            preserved = _preserved_for_window(model, ids, config)
            preserved_positions.append(torch.nonzero(preserved[0]).flatten().tolist())
            state = {"mode": "quant", "config": config, "preserved": preserved,
                     "kvquant_calibration": cals, "inv_freq": inv_freq}
            with _attention_state(model, state):
                logits = model(input_ids=ids, use_cache=False).logits[0]
            nll += _window_nll(logits[:-1], ids[0, 1:])
            count += seq_len - 1
    return _finish(nll, count, protocol="fake", config=config, corpus=corpus, seq_len=seq_len,
                   windows=len(windows), preserved_positions=preserved_positions, calibration=record)


def _check_layer_calibrations(model, config: KVSinkConfig, cals) -> list:
    """One KVQuant calibration per decoder layer (None entries: the nf grid, no outliers)."""
    from .hf import support
    text_config = support.text_config(model)
    num_layers = len(support.layer_types(text_config))
    if cals is None:
        return [None] * num_layers
    return support.check_kvquant_calibrations(cals, config, text_config, num_layers)


def perplexity_streaming(model, input_ids, config: KVSinkConfig, *, chunk: int = 1,
                         seq_len: int = 512, max_windows: Optional[int] = None, corpus: str = "",
                         progress: bool = False, kvquant_calibration=None, calibration_ids=None,
                         calibration_text: Optional[str] = None, tokenizer=None,
                         kvquant_fisher: bool = False) -> PerplexityResult:
    """Perplexity with the text streamed through ``KVSinkCache`` (docs/12-evaluation.md §2).

    For each window a fresh :class:`accelerated.hf.KVSinkCache` is built and
    the window is fed ``chunk`` tokens per forward pass; the logits of every
    fed token score the next token of the window.  With ``chunk=1`` each query
    attends to exactly the cache a decoder would hold at that step: quantized
    groups (dequantized), the full-precision residual window of
    ``config.residual_length`` tokens and the preserved tokens.  With
    ``chunk > 1`` the tokens of one chunk also see each other at full precision
    (as in a prefill).

    Calibration happens once, before the loop, never per window nor by the
    caches (module docstring; arguments as :func:`perplexity_fake_quant`): a
    missing KVSink predictor on ``calibration_ids`` / ``calibration_text`` /
    the packaged default text (with ``tokenizer``), else on the first window;
    for ``quantizer="kvquant"`` the per-layer calibrations
    (``kvquant_calibration``, or ``calibrate_kvquant_model(...,
    fisher=kvquant_fisher)`` on the calibration text — a ``ValueError`` when
    none is given, the evaluation windows are never used for it) are passed to
    every window's cache as ``KVSinkCache(model, config,
    kvquant_calibration=...)``.  ``result.calibration`` records the choices.
    """
    _check_config(config)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if "oracle" in config.preserve:
        raise ValueError("preserve='oracle' needs the attention of future queries and has no "
                         "streaming form; use perplexity_fake_quant for the oracle")
    from . import hf
    windows = make_windows(input_ids, seq_len, max_windows)
    dev = _device(model)
    config, cals, record = _calibrate(model, config, windows, kvquant_calibration=kvquant_calibration,
                                      calibration_ids=calibration_ids, calibration_text=calibration_text,
                                      tokenizer=tokenizer, kvquant_fisher=kvquant_fisher)
    was_installed = getattr(model, "_kvsink_hooks", None) is not None
    # transformers >= 5.? names the argument ``cache`` (``past_key_values`` is deprecated)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    nll, count, preserved_positions = 0.0, 0, []
    steps = len(windows) * math.ceil(seq_len / chunk)
    bar = _progress(None, progress, f"stream {config.key_bits}/{config.value_bits}-bit", total=steps)
    try:
        with torch.no_grad():
            for w in windows:
                ids = w[None].to(dev)
                cache = hf.KVSinkCache(model, config, kvquant_calibration=cals)
                for start in range(0, seq_len, chunk):
                    stop = min(start + chunk, seq_len)
                    out = model(input_ids=ids[:, start:stop], use_cache=True, **{cache_kw: cache})
                    logits = out.logits[0]
                    last = min(stop, seq_len - 1)   # the window's last token predicts nothing
                    if last > start:
                        nll += _window_nll(logits[: last - start], ids[0, start + 1: last + 1])
                        count += last - start
                    if progress:
                        bar.update(1)
                rows = cache.preserved_positions()
                preserved_positions.append([int(p) for p in rows[0]] if rows else [])
                del cache
    finally:
        if progress:
            bar.close()
        if not was_installed:
            hf.uninstall(model)     # leave the model's attention implementation as it was
    return _finish(nll, count, protocol="streaming", config=config, corpus=corpus,
                   seq_len=seq_len, windows=len(windows), preserved_positions=preserved_positions,
                   chunk=chunk, calibration=record)
