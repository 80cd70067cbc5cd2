"""accelerated.analyze (docs/14-sinks.md) on a tiny random Llama: figures, summary, CLI errors."""

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from accelerated import analyze as A                     # noqa: E402
from accelerated import quantize as AQ                   # noqa: E402
from reference.attention import attention                # noqa: E402
from reference.predictor import SinkPredictor            # noqa: E402

TEXT = ("The history of written knowledge is in large part a history of copying. For most of the "
        "time in which people have written things down, every book had been produced by hand.")
TOKENS = 48
FIGURES = {"channels.png", "attention.png", "predictor.png", "quantization.png"}


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _random_llama(bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=256, attn_implementation="eager", attention_bias=bias)
    return LlamaForCausalLM(cfg).eval()


def _plant_sink(model, token_id: int):
    """Make ``token_id`` a sink carrying a massive activation: its embedding alone has channel 0
    (50 against ~0.02 elsewhere), every query is the unit vector of the lowest-frequency RoPE dim
    of its head, and only channel 0 writes that dim of the keys (logit ~20 for the sink, 0 else)."""
    emb = model.model.embed_tokens.weight
    d = model.config.head_dim
    lo = d // 2 - 1
    with torch.no_grad():
        emb[:, 0] = 0.0
        emb[token_id, 0] = 50.0
        for layer in model.model.layers:
            att = layer.self_attn
            att.q_proj.weight.zero_()
            att.q_proj.bias.zero_()
            att.q_proj.bias[lo::d] = 1.0
            att.k_proj.weight[lo::d] = 0.0
            att.k_proj.weight[lo::d, 0] = 10.0
            att.k_proj.bias.zero_()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, saved folder): a random 4-layer Llama, eager attention, whose token
    "T" (token 0 of TEXT) is a planted sink."""
    model = _random_llama(bias=True)
    tok = _byte_tokenizer()
    _plant_sink(model, tok.convert_tokens_to_ids("T"))
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


@pytest.fixture(scope="module")
def result(tiny, tmp_path_factory):
    model, tok, _ = tiny
    out = tmp_path_factory.mktemp("analysis")
    return A.analyze(model, tok, TEXT, out, tokens=TOKENS, group_size=4), out


def test_every_figure_and_the_summary_are_written(result):
    summary, out = result
    assert set(summary["figures"].values()) == FIGURES
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_summary_is_consistent(result, tiny):
    summary, _ = result
    assert summary["tokens"] == TOKENS and summary["decoder_layers"] == 4
    assert summary["bos"] is False                    # the byte tokenizer has no BOS
    assert len(summary["channels"]) == 5              # embeddings + 4 layers
    for row in summary["channels"]:
        assert row["median"] > 0
        for key in ("top_sink", "top_other"):
            peaks = [p for _, p, _ in row[key]]
            assert peaks == sorted(peaks, reverse=True)
            assert all(0 <= t < TOKENS for _, _, t in row[key])
    # the planted sink: calibrated on channel 0 from the embeddings on, found by the oracle
    pred = summary["predictor"]
    assert pred["layer"] == 0 and pred["channels"] == [0] and pred["predicted"] == [0]
    assert summary["oracle_sinks"] == [0]
    assert summary["channels"][1]["top_sink"][0][:1] == [0]
    rows = summary["predictor_vs_oracle"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, "all"]
    for r in rows:
        assert r["oracle"] == len(r["oracle_tokens"])
        assert r["predicted"] == len(pred["predicted"])
        assert r["hits"] == len(set(r["oracle_tokens"]) & set(pred["predicted"]))
        for key in ("precision", "recall", "pfn1_recall"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0
        if r["predicted"]:
            assert r["precision"] == r["hits"] / r["predicted"]
        if r["oracle"]:
            assert r["recall"] == r["hits"] / r["oracle"]
            assert r["pfn1_recall"] == (1 if 0 in r["oracle_tokens"] else 0) / r["oracle"]
    assert rows[-1]["oracle_tokens"] == summary["oracle_sinks"]
    q = summary["quantization"]
    assert q["sink_tokens"] == summary["oracle_sinks"][:4]
    assert len(q["control_tokens"]) == 8
    assert not set(q["control_tokens"]) & (set(summary["oracle_sinks"]) | set(pred["predicted"]))
    for key in ("sink", "control"):
        for b in ("2", "4"):
            assert len(q[key][b]) == 4 and all(v >= 0 for v in q[key][b])
    # 2-bit quantization is coarser than 4-bit on the same tokens
    assert np.mean(q["control"]["2"]) > np.mean(q["control"]["4"])


def test_token_quantization_error_is_a_direct_recomputation(tiny):
    """The one-key softmax update equals the attention recomputed from scratch with the
    token's K and V replaced (reference.attention.attention, float64)."""
    model, tok, _ = tiny
    ids = A.text_ids(tok, TEXT, TOKENS)
    _, captures = A.capture_pass(model, ids)
    c = captures[1]
    t = ids.shape[1]
    pos = np.arange(t)[None]
    for token, bits in ((0, 2), (7, 4), (30, 2)):
        k, v = c.key.copy(), c.value.copy()
        for x in (k, v):
            x[:, token] = AQ.dequantize(AQ.quantize_per_token(torch.from_numpy(x[:, token:token + 1].copy()),
                                                              bits, 4)).numpy()[:, 0]
        before = attention(c.query[None], c.key[None], c.value[None], query_positions=pos,
                           key_positions=pos, scale=c.scaling)[0, :, token:]
        after = attention(c.query[None], k[None], v[None], query_positions=pos,
                          key_positions=pos, scale=c.scaling)[0, :, token:]
        direct = np.linalg.norm(after - before) / np.linalg.norm(before)
        # both from float32 inputs: they agree to float32 rounding of probs and outputs
        assert A.token_quantization_error(c, token, bits, 4) == pytest.approx(direct, rel=1e-3, abs=1e-6)
        assert direct > 0


def test_text_ids_and_bos(tiny):
    _, tok, _ = tiny
    ids = A.text_ids(tok, TEXT, 10)
    assert ids.shape == (1, 10) and ids[0, 0] == tok.convert_tokens_to_ids("T")
    with pytest.raises(ValueError, match="BOS"):
        A.text_ids(tok, TEXT, 10, bos=True)
    with pytest.raises(ValueError, match="tokens"):
        A.text_ids(tok, TEXT, 1)
    with pytest.raises(ValueError, match="at least 2"):
        A.text_ids(tok, "a", 10)


def test_explicit_predictor_and_no_stable_outlier(tiny, tmp_path):
    model, tok, _ = tiny
    summary = A.analyze(model, tok, TEXT, tmp_path, tokens=24, group_size=4,
                        predictor=SinkPredictor(2, (0, 5), 1e9))
    assert summary["predictor"]["predicted"] == []
    assert all(r["precision"] is None for r in summary["predictor_vs_oracle"])
    # a random model has no massive activation: no predictor, the figures still drawn
    summary = A.analyze(_random_llama(), tok, TEXT, tmp_path, tokens=24, group_size=4)
    assert summary["predictor"] is None and "ratio" in summary["predictor_error"]
    assert all("precision" not in r for r in summary["predictor_vs_oracle"])
    assert (tmp_path / "predictor.png").is_file()


def test_sdpa_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         attn_implementation="sdpa")).eval()
    with pytest.raises(ValueError, match="eager"):
        A.analyze(model, _byte_tokenizer(), TEXT, tmp_path, tokens=8)


# --------------------------------------------------------------------------- the command line

def test_cli_runs_on_a_local_folder(tiny, tmp_path, capsys):
    _, _, folder = tiny
    rc = A.analyze_main(["--model", str(folder), "--text", TEXT, "--out", str(tmp_path / "o"),
                         "--tokens", "32"])
    out = capsys.readouterr().out
    assert rc == 0 and "figures and summary.json in" in out
    assert FIGURES <= {p.name for p in (tmp_path / "o").iterdir()}
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["tokens"] == 32


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "1"], "--tokens must be >= 2"),
    (["--data", "/nonexistent/file.txt"], "--data '/nonexistent/file.txt' is not a file"),
    (["--text", "   "], "--text is empty"),
    (["--model", "/nonexistent/model.gguf", "--text", "x y"], "cannot load --model"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    assert A.analyze_main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    # progress lines ("loading ...") may come first; the error is the last line, and one line
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("kvsink analyze: error: ") and message in last
    assert "Traceback" not in err and err.count("kvsink analyze: error") == 1


def test_cli_text_and_data_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        A.analyze_main(["--text", "a", "--data", "b"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert A.analyze_main(["--text", "a b c", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "kvsink[plot]" in err and err.count("\n") == 1


def test_token_quantization_error_survives_a_logit_change_beyond_exp_range():
    """A 2-bit key of a token with a massive activation can move a logit by more than exp's range
    (here ~1600): the update must stay finite and equal the recomputed attention."""
    key = np.array([[[1000.0, 170.0, -0.7, 0.1], [1.0, 0.5, -0.5, 0.2], [0.3, -0.2, 0.4, 0.1]]], np.float32)
    value = np.array([[[1e5, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 1.0], [-1.0, 0.0, 1.0, 0.5]]], np.float32)
    # query 1 moves all its weight to token 0; query 2 gives token 0 a probability that underflows
    # to 0 while its logit still rises by ~1600 (0 * inf in the unstabilised formula)
    query = np.array([[[0.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0], [-10.0, 10.0, 0.0, 0.0]]], np.float32)
    pos = np.arange(3)[None]
    scores = np.einsum("htd,hsd->hts", query.astype(np.float64), key.astype(np.float64))
    scores = np.where(pos[0][None, :, None] >= pos[0][None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    c = A.LayerCapture(query=query, key=key, value=value, probs=probs.astype(np.float32),
                       output=(probs @ value.astype(np.float64)).astype(np.float32), scaling=1.0, softcap=None)
    k, v = key.copy(), value.copy()
    for x in (k, v):
        x[:, 0] = AQ.dequantize(AQ.quantize_per_token(torch.from_numpy(x[:, :1].copy()), 2, 4)).numpy()[:, 0]
    assert float(query[0, 1] @ (k[0, 0] - key[0, 0])) > 710          # e^delta overflows float64
    assert float(query[0, 2] @ (k[0, 0] - key[0, 0])) > 710 and c.probs[0, 2, 0] == 0
    before = attention(query[None], key[None], value[None], query_positions=pos, key_positions=pos, scale=1.0)[0]
    after = attention(query[None], k[None], v[None], query_positions=pos, key_positions=pos, scale=1.0)[0]
    direct = np.linalg.norm(after - before) / np.linalg.norm(before)
    got = A.token_quantization_error(c, 0, 2, 4)
    assert np.isfinite(got) and got == pytest.approx(direct, rel=1e-3, abs=1e-6)


def test_token_quantization_error_where_the_float32_probability_rounds_to_one():
    """A query that attends to one key with a probability that is 1 in float32 while the quantized
    key lowers its logit a lot (Qwen2.5-Coder-1.5B, decoder layer 0).  The recorded output carries
    the model's float32 rounding (here one ulp); forming ``O_j - p v_s`` by subtraction kept only
    that rounding and ``e^-Δ`` blew it up (9.6e4 instead of ~1 there).  The error must equal the
    recomputed attention."""
    # key 1's logit 38 (p = 1 - 3e-17); its 2-bit key (levels -30, -10, 10, 30) moves it to 20:
    # delta = -18, e^-delta = 7e7
    key = np.array([[[0.0, 0.0, 0.0, 0.0], [19.0, -30.0, 30.0, 0.0]]], np.float32)
    value = np.array([[[1.0, -2.0, 0.5, 3.0], [2.5, 0.7, -1.3, 0.9]]], np.float32)
    query = np.array([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]], np.float32)
    pos = np.arange(2)[None]
    scores = np.einsum("htd,hsd->hts", query.astype(np.float64), key.astype(np.float64))
    scores = np.where(pos[0][None, :, None] >= pos[0][None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    output = (probs @ value.astype(np.float64)).astype(np.float32)
    output = np.nextafter(output, np.float32(np.inf))                # the model's own rounding
    c = A.LayerCapture(query=query, key=key, value=value, probs=probs.astype(np.float32),
                       output=output, scaling=1.0, softcap=None)
    assert c.probs[0, 1, 1] == 1.0 and c.probs[0, 1, 0] > 0          # 1 in float32; the rest > 0
    k, v = key.copy(), value.copy()
    for x in (k, v):
        x[:, 1] = AQ.dequantize(AQ.quantize_per_token(torch.from_numpy(x[:, 1:2].copy()), 2, 4)).numpy()[:, 0]
    assert float(query[0, 1] @ (k[0, 1] - key[0, 1])) < -17
    before = attention(query[None], key[None], value[None], query_positions=pos, key_positions=pos, scale=1.0)[0]
    after = attention(query[None], k[None], v[None], query_positions=pos, key_positions=pos, scale=1.0)[0]
    direct = np.linalg.norm(after[:, 1:] - before[:, 1:]) / np.linalg.norm(before[:, 1:])
    got = A.token_quantization_error(c, 1, 2, 4)
    assert np.isfinite(got) and got == pytest.approx(direct, rel=1e-3, abs=1e-6)
