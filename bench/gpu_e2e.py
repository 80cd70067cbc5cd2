"""End-to-end checks and timings of KVSinkCache on CUDA (run on a GPU machine).

A random-weight Llama with SmolLM2-135M's shapes (30 layers, hidden 576, 9 query / 3 KV
heads, head_dim 64) -- the GGUF does not travel to the GPU machine, and shapes, not
weights, set speed and memory.  Random weights have no real attention sinks, so the
predictor is configured by hand (channel 0, a threshold no token reaches) and PFN-1 is on.

1. greedy generation at 8 bit equals DynamicCache (bf16), 4/2-bit agreement and KL;
2. memory: cache.nbytes() vs DynamicCache after a 4,096-token prefill; CUDA allocator peak;
3. decode speed: ms per generated token after a 4,096-token prompt, DynamicCache vs KVSinkCache;
4. with two or more GPUs: device_map over two GPUs, each layer's cache on its layer's device.

Usage: PYTHONUNBUFFERED=1 python bench/gpu_e2e.py [--out DIR] [--parts agreement speed device_map]
(KVSINK_ROOT=DIR: import accelerated/ from DIR, e.g. .before made by bench/gpu_decode_session.sh, to time older code)
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get("KVSINK_ROOT"):                 # an older accelerated/ package shadows the repo's
    sys.path.insert(0, os.path.abspath(os.environ["KVSINK_ROOT"]))

from accelerated.hf import KVSinkCache, dynamic_cache_nbytes  # noqa: E402
from reference.config import KVSinkConfig  # noqa: E402


def smollm2_shaped(seed=0, dtype=torch.bfloat16, **over):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
               rope_theta=100000.0, initializer_range=0.05)
    cfg.update(over)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def kv(config_bits, **extra):
    return KVSinkConfig(key_bits=config_bits, value_bits=config_bits, preserve="pfn+kvsink",
                        preserve_first_n=1, predictor_layer=3, predictor_channels=(0,),
                        predictor_threshold=1e30, residual_length=128, **extra)


def cache_kw(model):
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, ids, cache, new):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          do_sample=False, pad_token_id=0, **{cache_kw(model): cache})


@torch.no_grad()
def teacher_forced_logits(model, ids, cache, prompt):
    """Prefill `prompt` tokens, then feed the rest one token at a time; logits of every step."""
    out = model(input_ids=ids[:, :prompt], use_cache=True, **{cache_kw(model): cache})
    logits = [out.logits[:, -1].float()]
    for t in range(prompt, ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{cache_kw(model): cache})
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--agree", type=int, default=512, help="prompt length of the agreement check")
    ap.add_argument("--parts", nargs="+", default=["agreement", "speed", "device_map"],
                    choices=["agreement", "speed", "device_map"])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda:0" if cuda else "cpu")       # CPU: a smoke run of the script only
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    import transformers
    res["transformers"] = transformers.__version__
    model = smollm2_shaped().to(dev)
    g = torch.Generator().manual_seed(1)

    # 1. agreement with DynamicCache
    A = args.agree
    ids = torch.randint(1, 49152, (1, A), generator=g).to(dev)
    rows = []
    ref = generate(model, ids, DynamicCache(), 64)[:, A:] if "agreement" in args.parts else None
    for bits in ((8, 4, 2) if "agreement" in args.parts else ()):
        out = generate(model, ids, KVSinkCache(model, kv(bits)), 64)[:, A:]
        same = int((out == ref).cumprod(1).sum())
        text = torch.cat([ids, ref], 1)
        lp_ref = F.log_softmax(teacher_forced_logits(model, text, DynamicCache(), A), -1)
        lp_q = F.log_softmax(teacher_forced_logits(model, text, KVSinkCache(model, kv(bits)), A), -1)
        kl = (lp_ref.exp() * (lp_ref - lp_q)).sum(-1)
        rows.append({"bits": bits, "greedy_prefix_equal": same, "of": 64,
                     "kl_mean": float(kl.mean()), "kl_max": float(kl.max())})
        print(f"agreement bits={bits}: first {same}/64 greedy tokens equal; KL mean {kl.mean():.2e} max {kl.max():.2e}")
    res["agreement"] = rows

    # 2./3. memory and decode speed after a long prompt
    P, N = args.prompt, args.new
    ids = torch.randint(1, 49152, (1, P), generator=g).to(dev)
    speed = []
    for name, make in [] if "speed" not in args.parts else [("DynamicCache bf16", DynamicCache), ("KVSinkCache 2-bit", lambda: KVSinkCache(model, kv(2))),
                       ("KVSinkCache 4-bit", lambda: KVSinkCache(model, kv(4)))]:
        cache = make()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **{cache_kw(model): cache})
        nbytes = dynamic_cache_nbytes(cache) if isinstance(cache, DynamicCache) else cache.nbytes()
        prefill_peak = torch.cuda.max_memory_allocated() if cuda else 0
        tok = out.logits[:, -1:].argmax(-1)

        def decode(cache=cache, tok=tok):
            t = tok
            for _ in range(N):
                with torch.no_grad():
                    o = model(input_ids=t, use_cache=True, **{cache_kw(model): cache})
                t = o.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        decode()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / N * 1e3
        speed.append({"cache": name, "prompt": P, "cache_bytes": nbytes, "prefill_peak_bytes": prefill_peak,
                      "ms_per_token": ms})
        print(f"{name:20s} prompt {P}: cache {nbytes / 2**20:8.2f} MiB, prefill peak "
              f"{prefill_peak / 2**20:8.1f} MiB, decode {ms:7.2f} ms/token")
        del cache, out
        if cuda:
            torch.cuda.empty_cache()
    res["speed"] = speed

    # 4. device_map over two GPUs
    if cuda and torch.cuda.device_count() >= 2 and "device_map" in args.parts:
        m2 = smollm2_shaped().cpu()
        half = m2.config.num_hidden_layers // 2
        dmap = {"model.embed_tokens": 0, "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1}
        dmap.update({f"model.layers.{i}": 0 if i < half else 1 for i in range(m2.config.num_hidden_layers)})
        from accelerate import dispatch_model
        m2 = dispatch_model(m2, device_map=dmap)
        ids = torch.randint(1, 49152, (1, 300), generator=g).to("cuda:0")
        cache = KVSinkCache(m2, kv(4))
        out = generate(m2, ids, cache, 16)
        devices = [str(layer.device) for layer in cache.layers]
        expect = [f"cuda:{0 if i < half else 1}" for i in range(m2.config.num_hidden_layers)]
        ok = devices == expect
        res["device_map"] = {"ok": ok, "layer_devices": devices, "tokens": int(out.shape[1])}
        print(f"device_map over 2 GPUs: every layer's cache on its layer's device: {ok}; {devices[0]} .. {devices[-1]}")
    if args.out:
        tag = "_before" if os.environ.get("KVSINK_ROOT") else ""
        with open(f"{args.out}/gpu_e2e{tag}.json", "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
