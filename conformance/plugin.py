"""The pytest plugin of the conformance suite: ``--impl``, ``--profile`` and the report header.

Installed with kvsink (entry point ``pytest11``: ``kvsink_conformance``), so that
the suite runs from any directory, from the installed package::

    pytest --pyargs conformance --impl mypkg.port:factory [--profile ci|thorough]

From a checkout where kvsink is not installed, ``conformance/conftest.py``
registers this module itself (:func:`ensure_registered`), so ``pytest
conformance`` works there too, with one definition of the options.

Options (also read from the environment, the option wins):

``--impl reference | accelerated | package.module:factory`` (``KVSINK_CONFORMANCE_IMPL``)
    the implementation under test; default ``accelerated``.
``--profile ci | thorough`` (``KVSINK_CONFORMANCE_PROFILE``)
    the Hypothesis profile (conformance/profiles.py); default ``ci``.

The plugin is loaded by every pytest run in an environment where kvsink is
installed, so it stays inert unless the conformance suite is selected (an
argument inside the ``conformance`` package, or ``--pyargs conformance...``):
it imports nothing beyond pytest at module level, and it loads no port and
prints no header otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

__all__ = ["PLUGIN_NAME", "ENV_IMPL", "ENV_PROFILE", "PROFILES", "DEFAULT_IMPL", "ensure_registered",
           "impl_spec", "get_port", "suite_selected"]

#: the name of the ``pytest11`` entry point (pyproject.toml) and of the registered plugin
PLUGIN_NAME = "kvsink_conformance"
ENV_IMPL = "KVSINK_CONFORMANCE_IMPL"
ENV_PROFILE = "KVSINK_CONFORMANCE_PROFILE"
#: the Hypothesis profiles of conformance/profiles.py
PROFILES = ("ci", "thorough")
DEFAULT_IMPL = "accelerated"

_SUITE_DIR = Path(__file__).resolve().parent
_PORT = None


def ensure_registered(pluginmanager) -> None:
    """Register this module as a plugin unless the entry point already did (a checkout run)."""
    import sys
    module = sys.modules[__name__]
    if not pluginmanager.is_registered(module) and pluginmanager.get_plugin(PLUGIN_NAME) is None:
        pluginmanager.register(module, PLUGIN_NAME)


def pytest_addoption(parser):
    group = parser.getgroup("kvsink conformance")
    group.addoption("--impl", default=None,
                    help="conformance suite: implementation under test, 'reference', 'accelerated' "
                         "(default) or 'package.module:factory' returning a conformance.adapter.Port "
                         f"(env {ENV_IMPL})")
    group.addoption("--profile", default=None, choices=PROFILES,
                    help=f"conformance suite: Hypothesis profile (env {ENV_PROFILE}); 'ci' (default, "
                         "derandomized, small) or 'thorough' (>= 10,000 examples per property)")


def _within(path: Path, root: Path) -> bool:
    # not an ancestor of the suite: a project whose virtual environment lives inside it would
    # otherwise load a port for every test run (its collection never enters site-packages)
    return path == root or root in path.parents


def suite_selected(config) -> bool:
    """Whether this run names the conformance suite: an argument inside the package (not an
    ancestor), ``--pyargs conformance[.module]``, or ``--impl`` / ``--profile``."""
    if config.getoption("--impl") or config.getoption("--profile"):
        return True
    for arg in config.args:
        target = str(arg).split("::")[0]
        if config.getoption("pyargs", False) and (target == "conformance"
                                                  or target.startswith("conformance.")):
            return True
        if target and _within(Path(config.invocation_params.dir, target).resolve(), _SUITE_DIR):
            return True
    return False


def pytest_configure(config):
    config.addinivalue_line("markers", "part(name): the contract part a conformance test checks")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (the Triton path of accelerated/)")
    if suite_selected(config):
        # markers of the suite that pyproject.toml declares in a checkout (none outside it)
        config.addinivalue_line("markers", "model: loads a pretrained model (cached)")
        config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
        from . import profiles                   # imports hypothesis: only when the suite runs
        profiles.set_active(config.getoption("--profile") or os.environ.get(ENV_PROFILE, "ci"))


def impl_spec(config) -> str:
    """The ``--impl`` of this run (option, else ``KVSINK_CONFORMANCE_IMPL``, else accelerated)."""
    return config.getoption("--impl") or os.environ.get(ENV_IMPL, DEFAULT_IMPL)


def get_port(config=None):
    """The port under test (loaded once per session)."""
    global _PORT
    if _PORT is None:
        from .adapter import load_port
        spec = impl_spec(config) if config is not None else os.environ.get(ENV_IMPL, DEFAULT_IMPL)
        try:
            _PORT = load_port(spec)
        except Exception as exc:  # make a broken --impl a usage error, not 500 failures
            raise pytest.UsageError(f"conformance: could not load --impl {spec!r}: "
                                    f"{type(exc).__name__}: {exc}") from exc
    return _PORT


def pytest_report_header(config):
    if not suite_selected(config):
        return None
    from . import profiles
    port = get_port(config)
    parts = ", ".join(sorted(port.parts)) or "none"
    return [f"kvsink conformance: impl={impl_spec(config)!r} ({port.name}, device={port.device}); "
            f"profile={profiles.active()}; parts: {parts}"]
