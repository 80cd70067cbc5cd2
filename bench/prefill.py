"""Prefill time and peak memory: KVSinkCache vs DynamicCache (SDPA), random-weight Llama shapes.

    python bench/prefill.py --out bench/results/prefill           # Llama-3-8B shape, bf16, CUDA
    python bench/prefill.py --shape tiny --batch 1 --tokens 256    # smoke run on CPU

For each batch size B and prompt length N (random token ids, no padding), one warm-up and
``--rounds`` timed forward passes with ``logits_to_keep=1`` through a fresh cache each: the median
prefill seconds, the CUDA allocator's peak during the pass (weights included) and the cache's
bytes afterwards (``cache.nbytes()`` / the DynamicCache's key and value tensors).  Caches:
``DynamicCache`` (transformers' SDPA attention), ``KVSinkCache`` at 4 and 2 bits, and, with
``--blocked``, the KVSinkCache with the prefill path of docs/11 §11.3 switched off (float32
blocked attention of the residual, every layer flushed at the end of the forward) to time the
change on the same machine.  Writes ``prefill.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerated.cache import QuantizedKVCacheLayer  # noqa: E402
from accelerated.hf import KVSinkCache, dynamic_cache_nbytes  # noqa: E402
from accelerated.hf.step import StepState  # noqa: E402
from reference.config import KVSinkConfig  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, head_dim=128, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256),
}


def make_model(shape: str, device, dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 17,
                                                 attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def kvsink_config(bits: int) -> KVSinkConfig:
    """KIVI-like groups of 32, residual 128; PFN-1 plus a predictor no token reaches (random
    weights have no sinks), read at layer 2: layers 0-1 wait for it."""
    return KVSinkConfig(key_bits=bits, value_bits=bits, residual_length=128, preserve="pfn+kvsink",
                        preserve_first_n=1, predictor_layer=2, predictor_channels=(0,),
                        predictor_threshold=1e30)


@contextlib.contextmanager
def blocked_path():
    """The float32 blocked attention of the residual and the end-of-forward flush (before)."""
    saved = QuantizedKVCacheLayer._attend_prefill, StepState.flush_early
    QuantizedKVCacheLayer._attend_prefill = lambda self, *a: None
    StepState.flush_early = lambda self, layers: None
    try:
        yield
    finally:
        QuantizedKVCacheLayer._attend_prefill, StepState.flush_early = saved


def prefill_once(model, ids, make_cache, cuda: bool):
    cache = make_cache()
    kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    nbytes = dynamic_cache_nbytes(cache) if isinstance(cache, DynamicCache) else cache.nbytes()
    del cache
    return seconds, peak, nbytes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--blocked", action="store_true", help="also time the path before docs/11 §11.3 'Prefill'")
    p.add_argument("--out", default=None, help="folder for prefill.json")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = make_model(args.shape, device, torch.bfloat16 if cuda else torch.float32)
    caches = [("DynamicCache", lambda: DynamicCache(config=model.config), contextlib.nullcontext)]
    for bits in args.bits:
        caches.append((f"kvsink {bits}-bit", lambda b=bits: KVSinkCache(model, kvsink_config(b)),
                       contextlib.nullcontext))
        if args.blocked:
            caches.append((f"kvsink {bits}-bit blocked", lambda b=bits: KVSinkCache(model, kvsink_config(b)),
                           blocked_path))
    rows = []
    for b in args.batch:
        for n in args.tokens:
            ids = torch.randint(1, SHAPES[args.shape]["vocab_size"], (b, n), device=device)
            for name, make, ctx in caches:
                try:
                    with ctx():
                        prefill_once(model, ids, make, cuda)                       # warm-up
                        runs = [prefill_once(model, ids, make, cuda) for _ in range(args.rounds)]
                except torch.OutOfMemoryError:
                    rows.append({"cache": name, "batch": b, "tokens": n, "oom": True})
                    print(f"{name:26s} B={b} N={n}: out of memory")
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                row = {"cache": name, "batch": b, "tokens": n,
                       "prefill_s": statistics.median(r[0] for r in runs),
                       "peak_bytes": max(r[1] for r in runs), "cache_bytes": runs[-1][2]}
                rows.append(row)
                print(f"{name:26s} B={b} N={n}: prefill {row['prefill_s']:.3f} s, peak "
                      f"{row['peak_bytes'] / 2**30:.2f} GiB, cache {row['cache_bytes'] / 2**30:.3f} GiB")
    result = {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "rows": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "prefill.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
