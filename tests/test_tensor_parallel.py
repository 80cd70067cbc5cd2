"""KVSinkCache under transformers' tensor parallelism on CPU (gloo), two ranks (docs/11 §11.10).

``bench/tp_check.py`` runs the same cases on one process and under ``torchrun`` with
``tp_plan="auto"``; this test compares the two.  Each rank must hold only its own KV heads,
generate the same tokens as one process at 8 bit (greedy and beam), see the same sinks (the
predictor reads the replicated hidden state), and hold exactly its share of the bytes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
if not torch.distributed.is_available():                      # pragma: no cover
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "bench" / "tp_check.py")
WORLD = 2

pytestmark = pytest.mark.slow


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    model = str(tmp / "tiny")
    _run([SCRIPT, "--make-tiny", model], tmp)
    _run([SCRIPT, "--model", model, "--out", str(tmp / "one.json")], tmp)
    _run(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", SCRIPT,
          "--model", model, "--out", str(tmp / "tp.json")], tmp)
    one = json.loads((tmp / "one.json").read_text())
    tp = json.loads((tmp / "tp.json").read_text())
    assert one["world_size"] == 1 and tp["world_size"] == WORLD and len(tp["ranks"]) == WORLD
    return one["ranks"][0], tp["ranks"]


EIGHT_BIT = ["greedy_8bit_pfn", "greedy_8bit_kvsink", "beam3_8bit_kvsink"]
UNIFORM = EIGHT_BIT + ["greedy_2bit_kvsink"]


@pytest.mark.parametrize("case", ["fp_greedy"] + EIGHT_BIT)
def test_each_rank_generates_the_tokens_of_one_process(runs, case):
    one, ranks = runs
    for r in ranks:
        assert r["cases"][case]["tokens"] == one["cases"][case]["tokens"], (r["rank"], case)


@pytest.mark.parametrize("case", UNIFORM + ["greedy_4bit_kvquant_nf"])
def test_each_rank_holds_only_its_own_kv_heads(runs, case):
    one, ranks = runs
    heads = one["model_kv_heads"]
    assert one["cases"][case]["kv_heads"] == [heads] * len(one["cases"][case]["kv_heads"])
    for r in ranks:
        assert r["cases"][case]["kv_heads"] == [heads // WORLD] * len(r["cases"][case]["kv_heads"])


@pytest.mark.parametrize("case", UNIFORM)
def test_bytes_split_by_heads_and_per_row_state_is_held_by_every_rank(runs, case):
    """Definition 6.17 is affine in H: ``nbytes = H*a + m`` with ``m`` the per-row state (coded
    flags, preserved positions, residual valid/status). Each of W ranks holds ``H/W*a + m``."""
    one, ranks = runs
    single = one["cases"][case]
    m = sum(single["per_row_bytes"])
    for r in ranks:
        assert sum(r["cases"][case]["per_row_bytes"]) == m
    assert sum(r["cases"][case]["nbytes"] for r in ranks) == single["nbytes"] + (WORLD - 1) * m


@pytest.mark.parametrize("case", ["greedy_8bit_kvsink", "greedy_2bit_kvsink"])
def test_every_rank_predicts_the_sinks_of_one_process(runs, case):
    one, ranks = runs
    assert any(one["cases"][case]["preserved"]), "the tiny model's predictor should find a sink"
    for r in ranks:
        assert r["cases"][case]["preserved"] == one["cases"][case]["preserved"]
        for key in ("predictor_layer", "predictor_channels"):
            assert r["predictor"][key] == one["predictor"][key]


@pytest.mark.parametrize("bits", [2, 4])
def test_kl_per_token_is_reported_for_every_rank(runs, bits):
    _, ranks = runs
    for r in ranks:
        kl = r["cases"][f"kl_{bits}bit_kvsink"]["kl_per_token"]
        assert len(kl) == 12 and all(math.isfinite(x) for x in kl)
        assert r["cases"][f"kl_{bits}bit_kvsink"]["mean_kl"] == pytest.approx(sum(kl) / len(kl))
