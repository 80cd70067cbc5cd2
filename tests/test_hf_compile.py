"""The compileable KVSinkCache (``max_cache_len``) inside ``torch.compile`` (docs/11-transformers.md
§11.11): ``generate`` auto-compiles its decode forward and produces the tokens, preserved sets and
stored bytes of the eager cache; one compilation serves later caches and steps; the bound and the
construction errors.  CPU: dynamo with the eager backend (the graphs dynamo builds are what is
checked; inductor's CUDA graphs run on the device: bench/gpu_speed.py ``kvsink2-static``), and one
inductor run."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import needs_hf

pytestmark = needs_hf

VOCAB, PROMPT, NEW = 96, 21, 24


def _model(family: str = "llama", layers: int = 4):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                                   layer_types=["sliding_attention", "full_attention"] * 2))
    model.generation_config.eos_token_id = None
    return model.eval()


def _config(preserve: str):
    from reference.config import KVSinkConfig
    extra = {} if preserve == "pfn" else dict(predictor_layer=1, predictor_channels=(0,),
                                              predictor_threshold=0.5)
    return KVSinkConfig(key_bits=4, value_bits=4, key_group_size=8, value_group_size=8,
                        residual_length=8, preserve=preserve, **extra)


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                       # left padding: validity comes from the 2-D mask
    return ids, mask


def _generate(model, cache, backend=None):
    from transformers import CompileConfig
    ids, mask = _inputs()
    kw = {"disable_compile": True}
    if backend is not None:
        cfg = CompileConfig(backend=backend)
        cfg._compile_all_devices = True   # generate auto-compiles on CUDA only otherwise
        kw = {"compile_config": cfg}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, **kw)


def _graph_count() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.slow
@pytest.mark.parametrize("preserve", ["pfn", "kvsink"])
def test_compiled_generate_equals_eager(preserve):
    """Tokens, preserved set, validity and bytes held: the compiled decode equals the eager one; a
    second cache reuses the compiled graphs (no new graph is traced)."""
    from accelerated.hf import KVSinkCache
    torch._dynamo.reset()
    model = _model()
    eager_cache = KVSinkCache(model, _config(preserve))
    ref = _generate(model, eager_cache)
    compiled = KVSinkCache(model, _config(preserve), max_cache_len=PROMPT + NEW)
    assert compiled.is_compileable and not eager_cache.is_compileable
    before = _graph_count()
    out = _generate(model, compiled, backend="eager")
    assert _graph_count() > before, "generate did not compile the decode forward"
    assert torch.equal(out, ref)
    assert torch.equal(compiled.preserved_mask, eager_cache.preserved_mask)
    assert torch.equal(compiled.valid_mask, eager_cache.valid_mask)
    assert compiled.nbytes() == eager_cache.nbytes()
    assert [l.get_seq_length() for l in compiled.layers] == [PROMPT + NEW - 1] * 4
    traced = _graph_count()
    again = KVSinkCache(model, _config(preserve), max_cache_len=PROMPT + NEW)
    assert torch.equal(_generate(model, again, backend="eager"), ref)
    assert _graph_count() == traced, "a new cache of the same shapes recompiled"


@pytest.mark.slow
def test_compiled_generate_inductor():
    """Inductor (graph partitions around the kvsink operators) gives the eager tokens."""
    from accelerated.hf import KVSinkCache
    torch._dynamo.reset()
    model = _model()
    ref = _generate(model, KVSinkCache(model, _config("kvsink")))
    out = _generate(model, KVSinkCache(model, _config("kvsink"), max_cache_len=64), backend="inductor")
    assert torch.equal(out, ref)


def test_max_cache_len_bound_and_errors():
    from accelerated.hf import KVSinkCache
    model = _model()
    cache = KVSinkCache(model, _config("pfn"), max_cache_len=PROMPT + 3)
    assert cache.layers[0].get_mask_sizes(1) == (PROMPT + 3, 0)
    assert cache.get_max_length() == PROMPT + 3
    with pytest.raises(ValueError, match=r"max_cache_len=24\) holds 24 tokens and cannot take 1 more"):
        _generate(model, cache)
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
            KVSinkCache(model, _config("pfn"), max_cache_len=bad)
    with pytest.raises(ValueError, match="sliding-window layers"):
        KVSinkCache(_model("gemma3"), _config("pfn"), max_cache_len=64)


def test_length_tensor_follows_crop():
    """The compileable layer's device-side length (what traced code reads) follows update and crop."""
    from accelerated.hf import KVSinkCache
    model = _model()
    cache = KVSinkCache(model, _config("pfn"), max_cache_len=64)
    _generate(model, cache)
    layer = cache.layers[0]
    assert int(layer.length_tensor) == layer.get_seq_length() == PROMPT + NEW - 1
    cache.crop(-5)
    assert int(layer.length_tensor) == layer.get_seq_length() == PROMPT + NEW - 6


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_user_compiled_forward_with_the_growing_cache(family):
    """``torch.compile(model.forward)`` with the growing cache: the same operators, and on Gemma-3 the
    sliding-window layers stay transformers' (SDPA with their mask): the eager tokens."""
    from accelerated.hf import KVSinkCache
    torch._dynamo.reset()
    model = _model(family)
    ref = _generate(model, KVSinkCache(model, _config("pfn")))
    model.forward = torch.compile(model.forward, backend="eager")
    before = _graph_count()
    out = _generate(model, KVSinkCache(model, _config("pfn")))
    assert _graph_count() > before, "the forward was not traced"
    assert torch.equal(out, ref)
