"""accelerated.models.load_model with a local GGUF file: no network, no cached default model.

A one-layer Llama with a 264-token byte-level BPE vocabulary is written with the
``gguf`` package's writer into a temporary folder (~50 kB, float32 tensors), then
loaded by path; the hub is switched off (``HF_HUB_OFFLINE=1``) so a fallback to a
download would fail instead of passing silently.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from accelerated.models import load_model  # noqa: E402

V, D, H, KV, F = 264, 16, 2, 1, 32


def _byte_tokens():
    """GPT-2's byte-to-unicode table (the alphabet of a byte-level BPE vocabulary), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    return [table[b] for b in range(256)]


def _write_tiny_llama(path):
    rng = np.random.default_rng(0)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    tensors = {"token_embd.weight": t(V, D), "output_norm.weight": np.ones(D, np.float32),
               "output.weight": t(V, D), "blk.0.attn_norm.weight": np.ones(D, np.float32),
               "blk.0.ffn_norm.weight": np.ones(D, np.float32), "blk.0.attn_q.weight": t(D, D),
               "blk.0.attn_k.weight": t(KV * D // H, D), "blk.0.attn_v.weight": t(KV * D // H, D),
               "blk.0.attn_output.weight": t(D, D), "blk.0.ffn_gate.weight": t(F, D),
               "blk.0.ffn_up.weight": t(F, D), "blk.0.ffn_down.weight": t(D, F)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(D // H)
    tokens = ["<unk>", "<s>", "</s>"] + _byte_tokens() + ["Ġt", "he", "Ġthe", "in", "er"]
    assert len(tokens) == V
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["Ġ t", "h e", "Ġt he", "i n", "e r"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, _write_tiny_llama(path)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("as_str", [True, False])
def test_load_model_reads_a_local_gguf_file(tiny_gguf, as_str):
    path, tensors = tiny_gguf
    model, tok = load_model(str(path) if as_str else path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (1, D, H, KV, F, V)
    assert model.dtype == torch.float32 and not model.training
    # float32 tensors round-trip exactly (q/k are permuted by the loader for RoPE; v, embeddings are not)
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), tensors["token_embd.weight"])
    np.testing.assert_array_equal(model.model.layers[0].self_attn.v_proj.weight.detach().numpy(),
                                  tensors["blk.0.attn_v.weight"])
    np.testing.assert_array_equal(model.model.layers[0].mlp.down_proj.weight.detach().numpy(),
                                  tensors["blk.0.ffn_down.weight"])
    # the tokenizer comes from the same file: " the" is the merged token 261
    ids = tok(" the", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[261]]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 1, V) and torch.isfinite(logits).all()


def test_load_model_gguf_dtype_and_device(tiny_gguf):
    path, tensors = tiny_gguf
    model, _ = load_model(str(path), dtype=torch.float64, device="cpu")
    assert model.dtype == torch.float64
    assert model.model.embed_tokens.weight.device.type == "cpu"
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(),
                                  tensors["token_embd.weight"].astype(np.float64))


def test_load_model_missing_gguf_is_a_clear_error(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match="absent.gguf.*not a file"):
        load_model(str(missing))
    folder = tmp_path / "folder.GGUF"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_model(folder)
