"""The layout of the reference cache and KVQuant modules (docs/06-cache.md §6.23, issue 14).

One storage implementation per quantizer chosen by one function, the names every user imports
still reachable from ``reference.cache`` / ``reference.kvquant``, and no reach into another
module's underscore names.
"""

import ast
import importlib
import pathlib

import numpy as np
import pytest

import reference
from reference import cache, cache_kvquant, cache_layer, cache_store, kvquant
from reference.config import KVSinkConfig

ROOT = pathlib.Path(reference.__file__).parent
CACHE_MODULES = ["cache", "cache_layer", "cache_state", "cache_store", "cache_kvquant", "cache_checks"]
KVQUANT_MODULES = ["kvquant", "kvquant_rope", "kvquant_levels", "kvquant_tensor", "kvquant_calibration"]

#: ``reference.cache.__all__`` before the split: every one must still be importable from it.
CACHE_NAMES_BEFORE = ["STORAGE_DTYPES", "PackedQuantized", "QuantizedBlock", "KVQuantCacheBlock",
                      "QuantizedKVCacheLayer", "QuantizedKVCache", "quantize_block",
                      "quantize_block_kvquant_cache", "admit_preserved", "flushed_length",
                      "quantize_sequence"]


@pytest.mark.parametrize("quantizer, store", [("uniform", cache_store.UniformStore),
                                              ("kvquant", cache_kvquant.KVQuantStore)])
def test_make_store_picks_the_quantizers_store(quantizer, store):
    config = KVSinkConfig(quantizer=quantizer, key_bits=3, value_bits=3, key_group_size=4,
                          value_group_size=8, outlier_fraction=0)
    made = cache.make_store(config)
    assert type(made) is store and made.quantizer == quantizer and made.blocks == []
    layer = cache.QuantizedKVCacheLayer(config)
    assert type(layer.quantized) is store and layer.kvquant == (quantizer == "kvquant")
    assert set(cache.STORES) == {"uniform", "kvquant"}


def test_the_uniform_store_refuses_the_kvquant_arguments():
    with pytest.raises(ValueError, match="rope_inv_freq is only used by quantizer='kvquant'"):
        cache.make_store(KVSinkConfig(), rope_inv_freq=np.ones(4, np.float32))


def test_names_are_reexported():
    for name in CACHE_NAMES_BEFORE + ["layer_calibrations", "make_store", "QuantizedStore",
                                      "UniformStore", "KVQuantStore", "ResidualWindow",
                                      "PreservedStore"]:
        assert name in cache.__all__ and hasattr(cache, name), name
    for m in KVQUANT_MODULES[1:]:
        mod = importlib.import_module(f"reference.{m}")
        for name in mod.__all__:
            assert name in kvquant.__all__ and getattr(kvquant, name) is getattr(mod, name), name


@pytest.mark.parametrize("module", CACHE_MODULES + KVQUANT_MODULES)
def test_all_names_exist_and_module_is_short(module):
    mod = importlib.import_module(f"reference.{module}")
    assert all(hasattr(mod, name) for name in mod.__all__)
    assert len((ROOT / f"{module}.py").read_text().splitlines()) <= 600


#: Underscore names imported from another module: none (reference.quantize's checks are public).
FOREIGN_PRIVATE: set = set()


@pytest.mark.parametrize("module", CACHE_MODULES + KVQUANT_MODULES)
def test_no_underscore_import_from_another_module(module):
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    private = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name.startswith("_")}
    assert private <= FOREIGN_PRIVATE


def test_the_layer_has_no_quantizer_branch():
    """No ``if`` in reference/cache_layer.py tests the quantizer: that is the stores' job."""
    tree = ast.parse((ROOT / "cache_layer.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)):
            text = ast.unparse(node.test)
            assert "kvquant" not in text and "quantizer" not in text, text
