"""Write a port's outputs for the file route (docs/13-conformance.md §13.9): the example of what a
port in another language does with an exported vectors directory.

    python -m conformance.export VECTORS_DIR
    python -m conformance.examples.write_outputs VECTORS_DIR OUTPUTS_DIR \\
        --impl conformance.examples.minimal_port:factory
    python -m conformance.check_outputs VECTORS_DIR OUTPUTS_DIR

It reads only ``VECTORS_DIR`` (``manifest.json`` and the ``.npy`` inputs), calls
the port (``--impl``: ``reference``, ``accelerated`` or ``module:factory``, a
``conformance.adapter.Port``) as the manifest's ``outputs[*].computed_by``
says, and writes each output as ``OUTPUTS_DIR/<case>/<output>.npy`` in the
dtype the manifest lists, plus ``OUTPUTS_DIR/port.json`` (the port's name and
parts).  Cases of parts the port does not declare are left out (the checker
reports them as skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from conformance import file_route as fr
from conformance import make_vectors as mv
from conformance.adapter import as_bfloat16, load_port, replay_cache_ops


def _inputs(vectors: Path, case: dict) -> dict:
    """Every array of the case by name (inputs and the expected arrays some outputs start from)."""
    return {name: np.load(vectors / meta["file"], allow_pickle=False) for name, meta in case["arrays"].items()}


def _fields(record) -> dict:
    """A result record of conformance.adapter (Quantized, KVQuantized) as ``{field: array}``."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _cache_outputs(port, case, a) -> dict:
    p = case["params"]
    cfg = mv.config_from_dict(p["config"])
    if case["function"] == "kvquant_cache":
        cache = port.make_cache(cfg, p["dtype"], kvquant_calibration=mv.calibration_from_arrays(cfg, a),
                                rope_inv_freq=a.get("rope_inv_freq"))
    else:
        cache = port.make_cache(cfg, p["dtype"])
    replay_cache_ops(cache, p["ops"], a)
    out = {f"preserved_positions_{r}": pp for r, pp in enumerate(cache.preserved_positions())}
    out["nbytes"] = cache.nbytes()
    blocks = cache.quantized_blocks()
    out["num_blocks"] = len(blocks)
    for i, blk in enumerate(blocks):
        out.update({f"block{i}_start": blk.start, f"block{i}_num_slots": blk.num_slots,
                    f"block{i}_coded": blk.coded})
        if hasattr(blk, "rope_positions"):
            out[f"block{i}_rope_positions"] = blk.rope_positions
        for side in ("keys", "values"):
            for field, value in _fields(getattr(blk, side)).items():
                if value is not None:
                    out[f"block{i}_{side}_{field}"] = value
    for i, (k, v, pos) in enumerate(cache.segments()):
        out.update({f"seg{i}_keys": k, f"seg{i}_values": v, f"seg{i}_positions": pos})
    out["attend"] = cache.attend(a["query"], a["query_positions"])
    return out


def _kvquant_outputs(port, case, a) -> dict:
    fn, p = case["function"], case["params"]
    if fn == "kvquant_nf_levels":
        return {f"levels_b{b}": port.kvquant_nf_levels(b) for b in p["bits"]}
    if fn == "kvquant_nearest_level":
        return {"codes": port.kvquant_nearest_level(a["t"], a["levels"])}
    if fn == "kvquant_key_outliers":
        lo, hi = port.kvquant_key_outlier_thresholds(a["keys"], p["fraction"], a.get("exclude"))
        return {"lower": lo, "upper": hi,
                "mask": port.kvquant_key_outliers(a["keys"], a["lower"], a["upper"], a.get("exclude")),
                "mask_new": port.kvquant_key_outliers(a["keys_new"], a["lower"], a["upper"],
                                                      a.get("exclude_new"))}
    if fn == "kvquant_value_outliers":
        return {"mask": port.kvquant_value_outliers(a["values"], p["fraction"], a["exclude"])}
    if fn == "kvquant_rope":
        applied = port.kvquant_apply_rope(a["x"], a["positions"], a["inv_freq"])
        return {"applied": applied,
                "unapplied": port.kvquant_unapply_rope(a["x"], a["positions"], a["inv_freq"]),
                "roundtrip": port.kvquant_unapply_rope(applied, a["positions"], a["inv_freq"])}
    # kvquant_quantize_block
    cfg = mv.config_from_dict(p["config"])
    cal = mv.calibration_from_arrays(cfg, a)
    wrap = as_bfloat16 if p["input_dtype"] == "bfloat16" else (lambda x: x)
    sides = port.kvquant_quantize_block(wrap(a["keys_pre_rope"]), wrap(a["values"]), cal, cfg,
                                        exclude=a.get("exclude"), sparse_dtype=p["sparse_dtype"])
    out = {}
    for side, got, levels, bits, grp, axis in (
            ("keys", sides[0], cal.key_levels_for(), cfg.key_bits, cfg.key_group_size, "channel"),
            ("values", sides[1], cal.value_levels_for(), cfg.value_bits, cfg.value_group_size, "token")):
        out.update({f"{side}_{field}": value for field, value in _fields(got).items()})
        w = {f: a[f"{side}_{f}"] for f in ("codes", "scale", "centre", "outlier_index", "outlier_value")}
        out[f"{side}_dequantized"] = port.kvquant_dequantize(
            w["codes"], w["scale"], w["centre"], levels, w["outlier_index"], w["outlier_value"], bits=bits,
            group_size=grp, axis=axis)
        if "packing" in port.parts:
            out[f"{side}_words"] = port.pack_codes(a[f"{side}_codes"], bits)
    return out


def case_outputs(port, case: dict, a: dict) -> dict:
    """The outputs of one case (name -> array or scalar), computed by ``port``."""
    fn, p = case["function"], case["params"]
    if fn == "pack_codes":
        return {"words": port.pack_codes(a["codes"], p["bits"]),
                "unpacked": port.unpack_codes(a["words"], p["bits"], p["n"])}
    if fn == "quantize":
        x = as_bfloat16(a["x"]) if p["input_dtype"] == "bfloat16" else a["x"]
        got = port.quantize(x, p["bits"], p["group_size"], p["axis"], symmetric=p["symmetric"],
                            exclude=a.get("exclude"))
        out = {"codes": got.codes, "scale": got.scale}
        if got.zero is not None:
            out["zero"] = got.zero
        out["dequantized"] = port.dequantize(a["codes"], a["scale"], a.get("zero"), bits=p["bits"],
                                             group_size=p["group_size"], axis=p["axis"],
                                             symmetric=p["symmetric"])
        return out
    if fn == "predict_sinks":
        return {"scores": port.outlier_scores(a["hidden"], p["channels"]),
                "sinks": port.predict_sinks(a["hidden"], p["channels"], p["threshold"])}
    if fn == "preserve_first_n":
        return {"mask": port.preserve_first_n(a["valid"], p["n"])}
    if fn == "cap_preserved":
        return {"mask": port.cap_preserved(a["flags"], p["max_count"])}
    if fn == "attention_oracle":
        return {"mask": port.attention_oracle(a["probs"], p["ratio"], a["valid"])}
    if fn == "preserved_set":
        return {"mask": port.preserved_set(mv.config_from_dict(p["config"]), a["valid"], a["predicted"],
                                           a["oracle"])}
    if fn == "attention":
        return {"output": port.attention(a["query"], a["keys"], a["values"], query_positions=a["query_positions"],
                                         key_positions=a["key_positions"], key_valid=a.get("key_valid"))}
    if fn == "split_attention":
        segs = [(a[f"seg{j}_keys"], a[f"seg{j}_values"], a[f"seg{j}_positions"]) for j in range(p["num_segments"])]
        return {"output": port.split_attention(a["query"], segs, query_positions=a["query_positions"])}
    if fn in ("cache", "kvquant_cache"):
        return _cache_outputs(port, case, a)
    return _kvquant_outputs(port, case, a)


def write_outputs(vectors, outputs, port) -> int:
    """Write every case of a part ``port`` declares; the number of cases written."""
    vectors, outputs = Path(vectors), Path(outputs)
    manifest = json.loads((vectors / "manifest.json").read_text())
    outputs.mkdir(parents=True, exist_ok=True)
    (outputs / "port.json").write_text(json.dumps({"name": port.name, "parts": sorted(port.parts)}) + "\n")
    written = 0
    for case in manifest["cases"]:
        if case["part"] not in port.parts:
            continue
        got = case_outputs(port, case, _inputs(vectors, case))
        (outputs / case["name"]).mkdir(exist_ok=True)
        for name, value in got.items():
            spec = case["outputs"][name]      # the dtype the manifest lists (a port casts to it)
            try:
                value = np.asarray(value).astype(np.dtype(spec["dtype"]), casting="same_kind")
            except TypeError as exc:
                raise TypeError(f"{case['name']}/{name}: the port returned {np.asarray(value).dtype}, "
                                f"which does not cast safely to {spec['dtype']}") from exc
            np.save(outputs / spec["file"], value, allow_pickle=False)
        written += 1
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.examples.write_outputs",
                                 description="Write a port's outputs for an exported vectors directory.")
    ap.add_argument("vectors", help="directory written by `python -m conformance.export`")
    ap.add_argument("outputs", help="directory to write the port's outputs to")
    ap.add_argument("--impl", default="conformance.examples.minimal_port:factory",
                    help="'reference', 'accelerated' or 'package.module:factory' (default: the minimal port)")
    args = ap.parse_args(argv)
    if not (Path(args.vectors) / "manifest.json").is_file():
        print(f"write_outputs: {args.vectors}/manifest.json not found; run `python -m conformance.export "
              f"{args.vectors}` first", file=sys.stderr)
        return 2
    try:
        port = load_port(args.impl)
    except Exception as exc:    # a bad --impl is the user's mistake: a message, not a traceback
        print(f"write_outputs: could not load --impl {args.impl!r}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    try:
        n = write_outputs(args.vectors, args.outputs, port)
    except (OSError, ValueError, TypeError) as exc:   # unreadable vectors, unwritable outputs, bad dtypes
        print(f"write_outputs: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"{port.name}: wrote the outputs of {n} cases to {args.outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
