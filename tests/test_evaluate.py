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
from pathlib import Path

import numpy as np
import pytest
import torch

from accelerated import evaluate as E
from reference.config import KVSinkConfig

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
    ids = E.tokenize_corpus(text, tokenizer)
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


def _cache_available():
    try:
        import accelerated.cache  # noqa: F401
        import accelerated.hf  # noqa: F401
    except ImportError:
        return False
    return True


needs_cache = pytest.mark.skipif(not _cache_available(),
                                 reason="accelerated.cache / accelerated.hf not importable")


# =========================================================================== corpus and windows

def test_corpus_falls_back_to_default_and_names_it(monkeypatch, tmp_path):
    monkeypatch.delenv("KVSINK_WIKITEXT", raising=False)
    monkeypatch.setattr(E, "_repo_wikitext", lambda: tmp_path / "missing" / "wiki.test.raw")
    text, name = E.load_corpus()
    assert name == E.DEFAULT_CORPUS_NAME
    assert "default_corpus.txt" in name
    assert text == E.default_corpus_path().read_text(encoding="utf-8")
    assert 1500 <= len(text.split()) <= 3000


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
    for label in ("full precision", "no preservation", "PFN-2", "KVSink", "ppl (fake)"):
        assert label in out.out
    assert "default_corpus.txt" in out.out.replace("\n", "")
    report = json.loads(out_json.read_text())
    rows = report["results"]
    assert [(r["method"], r["bits"]) for r in rows] == [
        ("full precision", "32"), ("no preservation", "2"), ("PFN-2", "2"), ("KVSink", "2"),
        ("no preservation", "8"), ("PFN-2", "8"), ("KVSink", "8")]
    direct = E.perplexity_full_precision(model, ids, seq_len=SEQ, max_windows=1)
    assert rows[0]["fake"]["ppl"] == pytest.approx(direct.ppl, rel=1e-12)
    pfn = E.perplexity_fake_quant(model, ids, KVSinkConfig(preserve="pfn", preserve_first_n=2),
                                  seq_len=SEQ, max_windows=1)
    assert rows[2]["fake"]["ppl"] == pytest.approx(pfn.ppl, rel=1e-12)
    assert rows[2]["fake"]["preserved_positions"] == [[0, 1]]
    assert rows[3]["fake"]["config"]["predictor_channels"] == [3, 17]


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
    assert "ppl (fake)" in out and "ppl (streaming)" in out


@pytest.mark.parametrize("bad, message", [
    (["--bits", "9"], "out of range"),
    (["--bits", "two"], "comma-separated"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--windows", "0"], "--windows must be >= 1"),
    (["--methods", "pfn,sinks"], "unknown method"),
    (["--protocol", "fast"], "invalid choice"),
    (["--predictor-threshold", "-1"], "finite number > 0"),
])
def test_cli_bad_arguments(bad, message, capsys):
    from accelerated.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["eval", *bad])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_missing_data_file(tiny, tmp_path):
    from accelerated.cli import main
    args = ["eval", "--model", str(tiny[3]), "--data", str(tmp_path / "none.raw"), "--device", "cpu"]
    with pytest.raises(SystemExit, match="does not exist"):
        main(args)


def test_cli_kvsink_calibration_failure_is_explained(tiny):
    from accelerated.cli import main
    with pytest.raises(SystemExit, match="--predictor-layer"):
        main(_cli_args(tiny[3], "--bits", "2", "--methods", "kvsink"))


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
    """SmolLM2-135M-Instruct, one window of 512 tokens of WikiText-2's test split when
    ../shared/data/wikitext-2-raw is present (else the default corpus), fake-quant protocol;
    predictor calibrated on the default corpus (as the CLI does)."""
    from accelerated.models import load_model
    model, tokenizer = load_model()
    text, name = E.load_corpus()
    ids = E.tokenize_corpus(text, tokenizer)
    kw = dict(seq_len=512, max_windows=1, corpus=name)
    fp = E.perplexity_full_precision(model, ids, **kw)
    assert math.isfinite(fp.ppl) and 3.0 < fp.ppl < 100.0, (name, fp.ppl)
    base = E.calibrate_config(model, KVSinkConfig(preserve="kvsink"), tokenizer=tokenizer)
    kv = E.perplexity_fake_quant(model, ids, base, **kw)
    none = E.perplexity_fake_quant(model, ids, base.replace(preserve="none"), **kw)
    assert 0 in kv.preserved_positions[0]
    assert kv.ppl <= none.ppl, (kv.ppl, none.ppl)
    assert fp.ppl < kv.ppl
