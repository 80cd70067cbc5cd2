"""The tensor-core decode kernel (accelerated/attention_tc_kernels.py, v4) against the CUDA-core one
(attention_kernels.decode_attention_kernel, v3) on the packed quantized segment (CUDA only).

    PYTHONUNBUFFERED=1 python bench/bench_decode_tc.py [--quick] [--json FILE]

For each shape (decode: one query per sequence, KIVI layout: keys per channel, values per token,
groups of 32, asymmetric, a sink-like key 0): the v3 default launch and a sweep of v4 launches
(tokens per tile, key scale folded or not, warps, pipeline stages, programs per SM).  Each launcher
(kernel + split merge, no API validation) is captured in a CUDA graph and replayed under
``triton.testing.do_bench`` (median, L2 flushed): GPU time without host overhead.  Reported against
the bytes the kernel must read (attention_kernels.py's header) at the measured copy bandwidth.
Correctness of every variant: the normalised output against float64 attention over the dequantized
cache, relative to max|v| (printed; the tests hold the bound, tests/test_tensor_decode.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerated import attention_kernels as AK                 # noqa: E402
from accelerated import attention_tc_kernels as TK              # noqa: E402
from accelerated import quantize as AQ                          # noqa: E402
from accelerated.attention_launch import tensor_decode_launch   # noqa: E402
from bench.bench_kernels import attn_bytes, copy_bandwidth, make_cache   # noqa: E402
from bench.speed_kernels import graph_ms                        # noqa: E402

KIVI = ((2, 32, "channel", False), (2, 32, "token", False))

#: (B, KV heads, query heads, tokens, head dim, bits): Llama-3-8B at 32k (2- and 4-bit, B = 1 and
#: 8) and 4k, Llama-2-7B (no GQA), SmolLM2's heads
SHAPES = ((1, 8, 32, 32768, 128, 2), (1, 8, 32, 32768, 128, 4), (8, 8, 32, 32768, 128, 2),
          (1, 8, 32, 4096, 128, 2), (1, 32, 32, 32768, 128, 2), (1, 3, 9, 32768, 64, 2))


def reference_output(q, pk, pv, qp, kp, scale):
    """float64 attention over the dequantized cache, (B, Hq, 1, D), and max|v|."""
    k = AQ.dequantize(pk.unpack()).double()
    v = AQ.dequantize(pv.unpack()).double()
    b, hq, tq, d = q.shape
    h = k.shape[1]
    qg = q.double().reshape(b, h, hq // h * tq, d)
    s = torch.einsum("bhrd,bhtd->bhrt", qg, k) * scale
    vis = (kp[:, None, None, :] >= 0) & (kp[:, None, None, :] <= qp[:, None, :1, None])
    s = s.masked_fill(~vis, float("-inf"))
    out = torch.einsum("bhrt,bhtd->bhrd", torch.softmax(s, dim=-1), v)
    return out.reshape(b, hq, tq, d), float(v.abs().max())


def variant_label(kw) -> str:
    """The printed and recorded name of a tensor-core launch variant."""
    return "v4 " + " ".join(f"{k}={v}" for k, v in kw.items())


def case(b, h, hq, t_len, d, bits, bw, variants, rows):
    kspec, vspec = (bits,) + KIVI[0][1:], (bits,) + KIVI[1][1:]
    pk, pv = make_cache(b, h, t_len, d, kspec, vspec, seed=t_len + b)
    q = torch.randn((b, hq, 1, d), device="cuda")
    kp = torch.arange(t_len, device="cuda").repeat(b, 1)
    qp = torch.full((b, 1), t_len, device="cuda")
    scale = 1 / math.sqrt(d)
    ref, vmax = reference_output(q, pk, pv, qp, kp, scale)
    nbytes = attn_bytes(b, h, t_len, d, kspec + (), vspec + (), hq, 1)
    floor = nbytes / bw * 1e6
    name = f"B{b} H{h} Hq{hq} T{t_len} D{d} {bits}-bit"
    print(f"\n{name}: {nbytes / 1e6:.1f} MB, floor {floor:.1f} us")

    def record(label, fn, launch=None):
        try:
            m, l, acc = fn()
            err = float(((acc / l[..., None]).double() - ref).abs().max()) / vmax
            us = graph_ms(fn) * 1e3
        except Exception as e:  # noqa: BLE001 (a variant out of resources is reported, not fatal)
            print(f"  {label:42s} failed: {type(e).__name__}: {str(e)[:120]}")
            rows.append({"case": name, "variant": label, "error": str(e)[:300]})
            return None
        frac = floor / us
        print(f"  {label:42s} {us:8.1f} us  {frac * 100:5.1f} % of copy bw  rel.err {err:.1e}")
        rows.append({"case": name, "variant": label, "us": us, "floor_us": floor, "bw_fraction": frac,
                     "rel_err": err, "bytes": nbytes,
                     "launch": None if launch is None else repr(launch)})
        return us

    record("v3 default (CUDA cores)", lambda: AK.decode_partial_attention(q, pk, pv, qp, kp, scale))
    best = None
    for kw in variants:
        label = variant_label(kw)
        try:
            launch = tensor_decode_launch(q.shape, pk, pv, q.device, **kw)
        except Exception as e:  # noqa: BLE001
            print(f"  {label}: no launch: {e}")
            continue
        if "fold" in kw and kw["fold"] != launch.key_fold:
            continue
        us = record(label, lambda launch=launch: TK.tensor_decode_partial_attention(
            q, pk, pv, qp, kp, scale, launch=launch), launch)
        if us is not None and (best is None or us < best[0]):
            best = (us, label)
    if best:
        print(f"  best v4: {best[1]} {best[0]:.1f} us")
    return best


def sweep(quick):
    out = []
    for bt in (16, 32, 64, 128):
        for fold in (True, False):
            for nw in (4, 8):
                for ns in (1, 2, 3):
                    for pps in (2, 4, 8):
                        if quick and (ns == 3 or pps != 4):
                            continue
                        out.append(dict(block_t=bt, fold=fold, num_warps=nw, num_stages=ns,
                                        target_programs=pps * torch.cuda.get_device_properties(0)
                                        .multi_processor_count))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", default=None,
                    help="JSON list of tensor_decode_launch keyword dicts (target_programs as "
                         "'pps' programs per SM) instead of the sweep; every shape runs them all")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    if args.variants:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        variants = [{("target_programs" if k == "pps" else k): (v * sms if k == "pps" else v)
                     for k, v in d.items()} for d in json.loads(args.variants)]
        for shape in SHAPES:
            case(*shape, bw, variants, rows)
    else:
        variants = sweep(args.quick)
        best = case(*SHAPES[0], bw, variants, rows)
        # the other shapes: the best few of the first, and the defaults
        top = sorted((r for r in rows if "us" in r and r["variant"].startswith("v4")),
                     key=lambda r: r["us"])[:6]
        keep = [v for v in variants if variant_label(v) in {r["variant"] for r in top}]
        for shape in SHAPES[1:]:
            case(*shape, bw, keep + [dict()], rows)
        print(f"\nbest on the first shape: {best}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
