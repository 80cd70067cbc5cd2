"""KVQuant-style quantization, the specification (docs/08-kvquant.md).

KVQuant (Hooper et al., 2024) quantizes the KV cache with four ideas, one
small function per definition, in five modules split by concern; this one
holds definition 8.10 and re-exports every public name of the others, so
``reference.kvquant.X`` reaches them all:

* ``reference.kvquant_rope``        8.1        rotary embedding
* ``reference.kvquant_levels``      8.2 - 8.4  nf grid, nearest level, normalisation
* ``reference.kvquant_tensor``      8.5 - 8.7  outliers, dense-and-sparse tensor
* ``reference.kvquant_calibration`` 8.8 - 8.9  weighted k-means, calibration
* ``reference.kvquant``             8.10       one block of the cache (this module)

=====  ==============================================  ==========================================
 def   concept                                         function
=====  ==============================================  ==========================================
 8.1   rotary embedding (Llama / transformers)         :func:`rope_inv_freq`, :func:`rope_angles`,
                                                       :func:`rope_cos_sin`, :func:`rotate_half`,
                                                       :func:`apply_rope`, :func:`unapply_rope`,
                                                       :func:`rope_roundtrip_bound`
 8.2   normal-float grid ("nf")                        :func:`nf_levels`
 8.3   nearest level, ties to the lower level          :func:`level_boundaries`, :func:`nearest_level`
 8.4   group normalisation to [-1, 1]                  :func:`normalisation`, :func:`normalised`,
                                                       :func:`level_dequantize`
 8.5   outlier counts and key thresholds               :func:`outlier_count`,
                                                       :func:`key_outlier_thresholds`, :func:`key_outliers`
 8.6   per-token value outliers                        :func:`value_outliers`
 8.7   dense-and-sparse tensor                         :class:`KVQuantTensor`, :func:`quantize_nonuniform`,
                                                       :func:`dequantize_nonuniform`
 8.8   sensitivity-weighted k-means ("kmeans")         :func:`kmeans_init`, :func:`kmeans_assign`,
                                                       :func:`kmeans_objective`, :func:`kmeans_levels`
 8.9   calibration of one layer                        :class:`KVQuantCalibration`, :func:`calibrate_kvquant`
 8.10  one block of the cache; fake quantization       :class:`KVQuantBlock`, :func:`quantize_block_kvquant`,
                                                       :func:`dequantize_block_kvquant`,
                                                       :func:`fake_quantize_kvquant`
=====  ==============================================  ==========================================

Numerics: as docs/02-quantization.md, every quantization operation is IEEE
float32 (inputs cast to float32 first, float64 rounded), each operation
rounded separately (no FMA), divisions correctly rounded.  The k-means fit
runs in float64 and its levels are rounded to float32 at the end.
"""


from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .config import KVSinkConfig
from .kvquant_calibration import (DATATYPES, KMEANS_MAX_ITER, KVQuantCalibration, calibrate_kvquant,
                                  check_kvquant_config, kmeans_assign, kmeans_init, kmeans_levels,
                                  kmeans_objective, nf_calibration)
from .kvquant_levels import (check_levels, level_boundaries, level_dequantize, nearest_level,
                             nf_levels, normalisation, normalised)
from .kvquant_rope import (ETA32, MAX_POSITION, U32, apply_rope, rope_angles, rope_cos_sin, rope_inv_freq,
                           rope_roundtrip_bound, rotate_half, unapply_rope)
from .kvquant_tensor import (KVQuantTensor, check_bhtd, check_exclude_bt, check_kv_pair,
                             check_outlier_fraction, dequantize_nonuniform, key_outlier_thresholds,
                             key_outliers, outlier_count, quantize_nonuniform, value_outliers)

__all__ = [
    "rope_inv_freq", "rope_angles", "rope_cos_sin", "rotate_half", "apply_rope", "unapply_rope",
    "rope_roundtrip_bound",
    "nf_levels", "check_levels", "level_boundaries", "nearest_level",
    "normalisation", "normalised", "level_dequantize",
    "check_outlier_fraction", "check_exclude_bt", "check_bhtd", "check_kv_pair",
    "outlier_count", "key_outlier_thresholds", "key_outliers", "value_outliers",
    "KVQuantTensor", "quantize_nonuniform", "dequantize_nonuniform",
    "kmeans_init", "kmeans_assign", "kmeans_objective", "kmeans_levels",
    "KVQuantCalibration", "check_kvquant_config", "calibrate_kvquant", "nf_calibration",
    "KVQuantBlock", "quantize_block_kvquant", "dequantize_block_kvquant", "fake_quantize_kvquant",
    "DATATYPES", "KMEANS_MAX_ITER", "MAX_POSITION", "U32", "ETA32",
]

_F32 = np.float32

# Not KVQuant names, but reached through ``reference.kvquant`` by existing users (tests/,
# conformance/tolerances.py), as they were when this module imported them: kept importable here.
from .packing import pack_codes  # noqa: E402,F401
from .quantize import GROUP_AXIS, expand_groups, group_min_max, split_groups  # noqa: E402,F401



# =========================================================================== 8.10 block API

@dataclass(frozen=True, eq=False)
class KVQuantBlock:
    """One quantized block of a layer's cache (definition 8.10): ``keys`` (pre-RoPE) and ``values``,
    each a :class:`KVQuantTensor` ``(B, H, T, D)``; ``exclude`` bool ``(B, T)``."""

    keys: KVQuantTensor
    values: KVQuantTensor
    exclude: np.ndarray

    @property
    def nbytes(self) -> int:
        """``keys.nbytes + values.nbytes`` (the calibration is counted once per layer, apart)."""
        return self.keys.nbytes + self.values.nbytes


def quantize_block_kvquant(keys_pre_rope, values, calibration: Optional[KVQuantCalibration],
                           config: KVSinkConfig, *, exclude=None,
                           sparse_dtype=np.float32) -> KVQuantBlock:
    """Quantize one block of ``T`` tokens KVQuant-style (definition 8.10).

    Parameters
    ----------
    keys_pre_rope, values : float ``(B, H, T, D)``; keys **before** RoPE
        (:func:`unapply_rope` recovers them from post-RoPE keys).
    calibration : the layer's :class:`KVQuantCalibration`; ``None`` is
        allowed only for ``nf`` with ``outlier_fraction == 0``.
    config : ``KVSinkConfig`` (``quantizer="kvquant"``): ``key_bits``,
        ``value_bits``, ``key_group_size`` (tokens per key group),
        ``value_group_size`` (channels per value group), ``outlier_fraction``,
        ``kvquant_datatype``.
    exclude : None or bool ``(B, T)``: preserved and padding tokens — no
        statistic, no outlier, neutral code 0; the caller stores them.
    sparse_dtype : float32 (exact) or float16, storage of the outlier values.

    Keys: outliers = outside the calibrated per-channel thresholds (8.5);
    values: top ``outlier_count(p, H*D)`` per token (8.6); both then
    :func:`quantize_nonuniform` with the calibration's levels.
    """
    config = check_kvquant_config(config)
    k, v = check_kv_pair("keys_pre_rope", keys_pre_rope, values)
    bsz, h, t, d = k.shape
    excl = check_exclude_bt(exclude, bsz, t)
    if calibration is None:
        calibration = nf_calibration(config, h, d)
    if not isinstance(calibration, KVQuantCalibration):
        raise TypeError(f"calibration must be a KVQuantCalibration, got {type(calibration).__name__}")
    calibration.check(config, h, d)
    k_out = key_outliers(k, calibration.key_lower, calibration.key_upper, excl)
    v_out = value_outliers(v, config.outlier_fraction, excl)
    kq = quantize_nonuniform(k, calibration.key_levels_for(), config.key_bits, config.key_group_size,
                             "channel", outliers=k_out, exclude=excl, sparse_dtype=sparse_dtype)
    vq = quantize_nonuniform(v, calibration.value_levels_for(), config.value_bits,
                             config.value_group_size, "token", outliers=v_out, exclude=excl,
                             sparse_dtype=sparse_dtype)
    return KVQuantBlock(keys=kq, values=vq, exclude=excl.copy())


def dequantize_block_kvquant(block: KVQuantBlock) -> Tuple[np.ndarray, np.ndarray]:
    """``(keys_pre_rope, values)`` float32 ``(B, H, T, D)`` of a block; excluded slots are placeholders."""
    if not isinstance(block, KVQuantBlock):
        raise TypeError(f"block must be a KVQuantBlock, got {type(block).__name__}")
    return dequantize_nonuniform(block.keys), dequantize_nonuniform(block.values)


def fake_quantize_kvquant(keys_pre_rope, values, calibration, config: KVSinkConfig, *,
                          preserved=None) -> Tuple[np.ndarray, np.ndarray]:
    """Quantize then dequantize a whole ``(B, H, T, D)`` block, preserved tokens returned exactly
    (the fake-quantization protocol of the perplexity table, definition 8.10)."""
    block = quantize_block_kvquant(keys_pre_rope, values, calibration, config, exclude=preserved)
    kh, vh = dequantize_block_kvquant(block)
    keep = block.exclude[:, None, :, None]
    return (np.where(keep, check_bhtd("keys_pre_rope", keys_pre_rope), kh).astype(_F32),
            np.where(keep, check_bhtd("values", values), vh).astype(_F32))
