"""Where a decode step's time goes on CUDA: DynamicCache vs KVSinkCache, warm, with a profile.

Random-weight Llama with SmolLM2-135M's shapes (see bench/gpu_e2e.py).  Each variant is
warmed up (Triton compilation and allocator growth stay out of the numbers), then timed
over `--steps` greedy decode steps after a `--prompt`-token prefill.  The profile lists the
ops with the most self CPU time and counts device->host synchronisations per step.

Usage: PYTHONUNBUFFERED=1 python bench/gpu_decode_profile.py [--prompt 4096] [--steps 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import DynamicCache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerated.hf import KVSinkCache  # noqa: E402
from bench.gpu_e2e import cache_kw, kv, smollm2_shaped  # noqa: E402


@torch.no_grad()
def decode_ms(model, make_cache, ids, steps, warm=4):
    cache = make_cache()
    out = model(input_ids=ids, use_cache=True, **{cache_kw(model): cache})
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(warm):
        tok = model(input_ids=tok, use_cache=True, **{cache_kw(model): cache}).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        tok = model(input_ids=tok, use_cache=True, **{cache_kw(model): cache}).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3, cache, tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    model = smollm2_shaped().cuda()
    ids = torch.randint(1, 49152, (1, args.prompt), generator=torch.Generator().manual_seed(1)).cuda()
    rows = [("DynamicCache, model without kvsink hooks", decode_ms(model, DynamicCache, ids, args.steps)[0])]
    for bits in (2, 4):
        rows.append((f"KVSinkCache {bits}-bit", decode_ms(model, lambda: KVSinkCache(model, kv(bits)), ids, args.steps)[0]))
    rows.append(("DynamicCache, model with kvsink hooks", decode_ms(model, DynamicCache, ids, args.steps)[0]))
    for name, ms in rows:
        print(f"{name:45s} {ms:8.2f} ms/token (prompt {args.prompt}, warm, median-free mean of {args.steps})")

    _, cache, tok = decode_ms(model, lambda: KVSinkCache(model, kv(2)), ids, 2)
    from torch.profiler import ProfilerActivity, profile
    n = 4
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            for _ in range(n):
                tok = model(input_ids=tok, use_cache=True, **{cache_kw(model): cache}).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    syncs = sum(e.count for e in ka if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize",
                                                  "cudaDeviceSynchronize"))
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    print(f"per decode step: {syncs / n:.1f} host syncs (item/synchronize), {launches / n:.0f} kernel launches")


if __name__ == "__main__":
    main()
