"""The layout of the accelerated cache and KVQuant modules (issue 14; docs/06-cache.md "Accelerated layout").

One store implementation per quantizer, chosen in one place; the split modules re-exported by
``accelerated.cache`` / ``accelerated.kvquant``; no accelerated cache or KVQuant module reaching into
another accelerated module's underscore names.
"""

import ast
import importlib
from pathlib import Path

import pytest
import torch

from reference.config import KVSinkConfig

import accelerated.cache as C
import accelerated.kvquant as KQ

ROOT = Path(__file__).resolve().parents[1]
SPLIT_KVQUANT = ("kvquant_rope", "kvquant_levels", "kvquant_tensor", "kvquant_calibration")
CACHE_MODULES = ("cache", "cache_layer", "cache_state", "cache_store", "cache_kvquant", "cache_checks")


@pytest.mark.parametrize("quantizer, store", [("uniform", C.UniformStore), ("kvquant", C.KVQuantStore)])
def test_make_store_picks_the_store_of_the_quantizer(quantizer, store):
    cfg = KVSinkConfig(key_bits=4, value_bits=4, quantizer=quantizer, outlier_fraction=0.0)
    assert type(C.make_store(cfg)) is store
    layer = C.QuantizedKVCacheLayer(cfg)
    assert type(layer.quantized) is store and layer.kvquant == (quantizer == "kvquant")
    layer.update(torch.ones(1, 1, 40, 4), torch.ones(1, 1, 40, 4))
    assert layer.quantized.dims == (1, 1, 4)


def test_uniform_store_refuses_kvquant_arguments():
    cfg = KVSinkConfig(key_bits=4, value_bits=4)
    with pytest.raises(ValueError, match="only used by quantizer='kvquant'"):
        C.make_store(cfg, rope_inv_freq=torch.ones(2))


def test_the_layer_has_no_quantizer_branch():
    """The layer's methods never look at the quantizer: only ``make_store`` does (and the public
    ``kvquant`` property reports it)."""
    tree = ast.parse((ROOT / "accelerated" / "cache_layer.py").read_text())
    layer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QuantizedKVCacheLayer")
    readers = {f.name for f in layer.body if isinstance(f, ast.FunctionDef)
               for n in ast.walk(f) if isinstance(n, ast.Attribute) and n.attr in ("kvquant", "quantizer")}
    assert readers == {"kvquant"}, readers


@pytest.mark.parametrize("module", SPLIT_KVQUANT)
def test_kvquant_reexports_its_split_modules(module):
    mod = importlib.import_module(f"accelerated.{module}")
    assert mod.__all__, module
    for name in mod.__all__:
        assert name in KQ.__all__, f"accelerated.kvquant.__all__ lacks {module}.{name}"
        assert getattr(KQ, name) is getattr(mod, name), name


@pytest.mark.parametrize("module", CACHE_MODULES)
def test_cache_modules_export_what_they_define(module):
    mod = importlib.import_module(f"accelerated.{module}")
    for name in mod.__all__:
        assert hasattr(mod, name), f"accelerated.{module}.__all__ names {name}, which it lacks"


def _accelerated_underscore_uses(path: Path):
    """``(line, text)`` of every use of another accelerated module's underscore name in ``path``."""
    tree = ast.parse(path.read_text())
    local = set()                        # names bound to accelerated modules
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("accelerated")):
            for a in n.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append((n.lineno, f"from {n.module} import {a.name}"))
                local.add(a.asname or a.name)
    for n in ast.walk(tree):
        if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in local
                and n.attr.startswith("_") and not n.attr.startswith("__")):
            found.append((n.lineno, f"{n.value.id}.{n.attr}"))
    return found


@pytest.mark.parametrize("module", CACHE_MODULES + SPLIT_KVQUANT + ("kvquant",))
def test_no_underscore_name_of_another_accelerated_module(module):
    assert _accelerated_underscore_uses(ROOT / "accelerated" / f"{module}.py") == []
