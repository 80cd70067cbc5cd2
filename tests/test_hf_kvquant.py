"""Tests of KVSinkCache with quantizer="kvquant" (docs/08-kvquant.md §8.14, docs/11-transformers.md).

Tiny random Llama (tests/test_hf.py's ``_tiny``): residual 8, blocks of 8, so most of the
cache is quantized while generating 16 tokens.  At 8 bits the nf grid's largest step is
~1/64 of a group's half-range (nf_levels(8)) and k-means with 256 levels per channel is
finer still: far below the tiny model's greedy margins, so greedy outputs must equal full
precision (the same argument as tests/test_hf.py's 8-bit uniform tests).

The ``model``-marked test loads SmolLM2-135M.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from accelerated import kvquant as KQ  # noqa: E402
from accelerated.calibration import calibrate_kvquant_model  # noqa: E402
from accelerated.hf import KVSinkCache, KVSinkLayer, dynamic_cache_nbytes  # noqa: E402
from reference.config import KVSinkConfig  # noqa: E402
from tests.test_hf import (NEW, PROMPT, VOCAB, WIKITEXT, _left_pad, _tiny,  # noqa: E402
                           forward, fp_generate, generate, prompt)


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama")


def kvq_config(bits, preserve="pfn", **kw):
    base = dict(quantizer="kvquant", key_bits=bits, value_bits=bits, key_group_size=8,
                value_group_size=8, residual_length=8, preserve=preserve)
    base.update(kw)
    return KVSinkConfig(**base)


def calib_ids(n=512, seed=99):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- greedy equality

def test_nf_8bit_without_calibration_equals_full_precision(llama):
    ids = prompt()
    ref = fp_generate(llama, ids)
    cache = KVSinkCache(llama, kvq_config(8, outlier_fraction=0.0))     # nf, p = 0: no data needed
    out = generate(llama, ids, cache)
    assert out[0].tolist() == ref[0].tolist()
    layers = [l for l in cache.layers if isinstance(l, KVSinkLayer)]
    assert all(l.store.kvquant and l.store.num_quantized >= 24 for l in layers)
    # the model's own rotary frequencies un-rotate the keys
    torch.testing.assert_close(layers[0].store.rope_inv_freq, KQ.model_inv_freq(llama), rtol=0, atol=0)


def test_kmeans_8bit_with_calibration_equals_full_precision(llama):
    ids = prompt(seed=2)
    ref = fp_generate(llama, ids)
    cfg = kvq_config(8, kvquant_datatype="kmeans", outlier_fraction=0.01)
    cache = KVSinkCache(llama, cfg, calibration_ids=calib_ids())      # calibrated at construction
    out = generate(llama, ids, cache)
    assert out[0].tolist() == ref[0].tolist()
    cals = [l.store.kvquant_calibration for l in cache.layers]
    assert all(c.datatype == "kmeans" and tuple(c.key_levels.shape) == (2, 16, 256) for c in cals)
    # per layer, the calibration is the one calibrate_kvquant_model computes on the same ids
    _, expected = calibrate_kvquant_model(llama, cfg, calib_ids())
    for got, exp in zip(cals, expected):
        torch.testing.assert_close(got.key_levels.cpu(), exp.key_levels.cpu(), rtol=0, atol=0)
        torch.testing.assert_close(got.key_upper.cpu(), exp.key_upper.cpu(), rtol=0, atol=0)
    # and passing them explicitly gives the same output
    again = generate(llama, ids, KVSinkCache(llama, cfg, kvquant_calibration=expected))
    assert again.tolist() == out.tolist()


def test_calibration_excludes_the_preserved_tokens(llama):
    """The key thresholds ignore the excluded (PFN) token: with a huge first token the thresholds
    with preserve='pfn' equal those computed without that token at all."""
    ids = calib_ids(n=64, seed=5)
    cfg = kvq_config(4, outlier_fraction=0.05)
    _, with_pfn = calibrate_kvquant_model(llama, cfg, ids)
    _, none = calibrate_kvquant_model(llama, cfg.replace(preserve="none"), ids)
    keys = []
    hooks = [m.self_attn.k_proj.register_forward_hook(lambda mod, i, o: keys.append(o))
             for m in llama.model.layers]
    with torch.no_grad():
        llama(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    k0 = keys[0].reshape(1, 64, 2, 16).transpose(1, 2)
    excl = torch.zeros(1, 64, dtype=torch.bool)
    excl[0, 0] = True
    lo, hi = KQ.key_outlier_thresholds(k0, 0.05, exclude=excl)
    torch.testing.assert_close(with_pfn[0].key_lower.cpu(), lo, rtol=0, atol=0)
    torch.testing.assert_close(with_pfn[0].key_upper.cpu(), hi, rtol=0, atol=0)
    lo_all, _ = KQ.key_outlier_thresholds(k0, 0.05)
    torch.testing.assert_close(none[0].key_lower.cpu(), lo_all, rtol=0, atol=0)


# ---------------------------------------------------------------------------- Fisher switch

def test_kvquant_fisher_switch_passes_through_and_changes_the_kmeans(llama):
    """KVSinkCache(kvquant_fisher=True) fits the k-means with fisher_weights of the calibration ids:
    its calibrations equal calibrate_kvquant_layers with those weights computed directly, and differ
    from the plain (unweighted) k-means of kvquant_fisher=False.  The squared gradients of a model
    vary by orders of magnitude across tokens and channels, so weighting moves the centroids; at 2
    bits (4 levels per channel) that must show in the levels."""
    ids = calib_ids(n=96, seed=8)
    cfg = kvq_config(2, kvquant_datatype="kmeans", outlier_fraction=0.01)
    weighted = [l.kvquant_calibration
                for l in KVSinkCache(llama, cfg, calibration_ids=ids, kvquant_fisher=True).layers]
    plain = [l.kvquant_calibration for l in KVSinkCache(llama, cfg, calibration_ids=ids).layers]
    # the same thing computed by hand: pre-RoPE keys / values at k_proj / v_proj, PFN token excluded
    keys, values = [], []
    hooks = []
    for m in llama.model.layers:
        hooks.append(m.self_attn.k_proj.register_forward_hook(
            lambda mod, i, o: keys.append(o.detach().reshape(1, 96, 2, 16).transpose(1, 2))))
        hooks.append(m.self_attn.v_proj.register_forward_hook(
            lambda mod, i, o: values.append(o.detach().reshape(1, 96, 2, 16).transpose(1, 2))))
    with torch.no_grad():
        llama(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    excl = torch.zeros(1, 96, dtype=torch.bool)
    excl[0, 0] = True
    direct = KQ.calibrate_kvquant_layers(keys, values, cfg, exclude=excl,
                                         fisher=KQ.fisher_weights(llama, ids))
    differs = 0.0
    for w, d, p in zip(weighted, direct, plain):
        torch.testing.assert_close(w.key_levels.cpu(), d.key_levels.cpu(), rtol=0, atol=0)
        torch.testing.assert_close(w.value_levels.cpu(), d.value_levels.cpu(), rtol=0, atol=0)
        # Fisher weights change the levels, not the outlier thresholds
        torch.testing.assert_close(w.key_upper.cpu(), p.key_upper.cpu(), rtol=0, atol=0)
        differs = max(differs, float((w.key_levels - p.key_levels).abs().max()),
                      float((w.value_levels - p.value_levels).abs().max()))
    assert differs > 0.1           # levels live in [-1, 1]; measured 1.16


def test_kvquant_fisher_switch_validation(llama):
    kmeans = kvq_config(4, kvquant_datatype="kmeans")
    with pytest.raises(TypeError, match="kvquant_fisher must be True or False"):
        KVSinkCache(llama, kmeans, calibration_ids=calib_ids(64), kvquant_fisher=1)
    with pytest.raises(ValueError, match="kvquant_fisher=True has no effect with kvquant_datatype='nf'"):
        KVSinkCache(llama, kvq_config(4), calibration_ids=calib_ids(64), kvquant_fisher=True)
    with pytest.raises(ValueError, match="quantizer='uniform'"):
        KVSinkCache(llama, KVSinkConfig(preserve="pfn"), kvquant_fisher=True)
    _, cals = calibrate_kvquant_model(llama, kmeans, calib_ids(64))
    with pytest.raises(ValueError, match="kvquant_calibration=... was given"):
        KVSinkCache(llama, kmeans, kvquant_calibration=cals, kvquant_fisher=True)
    # calibrate_kvquant_model checks its own switch the same way, and refuses the oracle
    with pytest.raises(ValueError, match="fisher=True has no effect"):
        calibrate_kvquant_model(llama, kvq_config(4), calib_ids(64), fisher=True)
    with pytest.raises(TypeError, match="fisher must be True or False"):
        calibrate_kvquant_model(llama, kmeans, calib_ids(64), fisher="yes")
    with pytest.raises(ValueError, match="oracle"):
        calibrate_kvquant_model(llama, kvq_config(4, preserve="pfn+oracle"), calib_ids(64))


# ---------------------------------------------------------------------------- left padding, rotary positions

def test_left_padded_batch_passes_each_rows_rotary_positions(llama):
    a, b = prompt(seed=11, n=PROMPT), prompt(seed=12, n=PROMPT - 7)
    ids, mask = _left_pad([a, b])
    cfg = kvq_config(8, outlier_fraction=0.0)
    cache = KVSinkCache(llama, cfg)
    out = generate(llama, ids, cache, mask)
    total = ids.shape[1] + NEW - 1
    for layer in cache.layers:
        st = layer.store
        rope = torch.cat([blk.rope_positions.long() for blk in st.blocks] + [st.residual_rope_positions.long()],
                         dim=1).cpu()
        assert rope.shape == (2, total)
        for row in range(2):
            pad = int((mask[row] == 0).sum())
            # real tokens: 0, 1, 2, ... from the row's first real token (transformers' position_ids
            # from the attention mask), not the slot positions; padding stored as 0
            assert rope[row, pad:].tolist() == list(range(total - pad))
            assert rope[row, :pad].tolist() == [0] * pad
    for row, seq in enumerate((a, b)):
        alone = generate(llama, seq, KVSinkCache(llama, cfg))
        assert out[row, -NEW:].tolist() == alone[0, -NEW:].tolist()


def test_explicit_position_ids_reach_the_store(llama):
    """A forward with position_ids: those (not the slots) are the keys' rotary positions."""
    ids = prompt(seed=4, n=20)
    cache = KVSinkCache(llama, kvq_config(4, outlier_fraction=0.0))
    pos = torch.arange(100, 120)[None]
    forward(llama, ids, cache, position_ids=pos)
    st = cache.layers[1].store
    rope = torch.cat([blk.rope_positions.long() for blk in st.blocks] + [st.residual_rope_positions.long()],
                     dim=1).cpu()
    assert rope[0].tolist() == list(range(100, 120))
    # the next step continues from the given positions, whatever the slots
    forward(llama, ids[:, :1], cache, position_ids=torch.tensor([[120]]))
    assert cache.layers[1].store.residual_rope_positions[0, -1].item() == 120


# ---------------------------------------------------------------------------- construction

def test_kvquant_construction_errors(llama):
    with pytest.raises(ValueError, match="kvquant"):             # needs data, none given
        KVSinkCache(llama, kvq_config(4))
    with pytest.raises(TypeError, match="one KVQuantCalibration per decoder layer"):
        KVSinkCache(llama, kvq_config(4), kvquant_calibration=KQ.nf_calibration(kvq_config(4, outlier_fraction=0.0), 2, 16))
    with pytest.raises(ValueError, match="4 decoder layers"):
        KVSinkCache(llama, kvq_config(4, outlier_fraction=0.0),
                    kvquant_calibration=[KQ.nf_calibration(kvq_config(4, outlier_fraction=0.0), 2, 16)])
    wrong = KQ.nf_calibration(kvq_config(4, outlier_fraction=0.0), 3, 16)
    with pytest.raises(ValueError, match=r"kvquant_calibration\[0\]"):
        KVSinkCache(llama, kvq_config(4, outlier_fraction=0.0), kvquant_calibration=[wrong] * 4)
    with pytest.raises(ValueError, match="rotary"):               # Gemma-3: one inv_freq per layer type
        KVSinkCache(_tiny("gemma3"), kvq_config(4, outlier_fraction=0.0))
    with pytest.raises(ValueError, match="only used by quantizer='kvquant'"):
        KVSinkCache(llama, KVSinkConfig(preserve="pfn"),
                    kvquant_calibration=[KQ.nf_calibration(kvq_config(4, outlier_fraction=0.0), 2, 16)] * 4)


# ---------------------------------------------------------------------------- bytes

def test_nbytes_below_dynamic_cache_at_2_bits(llama):
    ids = torch.randint(1, VOCAB, (1, 512), generator=torch.Generator().manual_seed(4))
    cfg = KVSinkConfig(quantizer="kvquant", key_bits=2, value_bits=2, preserve="pfn",
                       outlier_fraction=0.0)                       # R = 128, blocks of 32
    cache = KVSinkCache(llama, cfg)
    forward(llama, ids, cache)
    per_layer = cache.layer_nbytes()
    assert cache.nbytes() == sum(per_layer) == sum(l.store.nbytes() for l in cache.layers)
    assert all(l.store.num_quantized == 384 for l in cache.layers)
    dyn = DynamicCache(config=llama.config)
    forward(llama, ids, dyn)
    fp = dynamic_cache_nbytes(dyn)
    assert 0 < cache.nbytes() < fp
    # 384 of 512 slots are coded at 2 bits (+ statistics): well under half of float32
    assert cache.nbytes() < 0.5 * fp


# ---------------------------------------------------------------------------- SmolLM2-135M

#: Bound on the mean KL(fp || cache) per generated token (nats): the 4-bit *uniform* bound of
#: tests/test_hf.py / docs/11 §11.7 (about 4x the largest uniform 4-bit mean measured there);
#: KVQuant-style 4-bit (nf grid, 1% outliers, pre-RoPE per-channel keys) + kvsink must do at
#: least as well.  Measured on this prompt: see docs/08-kvquant.md §8.14.
KL_BOUND_4BIT = 0.005
SMOL_PROMPT = 160
SMOL_NEW = 16


@pytest.mark.model
def test_smollm2_kvquant_4bit_kvsink_kl_is_bounded():
    """Mean KL(fp || cache) per step over a fixed 16 greedy steps of the full-precision model,
    with 4-bit KVQuant-style (nf, 1% outliers) + kvsink teacher-forced along that continuation:
    like with like, whatever either model's own greedy path does.  (The prompt is the first
    SMOL_PROMPT tokens of the text *or fewer*: the text has 157 tokens, so every index counts
    from ``ids.shape[1]``; slicing the continuation at SMOL_PROMPT once gave 13 teacher-forced
    steps against 16, which looked like an early end-of-sequence but was not one.)"""
    from accelerated.models import load_model
    from tests.test_hf import _smol_texts
    model, tok = load_model()
    ids = tok(_smol_texts()[0], return_tensors="pt")["input_ids"][:, :SMOL_PROMPT]
    n = ids.shape[1]
    ref, fp_logits = _generate_with_logits(model, ids, DynamicCache(config=model.config))
    assert ref.shape[1] == n + SMOL_NEW and fp_logits.shape[0] == SMOL_NEW
    cfg = KVSinkConfig(quantizer="kvquant", key_bits=4, value_bits=4, key_group_size=32,
                       value_group_size=64, residual_length=32, preserve="kvsink",
                       outlier_fraction=0.01, kvquant_datatype="nf")
    calibrated = KVSinkCache(model, cfg, tokenizer=tok)  # predictor + key thresholds, default text
    assert calibrated.config.predictor_layer == 3 and calibrated.config.predictor_channels == (507,)
    cals = [layer.kvquant_calibration for layer in calibrated.layers]
    logits, cache = _teacher_forced_logits(model, ref, n, calibrated.config, cals)
    # n + 15 slots (157 + 15 = 172), minus R = 32 pending: 4 flushed blocks of 32 tokens
    assert cache.layers[0].store.num_quantized == (n + SMOL_NEW - 1 - 32) // 32 * 32
    assert cache.preserved_positions()[0][0] == 0
    p, q = fp_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    agree = int((logits.argmax(-1) == fp_logits.argmax(-1)).sum())
    eos = [int(i) for i in torch.nonzero(logits.argmax(-1) == tok.eos_token_id).ravel()]
    print(f"\nSmolLM2 kvquant nf 4-bit + kvsink: mean KL {float(kl.mean()):.5f} nats, "
          f"max {float(kl.max()):.5f}, greedy argmax equal to fp at {agree}/{SMOL_NEW} steps, "
          f"end-of-sequence argmax at steps {eos}, wikitext={WIKITEXT.exists()}")
    assert kl.shape == (SMOL_NEW,)
    assert float(kl.mean()) < KL_BOUND_4BIT


def _generate_with_logits(model, ids, cache):
    """Greedy ``SMOL_NEW`` tokens, exactly (no early stop at end-of-sequence): (sequences, float32
    raw logits (SMOL_NEW, V) of each step)."""
    from tests.test_hf import _cache_kw
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=SMOL_NEW,
                             min_new_tokens=SMOL_NEW, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True,
                             **{_cache_kw(model): cache})
    return out.sequences, torch.cat(out.logits).float()


def _teacher_forced_logits(model, ref, n, config, cals):
    """The cache's logits along ``ref[:, n:]``: the prompt as one prefill, then the reference
    tokens one forward each (the steps of generate); returns ``(logits, cache)``."""
    cache = KVSinkCache(model, config, kvquant_calibration=cals)
    logits = [forward(model, ref[:, :n], cache).logits[0, -1:]]
    for t in range(n, ref.shape[1] - 1):
        logits.append(forward(model, ref[:, t:t + 1], cache).logits[0, -1:])
    return torch.cat(logits).float(), cache
