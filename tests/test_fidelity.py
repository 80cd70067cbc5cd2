"""Tests of bench/fidelity.py (the four-model fidelity report) on a tiny random Llama.

The model: 2 layers, hidden 32, over a byte-level tokenizer that adds a BOS (as Gemma's does), saved
with ``save_pretrained`` and loaded by path; 3 windows of 32 tokens, uniform 2-bit and KVQuant 2-bit
at 0 and 1 % outliers: a few seconds.  What is checked: the tables' structure, equal counts for
PFN-k and KVSink, every paired difference recomputed from the per-window NLLs, and resuming.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import fidelity as F
from tests.test_corpus import BOS, _tokenizer

ARGS = ["--windows", "3", "--window-length", "32", "--bits", "2", "--kvquant-bits", "2",
        "--fractions", "0,0.01", "--group-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, corpus file, predictor arguments)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from accelerated import predictor as PR
    root = tmp_path_factory.mktemp("fidelity")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=256, attn_implementation="sdpa", bos_token_id=BOS)
    model = LlamaForCausalLM(cfg).eval()
    tok = _tokenizer("adds")
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    text = (F.C.default_corpus_path().read_text(encoding="utf-8"))[:4000]
    (root / "text.txt").write_text(text)
    # a threshold that makes about one token in six a "sink" on layer 1, channel 3
    ids = F.C.make_windows(F.C.tokenize_corpus(text, tok, wikitext_rows=False), 32, 3, BOS)
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    scores = torch.stack([PR.outlier_scores(x, (3,)) for x in h]).flatten()
    thr = float(scores.kthvalue(int(scores.numel() * 5 / 6)).values)
    return root, ["--model", str(root / "tiny"), "--corpus", str(root / "text.txt"),
                  "--predictor-layer", "1", "--predictor-channels", "3", "--predictor-threshold", f"{thr!r}"]


def _run(setup, out, *extra):
    _, common = setup
    return F.main(common + ARGS + ["--out", str(out)] + list(extra))


def test_report_structure_and_paired_differences(setup, tmp_path):
    state = _run(setup, tmp_path)
    saved = json.loads((tmp_path / "tiny-text.json").read_text())
    keys = [c[0] for c in F.plan([2], [2], [0.0, 0.01])]
    assert list(saved["cells"]) == keys and saved["window_bos"] == BOS
    sinks = saved["cells"]["fp"]["kvsink_positions"]
    k = [len(s) for s in sinks]
    assert len(sinks) == 3 and all(0 < n < 32 for n in k)        # some tokens kept, not all
    for key in keys:
        c = saved["cells"][key]
        assert len(c["window_nll"]) == 3 and c["tokens"] == 3 * 31
        assert math.isclose(c["ppl"], math.exp(sum(c["window_nll"]) / c["tokens"]), rel_tol=1e-12)
        if key.endswith(("pfn-k", "kvsink")):
            assert c["kept"] == k                                  # equal counts in every window
    assert saved["cells"]["uniform/2/none"]["kept"] == [0, 0, 0]
    cal = saved["calibration_kvsink_positions"]                  # the predictor on the held-out text
    assert cal == sorted(set(cal)) and all(0 <= p < 512 for p in cal)
    for cmp in saved["comparisons"]:
        a = saved["cells"][cmp["key"]]
        b = saved["cells"][cmp["reference"]]
        d = [(x - y) / 31 for x, y in zip(a["window_nll"], b["window_nll"])]
        mean = sum(d) / 3
        se = a["ppl"] * math.sqrt(sum((x - mean) ** 2 for x in d) / 2 / 3)
        assert math.isclose(cmp["difference"], a["ppl"] - b["ppl"], rel_tol=1e-12)
        assert math.isclose(cmp["se"], se, rel_tol=1e-9)
        assert cmp["beyond_noise"] == (abs(cmp["difference"]) >= 2 * se)
    claims = [c["claim"] for c in saved["comparisons"]]
    assert claims.count("claim 1") == 1 and claims.count("claim 2a") == 2 and claims.count("claim 2b") == 2
    md = (tmp_path / "tiny-text.md").read_text()
    assert "## Uniform (KIVI-style) quantization" in md and "## KVQuant-style" in md
    assert md.count("| KVSink | 2 |") == 3 and "Pending cells: none." in md
    index = (tmp_path / "README.md").read_text()
    assert "[tiny-text](tiny-text.md)" in index and "| 8 / 8 |" in index
    assert state["cells"].keys() == saved["cells"].keys()
    assert "| tiny-text | 2 | " in index and index.count("pending") == 0        # claims 2a, 2b rows
    # --render rewrites the Markdown from the JSON alone (no model): the same text
    (tmp_path / "tiny-text.md").unlink()
    (tmp_path / "README.md").unlink()
    F.main(["--render", "--out", str(tmp_path)])
    assert (tmp_path / "tiny-text.md").read_text() == md and (tmp_path / "README.md").read_text() == index


def test_resume_skips_done_cells_and_refuses_other_settings(setup, tmp_path, monkeypatch):
    _run(setup, tmp_path)
    path = tmp_path / "tiny-text.json"
    saved = json.loads(path.read_text())
    del saved["cells"]["kvquant/2/0.01/kvsink"]
    path.write_text(json.dumps(saved))
    done = []
    real = F.run_cell
    monkeypatch.setattr(F, "run_cell", lambda *a: done.append(a[3][0]) or real(*a))
    state = _run(setup, tmp_path)
    assert done == ["kvquant/2/0.01/kvsink"]                       # only the missing cell ran
    assert state["cells"]["fp"] == saved["cells"]["fp"]
    with pytest.raises(SystemExit, match="--fresh"):
        F.main(setup[1] + ARGS[2:] + ["--windows", "2", "--out", str(tmp_path)])


def test_kvquant_cells_not_applicable_are_said_so(setup, tmp_path, monkeypatch):
    """A model whose keys the KVQuant protocol cannot un-rotate (Gemma-3's per-layer-type rotary
    embeddings) gets its uniform cells and "n/a" for the KVQuant ones, not "pending"."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM, LlamaForCausalLM
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2,
                                               num_key_value_heads=1, head_dim=16))
    assert "rotary" in F.kvquant_unavailable(gemma)
    assert F.kvquant_unavailable(LlamaForCausalLM.from_pretrained(setup[0] / "tiny")) is None
    monkeypatch.setattr(F, "kvquant_unavailable", lambda model: "no single rotary inv_freq")
    state = _run(setup, tmp_path)
    assert list(state["cells"]) == ["fp"] + [F.uniform_key(2, p) for p in ("none", "pfn-k", "kvsink")]
    md = (tmp_path / "tiny-text.md").read_text()
    assert "Not applicable to this model: no single rotary inv_freq." in md and "Pending cells: none." in md
    assert "| PFN-k | 2 | 0 % |" not in md and "Reliance on outliers" not in md
    index = (tmp_path / "README.md").read_text()
    assert "| 4 / 4 |" in index and "| tiny-text | 2 | n/a | n/a |" in index


def test_kvsink_equal_to_pfn_k_is_computed_once(setup, tmp_path, monkeypatch):
    """Where KVSink's set is the first k_w tokens of every window (here: no sink at all), its
    uniform cell is the PFN-k cell (same inputs), recorded as such; the KVQuant cells still run."""
    _, common = setup
    argv = common[:-1] + ["1e30"] + ARGS + ["--out", str(tmp_path)]
    state = F.main(argv)
    assert all(s == [] for s in state["cells"]["fp"]["kvsink_positions"])
    cell = state["cells"]["uniform/2/kvsink"]
    assert cell["same_as"] == "uniform/2/pfn-k"
    assert cell["window_nll"] == state["cells"]["uniform/2/pfn-k"]["window_nll"]
    # what computing it would have given: the windows with nothing preserved
    assert cell["window_nll"] == state["cells"]["uniform/2/none"]["window_nll"]
    assert "same_as" not in state["cells"]["kvquant/2/0/kvsink"]
    md = (tmp_path / "tiny-text.md").read_text()
    assert "1 KVSink cells have exactly their PFN-k twin's inputs" in md and "copied from it: uniform/2/kvsink." in md


def test_kvquant_kvsink_equal_to_pfn_k_when_calibration_excludes_the_same(setup, tmp_path, monkeypatch):
    """KVQuant cells are copied only when the calibration text's excluded tokens also agree."""
    _, common = setup
    argv = common[:-1] + ["1e30"] + ARGS + ["--out", str(tmp_path)]
    # no sink in any window: k = 0, PFN's calibration excludes token 0 of the held-out text
    monkeypatch.setattr(F, "calibration_sinks", lambda *a: [0])
    state = F.main(argv)
    assert state["calibration_kvsink_positions"] == [0]
    for f in ("0", "0.01"):
        assert state["cells"][f"kvquant/2/{f}/kvsink"]["same_as"] == f"kvquant/2/{f}/pfn-k"
    real = F.same_inputs(dict(state, calibration_kvsink_positions=[]), "kvquant")
    assert real is False and F.same_inputs(state, "uniform") is True
