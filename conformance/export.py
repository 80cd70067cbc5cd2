"""Export the golden vectors to a directory of ``.npy`` files and a JSON manifest (the file route).

    python -m conformance.export DIR [--force]

writes ``DIR/<case>/<array>.npy`` (``.npy`` version 1.0, C order, little-endian)
for every input and expected array of every case of conformance/vectors, and
``DIR/manifest.json`` (format ``kvsink-conformance-files``, docs/13-conformance.md
§13.9): per case its function, contract part, parameters, the definition it
exercises (docs/ section, reference functions), the tolerance rule, the arrays
(role, file, shape, dtype, sha256) and the outputs a port writes for
``python -m conformance.check_outputs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import file_route as fr
from . import make_vectors as mv

__all__ = ["export", "main"]


def _packaged_manifest() -> dict:
    return json.loads((mv.VECTORS_DIR / "manifest.json").read_text())


def export(directory, *, force: bool = False) -> dict:
    """Write the vectors under ``directory`` (created; must be empty unless ``force``); the manifest."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory} is not empty; choose an empty directory or pass --force")
    directory.mkdir(parents=True, exist_ok=True)
    packaged = _packaged_manifest()
    cases = []
    for case in packaged["cases"]:
        (directory / case["name"]).mkdir(exist_ok=True)
        with np.load(mv.VECTORS_DIR / case["file"]) as z:
            arrays = {k: z[k] for k in z.files}
        entry_arrays = {}
        for name, meta in case["arrays"].items():
            a = arrays[name]
            if mv.sha256(a) != meta["sha256"]:
                raise RuntimeError(f"packaged vector {case['file']}/{name} does not match its checksum; "
                                   "the installation is damaged (reinstall kvsink)")
            np.save(directory / case["name"] / f"{name}.npy", np.array(a, order="C"), allow_pickle=False)
            entry_arrays[name] = dict(meta, file=f"{case['name']}/{name}.npy")
        doc, refs, rule = fr.DEFINITIONS[case["function"]]
        outputs = {n: dict(spec, file=f"{case['name']}/{n}.npy") for n, spec in fr.output_specs(case).items()}
        cases.append({"name": case["name"], "function": case["function"], "part": fr.PART[case["function"]],
                      "definition": {"doc": doc, "reference": refs}, "tolerance": rule,
                      "params": case["params"], "arrays": entry_arrays, "outputs": outputs})
    manifest = {
        "format": fr.FORMAT, "version": fr.VERSION,
        "vectors": {"format": packaged["format"], "version": packaged["version"]},
        "layout": "<case>/<array>.npy: .npy 1.0, C order, little-endian, the dtype listed; a port writes "
                  "each of a case's outputs as OUTPUTS_DIR/<case>/<output>.npy with the dtype and shape "
                  "listed (shape null: 1-d, any length)",
        "checksum": "sha256 of each array's bytes: C order, little-endian, dtype as listed",
        "cases": cases}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.export",
                                 description="Write the golden vectors as .npy files plus manifest.json "
                                             "(docs/13-conformance.md 13.9).")
    ap.add_argument("directory", help="output directory (created; must be empty)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty directory")
    args = ap.parse_args(argv)
    try:
        manifest = export(args.directory, force=args.force)
    except (OSError, RuntimeError) as exc:     # a non-empty or unwritable directory, a damaged install
        print(f"conformance.export: {exc}", file=sys.stderr)
        return 2
    n_arrays = sum(len(c["arrays"]) for c in manifest["cases"])
    print(f"wrote {len(manifest['cases'])} cases ({n_arrays} arrays) and manifest.json to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
