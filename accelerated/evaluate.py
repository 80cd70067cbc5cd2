"""Perplexity of a language model whose KV cache is quantized (docs/12-evaluation.md).

Two protocols, both returning a :class:`PerplexityResult`:

``perplexity_fake_quant`` — the papers' protocol (KIVI, KVQuant, KVSink).
    One forward pass per window.  In every layer the window's keys and values
    are quantized *whole* and dequantized again ("fake quantization",
    ``accelerated.fake_quant``) before causal attention; the preserved tokens
    keep their full-precision keys and values and are excluded from the group
    statistics.  There is no residual window: every token except the preserved
    ones is quantized, and the last group along the token axis may be partial.

``perplexity_streaming`` — faithful to decoding.
    The window is fed through :class:`accelerated.hf.KVSinkCache` ``chunk``
    tokens at a time; with ``chunk=1`` each query sees exactly the cache it
    would see while generating (quantized groups, full-precision residual
    window, preserved tokens).

Corpus and windowing (every protocol, ``accelerated.corpus``, re-exported
here): the token stream is cut into non-overlapping windows of ``seq_len``
tokens; with ``bos_token_id`` (``window_bos(tokenizer)``: the tokenizer's BOS
where it adds one) each window is that BOS followed by ``seq_len - 1`` text
tokens, the BOS context only, never a scored target.  In each window the ``seq_len - 1`` next-token predictions are scored;
the result keeps each window's NLL sum (``window_nll``, for paired
comparisons) and the perplexity ``exp(sum of NLL / number of predicted tokens)``.

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
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import torch

from reference.config import KVSinkConfig

from .corpus import (DEFAULT_CORPUS_NAME, corpus_documents, default_corpus_path,  # noqa: F401
                     load_corpus, make_windows, tokenize_corpus, window_bos, window_count)
from .fake_quant import FAKE_QUANT_ATTENTION, attention_state, fake_quantize_kv  # noqa: F401

__all__ = [
    "PerplexityResult",
    "DEFAULT_CORPUS_NAME",
    "default_corpus_path",
    "load_corpus",
    "corpus_documents",
    "tokenize_corpus",
    "make_windows",
    "window_bos",
    "window_count",
    "fake_quantize_kv",
    "calibrate_config",
    "check_token_ids",
    "perplexity_full_precision",
    "perplexity_fake_quant",
    "perplexity_streaming",
    "FAKE_QUANT_ATTENTION",
]

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
    window_nll : per window, the sum of its ``seq_len - 1`` token NLLs (float64), in
        window order: the paired differences of ``accelerated.report`` use them.
    kv_nbytes : streaming protocol only: per window, ``KVSinkCache.nbytes()`` after
        its last token (docs/06-cache.md definition 6.17, summed over layers).
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
    window_nll: List[float] = field(default_factory=list)
    kv_nbytes: List[int] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the config as a dict of its fields)."""
        d = asdict(self)
        d["config"] = None if self.config is None else {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}
        return d


def _finish(window_nll: List[float], tokens: int, **kw) -> PerplexityResult:
    nll_sum = math.fsum(window_nll)
    ppl = math.exp(nll_sum / tokens) if tokens else float("nan")
    preserved = kw.get("preserved_positions", [])
    kw.setdefault("preserved_count", sum(len(p) for p in preserved))
    return PerplexityResult(ppl=ppl, nll_sum=float(nll_sum), tokens=int(tokens),
                            window_nll=[float(x) for x in window_nll], **kw)


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


def check_token_ids(model, windows: torch.Tensor) -> None:
    """``ValueError`` unless every token id lies in ``[0, vocabulary size)`` of the model's input
    embeddings (torch would end in an ``IndexError`` inside the embedding lookup)."""
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= vocab:
        bad = hi if hi >= vocab else lo
        raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab}): the token "
                         "ids were made by another tokenizer than the model's; tokenize the text with "
                         "the model's own tokenizer")


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``-log softmax(logits)[target]`` in float64; logits ``(T, V)``, targets ``(T,)``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-logp.gather(-1, targets[:, None]).sum())


def perplexity_full_precision(model, input_ids, *, seq_len: int = 512,
                              max_windows: Optional[int] = None, corpus: str = "",
                              progress: bool = False,
                              kvsink_config: Optional[KVSinkConfig] = None,
                              bos_token_id: Optional[int] = None) -> PerplexityResult:
    """Perplexity without quantization (one plain forward pass per window).

    ``kvsink_config`` (a config with ``"kvsink"`` in ``preserve`` and the predictor
    fields set): the same pass also reads ``hidden_states[predictor_layer]`` and
    ``result.preserved_positions`` holds, per window, the positions that config
    preserves (its preserved set, §12.2 step 1): what ``perplexity_fake_quant``
    would compute with a second full-precision pass, ready to be passed to it as
    ``preserved_positions=`` for every bit width.

    ``bos_token_id``: every window opens with this token (:func:`make_windows`).
    """
    windows = make_windows(input_ids, seq_len, max_windows, bos_token_id)
    check_token_ids(model, windows)
    if kvsink_config is not None and not ("kvsink" in kvsink_config.preserve and "oracle" not in
                                          kvsink_config.preserve and kvsink_config.predictor_ready):
        raise ValueError("kvsink_config must have 'kvsink' (not 'oracle') in preserve and the "
                         "predictor fields set "
                         "(calibrate_config(model, config, tokenizer=...))")
    dev = _device(model)
    window_nll, preserved_positions = [], []
    with torch.no_grad():
        for w in _progress(windows, progress, "fp"):
            ids = w[None].to(dev)
            out = model(input_ids=ids, use_cache=False, output_hidden_states=kvsink_config is not None)
            window_nll.append(_window_nll(out.logits[0, :-1], ids[0, 1:]))
            if kvsink_config is not None:
                kept = _preserved_set(kvsink_config, seq_len, dev, out.hidden_states, None)
                preserved_positions.append(torch.nonzero(kept[0]).flatten().tolist())
    return _finish(window_nll, len(windows) * (seq_len - 1), protocol="fp", corpus=corpus,
                   seq_len=seq_len, windows=len(windows), preserved_positions=preserved_positions)


def _preserved_for_window(model, ids: torch.Tensor, config: KVSinkConfig) -> torch.Tensor:
    """Preserved set ``(1, T)`` of one window (fake-quant protocol), from a full-precision pass
    when ``"kvsink"`` or ``"oracle"`` is configured."""
    need_kvsink = "kvsink" in config.preserve
    need_oracle = "oracle" in config.preserve
    hidden = oracle = None
    if need_kvsink or need_oracle:
        state = {"mode": "probe", "oracle": need_oracle, "oracle_scores": []}
        with attention_state(model, state):
            out = model(input_ids=ids, output_hidden_states=need_kvsink, use_cache=False)
        hidden = out.hidden_states if need_kvsink else None
        if need_oracle:
            # Layers pooled along the head axis = mean of the per-layer scores
            # (reference.preserve.oracle_scores, "to pool several layers").
            scores = torch.stack(state["oracle_scores"]).mean(dim=0)
            oracle = scores >= float(config.oracle_ratio)
    return _preserved_set(config, ids.shape[1], ids.device, hidden, oracle)


def _preserved_set(config: KVSinkConfig, t: int, device, hidden_states, oracle) -> torch.Tensor:
    """The preserved set bool ``(1, T)`` of one window from its full-precision hidden states
    (``None`` unless ``"kvsink"`` is configured) and its oracle set (bool ``(1, T)`` or ``None``)."""
    from . import predictor as PR
    from . import preserve as PS
    predicted = None
    if hidden_states is not None:
        n_states = len(hidden_states)
        if config.predictor_layer >= n_states:
            raise ValueError(f"config.predictor_layer={config.predictor_layer} but the model "
                             f"has hidden states 0..{n_states - 1}")
        hidden = hidden_states[config.predictor_layer]
        predicted = PR.predict_sinks(hidden.float(), config.predictor_channels,
                                     config.predictor_threshold).to(torch.bool)
    valid = torch.ones(1, t, dtype=torch.bool, device=device)
    return PS.preserved_set(config, valid, predicted=predicted, oracle=oracle).to(torch.bool)


def perplexity_fake_quant(model, input_ids, config: KVSinkConfig, *, seq_len: int = 512,
                          max_windows: Optional[int] = None, corpus: str = "",
                          progress: bool = False, kvquant_calibration=None, calibration_ids=None,
                          calibration_text: Optional[str] = None, tokenizer=None,
                          kvquant_fisher: bool = False,
                          preserved_positions: Optional[Sequence[Sequence[int]]] = None,
                          bos_token_id: Optional[int] = None) -> PerplexityResult:
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
    ``input_ids`` is the token stream ``(N,)`` or ``(1, N)``, cut into windows
    by :func:`make_windows` (each opened by ``bos_token_id`` when given).

    ``preserved_positions`` (one list of positions per window, e.g. the
    ``preserved_positions`` of ``perplexity_full_precision(...,
    kvsink_config=...)``, or ``[range(k_w)]`` for PFN with a count per window):
    step 1 is skipped and these positions are kept at full precision instead of
    ``config.preserve``'s set (no cap applied; ``config.preserve`` is recorded
    as given).
    """
    _check_config(config)
    windows = make_windows(input_ids, seq_len, max_windows, bos_token_id)
    check_token_ids(model, windows)
    given = _check_positions(preserved_positions, len(windows), seq_len)
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
    window_nll, kept = [], []
    with torch.no_grad():
        for i, w in enumerate(_progress(windows, progress,
                                        f"fake {config.key_bits}/{config.value_bits}-bit")):
            ids = w[None].to(dev)
            if given is None:
                preserved = _preserved_for_window(model, ids, config)
            else:
                preserved = torch.zeros(1, seq_len, dtype=torch.bool, device=dev)
                preserved[0, given[i]] = True
            kept.append(torch.nonzero(preserved[0]).flatten().tolist())
            state = {"mode": "quant", "config": config, "preserved": preserved,
                     "kvquant_calibration": cals, "inv_freq": inv_freq}
            with attention_state(model, state):
                logits = model(input_ids=ids, use_cache=False).logits[0]
            window_nll.append(_window_nll(logits[:-1], ids[0, 1:]))
    return _finish(window_nll, len(windows) * (seq_len - 1), protocol="fake", config=config,
                   corpus=corpus, seq_len=seq_len, windows=len(windows), preserved_positions=kept,
                   calibration=record)


def _check_positions(positions, n_windows: int, seq_len: int) -> Optional[List[List[int]]]:
    """``preserved_positions=``: None, or one list of distinct positions in ``[0, seq_len)`` per window."""
    if positions is None:
        return None
    out = [[int(p) for p in row] for row in positions]
    if len(out) != n_windows:
        raise ValueError(f"preserved_positions has {len(out)} entries, one per window is needed "
                         f"({n_windows} windows)")
    for i, row in enumerate(out):
        if any(not 0 <= p < seq_len for p in row) or len(set(row)) != len(row):
            raise ValueError(f"preserved_positions[{i}] must hold distinct positions in [0, {seq_len}), "
                             f"got {row}")
    return out


def _check_layer_calibrations(model, config: KVSinkConfig, cals) -> list:
    """One KVQuant calibration per decoder layer (None entries: the nf grid, no outliers)."""
    from .hf import support
    text_config = support.text_config(model)
    num_layers = len(support.layer_types(text_config))
    if cals is None:
        return [None] * num_layers
    return support.check_kvquant_calibrations(cals, config, text_config, num_layers)


def _stream_window(model, ids, config: KVSinkConfig, cals, *, chunk: int, seq_len: int,
                   cache_kw: str, bar):
    """One window ``ids`` (1, seq_len) through a fresh ``KVSinkCache``, ``chunk`` tokens per
    forward pass: its summed NLL, the cache's bytes at the end and the positions it preserved
    (first row).  ``bar``: a progress bar advanced once per forward, or None."""
    from . import hf
    cache = hf.KVSinkCache(model, config, kvquant_calibration=cals)
    nll = 0.0
    for start in range(0, seq_len, chunk):
        stop = min(start + chunk, seq_len)
        out = model(input_ids=ids[:, start:stop], use_cache=True, **{cache_kw: cache})
        logits = out.logits[0]
        last = min(stop, seq_len - 1)   # the window's last token predicts nothing
        if last > start:
            nll += _window_nll(logits[: last - start], ids[0, start + 1: last + 1])
        if bar is not None:
            bar.update(1)
    cache.check()       # the value checks of the forwards since the window's last flush (docs/11 §11.3)
    rows = cache.preserved_positions()
    return nll, int(cache.nbytes()), ([int(p) for p in rows[0]] if rows else [])


def perplexity_streaming(model, input_ids, config: KVSinkConfig, *, chunk: int = 1,
                         seq_len: int = 512, max_windows: Optional[int] = None, corpus: str = "",
                         progress: bool = False, kvquant_calibration=None, calibration_ids=None,
                         calibration_text: Optional[str] = None, tokenizer=None,
                         kvquant_fisher: bool = False,
                         bos_token_id: Optional[int] = None) -> PerplexityResult:
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
    ``bos_token_id``: every window opens with this token (:func:`make_windows`).
    """
    _check_config(config)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if "oracle" in config.preserve:
        raise ValueError("preserve='oracle' needs the attention of future queries and has no "
                         "streaming form; use perplexity_fake_quant for the oracle")
    from . import hf
    windows = make_windows(input_ids, seq_len, max_windows, bos_token_id)
    check_token_ids(model, windows)
    dev = _device(model)
    config, cals, record = _calibrate(model, config, windows, kvquant_calibration=kvquant_calibration,
                                      calibration_ids=calibration_ids, calibration_text=calibration_text,
                                      tokenizer=tokenizer, kvquant_fisher=kvquant_fisher)
    was_installed = getattr(model, "_kvsink_hooks", None) is not None
    # transformers >= 5.? names the argument ``cache`` (``past_key_values`` is deprecated)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    window_nll, preserved_positions, kv_nbytes = [], [], []
    steps = len(windows) * math.ceil(seq_len / chunk)
    bar = _progress(None, progress, f"stream {config.key_bits}/{config.value_bits}-bit", total=steps)
    try:
        with torch.no_grad():
            for w in windows:
                nll, nbytes, preserved = _stream_window(model, w[None].to(dev), config, cals,
                                                        chunk=chunk, seq_len=seq_len, cache_kw=cache_kw,
                                                        bar=bar if progress else None)
                window_nll.append(nll)
                kv_nbytes.append(nbytes)
                preserved_positions.append(preserved)
    finally:
        if progress:
            bar.close()
        if not was_installed:
            hf.uninstall(model)     # leave the model's attention implementation as it was
    return _finish(window_nll, len(windows) * (seq_len - 1), protocol="streaming", config=config,
                   corpus=corpus, seq_len=seq_len, windows=len(windows),
                   preserved_positions=preserved_positions, chunk=chunk, kv_nbytes=kv_nbytes,
                   calibration=record)
