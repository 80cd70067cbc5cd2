"""The quantized store of one cache layer (torch twin of ``reference/cache_store.py``).

:class:`QuantizedStore` is the base class the layer calls (docs/06-cache.md
definition 6.5): the block bookkeeping (starts, slots still held), crop, row
selection and the byte count are shared; a quantizer implements ``_quantize``
(one block record from ``(B, H, blk, D)`` tokens) and the checks of its own
arguments.  A flush appends in two steps, :meth:`QuantizedStore.stage` (quantize, change
nothing, hand back the device flags that must be read first: :class:`StagedBlocks`) and
:meth:`QuantizedStore.commit`, so that the layer reads every flag of a flush at once
(``accelerated/cache_flush.py``).  :class:`UniformStore` (KIVI-style) overrides the list of blocks
with contiguous packed buffers, the layout the Triton decode kernel reads
(``accelerated/attention_kernels.py``): int32 words ``(B, H, Qcap, W)``,
float32 scale / zero, int64 slot positions (-1 = empty) and coded flags,
grown to ``max(need, 1.25 * Qcap, 64)`` slots rounded up to a whole block.
``accelerated.cache_kvquant.KVQuantStore`` is the KVQuant-style store.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from reference.config import KVSinkConfig
from reference.packing import packed_length

from .attention import attention_kernel_usable, quantized_segment_attention, segment_partial
from .cache_state import MIN_CAPACITY, select_rows
from .packing import WORD_DTYPE
from .quantize import (PackedQuantizedTensor, check_quantize_input, dequantize, quantize_defers_validation,
                       quantize_packed_deferred)

__all__ = ["BlockSlots", "QuantizedStore", "UniformStore", "QuantizedBlock", "PackedBuffers",
           "block_positions", "StagedBlocks"]

_F32 = torch.float32


def block_positions(start: int, num_slots: int, coded: torch.Tensor) -> torch.Tensor:
    """int64 ``(B, n)``: ``start + j`` at a block's live slots (coded, ``j < num_slots``), -1 elsewhere."""
    j = torch.arange(coded.shape[1], dtype=torch.int64, device=coded.device)
    live = coded & (j < num_slots)
    return torch.where(live, start + j, torch.full_like(j, -1))


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


class QuantizedBlock(BlockSlots):
    """One block of the quantized store, as views of a layer's buffers (twin of the reference's).

    Attributes: ``start`` (int), ``num_slots`` (``k``, slots still in the
    cache), ``coded`` bool ``(B, n)`` (as flushed; ``~coded`` is the exclude
    mask of the quantization), ``keys`` and ``values``
    (:class:`~accelerated.quantize.PackedQuantizedTensor` of ``(B, H, n, D)``),
    ``n = blk``.  Slot ``j`` is live iff ``j < num_slots and coded[b, j]``.
    """

    __slots__ = ("start", "num_slots", "coded", "keys", "values")

    def __init__(self, start: int, num_slots: int, coded: torch.Tensor, keys: PackedQuantizedTensor,
                 values: PackedQuantizedTensor):
        self.start, self.num_slots, self.coded, self.keys, self.values = start, num_slots, coded, keys, values

    def dequantize(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 keys and values ``(B, H, n, D)``."""
        return dequantize(self.keys), dequantize(self.values)

    def __repr__(self) -> str:
        return f"QuantizedBlock(start={self.start}, num_slots={self.num_slots}, num_codes={self.num_codes})"


class QuantizedStore:
    """The quantized store of one layer: blocks of ``token_block`` slots, contiguous from position 0.

    Shared here: the host-side ``starts`` / ``slots`` of the blocks (position of each block's
    first slot, slots still in the cache), :meth:`stage` (one :meth:`_quantize` per block) and
    :meth:`commit`, :meth:`crop`, :meth:`take_rows`, :meth:`segment`, :meth:`partial`, :meth:`nbytes`.  A
    quantizer implements :meth:`_quantize` and :meth:`check_rope_positions` (and may extend
    :meth:`check_dims`, :meth:`bind`, :meth:`reset`).
    """

    quantizer = ""
    #: True when tokens carry rotary positions (the residual window keeps them for :meth:`_quantize`).
    token_rope = False
    calibration = None
    rope_inv_freq = None
    #: True when :meth:`partial` validates the query itself (the layer then does not).
    checks_query = False
    #: True when the layer may attend the store by the fused decode kernel (``kernel_views``).
    fused_decode = False

    def __init__(self, config: KVSinkConfig):
        self.config = config
        self.block = config.token_block
        self.starts: List[int] = []
        self.slots: List[int] = []
        self._blocks: list = []
        self.dims: Optional[Tuple[int, int, int]] = None
        self.device = None

    # ------------------------------------------------------------------ the quantizer's part

    def check_rope_positions(self, rope_positions, valid: torch.Tensor, first: int, checks=None):
        """Per-token rotary positions of an update (int32 ``(B, n)``), or None."""
        raise NotImplementedError

    def check_dims(self, num_heads: int, head_dim: int) -> None:
        """Raise (before anything changes) if the store cannot hold heads of this shape."""

    def bind(self, batch: int, num_heads: int, head_dim: int, device) -> None:
        """The first update fixed ``(B, H, D)`` and the device."""
        self.dims, self.device = (batch, num_heads, head_dim), device

    def _quantize(self, start: int, keys: torch.Tensor, values: torch.Tensor, coded: torch.Tensor,
                  rope: Optional[torch.Tensor]):
        """One block record from ``(B, H, blk, D)`` tokens, their coded mask ``(B, blk)`` and rotary
        positions (None without)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @property
    def num_codes(self) -> int:
        """Code slots held (``blk`` per block; a cropped block keeps its codes)."""
        return len(self.starts) * self.block

    @property
    def blocks(self) -> list:
        return list(self._blocks)

    def _record(self, start: int, m: int) -> None:
        self.starts.extend(range(start, start + m, self.block))
        self.slots.extend([self.block] * (m // self.block))

    def defers_validation(self, keys: torch.Tensor) -> bool:
        """Whether :meth:`stage` validates tokens like ``keys`` through device flags (no host read);
        False: it validates as it quantizes (host reads), so the caller reads its own checks first."""
        return False

    def stage(self, start: int, keys: torch.Tensor, values: torch.Tensor, coded: torch.Tensor,
              rope: Optional[torch.Tensor]) -> "StagedBlocks":
        """Quantize ``m`` tokens ``(B, H, m, D)`` (``m`` a multiple of the block) as consecutive
        blocks starting at position ``start``, changing nothing: :meth:`commit` appends them."""
        blk, m = self.block, keys.shape[2]
        new = [self._quantize(start + j, keys[:, :, j:j + blk], values[:, :, j:j + blk],
                              coded[:, j:j + blk], None if rope is None else rope[:, j:j + blk])
               for j in range(0, m, blk)]
        return StagedBlocks(start, m, new)

    def commit(self, staged: "StagedBlocks") -> None:
        """Append what :meth:`stage` quantized (its flags read and verified)."""
        self._blocks.extend(staged.record)
        self._record(staged.start, staged.m)

    def crop(self, max_length: int) -> None:
        """Drop blocks starting at or after ``max_length``, shorten a straddling one (6.14)."""
        kept = sum(1 for s in self.starts if s < max_length)
        del self.starts[kept:]
        del self.slots[kept:]
        if kept:
            self.slots[-1] = min(self.slots[-1], max_length - self.starts[-1])
        self._cut(kept, max_length)

    def _cut(self, kept: int, max_length: int) -> None:
        del self._blocks[kept:]
        if kept:
            self._blocks[-1] = self._blocks[-1].with_slots(self.slots[-1])

    def take_rows(self, idx: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``idx[i]`` (int64 on the device)."""
        self._blocks = [blk.take_rows(idx) for blk in self._blocks]
        self.dims = (int(idx.shape[0]),) + self.dims[1:]

    def reset(self) -> None:
        """Empty the store (definition 6.16)."""
        self.starts, self.slots, self._blocks = [], [], []
        self.dims = self.device = None

    def slot_positions(self) -> torch.Tensor:
        """int64 ``(B, Q)``: position of every code slot, -1 = empty."""
        if not self._blocks:
            return torch.zeros((self.dims[0], 0), dtype=torch.int64, device=self.device)
        return torch.cat([blk.positions() for blk in self._blocks], dim=1)

    def _dequantized(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 keys and values ``(B, H, Q, D)`` of every code slot."""
        if not self._blocks:
            z = torch.zeros(self.dims[:2] + (0, self.dims[2]), dtype=_F32, device=self.device)
            return z, z.clone()
        parts = [blk.dequantize() for blk in self._blocks]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)

    def segment(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The store as segment 1 of definition 6.12: float32 keys and values ``(B, H, Q, D)``
        dequantized (a copy) and the int64 slot positions ``(B, Q)``."""
        keys, values = self._dequantized()
        return keys, values, self.slot_positions().clone()

    def partial(self, q, qp, scale, *, block_size: int, use_kernel=None, check_query: bool = True):
        """``(m, l, acc)`` of the query over the store (definition 5.4): the dequantized blocks
        attended at full precision."""
        kq, vq = self._dequantized()
        return segment_partial(q, kq, vq, qp, self.slot_positions(), None, scale, block_size)

    def packed(self, side: str):
        raise AttributeError(f"quantized_{side}: the {self.quantizer} store is a list of blocks "
                             "(.blocks), not packed uniform buffers")

    def nbytes(self) -> int:
        """The blocks' bytes (definitions 6.17, 6.22)."""
        return int(sum(blk.nbytes for blk in self._blocks))

    def tensors(self) -> List[torch.Tensor]:
        return [t for blk in self._blocks for t in blk.tensors()]


class StagedBlocks:
    """Tokens quantized by :meth:`QuantizedStore.stage` and not yet in the store.

    ``start``, ``m``: the first position and the number of tokens; ``record``: what the store's
    :meth:`~QuantizedStore.commit` appends; ``flags``: device tensors (the quantize kernels'
    screens) to read before committing: if one is non-zero, :meth:`verify` runs the exact checks,
    which raise the error the eager path would have raised (or pass: a screen may over-report).
    """

    __slots__ = ("start", "m", "record", "flags", "_exact")

    def __init__(self, start: int, m: int, record, flags=(), exact=None):
        self.start, self.m, self.record = start, m, record
        self.flags, self._exact = list(flags), exact

    def verify(self, values) -> None:
        """``values``: the :attr:`flags`' host values (flattened, in order)."""
        if any(values):
            self._exact()


class PackedBuffers:
    """One side (keys or values) of the uniform store: ``words`` int32 ``(B, H, Qcap, W)``,
    ``scale`` / ``zero`` float32 (``zero`` None when symmetric) of ``rows x cols`` groups
    (axis "channel": one row per block; "token": one per slot)."""

    __slots__ = ("words", "scale", "zero", "bits", "group_size", "axis")

    def __init__(self, words, scale, zero, bits: int, group_size: int, axis: str):
        self.words, self.scale, self.zero = words, scale, zero
        self.bits, self.group_size, self.axis = bits, group_size, axis

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in (self.words, self.scale, self.zero) if t is not None]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class UniformStore(QuantizedStore):
    """The KIVI-style store (definitions 6.4, 6.9): blocks held in contiguous packed buffers.

    ``keys`` / ``values``: :class:`PackedBuffers`; ``slot_pos`` int64 ``(B, Qcap)`` (position of
    each slot, -1 = empty: not coded, cropped or unused); ``coded`` bool ``(B, Qcap)`` (as
    flushed, never changed); ``capacity`` = ``Qcap``.  All due blocks of a flush are quantized
    by one :func:`~accelerated.quantize.quantize_packed_deferred` call per side (blocks are
    independent), its validation flags read by the flush with its other values.
    :meth:`partial` hands the whole buffers to
    :func:`~accelerated.attention.quantized_segment_attention` on the kernel path.
    """

    quantizer = "uniform"
    checks_query = True
    fused_decode = True

    def __init__(self, config: KVSinkConfig, *, kvquant_calibration=None, rope_inv_freq=None):
        for name, arg in (("kvquant_calibration", kvquant_calibration), ("rope_inv_freq", rope_inv_freq)):
            if arg is not None:
                raise ValueError(f"{name} is only used by quantizer='kvquant' (the config has "
                                 f"quantizer={config.quantizer!r}); leave it None")
        super().__init__(config)
        self.symmetric = config.scheme == "symmetric"
        self._clear_buffers()

    def _clear_buffers(self) -> None:
        self.keys = self.values = None          # PackedBuffers, made by bind()
        self.slot_pos = self.coded = None
        self.capacity = 0
        self._views = {}            # side -> (t1, buffers, PackedQuantizedTensor views): partial()'s

    def check_rope_positions(self, rope_positions, valid, first, checks=None):
        if rope_positions is not None:
            raise ValueError("rope_positions is only used by quantizer='kvquant' (the config has "
                             f"quantizer={self.config.quantizer!r}); leave it None")
        return None

    def bind(self, batch: int, num_heads: int, head_dim: int, device) -> None:
        super().bind(batch, num_heads, head_dim, device)
        self._grow(0)

    def reset(self) -> None:
        super().reset()
        self._clear_buffers()

    # ------------------------------------------------------------------ buffers

    def _sides(self):
        c = self.config
        return (("keys", c.key_bits, c.key_group_size, c.key_axis),
                ("values", c.value_bits, c.value_group_size, c.value_axis))

    def _stat_shape(self, axis: str, group: int, slots: int) -> Tuple[int, int]:
        """(rows, cols) of one side's scale buffer for ``slots`` token slots."""
        d = self.dims[2]
        if axis == "channel":
            return slots // self.block, d
        return slots, -(-d // group)

    def _grow(self, cap: int) -> None:
        """Buffers of ``cap`` slots holding the old buffers' contents."""
        b, h, d = self.dims
        dev = self.device
        for name, bits, group, axis in self._sides():
            rows, cols = self._stat_shape(axis, group, cap)
            w = torch.zeros((b, h, cap, packed_length(d, bits)), dtype=WORD_DTYPE, device=dev)
            s = torch.zeros((b, h, rows, cols), dtype=_F32, device=dev)
            z = None if self.symmetric else torch.zeros((b, h, rows, cols), dtype=_F32, device=dev)
            old = getattr(self, name)
            if old is not None:
                w[:, :, :old.words.shape[2]].copy_(old.words)
                s[:, :, :old.scale.shape[2]].copy_(old.scale)
                if z is not None:
                    z[:, :, :old.zero.shape[2]].copy_(old.zero)
            setattr(self, name, PackedBuffers(w, s, z, bits, group, axis))
        pos = torch.full((b, cap), -1, dtype=torch.int64, device=dev)
        coded = torch.zeros((b, cap), dtype=torch.bool, device=dev)
        if self.slot_pos is not None:
            pos[:, :self.slot_pos.shape[1]].copy_(self.slot_pos)
            coded[:, :self.coded.shape[1]].copy_(self.coded)
        self.slot_pos, self.coded, self.capacity = pos, coded, cap

    def reserve(self, need: int) -> None:
        """Buffers of at least ``need`` slots (grown x1.25, whole blocks)."""
        if need > self.capacity:
            q = self.capacity
            self._grow(_round_up(max(need, q + q // 4, MIN_CAPACITY), self.block))

    # ------------------------------------------------------------------ flush

    def defers_validation(self, keys: torch.Tensor) -> bool:
        c = self.config
        return (quantize_defers_validation(keys, c.key_group_size, c.key_axis)
                and quantize_defers_validation(keys, c.value_group_size, c.value_axis))

    def stage(self, start, keys, values, coded, rope) -> StagedBlocks:
        """Packed keys and values of ``m`` tokens (whole blocks, quantized at once), with the
        kernels' validation flags (none on the torch path, which raised already)."""
        b, h, m, _ = keys.shape
        c = self.config
        exclude = (~coded)[:, None, :].expand(b, h, m)
        pk, fk = quantize_packed_deferred(keys, c.key_bits, c.key_group_size, c.key_axis,
                                          symmetric=self.symmetric, exclude=exclude)
        pv, fv = quantize_packed_deferred(values, c.value_bits, c.value_group_size, c.value_axis,
                                          symmetric=self.symmetric, exclude=exclude)

        def exact() -> None:
            check_quantize_input(keys, pk)
            check_quantize_input(values, pv)
        return StagedBlocks(start, m, (pk, pv, coded), [f for f in (fk, fv) if f is not None], exact)

    def commit(self, staged: StagedBlocks) -> None:
        (pk, pv, coded), start, m = staged.record, staged.start, staged.m
        q0, blk = self.num_codes, self.block
        self.reserve(q0 + m)
        for buf, p in ((self.keys, pk), (self.values, pv)):
            buf.words[:, :, q0:q0 + m].copy_(p.words)
            r0, r1 = (q0 // blk, (q0 + m) // blk) if buf.axis == "channel" else (q0, q0 + m)
            buf.scale[:, :, r0:r1].copy_(p.scale)
            if buf.zero is not None:
                buf.zero[:, :, r0:r1].copy_(p.zero)
        positions = torch.arange(start, start + m, dtype=torch.int64, device=self.device)
        self.slot_pos[:, q0:q0 + m] = torch.where(coded, positions, torch.full_like(positions, -1))
        self.coded[:, q0:q0 + m] = coded
        self._record(start, m)

    # ------------------------------------------------------------------ crop, rows

    def _cut(self, kept: int, max_length: int) -> None:
        n = self.num_codes
        self.slot_pos[:, n:] = -1
        self.coded[:, n:] = False
        self.slot_pos.masked_fill_(self.slot_pos >= max_length, -1)

    def take_rows(self, idx: torch.Tensor) -> None:
        for buf in (self.keys, self.values):          # in place for a reorder (select_rows)
            buf.words, buf.scale = select_rows(buf.words, idx), select_rows(buf.scale, idx)
            if buf.zero is not None:
                buf.zero = select_rows(buf.zero, idx)
        self.slot_pos, self.coded = select_rows(self.slot_pos, idx), select_rows(self.coded, idx)
        self.dims = (int(idx.shape[0]),) + self.dims[1:]

    # ------------------------------------------------------------------ views

    def view(self, side: str, t0: int, t1: int) -> PackedQuantizedTensor:
        """Keys or values (``side``) of buffer slots ``[t0, t1)`` (multiples of the block) as views."""
        buf = getattr(self, side)
        b, h, d = self.dims
        r0, r1 = (t0 // self.block, t1 // self.block) if buf.axis == "channel" else (t0, t1)
        return PackedQuantizedTensor(words=buf.words[:, :, t0:t1], scale=buf.scale[:, :, r0:r1],
                                     zero=None if buf.zero is None else buf.zero[:, :, r0:r1],
                                     bits=buf.bits, group_size=buf.group_size, axis=buf.axis,
                                     symmetric=self.symmetric, shape=(b, h, t1 - t0, d))

    def attend_view(self, side: str, t1: int) -> PackedQuantizedTensor:
        """``view(side, 0, t1)``, reused while the buffers and ``t1`` stay the same (on CUDA ``t1``
        is the capacity, so between reallocations: building and validating the views costs host
        time on every layer and step)."""
        buf = getattr(self, side)
        buffers = (buf.words, buf.scale, buf.zero)
        hit = self._views.get(side)
        if hit is not None and hit[0] == t1 and all(a is b for a, b in zip(hit[1], buffers)):
            return hit[2]
        view = self.view(side, 0, t1)
        self._views[side] = (t1, buffers, view)
        return view

    def packed(self, side: str) -> PackedQuantizedTensor:
        return self.view(side, 0, self.num_codes)

    @property
    def blocks(self) -> List[QuantizedBlock]:
        blk = self.block
        return [QuantizedBlock(start=start, num_slots=k, coded=self.coded[:, j * blk:(j + 1) * blk],
                               keys=self.view("keys", j * blk, (j + 1) * blk),
                               values=self.view("values", j * blk, (j + 1) * blk))
                for j, (start, k) in enumerate(zip(self.starts, self.slots))]

    def slot_positions(self) -> torch.Tensor:
        return self.slot_pos[:, :self.num_codes]

    def _dequantized(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return dequantize(self.packed("keys")), dequantize(self.packed("values"))

    def kernel_views(self) -> Tuple[PackedQuantizedTensor, PackedQuantizedTensor, torch.Tensor]:
        """``(keys, values, slot positions)`` of the slots held, as the fused decode kernel reads them
        (accelerated/decode_kernels.py: batch and head strides passed, so the prefix of the buffers
        is read in place, never the spare capacity); views reused until the next flush."""
        t1 = self.num_codes
        return self.attend_view("keys", t1), self.attend_view("values", t1), self.slot_pos[:, :t1]

    def partial(self, q, qp, scale, *, block_size: int, use_kernel=None, check_query: bool = True):
        """``(m, l, acc)`` from the packed store, never dequantized as a whole.  The Triton kernel
        reads contiguous ``(B, H, T, W)`` words: it gets the whole buffers (slots beyond the used
        ones have position -1 and are masked) rather than the used prefix, a strided view it
        would copy on every call."""
        kernel = use_kernel is not False and attention_kernel_usable(q)
        t1 = self.capacity if kernel else self.num_codes
        return quantized_segment_attention(
            q, self.attend_view("keys", t1), self.attend_view("values", t1), query_positions=qp,
            key_positions=self.slot_pos[:, :t1], scale=scale, block_size=block_size,
            use_kernel=use_kernel, check_query=check_query)

    # ------------------------------------------------------------------ bytes

    def nbytes(self) -> int:
        """``sum over blocks (4*words + 4*scale + 4*zero, keys and values, + B*blk)`` (6.17)."""
        if self.dims is None:
            return 0
        b, h, d = self.dims
        slots = self.num_codes                                  # cropped blocks keep their codes
        total = b * slots                                       # coded flags
        for _, bits, group, axis in self._sides():
            rows, cols = self._stat_shape(axis, group, slots)
            total += 4 * b * h * slots * packed_length(d, bits)
            total += 4 * b * h * rows * cols * (1 if self.symmetric else 2)
        return int(total)

    def tensors(self) -> List[torch.Tensor]:
        if self.keys is None:
            return []
        return self.keys.tensors() + self.values.tensors() + [self.slot_pos, self.coded]
