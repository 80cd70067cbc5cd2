"""The configuration of the accelerated side: the very class of ``reference.config``.

There is ONE ``KVSinkConfig`` (docs/07-config.md); both sides import it so a
config built for one is valid, field for field, for the other.
"""

from reference.config import (AXES, MAX_GROUP_SIZE, MAX_RESIDUAL_LENGTH, POLICIES, QUANTIZERS, SCHEMES,
                              KVSinkConfig, parse_preserve)

__all__ = ["KVSinkConfig", "parse_preserve", "QUANTIZERS", "POLICIES", "AXES", "SCHEMES",
           "MAX_GROUP_SIZE", "MAX_RESIDUAL_LENGTH"]
