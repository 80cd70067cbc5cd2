"""The quantized store of one cache layer: the base class and the uniform quantizer (docs/06-cache.md).

A layer (:class:`reference.cache_layer.QuantizedKVCacheLayer`) keeps its flushed
blocks in a :class:`QuantizedStore`.  The base class holds what every
quantizer shares -- the list of blocks, contiguous from position 0, and the
operations on it (append, crop, batch rows, the dequantized segment, bytes)
-- and calls a small interface implemented once per quantizer:

* ``check_rope_positions(rope_positions, valid, first)``: the per-token rotary
  positions of an update (int32 ``(B, n)``), or None for a quantizer without them;
* ``check_dims(H, D)``: can the store hold heads of this shape? (before any change);
* ``bind(H, D)``: the first update fixed ``H`` and ``D``;
* ``_quantize(start, keys, values, coded, rope)``: one token block -> this
  quantizer's block record;
* ``token_rope`` (class attribute): the residual window keeps rotary positions.

The other half of the pair is each block record's ``dequantize()`` (as
transformers' ``QuantizedLayer._quantize`` / ``_dequantize``).

* :class:`UniformStore` (this module): KIVI-style asymmetric / symmetric
  integer codes, blocks :class:`QuantizedBlock` of :class:`PackedQuantized`
  (definitions 6.4, 6.5, 6.9; :func:`quantize_block`).
* :class:`reference.cache_kvquant.KVQuantStore`: KVQuant-style (definition 6.21).

``reference.cache_layer.make_store`` picks one from ``config.quantizer``.
Shapes: ``B`` rows, ``H`` KV heads, ``D`` head dimension, ``n`` code slots of
a block (``n = config.token_block``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from .config import KVSinkConfig
from .quantize import QuantizedTensor, dequantize, quantize

__all__ = ["BlockSlots", "block_positions", "PackedQuantized", "QuantizedBlock", "quantize_block",
           "QuantizedStore", "UniformStore"]


# --------------------------------------------------------------------------
# Definition 6.4: one side (keys or values) of a block, stored packed
# --------------------------------------------------------------------------

def block_positions(start: int, num_slots: int, coded: np.ndarray) -> np.ndarray:
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


class BlockSlots:
    """What every flushed block record shares (the uniform ``QuantizedBlock`` and the KVQuant
    ``KVQuantCacheBlock``): its ``start``, ``num_slots`` and ``coded`` ``(B, n)`` fields give the
    number of code slots and the live positions (definition 6.14)."""

    __slots__ = ()

    @property
    def num_codes(self) -> int:
        """``n``: token slots whose codes the block holds (``>= num_slots``)."""
        return int(self.coded.shape[1])

    def positions(self):
        """int64 ``(B, n)``: ``start + j`` at live slots, ``-1`` at the others."""
        return block_positions(self.start, self.num_slots, self.coded)


@dataclass(frozen=True, eq=False)
class QuantizedBlock(BlockSlots):
    """One flushed block of the quantized store (definition 6.5).

    Attributes
    ----------
    start : int, position of the block's first slot.
    num_slots : int ``k``, slots of the block still in the cache: ``n`` (the
        codes held, ``n = blk``) when flushed, fewer after
        ``QuantizedKVCacheLayer.crop`` cut the block (definition 6.14).
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
# Definition 6.9: quantizing one block (uniform quantizer)
# --------------------------------------------------------------------------

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
# Definition 6.5: the quantized store; base class and the uniform implementation
# --------------------------------------------------------------------------

class QuantizedStore:
    """The quantized store of one layer (definition 6.5): blocks, contiguous from position 0.

    Holds what every quantizer shares; a subclass implements the interface
    of the module docstring (:meth:`check_rope_positions`, :meth:`_quantize`,
    and where needed :meth:`check_dims`, :meth:`bind`, :meth:`reset`,
    :meth:`nbytes`).  Made by ``reference.cache_layer.make_store``.

    Attributes
    ----------
    config : the layer's KVSinkConfig.
    blocks : list of block records (``QuantizedBlock`` / ``KVQuantCacheBlock``),
        block ``i`` covering positions ``[blocks[i].start, blocks[i].start + blocks[i].num_slots)``.
    calibration, rope_inv_freq : the kvquant quantizer's (None for the others).
    """

    #: The ``config.quantizer`` value this store implements.
    quantizer = ""
    #: True if the residual window must keep each token's rotary position for this store.
    token_rope = False
    calibration = None
    rope_inv_freq = None

    def __init__(self, config: KVSinkConfig):
        self.config = config
        self.blocks: List = []

    # ----------------------------------------------------------- the per-quantizer interface
    def check_rope_positions(self, rope_positions, valid: np.ndarray,
                             first: int) -> Optional[np.ndarray]:
        """Rotary positions of ``n`` new tokens (``valid`` bool ``(B, n)``, the first at slot
        position ``first``): int32 ``(B, n)``, or None if the quantizer does not use them."""
        raise NotImplementedError

    def check_dims(self, num_heads: int, head_dim: int) -> None:
        """Raise ``ValueError`` (before anything changes) if the store cannot hold ``H``, ``D``."""

    def bind(self, num_heads: int, head_dim: int) -> None:
        """The first update fixed ``H`` and ``D`` (after :meth:`check_dims`)."""

    def _quantize(self, start: int, keys: np.ndarray, values: np.ndarray, coded: np.ndarray,
                  rope: Optional[np.ndarray]):
        """One block: ``keys``, ``values`` ``(B, H, n, D)`` (storage dtype), ``coded`` bool
        ``(B, n)``, ``rope`` int32 ``(B, n)`` or None -> this quantizer's block record."""
        raise NotImplementedError

    # ----------------------------------------------------------- shared
    def reset(self) -> None:
        """No block (definition 6.16)."""
        self.blocks = []

    def append(self, start: int, keys: np.ndarray, values: np.ndarray, coded: np.ndarray,
               rope: Optional[np.ndarray]) -> None:
        """Quantize ``m * blk`` tokens ``(B, H, m*blk, D)`` at positions ``start ..`` as ``m``
        consecutive blocks of ``blk = config.token_block`` (:meth:`_quantize` each) and append
        them; ``coded`` bool ``(B, m*blk)``, ``rope`` int32 ``(B, m*blk)`` or None."""
        blk = self.config.token_block
        for j in range(0, keys.shape[2], blk):
            sl = slice(j, j + blk)
            self.blocks.append(self._quantize(start + j, keys[:, :, sl], values[:, :, sl],
                                              coded[:, sl].copy(),
                                              None if rope is None else rope[:, sl].copy()))

    def crop(self, max_length: int) -> None:
        """Blocks wholly at positions ``>= max_length`` dropped; a block straddling it keeps its
        codes and statistics, with ``num_slots`` shortened (definition 6.14)."""
        kept = []
        for blk in self.blocks:
            if blk.start >= max_length:
                break
            k = min(blk.num_slots, max_length - blk.start)
            if k < blk.num_slots:
                blk = dataclasses.replace(blk, num_slots=k)
            kept.append(blk)
        self.blocks = kept

    def take_rows(self, rows: np.ndarray) -> None:
        """Batch rows ``rows`` of every block (definition 6.15)."""
        self.blocks = [blk.take_rows(rows) for blk in self.blocks]

    def segment(self, b: int, h: int, d: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The store dequantized (definition 6.12, segment 1): float32 keys, values
        ``(B, H, Q, D)`` and int64 positions ``(B, Q)``, ``-1`` at slots that are not live."""
        if not self.blocks:
            return (np.zeros((b, h, 0, d), dtype=np.float32),
                    np.zeros((b, h, 0, d), dtype=np.float32), np.zeros((b, 0), dtype=np.int64))
        parts = [blk.dequantize() for blk in self.blocks]
        return (np.concatenate([p[0] for p in parts], axis=2),
                np.concatenate([p[1] for p in parts], axis=2),
                np.concatenate([blk.positions() for blk in self.blocks], axis=1))

    def nbytes(self) -> int:
        """Bytes held: the blocks' (definitions 6.17, 6.22)."""
        return int(sum(blk.nbytes for blk in self.blocks))


class UniformStore(QuantizedStore):
    """The uniform (KIVI-style) quantizer's store: :class:`QuantizedBlock` of
    :func:`quantize_block` (definition 6.9)."""

    quantizer = "uniform"

    def __init__(self, config: KVSinkConfig, *, kvquant_calibration=None, rope_inv_freq=None):
        for name, arg in (("kvquant_calibration", kvquant_calibration),
                          ("rope_inv_freq", rope_inv_freq)):
            if arg is not None:
                raise ValueError(f"{name} is only used by quantizer='kvquant' (the config has "
                                 f"quantizer={config.quantizer!r}); leave it None")
        super().__init__(config)

    def check_rope_positions(self, rope_positions, valid: np.ndarray, first: int) -> None:
        if rope_positions is not None:
            raise ValueError("rope_positions is only used by quantizer='kvquant' (the config has "
                             f"quantizer={self.config.quantizer!r}); leave it None")
        return None

    def _quantize(self, start: int, keys: np.ndarray, values: np.ndarray, coded: np.ndarray,
                  rope: Optional[np.ndarray]) -> QuantizedBlock:
        kq, vq = quantize_block(keys, values, coded, self.config)
        return QuantizedBlock(start=start, num_slots=int(coded.shape[1]), coded=coded, keys=kq,
                              values=vq)
