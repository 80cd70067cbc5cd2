"""KVQuant-style quantization, torch twin of ``reference/kvquant.py`` (docs/08-kvquant.md).

Same names, same semantics, torch tensors on CPU or CUDA; the operations are
the reference's float32 operations one by one, so codes, statistics and
outliers are bit-identical to the reference (CPU; CUDA eager division is
``div.rn.f32`` as well).  The definitions live by concern, each module
re-exported here:

* ``accelerated/kvquant_rope.py``: RoPE (8.1), ``model_inv_freq``;
* ``accelerated/kvquant_levels.py``: nf levels, nearest level, normalisation (8.2-8.4);
* ``accelerated/kvquant_tensor.py``: outliers and the dense-and-sparse tensor (8.5-8.7),
  with the Triton path of its dense part (``accelerated/kvquant_kernels.py``);
* ``accelerated/kvquant_calibration.py``: k-means and calibration (8.8-8.9),
  ``calibrate_kvquant_layers``, ``fisher_weights``;
* here: the block API (8.10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from reference import kvquant as _ref
from reference.config import KVSinkConfig

from .kvquant_calibration import (DATATYPES, KMEANS_MAX_ITER, KVQuantCalibration, attention_modules,
                                  calibrate_kvquant, calibrate_kvquant_layers, check_kvquant_config,
                                  fisher_weights, kmeans_assign, kmeans_init, kmeans_levels,
                                  kmeans_objective, nf_calibration)
from .kvquant_levels import (check_levels, check_range, level_boundaries, level_dequantize, nearest_level,
                             nf_levels, normalisation, normalised)
from .kvquant_rope import (ETA32, MAX_POSITION, U32, apply_rope, check_float, model_inv_freq, rope_angles,
                           rope_cos_sin, rope_inv_freq, rope_roundtrip_bound, rotate_half, unapply_rope)
from .kvquant_tensor import (GROUP_AXIS, KERNEL_ENV, KVQuantTensor, check_bhtd, check_exclude_bt,
                             check_kv_pair, check_outlier_fraction, check_sparse_dtype,
                             dequantize_nonuniform, kernel_path, key_outlier_mask, key_outlier_thresholds,
                             key_outliers, outlier_count, quantize_checked, quantize_nonuniform,
                             value_outlier_mask, value_outliers)

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
    # accelerated only
    "model_inv_freq", "check_float", "check_range", "GROUP_AXIS", "KERNEL_ENV", "kernel_path",
    "key_outlier_mask", "value_outlier_mask", "quantize_checked", "check_sparse_dtype",
    "calibrate_kvquant_layers", "fisher_weights", "attention_modules",
]

_F32 = torch.float32


# =========================================================================== 8.10 block API

@dataclass(frozen=True, eq=False)
class KVQuantBlock:
    """Torch twin of ``reference.kvquant.KVQuantBlock``."""

    keys: KVQuantTensor
    values: KVQuantTensor
    exclude: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def _levels_for(lv: torch.Tensor, side: str) -> torch.Tensor:
    if lv.ndim == 1:
        return lv
    return lv[:, None, :, :] if side == "keys" else lv[:, None, None, :]


def quantize_block_kvquant(keys_pre_rope: torch.Tensor, values: torch.Tensor,
                           calibration: Optional[KVQuantCalibration], config: KVSinkConfig, *,
                           exclude=None, sparse_dtype=torch.float32,
                           use_kernel: Optional[bool] = None) -> KVQuantBlock:
    """Quantize one ``(B, H, T, D)`` block KVQuant-style (definition 8.10); as the reference.

    ``use_kernel`` as :func:`quantize_nonuniform` (keys and values)."""
    config = check_kvquant_config(config)
    k, v = check_kv_pair("keys_pre_rope", keys_pre_rope, values)
    bsz, h, t, d = k.shape
    excl = check_exclude_bt(exclude, bsz, t, k.device)
    if calibration is None:
        calibration = nf_calibration(config, h, d, k.device)
    if isinstance(calibration, _ref.KVQuantCalibration) and not isinstance(calibration, KVQuantCalibration):
        calibration = KVQuantCalibration.from_reference(calibration, k.device)
    if not isinstance(calibration, KVQuantCalibration):
        raise TypeError(f"calibration must be a KVQuantCalibration, got {type(calibration).__name__}")
    calibration.check(config, h, d)
    check_levels(calibration.key_levels, config.key_bits)
    check_levels(calibration.value_levels, config.value_bits)
    sdt = check_sparse_dtype(sparse_dtype)
    k_out = key_outlier_mask(k, calibration.key_lower, calibration.key_upper, excl)
    v_out = value_outlier_mask(v, float(config.outlier_fraction), excl)
    kq = quantize_checked(k, _levels_for(calibration.key_levels.to(k.device), "keys"), config.key_bits,
                              config.key_group_size, "channel", k_out, excl, sdt, use_kernel)
    vq = quantize_checked(v, _levels_for(calibration.value_levels.to(k.device), "values"),
                              config.value_bits, config.value_group_size, "token", v_out, excl, sdt,
                              use_kernel)
    return KVQuantBlock(keys=kq, values=vq, exclude=excl.clone())


def dequantize_block_kvquant(block: KVQuantBlock, *, use_kernel: Optional[bool] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(keys_pre_rope, values)`` float32 ``(B, H, T, D)``; excluded slots are placeholders."""
    if not isinstance(block, KVQuantBlock):
        raise TypeError(f"block must be a KVQuantBlock, got {type(block).__name__}")
    return (dequantize_nonuniform(block.keys, use_kernel=use_kernel),
            dequantize_nonuniform(block.values, use_kernel=use_kernel))


def fake_quantize_kvquant(keys_pre_rope: torch.Tensor, values: torch.Tensor, calibration, config, *,
                          preserved=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize then dequantize a whole block; preserved tokens returned exactly (float32)."""
    block = quantize_block_kvquant(keys_pre_rope, values, calibration, config, exclude=preserved)
    kh, vh = dequantize_block_kvquant(block)
    keep = block.exclude[:, None, :, None]
    return (torch.where(keep, keys_pre_rope.to(_F32), kh), torch.where(keep, values.to(_F32), vh))
