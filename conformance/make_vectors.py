"""Generate the golden vectors of conformance/vectors/ from the reference (docs/13-conformance.md).

    python -m conformance.make_vectors            # (re)write conformance/vectors/
    python -m conformance.make_vectors --check    # regenerate in memory, compare checksums

Format (language-neutral)
-------------------------
``vectors/manifest.json``::

    {"format": "kvsink-conformance-vectors", "version": 1,
     "checksum": "sha256 of each array's bytes: C order, little-endian, dtype as listed",
     "cases": [{"name": "quantize_03", "function": "quantize", "file": "quantize_03.npz",
                "params": {...},                      # scalars and the config, JSON
                "arrays": {"x": {"role": "input", "shape": [2, 12, 20], "dtype": "<f4",
                                 "sha256": "..."},
                           "codes": {"role": "expected", ...}, ...}}, ...]}

Each case is one ``.npz`` file (a zip of ``.npy`` arrays: a 10-line reader in
any language) holding the arrays named in the manifest.  Inputs are generated
from the integer draws of ``numpy.random.RandomState`` (a frozen bit stream)
with exact arithmetic only: integers, dyadic rationals (sums of uniform
integers over a power of two instead of ``standard_normal``, whose polar method
calls ``log``), IEEE products and quotients of them, and stored literals.  No
transcendental function (``exp``, ``log``, ``cos``, a float power) enters an
input: those are not bit-reproducible across numpy versions and CPUs (SIMD
paths differ), and a regeneration must depend only on arithmetic the spec pins
down (docs/13-conformance.md §13.6).  Expected outputs are the reference's.  bfloat16 inputs are stored
as float32 arrays holding bfloat16 values (``params.input_dtype ==
"bfloat16"``); attention outputs are stored rounded to float32 (the bound of
docs/09-tolerances.md 9.3 is ~1e-4 relative, so the rounding, ``2^-24``
relative, is immaterial; compare with the bound plus ``2^-24 |o|``).

The ``ops`` of a ``cache`` case are replayed in order on a fresh layer:
``update`` (arrays ``keys``, ``values``, optional ``valid``), ``resolve``
(array ``preserve``), ``flush``, ``crop`` (``max_length``), ``reorder``
(``beam_idx``), ``select_batch`` (``indices``); then the expected state is
given: ``preserved_positions_<row>``, the three segments ``seg<i>_keys /
_values / _positions``, each block's ``block<i>_{keys,values}_{codes,scale,zero}``
and ``block<i>_coded`` (with ``start`` / ``num_slots`` in ``params.blocks``),
the pre-quantization values ``block<i>_{keys,values}_x`` (for the near-tie
rule), ``nbytes`` and one ``attend`` output for ``query`` at ``query_positions``.

The cases live in ``vector_cases.py`` (docs/02-06) and ``vector_cases_kvquant.py`` (docs/08), their
building blocks in ``vector_format.py``; this module collects, writes and checks them.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import List

import numpy as np

from .vector_cases import (attention_cases, cache_cases, packing_cases, predictor_cases,
                           preserve_cases, quantize_cases)
from .vector_cases_kvquant import kvquant_cases
from .vector_format import (Case, calibration_from_arrays, config_from_dict, dtype_str,  # noqa: F401
                            geometric_inv_freq, kvquant_tensor_from_arrays, sha256)

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
FORMAT = "kvsink-conformance-vectors"
VERSION = 1


def all_cases() -> List[Case]:
    return packing_cases() + quantize_cases() + predictor_cases() + preserve_cases() + \
        attention_cases() + cache_cases() + kvquant_cases()


def manifest(cases) -> dict:
    return {"format": FORMAT, "version": VERSION,
            "generator": "python -m conformance.make_vectors",
            "checksum": "sha256 of each array's raw bytes: C order, little-endian, the listed dtype",
            "cases": [c.manifest() for c in cases]}


def write(directory: Path = VECTORS_DIR) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.npz"):
        old.unlink()
    cases = all_cases()
    for c in cases:
        buf = io.BytesIO()
        np.savez_compressed(buf, **c.arrays)
        (directory / f"{c.name}.npz").write_bytes(buf.getvalue())
    man = manifest(cases)
    (directory / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    return man


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="regenerate in memory and compare with vectors/manifest.json")
    ap.add_argument("--out", type=Path, default=VECTORS_DIR)
    args = ap.parse_args(argv)
    if args.check:
        stored = json.loads((args.out / "manifest.json").read_text())
        fresh = manifest(all_cases())
        if stored != fresh:
            print("vectors differ from a fresh generation", file=sys.stderr)
            return 1
        print(f"{len(fresh['cases'])} cases reproduce exactly")
        return 0
    man = write(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {len(man['cases'])} cases to {args.out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
