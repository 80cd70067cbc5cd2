"""KVSinkCache under transformers' tensor parallelism (docs/11 §11.10).

Run the same checks on one process and under ``torchrun``; each rank writes what it saw:

    python bench/tp_check.py --make-tiny /tmp/tiny                       # a small random Llama
    python bench/tp_check.py --model /tmp/tiny --out /tmp/tp1.json       # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        bench/tp_check.py --model /tmp/tiny --out /tmp/tp2.json          # two ranks (gloo on CPU)
    python bench/tp_check.py --compare /tmp/tp1.json /tmp/tp2.json       # the table
    ... --decode 8 32768 32                                              # ms/token instead of checks

Under ``tp_plan="auto"`` each rank's attention holds ``num_key_value_heads / world`` KV heads, so
its ``KVSinkCache`` quantizes, preserves and attends only those; the sink predictor reads the
decoder's hidden state, which every rank holds whole after the row-parallel all-reduce, so
nothing is gathered for it.  Per case the output holds the generated tokens, ``cache.nbytes()``
and each layer's KV-head count; at 2 and 4 bit also the teacher-forced KL(fp || cache) per
token along the full-precision greedy continuation, computed within the same world size.

On GPUs (``--device cuda``, NCCL) the same script runs on 2 and 4 cards (bench/gpu_tp.sh).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerated.hf import KVSinkCache  # noqa: E402
from reference.config import KVSinkConfig  # noqa: E402

PROMPT, NEW = 24, 12
BASE = dict(key_group_size=8, value_group_size=8, residual_length=8)


def make_tiny(path: str, layers: int = 4, kv_heads: int = 4) -> None:
    """A random Llama small enough for CPU tests, with ``kv_heads`` divisible by 2 and 4."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)


def make_llama3_8b(path: str) -> None:
    """Random weights with Llama-3-8B's shapes (32 layers, 32 query / 8 KV heads, head dim 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)


def load(path: str, device: str):
    """The model, split by ``tp_plan="auto"`` when launched by torchrun (WORLD_SIZE set)."""
    from transformers import AutoModelForCausalLM
    kw = dict(dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kw.update(tp_plan="auto")
    elif device != "cpu":
        kw.update(device_map=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # tp_plan= moves to distributed_config=
        model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    model.generation_config.eos_token_id = None
    return model


def cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def prompt(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (1, PROMPT), generator=g)
    return ids.to(model.device)


@torch.no_grad()
def generate(model, ids, cache, **kw):
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("do_sample", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                              **{cache_kw(model): cache}, **kw)


@torch.no_grad()
def predictor_fields(model, ids, layer=1, channel=0) -> dict:
    """Random weights carry no sinks: the threshold sits in the widest gap among the top
    scores of ``hidden_states[layer][..., channel]``, so a few prompt tokens are sinks."""
    h = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer]
    top = np.sort(np.abs(h[0, :, channel].float().cpu().numpy()))[::-1][:6]
    i = int(np.argmax(top[:-1] / top[1:]))
    return dict(predictor_layer=layer, predictor_channels=(channel,),
                predictor_threshold=float(math.sqrt(top[i] * top[i + 1])))


@torch.no_grad()
def teacher_forced_kl(model, ref, n, config) -> list:
    """KL(fp || cache) per position of ``ref[:, n:]``: the prompt as one prefill, then one token
    per forward, exactly the steps of generate."""
    fp = model(input_ids=ref, use_cache=False).logits[0, n - 1: ref.shape[1] - 1].float()
    cache, kw = KVSinkCache(model, config), cache_kw(model)
    logits = [model(input_ids=ref[:, :n], use_cache=True, **{kw: cache}).logits[0, -1:]]
    for t in range(n, ref.shape[1] - 1):
        logits.append(model(input_ids=ref[:, t:t + 1], use_cache=True, **{kw: cache}).logits[0, -1:])
    q = torch.cat(logits).float().log_softmax(-1)
    p = fp.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).cpu().tolist()


def describe(cache) -> dict:
    """Bytes and shapes per layer; ``per_row_bytes`` is the part of definition 6.17 that does not
    scale with the heads (coded flags ``B*slots``, preserved positions ``8*B*P``, residual
    valid/status ``2*B*r``), which every rank holds whole."""
    stores = [layer.store for layer in cache.layers]
    per_row = [s.batch_size * (s.num_quantized + 8 * max(len(p) for p in s.preserved_positions())
                               + 2 * s.num_residual) for s in stores]
    return dict(nbytes=int(cache.nbytes()), layer_nbytes=[int(b) for b in cache.layer_nbytes()],
                kv_heads=[int(s.num_heads) for s in stores], per_row_bytes=per_row,
                preserved=cache.preserved_positions())


def run_cases(model, device) -> dict:
    ids = prompt(model)
    pred = predictor_fields(model, ids)
    fp = generate(model, ids, None)
    cases = {"fp_greedy": dict(tokens=fp[0, PROMPT:].tolist())}
    configs = {
        "greedy_8bit_pfn": KVSinkConfig(key_bits=8, value_bits=8, preserve="pfn", **BASE),
        "greedy_8bit_kvsink": KVSinkConfig(key_bits=8, value_bits=8, preserve="kvsink", **pred, **BASE),
        "beam3_8bit_kvsink": KVSinkConfig(key_bits=8, value_bits=8, preserve="kvsink", **pred, **BASE),
        "greedy_2bit_kvsink": KVSinkConfig(key_bits=2, value_bits=2, preserve="kvsink", **pred, **BASE),
    }
    calibration = dict(calibration_ids=prompt(model, seed=2).repeat(1, 8))
    configs["greedy_4bit_kvquant_nf"] = KVSinkConfig(key_bits=4, value_bits=4, quantizer="kvquant",
                                                     preserve="kvsink", **pred, **BASE)
    for name, cfg in configs.items():
        cache = KVSinkCache(model, cfg, **(calibration if cfg.quantizer == "kvquant" else {}))
        t0 = time.perf_counter()
        out = generate(model, ids, cache, **({"num_beams": 3} if name.startswith("beam") else {}))
        cases[name] = dict(tokens=out[0, PROMPT:].tolist(), seconds=time.perf_counter() - t0, **describe(cache))
    for bits in (2, 4):
        cfg = KVSinkConfig(key_bits=bits, value_bits=bits, preserve="kvsink", **pred, **BASE)
        kl = teacher_forced_kl(model, fp, PROMPT, cfg)
        cases[f"kl_{bits}bit_kvsink"] = dict(kl_per_token=kl, mean_kl=float(np.mean(kl)))
    return dict(predictor=pred, cases=cases)


@torch.no_grad()
def decode_speed(model, batch: int, length: int, new: int, bits: int = 2) -> dict:
    """ms per generated token after a ``length``-token prompt, DynamicCache vs KVSinkCache
    (``bits``, PFN-1; random weights have no sinks to predict): medians of three rounds after a
    warm-up, decode = (time of 1 + new tokens - time of 1 token) / new."""
    from transformers import DynamicCache
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=g).to(model.device)
    cfg = KVSinkConfig(key_bits=bits, value_bits=bits, preserve="pfn")
    out = {}
    for name, make in (("dynamic", lambda: DynamicCache(config=model.config)),
                       (f"kvsink_{bits}bit", lambda: KVSinkCache(model, cfg))):
        rounds = {1: [], new + 1: []}
        for i in range(4):                                   # round 0 warms up
            for n in rounds:
                sync()
                t0 = time.perf_counter()
                generate(model, ids, make(), max_new_tokens=n, min_new_tokens=n)
                sync()
                if i:
                    rounds[n].append(time.perf_counter() - t0)
        prefill, whole = float(np.median(rounds[1])), float(np.median(rounds[new + 1]))
        out[name] = dict(prefill_s=prefill, decode_ms_per_token=1e3 * (whole - prefill) / new)
    return dict(batch=batch, length=length, new=new, **out)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = load(args.model, args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = dict(world_size=world, rank=rank, device=str(model.device),
                  model_kv_heads=int(model.config.num_key_value_heads))
    if args.decode:
        result["decode"] = decode_speed(model, *args.decode)
    else:
        result.update(run_cases(model, args.device))
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, result)        # the report only, after the checks
    else:
        gathered = [result]
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(dict(world_size=world, ranks=gathered), f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def compare(paths) -> str:
    """A Markdown table of bytes per rank, KL and token agreement with the first run."""
    runs = [json.load(open(p)) for p in paths]
    base = runs[0]["ranks"][0]["cases"]
    lines = ["| world | case | tokens = 1st run | bytes per rank | mean KL/token |", "|---|---|---|---|---|"]
    for run in runs:
        r0 = run["ranks"][0]["cases"]
        for name, case in r0.items():
            same = case["tokens"] == base[name]["tokens"] if "tokens" in case else "-"
            per_rank = ", ".join(str(r["cases"][name].get("nbytes", "-")) for r in run["ranks"])
            kl = f"{case['mean_kl']:.2e}" if "mean_kl" in case else "-"
            lines.append(f"| {run['world_size']} | {name} | {same} | {per_rank} | {kl} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-tiny", metavar="DIR", help="save a small random Llama to DIR and exit")
    ap.add_argument("--model", help="a saved model directory (all ranks read it)")
    ap.add_argument("--out", help="JSON written by rank 0")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compare", nargs="+", metavar="JSON", help="print the table of earlier runs")
    ap.add_argument("--decode", nargs=3, type=int, metavar=("BATCH", "LENGTH", "NEW"),
                    help="time decoding instead of the checks")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "llama3-8b"],
                    help="with --make-tiny: the tiny test model or a random Llama-3-8B-shaped one (bf16)")
    args = ap.parse_args(argv)
    if args.make_tiny:
        make_tiny(args.make_tiny) if args.shape == "tiny" else make_llama3_8b(args.make_tiny)
    elif args.compare:
        print(compare(args.compare))
    elif args.model and args.out:
        if args.device == "cpu":          # gloo on the CPU even where GPUs are present (NCCL is for --device cuda)
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        worker(args)
    else:
        ap.error("give --make-tiny DIR, --compare JSON..., or --model DIR --out JSON")


if __name__ == "__main__":
    main()
