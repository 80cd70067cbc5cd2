"""Tests of accelerated/evaluate.py and accelerated/cli.py (docs/12-evaluation.md).

The model of most tests is a tiny Llama (2 layers, hidden 64, 4 query / 2 KV
heads, head_dim 16) over a byte-level tokenizer (256 tokens), trained for 150
seeded AdamW steps on the packaged default corpus (~3 s on 2 CPU cores).  A
*random* model is not enough: its predictions are unrelated to the text, so
quantization noise (which flattens them) can *lower* its perplexity; after
the short training 2-bit noise costs it a few percent of perplexity.

Marked ``model``: SmolLM2-135M-Instruct (embedded wheel).
"""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch

from accelerated import evaluate as E
from reference.config import KVSinkConfig
from tests.conftest import needs_hf

SEQ = 128          # window length of the tiny-model tests
WINDOWS = 2


# =========================================================================== fixtures

def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, ids of the default corpus, saved folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = _byte_tokenizer()
    text = E.default_corpus_path().read_text(encoding="utf-8")
    ids = E.tokenize_corpus(text, tokenizer, wikitext_rows=False)      # as the CLI reads --data
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=1024, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    # train on the tokens after the evaluated windows; one thread: far faster for
    # this tiny model when the CPU is shared
    train = ids[0, WINDOWS * SEQ:]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(150):
            starts = torch.randint(0, train.numel() - SEQ - 1, (16,), generator=gen)
            batch = torch.stack([train[s:s + SEQ] for s in starts])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, ids, folder


@pytest.fixture(scope="module")
def fp(tiny):
    model, _, ids, _ = tiny
    return E.perplexity_full_precision(model, ids, seq_len=SEQ, max_windows=WINDOWS)


def _fake(tiny, **cfg):
    model, _, ids, _ = tiny
    return E.perplexity_fake_quant(model, ids, KVSinkConfig(**cfg), seq_len=SEQ, max_windows=WINDOWS)


needs_cache = needs_hf


# =========================================================================== corpus and windows

def test_corpus_default_is_pydoc_topics_and_named(monkeypatch):
    from pydoc_data import topics
    monkeypatch.delenv("KVSINK_WIKITEXT", raising=False)
    text, name = E.load_corpus()
    assert name == E.DEFAULT_CORPUS_NAME and "pydoc_data.topics" in name
    # every topic page, in sorted key order, and nothing else
    for key in (min(topics.topics), max(topics.topics)):
        assert topics.topics[key].strip("\n") in text
    assert text.index(topics.topics[min(topics.topics)].strip("\n")) == 0
    assert len(text) > 300_000          # ~465k characters on CPython 3.11-3.13
    # the packaged essay (the calibration text) is named as such when evaluated
    assert E.load_corpus(E.default_corpus_path())[1] == "kvsink default corpus (accelerated/data/default_corpus.txt)"


def test_corpus_explicit_or_env_path(monkeypatch, tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(" = Title = \n\n Some text .\n", encoding="utf-8")
    text, name = E.load_corpus(f)
    assert text.startswith(" = Title") and name.startswith("wikitext-2 test") and str(f) in name
    monkeypatch.setenv("KVSINK_WIKITEXT", str(f))
    assert E.load_corpus()[1] == name
    other = tmp_path / "notes.txt"
    other.write_text("hello\n", encoding="utf-8")
    assert E.load_corpus(other)[1] == str(other)


def test_corpus_missing_explicit_path_is_an_error(monkeypatch, tmp_path):
    # an explicit path is never silently replaced by the default corpus
    with pytest.raises(FileNotFoundError, match="does not exist"):
        E.load_corpus(tmp_path / "nope.raw")
    monkeypatch.setenv("KVSINK_WIKITEXT", str(tmp_path / "nope.raw"))
    with pytest.raises(FileNotFoundError, match="KVSINK_WIKITEXT"):
        E.load_corpus()


def test_corpus_documents_and_join():
    raw = " = A = \n\n text one .\n \n"
    rows = E.corpus_documents(raw)
    assert rows == [" = A = \n", "", " text one .\n", ""]
    tok = _byte_tokenizer()
    ids = E.tokenize_corpus(raw, tok)
    assert ids.shape[0] == 1 and ids.dtype == torch.long
    assert tok.decode(ids[0].tolist()) == "\n\n".join(rows)


def test_make_windows():
    ids = torch.arange(10)
    w = E.make_windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]        # trailing partial dropped
    assert E.make_windows(ids[None], 3, 2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="seq_len"):
        E.make_windows(ids, 1)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        E.make_windows(ids, 11)
    with pytest.raises(ValueError, match="max_windows"):
        E.make_windows(ids, 3, 0)
    with pytest.raises(ValueError, match="shape"):
        E.make_windows(torch.zeros(2, 5, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="integer"):
        E.make_windows(torch.zeros(10), 3)


# =========================================================================== fake quantization

def test_fake_quantize_kv_matches_reference_and_keeps_preserved():
    RQ = importlib.import_module("reference.quantize")   # the package re-exports a function `quantize`
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 37, 16, generator=g) * 3
    v = torch.randn(1, 2, 37, 16, generator=g)
    k[:, :, 0] += 40.0                           # an outlier token, as a sink has
    preserved = torch.zeros(1, 37, dtype=torch.bool)
    preserved[0, [0, 5]] = True
    cfg = KVSinkConfig(key_bits=2, value_bits=3, key_group_size=8, value_group_size=8)
    kh, vh = E.fake_quantize_kv(k, v, cfg, preserved)
    excl = np.broadcast_to(preserved.numpy()[:, None, :], (1, 2, 37))
    ref_k = RQ.dequantize(RQ.quantize(k.numpy(), 2, 8, "channel", exclude=excl))
    ref_v = RQ.dequantize(RQ.quantize(v.numpy(), 3, 8, "token", exclude=excl))
    keep = preserved[0].numpy()
    np.testing.assert_array_equal(kh.numpy()[:, :, ~keep], ref_k[:, :, ~keep])
    np.testing.assert_array_equal(vh.numpy()[:, :, ~keep], ref_v[:, :, ~keep])
    assert torch.equal(kh[:, :, keep], k[:, :, keep]) and torch.equal(vh[:, :, keep], v[:, :, keep])
    # the preserved outlier is excluded from its group's statistics: the group of
    # tokens 0..7 of each channel has a small range, so its error is small
    err = (kh - k)[:, :, 1:8].abs().max()
    assert err < (k[:, :, 1:8].amax(2) - k[:, :, 1:8].amin(2)).max() / 3 / 2 * 1.0001
    with pytest.raises(ValueError, match="preserved"):
        E.fake_quantize_kv(k, v, cfg, preserved[:, :10])
    with pytest.raises(ValueError, match="uniform"):
        E.fake_quantize_kv(k, v, cfg.replace(quantizer="kvquant"), preserved)


def test_fake_quant_8bit_close_to_fp(tiny, fp):
    # 8-bit: each element moves by at most s/2 = (group range)/510; this keeps
    # |log ppl8 - log ppl_fp| far below 1% (measured ~1e-4); 2 bits cost > 1%.
    r8 = _fake(tiny, key_bits=8, value_bits=8, preserve="none")
    assert r8.protocol == "fake" and r8.tokens == WINDOWS * (SEQ - 1) == fp.tokens
    assert r8.ppl != fp.ppl                  # quantization did happen
    assert abs(math.log(r8.ppl / fp.ppl)) < 0.01


def test_fake_quant_preserving_everything_equals_fp(tiny, fp):
    r = _fake(tiny, key_bits=2, value_bits=2, preserve="pfn", preserve_first_n=SEQ)
    assert r.preserved_count == WINDOWS * SEQ
    assert r.preserved_positions == [list(range(SEQ))] * WINDOWS
    assert r.nll_sum == pytest.approx(fp.nll_sum, rel=1e-12, abs=0)


def test_fake_quant_2bit_worse_than_8bit(tiny, fp):
    r2 = _fake(tiny, key_bits=2, value_bits=2, preserve="none")
    r8 = _fake(tiny, key_bits=8, value_bits=8, preserve="none")
    assert r2.ppl > r8.ppl * 1.01
    assert r2.ppl > fp.ppl


def test_fake_quant_pfn_positions_and_restores_attention(tiny):
    model = tiny[0]
    before = model.config._attn_implementation
    r = _fake(tiny, key_bits=2, value_bits=2, preserve="pfn", preserve_first_n=3)
    assert r.preserved_positions == [[0, 1, 2]] * WINDOWS and r.preserved_count == 3 * WINDOWS
    assert model.config._attn_implementation == before


def test_fake_quant_kvsink_reads_fp_hidden_state(tiny):
    """The KVSink set is predict_sinks on hidden_states[layer] of a full-precision pass."""
    from accelerated import predictor as PR
    model, _, ids, _ = tiny
    windows = E.make_windows(ids, SEQ, WINDOWS)
    layer, channels = 1, (3, 17)
    with torch.no_grad():
        h = [model(input_ids=w[None], output_hidden_states=True).hidden_states[layer][0]
             for w in windows]
    scores = torch.stack([PR.outlier_scores(x, channels) for x in h])
    thr = float(scores.flatten().kthvalue(int(scores.numel() * 0.9)).values)  # ~10% are "sinks"
    r = _fake(tiny, key_bits=2, value_bits=2, preserve="kvsink", predictor_layer=layer,
              predictor_channels=channels, predictor_threshold=thr)
    expected = [torch.nonzero(s > thr).flatten().tolist() for s in scores]
    assert r.preserved_positions == expected
    assert 0 < r.preserved_count < WINDOWS * SEQ
    # union with pfn, then the cap keeps the earliest
    r2 = _fake(tiny, key_bits=2, value_bits=2, preserve="pfn+kvsink", preserve_first_n=2,
               max_preserved=4, predictor_layer=layer, predictor_channels=channels,
               predictor_threshold=thr)
    for got, exp in zip(r2.preserved_positions, expected):
        assert got == sorted(set(exp) | {0, 1})[:4]


def test_fake_quant_oracle_from_fp_attention(tiny):
    """The oracle set = mean over layers of oracle_scores of the fp attention >= ratio."""
    from reference.preserve import oracle_scores
    from transformers import LlamaForCausalLM
    model, _, ids, folder = tiny
    eager = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    windows = E.make_windows(ids, SEQ, WINDOWS)
    scores = []
    for w in windows:
        with torch.no_grad():
            att = eager(input_ids=w[None], output_attentions=True).attentions
        scores.append(np.mean([oracle_scores(a.double().numpy()) for a in att], axis=0)[0])
    top = np.sort(np.concatenate(scores))[::-1]
    ratio = float(np.sqrt(top[3] * top[4]))       # between the 4th and 5th largest: 4 tokens reach it
    assert ratio > 1.0 and top[3] / top[4] > 1.001   # no near-tie at the threshold
    expected = [np.flatnonzero(s >= ratio).tolist() for s in scores]
    r = _fake(tiny, key_bits=2, value_bits=2, preserve="oracle", oracle_ratio=ratio)
    assert r.preserved_positions == expected
    assert r.preserved_count == 4


def test_fake_quant_eager_model_same_as_sdpa(tiny):
    from transformers import LlamaForCausalLM
    model, _, ids, folder = tiny
    eager = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    cfg = KVSinkConfig(key_bits=3, value_bits=3, preserve="pfn")
    a = E.perplexity_fake_quant(model, ids, cfg, seq_len=SEQ, max_windows=1)
    b = E.perplexity_fake_quant(eager, ids, cfg, seq_len=SEQ, max_windows=1)
    assert eager.config._attn_implementation == "eager"
    assert abs(math.log(a.ppl / b.ppl)) < 1e-4      # same math, different summation order


def test_fake_quant_bad_arguments(tiny):
    model, _, ids, _ = tiny
    with pytest.raises(TypeError, match="KVSinkConfig"):
        E.perplexity_fake_quant(model, ids, {"key_bits": 2})
    with pytest.raises(ValueError, match="predictor_layer"):
        E.perplexity_fake_quant(model, ids, KVSinkConfig(preserve="kvsink", predictor_layer=9,
                                                         predictor_channels=(1,),
                                                         predictor_threshold=1.0), seq_len=SEQ)


def test_calibration_fails_clearly_on_a_model_without_outliers(tiny):
    model, _, ids, _ = tiny
    with pytest.raises(ValueError, match="outlier|hidden states"):
        E.calibrate_config(model, KVSinkConfig(preserve="kvsink"), ids[:, :SEQ])


def test_result_to_dict_is_json(tiny):
    r = _fake(tiny, key_bits=4, value_bits=4, preserve="pfn")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["protocol"] == "fake" and d["config"]["key_bits"] == 4
    assert d["config"]["preserve"] == ["pfn"] and d["ppl"] == pytest.approx(r.ppl)


# =========================================================================== streaming protocol

@needs_cache
def test_streaming_everything_in_residual_equals_fp(tiny, fp):
    model, _, ids, _ = tiny
    cfg = KVSinkConfig(key_bits=2, value_bits=2, preserve="none", residual_length=SEQ)
    r = E.perplexity_streaming(model, ids, cfg, chunk=SEQ, seq_len=SEQ, max_windows=WINDOWS)
    assert r.protocol == "streaming" and r.tokens == fp.tokens
    # same attention over full-precision keys/values, other kernels: float32 rounding only
    assert r.nll_sum == pytest.approx(fp.nll_sum, rel=1e-5)


@needs_cache
def test_streaming_chunked_everything_in_residual_equals_fp(tiny, fp):
    model, _, ids, _ = tiny
    cfg = KVSinkConfig(key_bits=2, value_bits=2, preserve="none", residual_length=SEQ)
    r = E.perplexity_streaming(model, ids, cfg, chunk=7, seq_len=SEQ, max_windows=WINDOWS)
    assert r.tokens == fp.tokens
    assert r.nll_sum == pytest.approx(fp.nll_sum, rel=1e-5)


@needs_cache
def test_streaming_close_to_fake_at_8bit(tiny, fp):
    model, _, ids, _ = tiny
    cfg = KVSinkConfig(key_bits=8, value_bits=8, preserve="pfn", residual_length=16)
    s = E.perplexity_streaming(model, ids, cfg, chunk=1, seq_len=SEQ, max_windows=1)
    f = E.perplexity_fake_quant(model, ids, cfg, seq_len=SEQ, max_windows=1)
    fp1 = E.perplexity_full_precision(model, ids, seq_len=SEQ, max_windows=1)
    assert s.preserved_positions == [[0]] and s.tokens == SEQ - 1
    # both within the 8-bit bound of fp (see test_fake_quant_8bit_close_to_fp)
    assert abs(math.log(s.ppl / f.ppl)) < 0.01 and abs(math.log(s.ppl / fp1.ppl)) < 0.01
    assert s.nll_sum != fp1.nll_sum


@needs_cache
def test_streaming_2bit_degrades_and_restores_model(tiny, fp):
    model, _, ids, _ = tiny
    before = model.config._attn_implementation
    cfg = KVSinkConfig(key_bits=2, value_bits=2, preserve="none", residual_length=16)
    s = E.perplexity_streaming(model, ids, cfg, chunk=4, seq_len=SEQ, max_windows=1)
    assert s.ppl > fp.ppl and s.chunk == 4
    assert model.config._attn_implementation == before


@needs_cache
def test_streaming_bad_arguments(tiny):
    model, _, ids, _ = tiny
    with pytest.raises(ValueError, match="chunk"):
        E.perplexity_streaming(model, ids, KVSinkConfig(preserve="none"), chunk=0)
    with pytest.raises(ValueError, match="oracle"):
        E.perplexity_streaming(model, ids, KVSinkConfig(preserve="oracle"), seq_len=SEQ)


# =========================================================================== KVQuant-style quantizer

def _kvq(bits=4, **kw):
    base = dict(quantizer="kvquant", key_bits=bits, value_bits=bits, key_group_size=8,
                value_group_size=8, residual_length=16, preserve="pfn", kvquant_datatype="kmeans",
                outlier_fraction=0.01)
    base.update(kw)
    return KVSinkConfig(**base)


def _spy_calibration(monkeypatch):
    """Record every accelerated.calibration.calibrate_kvquant_model call: (args, kwargs, result)."""
    from accelerated import calibration as CAL
    calls, real = [], CAL.calibrate_kvquant_model

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out
    monkeypatch.setattr(CAL, "calibrate_kvquant_model", spy)
    return calls, real


def _assert_same_calibrations(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for name in ("key_lower", "key_upper", "key_levels", "value_levels"):
            torch.testing.assert_close(getattr(g, name).cpu(), getattr(e, name).cpu(), rtol=0, atol=0)


@needs_cache
def test_streaming_kvquant_calibrates_once_on_the_default_text(tiny, monkeypatch):
    """One calibrate_kvquant_model call per perplexity_streaming call, on the packaged default
    text (not the evaluation windows); every window's cache gets those calibrations and does not
    calibrate again; they equal a direct calibrate_kvquant_model on the same ids."""
    from accelerated import calibration as CAL
    from accelerated import hf
    model, tok, ids, _ = tiny
    calls, real = _spy_calibration(monkeypatch)
    given, init = [], hf.KVSinkCache.__init__

    def recording_init(self, *args, **kwargs):
        given.append(kwargs.get("kvquant_calibration"))
        init(self, *args, **kwargs)
    monkeypatch.setattr(hf.KVSinkCache, "__init__", recording_init)
    cfg = _kvq()
    r = E.perplexity_streaming(model, ids, cfg, chunk=16, seq_len=SEQ, max_windows=WINDOWS,
                               tokenizer=tok)
    assert len(calls) == 1                           # not once per window, not in the caches
    args, kwargs, (_, cals) = calls[0]
    default_ids = CAL.calibration_ids(tokenizer=tok)
    assert default_ids.shape == (1, 512) and torch.equal(args[2], default_ids)
    assert kwargs == {"fisher": False}
    assert len(given) == WINDOWS and all(g is cals for g in given)
    _, direct = real(model, cfg, default_ids)
    _assert_same_calibrations(cals, direct)
    assert r.calibration == {"text": "default text", "tokens": 512, "predictor": None,
                             "kvquant": "calibrated", "kvquant_fisher": False}
    assert r.config.quantizer == "kvquant" and r.preserved_positions == [[0]] * WINDOWS
    assert json.loads(json.dumps(r.to_dict()))["calibration"] == r.calibration


@needs_cache
def test_streaming_kvquant_fisher_and_calibration_text(tiny, monkeypatch):
    model, tok, ids, _ = tiny
    calls, _ = _spy_calibration(monkeypatch)
    text = "Held-out calibration text, not a word of which is evaluated. " * 6
    r = E.perplexity_streaming(model, ids, _kvq(), chunk=SEQ, seq_len=SEQ, max_windows=1,
                               calibration_text=text, tokenizer=tok, kvquant_fisher=True)
    assert len(calls) == 1 and calls[0][1] == {"fisher": True}
    assert torch.equal(calls[0][0][2], tok(text, return_tensors="pt")["input_ids"])
    assert r.calibration["text"] == "calibration_text" and r.calibration["kvquant_fisher"] is True
    assert r.calibration["tokens"] == len(text)      # byte-level tokenizer


def test_fake_quant_kvquant_equals_the_bench_protocol(tiny, fp, monkeypatch):
    """perplexity_fake_quant with quantizer='kvquant' computes what bench/kvquant_table.py's
    attention function (registered as its ATTN_NAME, reading its _STATE) computes (docs/08 §8.12)
    with the same calibration and preserved set."""
    from accelerated import kvquant as KQ
    from bench import kvquant_table as B
    model, _, ids, _ = tiny
    held_out = ids[:, -300:]                         # after the evaluated windows
    cfg = _kvq(3, outlier_fraction=0.02)
    calls, real = _spy_calibration(monkeypatch)
    r = E.perplexity_fake_quant(model, ids, cfg, seq_len=SEQ, max_windows=WINDOWS,
                                calibration_ids=held_out)
    assert len(calls) == 1 and torch.equal(calls[0][0][2], held_out)
    assert r.calibration == {"text": "calibration_ids", "tokens": 300, "predictor": None,
                             "kvquant": "calibrated", "kvquant_fisher": False}
    _, cals = real(model, cfg, held_out)
    B.register()
    previous = model.config._attn_implementation
    nll = 0.0
    try:
        model.config._attn_implementation = B.ATTN_NAME
        B._STATE.update(mode="quant", config=cfg, calibrations=cals, inv_freq=KQ.model_inv_freq(model),
                        outliers=0, elements=0, bytes=0)
        with torch.no_grad():
            for w in E.make_windows(ids, SEQ, WINDOWS):
                B._STATE["preserved"] = torch.zeros(1, SEQ, dtype=torch.bool)
                B._STATE["preserved"][0, 0] = True   # PFN-1
                logits = model(input_ids=w[None], use_cache=False).logits[0]
                nll += E._window_nll(logits[:-1], w[1:])
        assert B._STATE["outliers"] > 0               # the sparse part is exercised
    finally:
        model.config._attn_implementation = previous
        B._STATE.clear()
    assert r.nll_sum == pytest.approx(nll, rel=1e-12, abs=0)
    assert r.nll_sum != fp.nll_sum and r.preserved_positions == [[0]] * WINDOWS
    # given calibrations are used as they are: no calibration, same result
    again = E.perplexity_fake_quant(model, ids, cfg, seq_len=SEQ, max_windows=WINDOWS,
                                    kvquant_calibration=cals)
    assert len(calls) == 1 and again.calibration["kvquant"] == "given" and again.calibration["text"] is None
    assert again.nll_sum == r.nll_sum


def test_fake_quant_kvquant_8bit_and_preserve_everything(tiny, fp):
    model, _, ids, _ = tiny
    nf = dict(kvquant_datatype="nf", outlier_fraction=0.0)        # no calibration needed

    def run(cfg):
        return E.perplexity_fake_quant(model, ids, cfg, seq_len=SEQ, max_windows=WINDOWS)
    r8 = run(_kvq(8, **nf))
    assert r8.calibration["kvquant"] == "not needed" and r8.calibration["text"] is None
    # 8-bit nf: steps <= 1/64 of a group's half-range, the same bound as the uniform 8-bit test
    assert r8.nll_sum != fp.nll_sum and abs(math.log(r8.ppl / fp.ppl)) < 0.01
    r2 = run(_kvq(2, **nf))
    assert r2.ppl > r8.ppl * 1.01
    every = run(_kvq(2, preserve_first_n=SEQ, **nf))
    assert every.nll_sum == pytest.approx(fp.nll_sum, rel=1e-12, abs=0)


@needs_cache
def test_kvquant_calibration_arguments_are_checked(tiny):
    model, tok, ids, _ = tiny
    kw = dict(seq_len=SEQ, max_windows=1)
    for fn in (E.perplexity_fake_quant, E.perplexity_streaming):
        with pytest.raises(ValueError, match="never on the evaluation windows"):
            fn(model, ids, _kvq(), **kw)                           # nothing to calibrate on
        with pytest.raises(ValueError, match="kvquant_fisher=True has no effect with kvquant_datatype='nf'"):
            fn(model, ids, _kvq(kvquant_datatype="nf"), tokenizer=tok, kvquant_fisher=True, **kw)
        with pytest.raises(TypeError, match="kvquant_fisher must be True or False"):
            fn(model, ids, _kvq(), tokenizer=tok, kvquant_fisher="yes", **kw)
        with pytest.raises(ValueError, match="only used by quantizer='kvquant'"):
            fn(model, ids, KVSinkConfig(preserve="pfn"), kvquant_calibration=[None, None], **kw)
        with pytest.raises(ValueError, match="2 decoder layers"):
            fn(model, ids, _kvq(kvquant_datatype="nf"), kvquant_calibration=[None], **kw)
    with pytest.raises(ValueError, match="oracle"):
        E.perplexity_fake_quant(model, ids, _kvq(preserve="oracle"), tokenizer=tok, **kw)


# =========================================================================== command line

def _cli_args(folder, *extra):
    return ["eval", "--model", str(folder), "--data", str(E.default_corpus_path()),
            "--seq-len", str(SEQ), "--windows", "1", "--device", "cpu", "--no-progress", *extra]


def test_cli_eval_prints_table_and_json(tiny, tmp_path, capsys):
    from accelerated.cli import main
    model, _, ids, folder = tiny
    out_json = tmp_path / "r.json"
    assert main(_cli_args(folder, "--bits", "2,8", "--methods", "none,pfn,kvsink",
                          "--pfn", "2", "--predictor-layer", "1", "--predictor-channels", "3,17",
                          "--predictor-threshold", "1.5", "--json", str(out_json))) == 0
    out = capsys.readouterr()
    for label in ("full precision", "no preservation", "PFN-2", "PFN-k", "KVSink", "perplexity",
                  "KV bytes/token", "within noise when |difference| < 2 SE"):
        assert label in out.out
    assert "default_corpus.txt" in out.out.replace("\n", "")      # the corpus is named
    report = json.loads(out_json.read_text())
    rows = report["results"]
    assert [(r["method"], r["bits"], r["compared_to"]) for r in rows] == [
        ("full precision", "32", None), ("no preservation", "2", "full precision"),
        ("PFN-2", "2", "no preservation"), ("PFN-k", "2", "PFN-2"), ("KVSink", "2", "PFN-k"),
        ("no preservation", "8", "full precision"), ("PFN-2", "8", "no preservation"),
        ("PFN-k", "8", "PFN-2"), ("KVSink", "8", "PFN-k")]
    direct = E.perplexity_full_precision(model, ids, seq_len=SEQ, max_windows=1)
    assert rows[0]["fake"]["ppl"] == pytest.approx(direct.ppl, rel=1e-12)
    pfn = E.perplexity_fake_quant(model, ids, KVSinkConfig(preserve="pfn", preserve_first_n=2),
                                  seq_len=SEQ, max_windows=1)
    assert rows[2]["fake"]["ppl"] == pytest.approx(pfn.ppl, rel=1e-12)
    assert rows[2]["fake"]["preserved_positions"] == [[0, 1]]
    assert rows[4]["fake"]["config"]["predictor_channels"] == [3, 17]
    # PFN-k keeps, in each window, as many first tokens as KVSink keeps there
    kv_counts = [len(p) for p in rows[4]["fake"]["preserved_positions"]]
    assert [len(p) for p in rows[3]["fake"]["preserved_positions"]] == kv_counts
    assert rows[3]["fake"]["preserved_positions"] == [list(range(k)) for k in kv_counts]
    # the KVSink row equals the direct call (its sets from the full-precision pass)
    kv = E.perplexity_fake_quant(model, ids, KVSinkConfig(preserve="kvsink", predictor_layer=1,
                                                          predictor_channels=(3, 17),
                                                          predictor_threshold=1.5),
                                 seq_len=SEQ, max_windows=1)
    assert rows[4]["fake"]["ppl"] == pytest.approx(kv.ppl, rel=1e-12)
    assert rows[4]["fake"]["preserved_positions"] == kv.preserved_positions
    assert report["full_precision_kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4   # 2 layers, 2 heads, D 16, fp32
    assert rows[1]["fake"]["compression_ratio"] > rows[5]["fake"]["compression_ratio"] > 1


def test_cli_default_subcommand_is_eval(tiny, capsys):
    from accelerated.cli import main
    folder = tiny[3]
    args = _cli_args(folder, "--bits", "4", "--methods", "pfn")[1:]     # no "eval"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PFN-1" in out and "full precision" in out


@needs_cache
def test_cli_both_protocols(tiny, capsys):
    from accelerated.cli import main
    folder = tiny[3]
    assert main(_cli_args(folder, "--bits", "4", "--methods", "none", "--protocol", "both",
                          "--chunk", "16", "--residual-length", "32")) == 0
    out = capsys.readouterr().out
    assert "(fake protocol)" in out and "(streaming protocol)" in out


@pytest.mark.parametrize("bad, message", [
    (["--bits", "9"], "out of range"),
    (["--bits", "two"], "comma-separated"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--windows", "0"], "--windows must be >= 1"),
    (["--methods", "pfn,sinks"], "unknown method"),
    (["--protocol", "fast"], "invalid choice"),
    (["--predictor-threshold", "-1"], "finite number > 0"),
    (["--quantizer", "kivi"], "invalid choice"),
    (["--quantizer", "kvquant", "--kvquant-datatype", "int4"], "invalid choice"),
    (["--quantizer", "kvquant", "--outlier-fraction", "0.5"], "--outlier-fraction must be in [0, 0.5)"),
    (["--quantizer", "kvquant", "--outlier-fraction", "-0.01"], "--outlier-fraction must be in [0, 0.5)"),
    (["--quantizer", "kvquant", "--outlier-fraction", "1%"], "--outlier-fraction must be a number"),
    (["--fisher"], "--fisher applies to --quantizer kvquant only"),
    (["--outlier-fraction", "0.01"], "--outlier-fraction applies to --quantizer kvquant only"),
    (["--kvquant-datatype", "kmeans"], "--kvquant-datatype applies to --quantizer kvquant only"),
    (["--quantizer", "kvquant", "--fisher"], "--fisher weights the k-means: it needs --kvquant-datatype kmeans"),
    (["--quantizer", "kvquant", "--kvquant-datatype", "nf", "--fisher"], "needs --kvquant-datatype kmeans"),
    (["--quantizer", "kvquant", "--methods", "pfn,oracle"], "--methods oracle cannot be used with --quantizer kvquant"),
])
def test_cli_bad_arguments(bad, message, capsys):
    from accelerated.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["eval", *bad])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (["--fisher"], "--fisher applies to --quantizer kvquant only"),
    (["--quantizer", "kvquant", "--fisher"], "needs --kvquant-datatype kmeans"),
    (["--quantizer", "kvquant", "--bits", "9"], "--bits: 9 is out of range"),
])
def test_cli_calibrate_bad_arguments(bad, message, capsys):
    from accelerated.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", *bad])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@needs_cache
def test_cli_eval_kvquant_fisher(tiny, tmp_path, capsys):
    """--quantizer kvquant --kvquant-datatype kmeans --outlier-fraction --fisher reach both
    protocols; each row is calibrated on the packaged default text with Fisher weights and equals
    the direct call."""
    from accelerated.cli import main
    model, tok, ids, folder = tiny
    out_json = tmp_path / "kvq.json"
    assert main(_cli_args(folder, "--bits", "4", "--methods", "pfn", "--quantizer", "kvquant",
                          "--kvquant-datatype", "kmeans", "--outlier-fraction", "0.02", "--fisher",
                          "--group-size", "8", "--protocol", "both", "--chunk", "32",
                          "--residual-length", "16", "--json", str(out_json))) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "KVQuant-style kmeans, Fisher-weighted k-means, outliers 2%" in out
    report = json.loads(out_json.read_text())
    assert report["quantizer"] == "kvquant"
    assert report["kvquant"] == {"datatype": "kmeans", "outlier_fraction": 0.02, "fisher": True}
    row = report["results"][1]
    assert row["method"] == "PFN-1" and row["streaming"]["kv_bytes_per_token"] > 0
    for proto in ("fake", "streaming"):
        assert row[proto]["config"]["quantizer"] == "kvquant"
        assert row[proto]["config"]["kvquant_datatype"] == "kmeans"
        assert row[proto]["calibration"] == {"text": "default text", "tokens": 512, "predictor": None,
                                             "kvquant": "calibrated", "kvquant_fisher": True}
    cfg = _kvq(4, outlier_fraction=0.02, residual_length=16)
    direct = E.perplexity_fake_quant(model, ids, cfg, seq_len=SEQ, max_windows=1, tokenizer=tok,
                                     kvquant_fisher=True)
    assert row["fake"]["ppl"] == pytest.approx(direct.ppl, rel=1e-9)
    plain = E.perplexity_fake_quant(model, ids, cfg, seq_len=SEQ, max_windows=1, tokenizer=tok)
    assert plain.nll_sum != direct.nll_sum       # the switch changed the calibration


def _cli_calibrate_kvquant(folder, threshold):
    from accelerated.cli import build_parser, cmd_calibrate
    args = build_parser().parse_args([
        "calibrate", "--model", str(folder), "--data", str(E.default_corpus_path()),
        "--seq-len", str(SEQ), "--device", "cpu", "--predictor-layer", "1", "--predictor-channels", "3",
        "--predictor-threshold", repr(threshold), "--quantizer", "kvquant", "--kvquant-datatype", "kmeans",
        "--fisher", "--bits", "2", "--group-size", "8"])
    return cmd_calibrate(args)


def test_cli_calibrate_kvquant(tiny, capsys):
    """kvsink calibrate --quantizer kvquant prints the per-layer KVQuant calibration, Fisher-weighted
    k-means on the default text with the predicted sinks excluded, as calibrate_kvquant_model.
    The threshold 1e30 makes the excluded set (none: no float32 activation of a trained model is
    that large) independent of the random initialisation."""
    from accelerated import calibration as CAL
    model, tok, _, folder = tiny
    report = _cli_calibrate_kvquant(folder, 1e30)
    out = capsys.readouterr().out
    assert "KVQuant:    kmeans, 2-bit keys and values, outliers 1%, groups of 8, Fisher-weighted" in out
    cfg = _kvq(2, key_group_size=8, preserve="kvsink", predictor_layer=1, predictor_channels=(3,),
               predictor_threshold=1e30, residual_length=128)
    _, cals = CAL.calibrate_kvquant_model(model, cfg, tokenizer=tok, fisher=True)
    assert len(report["kvquant"]) == len(cals) == 2
    for got, cal in zip(report["kvquant"], cals):
        assert got["key_levels_h0_c0"] == pytest.approx(cal.key_levels[0, 0].tolist(), abs=1e-4)
        assert got["key_upper_median"] == pytest.approx(float(cal.key_upper.median()), rel=1e-6)
        assert math.isfinite(got["key_upper_median"])       # thresholds from counted tokens


def test_cli_calibrate_kvquant_every_token_a_sink(tiny, capsys):
    """docs/08 8.9: a calibration text whose every token is a predicted sink (threshold 1e-30:
    every nonzero activation exceeds it) has nothing to calibrate on: no key outliers (thresholds
    -inf/+inf) and the nf grid as k-means codebooks, reported, not an error."""
    from reference.kvquant import nf_levels
    report = _cli_calibrate_kvquant(tiny[3], 1e-30)
    out = capsys.readouterr().out
    assert "KVQuant:    kmeans" in out
    assert len(report["kvquant"]) == 2
    for got in report["kvquant"]:
        assert got["key_lower_median"] == -math.inf and got["key_upper_median"] == math.inf
        assert got["key_levels_h0_c0"] == pytest.approx(nf_levels(2).tolist(), abs=1e-4)


def test_cli_kvsink_calibration_failure_is_explained(tiny, capsys):
    from accelerated.cli import main
    with pytest.raises(SystemExit) as exc:
        main(_cli_args(tiny[3], "--bits", "2", "--methods", "kvsink"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kvsink: error: KVSink predictor calibration failed") and "--predictor-layer" in err


def test_cli_calibrate_with_given_predictor(tiny, capsys):
    from accelerated.cli import main
    folder = tiny[3]
    assert main(["calibrate", "--model", str(folder), "--data", str(E.default_corpus_path()),
                 "--seq-len", str(SEQ), "--device", "cpu", "--predictor-layer", "1",
                 "--predictor-channels", "3", "--predictor-threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "layer:      1" in out and "channels:   [3]" in out and "predicted sinks" in out


# =========================================================================== the real model

@pytest.mark.model
def test_smollm2_kvsink_beats_no_preservation_at_2bit():
    """SmolLM2-135M-Instruct, the first window of 512 tokens of the default text (or of
    $KVSINK_WIKITEXT), tokenized as the CLI does, fake-quant protocol; predictor calibrated on
    the packaged essay (as the CLI does).  Measured (README): window 0 NLL 1461.8 full precision,
    1710.3 KVSink, 1872.8 no preservation."""
    from accelerated.models import load_model
    model, tokenizer = load_model()
    text, name = E.load_corpus()
    ids = E.tokenize_corpus(text, tokenizer, wikitext_rows=name.startswith("wikitext-2"))
    kw = dict(seq_len=512, max_windows=1, corpus=name)
    fp = E.perplexity_full_precision(model, ids, **kw)
    assert math.isfinite(fp.ppl) and 3.0 < fp.ppl < 100.0, (name, fp.ppl)
    base = E.calibrate_config(model, KVSinkConfig(preserve="kvsink"), tokenizer=tokenizer)
    kv = E.perplexity_fake_quant(model, ids, base, **kw)
    none = E.perplexity_fake_quant(model, ids, base.replace(preserve="none"), **kw)
    assert 0 in kv.preserved_positions[0]
    assert kv.ppl <= none.ppl, (kv.ppl, none.ppl)
    assert fp.ppl < kv.ppl
