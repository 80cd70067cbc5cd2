"""The cache's full-precision state as records (torch twin of ``reference/cache_state.py``).

:class:`ResidualWindow` (definition 6.3) and :class:`PreservedStore` (6.6) hold
their tokens in preallocated buffers on the device, grown geometrically and
following the tokens held, never the configured ``residual_length``
(docs/06-cache.md, "Accelerated note"); :func:`flushed_length` (6.8) and
:func:`admit_preserved` (6.7) are the flush step's arithmetic.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from reference.config import KVSinkConfig

from .attention import const_like

__all__ = ["ResidualWindow", "PreservedStore", "flushed_length", "admit_preserved", "steady_capacity",
           "MIN_CAPACITY", "select_rows"]

#: Smallest capacity (tokens) of a newly allocated quantized / residual buffer.
MIN_CAPACITY = 64


def flushed_length(num_tokens: int, config: KVSinkConfig) -> int:
    """Tokens of a ``T``-token residual the next flush quantizes (definition 6.8):
    ``blk * floor((T - R) / blk)`` if ``T >= R + blk``, else 0."""
    blk, r = config.token_block, config.residual_length
    if num_tokens < r + blk:
        return 0
    return blk * ((num_tokens - r) // blk)


def admit_preserved(flags: torch.Tensor, held: torch.Tensor, max_preserved: Optional[int]) -> torch.Tensor:
    """Tokens admitted to the preserved store (definition 6.7), bool ``(B, k)``.

    ``A[b, j] = flags[b, j] and held[b] + #{j' <= j : flags[b, j']} <= max_preserved``;
    ``flags`` bool ``(B, k)``, ``held`` int64 ``(B,)``; ``flags`` itself when ``max_preserved`` is None.
    """
    if max_preserved is None:
        return flags
    rank = torch.cumsum(flags, dim=1) + held[:, None]
    return flags & (rank <= max_preserved)


def select_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` with row ``i`` = old row ``idx[i]`` (int64 on its device): in place when the batch keeps
    its size (a beam reorder), so buffers a captured step reads keep their addresses; a new tensor
    when it changes (rows selected or repeated)."""
    rows = t.index_select(0, idx)
    if rows.shape == t.shape:
        return t.copy_(rows)
    return rows


def steady_capacity(config: KVSinkConfig) -> int:
    """Residual capacity while decoding: the window plus room to slide.

    The window holds at most ``W = R + blk`` tokens between flushes; ``max(16, W // 2)`` more let
    it slide that many decode steps before one compaction copies it back to the front: amortised,
    at most two token copies per step.
    """
    window = config.residual_length + config.token_block
    return max(MIN_CAPACITY, window + max(16, window // 2))


class ResidualWindow:
    """The residual window (definition 6.3): the newest tokens at full precision.

    Buffers ``keys``, ``values`` ``(B, H, capacity, D)`` (storage dtype), ``valid``, ``preserve``
    bool ``(B, capacity)`` and ``rope`` int32 ``(B, capacity)`` (kvquant's rotary positions, else
    None) hold the window at buffer slots ``[offset, offset + length)``; ``start`` is the position of
    its first token, the last ``pending`` tokens have no status yet.  Growth (``steady`` =
    :func:`steady_capacity`): flushing advances ``offset`` (no copy); an append reaching the
    buffer's end compacts the window to the front of a buffer of ``steady`` slots when it fits
    and the buffer is that large already, grows a smaller one x1.5 with the tokens held (up to
    ``steady``), and gives a larger append (a prefill) exactly its tokens (x1.5 when tokens keep
    arriving without a flush).

    ``start_dev``: int64 ``(1,)`` on the device, always equal to ``start`` (the fused decode kernel
    reads it there).  :meth:`pin` fixes the buffers for a captured decode step
    (accelerated/hf/captured.py): the window moves to the front of buffers of a fixed capacity, a
    flush then copies the tokens it keeps back to the front of the same buffers instead of
    sliding, and the slots after the window are kept not valid, so that a CUDA graph recorded on
    the whole buffers stays right; an append that does not fit (a prefill) reallocates and unpins.
    """

    __slots__ = ("keys", "values", "valid", "preserve", "rope", "_start", "start_dev", "offset",
                 "length", "pending", "capacity", "steady", "pinned")

    def __init__(self, keys, values, valid, preserve, rope, steady: int):
        self.keys, self.values, self.valid, self.preserve, self.rope = keys, values, valid, preserve, rope
        self.start_dev = torch.zeros(1, dtype=torch.int64, device=keys.device)
        self._start = self.offset = self.length = self.pending = 0
        self.capacity = int(keys.shape[2])
        self.steady = steady
        self.pinned = False

    @property
    def start(self) -> int:
        """Position of the window's first token."""
        return self._start

    @start.setter
    def start(self, value: int) -> None:
        if value != self._start:
            self._start = int(value)
            self.start_dev.fill_(self._start)

    @classmethod
    def empty(cls, b: int, h: int, d: int, dtype, device, *, rope: bool, steady: int) -> "ResidualWindow":
        """An empty window (capacity 0) for ``(B, H, D)`` tokens; ``rope``: keep rotary positions."""
        k = torch.zeros((b, h, 0, d), dtype=dtype, device=device)
        flags = torch.zeros((b, 0), dtype=torch.bool, device=device)
        pos = torch.zeros((b, 0), dtype=torch.int32, device=device) if rope else None
        return cls(k, k.clone(), flags, flags.clone(), pos, steady)

    @property
    def end(self) -> int:
        """Buffer slot after the window's last token."""
        return self.offset + self.length

    def view(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys (B, H, r, D), values, valid (B, r), preserve (B, r))`` of the window (views)."""
        lo, hi = self.offset, self.end
        return self.keys[:, :, lo:hi], self.values[:, :, lo:hi], self.valid[:, lo:hi], self.preserve[:, lo:hi]

    def head(self, n: int):
        """``(keys, values, valid, preserve, rope)`` of the window's first ``n`` tokens (views;
        ``rope`` None without rotary positions)."""
        lo, hi = self.offset, self.offset + n
        rope = None if self.rope is None else self.rope[:, lo:hi]
        return (self.keys[:, :, lo:hi], self.values[:, :, lo:hi], self.valid[:, lo:hi],
                self.preserve[:, lo:hi], rope)

    def positions(self) -> torch.Tensor:
        """int64 ``(B, r)``: each token's position, -1 at padding."""
        pos = torch.arange(self.start, self.start + self.length, dtype=torch.int64, device=self.keys.device)
        return torch.where(self.valid[:, self.offset:self.end], pos, const_like(-1, pos))

    # ------------------------------------------------------------------ growth

    def _relocate(self, cap: int) -> None:
        """Move the window to the front of new buffers of capacity ``cap``."""
        lo, hi, r = self.offset, self.end, self.length
        names = ("keys", "values", "valid", "preserve") + (() if self.rope is None else ("rope",))
        for name in names:
            old = getattr(self, name)
            axis = 2 if old.dim() == 4 else 1        # the token axis
            shape = list(old.shape)
            shape[axis] = cap
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            if hi > lo:
                new.narrow(axis, 0, r).copy_(old.narrow(axis, lo, r))
            setattr(self, name, new)
        self.capacity, self.offset, self.pinned = cap, 0, False

    def pin(self, capacity: int) -> None:
        """Hold the window at the front of buffers of ``capacity`` slots that later flushes keep
        (see the class doc); new buffers unless pinned at that capacity already."""
        if self.length > capacity:
            raise ValueError(f"the window holds {self.length} tokens, more than capacity={capacity}")
        if not (self.pinned and self.capacity == capacity and self.offset == 0):
            self._relocate(capacity)
            self.pinned = True

    def _compact(self) -> None:
        """Pinned: move the window to the front of its own buffers, the slots after it not valid."""
        lo, r = self.offset, self.length
        if lo:
            names = ("keys", "values", "valid", "preserve") + (() if self.rope is None else ("rope",))
            for name in names:
                buf = getattr(self, name)
                axis = 2 if buf.dim() == 4 else 1
                if r:
                    buf.narrow(axis, 0, r).copy_(buf.narrow(axis, lo, r).clone())
            self.offset = 0
        self.valid[:, r:] = False
        self.preserve[:, r:] = False

    def reserve(self, n: int) -> None:
        """Room for ``n`` more tokens after the window (the growth policy above)."""
        if self.end + n <= self.capacity:
            return
        steady, need = self.steady, self.length + n
        if need > steady:                           # a prefill fits exactly; appends without
            cap = max(need, self.capacity + self.capacity // 2)   # flushing grow x1.5 (amortised)
        elif self.capacity >= steady:
            cap = steady                            # compaction (or back to the steady size)
        else:                                       # the tokens held, x1.5 (amortised), up to steady
            cap = min(steady, max(need + need // 2, self.capacity + self.capacity // 2, MIN_CAPACITY))
        self._relocate(cap)

    def shrink(self) -> None:
        """After a flush: give back a buffer left larger than the steady size."""
        if self.capacity > self.steady:
            self._relocate(self.steady)

    # ------------------------------------------------------------------ changes

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
               rope: Optional[torch.Tensor]) -> None:
        """Append ``n`` tokens ``(B, H, n, D)`` (status pending)."""
        n = keys.shape[2]
        self.reserve(n)
        lo = self.end
        if rope is not None:
            self.rope[:, lo:lo + n].copy_(rope)
        self.keys[:, :, lo:lo + n].copy_(keys)
        self.values[:, :, lo:lo + n].copy_(values)
        self.valid[:, lo:lo + n].copy_(valid)
        self.preserve[:, lo:lo + n].zero_()
        self.length += n
        self.pending += n

    def claim(self, n: int) -> None:
        """``n`` tokens written in place after the window (a captured decode step wrote their keys,
        values and validity into the buffers) join it, status pending."""
        if self.end + n > self.capacity:
            raise RuntimeError(f"a captured step wrote {n} tokens after slot {self.end} of a "
                               f"window of capacity {self.capacity}")
        self.length += n
        self.pending += n

    def slot_max_abs(self, side: str, lo: int, hi: int) -> torch.Tensor:
        """float ``(hi - lo,)``: max ``|x|`` over ``(B, H, D)`` of the ``side`` ("keys" or
        "values") of the tokens at positions ``lo .. hi - 1`` (NaN and Inf propagate): what
        ``DeferredChecks.finite_slots`` reads (one reduction)."""
        if lo < self.start or hi > self.start + self.length:
            raise RuntimeError(f"positions {lo}..{hi - 1} are not in the residual window "
                               f"({self.start}..{self.start + self.length - 1}): checks recorded by "
                               "slot must be materialized before the tokens leave it")
        buf = self.keys if side == "keys" else self.values
        at = self.offset + lo - self.start
        return torch.linalg.vector_norm(buf[:, :, at:at + hi - lo], math.inf, dim=(0, 1, 3))

    def pending_slice(self) -> slice:
        """Buffer slots of the pending tokens."""
        return slice(self.end - self.pending, self.end)

    def pending_valid(self) -> torch.Tensor:
        """bool ``(B, pending)``: the validity of the pending tokens (a view)."""
        return self.valid[:, self.pending_slice()]

    def resolve(self, flags: torch.Tensor) -> None:
        """Set the statuses of the pending tokens (bool ``(B, pending)``)."""
        self.preserve[:, self.pending_slice()].copy_(flags)
        self.pending = 0

    def drop_head(self, n: int) -> None:
        """Forget the first ``n`` tokens (flushed): the window's start advances, nothing is copied
        (pinned: the tokens kept are copied to the front of the buffers)."""
        self.offset += n
        self.length -= n
        self.start += n
        if self.pinned:
            self._compact()

    def crop(self, max_length: int) -> None:
        """Keep the tokens at positions ``< max_length`` (definition 6.14)."""
        keep = max(0, max_length - self.start)
        dropped = self.length - keep
        self.length = keep
        self.pending = max(0, self.pending - dropped)
        self.start = min(self.start, max_length)
        if self.pinned:
            self._compact()

    def take_rows(self, idx: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``idx[i]`` (int64 on the device; :func:`select_rows`: a
        reorder keeps the buffers, and a pinned window stays pinned)."""
        same = int(idx.shape[0]) == self.keys.shape[0]
        for name in ("keys", "values", "valid", "preserve", "rope"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, select_rows(t, idx))
        self.pinned = self.pinned and same

    def nbytes(self) -> int:
        """``2*B*H*r*D*itemsize + B*r + B*r`` (+ ``4*B*r`` rotary positions): definitions 6.17, 6.22."""
        b, h, _, d = self.keys.shape
        r = self.length
        rope = 0 if self.rope is None else 4 * b * r
        return 2 * b * h * r * d * self.keys.element_size() + 2 * b * r + rope

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.valid, self.preserve, self.rope) if t is not None]


class PreservedStore:
    """The preserved store (definition 6.6): admitted tokens at full precision, with positions.

    Buffers ``keys``, ``values`` ``(B, H, capacity + 1, D)`` and ``positions`` int64 ``(B, capacity
    + 1)`` (-1 = empty; the last column is a write-only scratch column), ``counts`` int64 ``(B,)``;
    ``used`` = the largest count over rows (host).  Grown to ``max(need, 1.5 * capacity, 4)``
    columns; positions are sorted per row.
    """

    __slots__ = ("keys", "values", "positions", "counts", "capacity", "used")

    def __init__(self, keys, values, positions, counts):
        self.keys, self.values, self.positions, self.counts = keys, values, positions, counts
        self.capacity = int(keys.shape[2]) - 1
        self.used = 0

    @classmethod
    def empty(cls, b: int, h: int, d: int, dtype, device) -> "PreservedStore":
        k = torch.zeros((b, h, 1, d), dtype=dtype, device=device)
        return cls(k, torch.zeros((b, h, 1, d), dtype=dtype, device=device),
                   torch.full((b, 1), -1, dtype=torch.int64, device=device),
                   torch.zeros(b, dtype=torch.int64, device=device))

    def view(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions (B, P), keys (B, H, P, D), values)`` of the ``P = used`` columns (views)."""
        p = self.used
        return self.positions[:, :p], self.keys[:, :, :p], self.values[:, :, :p]

    def reserve(self, need: int) -> None:
        """Room for ``need`` tokens per row (grown to ``max(need, 1.5 * capacity, 4)``)."""
        if need <= self.capacity:
            return
        cap = max(need, self.capacity + self.capacity // 2, 4)
        keep = self.capacity
        b, h, _, d = self.keys.shape
        pk = torch.zeros((b, h, cap + 1, d), dtype=self.keys.dtype, device=self.keys.device)
        pv = torch.zeros_like(pk)
        pos = torch.full((b, cap + 1), -1, dtype=torch.int64, device=self.keys.device)
        pk[:, :, :keep].copy_(self.keys[:, :, :keep])
        pv[:, :, :keep].copy_(self.values[:, :, :keep])
        pos[:, :keep].copy_(self.positions[:, :keep])
        self.keys, self.values, self.positions, self.capacity = pk, pv, pos, cap

    def sizes(self, n_new: torch.Tensor) -> torch.Tensor:
        """int64 ``(2,)`` on the device: the largest row count after admitting ``n_new`` (int64
        ``(B,)``: tokens admitted per row) and their total, what :meth:`commit` needs on the host
        (a flush reads them with its other values: ``accelerated.cache_flush``)."""
        return torch.stack([(self.counts + n_new).max(), n_new.sum()])

    def commit(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               admitted: torch.Tensor, n_new: torch.Tensor, need: int, added: int) -> None:
        """Append the ``admitted`` (bool ``(B, m)``) tokens of ``keys``/``values`` ``(B, H, m, D)`` at
        ``positions`` (int64 ``(m,)``), scattered without a Python loop, given ``n_new`` =
        ``admitted.sum(dim=1)`` and :meth:`sizes` read on the host (``need``, ``added``: the flush
        reads them with its other values)."""
        if not added:
            return
        b, h, m, d = keys.shape
        self.reserve(need)
        slot = torch.cumsum(admitted, dim=1) - 1 + self.counts[:, None]
        slot = torch.where(admitted, slot, torch.full_like(slot, self.capacity))   # scratch column
        idx = slot[:, None, :, None].expand(b, h, m, d)
        self.keys.scatter_(2, idx, keys)
        self.values.scatter_(2, idx, values)
        self.positions.scatter_(1, slot, positions.expand(b, m).contiguous())
        self.positions[:, self.capacity] = -1
        self.counts = self.counts + n_new
        self.used = max(self.used, need)

    def crop(self, max_length: int) -> None:
        """Drop the entries at positions ``>= max_length`` (a suffix of each row)."""
        if not self.used:
            return
        gone = self.positions >= max_length
        self.positions.masked_fill_(gone, -1)
        self.keys.masked_fill_(gone[:, None, :, None], 0)
        self.values.masked_fill_(gone[:, None, :, None], 0)
        self.counts = (self.positions >= 0).sum(dim=1)
        self.used = int(self.counts.max())

    def take_rows(self, idx: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``idx[i]`` (int64 on the device)."""
        for name in ("keys", "values", "positions", "counts"):
            setattr(self, name, select_rows(getattr(self, name), idx))
        self.used = int(self.counts.max()) if self.used else 0

    def row_positions(self) -> List[torch.Tensor]:
        """Per row, the sorted int64 positions held (CPU tensors)."""
        pos = self.positions[:, :self.used].cpu()
        return [row[row >= 0].clone() for row in pos]

    def nbytes(self) -> int:
        """``2*B*H*P*D*itemsize + 8*B*P`` (definition 6.17)."""
        b, h, _, d = self.keys.shape
        p = self.used
        return 2 * b * h * p * d * self.keys.element_size() + 8 * b * p

    def tensors(self) -> List[torch.Tensor]:
        return [self.keys, self.values, self.positions, self.counts]
