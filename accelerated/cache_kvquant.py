"""The KVQuant-style quantized store (torch twin of ``reference/cache_kvquant.py``; docs/06-cache.md 6.21).

A flushed block is un-rotated (``accelerated.kvquant.unapply_rope`` with the
layer's ``rope_inv_freq``), quantized with
``accelerated.kvquant.quantize_block_kvquant`` and kept as a
:class:`KVQuantCacheBlock` whose keys and values are :class:`PackedKVQuantTensor`
(codes packed along ``D``, float32 half-range and centre, COO outliers); the
codebooks stay in the layer's calibration.  Attention dequantizes the blocks,
rotates the keys back and attends at full precision (no kernel for the
non-uniform grid yet).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

from reference import kvquant as _rkvq
from reference.config import KVSinkConfig

from . import kvquant as _kvq
from .cache_checks import INDEX_DTYPES
from .cache_store import BlockSlots, QuantizedStore
from .packing import pack_codes, unpack_codes

__all__ = ["KVQuantStore", "KVQuantCacheBlock", "PackedKVQuantTensor", "quantize_block_kvquant_cache",
           "kvquant_take_rows", "check_kvquant_calibration", "check_rope_inv_freq", "check_rope_positions"]

_F32 = torch.float32


def check_kvquant_calibration(calibration, config: KVSinkConfig):
    """A ``KVQuantCalibration`` (torch twin or reference), or None for nf with p = 0."""
    if calibration is None:
        if config.kvquant_datatype != "nf" or config.outlier_fraction != 0:
            raise ValueError(
                "kvquant_calibration is required for quantizer='kvquant' unless "
                "kvquant_datatype='nf' and outlier_fraction=0 (got "
                f"kvquant_datatype={config.kvquant_datatype!r}, outlier_fraction="
                f"{config.outlier_fraction}); make one with accelerated.kvquant.calibrate_kvquant_layers")
        return None
    if not isinstance(calibration, _rkvq.KVQuantCalibration):
        raise TypeError(f"kvquant_calibration must be a KVQuantCalibration (accelerated.kvquant or "
                        f"reference.kvquant), got {type(calibration).__name__}")
    calibration.check(config, *tuple(calibration.key_lower.shape))
    return calibration


def check_rope_inv_freq(inv_freq) -> Optional[torch.Tensor]:
    """float32 ``(D/2,)`` rotary frequencies (torch or numpy, finite), or None."""
    if inv_freq is None:
        return None
    if isinstance(inv_freq, np.ndarray):
        inv_freq = torch.from_numpy(np.ascontiguousarray(inv_freq))
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.dtype.is_floating_point:
        raise TypeError(f"rope_inv_freq must be a float tensor (D/2,), got "
                        f"{getattr(inv_freq, 'dtype', type(inv_freq).__name__)}")
    if inv_freq.dim() != 1 or inv_freq.shape[0] < 1:
        raise ValueError(f"rope_inv_freq must have shape (D/2,), got {tuple(inv_freq.shape)}")
    if not bool(torch.isfinite(inv_freq).all()):
        raise ValueError("rope_inv_freq contains NaN or Inf")
    return inv_freq.detach().to(_F32)


def _rope_message(bad: torch.Tensor, pos: torch.Tensor) -> str:
    i = tuple(int(j) for j in bad.nonzero()[0])
    return f"rope_positions must lie in [0, 2**24) at valid tokens; got {int(pos[i])} at (row, token) {i}"


def _given_rope_positions(rope_positions, valid: torch.Tensor, checks) -> torch.Tensor:
    b, n = valid.shape
    if isinstance(rope_positions, np.ndarray):
        rope_positions = torch.from_numpy(rope_positions)
    if not isinstance(rope_positions, torch.Tensor) or rope_positions.dtype not in INDEX_DTYPES:
        raise TypeError(f"rope_positions must be an integer tensor (B, n), got "
                        f"{getattr(rope_positions, 'dtype', type(rope_positions).__name__)}")
    if tuple(rope_positions.shape) != (b, n):
        raise ValueError(f"rope_positions must have shape (B, n) = {(b, n)}, got "
                         f"{tuple(rope_positions.shape)}")
    pos = rope_positions.to(device=valid.device, dtype=torch.int64)
    bad = valid & ((pos < 0) | (pos >= _kvq.MAX_POSITION))
    if checks is not None:
        checks.none_true(bad, lambda: _rope_message(bad, pos))
    elif n and bool(bad.any()):
        raise ValueError(_rope_message(bad, pos))
    return pos


def check_rope_positions(rope_positions, valid: torch.Tensor, first: int, checks=None) -> torch.Tensor:
    """int32 ``(B, n)`` rotary positions of new tokens (0 at padding), as the reference.

    None: the slot positions ``first + j``.  Valid tokens need positions in ``[0, 2**24)``;
    with ``checks`` (a ``DeferredChecks``) that test is recorded there (no sync).
    """
    b, n = valid.shape
    if rope_positions is None:
        if n and first + n - 1 >= _kvq.MAX_POSITION:
            raise ValueError(f"rope_positions: slot positions reach {first + n - 1} >= 2**24; "
                             "pass rope_positions")
        pos = torch.arange(first, first + n, dtype=torch.int64, device=valid.device).expand(b, n)
    else:
        pos = _given_rope_positions(rope_positions, valid, checks)
    return torch.where(valid, pos, torch.zeros((), dtype=torch.int64, device=valid.device)).to(torch.int32)


def kvquant_take_rows(index: torch.Tensor, value: torch.Tensor, per_row: int, idx: torch.Tensor):
    """COO outliers of ``(B, ...)`` re-numbered for rows ``idx`` (row ``i`` = old row ``idx[i]``):
    ``(index int32, value)``, still ascending."""
    old_row = index.to(torch.int64) // per_row
    rest = index.to(torch.int64) % per_row
    sel = old_row[None, :] == idx[:, None]                     # (B', K)
    new_row, k = sel.nonzero(as_tuple=True)                    # row-major: ascending new index
    return (new_row * per_row + rest[k]).to(torch.int32), value[k]


class PackedKVQuantTensor:
    """A :class:`accelerated.kvquant.KVQuantTensor` as the cache stores it: codes packed along ``D``.

    Fields as ``KVQuantTensor`` with ``words`` (int32 bit patterns, ``(B, H, n,
    packed_length(D, bits))``) instead of ``codes``.  ``nbytes`` is definition 8.7
    (the same as ``KVQuantTensor.nbytes``).
    """

    __slots__ = ("words", "scale", "centre", "levels", "outlier_index", "outlier_value", "bits",
                 "group_size", "axis", "shape")

    def __init__(self, words, scale, centre, levels, outlier_index, outlier_value, bits, group_size,
                 axis, shape):
        self.words, self.scale, self.centre, self.levels = words, scale, centre, levels
        self.outlier_index, self.outlier_value = outlier_index, outlier_value
        self.bits, self.group_size, self.axis, self.shape = bits, group_size, axis, tuple(shape)

    @classmethod
    def pack(cls, qt) -> "PackedKVQuantTensor":
        return cls(pack_codes(qt.codes, qt.bits, validate=False), qt.scale, qt.centre, qt.levels,
                   qt.outlier_index, qt.outlier_value, qt.bits, qt.group_size, qt.axis, qt.shape)

    def unpack(self):
        """The ``accelerated.kvquant.KVQuantTensor`` (unpacked uint8 codes)."""
        codes = unpack_codes(self.words, self.bits, self.shape[-1], validate=False)
        return _kvq.KVQuantTensor(codes=codes, scale=self.scale, centre=self.centre, levels=self.levels,
                                  outlier_index=self.outlier_index, outlier_value=self.outlier_value,
                                  bits=self.bits, group_size=self.group_size, axis=self.axis,
                                  shape=self.shape)

    def dequantize(self) -> torch.Tensor:
        return _kvq.dequantize_nonuniform(self.unpack())

    def take_rows(self, idx: torch.Tensor) -> "PackedKVQuantTensor":
        per_row = math.prod(self.shape[1:])
        oi, ov = kvquant_take_rows(self.outlier_index, self.outlier_value, per_row, idx)
        return PackedKVQuantTensor(self.words.index_select(0, idx), self.scale.index_select(0, idx),
                                   self.centre.index_select(0, idx), self.levels, oi, ov, self.bits,
                                   self.group_size, self.axis, (int(idx.shape[0]),) + self.shape[1:])

    @property
    def num_outliers(self) -> int:
        return int(self.outlier_index.numel())

    @property
    def nbytes(self) -> int:
        """``4 * words + 4 * scale + 4 * centre + K * (4 + itemsize of outlier values)`` (8.7)."""
        return int(4 * self.words.numel() + 4 * (self.scale.numel() + self.centre.numel())
                   + self.num_outliers * (4 + self.outlier_value.element_size()))

    def tensors(self) -> List[torch.Tensor]:
        return [self.words, self.scale, self.centre, self.outlier_index, self.outlier_value]


class KVQuantCacheBlock(BlockSlots):
    """One flushed block with ``quantizer="kvquant"`` (docs/06-cache.md 6.21; twin of the reference's).

    ``start``, ``num_slots``, ``coded`` bool ``(B, n)`` as ``QuantizedBlock``;
    ``rope_positions`` int32 ``(B, n)``; ``keys`` (pre-RoPE) and ``values``
    :class:`PackedKVQuantTensor` ``(B, H, n, D)``; ``inv_freq`` float32 ``(D/2,)`` or None.
    """

    __slots__ = ("start", "num_slots", "coded", "rope_positions", "keys", "values", "inv_freq")

    def __init__(self, start, num_slots, coded, rope_positions, keys, values, inv_freq):
        self.start, self.num_slots, self.coded, self.rope_positions = start, num_slots, coded, rope_positions
        self.keys, self.values, self.inv_freq = keys, values, inv_freq

    def dequantize(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 keys (RoPE re-applied with ``rope_positions``) and values ``(B, H, n, D)``."""
        kh, vh = self.keys.dequantize(), self.values.dequantize()
        if self.inv_freq is not None:
            kh = _kvq.apply_rope(kh, self.rope_positions[:, None, :], self.inv_freq)
        return kh, vh

    def with_slots(self, num_slots: int) -> "KVQuantCacheBlock":
        return KVQuantCacheBlock(self.start, num_slots, self.coded, self.rope_positions, self.keys,
                                 self.values, self.inv_freq)

    def take_rows(self, idx: torch.Tensor) -> "KVQuantCacheBlock":
        return KVQuantCacheBlock(self.start, self.num_slots, self.coded.index_select(0, idx),
                                 self.rope_positions.index_select(0, idx), self.keys.take_rows(idx),
                                 self.values.take_rows(idx), self.inv_freq)

    @property
    def nbytes(self) -> int:
        """``keys.nbytes + values.nbytes`` (8.7) ``+ B*n`` (coded) ``+ 4*B*n`` (rotary positions)."""
        return int(self.keys.nbytes + self.values.nbytes + self.coded.numel()
                   + 4 * self.rope_positions.numel())

    def tensors(self) -> List[torch.Tensor]:
        return [self.coded, self.rope_positions] + self.keys.tensors() + self.values.tensors()

    def __repr__(self) -> str:
        return (f"KVQuantCacheBlock(start={self.start}, num_slots={self.num_slots}, "
                f"num_codes={self.num_codes})")


def quantize_block_kvquant_cache(keys, values, coded, rope_positions, calibration, inv_freq,
                                 config: KVSinkConfig):
    """Quantize one token block with the kvquant quantizer (definition 6.21):
    ``quantize_block_kvquant(unapply_rope(keys, rope_positions[:, None, :], inv_freq), values,
    calibration, config, exclude=~coded)`` (keys post-RoPE ``(B, H, n, D)``; ``inv_freq`` None:
    keys quantized as given)."""
    if inv_freq is None:
        pre = keys.to(_F32)
    else:
        pre = _kvq.unapply_rope(keys, rope_positions[:, None, :], inv_freq)
    return _kvq.quantize_block_kvquant(pre, values, calibration, config, exclude=~coded)


class KVQuantStore(QuantizedStore):
    """The KVQuant-style store: a list of :class:`KVQuantCacheBlock`, plus the layer's calibration
    (``calibration``, on the device from the first update; an nf one made then when none was
    given) and rotary frequencies (``rope_inv_freq``)."""

    quantizer = "kvquant"
    token_rope = True

    def __init__(self, config: KVSinkConfig, *, kvquant_calibration=None, rope_inv_freq=None):
        _kvq.check_kvquant_config(config)
        super().__init__(config)
        self._calibration_arg = check_kvquant_calibration(kvquant_calibration, config)
        self._inv_freq_arg = check_rope_inv_freq(rope_inv_freq)

    def check_rope_positions(self, rope_positions, valid, first, checks=None):
        return check_rope_positions(rope_positions, valid, first, checks)

    def check_dims(self, num_heads: int, head_dim: int) -> None:
        """The calibration and ``rope_inv_freq`` must fit ``H``, ``D`` (before any change)."""
        cal = self._calibration_arg
        if cal is not None:
            try:
                cal.check(self.config, num_heads, head_dim)
            except ValueError as exc:
                raise ValueError(f"kvquant_calibration does not fit the keys: {exc}") from None
        f = self._inv_freq_arg
        d = head_dim
        if f is not None and (d % 2 or tuple(f.shape) != (d // 2,)):
            raise ValueError(f"rope_inv_freq has shape {tuple(f.shape)}; keys with head dimension "
                             f"D={d} need (D/2,) = ({d // 2},) and D even")

    def bind(self, batch: int, num_heads: int, head_dim: int, device) -> None:
        super().bind(batch, num_heads, head_dim, device)
        cal = self._calibration_arg
        if cal is None:
            cal = _kvq.nf_calibration(self.config, num_heads, head_dim, device)
        elif not isinstance(cal, _kvq.KVQuantCalibration):
            cal = _kvq.KVQuantCalibration.from_reference(cal, device)
        else:
            cal = _kvq.KVQuantCalibration.from_reference(cal.to_reference(), device)
        self.calibration = cal
        if self._inv_freq_arg is not None:
            self.rope_inv_freq = self._inv_freq_arg.to(device)

    def reset(self) -> None:
        super().reset()
        self.calibration = self.rope_inv_freq = None

    def _quantize(self, start, keys, values, coded, rope) -> KVQuantCacheBlock:
        rope = rope.clone()
        block = quantize_block_kvquant_cache(keys, values, coded, rope, self.calibration,
                                             self.rope_inv_freq, self.config)
        return KVQuantCacheBlock(start=start, num_slots=self.block, coded=coded.clone(), rope_positions=rope,
                                 keys=PackedKVQuantTensor.pack(block.keys),
                                 values=PackedKVQuantTensor.pack(block.values), inv_freq=self.rope_inv_freq)

    def nbytes(self) -> int:
        """The blocks (definition 6.22) and the calibration."""
        return int(super().nbytes() + self.calibration.nbytes) if self.dims is not None else 0

    def tensors(self) -> List[torch.Tensor]:
        out = super().tensors()
        cal = self.calibration
        if cal is not None:
            out += [cal.key_lower, cal.key_upper]
            if cal.datatype == "kmeans":
                out += [cal.key_levels, cal.value_levels]
        if self.rope_inv_freq is not None:
            out.append(self.rope_inv_freq)
        return out
