"""Every ```python and ```bash block of README.md and docs/*.md runs as written (issue 13).

The blocks of one page run in order, in one fresh Python process per page (like a doctest
session: a later block may use the names of an earlier one), from the repository root with
its PYTHONPATH.  A block that installs packages or runs for minutes may be marked, on the line
just before its fence, with

    <!-- docs-blocks: skip (the reason) -->

and is then listed, not run; there are at most :data:`MAX_SKIPPED` such blocks, each with a
reason.  Text that is not meant to run is not a python/bash block (use ```text).  Pages whose
blocks load a pretrained model (``load_model``) are marked ``model``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(python|bash)\s*$")
SKIP = re.compile(r"^<!-- docs-blocks: skip \((?P<reason>[^)]+)\) -->\s*$")
MAX_SKIPPED = 3


def blocks(page: Path):
    """``[(language, first line number, code, skip reason or None)]`` of a page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        skip = SKIP.match(lines[start - 2]) if start >= 2 else None
        out.append((m.group(1), start + 1, "\n".join(body) + "\n", skip and skip.group("reason")))
        i += 1
    return out


ALL = {p: blocks(p) for p in PAGES}
RUN = {p: b for p, b in ALL.items() if any(reason is None for *_, reason in b)}


def test_the_skip_markers_are_few_and_justified():
    skipped = [(str(p.relative_to(ROOT)), line, reason) for p, bs in ALL.items() for _, line, _, reason in bs
               if reason]
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} skipped doc blocks: {skipped}"
    for name, line, reason in skipped:
        assert len(reason.split()) >= 3, f"{name}:{line}: say why the block is not run"
    markers = [(str(p.relative_to(ROOT)), n + 1) for p in PAGES
               for n, line in enumerate(p.read_text(encoding="utf-8").splitlines())
               if line.lstrip().startswith("<!-- docs-blocks:")]
    assert len(markers) == len(skipped), f"a docs-blocks marker not right before a fence: {markers}"


def test_blocks_are_found():
    assert sum(len(b) for b in ALL.values()) >= 7
    assert any(lang == "bash" for bs in ALL.values() for lang, *_ in bs)


def _env():
    """The environment a reader runs the blocks in: this interpreter's environment activated (its
    ``bin/`` first on PATH, so ``python``, ``kvsink`` and ``pytest`` are the ones under test, as
    in a virtual environment), the checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def _param(page):
    code = "".join(c for _, _, c, reason in ALL[page] if reason is None)
    marks = [pytest.mark.model] if "load_model" in code else []
    return pytest.param(page, id=str(page.relative_to(ROOT)), marks=marks)


@pytest.mark.parametrize("page", [_param(p) for p in RUN])
def test_page_blocks_run(page):
    python = [(line, code) for lang, line, code, reason in ALL[page] if lang == "python" and reason is None]
    bash = [(line, code) for lang, line, code, reason in ALL[page] if lang == "bash" and reason is None]
    if python:
        # each block under its page and line, so that a traceback points at the doc
        script = "".join(f"exec(compile({code!r}, {f'{page.name}:{line}'!r}, 'exec'))\n" for line, code in python)
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=1500)
        assert r.returncode == 0, f"{page.name}: a python block failed:\n{r.stderr[-4000:]}"
    for line, code in bash:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, f"{page.name}:{line}: bash block failed:\n{r.stderr[-4000:]}"
