"""KVQuant-style quantization with PFN-1 vs KVSink: the measured table (docs/08-kvquant.md §8.12).

Protocol (the papers' fake quantization, one forward pass per window):

* model: SmolLM2-135M-Instruct (``accelerated.models.load_model()``, float32, CPU);
* text: WikiText-2 test (``../shared/data/wikitext-2-raw/wiki.test.raw``; without
  it the packaged ``accelerated/data/default_corpus.txt``, said in the output);
  rows joined with ``"\\n\\n"`` and tokenized once;
* evaluation: the first ``--windows`` windows of ``--seq-len`` tokens; the
  NLL of tokens 1..T-1 of each window, perplexity = exp(mean NLL);
* calibration (key outlier thresholds, k-means codebooks, KVSink predictor):
  the **last** ``--calib-windows`` windows of the same token stream — WikiText-2
  has a train split but it is not available here, so a held-out later part of
  the test file is used; it does not overlap the evaluation windows;
* in every layer an attention function registered in transformers'
  ``AttentionInterface`` receives the post-RoPE keys, un-rotates them with the
  model's own ``inv_freq`` and the positions (``unapply_rope``), quantizes and
  dequantizes keys (pre-RoPE, per channel) and values (per token) with
  ``accelerated.kvquant.fake_quantize_kvquant``, rotates the keys back, keeps
  the preserved tokens' original keys and values, then runs sdpa causal attention;
* preserved sets: PFN-1 = the first token of each window; KVSink = the
  tokens predicted by ``reference.predictor.calibrate_predictor`` (calibrated
  on the hidden states of the first calibration window) from a full-precision
  pass over the window; both also on the calibration windows, whose preserved
  tokens are left out of the calibration statistics.

Run:  python bench/kvquant_table.py   (16 min on a busy 2-core CPU; less when idle)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

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
_STATE = {}


# --------------------------------------------------------------------------- corpus

def load_tokens(tokenizer):
    if WIKITEXT.is_file():
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
        pos = pos[:, None, :]
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

def window_nll(model, ids):
    logits = model(input_ids=ids[None], use_cache=False).logits[0]
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(-1, ids[1:, None]).sum())


def probe(model, ids, capture_kv=False):
    """Full-precision pass: hidden states, and (optionally) every layer's pre-RoPE K and V."""
    mods = KQ._attention_modules(model)
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
        out = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [h[0].float() for h in out.hidden_states], kv


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--fractions", default="0,0.001,0.005,0.01")
    ap.add_argument("--datatype", default="kmeans", choices=("kmeans", "nf"))
    ap.add_argument("--key-group-size", type=int, default=32, help="tokens per key group (per channel)")
    ap.add_argument("--value-group-size", type=int, default=64, help="channels per value group (per token)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for the many small tensors on a busy 2-core CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bits_list = [int(b) for b in args.bits.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]

    model, tok = load_model(attn_implementation="sdpa")
    model.requires_grad_(False)
    inv_freq = KQ.model_inv_freq(model)
    ids, corpus = load_tokens(tok)
    n, T = ids.numel(), args.seq_len
    if n < (args.windows + args.calib_windows) * T:
        raise SystemExit(f"corpus has {n} tokens, too few for {args.windows} + {args.calib_windows} "
                         f"windows of {T}")
    evals = [ids[i * T:(i + 1) * T] for i in range(args.windows)]
    calib = [ids[n - (j + 1) * T: n - j * T] for j in reversed(range(args.calib_windows))]
    print(f"corpus: {corpus}, {n} tokens; eval = first {args.windows} x {T} tokens; "
          f"calibration = last {args.calib_windows} x {T} tokens (tokens {n - args.calib_windows * T}..{n - 1})")

    with torch.no_grad():
        hidden, _ = probe(model, calib[0])
        pred = calibrate_predictor([h.numpy() for h in hidden])
        print(f"predictor: layer {pred.layer}, channels {pred.channels}, threshold {pred.threshold:.2f}")

        def sinks(hs):
            return torch.from_numpy(predict_sinks(hs[pred.layer].numpy(), pred.channels, pred.threshold))

        def pfn(t):
            m = torch.zeros(t, dtype=torch.bool)
            m[0] = True
            return m

        eval_sets = {"pfn": [], "kvsink": []}
        for w in evals:
            hs, _ = probe(model, w)
            eval_sets["pfn"].append(pfn(T)[None])
            eval_sets["kvsink"].append(sinks(hs)[None])
        calib_sets = {"pfn": [], "kvsink": []}
        cal_k, cal_v = None, None
        for w in calib:
            hs, kv = probe(model, w, capture_kv=True)
            calib_sets["pfn"].append(pfn(T))
            calib_sets["kvsink"].append(sinks(hs))
            ks = [p[0] for p in kv]
            vs = [p[1] for p in kv]
            cal_k = ks if cal_k is None else [torch.cat([a, b]) for a, b in zip(cal_k, ks)]
            cal_v = vs if cal_v is None else [torch.cat([a, b]) for a, b in zip(cal_v, vs)]
        calib_sets = {k: torch.stack(v) for k, v in calib_sets.items()}
        print("preserved per eval window: PFN-1: 1; KVSink: "
              + ", ".join(str(int(s.sum())) for s in eval_sets["kvsink"])
              + f" (positions of window 0: {torch.nonzero(eval_sets['kvsink'][0][0]).flatten().tolist()})")
        fp_nll = sum(window_nll(model, w) for w in evals)
    tokens = args.windows * (T - 1)
    fp_ppl = math.exp(fp_nll / tokens)
    fisher = None
    if args.datatype == "kmeans":
        calib_ids = torch.stack(calib)
        fisher = KQ.fisher_weights(model, calib_ids)
    print(f"fp perplexity: {fp_ppl:.3f}   [setup {time.time() - t0:.0f} s]", flush=True)

    register()
    previous = model.config._attn_implementation
    results = {}
    try:
        model.config._attn_implementation = ATTN_NAME
        for policy in ("pfn", "kvsink"):
            for frac in fractions:
                for bits in bits_list:
                    cfg = KVSinkConfig(quantizer="kvquant", key_bits=bits, value_bits=bits,
                                       key_group_size=args.key_group_size,
                                       value_group_size=args.value_group_size,
                                       outlier_fraction=frac, kvquant_datatype=args.datatype,
                                       preserve=policy, residual_length=0)
                    cals = KQ.calibrate_kvquant_layers(cal_k, cal_v, cfg, exclude=calib_sets[policy],
                                                       fisher=fisher)
                    _STATE.clear()
                    _STATE.update(mode="quant", config=cfg, calibrations=cals, inv_freq=inv_freq,
                                  outliers=0, elements=0, bytes=0)
                    nll = 0.0
                    with torch.no_grad():
                        for w, pres in zip(evals, eval_sets[policy]):
                            _STATE["preserved"] = pres
                            nll += window_nll(model, w)
                    ppl = math.exp(nll / tokens)
                    share = _STATE["outliers"] / _STATE["elements"]
                    bpe = 8 * _STATE["bytes"] / _STATE["elements"]
                    results[(policy, frac, bits)] = (ppl, share, bpe)
                    print(f"  {policy:6s} p={frac:<6g} {bits}-bit: ppl {ppl:9.3f}  stored outliers "
                          f"{100 * share:.3f}%  bits/element {bpe:.2f}  [{time.time() - t0:.0f} s]",
                          flush=True)
    finally:
        model.config._attn_implementation = previous
        _STATE.clear()

    # ---------------------------------------------------------------- table
    print()
    print(f"KVQuant-style ({args.datatype}, keys pre-RoPE per channel G={args.key_group_size}, "
          f"values per token G={args.value_group_size}), SmolLM2-135M, {corpus.split(' (')[0]}, "
          f"{args.windows} x {T} tokens, fake quantization")
    print()
    head = "| preserve | outliers p | " + " | ".join(f"{b}-bit ppl" for b in bits_list) + " |"
    print(head)
    print("|" + "---|" * (2 + len(bits_list)))
    print("| fp16/32 (none) | – | " + " | ".join(f"{fp_ppl:.3f}" for _ in bits_list) + " |")
    for policy, label in (("pfn", "PFN-1"), ("kvsink", "KVSink")):
        for frac in fractions:
            cells = " | ".join(f"{results[(policy, frac, b)][0]:.3f}" for b in bits_list)
            print(f"| {label} | {100 * frac:g}% | {cells} |")
    print()
    print("| preserve | outliers p | " + " | ".join(f"{b}-bit stored outliers / bits per element" for b in bits_list) + " |")
    print("|" + "---|" * (2 + len(bits_list)))
    for policy, label in (("pfn", "PFN-1"), ("kvsink", "KVSink")):
        for frac in fractions:
            cells = " | ".join(f"{100 * results[(policy, frac, b)][1]:.3f}% / {results[(policy, frac, b)][2]:.2f}"
                               for b in bits_list)
            print(f"| {label} | {100 * frac:g}% | {cells} |")
    print()
    top = max(fractions)
    for b in bits_list:
        target = results[("pfn", top, b)][0]
        ok = [f for f in fractions if results[("kvsink", f, b)][0] <= target]
        msg = (f"{100 * min(ok):g}%" if ok else "none of the fractions")
        print(f"{b}-bit: PFN-1 at {100 * top:g}% outliers: ppl {target:.3f}; smallest fraction at which "
              f"KVSink matches it (ppl <=): {msg}")
    print(f"total time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
