"""Generation with the quantized cache, as ``kvsink generate`` runs it (docs/12-evaluation.md §12.4).

:func:`generate_with_kvsink` generates greedily from a prompt with a
``KVSinkCache`` (text streamed to stdout by transformers' ``TextStreamer`` when
asked) and returns a :class:`GenerationReport`: the bytes the cache holds
(``KVSinkCache.nbytes()``, docs/06-cache.md definition 6.17) next to what a
full-precision cache would hold for the same tokens, the decode speed and the
positions kept at full precision with their tokens.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import List, Tuple

import torch

from reference.config import KVSinkConfig

__all__ = ["GenerationReport", "generate_with_kvsink", "format_report"]


@dataclass
class GenerationReport:
    """What one generation did.

    text : the generated text (prompt excluded).
    prompt_tokens, new_tokens : token counts; the cache holds ``prompt_tokens + new_tokens - 1``
        tokens (the last generated token is never fed back).
    seconds : wall time of ``model.generate`` (prefill included); ``tokens_per_s = new_tokens / seconds``.
    cache_nbytes : ``cache.nbytes()`` at the end.
    full_precision_nbytes : ``2 * layers * KV heads * head_dim * itemsize * cached tokens``.
    preserved : ``(position, token text)`` of the tokens in the preserved store (full precision).
    residual : the number of most recent tokens still in the full-precision residual window.
    config : the ``KVSinkConfig`` used (predictor fields filled in).
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    cache_nbytes: int
    full_precision_nbytes: int
    preserved: List[Tuple[int, str]] = field(default_factory=list)
    residual: int = 0
    config: KVSinkConfig = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def generate_with_kvsink(model, tokenizer, prompt: str, config: KVSinkConfig, *,
                         max_new_tokens: int = 96, stream: bool = True) -> GenerationReport:
    """Greedy generation of at most ``max_new_tokens`` tokens after ``prompt`` with a fresh
    ``KVSinkCache(model, config, tokenizer=tokenizer)``; with ``stream`` the text is printed as it
    is generated (``transformers.TextStreamer``, prompt included)."""
    from transformers import TextStreamer

    from .evaluate import check_token_ids
    from .hf import KVSinkCache
    from .report import full_precision_bytes_per_token
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty; give some text, e.g. --prompt 'The history of printing'")
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.get_input_embeddings().weight.device)
    check_token_ids(model, ids)
    cache = KVSinkCache(model, config, tokenizer=tokenizer)
    # transformers >= 5.2x names the argument ``cache`` (``past_key_values`` is deprecated)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    streamer = TextStreamer(tokenizer) if stream else None
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=streamer, **{cache_kw: cache},
                             pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - t0
    seq = out[0]
    new = int(seq.shape[0] - ids.shape[1])
    cached = int(seq.shape[0]) - 1
    itemsize = next(model.parameters()).element_size()
    positions = cache.preserved_positions()[0] if cache.preserved_positions() else []
    preserved = [(int(p), tokenizer.decode([int(seq[int(p)])])) for p in positions]
    block = config.token_block
    quantized = max(0, (cached - config.residual_length) // block * block)
    return GenerationReport(
        text=tokenizer.decode(seq[ids.shape[1]:], skip_special_tokens=True),
        prompt_tokens=int(ids.shape[1]), new_tokens=new, seconds=seconds,
        cache_nbytes=int(cache.nbytes()),
        full_precision_nbytes=int(full_precision_bytes_per_token(model.config, itemsize) * cached),
        preserved=preserved, residual=cached - quantized, config=cache.config)


def format_report(rep: GenerationReport) -> str:
    """The lines ``kvsink generate`` prints after the text."""
    cached = rep.prompt_tokens + rep.new_tokens - 1
    c = rep.config
    lines = [
        f"KV cache: {rep.cache_nbytes:,} bytes for {cached} tokens at {c.key_bits}-bit keys/values, "
        f"{rep.cache_nbytes / max(rep.full_precision_nbytes, 1):.3f} of the {rep.full_precision_nbytes:,} "
        f"a full-precision cache holds; the last {rep.residual} tokens are still in the "
        f"full-precision residual window (residual length {c.residual_length}, blocks of "
        f"{c.token_block})",
        f"speed: {rep.new_tokens} new tokens in {rep.seconds:.2f} s = {rep.tokens_per_s:.1f} tokens/s "
        f"(prompt {rep.prompt_tokens} tokens, prefill included)",
        f"kept at full precision by KVSink (layer {c.predictor_layer}, channels "
        f"{list(c.predictor_channels)}, threshold {c.predictor_threshold:.4g}): "
        f"{len(rep.preserved)} positions",
    ]
    lines += [f"  position {p:5d}  token {tok!r}" for p, tok in rep.preserved]
    return "\n".join(lines)
