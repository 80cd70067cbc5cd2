"""The largest batch that fits at one context length, per cache (bench/gpu_speed.py --max-batch).

Method (no binary search: a prefill at N=32k takes seconds to minutes, and a device call has ten):

1. reference = the cell of this model and cache at N = ``--max-batch-ctx`` with the largest batch
   that ran, in this run's grid or in ``--max-batch-reference`` (an earlier run's JSON, same device
   kind: the grid need not be measured twice);
2. bytes per sequence = (that cell's peak allocated bytes - the model's weights) / its batch: the
   cache, the prefill's transient (activations, full-precision K/V before quantization, logits)
   and the decode steps, all measured, nothing assumed;
3. estimate = floor(0.97 * free device memory with the model loaded / bytes per sequence) (0.97:
   room for the allocator's fragmentation), capped by ``LIMIT``; with ``--memory-gib`` the free
   memory is that cap less what the allocator holds (the cap also binds the verifying run);
4. verified by running the whole cell (warm-up, prefill, timed decode) at that batch; if it runs
   out of memory, at most ``RETRIES`` = 2 more times, each at floor(0.85 x) the last; the batch that
   ran and its tokens/s are reported.  The free memory is read again before each cache, after
   releasing the compiled graphs (and their CUDA-graph pools) of the cells before it.
The per-sequence bytes measured at a small batch include per-call fixed costs, so the estimate
errs low; it is verified, not assumed.
"""

from __future__ import annotations

import gc
import math

import torch

__all__ = ["LIMIT", "MARGIN", "RETRY", "RETRIES", "largest_batches", "estimate", "free_bytes"]

LIMIT, MARGIN, RETRY, RETRIES = 1024, 0.97, 0.85, 2


def estimate(ref: dict, weights: int, free: int) -> dict:
    """Step 2-3 of the module doc, from a reference cell."""
    per_seq = (ref["peak_bytes"] - weights) / ref["batch"]
    return {"reference_batch": ref["batch"], "bytes_per_sequence": per_seq, "free_bytes": free,
            "estimate": max(1, min(LIMIT, int(MARGIN * free // per_seq)))}


def _verify(model, variant, ref, rec, options, clock, budget, pool, run_cell) -> None:
    """Step 4: run the estimated batch (after an OOM, at most ``RETRIES`` more at ``RETRY`` x the
    last); fills ``rec``."""
    ctx, batch = rec["ctx"], rec["estimate"]
    rec["attempts"] = []
    for _ in range(1 + RETRIES):
        if batch <= ref["batch"]:
            rec["attempts"].append({"batch": ref["batch"], "status": "ok",
                                    "from": ref.get("reference", "this run's grid")})
            rec.update(status="ok", batch=ref["batch"], tokens_per_s=ref["tokens_per_s"],
                       decode_ms_per_token=ref["decode_ms_per_token"])
            return
        reason = budget.skip_reason(variant, batch, ctx, pool)
        if reason is not None:
            rec["attempts"].append({"batch": batch, "status": "skipped", "reason": reason})
            rec.update(status="skipped", reason=reason)
            return
        row = run_cell(model, variant, batch, ctx, options, clock)
        budget.ran(variant, batch, ctx)
        rec["attempts"].append({"batch": batch, **row})
        if row["status"] == "ok":
            rec.update(status="ok", batch=batch, tokens_per_s=row["tokens_per_s"],
                       decode_ms_per_token=row["decode_ms_per_token"],
                       peak_bytes=row["peak_bytes"], prefill_s=row["prefill_s"])
            return
        rec.update(status=row["status"], reason=row.get("error"))
        if row["status"] != "OOM":
            return
        batch = max(1, math.floor(RETRY * batch))


def free_bytes(options) -> int:
    """The device's free bytes now, after releasing what earlier cells left: compiled graphs and
    their CUDA-graph memory pools (a compiled StaticCache's pool held ~5 GiB through the cells after
    it), cached blocks; capped by ``--memory-gib`` (``options.memory_cap_bytes``)."""
    torch.compiler.reset()              # torch._dynamo.reset: also the CUDA-graph trees' pools
    gc.collect()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    cap = getattr(options, "memory_cap_bytes", None)
    if cap is not None:
        free = min(free, cap - torch.cuda.memory_reserved())
    return free


def largest_batches(model, shape, options, clock, budget, result, save, run_cell, free=None) -> None:
    """Append one record per cache to ``result["max_batch"]`` (saving after each).  ``free``:
    the device's free bytes with the model loaded (default: read from CUDA)."""
    from bench.speed_models import weight_bytes
    ctx, weights = options.max_batch_ctx, weight_bytes(model)
    pool = result["cells"] + getattr(options, "reference_cells", [])
    for variant in options.variants:
        rec = {"model": shape.name, "cache": variant.name, "ctx": ctx}
        refs = [c for c in pool if c["model"] == shape.name and c["cache"] == variant.name
                and c["ctx"] == ctx and c["status"] == "ok" and "peak_bytes" in c]
        if variant.unavailable() is not None:
            rec.update(status="skipped", reason=variant.unavailable())
        elif not refs:
            rec.update(status="skipped", reason=f"no measured cell of this cache at N={ctx}")
        else:
            ref = max(refs, key=lambda c: c["batch"])
            room = free if free is not None else free_bytes(options)
            rec.update(estimate(ref, weights, room))
            _verify(model, variant, ref, rec, options, clock, budget, pool, run_cell)
        result["max_batch"].append(rec)
        tail = (f"B={rec['batch']}, {rec['tokens_per_s']:.1f} tok/s" if rec["status"] == "ok"
                else f"{rec['status']}: {rec.get('reason', '')}")
        print(f"{shape.name} largest batch at N={ctx} {variant.name:16s} estimate "
              f"{rec.get('estimate', '-')}: {tail}", flush=True)
        save()
