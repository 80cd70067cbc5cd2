"""The fidelity report: the paper's claims on one model, one table per model (issue 15).

Writes ``<out>/<model>[-<corpus>].json`` (every cell's per-window NLLs) and ``.md`` (the tables),
and ``<out>/README.md`` (an index of every report in the folder).

Protocol: the fake-quantization protocol of docs/12-evaluation.md §12.2
(``accelerated.evaluate.perplexity_fake_quant``): windows of ``--window-length`` tokens, each
opened by the tokenizer's BOS where it adds one (``accelerated.corpus.window_bos``); in each window
the ``window-length - 1`` next-token predictions of its text tokens are scored.

Cells (one *configuration* each, evaluated over every window, then written):

* ``fp``: full precision.  The same pass reads the KVSink predictor's hidden state and gives the
  KVSink set ``S_w`` of every window ``w`` (§12.2 step 1);
* uniform (KIVI-style: asymmetric, keys per channel, values per token, groups of ``--group-size``)
  at ``--bits`` (2, 3, 4): ``none`` (nothing preserved), ``PFN-k`` (the first ``k_w = |S_w|`` tokens
  of window ``w``) and ``KVSink`` (``S_w``).  **Equal counts**: PFN-k and KVSink keep the same
  number of tokens in every window, both passed as ``preserved_positions=`` (no cap);
* KVQuant-style (docs/08-kvquant.md: keys pre-RoPE per channel, values per token,
  ``--kvquant-datatype`` levels, dense-and-sparse outliers) at ``--kvquant-bits`` (2, 3) and outlier
  fractions ``--fractions`` (0, 0.1, 0.5, 1 %): ``PFN-k`` and ``KVSink`` at the same counts; each
  calibrated once on held-out text (the first 512 tokens of the packaged essay, never the
  evaluation windows) excluding its own preserved tokens (KVSink's predicted set; PFN the first
  ``round(mean k)`` tokens).

The KVSink predictor is calibrated once, on the same held-out text (``calibrate_config``), unless
``--predictor-layer/--predictor-channels/--predictor-threshold`` are given.

Differences are paired over windows (``accelerated.report.paired_difference``): mean ± standard
error, and "beyond noise" when ``|difference| >= 2 SE`` (``report.NOISE_SE``).  Compared: none with
full precision, PFN-k with none, KVSink with PFN-k (claim 1); KVQuant PFN-k with full precision,
KVSink with PFN-k at the same outliers (claim 2a), KVSink at each outlier fraction with PFN-k at the
largest (claim 2b: does KVSink need fewer 16-bit outliers for the same perplexity?).

Resumable: the JSON is rewritten after every cell, and a re-run with the same settings skips the
cells already there (other settings: refused, naming ``--fresh``).

Run (CPU, one thread, low priority; one model at a time):

    OMP_NUM_THREADS=1 nice -n 15 python bench/fidelity.py --model gemma-3-270m --windows 8
    python bench/fidelity.py --render          (the Markdown and the index again, from the JSON files)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelerated import corpus as C  # noqa: E402
from accelerated import evaluate as E  # noqa: E402
from accelerated import report as R  # noqa: E402
from accelerated.calibration import calibrate_config, calibration_ids  # noqa: E402
from accelerated.models import load_model  # noqa: E402
from reference.config import KVSinkConfig  # noqa: E402

#: Settings that must match for a re-run to reuse a report's cells.
SETTINGS = ("model", "corpus", "windows", "window_length", "group_size", "kvquant_datatype",
            "window_bos", "predictor")
POLICY_LABEL = {"none": "no preservation", "pfn-k": "PFN-k", "kvsink": "KVSink"}


# --------------------------------------------------------------------------- the plan

def uniform_key(bits: int, policy: str) -> str:
    return f"uniform/{bits}/{policy}"


def kvquant_key(bits: int, fraction: float, policy: str) -> str:
    return f"kvquant/{bits}/{fraction:g}/{policy}"


def plan(bits, kvquant_bits, fractions):
    """Cells in run order: ``[(key, quantizer, bits, fraction, policy)]``, full precision first."""
    cells = [("fp", None, None, None, None)]
    for b in bits:
        cells += [(uniform_key(b, p), "uniform", b, None, p) for p in ("none", "pfn-k", "kvsink")]
    for b in kvquant_bits:
        for f in fractions:
            cells += [(kvquant_key(b, f, p), "kvquant", b, f, p) for p in ("pfn-k", "kvsink")]
    return cells


def comparisons(bits, kvquant_bits, fractions):
    """``[(key, reference key, claim)]``: every paired difference the report shows."""
    out = []
    for b in bits:
        out += [(uniform_key(b, "none"), "fp", "cost"),
                (uniform_key(b, "pfn-k"), uniform_key(b, "none"), "preservation"),
                (uniform_key(b, "kvsink"), uniform_key(b, "pfn-k"), "claim 1")]
    top = max(fractions) if fractions else None
    for b in kvquant_bits:
        for f in fractions:
            out += [(kvquant_key(b, f, "pfn-k"), "fp", "cost"),
                    (kvquant_key(b, f, "kvsink"), kvquant_key(b, f, "pfn-k"), "claim 2a")]
        for f in fractions:
            out.append((kvquant_key(b, f, "kvsink"), kvquant_key(b, top, "pfn-k"), "claim 2b"))
    return out


# --------------------------------------------------------------------------- one cell

def run_cell(model, ids, state, cell, run):
    """Evaluate one cell: ``{ppl, window_nll, kept, seconds, ...}`` (JSON-able)."""
    key, quantizer, bits, fraction, policy = cell
    t0 = time.time()
    kw = dict(seq_len=state["window_length"], max_windows=state["windows"], corpus=state["corpus"],
              progress=run.progress, bos_token_id=state["window_bos"])
    if quantizer is None:
        res = E.perplexity_full_precision(model, ids, kvsink_config=run.predictor_config, **kw)
        extra = {"kvsink_positions": res.preserved_positions}
    else:
        sinks = state["cells"]["fp"]["kvsink_positions"]
        given = {"none": [[] for _ in sinks], "kvsink": sinks,
                 "pfn-k": [list(range(len(s))) for s in sinks]}[policy]
        twin = key.rsplit("/", 1)[0] + "/pfn-k"
        if policy == "kvsink" and twin in state["cells"] and same_inputs(state, quantizer):
            return dict(state["cells"][twin], seconds=0.0, same_as=twin)
        cfg = cell_config(run, quantizer, bits, fraction, policy, sinks)
        if quantizer == "kvquant":
            kw.update(calibration_ids=run.calibration_ids, kvquant_fisher=False)
        res = E.perplexity_fake_quant(model, ids, cfg, preserved_positions=given, **kw)
        extra = {"calibration": res.calibration}
    return dict(ppl=res.ppl, window_nll=res.window_nll, tokens=res.tokens,
                kept=[len(p) for p in res.preserved_positions], seconds=time.time() - t0, **extra)


def same_inputs(state, quantizer) -> bool:
    """Whether a KVSink cell has exactly its PFN-k twin's inputs: KVSink's set is the first ``k_w``
    tokens of every window and, for KVQuant, its calibration excludes the same tokens of the
    held-out text as PFN's (the first ``max(1, round(mean k))``).  Then the twin's result is its."""
    sinks = state["cells"]["fp"]["kvsink_positions"]
    if not all(s == list(range(len(s))) for s in sinks):
        return False
    if quantizer == "uniform":
        return True
    n = max(1, round(sum(len(s) for s in sinks) / max(len(sinks), 1)))
    return state.get("calibration_kvsink_positions") == list(range(n))


def calibration_sinks(model, cfg: KVSinkConfig, cal_ids) -> list:
    """Positions the KVSink predictor picks in the held-out calibration text (what a KVSink
    KVQuant cell's calibration excludes)."""
    from accelerated import predictor as PR
    with torch.no_grad():
        hidden = model(input_ids=cal_ids.to(next(model.parameters()).device), use_cache=False,
                       output_hidden_states=True).hidden_states[cfg.predictor_layer]
    flags = PR.predict_sinks(hidden.float(), cfg.predictor_channels, cfg.predictor_threshold)
    return torch.nonzero(torch.as_tensor(flags)[0]).flatten().tolist()


def cell_config(run, quantizer, bits, fraction, policy, sinks) -> KVSinkConfig:
    """The cell's config; ``preserve`` is what its KVQuant calibration excludes on the held-out text
    (the evaluated windows' sets are given as positions)."""
    base = run.predictor_config.replace(key_bits=bits, value_bits=bits, residual_length=0)
    if quantizer == "uniform":
        return base.replace(preserve="none")
    mean_k = sum(len(s) for s in sinks) / max(len(sinks), 1)
    preserve = "kvsink" if policy == "kvsink" else "pfn"
    return base.replace(quantizer="kvquant", kvquant_datatype=run.datatype, outlier_fraction=fraction,
                        preserve=preserve, preserve_first_n=max(1, round(mean_k)))


# --------------------------------------------------------------------------- statistics

def _result(state, key):
    c = state["cells"][key]
    return SimpleNamespace(window_nll=c["window_nll"], seq_len=state["window_length"], ppl=c["ppl"])


def paired(state, key, ref):
    """``{key, reference, difference, se, beyond_noise}`` of two finished cells."""
    diff, se = R.paired_difference(_result(state, key), _result(state, ref))
    noise = R.within_noise(diff, se)
    return dict(key=key, reference=ref, difference=diff, se=se,
                beyond_noise=None if noise is None else not noise)


def summarize(state):
    """Every comparison whose two cells are done, in plan order."""
    out = []
    for key, ref, claim in comparisons(state["bits"], state["kvquant_bits"], state["fractions"]):
        if key in state["cells"] and ref in state["cells"]:
            out.append(dict(paired(state, key, ref), claim=claim))
    return out


# --------------------------------------------------------------------------- markdown

def _diff(cmp):
    if cmp is None:
        return "-", ""
    flag = {True: "**yes**", False: "no", None: "n/a"}[cmp["beyond_noise"]]
    return f"{cmp['difference']:+.3f} ± {cmp['se']:.3f}", flag


def _label(state, key):
    if key == "fp":
        return "full precision"
    parts = key.split("/")
    name = POLICY_LABEL[parts[-1]]
    return f"{name} {parts[1]}-bit" + (f" {100 * float(parts[2]):g} %" if parts[0] == "kvquant" else "")


def _kept(state, key):
    c = state["cells"].get(key)
    return "-" if c is None or key == "fp" else f"{sum(c['kept']) / len(c['kept']):.1f}"


def _table(state, rows, by_key, header):
    """Markdown rows ``[cells..., ppl, kept, difference, vs, beyond]`` for ``rows`` = ``[(key, [cells])]``."""
    lines = ["| " + " | ".join(header + ["kept/window", "perplexity", "difference ± SE", "vs",
                                         "beyond 2 SE"]) + " |",
             "|" + "---|" * (len(header) + 5)]
    for key, cols in rows:
        c = state["cells"].get(key)
        ppl = "pending" if c is None else f"{c['ppl']:.3f}"
        cmp = by_key.get(key)
        d, flag = _diff(cmp)
        vs = "-" if cmp is None else _label(state, cmp["reference"])
        lines.append("| " + " | ".join(cols + [_kept(state, key), ppl, d, vs, flag]) + " |")
    return lines


def markdown(state, summary) -> str:
    """The report as GitHub markdown."""
    first = {}
    for cmp in summary:
        if cmp["claim"] != "claim 2b":
            first.setdefault(cmp["key"], cmp)
    fp = state["cells"].get("fp")
    L = [f"# Fidelity: {state['model']} on {state['corpus']}", "",
         f"{state['windows']} windows x {state['window_length']} tokens "
         f"({state['windows'] * (state['window_length'] - 1)} scored tokens)"
         + ("; every window opens with the BOS (id %d), never scored" % state["window_bos"]
            if state["window_bos"] is not None else "; no BOS (the tokenizer adds none)")
         + f"; fake quantization, float32 on {state['device']}; groups of {state['group_size']}.",
         "", f"KVSink predictor: layer {state['predictor']['layer']}, channels "
         f"{state['predictor']['channels']}, threshold {state['predictor']['threshold']:.4g} "
         f"({state['predictor']['source']}).", ""]
    if fp is not None:
        k = [len(p) for p in fp["kvsink_positions"]]
        L += [f"KVSink keeps {sum(k) / len(k):.2f} tokens per window (min {min(k)}, max {max(k)}); "
              f"positions in window 0: {fp['kvsink_positions'][0][:20]}.  PFN-k keeps the first k "
              "tokens of each window, k = KVSink's count in that window (equal counts).", ""]
        copies = [k for k, c in state["cells"].items() if "same_as" in c]
        if copies:
            L += [f"{len(copies)} KVSink cells have exactly their PFN-k twin's inputs (KVSink's set is the "
                  "first k tokens of every window, and the calibration text's excluded tokens agree) and "
                  "are copied from it: " + ", ".join(copies) + ".", ""]
    L += ["Differences: paired over windows, mean ± standard error; **yes** = |difference| >= 2 SE.",
          "", "## Uniform (KIVI-style) quantization", ""]
    rows = [("fp", ["full precision", "-"])]
    rows += [(uniform_key(b, p), [POLICY_LABEL[p], str(b)]) for b in state["bits"]
             for p in ("none", "pfn-k", "kvsink")]
    L += _table(state, rows, first, ["method", "bits"])
    L += ["", f"## KVQuant-style quantization ({state['kvquant_datatype']} levels)", ""]
    if "kvquant" in state.get("not_applicable", {}):
        L += [f"Not applicable to this model: {state['not_applicable']['kvquant']}."]
    else:
        L += _kvquant_tables(state, summary, first)
    pending = [c[0] for c in plan(state["bits"], state["kvquant_bits"], state["fractions"])
               if c[0] not in state["cells"] and c[1] not in state.get("not_applicable", {})]
    L += ["", "Pending cells: " + (", ".join(pending) if pending else "none") + ".", "",
          "Command:", "", "    " + state["command"], ""]
    return "\n".join(L)


def _claim_cell(state, key, ref):
    """``difference ± SE`` of two cells of a saved report (bold when beyond 2 SE), "pending", or
    "n/a" (the cells cannot run on this model)."""
    if key.split("/")[0] in state.get("not_applicable", {}):
        return "n/a"
    if key not in state["cells"] or ref not in state["cells"]:
        return "pending"
    d, flag = _diff(paired(state, key, ref))
    return f"**{d}**" if flag == "**yes**" else d


def claim_tables(reports) -> list:
    """Markdown lines: per claim, one row per report (model) with its paired differences."""
    L = ["## Claim 1: KVSink − PFN-k at equal counts, uniform quantization", "",
         "| report | kept/window | " + " | ".join(f"{b}-bit" for b in (2, 3, 4)) + " |", "|---|---|---|---|---|"]
    for stem, s in reports:
        L.append(f"| {stem} | {_kept(s, uniform_key(s['bits'][0], 'kvsink'))} | " + " | ".join(
            _claim_cell(s, uniform_key(b, "kvsink"), uniform_key(b, "pfn-k")) if b in s["bits"] else "-"
            for b in (2, 3, 4)) + " |")
    for title, ref_of in (("Claim 2a: KVQuant-style, KVSink − PFN-k at the same outlier fraction",
                           lambda s, b, f: kvquant_key(b, f, "pfn-k")),
                          ("Claim 2b: KVQuant-style, KVSink at p − PFN-k at the largest p",
                           lambda s, b, f: kvquant_key(b, max(s["fractions"]), "pfn-k"))):
        fr = sorted({f for _, s in reports for f in s["fractions"]})
        L += ["", f"## {title}", "", "| report | bits | " + " | ".join(f"{100 * f:g} %" for f in fr) + " |",
              "|---|---|" + "---|" * len(fr)]
        for stem, s in reports:
            for b in s["kvquant_bits"]:
                L.append(f"| {stem} | {b} | " + " | ".join(
                    _claim_cell(s, kvquant_key(b, f, "kvsink"), ref_of(s, b, f)) if f in s["fractions"]
                    else "-" for f in fr) + " |")
    return L


def _kvquant_tables(state, summary, first) -> list:
    """The KVQuant cells' table and the reliance-on-outliers table (claim 2b)."""
    rows = [(kvquant_key(b, f, p), [POLICY_LABEL[p], str(b), f"{100 * f:g} %"])
            for b in state["kvquant_bits"] for f in state["fractions"] for p in ("pfn-k", "kvsink")]
    L = _table(state, rows, first, ["method", "bits", "outliers"])
    L += ["", "## Reliance on outliers: KVSink at p against PFN-k at the largest p", ""]
    L += ["| bits | KVSink outliers | difference ± SE | beyond 2 SE |", "|---|---|---|---|"]
    for cmp in (c for c in summary if c["claim"] == "claim 2b"):
        _, b, f, _ = cmp["key"].split("/")
        d, flag = _diff(cmp)
        L.append(f"| {b} | {100 * float(f):g} % | {d} | {flag} |")
    return L


def write_index(out: Path) -> None:
    """``README.md`` of the report folder: one line per report, then the claims' differences."""
    reports = [(p.stem, json.loads(p.read_text())) for p in sorted(out.glob("*.json"))]
    lines = ["# Fidelity reports", "", "Written by `bench/fidelity.py` after every cell (one report per model "
             "and corpus; the JSON holds every cell's per-window NLLs).  Differences: perplexity, paired over "
             "windows, ± SE; **bold** = beyond 2 SE; negative = KVSink better.  Reading: docs/15-claims.md.", "",
             "| report | model | corpus | windows | full precision | cells done |", "|---|---|---|---|---|---|"]
    for stem, s in reports:
        total = len([c for c in plan(s["bits"], s["kvquant_bits"], s["fractions"])
                     if c[1] not in s.get("not_applicable", {})])
        fp = s["cells"].get("fp")
        fp_ppl = "-" if fp is None else f"{fp['ppl']:.3f}"
        lines.append(f"| [{stem}]({stem}.md) | {s['model']} | {s['corpus']} | "
                     f"{s['windows']} x {s['window_length']} | {fp_ppl} | "
                     f"{len(s['cells'])} / {total} |")
    lines += [""] + claim_tables(reports)
    (out / "README.md").write_text("\n".join(lines) + "\n")


def save(out: Path, stem: str, state) -> None:
    """Rewrite ``<stem>.json``, ``<stem>.md`` and the index (each file replaced whole)."""
    summary = summarize(state)
    for name, text in ((f"{stem}.json", json.dumps(dict(state, comparisons=summary), indent=1)),
                       (f"{stem}.md", markdown(state, summary))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    write_index(out)


# --------------------------------------------------------------------------- setup

def _floats(text):
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="registered short name (smollm2-135m, gemma-3-270m, qwen2.5-coder-0.5b, "
                         "qwen2.5-coder-1.5b) or a local folder / .gguf file")
    ap.add_argument("--corpus", default="wikitext",
                    help="wikitext ($KVSINK_WIKITEXT, default: WikiText-2 test beside the repository), "
                         "lee (gensim's Lee news corpus), default, or a text file's path")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows (the first ones)")
    ap.add_argument("--window-length", type=int, default=512, help="tokens per window (BOS included)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bits", type=_ints, default=[2, 3, 4], help="uniform bit widths (default 2,3,4)")
    ap.add_argument("--kvquant-bits", type=_ints, default=[2, 3], help="KVQuant bit widths (default 2,3)")
    ap.add_argument("--fractions", type=_floats, default=[0.0, 0.001, 0.005, 0.01],
                    help="KVQuant outlier fractions (default 0,0.001,0.005,0.01)")
    ap.add_argument("--kvquant-datatype", choices=("nf", "kmeans"), default="kmeans",
                    help="KVQuant levels: kmeans (fitted, the paper's nuq; default) or nf")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--predictor-layer", type=int, default=None)
    ap.add_argument("--predictor-channels", type=_ints, default=None)
    ap.add_argument("--predictor-threshold", type=float, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "fidelity"), help="report folder")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (default 1)")
    ap.add_argument("--fresh", action="store_true", help="discard an existing report of other settings")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite every report's Markdown and the index in --out from the JSON files "
                         "(no model is loaded)")
    args = ap.parse_args(argv)
    if args.windows < 2:
        ap.error("--windows must be >= 2 (a standard error needs two windows)")
    if args.window_length < 3:
        ap.error("--window-length must be >= 3")
    given = [args.predictor_layer is not None, args.predictor_channels is not None,
             args.predictor_threshold is not None]
    if any(given) and not all(given):
        ap.error("give all three of --predictor-layer, --predictor-channels, --predictor-threshold, "
                 "or none (calibrated)")
    return args


def _wikitext_default():
    for root in (ROOT.parent, ROOT.parent.parent):
        path = root / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
        if path.is_file():
            return path
    return None


def load_text(corpus: str):
    """``(text, name, wikitext_rows, short name for file names)``; ``SystemExit`` with the fix."""
    if corpus == "wikitext" and not os.environ.get("KVSINK_WIKITEXT"):
        path = _wikitext_default()
        if path is None:
            raise SystemExit("--corpus wikitext: set $KVSINK_WIKITEXT to WikiText-2's wiki.test.raw "
                             "(not found beside the repository), or pass the file's path")
        corpus = str(path)
    try:
        text, name, rows = C.load_named_corpus(corpus)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--corpus {corpus}: {exc}")
    short = "wikitext" if C.is_wikitext(name) else "lee" if corpus == "lee" else Path(corpus).stem
    return text, name, rows, short


def predictor(model, args, cal_ids):
    """``(config with the predictor fields, description)``."""
    base = KVSinkConfig(key_group_size=args.group_size, value_group_size=args.group_size,
                        preserve="kvsink", residual_length=0)
    if args.predictor_layer is not None:
        cfg = base.replace(predictor_layer=args.predictor_layer,
                           predictor_channels=tuple(args.predictor_channels),
                           predictor_threshold=args.predictor_threshold)
        return cfg, "given"
    try:
        return calibrate_config(model, base, cal_ids), "calibrated on the first 512 tokens of the packaged essay"
    except ValueError as exc:
        raise SystemExit(f"KVSink predictor calibration failed: {exc}; give --predictor-layer/"
                         "--predictor-channels/--predictor-threshold")


def initial_state(args, model_name, corpus_name, bos, pred_cfg, source, device_name, command):
    return dict(model=model_name, corpus=corpus_name, windows=args.windows,
                window_length=args.window_length, group_size=args.group_size,
                kvquant_datatype=args.kvquant_datatype, window_bos=bos,
                predictor=dict(layer=pred_cfg.predictor_layer,
                               channels=[int(c) for c in pred_cfg.predictor_channels],
                               threshold=float(pred_cfg.predictor_threshold), source=source),
                bits=args.bits, kvquant_bits=args.kvquant_bits, fractions=args.fractions,
                device=device_name, torch=torch.__version__, command=command, cells={})


def resume(path: Path, state, fresh: bool):
    """The state to continue from: the saved one when its settings match, else ``state``."""
    if not path.is_file() or fresh:
        return state
    saved = json.loads(path.read_text())
    saved.pop("comparisons", None)
    diff = [k for k in SETTINGS if k != "predictor" and saved.get(k) != state[k]]
    if diff:
        raise SystemExit(f"{path} holds a report with other settings ({', '.join(diff)}); pass --fresh "
                         "to replace it or --out another folder")
    saved.update(bits=state["bits"], kvquant_bits=state["kvquant_bits"], fractions=state["fractions"],
                 command=state["command"])
    return saved


def render(out: Path) -> None:
    """Rewrite every report's Markdown (and the index) from its JSON."""
    for path in sorted(out.glob("*.json")):
        state = json.loads(path.read_text())
        state.pop("comparisons", None)
        save(out, path.stem, state)


def kvquant_unavailable(model):
    """Why the KVQuant cells cannot run on this model (None when they can): the fake protocol
    un-rotates the keys with the model's one ``inv_freq``, which e.g. Gemma-3 does not have."""
    from accelerated.hf.support import kvquant_inv_freq
    try:
        kvquant_inv_freq(model)
    except ValueError as exc:
        return str(exc).split(";")[0]
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render(Path(args.out))
    from tqdm.auto import tqdm
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    text, corpus_name, rows, corpus_short = load_text(args.corpus)
    model, tok = load_model(args.model, dtype=torch.float32, device=device, attn_implementation="sdpa")
    model.requires_grad_(False)
    bos = C.window_bos(tok)
    ids = C.tokenize_corpus(text, tok, wikitext_rows=rows)
    if C.window_count(ids.shape[1], args.window_length, bos) < args.windows:
        raise SystemExit(f"--corpus {args.corpus} has {ids.shape[1]} tokens: fewer than --windows "
                         f"{args.windows} of --window-length {args.window_length}")
    cal_ids = calibration_ids(tokenizer=tok)
    model_name = Path(args.model).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = model_name if corpus_short == "wikitext" else f"{model_name}-{corpus_short}"
    command = "OMP_NUM_THREADS=1 nice -n 15 python bench/fidelity.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} thread(s)"
    saved = out / f"{stem}.json"
    pred_cfg, source = predictor(model, args, cal_ids) if not saved.is_file() or args.fresh else \
        _saved_predictor(saved, args)
    state = resume(saved, initial_state(args, model_name, corpus_name, bos, pred_cfg, source, device_name,
                                        command), args.fresh)
    run = SimpleNamespace(predictor_config=pred_cfg, calibration_ids=cal_ids, datatype=args.kvquant_datatype,
                          progress=not args.no_progress)
    state["not_applicable"] = {}
    state["calibration_kvsink_positions"] = calibration_sinks(model, pred_cfg, cal_ids)
    why = kvquant_unavailable(model) if args.kvquant_bits else None
    if why:
        state["not_applicable"]["kvquant"] = why
        print(f"KVQuant cells skipped: {why}", flush=True)
    todo = [c for c in plan(args.bits, args.kvquant_bits, args.fractions)
            if c[0] not in state["cells"] and c[1] not in state["not_applicable"]]
    bar = tqdm(todo, desc=f"{model_name} cells", disable=args.no_progress, file=sys.stdout)
    for cell in bar:
        bar.set_postfix_str(cell[0])
        state["cells"][cell[0]] = run_cell(model, ids, state, cell, run)
        save(out, stem, state)
    save(out, stem, state)
    print(markdown(state, summarize(state)))
    return state


def _saved_predictor(path: Path, args):
    """The predictor of a saved report (a resumed run reuses it; ``--predictor-*`` must agree)."""
    p = json.loads(path.read_text())["predictor"]
    cfg = KVSinkConfig(key_group_size=args.group_size, value_group_size=args.group_size, preserve="kvsink",
                       residual_length=0, predictor_layer=p["layer"], predictor_channels=tuple(p["channels"]),
                       predictor_threshold=p["threshold"])
    if args.predictor_layer is not None and (args.predictor_layer, list(args.predictor_channels),
                                             args.predictor_threshold) != (p["layer"], p["channels"],
                                                                           p["threshold"]):
        raise SystemExit(f"{path} was made with another predictor ({p}); pass --fresh to replace it")
    return cfg, p["source"]


if __name__ == "__main__":
    main()
