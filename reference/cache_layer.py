"""One layer of the quantized KV cache, streaming semantics (docs/06-cache.md §6.1 - 6.17).

:class:`QuantizedKVCacheLayer` holds what every quantizer shares: the
residual window and the preserved store (records of
:mod:`reference.cache_state`), the update / resolve / flush loop, crop,
reorder / select_batch, reset, segments, attend and nbytes.  The quantized
store is a :class:`~reference.cache_store.QuantizedStore` made by
:func:`make_store` -- the one place that looks at ``config.quantizer`` -- so
no method here branches on the quantizer.  :func:`quantize_sequence` fills a
layer in one shot (definition 6.10).  ``reference.cache`` re-exports these
names; see its docstring for the whole layout.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .attention import split_attention
from .cache_checks import check_index, check_kv, check_mask, check_storage_dtype, is_int
from .cache_kvquant import KVQuantStore
from .cache_state import PreservedStore, ResidualWindow, admit_preserved, flushed_length
from .cache_store import QuantizedStore, UniformStore
from .config import KVSinkConfig
from .preserve import cap_preserved

__all__ = ["STORES", "make_store", "QuantizedKVCacheLayer", "quantize_sequence"]

_FLUSH_PENDING_MESSAGE = "resolve() the status of tokens before flushing"

#: The quantized store of each ``config.quantizer`` value.
STORES = {"uniform": UniformStore, "kvquant": KVQuantStore}


def make_store(config: KVSinkConfig, *, kvquant_calibration=None,
               rope_inv_freq=None) -> QuantizedStore:
    """The empty quantized store of ``config.quantizer`` (:class:`UniformStore` or
    :class:`KVQuantStore`); the two keyword arguments are the kvquant quantizer's
    (``ValueError`` with the uniform one)."""
    return STORES[config.quantizer](config, kvquant_calibration=kvquant_calibration,
                                    rope_inv_freq=rope_inv_freq)


# --------------------------------------------------------------------------
# Definitions 6.1 - 6.17: one layer
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
    ``quantized`` : the :class:`QuantizedStore` (:func:`make_store`);
        ``blocks`` : its list of blocks, contiguous, covering positions
        ``[0, num_quantized)``.
    preserved store (:class:`PreservedStore`): positions int64 ``(B, P)``
        (``-1`` padding at the end of rows holding fewer than ``P``), keys and
        values ``(B, H, P, D)`` in ``dtype`` (0 at padding), ``P`` = the
        largest count over rows.
    residual (:class:`ResidualWindow`): keys, values ``(B, H, r, D)`` in
        ``dtype`` at positions ``num_quantized .. num_quantized + r - 1``;
        ``valid`` bool ``(B, r)``; ``preserve`` bool ``(B, r)`` (resolved
        statuses; ``False`` placeholder for the last ``num_pending`` tokens,
        still pending).
    """

    def __init__(self, config: KVSinkConfig, *, dtype=np.float32, kvquant_calibration=None,
                 rope_inv_freq=None):
        if not isinstance(config, KVSinkConfig):
            raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = check_storage_dtype(dtype)
        self.quantized = make_store(config, kvquant_calibration=kvquant_calibration,
                                    rope_inv_freq=rope_inv_freq)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the cache; ``B``, ``H``, ``D`` are forgotten (definition 6.16)."""
        self._dims: Optional[Tuple[int, int, int]] = None
        self._residual: Optional[ResidualWindow] = None
        self._preserved: Optional[PreservedStore] = None
        self.quantized.reset()

    def _allocate(self, b: int, h: int, d: int) -> None:
        """The first update fixed ``B``, ``H``, ``D``: empty records (nothing preallocated)."""
        self._dims = (b, h, d)
        self._preserved = PreservedStore.empty(b, h, d, self.dtype)
        self._residual = ResidualWindow.empty(b, h, d, self.dtype, rope=self.quantized.token_rope)
        self.quantized.bind(h, d)

    @property
    def kvquant(self) -> bool:
        """True with ``quantizer="kvquant"``."""
        return self.quantized.quantizer == "kvquant"

    @property
    def kvquant_calibration(self):
        """kvquant: the calibration in use (None before the first update if an nf one is to be
        made then); None with the uniform quantizer."""
        return self.quantized.calibration

    @property
    def rope_inv_freq(self) -> Optional[np.ndarray]:
        """kvquant: float32 ``(D/2,)`` or None."""
        return self.quantized.rope_inv_freq

    @property
    def blocks(self) -> list:
        """The quantized store's blocks (:class:`QuantizedBlock` / :class:`KVQuantCacheBlock`)."""
        return self.quantized.blocks

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
        return 0 if self._residual is None else self._residual.start

    @property
    def num_residual(self) -> int:
        """``r``: slots of the residual window."""
        return 0 if self._residual is None else self._residual.length

    @property
    def num_pending(self) -> int:
        """Tokens whose status is still pending (the last ``num_pending`` residual slots)."""
        return 0 if self._residual is None else self._residual.pending

    @property
    def seq_length(self) -> int:
        """Total slots = ``num_quantized + num_residual`` = the next update's first position."""
        return self.num_quantized + self.num_residual

    @property
    def preserved(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The preserved store: ``(positions (B, P), keys (B, H, P, D), values (B, H, P, D))``."""
        self._require_data()
        p = self._preserved
        return p.positions, p.keys, p.values

    @property
    def residual(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The residual: ``(keys (B, H, r, D), values, valid (B, r), preserve (B, r))``."""
        self._require_data()
        w = self._residual
        return w.keys, w.values, w.valid, w.preserve

    @property
    def residual_rope_positions(self) -> np.ndarray:
        """kvquant: int32 ``(B, r)``, the residual tokens' rotary positions (0 at padding)."""
        self._require_data()
        if self._residual.rope is None:
            raise AttributeError("residual_rope_positions: only the kvquant quantizer stores "
                                 "rotary positions")
        return self._residual.rope

    def preserved_positions(self) -> List[np.ndarray]:
        """Per row, the sorted int64 positions of its preserved-store tokens."""
        if self._dims is None:
            return []
        return self._preserved.row_positions()

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
        k, v, valid = self._check_tokens(keys, values, valid)
        b, h, _, d = k.shape
        rope = self.quantized.check_rope_positions(rope_positions, valid, self.seq_length)
        self.quantized.check_dims(h, d)
        if self._dims is None:
            self._allocate(b, h, d)
        self._residual = self._residual.appended(k, v, valid, rope)

    def _check_tokens(self, keys, values, valid) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys and values in the storage dtype and the ``valid`` mask of an update, checked
        against each other and against ``B``, ``H``, ``D`` of earlier updates."""
        k = check_kv("keys", keys, self.dtype)
        v = check_kv("values", values, self.dtype)
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
            return k, v, np.ones((b, n), dtype=bool)
        return k, v, check_mask("valid", valid, (b, n))

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
        self._residual = self._residual.resolved(self.check_preserve(preserve))

    def check_preserve(self, preserve) -> np.ndarray:
        """``preserve`` as a bool ``(B, num_pending)`` copy, or the error :meth:`resolve` raises
        (changes nothing; ``QuantizedKVCache.resolve`` checks every layer first)."""
        preserve = check_mask("preserve", preserve, (self._dims[0], self.num_pending))
        bad = preserve & ~self._residual.pending_valid()
        if np.any(bad):
            row, j = np.argwhere(bad)[0]
            position = self.seq_length - self.num_pending + j
            raise ValueError(f"preserve marks a padding token (row {row}, position {position}); "
                             "padding is never preserved: pass preserve & valid")
        return preserve

    # ------------------------------------------------------------------ 6.3 flush
    def flush(self) -> int:
        """Move whole token blocks from the residual to the quantized/preserved stores (6.3).

        While ``num_residual - blk >= R``: the oldest ``blk`` residual tokens
        form a block; tokens with status "preserve" are admitted to the
        preserved store up to ``config.max_preserved`` per row
        (:func:`admit_preserved`), the others are quantized
        (:meth:`QuantizedStore.append`, padding and admitted tokens excluded
        from the statistics).  Raises ``RuntimeError`` (and changes nothing)
        if a token that would be flushed is pending.

        Returns the number of blocks flushed.
        """
        if self._dims is None:
            return 0
        self.check_flushable()
        blk = self.config.token_block
        n_blocks = flushed_length(self.num_residual, self.config) // blk
        for _ in range(n_blocks):
            self._flush_block(blk)
        return n_blocks

    def check_flushable(self) -> None:
        """Raise ``RuntimeError`` if :meth:`flush` would reach a pending token."""
        if self._dims is None:
            return
        n = flushed_length(self.num_residual, self.config)
        resolved = self.num_residual - self.num_pending
        if n > resolved:
            raise RuntimeError(f"{_FLUSH_PENDING_MESSAGE}: flushing {n} residual tokens needs "
                               f"their status, but only {resolved} are resolved")

    def _flush_block(self, blk: int) -> None:
        """The oldest ``blk`` residual tokens: admitted ones to the preserved store, the block
        (admitted and padding tokens excluded) to the quantized store."""
        head = self._residual.head(blk)
        admitted = admit_preserved(head.preserve, self._preserved.counts(),
                                   self.config.max_preserved)
        self.quantized.append(head.start, head.keys, head.values, head.valid & ~admitted,
                              head.rope)
        self._preserved = self._preserved.appended(head.slot_positions(), head.keys, head.values,
                                                   admitted)
        self._residual = self._residual.drop_head(blk)

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
        return [self.quantized.segment(*self._dims), self._preserved.segment(),
                self._residual.segment()]

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
        max_length = self._crop_length(max_length)
        if max_length >= self.seq_length:
            return
        self.quantized.crop(max_length)
        self._residual = self._residual.cropped(max_length)
        self._preserved = self._preserved.cropped(max_length)

    def _crop_length(self, max_length) -> int:
        """``max_length`` of :meth:`crop` checked, a negative one counted from the end."""
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
    def _take_rows(self, rows: np.ndarray) -> None:
        self.quantized.take_rows(rows)
        self._preserved = self._preserved.take_rows(rows)
        self._residual = self._residual.take_rows(rows)
        self._dims = (len(rows),) + self._dims[1:]

    def reorder(self, beam_idx) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` (definition 6.15).

        ``beam_idx``: int ``(B,)`` with values in ``[0, B)`` (repeats allowed).
        """
        if self._dims is None:
            return
        self._take_rows(check_index("beam_idx", beam_idx, self._dims[0], self._dims[0]))

    def select_batch(self, indices) -> None:
        """Keep rows ``indices`` (in that order); ``B`` becomes ``len(indices)`` (definition 6.15)."""
        if self._dims is None:
            return
        self._take_rows(check_index("indices", indices, self._dims[0], None))

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
        return int(self.quantized.nbytes() + self._preserved.nbytes + self._residual.nbytes)

    def __repr__(self) -> str:
        return (f"QuantizedKVCacheLayer(dims={self._dims}, quantized={self.num_quantized}, "
                f"blocks={len(self.blocks)}, preserved={[len(p) for p in self.preserved_positions()]}, "
                f"residual={self.num_residual}, pending={self.num_pending})")


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
    k, v, valid = layer._check_tokens(keys, values, valid)
    b, h, t, d = k.shape
    preserve = check_mask("preserve", preserve, (b, t))
    if np.any(preserve & ~valid):
        raise ValueError("preserve marks a padding token; padding is never preserved: "
                         "pass preserve & valid")
    rope = layer.quantized.check_rope_positions(rope_positions, valid, 0)
    layer.quantized.check_dims(h, d)
    layer._allocate(b, h, d)
    _fill_sequence(layer, k, v, valid, preserve, rope)
    return layer


def _fill_sequence(layer: QuantizedKVCacheLayer, k: np.ndarray, v: np.ndarray, valid: np.ndarray,
                   preserve: np.ndarray, rope: Optional[np.ndarray]) -> None:
    """Definition 6.10 on an empty, allocated ``layer``: the first ``F`` tokens as blocks and
    admitted sinks, the rest as the residual window (statuses resolved)."""
    config = layer.config
    f = flushed_length(k.shape[2], config)
    admitted = cap_preserved(preserve[:, :f], config.max_preserved)
    layer.quantized.append(0, k[:, :, :f], v[:, :, :f], valid[:, :f] & ~admitted,
                           None if rope is None else rope[:, :f])
    layer._preserved = layer._preserved.appended(np.arange(f, dtype=np.int64), k[:, :, :f],
                                                 v[:, :, :f], admitted)
    layer._residual = ResidualWindow(
        start=f, keys=k[:, :, f:].copy(), values=v[:, :, f:].copy(), valid=valid[:, f:].copy(),
        preserve=preserve[:, f:].copy(), rope=None if rope is None else rope[:, f:].copy())
