"""The quantized KV cache, streaming semantics: docs/06-cache.md.

This module is the specification every port's cache is checked against.  One
layer's cache, :class:`QuantizedKVCacheLayer`, holds three stores:

* the **quantized store** (definition 6.5): a list of :class:`QuantizedBlock`,
  each ``token_block`` consecutive slots quantized at once, codes kept packed;
* the **preserved store** (definition 6.6): the tokens marked "preserve" (the
  attention sinks), at full precision, with their positions;
* the **residual window** (definition 6.3): the most recent tokens at full
  precision, whose preservation status may still be *pending*.

Life of a token (docs/06-cache.md §6.0)::

    update()  -> residual, status pending
    resolve() -> residual, status "preserve" or "quantize"
    flush()   -> quantized store (its code is written exactly once)
                 or preserved store (full precision, until crop/reset)

Nothing is ever re-quantized and nothing is dropped, except by :meth:`crop`,
:meth:`select_batch` and :meth:`reset`, which the caller asks for.

:func:`quantize_sequence` gives the same contents in one shot (definition
6.10); the streaming operations are specified so that prefill + decode steps
produce exactly the one-shot result (theorem 6.11).

Shapes: ``B`` batch rows, ``H`` KV heads, ``D`` head dimension, all fixed by
the first :meth:`~QuantizedKVCacheLayer.update`; ``n`` tokens of one update;
``blk = config.token_block``; ``R = config.residual_length``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from .attention import split_attention
from .config import KVSinkConfig
from .kvquant import (MAX_POSITION, KVQuantBlock, KVQuantCalibration, KVQuantTensor, apply_rope,
                      dequantize_block_kvquant, nf_calibration, quantize_block_kvquant, unapply_rope)
from .kvquant import _check_kvquant_config
from .preserve import cap_preserved
from .quantize import QuantizedTensor, dequantize, quantize

__all__ = [
    "STORAGE_DTYPES",
    "PackedQuantized",
    "QuantizedBlock",
    "KVQuantCacheBlock",
    "QuantizedKVCacheLayer",
    "QuantizedKVCache",
    "quantize_block",
    "quantize_block_kvquant_cache",
    "admit_preserved",
    "flushed_length",
    "quantize_sequence",
]

#: Allowed storage dtypes of the full-precision parts (preserved store, residual).
STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

_FLUSH_PENDING_MESSAGE = "resolve() the status of tokens before flushing"


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------

def _check_storage_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be np.float32 or np.float16, got {dtype!r}") from None
    if dt not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be np.float32 or np.float16 (storage dtype of the "
                         f"full-precision parts), got {dt}")
    return dt


def _check_kv(name: str, x, dtype: np.dtype) -> np.ndarray:
    """``x`` as a ``(B, H, n, D)`` array of the storage dtype, finite, or a clear error."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype "
                        f"{arr.dtype}")
    if arr.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (B, H, n, D), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; the cache stores finite values only")
    with np.errstate(over="ignore"):
        stored = arr.astype(dtype)
    if not np.all(np.isfinite(stored)):
        raise ValueError(f"{name} has values outside the range of the storage dtype {dtype} "
                         f"(|x| > {np.finfo(dtype).max}); use dtype=np.float32")
    return stored


def _check_mask(name: str, x, shape: Tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array of shape {shape}, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (B, n), got {arr.shape}")
    return arr.copy()


def _check_index(name: str, idx, batch: int, length: Optional[int]) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.ndim == 1 and arr.shape[0] == 0:
        raise ValueError(f"{name} must select at least one row, got an empty list")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of row indices, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have length B={length} (one source row per row), "
                         f"got {arr.shape[0]}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must select at least one row")
    if np.any(arr < 0) or np.any(arr >= batch):
        raise ValueError(f"{name} must hold row indices in [0, {batch}), got {arr.tolist()}")
    return arr.astype(np.int64)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _check_kvquant_calibration(calibration, config: KVSinkConfig):
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


def _check_rope_inv_freq(inv_freq) -> Optional[np.ndarray]:
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


def _check_rope_positions(rope_positions, valid: np.ndarray, first: int) -> np.ndarray:
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
# Definition 6.4: one side (keys or values) of a block, stored packed
# --------------------------------------------------------------------------

def _block_positions(start: int, num_slots: int, coded: np.ndarray) -> np.ndarray:
    """Positions of a block's code slots: int64 ``(B, n)``.

    ``start + j`` at slot ``j`` if ``coded[:, j]`` and ``j < num_slots`` (a cropped
    block keeps its codes beyond ``num_slots``), ``-1`` at the others.
    """
    j = np.arange(coded.shape[1], dtype=np.int64)
    live = coded & (j < num_slots)[None, :]
    return np.where(live, start + j[None, :], np.int64(-1))


@dataclass(frozen=True, eq=False)
class PackedQuantized:
    """A :class:`~reference.quantize.QuantizedTensor` in its stored form (definition 6.4).

    Attributes
    ----------
    words : uint32 ``(B, H, n, packed_length(D, bits))``, codes packed along D
        (definition 2.4, :meth:`QuantizedTensor.packed`).
    scale : float32, ``(B, H, n, ceil(D/G))`` (axis "token") or
        ``(B, H, ceil(n/G), D)`` (axis "channel").
    zero : float32 like ``scale``, or ``None`` (symmetric scheme).
    bits, group_size, axis, symmetric, shape : as in ``QuantizedTensor``;
        ``shape == (B, H, n, D)``.

    Bytes held: ``4 * words.size + 4 * scale.size + 4 * zero.size``.
    """

    words: np.ndarray
    scale: np.ndarray
    zero: Optional[np.ndarray]
    bits: int
    group_size: int
    axis: str
    symmetric: bool
    shape: Tuple[int, ...]

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor) -> "PackedQuantized":
        return cls(words=qt.packed(), scale=qt.scale, zero=qt.zero, bits=qt.bits,
                   group_size=qt.group_size, axis=qt.axis, symmetric=qt.symmetric,
                   shape=qt.shape)

    def unpack(self) -> QuantizedTensor:
        """The ``QuantizedTensor`` (unpacked codes) this stores."""
        return QuantizedTensor.from_packed(self.words, self.scale, self.zero, bits=self.bits,
                                           group_size=self.group_size, axis=self.axis,
                                           symmetric=self.symmetric, shape=self.shape)

    def dequantize(self) -> np.ndarray:
        """float32 ``(B, H, n, D)`` (``reference.quantize.dequantize`` of :meth:`unpack`)."""
        return dequantize(self.unpack())

    def take_rows(self, rows: np.ndarray) -> "PackedQuantized":
        """The same tensor restricted to batch rows ``rows`` (axis 0 of every array)."""
        return PackedQuantized(
            words=self.words[rows], scale=self.scale[rows],
            zero=None if self.zero is None else self.zero[rows], bits=self.bits,
            group_size=self.group_size, axis=self.axis, symmetric=self.symmetric,
            shape=(len(rows),) + tuple(self.shape[1:]))

    @property
    def nbytes(self) -> int:
        """``4 * words.size + 4 * scale.size (+ 4 * zero.size)``."""
        return int(4 * self.words.size + 4 * self.scale.size
                   + (0 if self.zero is None else 4 * self.zero.size))


@dataclass(frozen=True, eq=False)
class QuantizedBlock:
    """One flushed block of the quantized store (definition 6.5).

    Attributes
    ----------
    start : int, position of the block's first slot.
    num_slots : int ``k``, slots of the block still in the cache: ``n`` (the
        codes held, ``n = blk``) when flushed, fewer after
        :meth:`QuantizedKVCacheLayer.crop` cut the block (definition 6.14).
    coded : bool ``(B, n)``: ``True`` where the slot holds a quantized token,
        i.e. the token is valid and was not admitted to the preserved store.
        ``~coded`` is exactly the ``exclude`` mask the block was quantized
        with; it is never changed afterwards.
    keys, values : :class:`PackedQuantized` of shape ``(B, H, n, D)``.

    Slot ``j`` is *live* iff ``j < num_slots and coded[b, j]``; its position is
    ``start + j``.
    """

    start: int
    num_slots: int
    coded: np.ndarray
    keys: PackedQuantized
    values: PackedQuantized

    @property
    def num_codes(self) -> int:
        """``n``: token slots whose codes the block holds (``>= num_slots``)."""
        return int(self.coded.shape[1])

    def positions(self) -> np.ndarray:
        """int64 ``(B, n)``: ``start + j`` at live slots, ``-1`` at the others."""
        return _block_positions(self.start, self.num_slots, self.coded)

    def dequantize(self) -> Tuple[np.ndarray, np.ndarray]:
        """float32 keys and values ``(B, H, n, D)`` (every slot; mask with :meth:`positions`)."""
        return self.keys.dequantize(), self.values.dequantize()

    def take_rows(self, rows: np.ndarray) -> "QuantizedBlock":
        return QuantizedBlock(start=self.start, num_slots=self.num_slots, coded=self.coded[rows],
                              keys=self.keys.take_rows(rows), values=self.values.take_rows(rows))

    @property
    def nbytes(self) -> int:
        """Packed keys + packed values + ``coded`` (1 byte per code slot per row, ``B * n``)."""
        return self.keys.nbytes + self.values.nbytes + int(self.coded.size)


# --------------------------------------------------------------------------
# Definition 6.21: a block of the kvquant quantizer (docs/08-kvquant.md)
# --------------------------------------------------------------------------

def _kvquant_take_rows(qt: KVQuantTensor, rows: np.ndarray) -> KVQuantTensor:
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
class KVQuantCacheBlock:
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

    @property
    def num_codes(self) -> int:
        return int(self.coded.shape[1])

    def positions(self) -> np.ndarray:
        """int64 ``(B, n)``: ``start + j`` at live slots, ``-1`` at the others."""
        return _block_positions(self.start, self.num_slots, self.coded)

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
        blk = KVQuantBlock(keys=_kvquant_take_rows(self.block.keys, rows),
                           values=_kvquant_take_rows(self.block.values, rows),
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
# Definitions 6.7 - 6.9: what one flush step computes
# --------------------------------------------------------------------------

def flushed_length(num_tokens: int, config: KVSinkConfig) -> int:
    """Tokens of a ``T``-token sequence that sit in the quantized store (definition 6.8).

    ``F(T) = blk * floor((T - R) / blk)`` if ``T >= R + blk``, else 0: the
    largest multiple of ``blk`` that leaves at least ``R`` tokens in the
    residual.  After :meth:`QuantizedKVCacheLayer.flush` the residual holds
    ``T - F(T)`` tokens, ``R <= T - F(T) < R + blk`` (or ``T`` if ``T < R``).
    """
    blk, r = config.token_block, config.residual_length
    if num_tokens < r + blk:
        return 0
    return blk * ((num_tokens - r) // blk)


def admit_preserved(flags: np.ndarray, held: np.ndarray, max_preserved: Optional[int]) -> np.ndarray:
    """Tokens of a block admitted to the preserved store (definition 6.7).

    ``A[b, j] = flags[b, j] and held[b] + #{j' <= j : flags[b, j']} <= max_preserved``
    (no condition when ``max_preserved`` is None): first come, first served,
    so over a whole sequence the admitted set is
    ``preserve.cap_preserved(flags, max_preserved)`` (definition 3.5).

    Parameters
    ----------
    flags : bool ``(B, k)``, the resolved "preserve" statuses of the block's tokens.
    held : int ``(B,)``, preserved tokens each row already holds.
    max_preserved : None or int >= 0 (``config.max_preserved``).
    """
    if max_preserved is None:
        return flags.copy()
    rank = np.cumsum(flags, axis=1) + held[:, None]
    return flags & (rank <= max_preserved)


def quantize_block(keys: np.ndarray, values: np.ndarray, coded: np.ndarray,
                   config: KVSinkConfig) -> Tuple[PackedQuantized, PackedQuantized]:
    """Quantize one token block, keys and values (definition 6.9).

    ``keys_q = quantize(keys, key_bits, key_group_size, key_axis, symmetric=S, exclude=E)``
    and the same for values with the ``value_*`` fields, where
    ``S = (config.scheme == "symmetric")`` and ``E[b, h, j] = not coded[b, j]``
    (preserved and padding tokens leave the statistics, definition 2.6).

    Parameters
    ----------
    keys, values : ``(B, H, k, D)`` in the storage dtype (cast to float32 by
        the quantizer, exactly).
    coded : bool ``(B, k)``.
    config : KVSinkConfig.

    Returns
    -------
    (keys, values) as :class:`PackedQuantized`.
    """
    symmetric = config.scheme == "symmetric"
    exclude = np.broadcast_to(~coded[:, None, :], keys.shape[:3])
    kq = quantize(keys, config.key_bits, config.key_group_size, config.key_axis,
                  symmetric=symmetric, exclude=exclude)
    vq = quantize(values, config.value_bits, config.value_group_size, config.value_axis,
                  symmetric=symmetric, exclude=exclude)
    return PackedQuantized.from_quantized(kq), PackedQuantized.from_quantized(vq)


# --------------------------------------------------------------------------
# Definitions 6.1 - 6.9: one layer
# --------------------------------------------------------------------------

class QuantizedKVCacheLayer:
    """The quantized KV cache of one attention layer (docs/06-cache.md).

    Parameters
    ----------
    config : KVSinkConfig (bits, group sizes, axes, scheme, residual length,
        cap ``max_preserved``, quantizer).  ``quantizer="uniform"``: blocks
        are :class:`QuantizedBlock` (definition 6.9); ``"kvquant"``: blocks are
        :class:`KVQuantCacheBlock` (definition 6.21, docs/08-kvquant.md; needs
        ``key_axis="channel"``, ``value_axis="token"``).
    dtype : np.float32 or np.float16, storage dtype of the full-precision
        parts (residual and preserved store).  Inputs are cast to it once
        (round to nearest even) by :meth:`update`.
    kvquant_calibration : kvquant only: the layer's
        ``reference.kvquant.KVQuantCalibration`` (``calibrate_kvquant``); None
        only for ``kvquant_datatype="nf"`` with ``outlier_fraction=0`` (then
        ``nf_calibration(config, H, D)`` is used).
    rope_inv_freq : kvquant only: float ``(D/2,)``, the model's rotary
        ``inv_freq`` (``accelerated.kvquant.model_inv_freq``): the keys given
        to :meth:`update` are post-RoPE, un-rotated before quantization and
        rotated back after.  None: the keys are not rotated (a model without
        RoPE, or keys given pre-RoPE) and are quantized as given.

    State (read through the properties; treat the arrays as read-only)
    -----
    ``blocks`` : list of :class:`QuantizedBlock`, contiguous, covering
        positions ``[0, num_quantized)``.
    preserved store: positions int64 ``(B, P)`` (``-1`` padding at the end of
        rows holding fewer than ``P``), keys and values ``(B, H, P, D)`` in
        ``dtype`` (0 at padding), ``P`` = the largest count over rows.
    residual: keys, values ``(B, H, r, D)`` in ``dtype`` at positions
        ``num_quantized .. num_quantized + r - 1``; ``valid`` bool ``(B, r)``;
        ``preserve`` bool ``(B, r)`` (resolved statuses; ``False`` placeholder
        for the last ``num_pending`` tokens, still pending).
    """

    def __init__(self, config: KVSinkConfig, *, dtype=np.float32, kvquant_calibration=None,
                 rope_inv_freq=None):
        if not isinstance(config, KVSinkConfig):
            raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = _check_storage_dtype(dtype)
        self.kvquant = config.quantizer == "kvquant"
        if self.kvquant:
            _check_kvquant_config(config)
            self._calibration_arg = _check_kvquant_calibration(kvquant_calibration, config)
            self.rope_inv_freq = _check_rope_inv_freq(rope_inv_freq)
        else:
            for name, arg in (("kvquant_calibration", kvquant_calibration),
                              ("rope_inv_freq", rope_inv_freq)):
                if arg is not None:
                    raise ValueError(f"{name} is only used by quantizer='kvquant' (the config has "
                                     f"quantizer={config.quantizer!r}); leave it None")
            self._calibration_arg = None
            self.rope_inv_freq = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the cache; ``B``, ``H``, ``D`` are forgotten (definition 6.16)."""
        self._dims: Optional[Tuple[int, int, int]] = None
        self.blocks: List[QuantizedBlock] = []
        self._start = 0                 # position of the first residual slot = num_quantized
        self._pres_pos = None           # int64 (B, P)
        self._pres_k = None             # dtype (B, H, P, D)
        self._pres_v = None
        self._res_k = None              # dtype (B, H, r, D)
        self._res_v = None
        self._res_valid = None          # bool (B, r)
        self._res_preserve = None       # bool (B, r)
        self._res_rope = None           # int32 (B, r): rotary positions (kvquant only)
        self._pending = 0               # the last `_pending` residual tokens are pending
        # kvquant: the calibration in use (nf_calibration(config, H, D) made at the first update
        # when none was given; forgotten with H, D)
        self.kvquant_calibration = self._calibration_arg

    def _allocate(self, b: int, h: int, d: int) -> None:
        self._dims = (b, h, d)
        self._pres_pos = np.zeros((b, 0), dtype=np.int64)
        self._pres_k = np.zeros((b, h, 0, d), dtype=self.dtype)
        self._pres_v = np.zeros((b, h, 0, d), dtype=self.dtype)
        self._res_k = np.zeros((b, h, 0, d), dtype=self.dtype)
        self._res_v = np.zeros((b, h, 0, d), dtype=self.dtype)
        self._res_valid = np.zeros((b, 0), dtype=bool)
        self._res_preserve = np.zeros((b, 0), dtype=bool)
        if self.kvquant:
            self._res_rope = np.zeros((b, 0), dtype=np.int32)
            if self.kvquant_calibration is None:
                self.kvquant_calibration = nf_calibration(self.config, h, d)

    @property
    def batch_size(self) -> Optional[int]:
        """``B``, or None before the first update."""
        return None if self._dims is None else self._dims[0]

    @property
    def num_heads(self) -> Optional[int]:
        return None if self._dims is None else self._dims[1]

    @property
    def head_dim(self) -> Optional[int]:
        return None if self._dims is None else self._dims[2]

    @property
    def num_quantized(self) -> int:
        """Slots of the quantized store (preserved and padding slots included)."""
        return self._start

    @property
    def num_residual(self) -> int:
        """``r``: slots of the residual window."""
        return 0 if self._res_k is None else int(self._res_k.shape[2])

    @property
    def num_pending(self) -> int:
        """Tokens whose status is still pending (the last ``num_pending`` residual slots)."""
        return self._pending

    @property
    def seq_length(self) -> int:
        """Total slots = ``num_quantized + num_residual`` = the next update's first position."""
        return self._start + self.num_residual

    @property
    def preserved(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The preserved store: ``(positions (B, P), keys (B, H, P, D), values (B, H, P, D))``."""
        self._require_data()
        return self._pres_pos, self._pres_k, self._pres_v

    @property
    def residual(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The residual: ``(keys (B, H, r, D), values, valid (B, r), preserve (B, r))``."""
        self._require_data()
        return self._res_k, self._res_v, self._res_valid, self._res_preserve

    @property
    def residual_rope_positions(self) -> np.ndarray:
        """kvquant: int32 ``(B, r)``, the residual tokens' rotary positions (0 at padding)."""
        self._require_data()
        if not self.kvquant:
            raise AttributeError("residual_rope_positions: only the kvquant quantizer stores "
                                 "rotary positions")
        return self._res_rope

    def preserved_positions(self) -> List[np.ndarray]:
        """Per row, the sorted int64 positions of its preserved-store tokens."""
        if self._dims is None:
            return []
        return [row[row >= 0].copy() for row in self._pres_pos]

    def _require_data(self) -> None:
        if self._dims is None:
            raise RuntimeError("the cache is empty: call update() first")

    # ------------------------------------------------------------------ 6.1 update
    def update(self, keys, values, valid=None, rope_positions=None) -> None:
        """Append ``n`` tokens to the residual window, status pending (definition 6.1).

        Parameters
        ----------
        keys, values : float ``(B, H, n, D)`` (float16/32/64), finite; cast to
            the storage dtype.  ``B``, ``H``, ``D`` must match earlier updates.
            With ``quantizer="kvquant"`` the keys are **post-RoPE** (as a model
            gives them) when the layer has ``rope_inv_freq``.
        valid : None (all valid) or bool ``(B, n)``; ``False`` = padding.
        rope_positions : kvquant only: None or int ``(B, n)``, the rotary
            position of each token (definition 6.21); None = the slot
            positions.  With left padding they differ (transformers counts
            positions from each row's first real token): pass them.

        The tokens take positions ``seq_length .. seq_length + n - 1``.
        """
        if not self.kvquant and rope_positions is not None:
            raise ValueError("rope_positions is only used by quantizer='kvquant' (the config has "
                             f"quantizer={self.config.quantizer!r}); leave it None")
        k = _check_kv("keys", keys, self.dtype)
        v = _check_kv("values", values, self.dtype)
        if k.shape != v.shape:
            raise ValueError(f"keys and values must have the same shape (B, H, n, D), got "
                             f"keys {k.shape} and values {v.shape}")
        b, h, n, d = k.shape
        if self._dims is not None:
            for name, got, want in (("B (axis 0)", b, self._dims[0]),
                                    ("H (axis 1)", h, self._dims[1]),
                                    ("D (axis 3)", d, self._dims[2])):
                if got != want:
                    raise ValueError(f"keys has {name} = {got} but the cache holds {want}; "
                                     "B, H and D are fixed by the first update (reset() to change)")
        if valid is None:
            valid = np.ones((b, n), dtype=bool)
        else:
            valid = _check_mask("valid", valid, (b, n))
        if self.kvquant:
            rope = _check_rope_positions(rope_positions, valid, self.seq_length)
            self._check_kvquant_dims(h, d)
        if self._dims is None:
            self._allocate(b, h, d)
        if self.kvquant:
            self._res_rope = np.concatenate([self._res_rope, rope], axis=1)
        self._res_k = np.concatenate([self._res_k, k], axis=2)
        self._res_v = np.concatenate([self._res_v, v], axis=2)
        self._res_valid = np.concatenate([self._res_valid, valid], axis=1)
        self._res_preserve = np.concatenate([self._res_preserve, np.zeros((b, n), bool)], axis=1)
        self._pending += n

    def _check_kvquant_dims(self, h: int, d: int) -> None:
        """kvquant: the calibration and ``rope_inv_freq`` must fit ``H``, ``D`` (checked before
        anything changes)."""
        if self.kvquant_calibration is not None:
            try:
                self.kvquant_calibration.check(self.config, h, d)
            except ValueError as exc:
                raise ValueError(f"kvquant_calibration does not fit the keys: {exc}") from None
        if self.rope_inv_freq is not None and (d % 2 or self.rope_inv_freq.shape != (d // 2,)):
            raise ValueError(f"rope_inv_freq has shape {self.rope_inv_freq.shape}; keys with head "
                             f"dimension D={d} need (D/2,) = ({d // 2},) and D even")

    # ------------------------------------------------------------------ 6.2 resolve
    def resolve(self, preserve) -> None:
        """Give the status of every pending token (definition 6.2).

        Parameters
        ----------
        preserve : bool ``(B, num_pending)``, in position order: ``True`` = keep
            at full precision (preserved store), ``False`` = quantize.  A
            ``True`` on a padding token raises ``ValueError``.
        """
        if self._dims is None:
            raise RuntimeError("resolve() before any update(): there is no pending token")
        b = self._dims[0]
        preserve = _check_mask("preserve", preserve, (b, self._pending))
        r = self.num_residual
        pending_valid = self._res_valid[:, r - self._pending:]
        if np.any(preserve & ~pending_valid):
            bad = np.argwhere(preserve & ~pending_valid)[0]
            raise ValueError(f"preserve marks a padding token (row {bad[0]}, position "
                             f"{self._start + r - self._pending + bad[1]}); padding is never "
                             "preserved: pass preserve & valid")
        self._res_preserve[:, r - self._pending:] = preserve
        self._pending = 0

    # ------------------------------------------------------------------ 6.3 flush
    def flush(self) -> int:
        """Move whole token blocks from the residual to the quantized/preserved stores (6.3).

        While ``num_residual - blk >= R``: the oldest ``blk`` residual tokens
        form a block; tokens with status "preserve" are admitted to the
        preserved store up to ``config.max_preserved`` per row
        (:func:`admit_preserved`), the others are quantized
        (:func:`quantize_block`, padding and admitted tokens excluded from the
        statistics).  Raises ``RuntimeError`` (and changes nothing) if a
        token that would be flushed is pending.

        Returns the number of blocks flushed.
        """
        if self._dims is None:
            return 0
        self._check_flushable()
        blk = self.config.token_block
        n_blocks = flushed_length(self.num_residual, self.config) // blk
        for _ in range(n_blocks):
            self._flush_block(blk)
        return n_blocks

    def _check_flushable(self) -> None:
        """Raise ``RuntimeError`` if :meth:`flush` would reach a pending token."""
        if self._dims is None:
            return
        n = flushed_length(self.num_residual, self.config)
        resolved = self.num_residual - self._pending
        if n > resolved:
            raise RuntimeError(f"{_FLUSH_PENDING_MESSAGE}: flushing {n} residual tokens needs "
                               f"their status, but only {resolved} are resolved")

    def _flush_block(self, blk: int) -> None:
        k, v = self._res_k[:, :, :blk], self._res_v[:, :, :blk]
        valid, flags = self._res_valid[:, :blk], self._res_preserve[:, :blk]
        held = np.sum(self._pres_pos >= 0, axis=1)
        admitted = admit_preserved(flags, held, self.config.max_preserved)
        coded = valid & ~admitted
        if self.kvquant:
            rope = self._res_rope[:, :blk]
            block = quantize_block_kvquant_cache(k, v, coded, rope, self.kvquant_calibration,
                                                 self.rope_inv_freq, self.config)
            self.blocks.append(KVQuantCacheBlock(start=self._start, num_slots=blk, coded=coded,
                                                 rope_positions=rope.copy(), block=block,
                                                 inv_freq=self.rope_inv_freq))
            self._res_rope = self._res_rope[:, blk:]
        else:
            kq, vq = quantize_block(k, v, coded, self.config)
            self.blocks.append(QuantizedBlock(start=self._start, num_slots=blk, coded=coded,
                                              keys=kq, values=vq))
        positions = self._start + np.arange(blk, dtype=np.int64)
        self._append_preserved(positions, k, v, admitted)
        self._res_k, self._res_v = self._res_k[:, :, blk:], self._res_v[:, :, blk:]
        self._res_valid = self._res_valid[:, blk:]
        self._res_preserve = self._res_preserve[:, blk:]
        self._start += blk

    def _append_preserved(self, positions, k, v, admitted) -> None:
        """Append, per row, the admitted tokens (in position order) to the preserved store."""
        b, h, d = self._dims
        held = np.sum(self._pres_pos >= 0, axis=1)
        new = np.sum(admitted, axis=1)
        p_new = int(max(held + new, default=0))
        if not np.any(new):
            return
        pos = np.full((b, p_new), -1, dtype=np.int64)
        pk = np.zeros((b, h, p_new, d), dtype=self.dtype)
        pv = np.zeros((b, h, p_new, d), dtype=self.dtype)
        for row in range(b):
            old = int(held[row])
            idx = np.flatnonzero(admitted[row])
            pos[row, :old] = self._pres_pos[row, :old]
            pk[row, :, :old], pv[row, :, :old] = self._pres_k[row, :, :old], self._pres_v[row, :, :old]
            pos[row, old:old + len(idx)] = positions[idx]
            pk[row, :, old:old + len(idx)] = k[row][:, idx]
            pv[row, :, old:old + len(idx)] = v[row][:, idx]
        self._pres_pos, self._pres_k, self._pres_v = pos, pk, pv

    def _trim_preserved(self) -> None:
        """Drop columns beyond ``P`` = the largest row count (after rows or entries were removed)."""
        p = int(np.max(np.sum(self._pres_pos >= 0, axis=1), initial=0))
        self._pres_pos = self._pres_pos[:, :p]
        self._pres_k, self._pres_v = self._pres_k[:, :, :p], self._pres_v[:, :, :p]

    # ------------------------------------------------------------------ 6.12 segments
    def segments(self) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The cache as ``(keys, values, key_positions)`` segments (definition 6.12).

        1. quantized store, dequantized: float32 ``(B, H, Q, D)``, positions
           ``(B, Q)`` with ``-1`` at preserved, padding and cropped-away slots
           (``Q`` = code slots held, the sum of the blocks' ``num_codes``;
           ``Q = num_quantized`` unless a crop cut a block);
        2. preserved store: ``(B, H, P, D)`` in ``dtype``, positions ``(B, P)``
           (``-1`` where a row holds fewer than ``P``);
        3. residual: ``(B, H, r, D)`` in ``dtype``, positions ``(B, r)``,
           ``-1`` at padding.

        Always these three, in this order (a segment may have 0 slots); an
        empty (never updated) cache gives ``[]``.  Input of
        ``reference.attention.split_attention``.
        """
        if self._dims is None:
            return []
        b, h, d = self._dims
        if self.blocks:
            parts = [blk.dequantize() for blk in self.blocks]
            qk = np.concatenate([p[0] for p in parts], axis=2)
            qv = np.concatenate([p[1] for p in parts], axis=2)
            qpos = np.concatenate([blk.positions() for blk in self.blocks], axis=1)
        else:
            qk = np.zeros((b, h, 0, d), dtype=np.float32)
            qv = np.zeros((b, h, 0, d), dtype=np.float32)
            qpos = np.zeros((b, 0), dtype=np.int64)
        rpos = self._start + np.arange(self.num_residual, dtype=np.int64)
        rpos = np.where(self._res_valid, rpos[None, :], np.int64(-1))
        return [(qk, qv, qpos),
                (self._pres_k.copy(), self._pres_v.copy(), self._pres_pos.copy()),
                (self._res_k.copy(), self._res_v.copy(), rpos)]

    def attend(self, query, query_positions, scale=None) -> np.ndarray:
        """Attention of ``query`` over the cache (definition 6.13), float64 ``(B, Hq, Tq, D)``.

        ``= reference.attention.split_attention(query, self.segments(), query_positions=..., scale=...)``.
        """
        return split_attention(query, self.segments(), query_positions=query_positions,
                               scale=scale)

    # ------------------------------------------------------------------ 6.14 crop
    def crop(self, max_length: int) -> None:
        """Keep the slots at positions ``< max_length`` (definition 6.14).

        ``max_length < 0`` means ``seq_length + max_length`` (drop that many
        from the end, as ``transformers.DynamicCache.crop``); a result below 0
        raises ``ValueError``.  ``max_length >= seq_length`` changes nothing.
        Blocks wholly beyond are dropped; a block straddling ``max_length``
        keeps its codes and statistics and shortens ``coded`` (nothing is
        re-quantized); preserved entries at positions ``>= max_length`` are
        dropped; the residual, its statuses and the pending count are
        truncated.  The next update starts at position ``max_length``.
        """
        if not _is_int(max_length):
            raise TypeError(f"max_length must be an int, got {max_length!r}")
        length = self.seq_length
        max_length = int(max_length)
        if max_length < 0:
            if length + max_length < 0:
                raise ValueError(f"max_length={max_length} drops more than the {length} slots "
                                 "the cache holds")
            max_length = length + max_length
        if max_length >= length:
            return
        kept = []
        for blk in self.blocks:
            if blk.start >= max_length:
                break
            k = min(blk.num_slots, max_length - blk.start)
            if k < blk.num_slots:
                blk = dataclasses.replace(blk, num_slots=k)
            kept.append(blk)
        self.blocks = kept
        keep_res = max(0, max_length - self._start)
        dropped = self.num_residual - keep_res
        self._res_k, self._res_v = self._res_k[:, :, :keep_res], self._res_v[:, :, :keep_res]
        self._res_valid = self._res_valid[:, :keep_res]
        self._res_preserve = self._res_preserve[:, :keep_res]
        if self.kvquant:
            self._res_rope = self._res_rope[:, :keep_res]
        self._pending = max(0, self._pending - dropped)
        self._start = min(self._start, max_length)
        # preserved entries beyond max_length: positions are sorted, so keep a prefix per row
        gone = self._pres_pos >= max_length
        self._pres_pos = np.where(gone, np.int64(-1), self._pres_pos)
        self._pres_k = np.where(gone[:, None, :, None], self.dtype.type(0), self._pres_k)
        self._pres_v = np.where(gone[:, None, :, None], self.dtype.type(0), self._pres_v)
        self._trim_preserved()

    # ------------------------------------------------------------------ 6.15 batch rows
    def _take_rows(self, rows: np.ndarray) -> None:
        self.blocks = [blk.take_rows(rows) for blk in self.blocks]
        self._pres_pos, self._pres_k, self._pres_v = \
            self._pres_pos[rows], self._pres_k[rows], self._pres_v[rows]
        self._res_k, self._res_v = self._res_k[rows], self._res_v[rows]
        self._res_valid, self._res_preserve = self._res_valid[rows], self._res_preserve[rows]
        if self.kvquant:
            self._res_rope = self._res_rope[rows]
        self._dims = (len(rows),) + self._dims[1:]
        self._trim_preserved()

    def reorder(self, beam_idx) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` (definition 6.15).

        ``beam_idx``: int ``(B,)`` with values in ``[0, B)`` (repeats allowed).
        """
        if self._dims is None:
            return
        self._take_rows(_check_index("beam_idx", beam_idx, self._dims[0], self._dims[0]))

    def select_batch(self, indices) -> None:
        """Keep rows ``indices`` (in that order); ``B`` becomes ``len(indices)`` (definition 6.15)."""
        if self._dims is None:
            return
        self._take_rows(_check_index("indices", indices, self._dims[0], None))

    # ------------------------------------------------------------------ 6.17 bytes
    def nbytes(self) -> int:
        """Exact bytes of the arrays held (definition 6.17).

        ``sum over blocks (4*words + 4*scale + 4*zero, keys and values, + B*k)``
        ``+ 2*B*H*P*D*itemsize + 8*B*P``  (preserved store)
        ``+ 2*B*H*r*D*itemsize + B*r + B*r``  (residual, valid, statuses).

        kvquant (definition 6.22): each block counts ``KVQuantBlock.nbytes``
        (docs/08-kvquant.md 8.7) ``+ B*n`` (coded) ``+ 4*B*n`` (int32 rotary
        positions); plus ``4*B*r`` (the residual's rotary positions) and the
        layer's ``KVQuantCalibration.nbytes``, once.
        """
        if self._dims is None:
            return 0
        total = sum(blk.nbytes for blk in self.blocks)
        if self.kvquant:
            total += self._res_rope.nbytes + self.kvquant_calibration.nbytes
        total += self._pres_k.nbytes + self._pres_v.nbytes + self._pres_pos.nbytes
        total += self._res_k.nbytes + self._res_v.nbytes
        total += self._res_valid.nbytes + self._res_preserve.nbytes
        return int(total)

    def __repr__(self) -> str:
        return (f"QuantizedKVCacheLayer(dims={self._dims}, quantized={self.num_quantized}, "
                f"blocks={len(self.blocks)}, preserved={[len(p) for p in self.preserved_positions()]}, "
                f"residual={self.num_residual}, pending={self._pending})")


# --------------------------------------------------------------------------
# Definition 6.10: one-shot quantization of a sequence
# --------------------------------------------------------------------------

def quantize_sequence(keys, values, preserve, valid, config: KVSinkConfig, *,
                      dtype=np.float32, kvquant_calibration=None, rope_inv_freq=None,
                      rope_positions=None) -> QuantizedKVCacheLayer:
    """The cache contents for a whole sequence, computed in one shot (definition 6.10).

    With ``T`` tokens, ``F = flushed_length(T, config)`` and
    ``C = preserve.cap_preserved(preserve[:, :F], config.max_preserved)``:

    * block ``j`` (``0 <= j < F / blk``) covers positions ``[j*blk, (j+1)*blk)``,
      ``coded = valid & ~C`` on them, codes from :func:`quantize_block`;
    * the preserved store holds the tokens of ``C`` in position order;
    * the residual holds positions ``F .. T-1`` with their statuses; none pending.

    Theorem 6.11: any streaming run over the same tokens (updates of any sizes,
    each followed by ``resolve`` and ``flush``) ends with identical contents.

    Parameters
    ----------
    keys, values : float ``(B, H, T, D)``.
    preserve : bool ``(B, T)``, statuses (``True`` on padding raises).
    valid : None or bool ``(B, T)``.
    config : KVSinkConfig.
    dtype : storage dtype (np.float32 or np.float16).
    kvquant_calibration, rope_inv_freq : as :class:`QuantizedKVCacheLayer` (kvquant only).
    rope_positions : kvquant only: None (slot positions) or int ``(B, T)``.

    With ``quantizer="kvquant"`` block ``j`` is
    :func:`quantize_block_kvquant_cache` of its stored keys and values,
    ``coded`` mask and rotary positions (definition 6.21).

    Returns
    -------
    A :class:`QuantizedKVCacheLayer` holding the result (it can be updated further).
    """
    layer = QuantizedKVCacheLayer(config, dtype=dtype, kvquant_calibration=kvquant_calibration,
                                  rope_inv_freq=rope_inv_freq)
    if not layer.kvquant and rope_positions is not None:
        raise ValueError("rope_positions is only used by quantizer='kvquant'; leave it None")
    k = _check_kv("keys", keys, layer.dtype)
    v = _check_kv("values", values, layer.dtype)
    if k.shape != v.shape:
        raise ValueError(f"keys and values must have the same shape (B, H, T, D), got "
                         f"keys {k.shape} and values {v.shape}")
    b, h, t, d = k.shape
    valid = np.ones((b, t), dtype=bool) if valid is None else _check_mask("valid", valid, (b, t))
    preserve = _check_mask("preserve", preserve, (b, t))
    if np.any(preserve & ~valid):
        raise ValueError("preserve marks a padding token; padding is never preserved: "
                         "pass preserve & valid")
    blk = config.token_block
    f = flushed_length(t, config)
    admitted = cap_preserved(preserve[:, :f], config.max_preserved)
    coded = valid[:, :f] & ~admitted
    if layer.kvquant:
        rope = _check_rope_positions(rope_positions, valid, 0)
        layer._check_kvquant_dims(h, d)
    layer._allocate(b, h, d)
    for j in range(f // blk):
        sl = slice(j * blk, (j + 1) * blk)
        if layer.kvquant:
            block = quantize_block_kvquant_cache(k[:, :, sl], v[:, :, sl], coded[:, sl],
                                                 rope[:, sl], layer.kvquant_calibration,
                                                 layer.rope_inv_freq, config)
            layer.blocks.append(KVQuantCacheBlock(start=j * blk, num_slots=blk,
                                                  coded=coded[:, sl].copy(),
                                                  rope_positions=rope[:, sl].copy(), block=block,
                                                  inv_freq=layer.rope_inv_freq))
        else:
            kq, vq = quantize_block(k[:, :, sl], v[:, :, sl], coded[:, sl], config)
            layer.blocks.append(QuantizedBlock(start=j * blk, num_slots=blk,
                                               coded=coded[:, sl].copy(), keys=kq, values=vq))
    if layer.kvquant:
        layer._res_rope = rope[:, f:].copy()
    layer._start = f
    layer._append_preserved(np.arange(f, dtype=np.int64), k[:, :, :f], v[:, :, :f], admitted)
    layer._res_k, layer._res_v = k[:, :, f:].copy(), v[:, :, f:].copy()
    layer._res_valid, layer._res_preserve = valid[:, f:].copy(), preserve[:, f:].copy()
    layer._pending = 0
    return layer


# --------------------------------------------------------------------------
# Definition 6.18: all layers of a model
# --------------------------------------------------------------------------

def layer_calibrations(kvquant_calibration, num_layers: int) -> list:
    """The per-layer KVQuant calibrations of a ``num_layers``-layer cache (6.18).

    ``kvquant_calibration`` is None (every layer gets None) or a sequence of
    exactly ``num_layers`` calibrations; ``num_layers`` an int >= 1.
    """
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if kvquant_calibration is None:
        return [None] * int(num_layers)
    cals = list(kvquant_calibration)
    if len(cals) != num_layers:
        raise ValueError(f"kvquant_calibration must hold one KVQuantCalibration per layer "
                         f"({num_layers}), got {len(cals)}")
    return cals


class QuantizedKVCache:
    """One :class:`QuantizedKVCacheLayer` per decoder layer, operated together (6.18).

    ``update`` is per layer (attention runs layer by layer); ``resolve``,
    ``flush``, ``crop``, ``reorder``, ``select_batch`` and ``reset`` apply to
    every layer; ``nbytes`` is the sum over layers.  kvquant:
    ``kvquant_calibration`` is None or a list with one ``KVQuantCalibration``
    per layer; ``rope_inv_freq`` is shared by the layers.
    """

    def __init__(self, config: KVSinkConfig, num_layers: int, *, dtype=np.float32,
                 kvquant_calibration=None, rope_inv_freq=None):
        self.config = config
        self.layers = [QuantizedKVCacheLayer(config, dtype=dtype, kvquant_calibration=cal,
                                             rope_inv_freq=rope_inv_freq)
                       for cal in layer_calibrations(kvquant_calibration, num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> QuantizedKVCacheLayer:
        return self.layers[self._check_layer(layer_idx)]

    def _check_layer(self, layer_idx) -> int:
        if not _is_int(layer_idx) or not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx must be an int in [0, {len(self.layers)}), "
                             f"got {layer_idx!r}")
        return int(layer_idx)

    def update(self, layer_idx: int, keys, values, valid=None, rope_positions=None) -> None:
        """:meth:`QuantizedKVCacheLayer.update` of layer ``layer_idx``."""
        self.layers[self._check_layer(layer_idx)].update(keys, values, valid, rope_positions)

    def resolve(self, preserve) -> None:
        """Resolve the pending tokens of every layer with the same ``preserve`` (B, n_pending).

        All layers must hold the same number of pending tokens (every layer
        was updated with the same tokens); checked before any layer changes.
        """
        counts = {layer.num_pending for layer in self.layers}
        if len(counts) != 1:
            raise RuntimeError(f"layers hold different numbers of pending tokens {sorted(counts)}; "
                               "update every layer before resolve()")
        preserve = np.asarray(preserve)
        for layer in self.layers:        # validate everywhere first: all or nothing
            if layer.batch_size is not None:
                _check_mask("preserve", preserve, (layer.batch_size, layer.num_pending))
                r = layer.num_residual
                if np.any(preserve & ~layer._res_valid[:, r - layer.num_pending:]):
                    raise ValueError("preserve marks a padding token; padding is never "
                                     "preserved: pass preserve & valid")
        for layer in self.layers:
            layer.resolve(preserve)

    def flush(self) -> int:
        """Flush every layer; returns the total number of blocks flushed.

        Checked for pending tokens in every layer before any layer changes.
        """
        for layer in self.layers:
            layer._check_flushable()
        return sum(layer.flush() for layer in self.layers)

    def segments(self, layer_idx: int):
        return self.layers[self._check_layer(layer_idx)].segments()

    def attend(self, layer_idx: int, query, query_positions, scale=None) -> np.ndarray:
        return self.layers[self._check_layer(layer_idx)].attend(query, query_positions, scale)

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)

    def reorder(self, beam_idx) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)

    def select_batch(self, indices) -> None:
        for layer in self.layers:
            layer.select_batch(indices)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def seq_length(self) -> int:
        """Slots of layer 0 (all layers agree between forward passes)."""
        return self.layers[0].seq_length

    def preserved_positions(self, layer_idx: int = 0) -> List[np.ndarray]:
        return self.layers[self._check_layer(layer_idx)].preserved_positions()
