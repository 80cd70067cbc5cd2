"""Issue 9's benchmark: decode and prefill speed, memory and the largest batch of every KV cache.

    PYTHONUNBUFFERED=1 python bench/gpu_speed.py --model llama3-8b --batch 1,8,32 --ctx 4096,32768 \\
        --caches dynamic,static-compiled,quanto2,quanto4,kvsink2,kvsink4 --out $OUT --time-budget-s 450
    python bench/gpu_speed.py --tiny --out /tmp/speed        # CPU self-test (tests/test_bench_gpu_speed.py)
    bash bench/gpu_speed.sh A                                 # one device call of the split below

Models: random-weight Llama-3-8B / Llama-2-7B shapes in bf16, built on the GPU
(bench/speed_models.py).  Caches: bench/speed_caches.py (unknown names are an error, known ones
that cannot run here -- e.g. the static kvsink cache before it exists -- are skipped with the
reason).  Every cell (model, B, N, cache) runs through transformers' own ``generate`` (the path a
user takes; ``static-compiled`` is its auto-compiled StaticCache decode):

1. warm-up, untimed: a ``min(256, N)``-token random prompt at the same batch, 40 new tokens
   (Triton and torch.compile compilation, CUDA-graph recording, allocator growth stay out of the
   numbers; the compiled StaticCache is warmed and timed on the same cache object, reset between);
2. timed: the N-token random prompt, ``1 + warmup_steps + rounds * decode_tokens`` new tokens,
   greedy.  A logits processor records a CUDA event at every step (no host synchronisation), so
   one generation gives the prefill seconds (``generate`` called -> the prefill's logits;
   ``logits_to_keep=1``, which ``generate`` sets) and ``rounds`` consecutive rounds of
   ``decode_tokens`` steps after ``warmup_steps`` untimed ones: decode ms/token is their median,
   tokens/s = B * 1000 / that;
3. peak memory = ``torch.cuda.max_memory_allocated()`` over the timed generation (reset before the
   prefill; the peak at the prefill's end is kept too), ``cache_nbytes`` = the bytes the cache holds
   at the end (``cache.nbytes()`` for kvsink; the K/V tensors for DynamicCache / StaticCache;
   quanto's packed data + scales + shifts + its bf16 residual).
An out-of-memory cell is recorded as "OOM" (and larger batches of that cache at that N are not
tried); the JSON (``--out``/gpu_speed.json) and the tables (gpu_speed.md) are rewritten after every
cell, so a call cut short keeps every finished cell (the figure is drawn at the end; ``python
bench/speed_report.py gpu_speed.json`` draws it from the JSON).  ``--time-budget-s``: a cell whose predicted time (prefill scaled from the
cache's last measured cell by the prefill FLOPs, its decode steps, one compilation per new shape of
a compiled cache) does not fit in what is left is skipped, recorded with the reason.

Largest batch at N = ``--max-batch-ctx`` (32k) per cache (bench/speed_maxbatch.py): bytes per
sequence = (peak - weights) / B of the cache's measured cell at that N with the largest B (this
run's, or ``--max-batch-reference``'s: an earlier call's JSON), estimate = floor(0.97 * free memory
with the model loaded / that), verified by running the whole cell at that batch (after an
out-of-memory, up to two retries, each at 0.85x the last); its tokens/s is reported.  No binary
search: a 32k prefill takes seconds to minutes and a call has ten.  ``--prefill-chunk c`` has every
``generate`` feed the prompt ``c`` tokens per forward (transformers' chunked prefill, docs/11
§11.4): the prefill's activations, which bound the largest batch of every cache at 32k
(bench/README.md "Issue 9, largest batch"), then scale with ``c`` instead of N; the reference
cells of ``--max-batch-reference`` must then come from a run with the same ``--prefill-chunk``
(checked: an error otherwise).

Kernel level (bench/speed_kernels.py): the copy bandwidth and the decode-attention kernel's achieved
bandwidth on the bytes it must read.  Outputs under ``--out``: gpu_speed.json, gpu_speed.md (the
tables: rows caches, columns shapes, ratios against compiled StaticCache and quanto at the same bits),
gpu_speed.png (bench/speed_report.py, which also merges the JSON of several calls), and
compile_cache.bin (torch.compiler's cache artifacts: ``--compile-cache`` loads them in a later call).

WALL TIME ON ONE H100 (an estimate, from issue 9's measurements: DynamicCache prefill 0.19 s at B=1
N=4k, 1.05 s B=8 4k, 1.43 s B=1 32k, 5.6 s B=4 32k; StaticCache compiled ~1 min per compilation;
today's kvsink prefill 4x SDPA's at 4k and 26x at 32k, i.e. 37 s at B=1 32k and ~5 min at B=8 32k):
fixed per call: start + model build ~30 s, quanto's unpack kernel build ~40 s, kernel level ~30 s.
Per model, rounds 3 x 16 tokens (+4 warm-up steps, +40-token warm-up generation per cell):
  N=4k, B=1,8,32:   dynamic ~25 s, static-compiled ~3 min (two compilations: CompileConfig(dynamic=
                    None), transformers' default, compiles the first shape static and the second with
                    dynamic dimensions, later shapes reuse it and only record CUDA graphs), quanto2+4
                    ~50 s, kvsink2+4 ~1.5 min                                          -> ~6.5 min
  N=32k, B=1,8:     dynamic ~30 s, static-compiled ~3 min, quanto2+4 ~45 s, kvsink2+4 ~1.5 min at
                    B=1 (B=8: ~5 min each, beyond the budget until the prefill is fixed) -> ~6.5 min
  largest batch at 32k (six caches, one prefill each at B ~ 10-20 for full precision):  ~4-5 min
Whole grid of both models ~40 min of device time; once the kvsink prefill meets issue 9's target
(1.15x SDPA), ~35 min.  A session holds 30 device minutes: run A, B, C first.
PROPOSED SPLIT (bash bench/gpu_speed.sh X; each call holds the baselines its ratios need; the time
budget, 420 s, skips and records what would overrun; --compile-cache from the second call on):
  A  llama3-8b  N=4k   B=1,8,32  six caches + kernel level (Llama-3 heads)         ~7 min
  B  llama3-8b  N=32k  B=1,8     six caches                                         ~7 min
  C  llama3-8b  largest batch at 32k, references from B's JSON                      ~5 min
  D  llama2-7b  N=4k   B=1,8,32  six caches + kernel level (Llama-2 heads)          ~7 min
  E  llama2-7b  N=32k  B=1,4     six caches (B=8 holds 137 GB of bf16 K/V)          ~6 min
  F  llama2-7b  largest batch at 32k, references from E's JSON                      ~4 min
B=32 at 32k fits no full-precision cache of either model on 80 GB (Llama-3: 137 GB of K/V): the
script tries, records OOM and stops growing B for that cache.  128k: add --ctx 131072 --batch 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from typing import Optional

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench.speed_caches import VARIANTS, parse_caches, setup_quanto  # noqa: E402
from bench.speed_models import SHAPES, build_model, flops_per_sequence, weight_bytes  # noqa: E402
from bench.speed_report import markdown, write_figure  # noqa: E402

T0 = time.perf_counter()
WARM_PROMPT, WARM_NEW = 256, 40
KERNEL_BATCHES = (1, 8)


def _ints(text: str, flag: str) -> list:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes comma-separated positive integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return vals


#: the grid of a device run, and of the CPU self-test (--tiny); an option given explicitly wins
DEFAULTS = {"model": "llama3-8b", "batch": [1, 8, 32], "ctx": [4096, 32768],
            "caches": "dynamic,static-compiled,quanto2,quanto4,kvsink2,kvsink4",
            "rounds": 3, "decode_tokens": 16, "warmup_steps": 4, "kvsink_residual": None}
TINY = {"model": "tiny", "batch": [1, 2], "ctx": [64], "caches": "dynamic,kvsink2",
        "rounds": 2, "decode_tokens": 4, "warmup_steps": 2, "kvsink_residual": 32}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help=f"comma-separated, of {', '.join(SHAPES)} (default llama3-8b)")
    ap.add_argument("--batch", type=lambda s: _ints(s, "--batch"), help="default 1,8,32")
    ap.add_argument("--ctx", type=lambda s: _ints(s, "--ctx"), help="default 4096,32768")
    ap.add_argument("--caches", help=f"comma-separated, of {', '.join(VARIANTS)} (default: the first six)")
    ap.add_argument("--rounds", type=int, help="timed decode rounds per cell, median reported (default 3)")
    ap.add_argument("--decode-tokens", type=int, help="decode steps per round (default 16)")
    ap.add_argument("--warmup-steps", type=int, help="untimed decode steps before the rounds (default 4)")
    ap.add_argument("--out", default="bench_out", help="directory for gpu_speed.json/.md/.png")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="skip (and record) what would not finish within this many seconds of the start")
    ap.add_argument("--max-batch", action="store_true", help="find the largest batch at --max-batch-ctx")
    ap.add_argument("--max-batch-ctx", type=int, default=32768)
    ap.add_argument("--max-batch-reference", default=None,
                    help="gpu_speed.json of an earlier run whose cells at --max-batch-ctx serve as references")
    ap.add_argument("--skip-grid", action="store_true", help="no grid cells (e.g. --max-batch alone)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel-level measurements")
    ap.add_argument("--kernel-ctx", type=lambda s: _ints(s, "--kernel-ctx"), default=[4096, 32768])
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="cap the CUDA allocator at this many GiB (e.g. 79.6: an 80 GB H100 on an H200)")
    ap.add_argument("--compile-cache", default=None,
                    help="torch.compiler cache artifacts to load (an earlier call's compile_cache.bin)")
    ap.add_argument("--compile-dynamic", default="none", choices=["none", "true", "false"],
                    help="CompileConfig(dynamic=...) of the compiled caches (none: transformers' default)")
    ap.add_argument("--compile-estimate-s", type=float, default=75.0,
                    help="predicted seconds per compilation, for --time-budget-s")
    ap.add_argument("--quanto-wheels", default=os.path.join(_REPO, ".devdata", "whl-quanto"),
                    help="wheels to install optimum-quanto from when it is missing")
    ap.add_argument("--quanto-unpack", default="kernel", choices=["kernel", "full", "torch"])
    ap.add_argument("--quanto-group", type=int, default=64)
    ap.add_argument("--quanto-residual", type=int, default=128)
    ap.add_argument("--kvsink-residual", type=int,
                    help="residual_length of the kvsink caches (default: bench/gpu_e2e.py kv()'s 128)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="generate(prefill_chunk_size=...) for every cache: the prompt in chunks of this "
                         "many tokens (bounds the prefill's activations; default: one forward)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU self-test: 2-layer model, N=64, B=1,2, dynamic + kvsink2, no kernels")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    for key, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.no_kernels = args.no_kernels or args.tiny
    try:
        args.variants = parse_caches(args.caches)
    except ValueError as e:
        ap.error(str(e))
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    bad = [m for m in args.models if m not in SHAPES]
    if bad or not args.models:
        ap.error(f"--model: unknown model(s) {bad}; choose from {', '.join(SHAPES)}")
    if args.memory_gib is not None and args.memory_gib <= 0:
        ap.error(f"--memory-gib must be > 0, got {args.memory_gib}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        ap.error(f"--prefill-chunk must be >= 1 (tokens per prefill forward), got {args.prefill_chunk}")
    for flag in ("rounds", "decode_tokens", "max_batch_ctx", "quanto_group", "quanto_residual"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup_steps < 0:
        ap.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    args.compile_dynamic = {"none": None, "true": True, "false": False}[args.compile_dynamic]
    return args


# ------------------------------------------------------------------------------------------ timing
class Clock:
    """Timestamps on the device's timeline: CUDA events (recorded, never waited on) on a GPU,
    the host clock on the CPU (where every op has finished when it returns)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def step_timer(clock: Clock):
    """A transformers LogitsProcessor that marks the time of every generation step (called once
    per forward, after its logits) and the allocator's peak at the first one (the prefill's end)."""
    from transformers import LogitsProcessor

    class StepTimer(LogitsProcessor):
        def __init__(self):
            self.marks, self.prefill_peak = [], None

        def __call__(self, input_ids, scores):
            self.marks.append(clock.mark())
            if clock.cuda and len(self.marks) == 1:
                self.prefill_peak = torch.cuda.max_memory_allocated()
            return scores
    return StepTimer()


def generate_timed(model, variant, cache, ids, new_tokens, clock, options):
    """One greedy generation of ``new_tokens`` through ``cache``: (start mark, StepTimer)."""
    from transformers import LogitsProcessorList

    from accelerated.hf.registration import cache_argument_name
    timer = step_timer(clock)
    kwargs = {cache_argument_name(model): cache, **variant.generate_kwargs(options)}
    if options.prefill_chunk is not None:            # transformers' chunked prefill, every cache
        kwargs["prefill_chunk_size"] = options.prefill_chunk
    start = clock.mark()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       do_sample=False, logits_processor=LogitsProcessorList([timer]), **kwargs)
    if clock.cuda:
        torch.cuda.synchronize()
    return start, timer


def measure_cell(model, variant, batch, ctx, options, clock) -> dict:
    """Warm-up, then the timed generation; the numbers of one cell (see the module doc)."""
    dev = model.device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch * 100003 + ctx)
    new = 1 + options.warmup_steps + options.rounds * options.decode_tokens
    max_len = ctx + new
    t_warm = time.perf_counter()
    cache = variant.build(model, batch, max_len, options)
    try:
        warm_ids = torch.randint(1, vocab, (batch, min(WARM_PROMPT, ctx)), generator=gen).to(dev)
        generate_timed(model, variant, cache, warm_ids, min(WARM_NEW, max_len - warm_ids.shape[1]),
                       clock, options)
        if variant.compiled:          # same cache object: the CUDA graphs recorded on its buffers
            cache.reset()
        else:
            variant.release(cache)
            cache = variant.build(model, batch, max_len, options)
        warm_s = time.perf_counter() - t_warm
        ids = torch.randint(1, vocab, (batch, ctx), generator=gen).to(dev)
        if clock.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, timer = generate_timed(model, variant, cache, ids, new, clock, options)
        marks, w, k = timer.marks, options.warmup_steps, options.decode_tokens
        rounds = [clock.seconds(marks[w + r * k], marks[w + (r + 1) * k]) / k * 1e3
                  for r in range(options.rounds)]
        ms = sorted(rounds)[len(rounds) // 2]
        row = {"status": "ok", "prefill_s": clock.seconds(start, marks[0]), "decode_ms_per_token": ms,
               "decode_ms_rounds": rounds, "tokens_per_s": batch * 1e3 / ms,
               "cache_nbytes": variant.nbytes(cache), "warmup_s": warm_s, "steps": len(marks)}
        if clock.cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
            row["prefill_peak_bytes"] = timer.prefill_peak
        return row
    finally:
        variant.release(cache)
        del cache


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_cell(model, variant, batch, ctx, options, clock) -> dict:
    """:func:`measure_cell` with out-of-memory and errors recorded, memory freed afterwards."""
    try:
        row = measure_cell(model, variant, batch, ctx, options, clock)
    except Exception as e:  # noqa: BLE001 - one cell's failure is recorded, the grid goes on
        row = ({"status": "OOM", "error": str(e).splitlines()[0][:300]} if _is_oom(e) else
               {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}"})
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------- the time budget
class Budget:
    """Predicts a cell's seconds from what this run measured, and says whether it still fits."""

    def __init__(self, limit_s, options, shape):
        self.limit, self.options, self.shape = limit_s, options, shape
        self.compiled_shapes = {}

    def compiles(self, variant, batch, ctx) -> bool:
        """Whether running this shape compiles: every new shape with CompileConfig(dynamic=False),
        the first with dynamic=True, the first two with None (automatic dynamic shapes)."""
        seen = self.compiled_shapes.setdefault(variant.name, set())
        if not variant.compiled or (batch, ctx) in seen:
            return False
        compilations = {None: 2, True: 1, False: math.inf}[self.options.compile_dynamic]
        return len(seen) < compilations

    def ran(self, variant, batch, ctx) -> None:
        self.compiled_shapes.setdefault(variant.name, set()).add((batch, ctx))

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - (time.perf_counter() - T0)

    def predict(self, variant, batch, ctx, done) -> float:
        flops = batch * flops_per_sequence(self.shape, ctx)
        ref = [c for c in done if c["status"] == "ok" and c["cache"] == variant.name
               and c["model"] == self.shape.name]
        ref = ref or [c for c in done if c["status"] == "ok" and c["model"] == self.shape.name]
        if ref:
            r = ref[-1]
            prefill = r["prefill_s"] * flops / (r["batch"] * flops_per_sequence(self.shape, r["ctx"]))
            step_s = r["decode_ms_per_token"] / 1e3
        else:
            prefill, step_s = flops / 2e14, 0.15
        steps = 1 + self.options.warmup_steps + self.options.rounds * self.options.decode_tokens + WARM_NEW
        compile_s = self.options.compile_estimate_s if self.compiles(variant, batch, ctx) else 0.0
        return prefill + steps * step_s + compile_s + 5.0

    def skip_reason(self, variant, batch, ctx, done):
        need, left = self.predict(variant, batch, ctx, done), self.left()
        if need > left:
            return f"time budget: predicted {need:.0f} s, {max(left, 0):.0f} s left"
        return None


# ------------------------------------------------------------------------------------ the grid run
def environment(device: str, options, quanto) -> dict:
    import transformers
    env = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "quanto": quanto}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(total_memory=props.total_memory, sm_count=props.multi_processor_count)
    return env


def write_json(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def _cell_line(c: dict) -> str:
    head = f"{c['model']} B={c['batch']:<3d} N={c['ctx']:<6d} {c['cache']:16s}"
    if c["status"] != "ok":
        return f"{head} {c['status']}: {c.get('reason') or c.get('error', '')}"
    mem = f", peak {c['peak_bytes'] / 2**30:.1f} GiB" if "peak_bytes" in c else ""
    return (f"{head} prefill {c['prefill_s']:.3f} s, decode {c['decode_ms_per_token']:.2f} ms/token "
            f"({c['tokens_per_s']:.1f} tok/s), cache {c['cache_nbytes'] / 2**20:.3f} MiB{mem}")


def run_grid(model, shape, options, clock, budget, result, save) -> None:
    """Every (N, B, cache) cell of one model, in that order, saved after each."""
    cells = result["cells"]
    for ctx in options.ctx:
        for batch in options.batch:
            for variant in options.variants:
                cell = {"model": shape.name, "batch": batch, "ctx": ctx, "cache": variant.name}
                oom_below = any(c["status"] == "OOM" and c["model"] == shape.name and c["ctx"] == ctx
                                and c["cache"] == variant.name and c["batch"] < batch for c in cells)
                reason = variant.unavailable()
                if reason is not None:
                    cell.update(status="skipped", reason=reason)
                elif oom_below:
                    cell.update(status="OOM", reason="not run: a smaller batch ran out of memory")
                elif (reason := budget.skip_reason(variant, batch, ctx, cells)) is not None:
                    cell.update(status="skipped", reason=reason)
                else:
                    cell.update(run_cell(model, variant, batch, ctx, options, clock))
                    budget.ran(variant, batch, ctx)
                    if variant.compiled:
                        save_compile_cache(options)
                cells.append(cell)
                print(_cell_line(cell), flush=True)
                save()


def run_model(name, options, device, result, save) -> None:
    """The grid of one model, then its largest batches."""
    shape = SHAPES[name]
    clock = Clock(device)
    budget = Budget(options.time_budget_s, options, shape)
    t = time.perf_counter()
    model = build_model(shape, device)
    result["models"][name] = {"weights_bytes": weight_bytes(model), "build_s": time.perf_counter() - t,
                              "shape": shape.__dict__}
    if not options.skip_grid:
        run_grid(model, shape, options, clock, budget, result, save)
    if options.max_batch and device == "cuda":
        from bench.speed_maxbatch import largest_batches
        largest_batches(model, shape, options, clock, budget, result, save, run_cell)
    del model
    gc.collect()
    if device == "cuda":
        torch.compiler.reset()            # dynamo's caches and the CUDA-graph trees of this model
        torch.cuda.empty_cache()


# ------------------------------------------------------------------- torch.compile's cache artifacts
def load_compile_cache(options) -> Optional[str]:
    """Load ``--compile-cache`` (torch.compiler's portable cache artifacts from an earlier call:
    inductor's compiled kernels, so a fresh machine skips most of the ~1 min per compilation)."""
    if not options.compile_cache or not os.path.exists(options.compile_cache):
        return None
    try:
        with open(options.compile_cache, "rb") as f:
            info = torch.compiler.load_cache_artifacts(f.read())
    except Exception as e:  # noqa: BLE001 - a stale cache only costs compile time: say so, go on
        return f"not loaded ({type(e).__name__}: {str(e)[:200]}): compiling from scratch"
    return f"loaded {options.compile_cache}: {info}"


def save_compile_cache(options) -> None:
    """Write the compile artifacts so far to ``--out``/compile_cache.bin (carry it to the next call)."""
    if not torch.cuda.is_available():
        return
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            with open(os.path.join(options.out, "compile_cache.bin"), "wb") as f:
                f.write(saved[0])
    except Exception as e:  # noqa: BLE001 - the measurements matter more than the cache
        print(f"compile cache not saved: {type(e).__name__}: {str(e)[:200]}", flush=True)


def setup_cuda(options, result) -> None:
    """The dynamo recompile limit (several shapes and caches compile the same forward in one
    process), the compile cache and the allocator cap of ``--memory-gib``."""
    total = torch.cuda.get_device_properties(0).total_memory
    options.memory_cap_bytes = None
    if options.memory_gib is not None:
        options.memory_cap_bytes = min(total, int(options.memory_gib * 2 ** 30))
        torch.cuda.set_per_process_memory_fraction(options.memory_cap_bytes / total)
        result["environment"]["memory_cap_bytes"] = options.memory_cap_bytes
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    result["environment"]["dynamo_" + name] = getattr(cfg, name)
    result["environment"]["compile_cache"] = load_compile_cache(options)


def read_reference(options) -> list:
    """The cells of ``--max-batch-reference`` (an earlier run's JSON), for the largest-batch estimate.

    Its cells must have been measured with this run's ``--prefill-chunk``: a chunked prefill's
    activations scale with the chunk, not N, so the bytes per sequence of a cell measured otherwise
    would not hold (``ValueError`` naming both)."""
    if not options.max_batch_reference:
        return []
    with open(options.max_batch_reference) as f:
        data = json.load(f)
    chunk = data.get("options", {}).get("prefill_chunk")
    if chunk != options.prefill_chunk:
        raise ValueError(f"{options.max_batch_reference} was measured with --prefill-chunk {chunk}, this "
                         f"run uses {options.prefill_chunk}: its bytes per sequence would not hold; "
                         f"measure the reference cells with the same --prefill-chunk")
    return [dict(c, reference=options.max_batch_reference) for c in data["cells"]]


def main(argv=None) -> int:
    options = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        os.makedirs(options.out, exist_ok=True)
        options.reference_cells = read_reference(options)
    except (OSError, ValueError, KeyError) as e:
        print(f"gpu_speed.py: error: {e} (--out must be a writable directory, --max-batch-reference "
              f"a gpu_speed.json)", file=sys.stderr)
        return 2
    json_path = os.path.join(options.out, "gpu_speed.json")
    quanto = None
    if any(v.family == "quanto" for v in options.variants):      # before transformers checks for it
        quanto = setup_quanto(options.quanto_wheels, options.quanto_unpack, device)
        print(f"optimum-quanto: {quanto}", flush=True)
    result = {"environment": environment(device, options, quanto),
              "options": {k: v for k, v in vars(options).items() if k not in ("variants", "reference_cells")},
              "caches": {v.name: v.describe(options) for v in options.variants},
              "method": "bench/gpu_speed.py's docstring", "models": {}, "cells": [], "max_batch": [],
              "kernels": None, "complete": False}

    def save():                           # after every cell: a run cut short keeps its cells
        result["elapsed_s"] = time.perf_counter() - T0
        write_json(json_path, result)
        with open(os.path.join(options.out, "gpu_speed.md"), "w") as f:
            f.write(markdown(result))
    print(f"device {result['environment']['device']}, torch {torch.__version__}, "
          f"transformers {result['environment']['transformers']}", flush=True)
    if device == "cuda":
        setup_cuda(options, result)
    if device == "cuda" and not options.no_kernels:
        try:
            from bench.speed_kernels import kernel_level
            result["kernels"] = kernel_level([SHAPES[m] for m in options.models], options.kernel_ctx,
                                             KERNEL_BATCHES, (2, 4))
        except Exception as e:  # noqa: BLE001 - the grid still runs; the failure is recorded
            result["kernels"] = {"error": f"{type(e).__name__}: {str(e)[:500]}", "cases": []}
        save()
    for name in options.models:
        run_model(name, options, device, result, save)
    result["complete"] = True
    save()
    write_figure(result, os.path.join(options.out, "gpu_speed.png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
