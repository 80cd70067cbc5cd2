"""KVQuant-style quantization with PFN-1 vs KVSink: the measured table (docs/08-kvquant.md §8.12).

Protocol (the papers' fake quantization, one forward pass per window):

* model: SmolLM2-135M-Instruct (``accelerated.models.load_model()``, or ``--model``:
  a local ``.gguf`` file / folder / hub id), **float32** on CPU and on CUDA alike;
  on CUDA TF32 is switched off (``torch.set_float32_matmul_precision("highest")``)
  so that every matrix product is a float32 one;
* text: WikiText-2 test (``--corpus``; default
  ``../shared/data/wikitext-2-raw/wiki.test.raw``; without it the packaged
  ``accelerated/data/default_corpus.txt``, said in the output); rows joined with
  ``"\\n\\n"`` and tokenized once;
* evaluation: the first ``--windows`` windows of ``--seq-len`` tokens; the
  NLL of tokens 1..T-1 of each window (summed in float64), recorded per window;
  perplexity = exp(mean NLL per token);
* calibration (key outlier thresholds, k-means codebooks, Fisher weights, KVSink
  predictor): the **last** ``--calib-windows`` windows of the same token stream
  — WikiText-2 has a train split but it is not available here, so a held-out
  later part of the test file is used; it must not overlap the evaluation windows
  (checked); ``--calib-offset N`` takes the calibration windows N windows
  earlier (another held-out set: how much does the table depend on it?);
* in every layer an attention function registered in transformers'
  ``AttentionInterface`` receives the post-RoPE keys, un-rotates them with the
  model's own ``inv_freq`` and the positions (``unapply_rope``), quantizes and
  dequantizes keys (pre-RoPE, per channel) and values (per token) with
  ``accelerated.kvquant`` (definition 8.10), rotates the keys back, keeps
  the preserved tokens' original keys and values, then runs sdpa causal attention;
  ``--batch`` windows go through one forward pass (every statistic of the
  quantizer is per window — per-channel groups of tokens of one window, per-token
  value outliers, calibrated thresholds — so batching does not change the method);
* preserved sets: PFN-1 = the first token of each window; KVSink = the
  tokens predicted by ``reference.predictor.calibrate_predictor`` (calibrated
  on the hidden states of the first calibration window) from a full-precision
  pass over the window; both also on the calibration windows, whose preserved
  tokens are left out of the calibration statistics.

Statistics: for each cell (bits, p, policy) the per-window mean NLL per token
``x_w``; the paired difference ``d_w = x_w(KVSink) - x_w(PFN-1)`` over the same
windows, its mean and standard error ``sd(d) / sqrt(n)``.  "KVSink matches PFN-1
at the largest p" is judged per bits both on the point estimate (KVSink ppl <=
PFN-1 ppl, i.e. mean d <= 0) and with the noise in mind (mean d <= 2 SE: not
worse by more than two standard errors; mean d < -2 SE: better beyond noise).

Results go to ``--out`` (``kvquant_table.json`` with every per-window NLL, and
``kvquant_table.md``), rewritten after every batch of windows so that an
interrupted run leaves the windows it finished; ``--time-limit`` stops cleanly
before a batch that would not finish in time.

Run:  python bench/kvquant_table.py                 (CPU: 4 windows, 16 min on a busy 2-core CPU)
      python bench/kvquant_table.py --device cuda --windows 592 --batch 16 --out out/
          (the whole test file: 247 s on one H100; bench/gpu_kvquant_table.sh brings the model there)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelerated import kvquant as KQ  # noqa: E402
from accelerated.models import load_model  # noqa: E402
from reference.config import KVSinkConfig  # noqa: E402
from reference.predictor import calibrate_predictor, predict_sinks  # noqa: E402

ATTN_NAME = "kvsink_kvquant_bench"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
FALLBACK = ROOT / "accelerated" / "data" / "default_corpus.txt"
POLICIES = (("pfn", "PFN-1"), ("kvsink", "KVSink"))
_STATE = {}


# --------------------------------------------------------------------------- corpus

def load_tokens(tokenizer, corpus=None):
    if corpus is not None:
        path = Path(corpus)
        if not path.is_file():
            raise SystemExit(f"--corpus {corpus}: not a file")
        text, name = path.read_text(encoding="utf-8"), f"{path.name} ({path})"
    elif WIKITEXT.is_file():
        text, name = WIKITEXT.read_text(encoding="utf-8"), f"WikiText-2 test ({WIKITEXT})"
    else:
        text, name = FALLBACK.read_text(encoding="utf-8"), f"FALLBACK corpus {FALLBACK} (WikiText-2 absent)"
    rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]
    ids = tokenizer("\n\n".join(rows), return_tensors="pt", verbose=False)["input_ids"][0]
    return ids.to(torch.long), name


# --------------------------------------------------------------------------- attention function

def _kvquant_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    st = _STATE
    if st.get("mode") == "quant":
        b, _, t, _ = key.shape
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(t, device=key.device)[None].expand(b, t)
        pos = pos.expand(b, t)[:, None, :]
        keys_pre = KQ.unapply_rope(key, pos, st["inv_freq"])
        cal = st["calibrations"][module.layer_idx]
        blk = KQ.quantize_block_kvquant(keys_pre, value, cal, st["config"], exclude=st["preserved"])
        kh, vh = KQ.dequantize_block_kvquant(blk)
        kh = KQ.apply_rope(kh, pos, st["inv_freq"]).to(key.dtype)
        keep = st["preserved"][:, None, :, None]
        # preserved tokens: the original post-RoPE keys and values, exactly
        key = torch.where(keep, key, kh)
        value = torch.where(keep, value, vh.to(value.dtype))
        st["outliers"] += blk.keys.num_outliers + blk.values.num_outliers
        st["elements"] += 2 * key.numel()
        st["bytes"] += blk.nbytes
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register(ATTN_NAME, _kvquant_attention)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# --------------------------------------------------------------------------- passes

def window_nlls(model, ids):
    """Per-window NLL sums (float64) of tokens 1..T-1 of each row of ``ids`` (B, T)."""
    logits = model(input_ids=ids, use_cache=False).logits
    out = []
    for r in range(ids.shape[0]):
        logp = torch.log_softmax(logits[r, :-1].double(), dim=-1)
        out.append(float(-logp.gather(-1, ids[r, 1:, None]).sum()))
    return out


def probe(model, ids, capture_kv=False):
    """Full-precision pass over ``ids`` (B, T): hidden states, and (optionally) every layer's pre-RoPE K and V."""
    mods = KQ.attention_modules(model)
    kv = [[None, None] for _ in mods]
    hooks = []
    if capture_kv:
        for i, m in enumerate(mods):
            for j, proj in enumerate((m.k_proj, m.v_proj)):
                def hook(_m, _inp, out, i=i, j=j, hd=m.head_dim):
                    b, t, n = out.shape
                    kv[i][j] = out.detach().reshape(b, t, n // hd, hd).transpose(1, 2).float()
                hooks.append(proj.register_forward_hook(hook))
    try:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [h.float() for h in out.hidden_states], kv


# --------------------------------------------------------------------------- statistics

def paired(a, b):
    """Mean and standard error (over windows) of the paired difference ``a - b`` (1-D arrays)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(d.mean()), se


def summarize(state):
    """Everything reported, from the per-window NLL sums in ``state`` (also for a partial run)."""
    n = len(state["fp_nll"])
    per_tok = state["seq_len"] - 1
    fp = np.asarray(state["fp_nll"]) / per_tok
    cells = {}
    for key, c in state["cells"].items():
        x = np.asarray(c["nll"][:n]) / per_tok
        cells[key] = dict(policy=c["policy"], fraction=c["fraction"], bits=c["bits"],
                          ppl=math.exp(x.mean()), mean_nll=float(x.mean()),
                          se_nll=float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                          outlier_share=c["outliers"] / max(c["elements"], 1),
                          bits_per_element=8 * c["bytes"] / max(c["elements"], 1))
    x_of = {k: np.asarray(c["nll"][:n]) / per_tok for k, c in state["cells"].items()}
    diffs, matches = [], []
    top = max(state["fractions"])
    for b in state["bits"]:
        for f in state["fractions"]:
            m, se = paired(x_of[cell_key("kvsink", f, b)], x_of[cell_key("pfn", f, b)])
            diffs.append(dict(bits=b, fraction=f, mean=m, se=se))
        ref = x_of[cell_key("pfn", top, b)]
        rows = []
        for f in sorted(state["fractions"]):
            m, se = paired(x_of[cell_key("kvsink", f, b)], ref)
            rows.append(dict(fraction=f, mean=m, se=se, point=bool(m <= 0),
                             within_2se=bool(m <= 2 * se), better_2se=bool(m < -2 * se)))
        pick = lambda flag: next((r["fraction"] for r in rows if r[flag]), None)  # noqa: E731
        matches.append(dict(bits=b, pfn_fraction=top, pfn_ppl=math.exp(ref.mean()), vs_pfn_top=rows,
                            smallest_point=pick("point"), smallest_within_2se=pick("within_2se"),
                            smallest_better_2se=pick("better_2se")))
    return dict(windows=n, tokens=n * per_tok, fp_ppl=math.exp(fp.mean()),
                fp_se_nll=float(fp.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                cells=cells, paired_same_p=diffs, match=matches)


def cell_key(policy, frac, bits):
    return f"{policy}/p={frac:g}/{bits}bit"


def _pct(f):
    return f"{100 * f:g} %"


def _mn(m, se):
    """A difference of mean NLL per token in millinats, ± its standard error."""
    return f"{1e3 * m:+.2f} ± {1e3 * se:.2f}"


def markdown(state, summ):
    bits, fracs = state["bits"], state["fractions"]
    c = summ["cells"]
    L = []
    L.append(f"KVQuant-style ({state['datatype']}, keys pre-RoPE per channel G={state['key_group_size']}, "
             f"values per token G={state['value_group_size']}), {state['model_name']}, {state['corpus']}, "
             f"{summ['windows']} x {state['seq_len']} tokens ({summ['tokens']} predicted tokens), calibration "
             f"on tokens {state['calib_tokens'][0]}..{state['calib_tokens'][1]}, fake "
             f"quantization, {state['dtype']} on {state['device_name']}"
             + (f", KVSINK_KVQUANT_KERNEL={state['kvquant_kernel_env']}" if state.get("kvquant_kernel_env") else "")
             + ("" if state["complete"] else "  **(partial run)**"))
    L.append("")
    L.append("Perplexity = exp(mean NLL per token) (each cell's SE over windows is in the JSON, se_nll; "
             "differences between cells are judged by the paired tables below):")
    L.append("")
    L.append("| preserve | outliers p | " + " | ".join(f"{b}-bit ppl" for b in bits) + " |")
    L.append("|" + "---|" * (2 + len(bits)))
    L.append("| none (fp) | – | " + " | ".join(f"{summ['fp_ppl']:.3f}" for _ in bits) + " |")
    for pol, label in POLICIES:
        for f in fracs:
            L.append(f"| {label} | {_pct(f)} | " + " | ".join(
                f"{c[cell_key(pol, f, b)]['ppl']:.3f}" for b in bits) + " |")
    L.append("")
    L.append("Paired difference KVSink − PFN-1 at the same p, mean NLL per token in millinats "
             "(1e-3 nats; negative = KVSink better; ± 1 SE over windows, paired by window):")
    L.append("")
    L.append("| outliers p | " + " | ".join(f"{b}-bit" for b in bits) + " |")
    L.append("|" + "---|" * (1 + len(bits)))
    dd = {(d["bits"], d["fraction"]): d for d in summ["paired_same_p"]}
    for f in fracs:
        L.append(f"| {_pct(f)} | " + " | ".join(_mn(dd[(b, f)]["mean"], dd[(b, f)]["se"]) for b in bits) + " |")
    L.append("")
    top = max(fracs)
    L.append(f"KVSink at p − PFN-1 at {_pct(top)} (millinats ± SE, paired by window):")
    L.append("")
    L.append("| KVSink p | " + " | ".join(f"{b}-bit" for b in bits) + " |")
    L.append("|" + "---|" * (1 + len(bits)))
    mt = {m["bits"]: m for m in summ["match"]}
    for i, f in enumerate(sorted(fracs)):
        L.append(f"| {_pct(f)} | " + " | ".join(
            _mn(mt[b]["vs_pfn_top"][i]["mean"], mt[b]["vs_pfn_top"][i]["se"]) for b in bits) + " |")
    L.append("")
    show = lambda f: "none" if f is None else _pct(f)  # noqa: E731
    for m in summ["match"]:
        L.append(f"- {m['bits']}-bit: PFN-1 at {_pct(m['pfn_fraction'])}: ppl {m['pfn_ppl']:.3f}; smallest "
                 f"KVSink p with ppl <= it: {show(m['smallest_point'])}; with the difference <= 2 SE "
                 f"(not worse beyond noise): {show(m['smallest_within_2se'])}; better by > 2 SE: "
                 f"{show(m['smallest_better_2se'])}")
    L.append("")
    L.append("Stored outlier share / bits per K-or-V element (codes, statistics, outliers; codebooks excluded):")
    L.append("")
    L.append("| preserve | p | " + " | ".join(f"{b}-bit" for b in bits) + " |")
    L.append("|" + "---|" * (2 + len(bits)))
    for pol, label in POLICIES:
        for f in fracs:
            L.append(f"| {label} | {_pct(f)} | " + " | ".join(
                f"{100 * c[cell_key(pol, f, b)]['outlier_share']:.3f} % / "
                f"{c[cell_key(pol, f, b)]['bits_per_element']:.2f}" for b in bits) + " |")
    return "\n".join(L) + "\n"


def write_out(out, state):
    summ = summarize(state)
    md = markdown(state, summ)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("kvquant_table.json", json.dumps(dict(state, summary=summ), indent=1)),
                           ("kvquant_table.md", md)):
            tmp = out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(out / name)
    return summ, md


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows (the first ones of the text)")
    ap.add_argument("--calib-windows", type=int, default=2, help="calibration windows (the last ones)")
    ap.add_argument("--calib-offset", type=int, default=0,
                    help="leave out the last N windows before taking the calibration windows (another "
                         "held-out calibration set, to see how much the table depends on it)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--fractions", default="0,0.001,0.005,0.01")
    ap.add_argument("--datatype", default="kmeans", choices=("kmeans", "nf"))
    ap.add_argument("--key-group-size", type=int, default=32, help="tokens per key group (per channel)")
    ap.add_argument("--value-group-size", type=int, default=64, help="channels per value group (per token)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--batch", type=int, default=None, help="windows per forward pass (default 1 on CPU, 16 on CUDA)")
    ap.add_argument("--model", default=None, help="load_model name: default SmolLM2-135M, or a local .gguf path")
    ap.add_argument("--corpus", default=None, help="text file (default: WikiText-2 test beside the repo)")
    ap.add_argument("--out", default=None, help="folder for kvquant_table.json / .md (rewritten after every batch)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds from the start: stop before a batch of windows that would end later")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU torch threads (1 is fastest for the many small tensors on a busy 2-core CPU)")
    args = ap.parse_args(argv)
    from tqdm.auto import tqdm
    import transformers

    t0 = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")   # float32 products on CUDA too (no TF32)
    batch = args.batch or (16 if device.type == "cuda" else 1)
    bits_list = [int(b) for b in args.bits.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    out = Path(args.out) if args.out else None
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")

    model, tok = load_model(args.model, dtype=torch.float32, device=device, attn_implementation="sdpa")
    model.requires_grad_(False)
    inv_freq = KQ.model_inv_freq(model)
    ids, corpus = load_tokens(tok, args.corpus)
    n, T = ids.numel(), args.seq_len
    off = args.calib_offset
    if args.windows < 1 or args.calib_windows < 1 or off < 0:
        raise SystemExit("--windows and --calib-windows must be >= 1, --calib-offset >= 0")
    if n < (args.windows + args.calib_windows + off) * T:
        raise SystemExit(f"corpus has {n} tokens, too few for {args.windows} + {args.calib_windows} (+ offset "
                         f"{off}) windows of {T} (at most {n // T - args.calib_windows - off} evaluation windows)")
    evals = torch.stack([ids[i * T:(i + 1) * T] for i in range(args.windows)]).to(device)
    calib = torch.stack([ids[n - (off + j + 1) * T: n - (off + j) * T]
                         for j in reversed(range(args.calib_windows))]).to(device)
    calib_span = (n - (off + args.calib_windows) * T, n - off * T - 1)
    print(f"model on {device_name}, float32; corpus: {corpus}, {n} tokens; eval = first {args.windows} x {T} "
          f"tokens; calibration = {args.calib_windows} x {T} tokens {calib_span[0]}..{calib_span[1]} (the last "
          f"windows{f' but {off}' if off else ''}); {batch} windows per forward  [load {time.time() - t0:.0f} s]",
          flush=True)

    with torch.no_grad():
        hidden, kv = probe(model, calib, capture_kv=True)
        pred = calibrate_predictor([h[0].cpu().numpy() for h in hidden])
        print(f"predictor: layer {pred.layer}, channels {pred.channels}, threshold {pred.threshold:.2f}")

        def sinks(h):
            return torch.from_numpy(predict_sinks(h.cpu().numpy(), pred.channels, pred.threshold))

        def pfn(b):
            m = torch.zeros(b, T, dtype=torch.bool)
            m[:, 0] = True
            return m

        calib_sets = {"pfn": pfn(len(calib)), "kvsink": sinks(hidden[pred.layer])}
        cal_k = [p[0] for p in kv]
        cal_v = [p[1] for p in kv]
        del hidden, kv
    fisher = KQ.fisher_weights(model, calib) if args.datatype == "kmeans" else None

    configs, cals = {}, {}
    for policy, _ in POLICIES:
        for frac in fractions:
            for bits in bits_list:
                cfg = KVSinkConfig(quantizer="kvquant", key_bits=bits, value_bits=bits,
                                   key_group_size=args.key_group_size, value_group_size=args.value_group_size,
                                   outlier_fraction=frac, kvquant_datatype=args.datatype,
                                   preserve=policy, residual_length=0)
                k = cell_key(policy, frac, bits)
                configs[k] = (policy, frac, bits, cfg)
                cals[k] = KQ.calibrate_kvquant_layers(cal_k, cal_v, cfg, exclude=calib_sets[policy], fisher=fisher)
    del cal_k, cal_v, fisher
    t_setup = time.time() - t0
    print(f"calibrated {len(cals)} cells  [setup {t_setup:.0f} s]", flush=True)

    state = dict(
        protocol="bench/kvquant_table.py (docs/08-kvquant.md §8.12)", argv=sys.argv[1:] if argv is None else argv,
        device_name=device_name, device=str(device), dtype="float32 (TF32 off)", torch=torch.__version__,
        transformers=transformers.__version__, model_name=Path(args.model).name if args.model else "SmolLM2-135M-Instruct.Q4_1.gguf",
        corpus=corpus.split(" (")[0], corpus_tokens=n, seq_len=T, windows_requested=args.windows,
        calib_windows=args.calib_windows, calib_offset=off, calib_tokens=list(calib_span), batch=batch,
        bits=bits_list, fractions=fractions, datatype=args.datatype, key_group_size=args.key_group_size,
        value_group_size=args.value_group_size,
        predictor=dict(layer=int(pred.layer), channels=[int(ch) for ch in np.atleast_1d(pred.channels)],
                       threshold=float(pred.threshold)),
        kvsink_preserved=[], kvsink_positions_window0=None, fp_nll=[],
        cells={k: dict(policy=p, fraction=f, bits=b, nll=[], outliers=0, elements=0, bytes=0)
               for k, (p, f, b, _) in configs.items()},
        kvquant_kernel_env=os.environ.get("KVSINK_KVQUANT_KERNEL"),
        setup_s=t_setup, runtime_s=None, complete=False, stopped_early=None)

    register()
    previous = model.config._attn_implementation
    starts = list(range(0, args.windows, batch))
    per_batch = None
    bar = tqdm(total=len(starts) * (1 + len(configs)), desc="batches x (fp + cells)", mininterval=5,
               file=sys.stdout)
    try:
        model.config._attn_implementation = ATTN_NAME
        for s in starts:
            elapsed = time.time() - t0
            if args.time_limit is not None and per_batch is not None and elapsed + 1.2 * per_batch > args.time_limit:
                state["stopped_early"] = (f"--time-limit {args.time_limit:g} s: stopped after {s} windows "
                                          f"({elapsed:.0f} s elapsed, {per_batch:.0f} s per batch)")
                print(state["stopped_early"], flush=True)
                break
            tb = time.time()
            w = evals[s:s + batch]
            with torch.no_grad():
                _STATE.clear()          # no "mode": the attention function is plain sdpa
                hs, _ = probe(model, w)
                kvs = sinks(hs[pred.layer])
                del hs
                fp = window_nlls(model, w)
                bar.update(1)
                pres = {"pfn": pfn(len(w)).to(device), "kvsink": kvs.to(device)}
                cell_nll = {}
                for k, (policy, frac, bits, cfg) in configs.items():
                    _STATE.clear()
                    _STATE.update(mode="quant", config=cfg, calibrations=cals[k], inv_freq=inv_freq,
                                  outliers=0, elements=0, bytes=0, preserved=pres[policy])
                    cell_nll[k] = (window_nlls(model, w), _STATE["outliers"], _STATE["elements"], _STATE["bytes"])
                    bar.update(1)
            # commit the whole batch at once (a batch cut in the middle leaves no trace)
            state["fp_nll"] += fp
            state["kvsink_preserved"] += [int(v) for v in kvs.sum(1)]
            if state["kvsink_positions_window0"] is None:
                state["kvsink_positions_window0"] = torch.nonzero(kvs[0]).flatten().tolist()
            for k, (nll, o, e, by) in cell_nll.items():
                c = state["cells"][k]
                c["nll"] += nll
                c["outliers"] += int(o)
                c["elements"] += int(e)
                c["bytes"] += int(by)
            per_batch = time.time() - tb
            state["runtime_s"] = time.time() - t0
            if len(state["fp_nll"]) >= 2 or s + batch >= args.windows:
                write_out(out, state)
        else:
            state["complete"] = True
    finally:
        bar.close()
        model.config._attn_implementation = previous
        _STATE.clear()

    state["runtime_s"] = time.time() - t0
    if not state["fp_nll"]:
        raise SystemExit("no window finished")
    summ, md = write_out(out, state)
    print()
    pr = state["kvsink_preserved"]
    print(f"KVSink preserved tokens per window: mean {np.mean(pr):.2f}, min {min(pr)}, max {max(pr)}; "
          f"positions in window 0: {state['kvsink_positions_window0']}")
    print(md)
    print(f"total time {state['runtime_s']:.0f} s ({summ['windows']} windows)" + (f"; results in {out}" if out else ""))


if __name__ == "__main__":
    main()
