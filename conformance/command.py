"""``python -m conformance [pytest options]`` / ``kvsink conformance [pytest options]``: the conformance
suite of the installed package.

The same as ``pytest --pyargs conformance [pytest options]`` (docs/13-conformance.md), e.g.::

    python -m conformance --impl conformance.examples.minimal_port:factory
    python -m conformance --impl mypkg.port:factory --profile thorough -x

(conformance/__main__.py and ``kvsink conformance ...`` call :func:`main`.)  Exit status: pytest's.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suite with ``argv`` (pytest options: ``--impl``, ``--profile``, ``-k``, ``-x``, ...)."""
    try:
        import hypothesis  # noqa: F401
        import pytest  # noqa: F401
    except ImportError:
        print("the conformance suite needs its test dependencies: pip install 'kvsink[conformance]'",
              file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    # a fresh interpreter: pytest must import (and assertion-rewrite) the conformance package itself
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "conformance", "-p", "no:cacheprovider"]
    if not _entry_point_installed():    # a checkout on PYTHONPATH: load the plugin by its module
        cmd += ["-p", "conformance.plugin"]
    return subprocess.call(cmd + argv)


def _entry_point_installed() -> bool:
    """Whether pytest will load the plugin itself (the ``pytest11`` entry point of an installation)."""
    from importlib.metadata import entry_points

    from .plugin import PLUGIN_NAME
    return any(ep.name == PLUGIN_NAME for ep in entry_points(group="pytest11"))
