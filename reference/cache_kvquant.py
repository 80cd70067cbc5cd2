"""The quantized store of the KVQuant quantizer (docs/06-cache.md §6.21 - 6.22, docs/08-kvquant.md).

:class:`KVQuantStore` implements the interface of
:class:`reference.cache_store.QuantizedStore` with KVQuant-style blocks:

* keys arrive post-RoPE (as a model gives them); each block un-rotates them
  with the tokens' rotary positions, quantizes the pre-RoPE keys per channel
  and the values per token on the calibrated level grids with dense-and-sparse
  outliers (:func:`quantize_block_kvquant_cache`), and rotates them back when
  dequantized (:class:`KVQuantCacheBlock`);
* so the residual window keeps every token's rotary position
  (:func:`check_rope_positions`), and the store holds the layer's
  :class:`~reference.kvquant.KVQuantCalibration` (:func:`check_kvquant_calibration`;
  ``nf_calibration(config, H, D)`` made at the first update when none was
  given) and ``rope_inv_freq`` (:func:`check_rope_inv_freq`).

Bytes (definition 6.22): each block ``KVQuantBlock.nbytes + B*n (coded) +
4*B*n (rotary positions)``; the calibration's ``nbytes`` once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .cache_store import BlockSlots, QuantizedStore
from .config import KVSinkConfig
from .kvquant import (MAX_POSITION, KVQuantBlock, KVQuantCalibration, KVQuantTensor, apply_rope,
                      check_kvquant_config, dequantize_block_kvquant, nf_calibration,
                      quantize_block_kvquant, unapply_rope)

__all__ = ["check_kvquant_calibration", "check_rope_inv_freq", "check_rope_positions",
           "kvquant_take_rows", "KVQuantCacheBlock", "quantize_block_kvquant_cache", "KVQuantStore"]


# --------------------------------------------------------------------------
# checks of the kvquant-only arguments
# --------------------------------------------------------------------------

def check_kvquant_calibration(calibration, config: KVSinkConfig):
    """The layer's ``KVQuantCalibration`` (reference arrays), or None (nf with p = 0: made at the
    first update by ``nf_calibration``, docs/08-kvquant.md definition 8.9)."""
    if calibration is None:
        if config.kvquant_datatype != "nf" or config.outlier_fraction != 0:
            raise ValueError(
                "kvquant_calibration is required for quantizer='kvquant' unless "
                "kvquant_datatype='nf' and outlier_fraction=0 (got "
                f"kvquant_datatype={config.kvquant_datatype!r}, outlier_fraction="
                f"{config.outlier_fraction}); make one with reference.kvquant.calibrate_kvquant")
        return None
    if not isinstance(calibration, KVQuantCalibration):
        raise TypeError(f"kvquant_calibration must be a reference.kvquant.KVQuantCalibration, got "
                        f"{type(calibration).__name__}")
    if hasattr(calibration, "to_reference"):       # the torch twin (a subclass): numpy arrays
        calibration = calibration.to_reference()
    calibration.check(config, *np.shape(calibration.key_lower))
    return calibration


def check_rope_inv_freq(inv_freq) -> Optional[np.ndarray]:
    if inv_freq is None:
        return None
    f = np.asarray(inv_freq)
    if f.dtype == np.bool_ or f.dtype.kind != "f":
        raise TypeError(f"rope_inv_freq must be a float array (D/2,), got dtype {f.dtype}")
    if f.ndim != 1 or f.shape[0] < 1:
        raise ValueError(f"rope_inv_freq must have shape (D/2,), got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("rope_inv_freq contains NaN or Inf")
    return f.astype(np.float32)


def check_rope_positions(rope_positions, valid: np.ndarray, first: int) -> np.ndarray:
    """int32 ``(B, n)`` rotary positions of new tokens: ``first + j`` if None; 0 at padding.

    Valid tokens need positions in ``[0, 2**24)`` (exact in float32, docs/08 definition 8.1);
    padding slots may hold anything (transformers gives them 1, others -1): they are never
    rotated as data, and are stored as 0.
    """
    b, n = valid.shape
    if rope_positions is None:
        pos = np.broadcast_to(first + np.arange(n, dtype=np.int64), (b, n))
        if n and first + n - 1 >= MAX_POSITION:
            raise ValueError(f"rope_positions: slot positions reach {first + n - 1} >= 2**24; "
                             "pass rope_positions")
    else:
        pos = np.asarray(rope_positions)
        if pos.dtype == np.bool_ or pos.dtype.kind not in "ui":
            raise TypeError(f"rope_positions must be an integer array (B, n), got dtype {pos.dtype}")
        if pos.shape != (b, n):
            raise ValueError(f"rope_positions must have shape (B, n) = {(b, n)}, got {pos.shape}")
        pos = pos.astype(np.int64)
        bad = valid & ((pos < 0) | (pos >= MAX_POSITION))
        if np.any(bad):
            i = tuple(np.argwhere(bad)[0])
            raise ValueError(f"rope_positions must lie in [0, 2**24) at valid tokens; got {pos[i]} "
                             f"at (row, token) {i}")
    return np.where(valid, pos, 0).astype(np.int32)


# --------------------------------------------------------------------------
# Definition 6.21: a block of the kvquant quantizer (docs/08-kvquant.md)
# --------------------------------------------------------------------------

def kvquant_take_rows(qt: KVQuantTensor, rows: np.ndarray) -> KVQuantTensor:
    """``qt`` restricted to batch rows ``rows`` (repeats allowed), outlier indices re-numbered.

    The sparse part holds ascending flat C-order indices into ``(B, H, T, D)``;
    row ``i`` of the result is old row ``rows[i]``, so an outlier at
    ``(rows[i], rest)`` moves to ``i * H*T*D + rest``, still ascending.
    """
    per_row = int(np.prod(qt.shape[1:]))
    old_row = qt.outlier_index.astype(np.int64) // per_row
    rest = qt.outlier_index.astype(np.int64) % per_row
    index, value = [], []
    for i, r in enumerate(rows):
        sel = old_row == r
        index.append(i * per_row + rest[sel])
        value.append(qt.outlier_value[sel])
    return KVQuantTensor(
        codes=qt.codes[rows], scale=qt.scale[rows], centre=qt.centre[rows], levels=qt.levels,
        outlier_index=np.concatenate(index).astype(np.int32) if index else qt.outlier_index[:0],
        outlier_value=np.concatenate(value).astype(qt.outlier_value.dtype) if value
        else qt.outlier_value[:0],
        bits=qt.bits, group_size=qt.group_size, axis=qt.axis,
        shape=(len(rows),) + tuple(qt.shape[1:]))


@dataclass(frozen=True, eq=False)
class KVQuantCacheBlock(BlockSlots):
    """One flushed block of the quantized store with ``quantizer="kvquant"`` (definition 6.21).

    Attributes
    ----------
    start, num_slots, coded : as :class:`QuantizedBlock` (definition 6.5).
    rope_positions : int32 ``(B, n)``, the rotary position of each slot's token
        (0 at padding slots); the keys were un-rotated with them and are
        rotated back with them.
    block : :class:`reference.kvquant.KVQuantBlock` of the **pre-RoPE** keys and
        the values, ``(B, H, n, D)``, quantized with ``exclude = ~coded``.
    inv_freq : float32 ``(D/2,)`` (the layer's ``rope_inv_freq``) or ``None``
        (keys not rotated).
    """

    start: int
    num_slots: int
    coded: np.ndarray
    rope_positions: np.ndarray
    block: KVQuantBlock
    inv_freq: Optional[np.ndarray]

    @property
    def keys(self) -> KVQuantTensor:
        """Pre-RoPE keys, :class:`~reference.kvquant.KVQuantTensor` ``(B, H, n, D)``."""
        return self.block.keys

    @property
    def values(self) -> KVQuantTensor:
        return self.block.values

    def dequantize(self) -> Tuple[np.ndarray, np.ndarray]:
        """float32 keys (RoPE applied again with :attr:`rope_positions`) and values ``(B, H, n, D)``.

        ``k_hat = apply_rope(dequantize_block_kvquant(block)[0], rope_positions[:, None, :], inv_freq)``
        (docs/08-kvquant.md definition 8.10); excluded slots are placeholders.
        """
        kh, vh = dequantize_block_kvquant(self.block)
        if self.inv_freq is not None:
            kh = apply_rope(kh, self.rope_positions[:, None, :], self.inv_freq)
        return kh, vh

    def take_rows(self, rows: np.ndarray) -> "KVQuantCacheBlock":
        blk = KVQuantBlock(keys=kvquant_take_rows(self.block.keys, rows),
                           values=kvquant_take_rows(self.block.values, rows),
                           exclude=self.block.exclude[rows])
        return KVQuantCacheBlock(start=self.start, num_slots=self.num_slots,
                                 coded=self.coded[rows], rope_positions=self.rope_positions[rows],
                                 block=blk, inv_freq=self.inv_freq)

    @property
    def nbytes(self) -> int:
        """``block.nbytes`` (definition 8.7, keys + values) + ``B * n`` (coded) + ``4 * B * n``
        (int32 rotary positions)."""
        return int(self.block.nbytes + self.coded.size + self.rope_positions.nbytes)


def quantize_block_kvquant_cache(keys, values, coded, rope_positions, calibration,
                                 inv_freq, config: KVSinkConfig) -> KVQuantBlock:
    """Quantize one token block with the kvquant quantizer (definition 6.21).

    ``quantize_block_kvquant(unapply_rope(keys, rope_positions[:, None, :], inv_freq), values,
    calibration, config, exclude=~coded)`` (docs/08-kvquant.md definition 8.10).

    Parameters
    ----------
    keys : ``(B, H, n, D)`` stored (``dtype``) **post-RoPE** keys.
    values : ``(B, H, n, D)`` stored values.
    coded : bool ``(B, n)``.
    rope_positions : int ``(B, n)`` in ``[0, 2**24)``, the tokens' rotary positions.
    calibration : the layer's ``KVQuantCalibration``.
    inv_freq : float32 ``(D/2,)`` or ``None`` (keys not rotated: quantized as given).
    config : ``KVSinkConfig(quantizer="kvquant")``.
    """
    if inv_freq is None:
        pre = keys.astype(np.float32)
    else:
        pre = unapply_rope(keys, rope_positions[:, None, :], inv_freq)
    return quantize_block_kvquant(pre, values, calibration, config, exclude=~coded)


# --------------------------------------------------------------------------
# Definitions 6.21 - 6.22: the store
# --------------------------------------------------------------------------

class KVQuantStore(QuantizedStore):
    """The kvquant quantizer's store: :class:`KVQuantCacheBlock` of
    :func:`quantize_block_kvquant_cache` (definition 6.21).

    ``kvquant_calibration``: the layer's ``KVQuantCalibration``, or None only for
    ``kvquant_datatype="nf"`` with ``outlier_fraction=0`` (then
    ``nf_calibration(config, H, D)`` at the first update, forgotten by
    :meth:`reset`).  ``rope_inv_freq``: float ``(D/2,)`` or None (keys not rotated).
    """

    quantizer = "kvquant"
    token_rope = True

    def __init__(self, config: KVSinkConfig, *, kvquant_calibration=None, rope_inv_freq=None):
        check_kvquant_config(config)
        super().__init__(config)
        self._given_calibration = check_kvquant_calibration(kvquant_calibration, config)
        self.rope_inv_freq = check_rope_inv_freq(rope_inv_freq)
        self.calibration = self._given_calibration

    def reset(self) -> None:
        super().reset()
        self.calibration = self._given_calibration

    def check_rope_positions(self, rope_positions, valid: np.ndarray, first: int) -> np.ndarray:
        return check_rope_positions(rope_positions, valid, first)

    def check_dims(self, num_heads: int, head_dim: int) -> None:
        """The calibration and ``rope_inv_freq`` must fit ``H``, ``D``."""
        if self.calibration is not None:
            try:
                self.calibration.check(self.config, num_heads, head_dim)
            except ValueError as exc:
                raise ValueError(f"kvquant_calibration does not fit the keys: {exc}") from None
        d = head_dim
        if self.rope_inv_freq is not None and (d % 2 or self.rope_inv_freq.shape != (d // 2,)):
            raise ValueError(f"rope_inv_freq has shape {self.rope_inv_freq.shape}; keys with head "
                             f"dimension D={d} need (D/2,) = ({d // 2},) and D even")

    def bind(self, num_heads: int, head_dim: int) -> None:
        if self.calibration is None:
            self.calibration = nf_calibration(self.config, num_heads, head_dim)

    def _quantize(self, start: int, keys: np.ndarray, values: np.ndarray, coded: np.ndarray,
                  rope: Optional[np.ndarray]) -> KVQuantCacheBlock:
        block = quantize_block_kvquant_cache(keys, values, coded, rope, self.calibration,
                                             self.rope_inv_freq, self.config)
        return KVQuantCacheBlock(start=start, num_slots=int(coded.shape[1]), coded=coded,
                                 rope_positions=rope, block=block, inv_freq=self.rope_inv_freq)

    def nbytes(self) -> int:
        """The blocks' bytes plus the calibration's, once (definition 6.22)."""
        return super().nbytes() + self.calibration.nbytes
