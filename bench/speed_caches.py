"""The KV caches compared by bench/gpu_speed.py: one small class per variant, one registry.

Each variant says how to build its cache for a model, batch and maximum length, which keyword
arguments ``generate`` needs (eager, or compiled with ``torch.compile(mode="reduce-overhead")``),
how many bytes the cache holds, and whether it can run here (``unavailable()``: None, or the
reason it is skipped).  Adding a variant = one subclass + one registry entry.

* ``dynamic``: transformers ``DynamicCache``, eager (SDPA).
* ``static-compiled``: transformers ``StaticCache(max_cache_len=...)``; ``generate`` compiles the
  decode forward itself (its auto-compile for a compileable cache) with
  ``CompileConfig(mode="reduce-overhead")`` (CUDA graphs).
* ``quanto2`` / ``quanto4``: transformers ``QuantizedCache(backend="quanto", nbits=...)`` with
  transformers' default layout (``axis_key=axis_value=0``, ``q_group_size=64``,
  ``residual_length=128``; --quanto-group / --quanto-residual change them), eager.
* ``kvsink2`` / ``kvsink4``: ``accelerated.hf.KVSinkCache`` at 2 / 4 bits with the settings of
  bench/gpu_e2e.py ``kv()`` (KIVI layout: keys per channel, values per token, groups of 32,
  asymmetric, residual 128; PFN-1 + the KVSink predictor on channel 0 with a threshold no token
  reaches: random weights have no real sinks), eager.
* ``kvsink2-static`` / ``kvsink4-static``: ``KVSinkCache(..., max_cache_len=...)``, the compileable
  kvsink cache (docs/11-transformers.md §11.11), compiled by ``generate`` like ``static-compiled``.

quanto's KV path dequantizes through ``torch.ops.quanto.unpack``, which on CUDA is a kernel of
quanto's own JIT-built extension.  :func:`setup_quanto` installs optimum-quanto from carried wheels
when it is missing, and readies that unpack op in one of three ways (``--quanto-unpack``):
``kernel`` (default) builds quanto's ``unpack.cu`` alone (the same kernel and flags, without the
Marlin/AWQ weight GEMMs of its extension, which the cache never calls: minutes of nvcc less;
``unpack.cpp`` on the CPU), ``full`` lets quanto build its whole extension as a user's first call
would, ``torch`` uses a torch-ops unpack (quanto's own default implementation, copied).  The op is
checked on a known input before use.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

from accelerated.hf import dynamic_cache_nbytes

__all__ = ["CacheVariant", "VARIANTS", "QUANTO_SETUP", "parse_caches",
           "qtensor_bytes", "setup_quanto", "kvsink_config"]

#: what :func:`setup_quanto` did in this process (an "error" makes the quanto variants unavailable)
QUANTO_SETUP: dict = {}


def qtensor_bytes(t) -> int:
    """Bytes of a tensor, following quanto's tensor subclasses (``__tensor_flatten__``: packed
    data, scale, shift) down to plain tensors."""
    if t is None:
        return 0
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(qtensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def kvsink_config(bits: int, num_layers: int, residual_length: Optional[int] = None):
    """bench/gpu_e2e.py's ``kv(bits)`` (the settings of the earlier device measurements), with the
    predictor layer moved inside a model of fewer than 3 layers and, if given, another residual
    length (both for the --tiny self-test, whose 64-token prompt must reach the quantized store)."""
    from bench.gpu_e2e import kv
    cfg = kv(bits)
    if cfg.predictor_layer > num_layers:
        cfg = cfg.replace(predictor_layer=num_layers)
    return cfg if residual_length is None else cfg.replace(residual_length=residual_length)


class CacheVariant:
    """One cache of the comparison.  Subclasses set ``family``/``compiled`` and implement
    :meth:`build` and :meth:`nbytes`."""
    family = ""
    compiled = False

    def __init__(self, name: str, bits: Optional[int] = None):
        self.name, self.bits = name, bits

    def unavailable(self) -> Optional[str]:
        return None

    def build(self, model, batch: int, max_len: int, options):
        raise NotImplementedError

    def nbytes(self, cache) -> int:
        raise NotImplementedError

    def generate_kwargs(self, options) -> dict:
        if not self.compiled:
            return {"disable_compile": True}
        from transformers import CompileConfig
        return {"compile_config": CompileConfig(mode="reduce-overhead", fullgraph=False,
                                                dynamic=options.compile_dynamic)}

    def release(self, cache) -> None:
        """Undo what building the cache did to the model (kvsink: its hooks)."""

    def describe(self, options) -> dict:
        return {"family": self.family, "bits": self.bits, "compiled": self.compiled}


class DynamicVariant(CacheVariant):
    family = "dynamic"

    def build(self, model, batch, max_len, options):
        from transformers import DynamicCache
        return DynamicCache(config=model.config)

    def nbytes(self, cache):
        return dynamic_cache_nbytes(cache)


class StaticCompiledVariant(CacheVariant):
    family, compiled = "static", True

    def build(self, model, batch, max_len, options):
        from transformers import StaticCache
        return StaticCache(config=model.config, max_cache_len=max_len)

    def nbytes(self, cache):
        return dynamic_cache_nbytes(cache)

    def describe(self, options):
        return {**super().describe(options), "compile": {"mode": "reduce-overhead", "fullgraph": False,
                                                         "dynamic": options.compile_dynamic}}


class QuantoVariant(CacheVariant):
    family = "quanto"

    def unavailable(self):
        if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
            return "optimum-quanto is not installed (carry its wheel: --quanto-wheels DIR)"
        if QUANTO_SETUP.get("error"):
            return QUANTO_SETUP["error"]
        return None

    def build(self, model, batch, max_len, options):
        from transformers import QuantizedCache
        return QuantizedCache(backend="quanto", config=model.config, nbits=self.bits, axis_key=0,
                              axis_value=0, q_group_size=options.quanto_group,
                              residual_length=options.quanto_residual)

    def nbytes(self, cache):
        quantized = sum(qtensor_bytes(getattr(layer, "_quantized_keys", None))
                        + qtensor_bytes(getattr(layer, "_quantized_values", None)) for layer in cache.layers)
        return quantized + dynamic_cache_nbytes(cache)

    def describe(self, options):
        return {**super().describe(options), "axis_key": 0, "axis_value": 0,
                "q_group_size": options.quanto_group, "residual_length": options.quanto_residual}


class KVSinkVariant(CacheVariant):
    family = "kvsink"

    def build(self, model, batch, max_len, options):
        from accelerated.hf import KVSinkCache
        return KVSinkCache(model, kvsink_config(self.bits, model.config.num_hidden_layers,
                                                options.kvsink_residual))

    def nbytes(self, cache):
        return int(cache.nbytes())

    def release(self, cache):
        cache.detach()

    def describe(self, options):
        cfg = kvsink_config(self.bits, 32, options.kvsink_residual)
        keep = ("key_bits", "value_bits", "key_group_size", "value_group_size", "key_axis", "value_axis",
                "scheme", "residual_length", "preserve", "preserve_first_n")
        return {**super().describe(options), "config": {k: getattr(cfg, k) for k in keep}}


class KVSinkStaticVariant(KVSinkVariant):
    """The compileable kvsink cache, ``KVSinkCache(model, config, max_cache_len=...)`` (the argument
    of transformers' StaticCache), compiled by ``generate`` like ``static-compiled``."""
    compiled = True

    def build(self, model, batch, max_len, options):
        from accelerated.hf import KVSinkCache
        return KVSinkCache(model, kvsink_config(self.bits, model.config.num_hidden_layers,
                                                options.kvsink_residual), max_cache_len=max_len)


VARIANTS = {
    "dynamic": DynamicVariant("dynamic"),
    "static-compiled": StaticCompiledVariant("static-compiled"),
    "quanto2": QuantoVariant("quanto2", 2),
    "quanto4": QuantoVariant("quanto4", 4),
    "kvsink2": KVSinkVariant("kvsink2", 2),
    "kvsink4": KVSinkVariant("kvsink4", 4),
    "kvsink2-static": KVSinkStaticVariant("kvsink2-static", 2),
    "kvsink4-static": KVSinkStaticVariant("kvsink4-static", 4),
}


def parse_caches(text: str) -> list:
    """``"dynamic,kvsink2"`` -> the variants, in that order; an unknown name is a ValueError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"--caches: unknown cache name(s) {unknown}; choose from {', '.join(VARIANTS)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--caches: {twice} listed more than once; name each cache once")
    return [VARIANTS[n] for n in names]


# ---------------------------------------------------------------------------------- optimum-quanto
def _install_quanto(wheel_dir: str) -> str:
    """pip-install optimum-quanto (and ninja, if missing) from ``wheel_dir`` into a temp target."""
    target = tempfile.mkdtemp(prefix="quanto-site-")
    wanted = ["optimum-quanto"] + ([] if shutil.which("ninja") else ["ninja"])
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--find-links", wheel_dir, "--target", target, *wanted]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, target)
    os.environ["PATH"] = os.path.join(target, "bin") + os.pathsep + os.environ.get("PATH", "")
    os.environ["PYTHONPATH"] = target + os.pathsep + os.environ.get("PYTHONPATH", "")
    importlib.invalidate_caches()
    return target


def _torch_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """optimum-quanto 0.2.7's default (torch-ops) ``quanto::unpack``, copied (its module does not
    expose the function): the ``8 // bits`` codes of each uint8, lowest bits first, stacked on dim 0."""
    out = []
    for i in range(8 // bits):
        mask = 2 ** (bits * (i + 1)) - 1
        out.append((packed & mask) >> (bits * i))
    return torch.cat(out).to(torch.uint8)


class _TorchUnpackLib:
    unpack = staticmethod(_torch_unpack)


def _build_unpack_kernel(src_dir: str, device: str):
    """quanto's unpack source (``unpack.cu`` on CUDA, ``unpack.cpp`` on the CPU) built alone with
    quanto's flags, bound as ``unpack`` -- the op its extension exposes, without the rest."""
    from torch.utils.cpp_extension import load
    build = tempfile.mkdtemp(prefix="quanto-unpack-")
    binding = os.path.join(build, "binding.cpp")
    with open(binding, "w") as f:
        f.write('#include <torch/extension.h>\n#include "unpack.h"\n'
                'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("unpack", &unpack, "unpack"); }\n')
    cuda = device == "cuda"
    flags = {}
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        flags["extra_cuda_cflags"] = ["--expt-extended-lambda", "--use_fast_math",
                                      f"-DQUANTO_CUDA_ARCH={major}{minor}0"]
    source = os.path.join(src_dir, "unpack.cu" if cuda else "unpack.cpp")
    return load(name=f"quanto_unpack_only_{device}", sources=[source, binding],
                extra_include_paths=[src_dir], extra_cflags=["-g", "-O3"] if cuda else ["-O3"],
                build_directory=build, verbose=False, **flags)


def setup_quanto(wheel_dir: Optional[str], unpack: str, device: str) -> dict:
    """Make optimum-quanto importable and its unpack op ready (see the module docstring).
    Call before the first QuantizedCache is built.  Returns what was done, for the JSON."""
    info = QUANTO_SETUP
    info.clear()
    info["unpack_requested"] = unpack
    t0 = time.perf_counter()
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        if not wheel_dir or not os.path.isdir(wheel_dir):
            info["error"] = f"optimum-quanto not installed and no wheel directory {wheel_dir!r}"
            return info
        try:
            info["installed_into"] = _install_quanto(wheel_dir)
        except (OSError, subprocess.CalledProcessError) as e:
            info["error"] = f"installing optimum-quanto from {wheel_dir} failed: {e}"
            return info
    try:
        import optimum.quanto as Q
        from optimum.quanto.library.extensions import get_extension
    except Exception as e:  # noqa: BLE001 - the quanto cells are then skipped with this reason
        info["error"] = f"import optimum.quanto failed: {type(e).__name__}: {e}"
        return info
    info["version"] = getattr(Q, "__version__", "?")
    ext_name = "quanto_cuda" if device == "cuda" else "quanto_cpp"
    ext = get_extension(ext_name)
    try:
        if unpack == "torch":
            ext._lib = _TorchUnpackLib()
        elif unpack == "kernel":
            ext._lib = _build_unpack_kernel(os.path.dirname(ext.sources[0]), device)
        codes = ext.lib.unpack(torch.tensor([0x1B, 0xE4], dtype=torch.uint8, device=device), 2)
        if codes.cpu().tolist() != [3, 0, 2, 1, 1, 2, 0, 3]:       # builds "full" on first use
            raise RuntimeError(f"quanto unpack of [0x1B, 0xE4] at 2 bits gave {codes.tolist()}")
        info["unpack"] = unpack
    except Exception as e:  # noqa: BLE001 - a failed build falls back to torch ops, recorded
        info["unpack_error"] = f"{type(e).__name__}: {str(e)[-400:]}"
        ext._lib = _TorchUnpackLib()
        info["unpack"] = "torch (fallback)"
    info["setup_s"] = time.perf_counter() - t0
    return dict(info)
