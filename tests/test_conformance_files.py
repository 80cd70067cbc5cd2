"""The conformance suite's file route (docs/13-conformance.md §13.9) and its pytest plugin.

export -> a port's outputs (conformance/examples/write_outputs.py) -> check_outputs: the
reference and the minimal port pass; a missing file, a wrong dtype or shape, a wrong value
and vectors that are not this kvsink's are each reported, naming the case and the problem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conformance import check_outputs as co
from conformance import export as ex
from conformance import plugin
from conformance.adapter import load_port
from conformance.examples import write_outputs as wo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("vectors")
    ex.export(d)
    return d


@pytest.fixture(scope="module")
def reference_outputs(vectors, tmp_path_factory):
    d = tmp_path_factory.mktemp("reference-outputs")
    assert wo.write_outputs(vectors, d, load_port("reference")) == len(json.loads(
        (vectors / "manifest.json").read_text())["cases"])
    return d


@pytest.fixture
def outputs(reference_outputs, tmp_path):
    """A copy of the reference's outputs that a test may damage."""
    d = tmp_path / "outputs"
    shutil.copytree(reference_outputs, d)
    return d


def outcome(results, name):
    return next(r for r in results if r.name == name)


def test_manifest_describes_every_case(vectors):
    m = json.loads((vectors / "manifest.json").read_text())
    assert m["format"] == "kvsink-conformance-files"
    for case in m["cases"]:
        assert case["definition"]["doc"].startswith("docs/") and case["definition"]["reference"]
        assert case["tolerance"] and case["outputs"], case["name"]
        for name, meta in case["arrays"].items():
            a = np.load(vectors / meta["file"])
            assert list(a.shape) == meta["shape"] and a.dtype == np.dtype(meta["dtype"]), (case["name"], name)


def test_reference_and_minimal_port_pass(vectors, reference_outputs, tmp_path):
    results = co.check_outputs(vectors, reference_outputs)
    assert [r for r in results if r.outcome != "passed"] == []
    wo.write_outputs(vectors, tmp_path, load_port("conformance.examples.minimal_port:factory"))
    results = co.check_outputs(vectors, tmp_path)
    skipped = {r.name for r in results if r.outcome == "skipped"}
    assert [r for r in results if r.outcome == "failed"] == []
    assert "preserve_first_n" in skipped and "packing_b3" not in skipped


def test_missing_file(vectors, outputs):
    (outputs / "packing_b3" / "words.npy").unlink()
    r = outcome(co.check_outputs(vectors, outputs), "packing_b3")
    assert r.outcome == "failed" and "missing file" in r.message and "packing_b3/words.npy" in r.message


def test_wrong_dtype_and_shape(vectors, outputs):
    codes = np.load(outputs / "quantize_03" / "codes.npy")
    np.save(outputs / "quantize_03" / "codes.npy", codes.astype(np.int64))
    np.save(outputs / "attention_1" / "output.npy", np.load(outputs / "attention_1" / "output.npy")[..., :-1])
    results = co.check_outputs(vectors, outputs)
    r = outcome(results, "quantize_03")
    assert r.outcome == "failed" and "dtype <i8" in r.message and "expected |u1" in r.message
    r = outcome(results, "attention_1")
    assert r.outcome == "failed" and "shape" in r.message


def test_wrong_values_break_the_rules(vectors, outputs):
    scale = np.load(outputs / "quantize_00" / "scale.npy")
    scale.flat[3] = np.nextafter(scale.flat[3], np.float32(np.inf))     # one ulp: must be identical
    np.save(outputs / "quantize_00" / "scale.npy", scale)
    nbytes = np.load(outputs / "cache_kivi" / "nbytes.npy")
    np.save(outputs / "cache_kivi" / "nbytes.npy", nbytes + 1)
    mask = np.load(outputs / "kvquant_value_outliers_0" / "mask.npy")
    mask.flat[0] = ~mask.flat[0]
    np.save(outputs / "kvquant_value_outliers_0" / "mask.npy", mask)
    out = np.load(outputs / "attention_0" / "output.npy")
    i = int(np.argmax(np.abs(out)))                                     # a visible output
    out.flat[i] += 1 + abs(float(out.flat[i]))                          # far beyond the 9.3 bound
    np.save(outputs / "attention_0" / "output.npy", out)
    results = co.check_outputs(vectors, outputs)
    failed = {r.name: r.message for r in results if r.outcome == "failed"}
    assert set(failed) == {"quantize_00", "cache_kivi", "kvquant_value_outliers_0", "attention_0"}
    assert "scale" in failed["quantize_00"] and "nbytes" in failed["cache_kivi"]


def test_undeclared_parts_are_skipped(vectors, outputs):
    (outputs / "port.json").write_text(json.dumps({"name": "packing only", "parts": ["packing"]}))
    results = co.check_outputs(vectors, outputs)
    assert {r.outcome for r in results if r.name.startswith("packing_")} == {"passed"}
    assert {r.outcome for r in results if not r.name.startswith("packing_")} == {"skipped"}


def test_vectors_of_another_version_are_a_usage_error(vectors, reference_outputs, tmp_path):
    other = tmp_path / "vectors"
    shutil.copytree(vectors, other)
    m = json.loads((other / "manifest.json").read_text())
    m["cases"][0]["arrays"]["codes"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(co.UsageError, match="not this kvsink's golden vector"):
        co.check_outputs(other, reference_outputs)
    with pytest.raises(co.UsageError, match="manifest.json not found"):
        co.check_outputs(tmp_path / "nowhere", reference_outputs)


def test_command_line(vectors, outputs, tmp_path):
    (outputs / "preserved_set" / "mask.npy").unlink()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "conformance.check_outputs", str(vectors), str(outputs)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "FAILED   preserved_set: missing file" in run.stdout
    cases = len(json.loads((vectors / "manifest.json").read_text())["cases"])
    assert run.stdout.strip().splitlines()[-1].startswith(f"{cases - 1} passed, 1 failed, 0 skipped")
    run = subprocess.run([sys.executable, "-m", "conformance.export", str(vectors)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 2 and "not empty" in run.stderr and "Traceback" not in run.stderr


def test_plugin_is_selected_only_for_the_suite(pytestconfig):
    class Config:
        def __init__(self, args, pyargs=False, impl=None):
            self.args, self._opts = args, {"--impl": impl, "--profile": None, "pyargs": pyargs}
            self.invocation_params = type("P", (), {"dir": Path("/")})()

        def getoption(self, name, default=None):
            return self._opts.get(name, default)

    suite = str(ROOT / "conformance")
    assert plugin.suite_selected(Config([suite]))
    assert plugin.suite_selected(Config([suite + "/test_packing.py::test_x"]))
    assert not plugin.suite_selected(Config([str(ROOT)]))          # an ancestor (a project holding
    assert not plugin.suite_selected(Config(["/"]))                   # its venv) is not the suite
    assert plugin.suite_selected(Config(["conformance"], pyargs=True))
    assert plugin.suite_selected(Config([str(ROOT / "tests")], impl="reference"))
    assert not plugin.suite_selected(Config([str(ROOT / "tests")]))
    assert not plugin.suite_selected(Config(["conformance_other"], pyargs=True))


def test_suite_runs_from_any_directory(tmp_path):
    """``python -m conformance`` (= ``pytest --pyargs conformance``) outside the checkout: the
    plugin's options, the report header naming the port, the port's results."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "conformance", "--impl",
                          "conformance.examples.minimal_port:factory", "-k", "packing_b1 or preserve_first_n",
                          "-rs"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "kvsink conformance: impl='conformance.examples.minimal_port:factory' (minimal numpy port" in run.stdout
    assert "does not implement part 'preserve'" in run.stdout
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed, " in summary and " skipped, " in summary and "failed" not in summary, summary


def test_write_outputs_reports_a_bad_impl_without_traceback(vectors, tmp_path, capsys):
    assert wo.main([str(vectors), str(tmp_path / "out"), "--impl", "no_such_module:factory"]) == 2
    err = capsys.readouterr().err
    assert "could not load --impl 'no_such_module:factory'" in err and "Traceback" not in err
    assert wo.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "conformance.export" in capsys.readouterr().err
