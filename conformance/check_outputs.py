"""Check a port's output files against the golden vectors (the file route, docs/13-conformance.md §13.9).

    python -m conformance.check_outputs VECTORS_DIR OUTPUTS_DIR [-v]

``VECTORS_DIR`` is a directory written by ``python -m conformance.export``;
``OUTPUTS_DIR`` holds the port's ``<case>/<output>.npy`` files (names, dtypes and
shapes in the manifest's ``outputs``) and, optionally, ``port.json``
``{"name": ..., "parts": [...]}``.  Every case of a declared part is judged by
the checks of the Python route (``conformance.test_vectors.test_port_matches_vector``
with :class:`conformance.file_route.ReplayPort`), i.e. the rules of
docs/09-tolerances.md as conformance/tolerances.py implements them.  A case
fails with the first problem found: a missing file, a wrong dtype or shape, or
the rule that an output breaks.  Cases of undeclared parts are skipped.

Prints one line per failed (``-v``: per every) case and ``N passed, N failed,
N skipped``; exit status 0 when nothing failed, 1 otherwise, 2 for a usage
error (a directory or manifest that is not there or not of this kvsink).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

from . import file_route as fr
from . import make_vectors as mv
from . import test_vectors

__all__ = ["CaseResult", "UsageError", "check_outputs", "main"]


class UsageError(Exception):
    """The directories given cannot be checked (named in the message)."""


@dataclass
class CaseResult:
    name: str
    outcome: str        # "passed", "failed" or "skipped"
    message: str = ""


def _manifest(vectors: Path) -> dict:
    path = vectors / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{path} not found: VECTORS_DIR must be a directory written by "
                         f"`python -m conformance.export {vectors}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != fr.FORMAT or manifest.get("version") != fr.VERSION:
        raise UsageError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {fr.FORMAT!r} version {fr.VERSION}")
    packaged = {c["name"]: c for c in test_vectors.MANIFEST["cases"]}
    for case in manifest["cases"]:
        mine = packaged.get(case["name"])
        sums = {n: m["sha256"] for n, m in case["arrays"].items()}
        if mine is None or sums != {n: m["sha256"] for n, m in mine["arrays"].items()}:
            raise UsageError(f"{path}: case {case['name']!r} is not this kvsink's golden vector (exported by "
                             "another version?); export again with `python -m conformance.export`")
    if len(manifest["cases"]) != len(packaged):
        raise UsageError(f"{path}: {len(manifest['cases'])} cases, this kvsink has {len(packaged)}; "
                         "export again with `python -m conformance.export`")
    return manifest


def _check_case(vectors: Path, outputs: Path, case: dict, port_info: dict) -> CaseResult:
    name = case["name"]
    if case["part"] not in port_info["parts"]:
        return CaseResult(name, "skipped", f"the port does not declare part {case['part']!r}")
    try:
        golden = fr.load_case_arrays(vectors, case)
        optional = {n for n in case["outputs"] if case["function"] == "kvquant_quantize_block"
                    and n.endswith("_words") and "packing" not in port_info["parts"]}
        got = {n: fr.read_output(outputs, name, n, spec) for n, spec in case["outputs"].items()
               if n not in optional or (outputs / spec["file"]).exists()}
        port = fr.ReplayPort(port_info["name"], port_info["parts"], case, got, golden)
        test_vectors.test_port_matches_vector(port, name)
    except pytest.skip.Exception as exc:
        return CaseResult(name, "skipped", str(exc))
    except (AssertionError, fr.OutputError) as exc:
        return CaseResult(name, "failed", str(exc) or type(exc).__name__)
    except Exception as exc:  # a malformed output that a check could not even compare
        return CaseResult(name, "failed", f"{type(exc).__name__}: {exc}")
    return CaseResult(name, "passed")


def check_outputs(vectors, outputs) -> List[CaseResult]:
    """Judge every case; the results in manifest order."""
    vectors, outputs = Path(vectors), Path(outputs)
    if sys.flags.optimize:
        raise UsageError("the checks are assert statements, which python -O removes; run without -O")
    if not outputs.is_dir():
        raise UsageError(f"OUTPUTS_DIR {outputs} is not a directory")
    manifest = _manifest(vectors)
    try:
        port_info = fr.read_port_json(outputs)
    except (fr.OutputError, json.JSONDecodeError) as exc:
        raise UsageError(str(exc)) from exc
    return [_check_case(vectors, outputs, case, port_info) for case in manifest["cases"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.check_outputs",
                                 description="Check a port's output files against the golden vectors "
                                             "(docs/13-conformance.md 13.9).")
    ap.add_argument("vectors", help="directory written by `python -m conformance.export`")
    ap.add_argument("outputs", help="directory of the port's <case>/<output>.npy files")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case, passed ones included")
    args = ap.parse_args(argv)
    try:
        results = check_outputs(args.vectors, args.outputs)
    except UsageError as exc:
        print(f"conformance.check_outputs: {exc}", file=sys.stderr)
        return 2
    counts = {k: 0 for k in ("passed", "failed", "skipped")}
    for r in results:
        counts[r.outcome] += 1
        if r.outcome == "failed" or args.verbose:
            first = r.message.strip().splitlines()[0] if r.message.strip() else ""
            print(f"{r.outcome.upper():8} {r.name}" + (f": {first}" if first else ""))
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
          f"(vectors {args.vectors}, outputs {args.outputs})")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
