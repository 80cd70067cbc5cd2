"""Random-weight Llama models with real shapes for bench/gpu_speed.py, built on the device.

Shapes, not weights, set speed and memory, so the models are random: every Linear and Embedding
weight ~ N(0, 0.02^2), drawn on the device after construction (``torch.device`` context, default
dtype bf16: no float32 copy and no slow CPU init), RMSNorm weights 1.  The draw is seeded, and
every parameter is checked finite before use.

``SHAPES`` holds the configurations; ``flops_per_sequence`` gives the prefill arithmetic that the
time-budget prediction of gpu_speed.py scales by.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["ModelShape", "SHAPES", "build_model", "weight_bytes", "kv_bytes_per_token",
           "flops_per_sequence"]


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama decoder (transformers ``LlamaConfig`` fields)."""
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float

    def config(self):
        from transformers import LlamaConfig
        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                           vocab_size=self.vocab, rope_theta=self.rope_theta,
                           max_position_embeddings=131072, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, initializer_range=0.02,
                           bos_token_id=1, eos_token_id=None, pad_token_id=0)

    def params(self) -> int:
        """Parameter count (embedding + lm_head untied)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


SHAPES = {
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 500000.0),
    "llama2-7b": ModelShape("llama2-7b", 32, 4096, 32, 32, 128, 11008, 32000, 10000.0),
    # the CPU self-test of gpu_speed.py (--tiny): 2 layers, GQA, head_dim 64 like SmolLM2
    "tiny": ModelShape("tiny", 2, 256, 4, 2, 64, 512, 1024, 10000.0),
}


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def build_model(shape: ModelShape, device, dtype=torch.bfloat16, seed: int = 0):
    """A ``LlamaForCausalLM`` of ``shape`` on ``device`` in ``dtype``, random weights, eval mode,
    SDPA attention, no EOS (generation runs to ``max_new_tokens``)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM._from_config(shape.config(), attn_implementation="sdpa", dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise RuntimeError(f"random init produced non-finite parameters: {bad[:3]}")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """Full-precision key + value bytes of one token of one sequence, all layers."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


def flops_per_sequence(shape: ModelShape, n: int) -> float:
    """Prefill FLOPs of one ``n``-token sequence: 2 * params per token (the lm_head only once,
    logits_to_keep=1) + causal attention 2 * 2 * L * Hq * D * n^2 / 2."""
    per_token = 2 * (shape.params() - shape.vocab * shape.hidden)
    return per_token * n + 2.0 * shape.layers * shape.heads * shape.head_dim * n * n
