"""Helpers shared by the ``kvsink`` subcommands (docs/12-evaluation.md §12.4).

Every mistake of the user found here is raised as :class:`UsageError`, which
``accelerated.cli.main`` prints as one ``kvsink: error: ...`` line (exit status
2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

__all__ = ["UsageError", "CALIBRATION_NOTE", "DEFAULT_OUTLIER_FRACTION", "say", "resolve_device",
           "load", "check_data", "corpus_ids", "base_config", "quantization_note", "calibrate_predictor",
           "check_predictor_fits"]

#: KVSinkConfig's default outlier fraction (used when --outlier-fraction is not given).
DEFAULT_OUTLIER_FRACTION = 0.01
CALIBRATION_NOTE = "the first 512 tokens of the packaged default corpus"


class UsageError(Exception):
    """A mistake on the command line or in its inputs; the message says what to do."""


def say(msg: str) -> None:
    """A progress line on stderr (stdout holds the results)."""
    print(msg, file=sys.stderr, flush=True)


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no CUDA device (use --device cpu or auto)")
    return name


def load(args):
    """``(model, tokenizer)`` of ``--model`` on ``--device`` in ``--dtype``; the predictor
    options checked against the model."""
    import torch
    from .models import load_model
    device = resolve_device(args.device)
    say(f"loading model {args.model or 'smollm2-135m (embedded default)'} on {device} ({args.dtype})")
    try:
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    except (OSError, ValueError) as exc:         # FileNotFoundError, ConnectionError are OSErrors
        raise UsageError(f"cannot load --model {args.model!r}: {exc}") from None
    check_predictor_fits(model, args.predictor_layer, args.predictor_channels)
    return model, tokenizer


def check_predictor_fits(model, layer, channels) -> None:
    """``UsageError`` when ``--predictor-layer`` / ``--predictor-channels`` are out of the model's range."""
    cfg = model.config.get_text_config(decoder=True)
    n, width = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    if layer is not None and layer > n:
        raise UsageError(f"--predictor-layer {layer} is out of range: this model has hidden states "
                         f"0..{n} (0 = embeddings, l = output of decoder layer l-1); give 0..{n}")
    bad = [c for c in (channels or ()) if c >= width]
    if bad:
        raise UsageError(f"--predictor-channels {','.join(map(str, bad))}: this model's hidden states "
                         f"have channels 0..{width - 1}; give channels below {width}")


def check_data(args) -> None:
    """``UsageError`` when ``--data`` names no file, when ``--data`` and ``--corpus`` are both
    given, or when the ``--corpus`` text cannot be had (checked before the model loads)."""
    from pathlib import Path
    corpus = getattr(args, "corpus", None)
    if corpus is not None:
        if args.data is not None:
            raise UsageError(f"--data {args.data} and --corpus {corpus} both name the text; give one")
        from .corpus import load_named_corpus
        try:
            load_named_corpus(corpus)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--corpus {corpus}: {exc}") from None
    if args.data is not None and not Path(args.data).expanduser().is_file():
        raise UsageError(f"--data file {args.data} does not exist; pass the path of a text file "
                         "(e.g. WikiText-2's wiki.test.raw), or omit it to use the default text")


def corpus_ids(args, tokenizer):
    """``(ids (1, N), corpus name)`` of ``--data`` (or the default text)."""
    from .corpus import is_wikitext, load_corpus, load_named_corpus, tokenize_corpus, window_bos
    try:
        if getattr(args, "corpus", None) is not None:
            text, name, rows = load_named_corpus(args.corpus)
        else:
            text, name = load_corpus(args.data)
            rows = is_wikitext(name)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    ids = tokenize_corpus(text, tokenizer, wikitext_rows=rows)
    bos = window_bos(tokenizer)
    say(f"corpus: {name}: {ids.shape[1]} tokens; "
        + ("no BOS (the tokenizer adds none)" if bos is None else
           f"every window opens with the BOS {tokenizer.convert_ids_to_tokens(bos)!r}"))
    return ids, name


def base_config(args, bits: int = 2):
    from reference.config import KVSinkConfig
    return KVSinkConfig(
        key_bits=bits, value_bits=bits,
        key_group_size=getattr(args, "group_size", 32), value_group_size=getattr(args, "group_size", 32),
        residual_length=getattr(args, "residual_length", 128),
        preserve="none", preserve_first_n=getattr(args, "pfn", 1),
        predictor_layer=args.predictor_layer,
        predictor_channels=tuple(args.predictor_channels or ()),
        predictor_threshold=args.predictor_threshold,
        quantizer=getattr(args, "quantizer", "uniform"),
        kvquant_datatype=getattr(args, "kvquant_datatype", None) or "nf",
        outlier_fraction=DEFAULT_OUTLIER_FRACTION if getattr(args, "outlier_fraction", None) is None
        else args.outlier_fraction)


def quantization_note(args) -> str:
    if args.quantizer == "kvquant":
        cfg = base_config(args)
        fit = cfg.kvquant_datatype == "kmeans" or cfg.outlier_fraction > 0
        return (f"KVQuant-style {cfg.kvquant_datatype}"
                + (", Fisher-weighted k-means" if args.fisher else "")
                + f", outliers {100 * cfg.outlier_fraction:g}%, keys pre-RoPE per channel in groups "
                  f"of {args.group_size} tokens, values per token in groups of {args.group_size} "
                  "channels"
                + (f"; calibrated on {CALIBRATION_NOTE} (per row: its bits and preserved tokens)"
                   if fit else "; no calibration (nf grid, no outliers)"))
    return f"group size {args.group_size}, asymmetric, keys per channel, values per token"


def calibrate_predictor(model, args, tokenizer):
    """``(config, where)``: the base config with the KVSink predictor fields, given on the
    command line or calibrated on the first 512 tokens of the packaged default corpus (the
    default of ``KVSinkCache``; held out from the evaluation text)."""
    from .calibration import calibrate_config
    cfg = base_config(args)
    if cfg.predictor_ready:
        return cfg, "given on the command line"
    try:
        cfg = calibrate_config(model, cfg, tokenizer=tokenizer)
    except ValueError as exc:
        raise UsageError(f"KVSink predictor calibration failed: {exc}; set --predictor-layer/"
                         "--predictor-channels/--predictor-threshold by hand or leave kvsink out of "
                         "--methods") from None
    return cfg, CALIBRATION_NOTE
