"""One layer of the streaming quantized KV cache (torch twin of ``reference/cache_layer.py``).

:class:`QuantizedKVCacheLayer` holds what both quantizers share: the residual
window and the preserved store (records of ``accelerated/cache_state.py``), the
flush loop, crop / reorder / select_batch / reset, segments and the byte
counts, and ``attend`` from its base class :class:`accelerated.cache_attend.LayerAttention`
(how the three segments are read: fused decode kernel, SDPA prefill, split form); it calls the
quantized store (``self.quantized``), one
implementation per quantizer chosen by :func:`make_store` (docs/06-cache.md,
"Accelerated layout").
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from reference.config import KVSinkConfig

from .cache_attend import LayerAttention
from .cache_capture import LayerCapture
from .cache_flush import FlushPlan, flush_layers
from .cache_checks import (NONFINITE_MESSAGE, DeferredChecks, check_index, check_kv_shapes, check_mask,
                           check_storage_dtype, convert_kv, is_int, padding_message)
from .cache_kvquant import KVQuantStore
from .cache_state import PreservedStore, ResidualWindow, admit_preserved, flushed_length, steady_capacity
from .cache_store import QuantizedStore, UniformStore
from .quantize import PackedQuantizedTensor

__all__ = ["STORES", "make_store", "QuantizedKVCacheLayer"]

_FLUSH_PENDING_MESSAGE = "resolve() the status of tokens before flushing"
_F32 = torch.float32

#: The quantized store of each ``config.quantizer`` value.
STORES = {"uniform": UniformStore, "kvquant": KVQuantStore}


def make_store(config: KVSinkConfig, *, kvquant_calibration=None, rope_inv_freq=None) -> QuantizedStore:
    """The empty quantized store of ``config.quantizer`` (the one place that looks at it); the two
    keyword arguments are the kvquant quantizer's (``ValueError`` with the uniform one)."""
    return STORES[config.quantizer](config, kvquant_calibration=kvquant_calibration,
                                    rope_inv_freq=rope_inv_freq)


class QuantizedKVCacheLayer(LayerAttention, LayerCapture):
    """One layer of the streaming quantized KV cache (torch twin of the reference's).

    Parameters
    ----------
    config : KVSinkConfig; ``quantizer`` "uniform" or "kvquant" (docs/06-cache.md 6.21).
    dtype : torch dtype of the full-precision parts (residual, preserved
        store); inputs are converted to it.  Default ``torch.float32``.
    device : device of the state; default: the device of the first
        :meth:`update`'s keys.
    kvquant_calibration : kvquant only: the layer's ``KVQuantCalibration``
        (``accelerated.kvquant`` or ``reference.kvquant``); None only for nf with
        ``outlier_fraction=0`` (``nf_calibration``).
    rope_inv_freq : kvquant only: float ``(D/2,)`` (``accelerated.kvquant.model_inv_freq``):
        keys given post-RoPE are un-rotated before quantization and rotated back
        after; None = keys not rotated.

    State: ``quantized`` (the store, :func:`make_store`), ``_residual``
    (:class:`ResidualWindow`) and ``_preserved`` (:class:`PreservedStore`), None
    before the first update, ``_dims`` = ``(B, H, D)``.
    """

    def __init__(self, config: KVSinkConfig, *, dtype=torch.float32, device=None,
                 kvquant_calibration=None, rope_inv_freq=None):
        if not isinstance(config, KVSinkConfig):
            raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = check_storage_dtype(dtype)
        self._device_arg = None if device is None else torch.device(device)
        self.block = config.token_block
        self.quantized = make_store(config, kvquant_calibration=kvquant_calibration,
                                    rope_inv_freq=rope_inv_freq)
        self._clear()

    def _clear(self) -> None:
        self._dims: Optional[Tuple[int, int, int]] = None
        self.device = self._device_arg
        self.quantized.reset()
        self._residual: Optional[ResidualWindow] = None
        self._preserved: Optional[PreservedStore] = None
        self._unchecked: List[DeferredChecks] = []   # deferred checks of updates not yet read

    # ------------------------------------------------------------------ properties

    @property
    def kvquant(self) -> bool:
        return self.quantized.quantizer == "kvquant"

    @property
    def kvquant_calibration(self):
        return self.quantized.calibration

    @property
    def rope_inv_freq(self):
        return self.quantized.rope_inv_freq

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
        """Slots of the quantized store (preserved and padding slots included) = first residual position."""
        return 0 if self._residual is None else self._residual.start

    @property
    def num_residual(self) -> int:
        """``r``: slots of the residual window."""
        return 0 if self._residual is None else self._residual.length

    @property
    def num_pending(self) -> int:
        """Tokens whose status is still pending (the last ``num_pending`` residual slots)."""
        return 0 if self._residual is None else self._residual.pending

    n_pending = num_pending     # alias of num_pending (read by accelerated/hf)

    @property
    def seq_length(self) -> int:
        """Total slots = ``num_quantized + num_residual`` = the next update's first position."""
        return self.num_quantized + self.num_residual

    def __len__(self) -> int:
        return self.seq_length

    def _require_data(self) -> None:
        if self._dims is None:
            raise RuntimeError("the cache is empty: call update() first")

    # ------------------------------------------------------------------ 6.1 update

    def update(self, keys, values, valid=None, rope_positions=None, *,
               checks: Optional[DeferredChecks] = None) -> None:
        """Append ``n`` tokens to the residual window, status pending (definition 6.1).

        Parameters
        ----------
        keys, values : float ``(B, H, n, D)`` torch tensors, finite; converted to
            the storage dtype and moved to the cache's device.  ``B``, ``H``,
            ``D`` must match earlier updates.  kvquant with ``rope_inv_freq``:
            the keys are post-RoPE.
        valid : None (all valid) or bool ``(B, n)``; ``False`` = padding.
        rope_positions : kvquant only: None (the slot positions) or int ``(B, n)``,
            each token's rotary position, in ``[0, 2**24)`` at valid tokens
            (stored as 0 at padding) (docs/06-cache.md 6.21).
        checks : None (default): the value checks (keys and values finite and
            within the storage dtype, kvquant rotary positions in range) run here,
            each costing a device->host synchronisation, and a failed call changes
            nothing.  A :class:`DeferredChecks`: they are recorded there and raised by
            its ``check()`` (the tokens are appended meanwhile; :meth:`flush` runs the
            check before quantizing).  Shapes and dtypes are always checked here.

        The tokens take positions ``seq_length .. seq_length + n - 1``.
        """
        keys, values, valid, by_slot = self._check_update(keys, values, valid, checks)
        b, h, n, d = keys.shape
        rope = self.quantized.check_rope_positions(rope_positions, valid, self.seq_length, checks)
        self.quantized.check_dims(h, d)
        if self._dims is None:
            self._allocate(b, h, d)
        if n == 0:
            return
        if checks is not None:
            self._watch(checks)
        for side in ("keys", "values") if by_slot else ():    # tested from the window when read
            checks.finite_slots(self._residual, side, self.seq_length, n, NONFINITE_MESSAGE[side])
        self._residual.append(keys, values, valid, rope)

    def _check_update(self, keys, values, valid, checks):
        """Checked keys, values (storage dtype, on the device) and valid mask of an update, and
        whether their finiteness is recorded by slot (``checks`` given, nothing converted)."""
        check_kv_shapes(keys, values, self._dims)
        if self._dims is None and self._device_arg is None:
            self.device = keys.device
        by_slot = checks is not None and keys.dtype == values.dtype == self.dtype
        keys, values = convert_kv(keys, values, self.device, self.dtype, checks, check=not by_slot)
        b, _, n, _ = keys.shape
        if valid is None:
            valid = torch.ones((b, n), dtype=torch.bool, device=self.device)
        else:
            valid = check_mask("valid", valid, (b, n), self.device)
        return keys, values, valid, by_slot

    def _allocate(self, b: int, h: int, d: int) -> None:
        self._dims = (b, h, d)
        self.quantized.bind(b, h, d, self.device)
        self._residual = ResidualWindow.empty(b, h, d, self.dtype, self.device,
                                              rope=self.quantized.token_rope,
                                              steady=steady_capacity(self.config))
        self._preserved = PreservedStore.empty(b, h, d, self.dtype, self.device)

    # ------------------------------------------------------------------ 6.2 resolve

    def resolve(self, preserve, *, checks: Optional[DeferredChecks] = None,
                excludes_padding: bool = False) -> None:
        """Give the status of every pending token (definition 6.2).

        ``preserve``: bool ``(B, num_pending)`` in position order, ``True`` = keep at
        full precision.  A ``True`` on a padding token raises ``ValueError``; with
        ``checks`` (a :class:`DeferredChecks`) that test is recorded there instead
        (no device->host synchronisation) and raised by its ``check()``.
        ``excludes_padding=True``: the caller guarantees ``preserve & ~valid`` is empty
        (flags made by ``preserved_set`` / ``preserved_step``, which AND the validity), and the
        test is skipped (``KVSinkCache`` resolves every layer with the same such flags).
        """
        if self._dims is None:
            raise RuntimeError("resolve() before any update(): there is no pending token")
        if excludes_padding:
            flags = check_mask("preserve", preserve, (self._dims[0], self._residual.pending), self.device)
        else:
            flags = self.check_preserve(preserve, checks=checks)
        if checks is not None:
            self._watch(checks)
        self._residual.resolve(flags)

    def check_preserve(self, preserve, *, checks: Optional[DeferredChecks] = None) -> torch.Tensor:
        """``preserve`` as a bool ``(B, num_pending)`` tensor on the device, or the error
        :meth:`resolve` raises (changes nothing; ``QuantizedKVCache.resolve`` checks every layer
        first).  With ``checks`` the padding test is recorded there instead (no sync)."""
        res = self._residual
        flags = check_mask("preserve", preserve, (self._dims[0], res.pending), self.device)
        pending_valid = res.pending_valid()
        first = res.start + res.length - res.pending
        if checks is not None:
            bad = flags > pending_valid                      # preserve & ~valid, one kernel
            checks.none_true(bad, lambda: padding_message(bad, first))
        elif res.pending:
            bad = flags & ~pending_valid
            if bool(bad.any()):
                raise ValueError(padding_message(bad, first))
        return flags

    def _watch(self, checks: DeferredChecks) -> None:
        """Remember ``checks``: :meth:`flush` runs it before quantizing anything."""
        if not any(c is checks for c in self._unchecked):
            self._unchecked.append(checks)

    def _materialize_checks(self) -> None:
        """Evaluate the slot checks on the window now: it is about to drop or reorder tokens."""
        for c in self._unchecked:
            c.materialize(self._residual)

    # ------------------------------------------------------------------ 6.3 flush

    @property
    def num_due(self) -> int:
        """Tokens the next :meth:`flush` moves out of the residual (``flushed_length``; host only)."""
        return flushed_length(self.num_residual, self.config)

    def check_flushable(self) -> None:
        """Raise ``RuntimeError`` if :meth:`flush` would reach a pending token."""
        if self._dims is None:
            return
        n = self.num_due
        resolved = self.num_residual - self.num_pending
        if n > resolved:
            raise RuntimeError(f"{_FLUSH_PENDING_MESSAGE}: flushing {n} residual tokens needs "
                               f"their status, but only {resolved} are resolved")

    def flush(self) -> int:
        """Move whole token blocks from the residual to the quantized/preserved stores (6.3).

        While ``num_residual - blk >= R`` the oldest ``blk`` tokens form a block;
        tokens with status "preserve" are admitted to the preserved store up to
        ``config.max_preserved`` per row (earliest first), the others are
        quantized, padding and admitted tokens excluded from the statistics.
        All due blocks are handed to the store at once (the uniform store
        quantizes them by one kernel per side: blocks are independent).
        Raises ``RuntimeError`` (and changes nothing) if a token that would be
        flushed is pending, ``ValueError`` (and changes nothing) if the deferred
        checks of the updates fail.  One device->host read on the kernel path
        (:func:`accelerated.cache_flush.flush_layers`).  Returns the number of blocks flushed.
        """
        return flush_layers([self])

    def plan_flush(self) -> Optional[FlushPlan]:
        """The flush's plan (``accelerated/cache_flush.py``): None when no block is due; raises
        ``RuntimeError`` if a due token is pending.  Changes nothing."""
        if self._dims is None:
            return None
        self.check_flushable()
        m = self.num_due
        if m == 0:
            return None
        res = self._residual
        keys, values, valid, flags, rope = res.head(m)
        admitted = admit_preserved(flags, self._preserved.counts, self.config.max_preserved)
        n_new = admitted.sum(dim=1)
        positions = torch.arange(res.start, res.start + m, dtype=torch.int64, device=self.device)
        return FlushPlan(self, m, list(self._unchecked), self._preserved.sizes(n_new),
                         (res.start, keys, values, valid & ~admitted, rope),
                         (positions, keys, values, admitted, n_new), self.quantized.defers_validation(keys))

    def commit_flush(self, plan: FlushPlan, need: int, added: int) -> None:
        """Carry out ``plan`` (staged, its checks and flags read and passed; ``need``, ``added``:
        the preserved store's sizes read on the host): the residual's first ``m`` tokens (whole
        blocks) go to the quantized and preserved stores."""
        self.quantized.commit(plan.staged)
        self._preserved.commit(*plan.preserved_args, need, added)
        self._residual.drop_head(plan.m)        # advance the window's start (no copy) ...
        self._residual.shrink()                 # ... and give back a buffer left large by a prefill
        self._unchecked = []

    # ------------------------------------------------------------------ 6.14 crop

    def crop(self, max_length: int) -> None:
        """Keep the slots at positions ``< max_length`` (definition 6.14).

        ``max_length < 0`` means ``seq_length + max_length`` (drop that many from
        the end); a result below 0 raises ``ValueError``.  ``max_length >=
        seq_length`` changes nothing.  Blocks wholly beyond are dropped; a block
        straddling ``max_length`` keeps its codes and statistics (nothing is
        re-quantized), its slots beyond becoming empty; preserved entries at
        positions ``>= max_length`` are dropped; the residual, its statuses and
        the pending count are truncated.  The next update starts at ``max_length``.
        """
        max_length = self._crop_length(max_length)
        if self._dims is None or max_length >= self.seq_length:
            return
        self._materialize_checks()
        self.quantized.crop(max_length)
        self._preserved.crop(max_length)
        self._residual.crop(max_length)

    def _crop_length(self, max_length) -> int:
        """``max_length`` checked, a negative one counted from the end."""
        if not is_int(max_length):
            raise TypeError(f"max_length must be an int, got {max_length!r}")
        length = self.seq_length
        max_length = int(max_length)
        if max_length < 0:
            if length + max_length < 0:
                raise ValueError(f"max_length={max_length} drops more than the {length} slots "
                                 "the cache holds")
            max_length = length + max_length
        return max_length

    # ------------------------------------------------------------------ 6.15 batch rows

    def _take_rows(self, idx: torch.Tensor) -> None:
        """Gather every per-row tensor along the batch axis with ``idx`` (int64 on the device)."""
        self._materialize_checks()
        self.quantized.take_rows(idx)
        self._preserved.take_rows(idx)
        self._residual.take_rows(idx)
        self._dims = (int(idx.shape[0]),) + self._dims[1:]

    def reorder(self, beam_idx) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` (definition 6.15).

        ``beam_idx``: int ``(B,)`` with values in ``[0, B)`` (repeats allowed).
        """
        if self._dims is None:
            return
        self._take_rows(check_index("beam_idx", beam_idx, self._dims[0], self._dims[0], self.device))

    def select_batch(self, indices) -> None:
        """Keep rows ``indices`` (in that order); ``B`` becomes ``len(indices)`` (definition 6.15)."""
        if self._dims is None:
            return
        self._take_rows(check_index("indices", indices, self._dims[0], None, self.device))

    def reset(self) -> None:
        """Empty the cache; ``B``, ``H``, ``D`` are forgotten (definition 6.16)."""
        self._materialize_checks()
        self._clear()

    # ------------------------------------------------------------------ views (tests, CPU use)

    @property
    def blocks(self) -> list:
        """The quantized store as a list of blocks (``QuantizedBlock``: views of the buffers;
        kvquant: ``KVQuantCacheBlock``).

        Same contents as the reference's ``blocks``: ``start``, ``num_slots``
        (``k``, fewer than ``blk`` after a crop cut the block), ``coded`` bool
        ``(B, blk)`` as flushed, and the packed keys/values of the block's
        ``blk`` code slots.
        """
        return [] if self._dims is None else self.quantized.blocks

    @property
    def quantized_keys(self) -> PackedQuantizedTensor:
        """The quantized store's keys as stored: packed ``(B, H, Tbuf, D)`` views of the buffers.

        ``Tbuf = len(blocks) * token_block`` buffer slots (a cropped block keeps
        its ``blk`` codes); :attr:`quantized_slot_positions` gives each slot's
        position (-1 = empty).  This is what :meth:`attend` reads.  Uniform
        quantizer only (kvquant: :attr:`blocks`).
        """
        self._require_data()
        return self.quantized.packed("keys")

    @property
    def quantized_values(self) -> PackedQuantizedTensor:
        """As :attr:`quantized_keys`, for the values."""
        self._require_data()
        return self.quantized.packed("values")

    @property
    def quantized_slot_positions(self) -> torch.Tensor:
        """int64 ``(B, Tbuf)``: position of each buffer slot of :attr:`quantized_keys`, -1 = empty."""
        self._require_data()
        return self.quantized.slot_positions()

    @property
    def preserved(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The preserved store: ``(positions (B, P), keys (B, H, P, D), values (B, H, P, D))`` (views).

        ``P`` = the largest count over rows; ``-1`` positions (and zero keys and
        values) pad the rows holding fewer.
        """
        self._require_data()
        return self._preserved.view()

    @property
    def residual(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual: ``(keys (B, H, r, D), values, valid (B, r), preserve (B, r))`` (views)."""
        self._require_data()
        return self._residual.view()

    @property
    def residual_rope_positions(self) -> torch.Tensor:
        """kvquant: int32 ``(B, r)``, the residual tokens' rotary positions (0 at padding)."""
        self._require_data()
        res = self._residual
        if res.rope is None:
            raise AttributeError("residual_rope_positions: only the kvquant quantizer stores "
                                 "rotary positions")
        return res.rope[:, res.offset:res.end]

    def preserved_positions(self) -> List[torch.Tensor]:
        """Per row, the sorted int64 positions of its preserved-store tokens (CPU tensors)."""
        return [] if self._dims is None else self._preserved.row_positions()

    def segments(self) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The cache as ``(keys, values, key_positions)`` segments (definition 6.12).

        1. quantized store, dequantized: float32 ``(B, H, Q, D)``, positions
           ``(B, Q)`` with ``-1`` at preserved, padding and cropped-away slots
           (``Q`` = code slots held, ``blk`` per block; ``Q = num_quantized``
           unless a crop cut a block);
        2. preserved store: ``(B, H, P, D)`` in ``dtype``, positions ``(B, P)``;
        3. residual: ``(B, H, r, D)`` in ``dtype``, positions ``(B, r)``, ``-1`` at padding.

        Always these three, in this order; an empty (never updated) cache gives
        ``[]``.  Copies, for tests and CPU use: :meth:`attend` never builds the
        dequantized copy of the quantized store.
        """
        if self._dims is None:
            return []
        ppos, pk, pv = self.preserved
        rk, rv, _, _ = self.residual
        return [self.quantized.segment(),
                (pk.clone(), pv.clone(), ppos.clone()),
                (rk.clone(), rv.clone(), self._residual.positions())]

    # ------------------------------------------------------------------ 6.17 bytes

    def nbytes(self) -> int:
        """Exact bytes held by the spec's count (definitions 6.17, 6.22), equal to the reference's:
        the quantized store's (its blocks, + the kvquant calibration), the preserved store's
        ``2*B*H*P*D*itemsize + 8*B*P`` and the residual's ``2*B*H*r*D*itemsize + B*r + B*r``
        (+ ``4*B*r`` rotary positions).  Spare capacity is not counted (:meth:`allocated_bytes`).
        """
        if self._dims is None:
            return 0
        return int(self.quantized.nbytes() + self._preserved.nbytes() + self._residual.nbytes())

    def allocated_bytes(self) -> int:
        """Bytes the buffers occupy, spare capacity included.

        Differs from :meth:`nbytes` by the buffers' spare capacity (quantized slots, preserved
        columns and residual slots allocated ahead, the preserved store's scratch column), the
        quantized store's per-slot int64 positions (read by attention) and the preserved counts.
        """
        return int(sum(t.numel() * t.element_size() for t in self._tensors()))

    def _tensors(self) -> List[torch.Tensor]:
        """Every tensor the layer holds (memory accounting, tests)."""
        out = self.quantized.tensors()
        for record in (self._preserved, self._residual):
            if record is not None:
                out += record.tensors()
        return out

    def __repr__(self) -> str:
        used = 0 if self._preserved is None else self._preserved.used
        return (f"QuantizedKVCacheLayer(dims={self._dims}, quantized={self.num_quantized}, "
                f"blocks={len(self.quantized.starts)}, preserved={used}, residual={self.num_residual}, "
                f"pending={self.num_pending}, device={self.device}, dtype={self.dtype})")
