"""pytest plumbing of the conformance suite: ``--impl``, ``--profile``, parts and skips.

Options (also read from the environment, the option wins):

``--impl reference | accelerated | package.module:factory`` (``KVSINK_CONFORMANCE_IMPL``)
    the implementation under test; default ``accelerated``.
``--profile ci | thorough`` (``KVSINK_CONFORMANCE_PROFILE``)
    the Hypothesis profile (conformance/profiles.py); default ``ci``.

Tests are marked ``@pytest.mark.part("name")``; a test of a part that the
port does not declare is skipped with the reason (never counted as passed).
"""

from __future__ import annotations

import os

import pytest

from . import profiles

ENV_IMPL = "KVSINK_CONFORMANCE_IMPL"

_PORT = None


def pytest_addoption(parser):
    group = parser.getgroup("kvsink conformance")
    group.addoption("--impl", default=None,
                    help="implementation under test: 'reference', 'accelerated' (default) or "
                         "'package.module:factory' returning a conformance.adapter.Port "
                         f"(env {ENV_IMPL})")
    group.addoption("--profile", default=None, choices=profiles.PROFILES,
                    help=f"Hypothesis profile of the conformance suite (env {profiles.ENV_PROFILE}); "
                         "'ci' (default, derandomized, small) or 'thorough' (>= 10,000 examples "
                         "per property)")


def pytest_configure(config):
    config.addinivalue_line("markers", "part(name): the contract part a conformance test checks")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (the Triton path of accelerated/)")
    profile = config.getoption("--profile") or os.environ.get(profiles.ENV_PROFILE, "ci")
    profiles.set_active(profile)


def _spec(config) -> str:
    return config.getoption("--impl") or os.environ.get(ENV_IMPL, "accelerated")


def get_port(config=None):
    """The port under test (loaded once per session)."""
    global _PORT
    if _PORT is None:
        from .adapter import load_port
        spec = _spec(config) if config is not None else os.environ.get(ENV_IMPL, "accelerated")
        try:
            _PORT = load_port(spec)
        except Exception as exc:  # make a broken --impl a usage error, not 500 failures
            raise pytest.UsageError(f"conformance: could not load --impl {spec!r}: "
                                    f"{type(exc).__name__}: {exc}") from exc
    return _PORT


def pytest_report_header(config):
    port = get_port(config)
    parts = ", ".join(sorted(port.parts)) or "none"
    return [f"kvsink conformance: impl={_spec(config)!r} ({port.name}, device={port.device}); "
            f"profile={profiles.active()}; parts: {parts}"]


def pytest_collection_modifyitems(config, items):
    port = None
    for item in items:
        marker = item.get_closest_marker("part")
        if marker is None:
            continue
        if port is None:
            port = get_port(config)
        part = marker.args[0]
        if part not in port.parts:
            item.add_marker(pytest.mark.skip(
                reason=f"{port.name} does not implement part {part!r} "
                       f"(declared parts: {sorted(port.parts)})"))


@pytest.fixture(scope="session")
def port(request):
    """The implementation under test (conformance.adapter.Port)."""
    return get_port(request.config)
