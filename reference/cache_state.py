"""The full-precision state of one cache layer, as records (docs/06-cache.md §6.3, §6.6 - 6.8).

* :class:`ResidualWindow` (definition 6.3): the most recent tokens at full
  precision, from position ``start`` on, with their validity, their resolved
  statuses, the count of still-pending ones and, for a quantizer that needs
  them (kvquant), their rotary positions;
* :class:`PreservedStore` (definition 6.6): the tokens admitted as attention
  sinks, at full precision, with their positions;
* :func:`flushed_length` (definition 6.8) and :func:`admit_preserved`
  (definition 6.7): what one flush step moves out of the window.

Both records are frozen: an operation returns a new record holding exactly
the tokens kept (arrays are concatenated on append, copied on removal: a
view would keep the removed tokens' buffer alive), so the memory held is
exactly what ``nbytes`` counts and follows the tokens held, never a
configured maximum such as ``residual_length``.  Shapes: ``B`` rows, ``H`` KV heads, ``D`` head
dimension, ``r`` residual tokens, ``P`` the largest preserved count of a row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .config import KVSinkConfig

__all__ = ["ResidualWindow", "PreservedStore", "flushed_length", "admit_preserved"]


# --------------------------------------------------------------------------
# Definitions 6.7 - 6.8: what one flush step moves
# --------------------------------------------------------------------------

def flushed_length(num_tokens: int, config: KVSinkConfig) -> int:
    """Tokens of a ``T``-token sequence that sit in the quantized store (definition 6.8).

    ``F(T) = blk * floor((T - R) / blk)`` if ``T >= R + blk``, else 0: the
    largest multiple of ``blk`` that leaves at least ``R`` tokens in the
    residual.  After ``QuantizedKVCacheLayer.flush`` the residual holds
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


# --------------------------------------------------------------------------
# Definition 6.3: the residual window
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ResidualWindow:
    """The residual window of one layer (definition 6.3).

    Attributes
    ----------
    start : int, position of the first slot (= the quantized store's length).
    keys, values : ``(B, H, r, D)`` in the storage dtype, positions
        ``start .. start + r - 1``.
    valid : bool ``(B, r)``; ``False`` = padding.
    preserve : bool ``(B, r)``, resolved statuses (``False`` placeholder for
        the last ``pending`` tokens).
    rope : int32 ``(B, r)`` rotary positions (0 at padding), or ``None`` when
        the quantizer does not use them (uniform).
    pending : int, the last ``pending`` tokens have no status yet.

    Bytes held (:attr:`nbytes`): ``2*B*H*r*D*itemsize + B*r + B*r (+ 4*B*r)``.
    """

    start: int
    keys: np.ndarray
    values: np.ndarray
    valid: np.ndarray
    preserve: np.ndarray
    rope: Optional[np.ndarray]
    pending: int = 0

    @classmethod
    def empty(cls, b: int, h: int, d: int, dtype: np.dtype, *, start: int = 0,
              rope: bool = False) -> "ResidualWindow":
        """No token, at position ``start``; ``rope``: the window keeps rotary positions."""
        return cls(start=start, keys=np.zeros((b, h, 0, d), dtype=dtype),
                   values=np.zeros((b, h, 0, d), dtype=dtype), valid=np.zeros((b, 0), dtype=bool),
                   preserve=np.zeros((b, 0), dtype=bool),
                   rope=np.zeros((b, 0), dtype=np.int32) if rope else None)

    @property
    def length(self) -> int:
        """``r``: tokens in the window."""
        return int(self.keys.shape[2])

    def _tokens(self, sl: slice, *, copy: bool, **changes) -> "ResidualWindow":
        """The window restricted to tokens ``sl`` (every per-token array), with ``changes``.

        ``copy``: new arrays holding only those tokens (what the window keeps: a view would
        keep the whole old buffer alive); else views (a short-lived part, as a flushed block).
        """
        def cut(a, axis):
            part = a[(slice(None),) * axis + (sl,)]
            return part.copy() if copy else part
        return dataclasses.replace(
            self, keys=cut(self.keys, 2), values=cut(self.values, 2), valid=cut(self.valid, 1),
            preserve=cut(self.preserve, 1), rope=None if self.rope is None else cut(self.rope, 1),
            **changes)

    def appended(self, keys: np.ndarray, values: np.ndarray, valid: np.ndarray,
                 rope: Optional[np.ndarray]) -> "ResidualWindow":
        """``n`` new tokens ``(B, H, n, D)`` at the end, status pending (definition 6.1)."""
        n = keys.shape[2]
        return dataclasses.replace(
            self, keys=np.concatenate([self.keys, keys], axis=2),
            values=np.concatenate([self.values, values], axis=2),
            valid=np.concatenate([self.valid, valid], axis=1),
            preserve=np.concatenate([self.preserve, np.zeros(valid.shape, bool)], axis=1),
            rope=None if self.rope is None else np.concatenate([self.rope, rope], axis=1),
            pending=self.pending + n)

    def pending_valid(self) -> np.ndarray:
        """bool ``(B, pending)``: validity of the pending tokens."""
        return self.valid[:, self.length - self.pending:]

    def resolved(self, preserve: np.ndarray) -> "ResidualWindow":
        """The pending tokens given statuses ``preserve`` ``(B, pending)`` (definition 6.2)."""
        statuses = self.preserve.copy()
        statuses[:, self.length - self.pending:] = preserve
        return dataclasses.replace(self, preserve=statuses, pending=0)

    def slot_positions(self) -> np.ndarray:
        """int64 ``(r,)``: ``start + j``."""
        return self.start + np.arange(self.length, dtype=np.int64)

    def positions(self) -> np.ndarray:
        """int64 ``(B, r)``: ``start + j``, ``-1`` at padding (the segment's key positions)."""
        return np.where(self.valid, self.slot_positions()[None, :], np.int64(-1))

    def head(self, n: int) -> "ResidualWindow":
        """The oldest ``n`` tokens (views), as a window with nothing pending."""
        return self._tokens(slice(0, n), copy=False, pending=0)

    def drop_head(self, n: int) -> "ResidualWindow":
        """The window without its oldest ``n`` tokens (flushed); it starts ``n`` later."""
        return self._tokens(slice(n, None), copy=True, start=self.start + n)

    def cropped(self, max_length: int) -> "ResidualWindow":
        """Only the slots at positions ``< max_length`` (definition 6.14); the pending count
        loses the dropped tokens; an emptied window starts at ``min(start, max_length)``."""
        keep = max(0, max_length - self.start)
        dropped = self.length - keep
        return self._tokens(slice(0, keep), copy=True, pending=max(0, self.pending - dropped),
                            start=min(self.start, max_length))

    def take_rows(self, rows: np.ndarray) -> "ResidualWindow":
        """Batch rows ``rows`` (definition 6.15)."""
        return dataclasses.replace(
            self, keys=self.keys[rows], values=self.values[rows], valid=self.valid[rows],
            preserve=self.preserve[rows], rope=None if self.rope is None else self.rope[rows])

    def segment(self):
        """``(keys, values, positions)``: the residual segment of definition 6.12 (copies)."""
        return self.keys.copy(), self.values.copy(), self.positions()

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held."""
        arrays = (self.keys, self.values, self.valid, self.preserve, self.rope)
        return int(sum(a.nbytes for a in arrays if a is not None))


# --------------------------------------------------------------------------
# Definition 6.6: the preserved store
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PreservedStore:
    """The preserved store of one layer (definition 6.6): the admitted attention sinks.

    Attributes
    ----------
    positions : int64 ``(B, P)``, sorted per row, ``-1`` padding at the end of
        rows holding fewer than ``P``.
    keys, values : ``(B, H, P, D)`` in the storage dtype, 0 at padding.

    ``P`` is the largest count over rows.  Bytes held (:attr:`nbytes`):
    ``2*B*H*P*D*itemsize + 8*B*P``.
    """

    positions: np.ndarray
    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls, b: int, h: int, d: int, dtype: np.dtype) -> "PreservedStore":
        return cls(positions=np.zeros((b, 0), dtype=np.int64),
                   keys=np.zeros((b, h, 0, d), dtype=dtype), values=np.zeros((b, h, 0, d), dtype=dtype))

    def counts(self) -> np.ndarray:
        """int ``(B,)``: tokens each row holds."""
        return np.sum(self.positions >= 0, axis=1)

    def row_positions(self) -> List[np.ndarray]:
        """Per row, the sorted int64 positions it holds."""
        return [row[row >= 0].copy() for row in self.positions]

    def appended(self, positions: np.ndarray, keys: np.ndarray, values: np.ndarray,
                 admitted: np.ndarray) -> "PreservedStore":
        """Per row, the ``admitted`` (bool ``(B, k)``) tokens of ``keys``, ``values``
        ``(B, H, k, D)`` at ``positions`` ``(k,)`` appended in position order."""
        held, new = self.counts(), np.sum(admitted, axis=1)
        if not np.any(new):
            return self
        b, h, _, d = self.keys.shape
        p_new = int(max(held + new))
        pos = np.full((b, p_new), -1, dtype=np.int64)
        pk = np.zeros((b, h, p_new, d), dtype=self.keys.dtype)
        pv = np.zeros((b, h, p_new, d), dtype=self.values.dtype)
        for row in range(b):
            old = int(held[row])
            idx = np.flatnonzero(admitted[row])
            pos[row, :old] = self.positions[row, :old]
            pk[row, :, :old], pv[row, :, :old] = self.keys[row, :, :old], self.values[row, :, :old]
            pos[row, old:old + len(idx)] = positions[idx]
            pk[row, :, old:old + len(idx)] = keys[row][:, idx]
            pv[row, :, old:old + len(idx)] = values[row][:, idx]
        return PreservedStore(positions=pos, keys=pk, values=pv)

    def cropped(self, max_length: int) -> "PreservedStore":
        """Without the entries at positions ``>= max_length`` (definition 6.14).

        Positions are sorted, so each row keeps a prefix."""
        gone = self.positions >= max_length
        zero = self.keys.dtype.type(0)
        return PreservedStore(positions=np.where(gone, np.int64(-1), self.positions),
                              keys=np.where(gone[:, None, :, None], zero, self.keys),
                              values=np.where(gone[:, None, :, None], zero, self.values)).trimmed()

    def take_rows(self, rows: np.ndarray) -> "PreservedStore":
        """Batch rows ``rows`` (definition 6.15)."""
        return PreservedStore(positions=self.positions[rows], keys=self.keys[rows],
                              values=self.values[rows]).trimmed()

    def trimmed(self) -> "PreservedStore":
        """Without the columns beyond ``P`` = the largest row count (after removals); new
        arrays, so that the removed columns' memory is released."""
        p = int(np.max(self.counts(), initial=0))
        return PreservedStore(positions=self.positions[:, :p].copy(),
                              keys=self.keys[:, :, :p].copy(), values=self.values[:, :, :p].copy())

    def segment(self):
        """``(keys, values, positions)``: the preserved segment of definition 6.12 (copies)."""
        return self.keys.copy(), self.values.copy(), self.positions.copy()

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held."""
        return int(self.positions.nbytes + self.keys.nbytes + self.values.nbytes)
