"""The file route of the conformance suite: golden vectors as ``.npy`` files, a port's outputs as files.

For a port that cannot be called from Python (docs/13-conformance.md §13.9):

1. ``python -m conformance.export VECTORS_DIR`` writes every golden case as
   ``VECTORS_DIR/<case>/<array>.npy`` and ``VECTORS_DIR/manifest.json`` (:data:`FORMAT`):
   per case the function, its parameters, the definition it exercises (the
   docs/ section and the reference function), the tolerance rule that judges
   it, its input and expected arrays (shape, dtype, sha256), and the
   **outputs** the port writes, each with its shape, dtype and how it is
   computed.
2. The port reads the inputs and writes each output as
   ``OUTPUTS_DIR/<case>/<output>.npy`` (``.npy`` version 1.0, C order,
   little-endian, the dtype listed), optionally with ``OUTPUTS_DIR/port.json``
   ``{"name": ..., "parts": [...]}`` declaring the parts it implements (cases
   of the other parts are reported as skipped, never passed).
3. ``python -m conformance.check_outputs VECTORS_DIR OUTPUTS_DIR`` judges the
   outputs with the checks of the Python route: every case goes through
   ``conformance.test_vectors.test_port_matches_vector`` with a
   :class:`ReplayPort` that answers the suite's calls from the port's files,
   so both routes apply the same rules of docs/09-tolerances.md
   (conformance/tolerances.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from . import make_vectors as mv
from . import test_vectors as _vectors
from .adapter import CacheBlock, KVQuantCacheBlock, KVQuantized, Quantized

__all__ = ["FORMAT", "VERSION", "DEFINITIONS", "PART", "OutputError", "output_specs", "load_case_arrays",
           "read_output", "read_port_json", "ReplayPort", "ReplayCache"]

FORMAT = "kvsink-conformance-files"
VERSION = 1

#: the contract part of each vector function (one definition: the vector tests')
PART = _vectors.PART

_EXACT = "identical (docs/09-tolerances.md 9.4)"
#: function -> (definition in docs/, reference functions, tolerance rule)
DEFINITIONS = {
    "pack_codes": ("docs/02-quantization.md Definition 2.4", ["reference.packing.pack_codes",
                   "reference.packing.unpack_codes"], "bit-identical words and codes (9.4)"),
    "quantize": ("docs/02-quantization.md Definitions 2.1-2.3, 2.5, 2.6", ["reference.quantize.quantize",
                 "reference.quantize.dequantize"],
                 "scale, zero bit-identical (9.2(0)); codes identical or one off at a near-tie "
                 "(9.2(a)); dequantized within (9.3)"),
    "predict_sinks": ("docs/04-predictor.md Definitions 4.1, 4.2", ["reference.predictor.outlier_scores",
                      "reference.predictor.predict_sinks"], _EXACT),
    "preserve_first_n": ("docs/03-preservation.md Definition 3.1", ["reference.preserve.preserve_first_n"],
                         _EXACT),
    "attention_oracle": ("docs/03-preservation.md Definition 3.2", ["reference.preserve.attention_oracle"],
                         _EXACT),
    "cap_preserved": ("docs/03-preservation.md Definition 3.5", ["reference.preserve.cap_preserved"], _EXACT),
    "preserved_set": ("docs/03-preservation.md Definition 3.6", ["reference.preserve.preserved_set"], _EXACT),
    "attention": ("docs/05-attention.md Definitions 5.1-5.3", ["reference.attention.attention"],
                  "within the bound of docs/09-tolerances.md 9.3 (plus 2^-24 |o| for the stored float32)"),
    "split_attention": ("docs/05-attention.md Definitions 5.4-5.6", ["reference.attention.split_attention"],
                        "within the bound of docs/09-tolerances.md 9.3 (plus 2^-24 |o|)"),
    "cache": ("docs/06-cache.md Definitions 6.1-6.17", ["reference.cache.QuantizedKVCacheLayer"],
              "positions, coded flags, scales, zeros, nbytes identical; codes 9.2(a); quantized segment "
              "9.3 (dequantized); attend within 9.3 plus the segments' differences"),
    "kvquant_nf_levels": ("docs/08-kvquant.md Definition 8.2", ["reference.kvquant.nf_levels"],
                          "identical (docs/08-kvquant.md 8.11)"),
    "kvquant_nearest_level": ("docs/08-kvquant.md Definition 8.3", ["reference.kvquant.nearest_level"],
                              "identical (docs/08-kvquant.md 8.11)"),
    "kvquant_key_outliers": ("docs/08-kvquant.md Definition 8.5", ["reference.kvquant.key_outlier_thresholds",
                             "reference.kvquant.key_outliers"], "identical (docs/08-kvquant.md 8.11)"),
    "kvquant_value_outliers": ("docs/08-kvquant.md Definition 8.6", ["reference.kvquant.value_outliers"],
                               "identical (docs/08-kvquant.md 8.11)"),
    "kvquant_quantize_block": ("docs/08-kvquant.md Definitions 8.4, 8.7, 8.10",
                               ["reference.kvquant.quantize_block_kvquant",
                                "reference.kvquant.dequantize_nonuniform"],
                               "s, c, outliers identical; codes of a t' within 3 ulps (docs/09-tolerances.md "
                               "9.6); dequantized 2u(|l_q s| + |x|) + eta (8.11)"),
    "kvquant_rope": ("docs/08-kvquant.md Definition 8.1", ["reference.kvquant.apply_rope",
                     "reference.kvquant.unapply_rope"], "7u(|a| + |b|) + 8 eta (docs/08-kvquant.md 8.11)"),
    "kvquant_cache": ("docs/06-cache.md Definitions 6.21, 6.22; docs/08-kvquant.md 8.14",
                      ["reference.cache.QuantizedKVCacheLayer"],
                      "docs/09-tolerances.md 9.6 rules (9.5)-(9.9) on the blocks and segments; nbytes with "
                      "the port's outlier counts; attend within 9.3"),
}


class OutputError(Exception):
    """A port's output file is missing or has the wrong dtype or shape."""


def _out(ref: Optional[str], computed_by: str, *, like: Optional[dict] = None, shape="like",
         dtype: Optional[str] = None) -> dict:
    """One output's spec: the shape and dtype of the expected array ``ref`` (or of ``like``)."""
    meta = like if like is not None else {}
    return {"shape": meta.get("shape") if shape == "like" else shape,
            "dtype": dtype or meta.get("dtype"), "computed_by": computed_by, "judged_against": ref}


def _same_as_expected(arrays: dict, names, computed_by: str) -> Dict[str, dict]:
    return {n: _out(n, computed_by, like=arrays[n]) for n in names if n in arrays}


_SCALAR = {"shape": [], "dtype": "<i8"}


def _cache_outputs(case: dict) -> Dict[str, dict]:
    arrays = case["arrays"]
    internal = ("_x", "_x_pre_rope", "_words")     # the reference's own values, used by the checks
    outs = {n: _out(n, "the cache's state after replaying params.ops (docs/13-conformance.md §13.5)",
                    like=m)
            for n, m in arrays.items() if m["role"] == "expected" and not n.endswith(internal)}
    outs["attend"]["computed_by"] = "cache.attend(query, query_positions) after the ops"
    outs["num_blocks"] = _out(None, "the number of quantized blocks", like=_SCALAR)
    for i, _ in enumerate(case["params"]["blocks"]):
        for what in ("start", "num_slots"):
            outs[f"block{i}_{what}"] = _out(None, f"quantized block {i}: {what}", like=_SCALAR)
    if case["function"] == "kvquant_cache":       # the port's outlier counts may differ (9.5)
        for n, spec in outs.items():
            if n.endswith(("_outlier_index", "_outlier_value")):
                spec["shape"] = None
    return outs


def _kvquant_outputs(case: dict) -> Dict[str, dict]:
    """The outputs of the stateless kvquant cases (docs/08-kvquant.md)."""
    fn, a = case["function"], case["arrays"]
    if fn == "kvquant_nf_levels":
        return _same_as_expected(a, [f"levels_b{b}" for b in case["params"]["bits"]], "nf_levels(bits)")
    if fn == "kvquant_nearest_level":
        return {"codes": _out("codes", "nearest_level(t, levels)", like=a["codes"])}
    if fn == "kvquant_key_outliers":
        outs = _same_as_expected(a, ("lower", "upper"), "key_outlier_thresholds(keys, fraction, exclude)")
        outs["mask"] = _out("mask", "key_outliers(keys, expected lower, expected upper, exclude)",
                            like=a["mask"])
        outs["mask_new"] = _out("mask_new", "key_outliers(keys_new, expected lower, expected upper, "
                                "exclude_new)", like=a["mask_new"])
        return outs
    if fn == "kvquant_value_outliers":
        return {"mask": _out("mask", "value_outliers(values, fraction, exclude)", like=a["mask"])}
    if fn == "kvquant_quantize_block":
        outs = {}
        for side in ("keys", "values"):
            outs.update(_same_as_expected(a, [f"{side}_{f}" for f in ("codes", "scale", "centre",
                                                                      "outlier_index", "outlier_value")],
                                          "quantize_block_kvquant(keys_pre_rope, values, calibration_*, "
                                          "config, exclude, sparse_dtype)"))
            outs[f"{side}_dequantized"] = _out(f"{side}_dequantized", f"dequantize_nonuniform of the expected "
                                               f"{side}_* arrays", like=a[f"{side}_dequantized"])
            outs[f"{side}_words"] = _out(f"{side}_words", f"pack_codes(expected {side}_codes, bits) "
                                         "(only if the port declares part 'packing')", like=a[f"{side}_words"])
        return outs
    if fn == "kvquant_rope":
        return {"applied": _out("applied", "apply_rope(x, positions, inv_freq)", like=a["applied"]),
                "unapplied": _out("unapplied", "unapply_rope(x, positions, inv_freq)", like=a["unapplied"]),
                "roundtrip": _out("x", "unapply_rope(the port's own applied, positions, inv_freq)",
                                  like=a["x"], dtype="<f4")}
    raise ValueError(f"no file-route outputs are defined for function {fn!r}")


def output_specs(case: dict) -> Dict[str, dict]:
    """The outputs a port writes for ``case`` (a manifest entry of conformance/vectors):
    ``{name: {shape (None: 1-d, any length), dtype, computed_by, judged_against}}``."""
    fn, a = case["function"], case["arrays"]
    if fn == "pack_codes":
        return {"words": _out("words", "pack_codes(codes, bits)", like=a["words"]),
                "unpacked": _out("codes", "unpack_codes(words, bits, n) of the expected words", like=a["codes"])}
    if fn == "quantize":
        outs = _same_as_expected(a, ("codes", "scale", "zero"),
                                 "quantize(x, bits, group_size, axis, symmetric, exclude)")
        outs["dequantized"] = _out("dequantized", "dequantize of the expected codes, scale, zero",
                                   like=a["dequantized"])
        return outs
    if fn == "predict_sinks":
        return {"scores": _out("scores", "outlier_scores(hidden, channels)", like=a["scores"]),
                "sinks": _out("sinks", "predict_sinks(hidden, channels, threshold)", like=a["sinks"])}
    if fn in ("preserve_first_n", "cap_preserved", "attention_oracle", "preserved_set"):
        return {"mask": _out("mask", f"{fn} of the inputs and params", like=a["mask"])}
    if fn in ("attention", "split_attention"):
        return {"output": _out("output", f"{fn} of the inputs (scale None: 1/sqrt(D))", like=a["output"])}
    if fn in ("cache", "kvquant_cache"):
        return _cache_outputs(case)
    if fn.startswith("kvquant_"):
        return _kvquant_outputs(case)
    raise ValueError(f"no file-route outputs are defined for function {fn!r}")


# --------------------------------------------------------------------------- reading

def load_case_arrays(directory: Path, case: dict, roles=("input", "expected")) -> Dict[str, np.ndarray]:
    """The arrays of one exported case (``directory/<case>/<name>.npy``), checked against the
    manifest's shape, dtype and sha256; ``OutputError`` naming the file otherwise."""
    out = {}
    for name, meta in case["arrays"].items():
        if meta["role"] not in roles:
            continue
        path = Path(directory) / case["name"] / f"{name}.npy"
        a = _load(path)
        if list(a.shape) != meta["shape"] or mv.dtype_str(a) != meta["dtype"] \
                or mv.sha256(a) != meta["sha256"]:
            raise OutputError(f"{path}: does not match the manifest (shape {list(a.shape)} dtype "
                              f"{mv.dtype_str(a)}; manifest shape {meta['shape']} dtype {meta['dtype']} "
                              "and its sha256); export the vectors again")
        out[name] = a
    return out


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise OutputError(f"missing file {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise OutputError(f"{path}: not a readable .npy array ({exc})") from exc


def read_output(directory: Path, case_name: str, name: str, spec: dict) -> np.ndarray:
    """A port's output file, checked against its spec (dtype exact; shape unless ``None``)."""
    path = Path(directory) / case_name / f"{name}.npy"
    a = _load(path)
    if mv.dtype_str(a) != spec["dtype"]:
        raise OutputError(f"{path}: dtype {mv.dtype_str(a)} ({a.dtype}), expected {spec['dtype']} "
                          f"({np.dtype(spec['dtype'])}); write it with that dtype")
    if spec["shape"] is None:
        if a.ndim != 1:
            raise OutputError(f"{path}: shape {list(a.shape)}, expected a 1-d array")
    elif list(a.shape) != spec["shape"]:
        raise OutputError(f"{path}: shape {list(a.shape)}, expected {spec['shape']}")
    return a


def read_port_json(directory: Path) -> dict:
    """``OUTPUTS_DIR/port.json`` (optional): ``{"name": str, "parts": [...]}``."""
    path = Path(directory) / "port.json"
    if not path.is_file():
        return {"name": str(directory), "parts": sorted(set(PART.values()))}
    info = json.loads(path.read_text())
    unknown = set(info.get("parts", [])) - set(PART.values())
    if unknown:
        raise OutputError(f"{path}: unknown parts {sorted(unknown)}; allowed: {sorted(set(PART.values()))}")
    return {"name": info.get("name", str(directory)), "parts": list(info.get("parts", []))}


# --------------------------------------------------------------------------- replay

class ReplayPort:
    """A port whose answers are a case's output files: what ``test_port_matches_vector`` calls,
    answered from ``outputs`` (name -> array) and matched against the case's ``golden`` arrays
    where one method is called twice (keys / values, calibration / new keys)."""

    def __init__(self, name: str, parts, case: dict, outputs: Dict[str, np.ndarray],
                 golden: Dict[str, np.ndarray]):
        self.name, self.parts, self.device = name, frozenset(parts), "files"
        self.case, self.o, self.golden = case, outputs, golden
        self._applied = None

    def __getitem__(self, name):
        if name not in self.o:
            raise OutputError(f"{self.case['name']}: no output {name!r} was read")
        return self.o[name]

    def _side(self, prefix_arrays, arg) -> str:
        """"keys" or "values": the side whose golden ``<side>_<what>`` equals ``arg``."""
        arg = np.asarray(arg)
        for side in ("keys", "values"):
            ref = self.golden.get(prefix_arrays.format(side=side))
            if ref is not None and ref.shape == arg.shape and np.array_equal(ref, arg):
                return side
        raise OutputError(f"{self.case['name']}: a call with an array that is none of the case's")

    # packing, quantize, predictor, preserve, attention
    def pack_codes(self, codes, bits):
        if self.case["function"] == "kvquant_quantize_block":
            return self[f"{self._side('{side}_codes', codes)}_words"]
        return self["words"]

    def unpack_codes(self, words, bits, n):
        return self["unpacked"]

    def quantize(self, x, bits, group_size, axis, *, symmetric=False, exclude=None):
        return Quantized(self["codes"], self["scale"], self.o.get("zero"))

    def dequantize(self, codes, scale, zero, **kw):
        return self["dequantized"]

    def outlier_scores(self, hidden, channels):
        return self["scores"]

    def predict_sinks(self, hidden, channels, threshold):
        return self["sinks"]

    def preserve_first_n(self, *args, **kw):
        return self["mask"]

    attention_oracle = cap_preserved = preserved_set = preserve_first_n

    def attention(self, *args, **kw):
        return self["output"]

    split_attention = attention

    def make_cache(self, config, dtype="float32", **kw):
        return ReplayCache(self)

    # kvquant
    def kvquant_nf_levels(self, bits):
        return self[f"levels_b{bits}"]

    def kvquant_nearest_level(self, t, levels):
        return self["codes"]

    def kvquant_key_outlier_thresholds(self, keys, fraction, exclude=None):
        return self["lower"], self["upper"]

    def kvquant_key_outliers(self, keys, lower, upper, exclude=None):
        same = np.array_equal(np.asarray(keys), self.golden["keys"])
        return self["mask" if same else "mask_new"]

    def kvquant_value_outliers(self, values, fraction, exclude=None):
        return self["mask"]

    def kvquant_quantize_block(self, *args, **kw):
        return tuple(self.kvquantized(side) for side in ("keys", "values"))

    def kvquantized(self, prefix: str) -> KVQuantized:
        return KVQuantized(*(self[f"{prefix}_{f}"] for f in ("codes", "scale", "centre", "outlier_index",
                                                              "outlier_value")))

    def kvquant_dequantize(self, codes, scale, *args, **kw):
        return self[f"{self._side('{side}_scale', scale)}_dequantized"]

    def kvquant_apply_rope(self, x, positions, inv_freq):
        self._applied = self["applied"]
        return self._applied

    def kvquant_unapply_rope(self, x, positions, inv_freq):
        return self["roundtrip"] if x is self._applied else self["unapplied"]


class ReplayCache:
    """The state a port's cache reached (its files); the ops were replayed by the port."""

    def __init__(self, port: ReplayPort):
        self.p = port

    def update(self, *args, **kw):
        pass

    resolve = flush = crop = reorder = select_batch = reset = update

    def nbytes(self) -> int:
        return int(self.p["nbytes"])

    def preserved_positions(self):
        rows = sorted(n for n in self.p.o if n.startswith("preserved_positions_"))
        return [self.p[n] for n in rows]

    def segments(self):
        return [(self.p[f"seg{i}_keys"], self.p[f"seg{i}_values"], self.p[f"seg{i}_positions"])
                for i in range(3)]

    def attend(self, query, query_positions, scale=None):
        return self.p["attend"]

    def quantized_blocks(self):
        blocks = []
        for i in range(int(self.p["num_blocks"])):
            pre = f"block{i}"
            head = (int(self.p[f"{pre}_start"]), int(self.p[f"{pre}_num_slots"]), self.p[f"{pre}_coded"])
            if self.p.case["function"] == "kvquant_cache":
                blocks.append(KVQuantCacheBlock(*head, self.p[f"{pre}_rope_positions"],
                                                self.p.kvquantized(f"{pre}_keys"),
                                                self.p.kvquantized(f"{pre}_values")))
            else:
                blocks.append(CacheBlock(*head, *(Quantized(self.p[f"{pre}_{s}_codes"], self.p[f"{pre}_{s}_scale"],
                                                            self.p.o.get(f"{pre}_{s}_zero"))
                                                  for s in ("keys", "values"))))
        return blocks
