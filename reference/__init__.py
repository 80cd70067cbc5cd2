"""kvsink reference implementation (numpy): the specification of the algorithm.

Read docs/01-notation.md first; each module names the docs page it implements.
"""

from .config import AXES, POLICIES, QUANTIZERS, SCHEMES, KVSinkConfig, parse_preserve
from .packing import check_bits, codes_per_word, pack_codes, packed_length, unpack_codes
from .quantize import (
    QuantizedTensor,
    asymmetric_codes,
    asymmetric_dequantize,
    asymmetric_ratio,
    asymmetric_scale_zero,
    dequantize,
    distance_to_tie_ulps,
    expand_groups,
    group_absmax,
    group_min_max,
    quantization_levels,
    quantize,
    quantize_per_channel,
    quantize_per_token,
    split_groups,
    symmetric_codes,
    symmetric_dequantize,
    symmetric_offset,
    symmetric_ratio,
    symmetric_scale,
)

__all__ = [
    "AXES", "POLICIES", "QUANTIZERS", "SCHEMES", "KVSinkConfig", "parse_preserve",
    "check_bits", "codes_per_word", "pack_codes", "packed_length", "unpack_codes",
    "QuantizedTensor", "asymmetric_codes", "asymmetric_dequantize", "asymmetric_ratio",
    "asymmetric_scale_zero", "dequantize", "distance_to_tie_ulps", "expand_groups",
    "group_absmax", "group_min_max", "quantization_levels", "quantize", "quantize_per_channel",
    "quantize_per_token", "split_groups", "symmetric_codes", "symmetric_dequantize",
    "symmetric_offset", "symmetric_ratio", "symmetric_scale",
]
