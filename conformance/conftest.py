"""pytest plumbing of the conformance suite: parts, skips and the ``port`` fixture.

The options ``--impl`` and ``--profile`` and the report header belong to the
suite's pytest plugin, conformance/plugin.py (entry point ``pytest11`` of the
installed package).  From a checkout where kvsink is not installed, this file
registers the plugin itself, so ``pytest conformance`` and ``pytest --pyargs
conformance`` behave alike, with one definition of the options.

Tests are marked ``@pytest.mark.part("name")``; a test of a part that the
port does not declare is skipped with the reason (never counted as passed).
"""

from __future__ import annotations

import pytest

from . import plugin


def pytest_addoption(parser, pluginmanager):
    # the plugin's own pytest_addoption is historic: registering it here still adds the options
    plugin.ensure_registered(pluginmanager)


#: the ``--impl`` spec of a run (test_cuda.py and test_models.py import this name)
_spec = plugin.impl_spec


def get_port(config=None):
    """The port under test (loaded once per session; conformance.plugin.get_port)."""
    return plugin.get_port(config)


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
