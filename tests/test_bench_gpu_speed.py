"""bench/gpu_speed.py (issue 9's benchmark) on the CPU: its --tiny self-run end to end, its
command-line errors, the time budget, and the arithmetic of its report and largest-batch estimate.
The GPU numbers themselves are measured on the device, never asserted here (no timed tests)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import needs_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBERS = ("prefill_s", "decode_ms_per_token", "tokens_per_s", "warmup_s")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
@needs_hf
def test_tiny_run_measures_every_cell(tmp_path):
    """The CPU self-test in a subprocess: every (B, cache) cell has finite, consistent numbers,
    the kvsink cache holds fewer bytes than DynamicCache, and the tables and figure are written."""
    out = tmp_path / "speed"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_speed.py"), "--tiny",
                           "--caches", "dynamic,kvsink2,kvsink2-static", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu_speed.json").read_text())
    assert res["complete"] is True
    assert res["environment"]["torch"] == torch.__version__
    cells = {(c["batch"], c["cache"]): c for c in res["cells"]}
    assert len(cells) == len(res["cells"]) == 6
    for batch in (1, 2):
        for cache in ("dynamic", "kvsink2"):
            c = cells[(batch, cache)]
            assert c["status"] == "ok" and c["model"] == "tiny" and c["ctx"] == 64, c
            for key in NUMBERS:
                assert math.isfinite(c[key]) and c[key] > 0, (key, c)
            assert len(c["decode_ms_rounds"]) == 2
            assert all(math.isfinite(x) and x > 0 for x in c["decode_ms_rounds"])
            assert c["decode_ms_per_token"] in c["decode_ms_rounds"]
            assert c["tokens_per_s"] == pytest.approx(batch * 1e3 / c["decode_ms_per_token"])
            assert c["steps"] == 1 + 2 + 2 * 4
            assert isinstance(c["cache_nbytes"], int) and c["cache_nbytes"] > 0
        # DynamicCache: bf16 K and V of 2 layers x 2 KV heads x 64 dims x (64 + 10) tokens
        assert cells[(batch, "dynamic")]["cache_nbytes"] == batch * 2 * 2 * 2 * 64 * 74 * 2
        assert cells[(batch, "kvsink2")]["cache_nbytes"] < cells[(batch, "dynamic")]["cache_nbytes"]
        static = cells[(batch, "kvsink2-static")]
        assert static["status"] == "ok" and static["cache_nbytes"] > 0, static
    md = (out / "gpu_speed.md").read_text()
    assert "| `dynamic` |" in md and "| `kvsink2` |" in md and "B=2, N=64" in md
    assert (out / "gpu_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--caches", "dynamic,nope"], "--caches: unknown cache name(s) ['nope']"),
    (["--caches", "dynamic,kvsink2,dynamic"], "--caches: ['dynamic'] listed more than once"),
    (["--model", "llama9"], "--model: unknown model(s) ['llama9']"),
    (["--memory-gib", "0"], "--memory-gib must be > 0"),
    (["--batch", "1,x"], "--batch takes comma-separated positive integers"),
    (["--ctx", "0"], "--ctx takes comma-separated positive integers"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
])
def test_bad_arguments_name_the_option(argv, message, capsys):
    from bench.gpu_speed import parse_args
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_tiny_defaults_give_way_to_explicit_options():
    from bench.gpu_speed import parse_args
    args = parse_args(["--tiny", "--batch", "3", "--caches", "dynamic"])
    assert args.batch == [3] and [v.name for v in args.variants] == ["dynamic"]
    assert args.ctx == [64] and args.model == "tiny" and args.no_kernels
    full = parse_args([])
    assert full.batch == [1, 8, 32] and full.ctx == [4096, 32768] and len(full.variants) == 6


@needs_hf
def test_time_budget_skips_and_records_every_cell(tmp_path):
    """A budget already spent: no cell runs, each is recorded as skipped with the reason, and the
    run still completes with its JSON and tables."""
    from bench.gpu_speed import main
    assert main(["--tiny", "--time-budget-s", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert res["complete"] and len(res["cells"]) == 4
    assert all(c["status"] == "skipped" and c["reason"].startswith("time budget") for c in res["cells"])
    assert "time budget" in (tmp_path / "gpu_speed.md").read_text()


@needs_hf
def test_quanto_without_its_wheels_is_skipped_with_the_reason(tmp_path):
    """optimum-quanto missing and no wheel folder: its cells are skipped and say why."""
    import importlib.util
    if importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto"):
        pytest.skip("optimum-quanto is installed here: the missing-package path cannot be taken")
    from bench.gpu_speed import main
    missing = str(tmp_path / "no-wheels")
    assert main(["--tiny", "--caches", "quanto2", "--quanto-wheels", missing, "--time-budget-s", "0",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert "no-wheels" in res["environment"]["quanto"]["error"]
    assert [c["status"] for c in res["cells"]] == ["skipped", "skipped"]
    assert all("optimum-quanto" in c["reason"] for c in res["cells"])


def _cell(cache, batch, ms, prefill, status="ok", peak_gib=3.0):
    return {"model": "m", "batch": batch, "ctx": 4096, "cache": cache, "status": status,
            "decode_ms_per_token": ms, "prefill_s": prefill, "tokens_per_s": batch * 1e3 / ms,
            "cache_nbytes": 2 ** 30, "peak_bytes": int(peak_gib * 2 ** 30)}


def test_report_ratios_against_baselines_of_the_same_run():
    from bench.speed_report import markdown
    caches = {"dynamic": {"family": "dynamic", "bits": None}, "static-compiled": {"family": "static", "bits": None},
              "quanto2": {"family": "quanto", "bits": 2}, "kvsink2": {"family": "kvsink", "bits": 2}}
    res = {"environment": {"device": "d", "torch": "t", "transformers": "x"}, "models": {"m": {}},
           "caches": caches, "complete": True, "max_batch": [], "kernels": None,
           "cells": [_cell("dynamic", 1, 40.0, 1.0), _cell("static-compiled", 1, 10.0, 2.0),
                     _cell("quanto2", 1, 20.0, 1.5), _cell("kvsink2", 1, 5.0, 3.0, peak_gib=1.5),
                     _cell("kvsink2", 8, 5.0, 3.0, status="OOM")]}
    res["max_batch"] = [
        {"model": "m", "cache": "dynamic", "ctx": 32768, "status": "ok", "estimate": 12, "batch": 10,
         "tokens_per_s": 100.0},
        {"model": "m", "cache": "kvsink2", "ctx": 32768, "status": "ok", "estimate": 60, "batch": 60,
         "tokens_per_s": 450.0},
        {"model": "m", "cache": "quanto2", "ctx": 32768, "status": "skipped", "reason": "time budget"}]
    res["kernels"] = {"copy_Bps": 3e12, "cases": [
        {"model": "m", "batch": 1, "ctx": 32768, "bits": 2, "bytes": 33.8e6, "floor_us": 11.3,
         "api_us": 140.0, "graph_us": 20.0, "achieved_Bps": 1.69e12, "fraction_of_copy": 0.5633},
        {"model": "m", "batch": 8, "ctx": 32768, "bits": 4, "status": "OOM"}]}
    md = markdown(res)
    assert "| m | `kvsink2` | 60 | 60 | 450 | dynamic ×4.50 |" in md
    assert "| m | `quanto2` | – | skipped | – | – |" in md
    assert "(copy bandwidth 3.00 TB/s, read + write)" in md
    assert "| m | 1 | 32k | 2 | 33.8 | 11.3 | 140.0 | 20.0 | 1.69 (56 %) |" in md
    assert "| m | 8 | 32k | 4 | OOM |" in md
    assert "| `kvsink2` | 5.0 (3.00) | OOM |" in md
    assert "S 0.50 · Q 0.25 · P 3.00 · M 0.50" in md  # 5/10, 5/20, 3/1, 1.5/3
    assert "| `quanto2` | S 2.00 · P 1.50 · M 1.00 |" in md     # quanto is not compared with itself
    assert "| `static-compiled` | P 2.00 · M 1.00 |" in md
    assert "| `dynamic` | S 4.00 |" in md
    assert "1.50 / 1.00" in md                          # peak GiB / cache GiB


def test_max_batch_estimate_from_measured_bytes_per_sequence():
    from bench.speed_maxbatch import LIMIT, MARGIN, estimate
    gib = 2 ** 30
    est = estimate({"peak_bytes": 16 * gib + 2 * 5 * gib, "batch": 2}, weights=16 * gib, free=60 * gib)
    assert est["bytes_per_sequence"] == 5 * gib
    assert est["estimate"] == int(MARGIN * 60 * gib // (5 * gib)) == 11
    tiny = estimate({"peak_bytes": 16 * gib + 1, "batch": 1}, weights=16 * gib, free=60 * gib)
    assert tiny["estimate"] == LIMIT


def test_qtensor_bytes_follows_tensor_subclasses():
    from bench.speed_caches import qtensor_bytes

    class Packed:                        # the shape of quanto's PackedTensor / QBitsTensor
        def __init__(self, **parts):
            self.__dict__.update(parts)

        def __tensor_flatten__(self):
            return list(self.__dict__), None
    inner = Packed(_data=torch.zeros(10, dtype=torch.uint8))
    outer = Packed(_data=inner, _scale=torch.zeros(3, dtype=torch.bfloat16),
                   _shift=torch.zeros(3, dtype=torch.float32))
    assert qtensor_bytes(outer) == 10 + 6 + 12
    assert qtensor_bytes(torch.zeros(4, dtype=torch.float32)) == 16 and qtensor_bytes(None) == 0


def test_budget_counts_compilations_as_transformers_does():
    """CompileConfig(dynamic=None): the first two shapes compile (the second with dynamic
    dimensions), later ones reuse it; dynamic=False: every new shape; eager caches: none."""
    from bench.gpu_speed import Budget
    from bench.speed_caches import VARIANTS
    from bench.speed_models import SHAPES

    class Opt:
        compile_dynamic, compile_estimate_s = None, 75.0
        warmup_steps, rounds, decode_tokens = 4, 3, 16
    static, dyn = VARIANTS["static-compiled"], VARIANTS["dynamic"]
    budget = Budget(None, Opt, SHAPES["llama3-8b"])
    seen = []
    for shape in [(1, 4096), (8, 4096), (32, 4096), (1, 4096)]:
        seen.append(budget.compiles(static, *shape))
        budget.ran(static, *shape)
    assert seen == [True, True, False, False]
    assert not budget.compiles(dyn, 1, 4096)
    Opt.compile_dynamic = False
    fresh = Budget(None, Opt, SHAPES["llama3-8b"])
    for shape in [(1, 4096), (8, 4096), (32, 4096)]:
        assert fresh.compiles(static, *shape)
        fresh.ran(static, *shape)
    assert not fresh.compiles(static, 8, 4096)


def test_unreadable_inputs_are_reported_without_traceback(tmp_path, capsys):
    from bench.gpu_speed import main
    missing = str(tmp_path / "missing.json")
    assert main(["--tiny", "--max-batch", "--max-batch-reference", missing, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "--max-batch-reference" in err


def test_a_reference_measured_with_another_prefill_chunk_is_refused(tmp_path, capsys):
    """The largest-batch estimate's reference cells must share the run's ``--prefill-chunk``
    (the prefill's activations scale with it): otherwise a clear error, no traceback."""
    import json

    from bench.gpu_speed import main
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"options": {"prefill_chunk": None}, "cells": []}))
    argv = ["--tiny", "--skip-grid", "--max-batch", "--max-batch-reference", str(ref), "--out", str(tmp_path)]
    assert main(argv + ["--prefill-chunk", "4096"]) == 2
    err = capsys.readouterr().err
    assert "--prefill-chunk None" in err and "uses 4096" in err and "ref.json" in err
    ref.write_text(json.dumps({"options": {"prefill_chunk": 4096}, "cells": []}))
    from bench.gpu_speed import parse_args, read_reference
    assert read_reference(parse_args(argv + ["--prefill-chunk", "4096"])) == []


GIB = 2 ** 30


def _max_batch_setup():
    """A model of 80 bytes of weights, the measured DynamicCache cell at N=32k (B=2, 1 GiB per
    sequence) and a time budget that never skips: the inputs of ``largest_batches``."""
    from types import SimpleNamespace
    model = torch.nn.Linear(4, 4)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ref = {"model": "m", "cache": "dynamic", "ctx": 32768, "batch": 2, "status": "ok",
           "peak_bytes": weights + 2 * GIB, "tokens_per_s": 10.0, "decode_ms_per_token": 200.0}
    budget = SimpleNamespace(skip_reason=lambda *a: None, ran=lambda *a: None)
    return model, weights, ref, budget


def test_largest_batch_runs_the_estimate_and_retries_after_oom():
    """The estimate is run; an OOM there is retried at 0.85x; a cache without a measured
    reference cell (here or in the reference file) is skipped with the reason."""
    from types import SimpleNamespace

    from bench.speed_caches import VARIANTS
    from bench.speed_maxbatch import MARGIN, RETRY, largest_batches
    model, weights, ref, budget = _max_batch_setup()
    from_file = dict(ref, cache="kvsink2", peak_bytes=weights + GIB // 2, reference="B.json")
    options = SimpleNamespace(max_batch_ctx=32768, reference_cells=[from_file],
                              variants=[VARIANTS["dynamic"], VARIANTS["kvsink2"], VARIANTS["quanto2"]])
    ran = []

    def run_cell(model, variant, batch, ctx, options, clock):
        ran.append((variant.name, batch))
        if len(ran) == 1:
            return {"status": "OOM", "error": "CUDA out of memory"}
        return {"status": "ok", "tokens_per_s": batch * 5.0, "decode_ms_per_token": 200.0,
                "peak_bytes": 1, "prefill_s": 1.0}
    result = {"cells": [ref], "max_batch": []}
    largest_batches(model, SimpleNamespace(name="m"), options, None, budget, result, lambda: None,
                    run_cell, free=40 * GIB)
    dyn, kv, qu = result["max_batch"]
    first = int(MARGIN * 40 * GIB // GIB)                    # 1 GiB per sequence -> 38
    assert dyn["estimate"] == first and dyn["status"] == "ok" and dyn["batch"] == int(RETRY * first)
    assert [a["status"] for a in dyn["attempts"]] == ["OOM", "ok"]
    assert kv["estimate"] == int(MARGIN * 40 * GIB // (GIB // 4)) and kv["batch"] == kv["estimate"]
    assert ran == [("dynamic", first), ("dynamic", int(RETRY * first)), ("kvsink2", kv["estimate"])]
    assert qu["status"] == "skipped"           # no quanto cell anywhere (or no optimum-quanto here)
    assert "no measured cell of this cache at N=32768" in qu["reason"] or "optimum-quanto" in qu["reason"]


def test_largest_batch_retries_twice_then_reports_oom():
    """After an OOM the batch shrinks by 0.85x at most RETRIES (2) times: a third OOM ends the
    search with status OOM and every attempt recorded."""
    import math
    from types import SimpleNamespace

    from bench.speed_caches import VARIANTS
    from bench.speed_maxbatch import RETRIES, RETRY, largest_batches
    model, _, ref, budget = _max_batch_setup()
    for fails in (2, 3):
        ran = []

        def run_cell(model, variant, batch, ctx, options, clock):
            ran.append(batch)
            if len(ran) <= fails:
                return {"status": "OOM", "error": "CUDA out of memory"}
            return {"status": "ok", "tokens_per_s": batch * 5.0, "decode_ms_per_token": 200.0,
                    "peak_bytes": 1, "prefill_s": 1.0}
        options = SimpleNamespace(max_batch_ctx=32768, reference_cells=[], variants=[VARIANTS["dynamic"]])
        result = {"cells": [ref], "max_batch": []}
        largest_batches(model, SimpleNamespace(name="m"), options, None, budget, result,
                        lambda: None, run_cell, free=40 * GIB)
        (rec,) = result["max_batch"]
        want = [rec["estimate"]]
        for _ in range(RETRIES):
            want.append(math.floor(RETRY * want[-1]))
        assert ran == want[:fails + 1]
        assert rec["status"] == ("ok" if fails <= RETRIES else "OOM")
        assert [a["status"] for a in rec["attempts"]] == ["OOM"] * fails + ["ok"] * (fails <= RETRIES)


def test_decode_profile_attributes_each_sync_to_its_step():
    """bench/gpu_decode_profile.py counts a step's synchronisations by their start time inside the
    step's profiler range (start inclusive, end exclusive); one outside every step counts nowhere."""
    from bench.gpu_decode_profile import syncs_per_step
    assert syncs_per_step([(0, 10), (10, 20), (30, 40)], [1, 5, 10, 25, 39.5, 40]) == [2, 1, 1]
    assert syncs_per_step([], [1, 2]) == []


def test_prefill_chunk_reaches_generate():
    """``--prefill-chunk`` is handed to every cell's ``generate`` as ``prefill_chunk_size`` (and
    nothing is when it is not given: transformers' one-forward prefill)."""
    from types import SimpleNamespace

    from bench.gpu_speed import Clock, generate_timed, parse_args
    seen = []

    class Model:
        def forward(self, input_ids=None, cache=None):
            raise AssertionError("not called")

        def generate(self, ids, **kwargs):
            seen.append(kwargs)
    variant = SimpleNamespace(generate_kwargs=lambda options: {})
    for argv, want in ((["--tiny", "--prefill-chunk", "24"], 24), (["--tiny"], None)):
        options = parse_args(argv)
        generate_timed(Model(), variant, "CACHE", torch.zeros(1, 4, dtype=torch.long), 2, Clock("cpu"), options)
        assert seen[-1]["cache"] == "CACHE"
        assert seen[-1].get("prefill_chunk_size") == want
