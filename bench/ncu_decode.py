"""Drive the decode-attention kernels at one shape for Nsight Compute (CUDA only).

    ncu --clock-control none --set full -k regex:'tensor_decode_kernel|decode_attention_kernel|fused_decode_kernel' \
        -c 3 -o prof python bench/ncu_decode.py [--b 1] [--t 32768] [--bits 2]
    ncu --import prof.ncu-rep --page details > details.txt
    ncu --import prof.ncu-rep --page source --csv --print-source sass > sass.csv
    python bench/ncu_decode.py --summarize sass.csv      # stall reasons and SASS opcodes per kernel

Launches, once each after a warm-up: the tensor-core split kernel (attention_tc_kernels.py), the
CUDA-core one (attention_kernels.py, v3) and one layer's fused decode step (decode_kernels.py, the
default engine), at Llama-3-8B's heads (8 KV / 32 query heads, D = 128), KIVI layout.  Prints the
registers and spills of each compiled kernel.  The profile is what explains the kernel's time
(bench/README.md, "Issue 9, tensor-core decode").
"""

from __future__ import annotations

import argparse
import collections
import csv
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerated import attention_kernels as AK                 # noqa: E402
from accelerated import attention_tc_kernels as TK              # noqa: E402
from accelerated import decode_kernels as DK                    # noqa: E402
from accelerated.cache_checks import DeferredChecks             # noqa: E402
from bench.bench_kernels import make_cache, make_layer          # noqa: E402


def _report(kernel, name):
    """Registers, spills and shared memory of every compiled variant of ``kernel``."""
    for cache in getattr(kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            print(f"{name}: {compiled.n_regs} registers, {compiled.n_spills} bytes spilled, "
                  f"{compiled.metadata.shared} bytes shared, {compiled.metadata.num_warps} warps")


def _kernels(rows):
    """``[(name, header, rows)]`` of an ``ncu --page source --csv`` export (one block per kernel)."""
    out = []
    for r in rows:
        if r and r[0] == "Kernel Name":
            out.append([r[1], None, []])
        elif out and r and r[0] == "Address":
            out[-1][1] = r
        elif out and r:
            out[-1][2].append(r)
    return out


def summarize(path: str) -> None:
    """Per kernel: the warp-stall reasons over all samples and the share of samples and of executed
    instructions per SASS opcode (the profile of bench/README.md "Issue 9, tensor-core decode")."""
    with open(path, newline="") as f:
        kernels = _kernels(list(csv.reader(f)))
    for name, hdr, data in kernels:
        col = {h: i for i, h in enumerate(hdr)}
        stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
        by_stall, samples, executed = collections.Counter(), collections.Counter(), collections.Counter()
        for r in data:
            words = r[col["Source"]].split()
            op = (words[1] if words and words[0].startswith("@") else (words or ["?"])[0]).split(".")[0]
            samples[op] += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
            executed[op] += int(r[col["Instructions Executed"]] or 0)
            for st in stalls:
                by_stall[st[6:]] += int(r[col[st]] or 0)
        n_s, n_i = sum(by_stall.values()) or 1, sum(executed.values()) or 1
        print(f"== {name}: {n_s} samples, {n_i} warp instructions executed")
        print("  stalls: " + ", ".join(f"{k} {v / n_s:.0%}" for k, v in by_stall.most_common(8)))
        print("  samples by opcode: " + ", ".join(f"{k} {v / n_s:.0%}" for k, v in samples.most_common(12)))
        print("  instructions by opcode: " + ", ".join(f"{k} {v / n_i:.0%}"
                                                      for k, v in executed.most_common(14)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize", metavar="CSV", default=None,
                    help="summarise an ncu source-page CSV export instead of launching kernels")
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--t", type=int, default=32768)
    ap.add_argument("--bits", type=int, default=2)
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return 0
    if not torch.cuda.is_available():
        print("ncu_decode.py: needs CUDA (or --summarize CSV)", file=sys.stderr)
        return 2
    b, h, hq, d = args.b, 8, 32, 128
    kspec, vspec = (args.bits, 32, "channel", False), (args.bits, 32, "token", False)
    pk, pv = make_cache(b, h, args.t, d, kspec, vspec, seed=1)
    q = torch.randn((b, hq, 1, d), device="cuda")
    kp = torch.arange(args.t, device="cuda").repeat(b, 1)
    qp = torch.full((b, 1), args.t, device="cuda")
    scale = 1 / math.sqrt(d)
    layer = make_layer(b, h, args.t, d, args.bits, n_preserved=4)
    ql = q.to(torch.bfloat16)
    qpl = torch.full((b, 1), layer.seq_length - 1, device="cuda")
    calls = {"tensor": lambda: TK.tensor_decode_partial_attention(q, pk, pv, qp, kp, scale),
             "v3": lambda: AK.decode_partial_attention(q, pk, pv, qp, kp, scale),
             "fused layer": lambda: layer.attend(ql, qpl, checks=DeferredChecks())}
    for fn in calls.values():                  # compile and warm up (outside the profile: -c)
        fn()
    torch.cuda.synchronize()
    for name, fn in calls.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    _report(TK.tensor_decode_kernel, "tensor_decode_kernel")
    _report(AK.decode_attention_kernel, "decode_attention_kernel")
    _report(DK.fused_decode_kernel, "fused_decode_kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
