"""Hypothesis profiles of the conformance suite (docs/13-conformance.md §Profiles).

``ci`` (default)
    derandomized (the same examples on every run, no example database), each
    property with its own small example budget, sized so the whole suite runs
    in a few minutes on 2 CPU cores.
``thorough``
    at least :data:`THOROUGH_EXAMPLES` examples for every property, random
    seeds, the example database on; for validating a port before a release.

Select with ``pytest conformance --profile thorough`` or the environment
variable ``KVSINK_CONFORMANCE_PROFILE=thorough``.  The profile is applied per
test (``@examples(n)``), not loaded globally, so other test folders run in the
same session keep their own Hypothesis settings.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

from .plugin import ENV_PROFILE, PROFILES  # noqa: F401  (the option's names are the plugin's)

THOROUGH_EXAMPLES = 10_000

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
             HealthCheck.filter_too_much]

settings.register_profile(
    "kvsink-conformance-ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=_SUPPRESS,
    # explain-phase reports are slow on big arrays and add little here
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
settings.register_profile(
    "kvsink-conformance-thorough", derandomize=False, deadline=None, print_blob=True,
    max_examples=THOROUGH_EXAMPLES, suppress_health_check=_SUPPRESS)

_active = os.environ.get(ENV_PROFILE, "ci")


def set_active(name: str) -> None:
    """Select the profile (called by the plugin, conformance/plugin.py, from ``--profile``)."""
    global _active
    if name not in PROFILES:
        raise ValueError(f"profile {name!r} is unknown; choose one of {PROFILES}")
    _active = name


def active() -> str:
    return _active


def examples(ci: int, *, stateful: bool = False) -> settings:
    """Settings for one property: ``ci`` examples in the ci profile, >= 10,000 in thorough.

    ``stateful=True`` also sets ``stateful_step_count`` (steps per run of a state machine).
    """
    parent = settings.get_profile(f"kvsink-conformance-{_active}")
    n = ci if _active == "ci" else max(THOROUGH_EXAMPLES, ci)
    extra = {"stateful_step_count": 30} if stateful else {}
    return settings(parent=parent, max_examples=n, **extra)
