"""Tests of accelerated/hf/registration.py (docs/11-transformers.md §11.9): transformers has no
registration point for a custom cache implementation, and the supported route — a ``KVSinkCache``
passed to ``generate`` and to a ``pipeline`` through ``generate_kwargs`` — works on a tiny
random Llama (2 layers, byte-level tokenizer)."""

from __future__ import annotations

import pytest
import torch

from accelerated.hf import registration as HR
from accelerated.hf import KVSinkCache
from reference.config import KVSinkConfig

CACHE_CONFIG = {"key_bits": 2, "value_bits": 2, "key_group_size": 8, "value_group_size": 8,
                "residual_length": 8, "preserve": "pfn", "preserve_first_n": 2}
NEW = 12


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0])


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, pad_token_id=0)).eval()
    model.generation_config.eos_token_id = None          # always NEW tokens
    return model, _byte_tokenizer()


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, **kw)


def test_transformers_has_no_cache_registration_point(tiny):
    """If this fails, transformers gained a registration point: use it (docs/11 §11.9)."""
    from transformers.generation import configuration_utils as CU
    model, tok = tiny
    assert HR.REGISTRATION_POINT is None and HR.registered("kvsink") is False
    assert "quantized" in CU.ALL_CACHE_IMPLEMENTATIONS and "kvsink" not in CU.ALL_CACHE_IMPLEMENTATIONS
    ids = tok("The cat", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="Invalid `cache_implementation`"):
        _generate(model, ids, cache_implementation="kvsink", cache_config=CACHE_CONFIG)


def test_generate_with_the_cache_from_a_cache_config(tiny):
    model, tok = tiny
    ids = tok("The history of printing", return_tensors="pt").input_ids
    kwargs = HR.kvsink_generate_kwargs(model, CACHE_CONFIG)
    (name, cache), = kwargs.items()
    assert name == HR.cache_argument_name(model) and isinstance(cache, KVSinkCache)
    assert cache.config == KVSinkConfig(**CACHE_CONFIG)
    out = _generate(model, ids, **kwargs)
    direct = KVSinkCache(model, KVSinkConfig(**CACHE_CONFIG))
    assert torch.equal(out, _generate(model, ids, **{name: direct}))
    # the cache was used: it holds the prompt and the generated tokens, quantized
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1
    assert cache.preserved_positions() == [[0, 1]]
    from transformers import DynamicCache
    fp = DynamicCache()
    _generate(model, ids, **{name: fp})
    assert cache.nbytes() < sum(l.keys.numel() + l.values.numel() for l in fp.layers) * 4


def test_cache_config_checks(tiny):
    model, _ = tiny
    with pytest.raises(TypeError, match=r"\['nbits'\] that are not KVSinkConfig fields"):
        HR.kvsink_cache(model, {"nbits": 2})
    with pytest.raises(TypeError, match="cache_config must be"):
        HR.kvsink_cache(model, [("key_bits", 2)])
    assert HR.kvsink_cache(model, KVSinkConfig(**CACHE_CONFIG)).config.key_bits == 2
    # default preserve="kvsink": a random model has no outlier channel to calibrate
    with pytest.raises(ValueError):
        HR.kvsink_cache(model, {"key_bits": 4}, calibration_ids=torch.arange(64) % 256)


def test_pipeline_with_the_cache_as_a_generate_keyword(tiny):
    """transformers 5.25's text-generation pipeline passes its call's extra keywords to
    ``generate`` (a ``generate_kwargs={...}`` dict is passed on as one unknown keyword and
    refused by ``generate``), so the cache goes in as ``pipe(text, cache=...)``."""
    from transformers import pipeline
    model, tok = tiny
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    prompt = "Once upon a time"
    kwargs = HR.kvsink_generate_kwargs(model, CACHE_CONFIG)
    got = pipe(prompt, max_new_tokens=NEW, do_sample=False, return_full_text=False,
               **kwargs)[0]["generated_text"]
    ids = tok(prompt, return_tensors="pt").input_ids
    (cache,) = kwargs.values()
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1      # this very cache was filled
    direct = _generate(model, ids, **HR.kvsink_generate_kwargs(model, CACHE_CONFIG))
    assert got == tok.decode(direct[0, ids.shape[1]:])
