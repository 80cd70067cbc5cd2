"""Tests of accelerated/corpus.py: windows opened by the tokenizer's BOS (docs/12-evaluation.md §12.1),
and the BOS reaching every perplexity protocol of accelerated/evaluate.py.

The tokenizers are tiny byte-level fakes: one adds a BOS in front of text (as Gemma's does),
one declares a BOS token but does not add it (as SmolLM2's and Qwen2.5's GGUF tokenizers do),
one has none.
"""

from __future__ import annotations

import pytest
import torch

from accelerated import corpus as C
from accelerated import evaluate as E
from reference.config import KVSinkConfig

BOS = 256


def _tokenizer(bos: str):
    """Byte-level tokenizer (ids 0..255) plus ``<bos>`` = 256: ``bos`` is "adds" (a template puts
    it before every text), "declares" (bos_token set, not added) or "none"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<bos>"] = BOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos == "adds":
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    kw = {} if bos == "none" else {"bos_token": "<bos>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def test_window_bos_only_where_the_tokenizer_adds_one():
    assert C.window_bos(_tokenizer("adds")) == BOS
    declares = _tokenizer("declares")
    assert declares.bos_token_id == BOS and C.window_bos(declares) is None
    assert C.window_bos(_tokenizer("none")) is None


def test_tokenize_corpus_adds_no_special_token():
    tok = _tokenizer("adds")
    assert tok("ab")["input_ids"][0] == BOS                 # the tokenizer's default adds it
    ids = C.tokenize_corpus("ab cd", tok, wikitext_rows=False)
    assert BOS not in ids[0].tolist() and tok.decode(ids[0].tolist()) == "ab cd"


def test_make_windows_with_bos():
    ids = torch.arange(10)
    w = C.make_windows(ids, 4, bos_token_id=99)
    # BOS, then 3 text tokens per window: every text token once, the trailing partial dropped
    assert w.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert C.make_windows(ids, 4, 2, bos_token_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5]]
    assert C.window_count(10, 4, 99) == 3 and C.window_count(10, 4) == 2
    assert C.make_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="bos_token_id"):
        C.make_windows(ids, 4, bos_token_id=-1)
    with pytest.raises(ValueError, match="less the window's BOS"):
        C.make_windows(ids, 12, bos_token_id=99)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


SEQ, WINDOWS = 24, 3


def _explicit(ids):
    """The BOS windows written out as a plain token stream (no BOS argument needed)."""
    return C.make_windows(ids, SEQ, WINDOWS, bos_token_id=BOS).flatten()


@pytest.mark.parametrize("protocol", ["fp", "fake", "streaming"])
def test_every_protocol_opens_windows_with_bos(tiny_llama, protocol):
    """With ``bos_token_id`` each protocol scores the windows BOS + text: the same per-window NLLs
    as the explicit stream, and different ones from the windows without a BOS."""
    ids = C.tokenize_corpus("The quick brown fox jumps over the lazy dog. " * 4, _tokenizer("adds"),
                            wikitext_rows=False)
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=8, value_group_size=8,
                       residual_length=8, preserve="pfn", preserve_first_n=1)
    run = {"fp": lambda x, **kw: E.perplexity_full_precision(tiny_llama, x, **kw),
           "fake": lambda x, **kw: E.perplexity_fake_quant(tiny_llama, x, cfg, **kw),
           "streaming": lambda x, **kw: E.perplexity_streaming(tiny_llama, x, cfg, chunk=SEQ, **kw)
           }[protocol]
    with_bos = run(ids, seq_len=SEQ, max_windows=WINDOWS, bos_token_id=BOS)
    explicit = run(_explicit(ids), seq_len=SEQ, max_windows=WINDOWS)
    without = run(ids, seq_len=SEQ, max_windows=WINDOWS)
    assert with_bos.windows == WINDOWS and with_bos.tokens == WINDOWS * (SEQ - 1)
    assert with_bos.window_nll == explicit.window_nll
    assert with_bos.window_nll != without.window_nll


# =========================================================================== the Lee corpus

LEE_TEXT = "First news article.\nSecond news article.\n"


def _fake_gensim_wheel(folder, text=LEE_TEXT, member=C.LEE_MEMBER):
    import zipfile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gensim-4.4.0-cp311-cp311-manylinux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, text.encode("utf-8"))
        zf.writestr("gensim/__init__.py", "")
    return path


def _sha(text):
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_lee_corpus_read_from_the_wheel(tmp_path, monkeypatch):
    _fake_gensim_wheel(tmp_path)
    monkeypatch.setattr(C, "LEE_SHA256", _sha(LEE_TEXT))
    assert C.lee_corpus_text(tmp_path, download=False) == LEE_TEXT
    monkeypatch.setenv("KVSINK_CACHE", str(tmp_path / "cache"))
    _fake_gensim_wheel(tmp_path / "cache" / "corpora")
    text, name, rows = C.load_named_corpus("lee", download=False)
    assert (text, name, rows) == (LEE_TEXT, C.LEE_NAME, False)


def test_lee_corpus_checksum_and_member(tmp_path):
    _fake_gensim_wheel(tmp_path / "a")                      # the real digest: these bytes fail it
    with pytest.raises(ValueError, match="sha256"):
        C.lee_corpus_text(tmp_path / "a", download=False)
    _fake_gensim_wheel(tmp_path / "b", member="gensim/other.cor")
    with pytest.raises(ValueError, match="holds no"):
        C.lee_corpus_text(tmp_path / "b", download=False)


def test_lee_corpus_missing_wheel(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps gensim==4.4.0"):
        C.lee_corpus_text(tmp_path, download=False)
    calls = []

    def fake_download(requirement, dest):             # what pip would leave: the wheel
        calls.append(requirement)
        _fake_gensim_wheel(dest)
    from accelerated import model_registry
    monkeypatch.setattr(model_registry, "pip_download", fake_download)
    monkeypatch.setattr(C, "LEE_SHA256", _sha(LEE_TEXT))
    assert C.lee_corpus_text(tmp_path / "fetched") == LEE_TEXT and calls == [C.LEE_REQUIREMENT]
    monkeypatch.setattr(model_registry, "pip_download", lambda r, d: None)   # fetched nothing
    with pytest.raises(FileNotFoundError, match="left no wheel"):
        C.lee_corpus_text(tmp_path / "empty")


def test_load_named_corpus_choices(tmp_path, monkeypatch):
    assert C.load_named_corpus("default")[1] == C.DEFAULT_CORPUS_NAME
    monkeypatch.delenv("KVSINK_WIKITEXT", raising=False)
    with pytest.raises(FileNotFoundError, match="KVSINK_WIKITEXT"):
        C.load_named_corpus("wikitext")
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" = A = \n\n text .\n")
    monkeypatch.setenv("KVSINK_WIKITEXT", str(raw))
    text, name, rows = C.load_named_corpus("wikitext")
    assert rows and name.startswith("wikitext-2") and text == raw.read_text()
    other = tmp_path / "notes.txt"
    other.write_text("plain text")
    assert C.load_named_corpus(str(other)) == ("plain text", str(other), False)


def test_cli_eval_opens_windows_with_the_bos(tiny_llama, tmp_path, capsys):
    """``kvsink eval`` with a tokenizer that adds a BOS: every window opens with it, the JSON and
    the caption say so, and the full-precision NLLs are those of the BOS windows."""
    import json
    from accelerated.cli import main
    folder = tmp_path / "model"
    tiny_llama.save_pretrained(folder)
    tok = _tokenizer("adds")
    tok.save_pretrained(folder)
    data = tmp_path / "text.txt"
    text = "The quick brown fox jumps over the lazy dog. " * 4
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--seq-len", str(SEQ), "--windows",
                 str(WINDOWS), "--device", "cpu", "--no-progress", "--bits", "2", "--methods", "none",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"each window opens with BOS id {BOS}, not scored" in captured.out
    assert "every window opens with the BOS '<bos>'" in captured.err
    report = json.loads(out.read_text())
    assert report["window_bos"] == BOS and report["windows"] == WINDOWS
    fp = report["results"][0]["fake"]
    ids = C.tokenize_corpus(text, tok, wikitext_rows=False)
    expected = E.perplexity_full_precision(tiny_llama, _explicit(ids), seq_len=SEQ, max_windows=WINDOWS)
    assert fp["window_nll"] == expected.window_nll
