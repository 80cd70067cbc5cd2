"""Where a decode step's time goes on CUDA: DynamicCache vs KVSinkCache, warm, with a profile.

Random-weight Llama with SmolLM2-135M's shapes (see bench/gpu_e2e.py).  Each variant is
warmed up (Triton compilation and allocator growth stay out of the numbers), then timed
over `--steps` greedy decode steps after a `--prompt`-token prefill, `--rounds` times with the
variants in turn (the median is reported: the first seconds of a process are slower).  The
profile covers `--profile-steps` further steps (default 32 = one token block, so the one
flushing step of each block is counted in proportion) and counts, per step, the kernel launches,
the device->host synchronisations (`cudaStreamSynchronize` / `cudaDeviceSynchronize` /
`cudaEventSynchronize`: every `.item()`, `bool()`, `.tolist()`, `.cpu()` of a CUDA tensor makes
one), among them the scalar reads (`aten::_local_scalar_dense` = item/bool/int), and the memcpy
calls (device-to-device copies included).

Usage: PYTHONUNBUFFERED=1 python bench/gpu_decode_profile.py [--prompt 4096] [--steps 32] [--rounds 3]
       [--warmup-s 20] [--table] [--out DIR]
To time an older copy of accelerated/ (e.g. git fc4bb95's, the code before the per-step host
work was cut): KVSINK_ROOT=.before python bench/gpu_decode_profile.py (see bench/gpu_decode_session.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import DynamicCache

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
if os.environ.get("KVSINK_ROOT"):                 # an older accelerated/ package shadows the repo's
    sys.path.insert(0, os.path.abspath(os.environ["KVSINK_ROOT"]))

import accelerated  # noqa: E402
from accelerated.hf import KVSinkCache  # noqa: E402
from bench.gpu_e2e import cache_kw, kv, smollm2_shaped  # noqa: E402


#: the profiler's names of a host wait on the device (every ``.item()``, ``bool()``, ``.tolist()``,
#: ``.cpu()`` of a CUDA tensor makes one)
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


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


def syncs_per_step(step_ranges, sync_starts) -> list:
    """The number of synchronisations (their start times) that fall in each step's time range
    (``(start, end)`` pairs, in the profiler's microseconds)."""
    return [sum(1 for t in sync_starts if lo <= t < hi) for lo, hi in step_ranges]


def profile_steps(model, cache, tok, n):
    """``(profile, counts)`` over ``n`` decode steps: per-step means (kernel launches, syncs, scalar
    reads, memcpy calls, GPU kernel ms), and ``counts["steps"]``, per step ``(flushed, syncs)``:
    whether it quantized a block (a kvsink layer's quantized slot count grew; never for other
    caches) and the device->host synchronisations inside its forward (the next token stays on the
    device: nothing else reads it)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    store = next((l.store for l in cache.layers if getattr(l, "store", None) is not None), None)
    flushed = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            for i in range(n):
                before = None if store is None else store.num_quantized
                with record_function(f"kvsink_step_{i}"):
                    tok = model(input_ids=tok, use_cache=True,
                                **{cache_kw(model): cache}).logits[:, -1:].argmax(-1)
                flushed.append(store is not None and store.num_quantized != before)
        torch.cuda.synchronize()
    ka = prof.key_averages()

    def count(*keys):
        return sum(e.count for e in ka if e.key in keys) / n
    try:                      # GPU kernel time (attribute names differ between torch versions)
        gpu_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                     for e in ka if str(getattr(e, "device_type", "")).endswith("CUDA")) / n
    except Exception:  # noqa: BLE001 - a missing statistic must not lose the counts
        gpu_us = float("nan")
    events = prof.events()
    ranges = {e.name: (e.time_range.start, e.time_range.end) for e in events
              if e.name.startswith("kvsink_step_")}
    starts = [e.time_range.start for e in events if e.name in SYNC_NAMES]
    per_step = syncs_per_step([ranges[f"kvsink_step_{i}"] for i in range(n)], starts)
    return prof, {"launches": count("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"),
                  "syncs": count(*SYNC_NAMES),
                  "scalar_reads": count("aten::_local_scalar_dense"),
                  "memcpy": count("cudaMemcpyAsync", "cudaMemcpy"),
                  "gpu_ms": gpu_us / 1e3, "steps": list(zip(flushed, per_step))}


def host_profile(model, cache, tok, n, out=None, top=30):
    """cProfile of ``n`` decode steps (the host's Python: where a host-bound step spends its time),
    printed by own time and by cumulative time; the stats saved as ``host_profile.pstats`` in
    ``out``."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(n):
            tok = model(input_ids=tok, use_cache=True, **{cache_kw(model): cache}).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        prof.disable()
    stats = pstats.Stats(prof)
    print(f"host profile of {n} decode steps: {stats.total_tt / n * 1e3:.2f} ms of Python per step "
          "(profiled: slower than unprofiled)")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    if out:
        stats.dump_stats(os.path.join(out, "host_profile.pstats"))
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=32)
    ap.add_argument("--warmup-s", type=float, default=20.0, help="untimed DynamicCache decoding first")
    ap.add_argument("--table", action="store_true", help="print the profiler's op table")
    ap.add_argument("--host-profile", action="store_true",
                    help="also cProfile the host's Python over --profile-steps decode steps of the "
                         "2-bit KVSinkCache (top functions by own time; the pstats file in --out)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "accelerated": os.path.relpath(os.path.dirname(accelerated.__file__), _REPO),
           "prompt": args.prompt, "steps": args.steps}
    print(f"device {res['device']}, accelerated/ from {res['accelerated']}")
    model = smollm2_shaped().cuda()
    ids = torch.randint(1, 49152, (1, args.prompt), generator=torch.Generator().manual_seed(1)).cuda()
    variants = [("DynamicCache, model without kvsink hooks", DynamicCache)]
    variants += [(f"KVSinkCache {bits}-bit", lambda bits=bits: KVSinkCache(model, kv(bits))) for bits in (2, 4)]
    variants += [("DynamicCache, model with kvsink hooks", DynamicCache)]
    times = {name: [] for name, _ in variants}
    # warm-up, untimed, before any hook exists: the first seconds of a process run slower (measured:
    # a DynamicCache step at 56-98 ms in the first round, 20-40 ms later on the same machine)
    t_end = time.perf_counter() + args.warmup_s
    while time.perf_counter() < t_end:
        decode_ms(model, DynamicCache, ids, 8)
    for _ in range(args.rounds):
        times[variants[0][0]].append(decode_ms(model, DynamicCache, ids, args.steps)[0])

    # counts first (they do not depend on the machine's load), then the timed rounds
    res["per_step"] = {}
    for name, make in (("DynamicCache", DynamicCache), ("KVSinkCache 2-bit", lambda: KVSinkCache(model, kv(2)))):
        _, cache, tok = decode_ms(model, make, ids, 2)
        prof, c = profile_steps(model, cache, tok, args.profile_steps)
        res["per_step"][name] = c
        print(f"{name}: per decode step (mean of {args.profile_steps}): {c['launches']:.0f} kernel launches, "
              f"{c['syncs']:.2f} device->host syncs ({c['scalar_reads']:.2f} of them scalar reads), "
              f"{c['memcpy']:.2f} memcpy calls, {c['gpu_ms']:.2f} ms of GPU kernel time")
        steps = c.pop("steps")
        if name != "DynamicCache":
            quiet = [n for f, n in steps if not f]
            flush = [n for f, n in steps if f]
            c["syncs_non_flushing"], c["syncs_flushing"] = quiet, flush
            print(f"{name}: device->host syncs per step, {len(quiet)} non-flushing steps: max "
                  f"{max(quiet, default=0)} (total {sum(quiet)}); {len(flush)} flushing steps: "
                  f"{flush}")
        if name != "DynamicCache" and args.table:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                            max_name_column_width=60))
        if name != "DynamicCache" and args.host_profile:
            host_profile(model, cache, tok, args.profile_steps, args.out)
        del prof, cache

    for name, make in variants[1:]:
        decode_ms(model, make, ids, 4)                 # warm-up: Triton compilation, allocator
    for _ in range(args.rounds):
        for name, make in variants[1:]:
            times[name].append(decode_ms(model, make, ids, args.steps)[0])
    res["ms_per_token"], res["ms_per_token_rounds"] = {}, times
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        res["ms_per_token"][name] = med
        print(f"{name:45s} {med:8.2f} ms/token (median of {len(ts)} rounds: "
              f"{', '.join(f'{t:.2f}' for t in ts)}; prompt {args.prompt}, warm, mean of {args.steps} steps)")
    if args.out:
        tag = "before" if os.environ.get("KVSINK_ROOT") else "after"
        with open(os.path.join(args.out, f"gpu_decode_profile_{tag}.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
