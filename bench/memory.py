"""KV-cache memory after a long prefill: KVSinkCache vs transformers' DynamicCache.

    python bench/memory.py                      # SmolLM2-135M, 4096-token prefill, 2/4/8 bits
    python bench/memory.py --tokens 1024 --bits 2 4

For each bit width one forward pass of ``--tokens`` tokens (WikiText-2 test
split if present at ../shared/data/wikitext-2-raw/wiki.test.raw, else the
packaged default corpus, repeated as needed) runs through a fresh
``KVSinkCache`` (keys per channel and values per token in groups of 32, residual
128, preserve="kvsink" calibrated once on the default text); after the
forward (the prefill step's flush has run) the table reports

* ``nbytes``    — ``cache.nbytes()``, the bytes held by docs/06-cache.md's count
                  (packed codes + float32 scales/zeros + coded flags + preserved
                  store + residual window);
* ``allocated`` — the bytes of the buffers actually allocated by the streaming
                  layers (spare capacity included, ``allocated_bytes()``);
* ``dynamic``   — key + value tensor bytes of a ``DynamicCache`` after the same
                  prefill, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerated.hf import KVSinkCache, dynamic_cache_nbytes  # noqa: E402
from accelerated.models import load_model  # noqa: E402
from reference.config import KVSinkConfig  # noqa: E402

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "accelerated" / "data" / "default_corpus.txt"


def prefill_ids(tokenizer, n: int) -> torch.Tensor:
    path = WIKITEXT if WIKITEXT.exists() else DEFAULT_TEXT
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    while ids.numel() < n:
        ids = torch.cat([ids, ids])
    return ids[:n][None], path.name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model name (default: SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--preserve", default="kvsink")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, device=args.device)
    ids, source = prefill_ids(tok, args.tokens)
    ids = ids.to(args.device)
    kw = "cache" if "cache" in __import__("inspect").signature(type(model).forward).parameters \
        else "past_key_values"
    from transformers import DynamicCache
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **{kw: dyn}, use_cache=True)
    fp = dynamic_cache_nbytes(dyn)
    del dyn
    config = None
    rows = []
    for bits in args.bits:
        cfg = KVSinkConfig(key_bits=bits, value_bits=bits, preserve=args.preserve)
        if config is not None:
            cfg = cfg.replace(predictor_layer=config.predictor_layer,
                              predictor_channels=config.predictor_channels,
                              predictor_threshold=config.predictor_threshold)
        cache = KVSinkCache(model, cfg, tokenizer=tok)
        config = cache.config
        with torch.no_grad():
            model(input_ids=ids, **{kw: cache}, use_cache=True)
        stores = [l.store for l in cache.layers if getattr(l, "store", None) is not None]
        allocated = sum(s.allocated_bytes() for s in stores)
        preserved = len(cache.preserved_positions()[0])
        rows.append((bits, cache.nbytes(), allocated, preserved))
        del cache
    print(f"model={type(model).__name__} layers={model.config.num_hidden_layers} "
          f"kv_heads={model.config.num_key_value_heads} head_dim={getattr(model.config, 'head_dim', None)} "
          f"dtype={model.dtype} device={args.device} prefill={args.tokens} tokens of {source}")
    print(f"config: group 32 (keys per channel, values per token), residual {config.residual_length}, "
          f"preserve={'+'.join(config.preserve) or 'none'} (predictor layer {config.predictor_layer}, "
          f"channels {config.predictor_channels}, threshold {config.predictor_threshold:.4g})"
          if config.predictor_layer is not None else
          f"config: group 32, residual {config.residual_length}, preserve={config.preserve}")
    print(f"{'bits':>4} | {'nbytes':>12} | {'allocated':>12} | {'DynamicCache':>12} | "
          f"{'nbytes/dyn':>10} | {'alloc/dyn':>9} | preserved")
    for bits, nb, al, pres in rows:
        print(f"{bits:>4} | {nb:>12,} | {al:>12,} | {fp:>12,} | {nb / fp:>10.4f} | {al / fp:>9.4f} | {pres}")


if __name__ == "__main__":
    main()
