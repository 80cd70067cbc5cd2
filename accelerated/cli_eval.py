"""``kvsink eval``: the perplexity table (docs/12-evaluation.md §12.4, §12.5).

Rows: full precision, then per bit width ``none``, ``PFN-N``, ``PFN-k`` (the
first k tokens of each window, k = the number KVSink preserves in that
window: PFN at KVSink's cost), ``KVSink`` and ``oracle`` as ``--methods``
asks.  Each quantized row is compared (paired over windows) with the row it
should beat at the same cost or below: no preservation with full precision,
PFN-N with no preservation, PFN-k with PFN-N, KVSink with PFN-k, the oracle
with KVSink (the nearest earlier row present).
"""

from __future__ import annotations

import json
import sys
import time

from .cli_common import (UsageError, base_config, calibrate_predictor, check_data, corpus_ids,
                         load, quantization_note, say)

__all__ = ["cmd_eval", "check_eval_args", "comparison_order"]

#: Rows in order; each is compared with the nearest earlier row present (full precision first).
_ORDER = ("none", "pfn", "pfn-k", "kvsink", "oracle")


def check_eval_args(args) -> None:
    """Checks that need no model, made before anything is loaded: output paths, matplotlib, and a
    streaming window long enough that something is quantized."""
    from . import report as R
    check_data(args)
    try:
        for option, path in (("--json", args.json), ("--markdown", args.markdown),
                             ("--plot", args.plot)):
            if path is not None:
                R.check_output_path(path, option)
        if args.plot is not None:
            R.check_plot_available()
    except (R.OutputPathError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    if args.protocol in ("streaming", "both"):
        block = base_config(args).token_block
        if args.seq_len <= args.residual_length + block:
            raise UsageError(
                f"--protocol {args.protocol} with --seq-len {args.seq_len} <= --residual-length "
                f"{args.residual_length} + token block {block}: no token would be quantized before "
                f"the window ends, the rows would equal full precision; use --seq-len > "
                f"{args.residual_length + block} or a smaller --residual-length")


def comparison_order(methods):
    """The row keys in table order (``pfn-k`` added when both ``pfn`` and ``kvsink`` are asked)."""
    keys = [m for m in _ORDER if m in methods]
    if "kvsink" in methods and "pfn" in methods:
        keys.insert(keys.index("kvsink"), "pfn-k")
    return keys


def _labels(args):
    return {"none": "no preservation", "pfn": f"PFN-{args.pfn}", "pfn-k": "PFN-k",
            "kvsink": "KVSink", "oracle": "attention oracle"}


def _row_result(E, model, ids, cfg, key, proto, args, kw, fp):
    """One row's result for one protocol."""
    if proto == "fake":
        if key in ("kvsink", "pfn-k") and fp.preserved_positions:
            sinks = fp.preserved_positions        # KVSink's sets, read in the full-precision pass
            given = sinks if key == "kvsink" else [list(range(len(p))) for p in sinks]
            return E.perplexity_fake_quant(model, ids, cfg, preserved_positions=given, **kw)
        return E.perplexity_fake_quant(model, ids, cfg, **kw)
    if key == "pfn-k":
        # streaming: one k for every window (the cache resolves PFN itself): KVSink's mean
        k = round(fp.preserved_count / max(fp.windows, 1)) if fp.preserved_positions else 1
        cfg = cfg.replace(preserve="pfn" if k else "none", preserve_first_n=max(k, 1))
    return E.perplexity_streaming(model, ids, cfg, chunk=args.chunk, **kw)


def _run_rows(model, tokenizer, ids, base, args, protocols, windows, corpus, bos):
    """Full precision and every quantized row: ``List[report.Row]``."""
    import torch
    from . import evaluate as E
    from . import report as R
    progress = not args.no_progress
    kw = dict(seq_len=args.seq_len, max_windows=windows, corpus=corpus, progress=progress,
              bos_token_id=bos)
    keys = comparison_order(args.methods)
    sink_cfg = base.replace(preserve="kvsink") if "kvsink" in keys else None
    fp = E.perplexity_full_precision(model, ids, kvsink_config=sink_cfg, **kw)
    if args.quantizer == "kvquant":
        # KVQuant is calibrated inside each perplexity call (once per row and protocol) on the
        # packaged default text, tokenized with the model's tokenizer: never the evaluated windows
        kw.update(tokenizer=tokenizer, kvquant_fisher=args.fisher)
    labels = _labels(args)
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    rows = [R.Row("full precision", str(8 * itemsize), {p: fp for p in protocols})]
    for bits in args.bits:
        for key in keys:
            preserve = "pfn" if key == "pfn-k" else key
            cfg = base.replace(key_bits=bits, value_bits=bits, preserve=preserve)
            res = {}
            for proto in protocols:
                try:
                    res[proto] = _row_result(E, model, ids, cfg, key, proto, args, kw, fp)
                except ValueError as exc:
                    raise UsageError(f"{labels[key]} at {bits} bit: {exc}") from None
            earlier = keys[:keys.index(key)]
            ref = labels[earlier[-1]] if earlier else "full precision"
            rows.append(R.Row(labels[key], str(bits), res, compare_to=ref,
                              nbytes=_row_bytes(R, cfg, model, res, args.seq_len, itemsize)))
    return rows


def _row_bytes(R, cfg, model, results, seq_len, itemsize):
    out = {}
    for proto, r in results.items():
        if proto == "streaming":
            out[proto] = sum(r.kv_nbytes) / (len(r.kv_nbytes) * seq_len) if r.kv_nbytes else None
        else:
            counts = [len(p) for p in r.preserved_positions]
            out[proto] = R.kv_bytes_per_token(cfg, model.config, seq_len, counts, itemsize)
    return out


def _caption(args, corpus, windows, rows, base, calib_note, protocol, elapsed, bos=None):
    from . import report as R
    fp = rows[0].results[protocol]
    lines = [f"text: {corpus}; {windows} window(s) x {args.seq_len} tokens ({fp.tokens} scored"
             + ("" if bos is None else f"; each window opens with BOS id {bos}, not scored") + "); "
             f"{quantization_note(args)}"
             + (f"; streaming: residual {args.residual_length}, chunk {args.chunk}"
                if protocol == "streaming" else "")]
    if calib_note:
        lines.append(f"KVSink predictor: layer {base.predictor_layer}, channels "
                     f"{list(base.predictor_channels)}, threshold {base.predictor_threshold:.4g} "
                     f"({'calibrated on ' if 'given' not in calib_note else ''}{calib_note})")
    if any(r.label == "PFN-k" for r in rows):
        lines.append("PFN-k: the first k tokens of each window, k = the tokens KVSink keeps in that "
                     "window" if protocol == "fake" else
                     "PFN-k: the first k tokens, k = KVSink's mean count per window (rounded)")
    lines.append("KV bytes/token: exact bytes the cache holds per token (docs/06 def. 6.17), "
                 "summed over layers; smaller by: full precision / that")
    lines += R.noise_lines(rows, protocol)
    lines.append(f"{elapsed:.0f} s")
    return "\n".join(lines)


def cmd_eval(args) -> dict:
    """Run ``kvsink eval``; print the table(s); write ``--json`` / ``--markdown`` / ``--plot``."""
    from . import report as R
    check_eval_args(args)
    model, tokenizer = load(args)
    ids, corpus = corpus_ids(args, tokenizer)
    from .corpus import window_bos, window_count
    bos = window_bos(tokenizer)
    n_windows = window_count(ids.shape[1], args.seq_len, bos)
    if n_windows == 0:
        raise UsageError(f"the text has {ids.shape[1]} tokens, fewer than --seq-len {args.seq_len}; "
                         "use a smaller --seq-len or a longer --data file")
    if n_windows < args.windows:
        say(f"note: the text holds only {n_windows} windows of {args.seq_len} tokens; "
            f"evaluating {n_windows} (asked {args.windows})")
    windows = min(n_windows, args.windows)
    protocols = ["fake", "streaming"] if args.protocol == "both" else [args.protocol]
    base, calib_note = base_config(args), None
    if "kvsink" in args.methods:
        base, calib_note = calibrate_predictor(model, args, tokenizer)
        say(f"KVSink predictor: layer {base.predictor_layer}, channels "
            f"{list(base.predictor_channels)}, threshold {base.predictor_threshold:.4g} ({calib_note})")
    t0 = time.time()
    rows = _run_rows(model, tokenizer, ids, base, args, protocols, windows, corpus, bos)
    elapsed = time.time() - t0
    name = args.model or "SmolLM2-135M-Instruct"
    title = f"kvsink perplexity: {name}"
    fp_bytes = R.full_precision_bytes_per_token(model.config, int(rows[0].bits) // 8)
    captions = {p: _caption(args, corpus, windows, rows, base, calib_note, p, elapsed, bos)
                for p in protocols}
    for proto in protocols:
        R.render_table(f"{title} ({proto} protocol)", rows, proto, fp_bytes, captions[proto],
                       sys.stdout)
    report = {"model": name, "corpus": corpus, "seq_len": args.seq_len, "windows": windows,
              "window_bos": bos,
              "protocols": protocols, "group_size": args.group_size, "quantizer": args.quantizer,
              "kvquant": None if args.quantizer != "kvquant" else {
                  "datatype": base.kvquant_datatype, "outlier_fraction": base.outlier_fraction,
                  "fisher": args.fisher},
              "predictor_calibration": calib_note, "noise_rule_se": R.NOISE_SE,
              "full_precision_kv_bytes_per_token": fp_bytes,
              "results": R.to_json(rows, protocols, fp_bytes)}
    _write_outputs(args, R, report, rows, protocols, fp_bytes, title, captions)
    return report


def _write_outputs(args, R, report, rows, protocols, fp_bytes, title, captions):
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        say(f"results saved to {args.json}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(R.to_markdown(title, rows, protocols, fp_bytes, captions))
        say(f"markdown table saved to {args.markdown}")
    if args.plot:
        R.plot(args.plot, rows, protocols[0], f"{title} ({protocols[0]}, {report['windows']} windows)")
        say(f"figure saved to {args.plot}")
