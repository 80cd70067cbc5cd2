"""Streaming quantized KV cache, torch twin of ``reference/cache.py`` (docs/06-cache.md).

Same classes, same methods, same semantics as the reference; the state lives
on the tensors' device and the quantized part is stored **packed**: int32
words (uint32 bit pattern, ``accelerated/packing.py``) plus float32 scales and
zero points.  No full-precision copy of a quantized token is kept anywhere:
the only tensors in the cache's dtype are the residual window and the
preserved store.

Semantics (docs/06-cache.md; summary)
-------------------------------------
* Slots are numbered by position ``0, 1, 2, ...`` (one numbering shared by
  the rows of the batch; a padding slot has a position but is not valid).
* :meth:`QuantizedKVCacheLayer.update` appends ``(B, H, n, D)`` tokens to the
  full-precision residual; their preservation status is *pending*.
* :meth:`~QuantizedKVCacheLayer.resolve` sets the status of every pending token.
* :meth:`~QuantizedKVCacheLayer.flush`: while ``residual_len - token_block >=
  residual_length``, the oldest ``token_block`` tokens are quantized (keys
  along ``config.key_axis``, values along ``config.value_axis``), preserved
  tokens (up to ``config.max_preserved`` per row, earliest first) moving to
  the preserved store; preserved and padding tokens are excluded from the
  block's statistics and get codes 0 and position -1 in the quantized part.
* :meth:`~QuantizedKVCacheLayer.crop` keeps positions ``< max_length``
  without re-quantizing; :meth:`~QuantizedKVCacheLayer.reorder`,
  :meth:`~QuantizedKVCacheLayer.select_batch`, :meth:`~QuantizedKVCacheLayer.reset`.

Storage (per layer, all on one device)
--------------------------------------
Buffers are preallocated and grown geometrically (see "Growth policy"), so
appending a token or flushing a block reallocates nothing in the steady state.
``Q`` = code slots held (``blk`` per block, a
cropped block keeps its codes), ``Qcap >= Q`` the capacity:

====================  ==========================================  ===========
buffer                shape (capacity)                            dtype
====================  ==========================================  ===========
key words             ``(B, H, Qcap, ceil(D / cpw_k))``           int32
key scale / zero      ``(B, H, Qcap / blk, D)`` (axis "channel")  float32
                      ``(B, H, Qcap, ceil(D / Gk))`` (axis "token")
value words / stats   the same with the value settings
slot positions        ``(B, Qcap)``: position, -1 = empty          int64
                      (preserved, padding, cropped, unused)
coded flags           ``(B, Qcap)``: as flushed (definition 6.5)  bool
preserved K / V       ``(B, H, Pcap + 1, D)`` (the last column    storage dtype
                      is a write-only scratch column)
preserved positions   ``(B, Pcap + 1)``, -1 = empty               int64
preserved counts      ``(B,)``                                    int64
residual K / V        ``(B, H, Rcap, D)``, window                 storage dtype
                      ``[off, off + r)``
residual validity     ``(B, Rcap)``                               bool
residual statuses     ``(B, Rcap)`` (preserve flags)              bool
====================  ==========================================  ===========

Host-side ints and lists (no tensors) hold the block starts and slot counts,
the residual window's offset, length and first position, and the pending count.

Growth policy
-------------
``W = R + blk`` is the most the residual holds between flushes, ``S = max(64,
W + max(16, W // 2))`` its *steady* capacity.  Buffers follow the tokens held,
never the configured ``R``: a short sequence with a large ``R`` holds
``max(64, 1.5 * tokens)`` residual slots, not ``S``.

* Residual: a sliding window in its buffer.  Flushing advances the window's
  start (no copy); an append that reaches the buffer's end compacts the window
  to the front of a buffer of ``S`` slots when the window then fits (at most one
  copy of ``W`` tokens every ``max(16, W // 2)`` decode steps: amortised, two
  token copies per step); a larger append (a prefill) gets a buffer of exactly
  the tokens held, or x1.5 the old one when tokens keep arriving without a
  flush (amortised); a buffer smaller than ``S`` (a short sequence) grows x1.5
  towards ``S``, never beyond the tokens it must hold x1.5 (or 64).  Every flush gives back a buffer larger than ``S``, so
  after a flush ``Rcap = S`` exactly.
* Quantized store: grown to ``max(need, 1.25 * Qcap, 64)`` slots, rounded up
  to a whole block, so ``Qcap < max(1.25 * Q, 64) + blk`` (a prefill's blocks
  fit exactly; decoding reallocates once per 25 % growth).
* Preserved store: grown to ``max(need, 1.5 * Pcap, 4)`` columns (+ the scratch
  column).  :meth:`~QuantizedKVCacheLayer.crop` keeps the capacities.

:meth:`~QuantizedKVCacheLayer.nbytes` is the spec's count (definition 6.17):
the bytes the cache logically holds, identical to the reference's.
:meth:`~QuantizedKVCacheLayer.allocated_bytes` is what the buffers occupy:
``>= nbytes()`` by the spare capacity, the int64 slot positions kept beside
the coded flags (attention reads them directly) and the preserved counts.
With the policy above, after a flush (between crops)
``allocated_bytes() <= 1.5 * nbytes() + C``, ``C`` = the bytes of ``S - R``
residual slots, 5 preserved columns and ``blk`` quantized slots, plus the
preserved counts: a constant of the configuration, not of the sequence length
(``tests/test_accelerated_cache.py``, 512- and 4,096-token prefills + 100 decode
steps, SmolLM2-135M layer shapes; the 1.5 covers the int64 positions, 8 bytes
beside each slot's >= 100 bytes of codes and statistics at these shapes).

KVQuant-style quantizer (``config.quantizer == "kvquant"``, docs/06-cache.md 6.21)
---------------------------------------------------------------------------------
The residual window and the preserved store are the same; the residual also
keeps each token's rotary position (int32 ``(B, Rcap)``).  A flushed block is
un-rotated (``accelerated.kvquant.unapply_rope`` with the layer's
``rope_inv_freq``), quantized with ``accelerated.kvquant.quantize_block_kvquant``
and kept as a :class:`KVQuantCacheBlock` whose keys and values are
:class:`PackedKVQuantTensor` (codes packed along ``D``, float32 half-range and
centre, COO outliers); the codebooks stay in the layer's calibration.
:meth:`~QuantizedKVCacheLayer.attend` dequantizes the blocks, rotates the keys
back and attends at full precision (no kernel for the non-uniform grid yet),
merged with the preserved and residual segments as for the uniform quantizer.

Hot path
--------
* :meth:`update`: one copy into the residual buffer (+ one finiteness check: a
  device->host sync, or, with ``checks=`` (:class:`DeferredChecks`), a device flag
  read later together with every other layer's: one sync per model forward).
* :meth:`flush` (every ``blk`` tokens): all due blocks quantized by one call
  of :func:`accelerated.quantize.quantize_packed` per side (the fused Triton
  kernel on CUDA), preserved tokens scattered into the preserved store
  without a Python loop; one device->host sync of its own (the largest
  preserved count, to size the store).
* :meth:`attend`: :func:`accelerated.attention.quantized_segment_attention`
  over the packed store (block by block; on CUDA the whole, contiguous buffer
  is handed to the kernel, its unused slots masked by position -1), the
  preserved store and the residual at full precision; the three partial
  results merged with the log-sum-exp rule.  No dequantized copy of the
  quantized store is ever built (:meth:`segments` builds one, for tests).
  With ``checks=`` the query's finiteness is recorded (no sync); with
  ``shared=`` the full-precision segments' visibility masks are made once per
  forward for all layers; the packed views handed to the kernel are reused
  between calls while the buffers stay the same.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple

import numpy as np
import torch

from reference import cache as _rcache
from reference import kvquant as _rkvq
from reference.config import KVSinkConfig
from reference.packing import packed_length

from . import attention as _att
from . import kvquant as _kvq
from .packing import WORD_DTYPE, pack_codes, unpack_codes
from .quantize import PackedQuantizedTensor, dequantize, quantize_packed

__all__ = ["QuantizedKVCacheLayer", "QuantizedKVCache", "QuantizedBlock", "KVQuantCacheBlock",
           "PackedKVQuantTensor", "DeferredChecks"]

_FLUSH_PENDING_MESSAGE = "resolve() the status of tokens before flushing"
_NONFINITE_MESSAGE = {name: f"{name} contains NaN or Inf; the cache stores finite values only"
                      for name in ("keys", "values")}

_F32 = torch.float32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

#: Smallest capacity (tokens) of a newly allocated quantized / residual buffer.
_MIN_CAPACITY = 64


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _grow_dim(t: torch.Tensor, dim: int, new_size: int, fill=0) -> torch.Tensor:
    """A copy of ``t`` with dimension ``dim`` enlarged to ``new_size`` (new entries ``fill``)."""
    shape = list(t.shape)
    shape[dim] = new_size
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _block_positions(start: int, num_slots: int, coded: torch.Tensor) -> torch.Tensor:
    """int64 ``(B, n)``: ``start + j`` at a block's live slots (coded, ``j < num_slots``), -1 elsewhere."""
    j = torch.arange(coded.shape[1], dtype=torch.int64, device=coded.device)
    live = coded & (j < num_slots)
    return torch.where(live, start + j, torch.full_like(j, -1))


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}.get(np.dtype(dtype), dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of torch.float16/bfloat16/float32/float64 (the "
                        f"full-precision storage dtype), got {dtype!r}")
    return dtype


def _rope_message(bad: torch.Tensor, pos: torch.Tensor) -> str:
    i = tuple(int(j) for j in bad.nonzero()[0])
    return f"rope_positions must lie in [0, 2**24) at valid tokens; got {int(pos[i])} at (row, token) {i}"


def _padding_message(bad: torch.Tensor, first: int) -> str:
    row, col = (int(i) for i in bad.nonzero()[0])
    return (f"preserve marks a padding token (row {row}, position {first + col}); padding is never "
            "preserved: pass preserve & valid")


class DeferredChecks:
    """Input validation gathered as device flags and read with ONE device->host synchronisation.

    Each eager check of :meth:`QuantizedKVCacheLayer.update`, ``resolve`` and ``attend``
    (K/V and query finite, no preserve flag on padding, kvquant rotary positions in range) reads a
    device flag on the host: one synchronisation per call, i.e. several per layer and decode step
    inside a model.  Given ``checks=DeferredChecks()``, those methods record the flag here instead
    (a reduction kernel, no synchronisation), and :meth:`check` reads all recorded flags at once
    (one synchronisation per device) and raises the ``ValueError`` the eager check would have
    raised first, with the same message.

    Semantics: until :meth:`check` has run, the recorded calls have *already* changed the cache
    (tokens appended, statuses set), so a failed check means: discard the cache (``reset()``), or
    ``crop`` the tokens of the failed calls away.  A layer never quantizes unchecked tokens: its
    :meth:`~QuantizedKVCacheLayer.flush` calls :meth:`check` of the checks its updates recorded to
    first (and raises, changing nothing, if they failed).  :meth:`check` is idempotent: after the
    first call it raises the same error again, or returns at once.
    """

    __slots__ = ("_flags", "_bad", "_messages", "_error", "_checked")

    def __init__(self):
        self._flags: List[torch.Tensor] = []     # 0-d tensors, in the order recorded
        self._bad: List[bool] = []               # False: bad if not finite; True: bad if non-zero
        self._messages: list = []                # str, or a callable building it (may sync)
        self._error: Optional[str] = None
        self._checked = False

    def __len__(self) -> int:
        return len(self._flags)

    def finite(self, x: torch.Tensor, message, *, stored: Optional[torch.Tensor] = None,
               overflow_message=None) -> None:
        """Record "``x`` holds no NaN/Inf" (failing with ``message``) and, if ``stored`` (``x``
        converted to another dtype) is given, "``stored`` neither" (``overflow_message``: the
        conversion overflowed).  Messages: str, or a callable returning it, called on failure."""
        if x.numel() == 0:
            return
        self._add(torch.linalg.vector_norm(x, math.inf), False, message)   # max |x|: NaN, Inf propagate
        if stored is not None:
            self._add(torch.linalg.vector_norm(stored, math.inf), False, overflow_message)

    def none_true(self, flags: torch.Tensor, message) -> None:
        """Record "no element of the bool tensor ``flags`` is True" (``message``: str or a
        callable returning it, called only on failure)."""
        if flags.numel():
            self._add(flags.any(), True, message)

    def _add(self, flag: torch.Tensor, nonzero_is_bad: bool, message) -> None:
        if self._checked:
            raise RuntimeError("DeferredChecks.check() has run already: use a new DeferredChecks "
                               "for new calls")
        self._flags.append(flag)
        self._bad.append(nonzero_is_bad)
        self._messages.append(message)

    @property
    def checked(self) -> bool:
        return self._checked

    def check(self) -> None:
        """Read every recorded flag (one synchronisation per device holding some) and raise the
        ``ValueError`` of the first failed check in recording order; idempotent."""
        if not self._checked:
            self._checked = True
            by_device = {}
            for i, f in enumerate(self._flags):
                by_device.setdefault(f.device, []).append(i)
            values = [0.0] * len(self._flags)
            for idx in by_device.values():
                for i, v in zip(idx, torch.stack([self._flags[i] for i in idx]).tolist()):
                    values[i] = v
            for v, nonzero_is_bad, message in zip(values, self._bad, self._messages):
                if (v != 0) if nonzero_is_bad else not math.isfinite(v):
                    self._error = message() if callable(message) else message
                    break
            self._flags = []                  # nothing to hold on to any more
        if self._error is not None:
            raise ValueError(self._error)


class QuantizedKVCacheLayer:
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
    """

    def __init__(self, config: KVSinkConfig, *, dtype=torch.float32, device=None,
                 kvquant_calibration=None, rope_inv_freq=None):
        if not isinstance(config, KVSinkConfig):
            raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = _check_dtype(dtype)
        self._device_arg = None if device is None else torch.device(device)
        self.device = self._device_arg
        self.block = config.token_block
        self.symmetric = config.scheme == "symmetric"
        self.kvquant = config.quantizer == "kvquant"
        if self.kvquant:
            _rkvq._check_kvquant_config(config)
            self._calibration_arg = _check_kvquant_calibration(kvquant_calibration, config)
            self._inv_freq_arg = _check_rope_inv_freq(rope_inv_freq)
        else:
            for name, arg in (("kvquant_calibration", kvquant_calibration),
                              ("rope_inv_freq", rope_inv_freq)):
                if arg is not None:
                    raise ValueError(f"{name} is only used by quantizer='kvquant' (the config has "
                                     f"quantizer={config.quantizer!r}); leave it None")
            self._calibration_arg = self._inv_freq_arg = None
        self._clear()

    # ------------------------------------------------------------------ state

    def _clear(self) -> None:
        self._shape = None          # (B, H, D) once the first update arrived
        self.device = self._device_arg
        # quantized part
        self._nq = 0                # quantized slots in use (multiple of block)
        self._qcap = 0
        self._block_starts: List[int] = []   # position of each block's first slot (host)
        self._block_slots: List[int] = []    # slots of each block still in the cache (host)
        self._kw = self._ks = self._kz = None
        self._vw = self._vs = self._vz = None
        self._qpos = None           # int64 (B, qcap): slot position, -1 = empty (not coded, or cropped)
        self._qcoded = None         # bool (B, qcap): the block's coded mask as flushed (never changed)
        # preserved store
        self._pcap = 0
        self._pused = 0             # columns in use: max preserved count over rows (host)
        self._pk = self._pv = None  # (B, H, pcap + 1, D)
        self._ppos = None           # int64 (B, pcap + 1)
        self._pcount = None         # int64 (B,)
        # residual
        self._rcap = 0
        self._roff = 0
        self._rlen = 0
        self._rstart = 0            # position of the residual's first slot
        self._npending = 0
        self._rk = self._rv = None  # (B, H, rcap, D)
        self._rvalid = None         # bool (B, rcap)
        self._rpres = None          # bool (B, rcap)
        self._unchecked: List[DeferredChecks] = []   # deferred checks of updates not yet read
        self._views = {}            # side -> (t1, buffers, PackedQuantizedTensor views): attend's
        # kvquant: residual rotary positions, the blocks, the calibration and inv_freq on the device
        self._rrope = None          # int32 (B, rcap)
        self._kvq_blocks: List["KVQuantCacheBlock"] = []
        self.kvquant_calibration = None
        self.rope_inv_freq = None

    # ------------------------------------------------------------------ properties

    @property
    def batch_size(self) -> Optional[int]:
        """``B``, or None before the first update."""
        return None if self._shape is None else self._shape[0]

    @property
    def num_heads(self) -> Optional[int]:
        return None if self._shape is None else self._shape[1]

    @property
    def head_dim(self) -> Optional[int]:
        return None if self._shape is None else self._shape[2]

    @property
    def num_quantized(self) -> int:
        """Slots of the quantized store (preserved and padding slots included) = first residual position."""
        return self._rstart

    @property
    def num_residual(self) -> int:
        """``r``: slots of the residual window."""
        return self._rlen

    @property
    def num_pending(self) -> int:
        """Tokens whose status is still pending (the last ``num_pending`` residual slots)."""
        return self._npending

    #: alias of :attr:`num_pending` (read by ``accelerated/hf.py``)
    n_pending = num_pending

    @property
    def seq_length(self) -> int:
        """Total slots = ``num_quantized + num_residual`` = the next update's first position."""
        return self._rstart + self._rlen

    def __len__(self) -> int:
        return self.seq_length

    def _require_data(self) -> None:
        if self._shape is None:
            raise RuntimeError("the cache is empty: call update() first")

    # ------------------------------------------------------------------ validation

    def _check_kv(self, keys, values, checks: Optional[DeferredChecks] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        for name, x in (("keys", keys), ("values", values)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch tensor (B, H, n, D), got {type(x).__name__}")
            if x.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), "
                                f"got dtype {x.dtype}")
            if x.dim() != 4:
                raise ValueError(f"{name} must have shape (B, H, n, D), got {tuple(x.shape)}")
        if keys.shape != values.shape:
            raise ValueError(f"keys and values must have the same shape (B, H, n, D), got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        b, h, n, d = keys.shape
        if b == 0 or h == 0 or d == 0:
            raise ValueError(f"keys must have B, H, D >= 1, got shape {tuple(keys.shape)}")
        if self._shape is not None and (b, h, d) != self._shape:
            raise ValueError(f"keys of shape {tuple(keys.shape)} do not match the cache's "
                             f"(B, H, D) = {self._shape}; reset() the cache to change them")
        if self._shape is None and self._device_arg is None:
            self.device = keys.device
        k = keys.to(device=self.device, dtype=self.dtype)
        v = values.to(device=self.device, dtype=self.dtype)
        if checks is not None:                      # recorded, read later: no sync here
            for name, x, stored in (("keys", keys, k), ("values", values, v)):
                converted = stored.dtype != x.dtype
                checks.finite(x, _NONFINITE_MESSAGE[name], stored=stored if converted else None,
                              overflow_message=self._overflow_message(name) if converted else None)
            return k, v
        if n and not bool(torch.isfinite(k).all() & torch.isfinite(v).all()):   # one sync
            for name, x, stored in (("keys", keys, k), ("values", values, v)):
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(_NONFINITE_MESSAGE[name])
                if not bool(torch.isfinite(stored).all()):
                    raise ValueError(self._overflow_message(name))
        return k, v

    def _overflow_message(self, name: str) -> str:
        return (f"{name} has values outside the range of the storage dtype {self.dtype} "
                f"(|x| > {torch.finfo(self.dtype).max}); use dtype=torch.float32")

    def _check_mask(self, name: str, x, shape) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor of shape {tuple(shape)}, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
        return x.to(self.device)

    # ------------------------------------------------------------------ allocation

    def _allocate(self, b: int, h: int, d: int) -> None:
        self._shape = (b, h, d)
        dev, dt = self.device, self.dtype
        self._pcount = torch.zeros(b, dtype=torch.int64, device=dev)
        self._pk = torch.zeros((b, h, 1, d), dtype=dt, device=dev)
        self._pv = torch.zeros((b, h, 1, d), dtype=dt, device=dev)
        self._ppos = torch.full((b, 1), -1, dtype=torch.int64, device=dev)
        if self.kvquant:
            cal = self._calibration_arg
            if cal is None:
                cal = _kvq.nf_calibration(self.config, h, d, dev)
            elif not isinstance(cal, _kvq.KVQuantCalibration):
                cal = _kvq.KVQuantCalibration.from_reference(cal, dev)
            else:
                cal = _kvq.KVQuantCalibration.from_reference(cal.to_reference(), dev)
            self.kvquant_calibration = cal
            if self._inv_freq_arg is not None:
                self.rope_inv_freq = self._inv_freq_arg.to(dev)

    def _check_kvquant_dims(self, h: int, d: int) -> None:
        """kvquant: the calibration and ``rope_inv_freq`` must fit ``H``, ``D`` (before any change)."""
        cal = self._calibration_arg
        if cal is not None:
            try:
                cal.check(self.config, h, d)
            except ValueError as exc:
                raise ValueError(f"kvquant_calibration does not fit the keys: {exc}") from None
        f = self._inv_freq_arg
        if f is not None and (d % 2 or tuple(f.shape) != (d // 2,)):
            raise ValueError(f"rope_inv_freq has shape {tuple(f.shape)}; keys with head dimension "
                             f"D={d} need (D/2,) = ({d // 2},) and D even")

    def _stat_cols(self, axis: str, group: int, slots: int) -> Tuple[int, int]:
        """(rows, cols) of the scale buffer for ``slots`` token slots of one side."""
        d = self._shape[2]
        if axis == "channel":
            return slots // self.block, d
        return slots, -(-d // group)

    def _ensure_quantized_capacity(self, need: int) -> None:
        if need <= self._qcap:
            return
        b, h, d = self._shape
        cap = _round_up(max(need, self._qcap + self._qcap // 4, _MIN_CAPACITY), self.block)
        c = self.config
        new = {}
        for side, bits, axis, group in (("k", c.key_bits, c.key_axis, c.key_group_size),
                                        ("v", c.value_bits, c.value_axis, c.value_group_size)):
            rows, cols = self._stat_cols(axis, group, cap)
            w = torch.zeros((b, h, cap, packed_length(d, bits)), dtype=WORD_DTYPE, device=self.device)
            s = torch.zeros((b, h, rows, cols), dtype=_F32, device=self.device)
            z = None if self.symmetric else torch.zeros((b, h, rows, cols), dtype=_F32, device=self.device)
            old_w, old_s, old_z = getattr(self, f"_{side}w"), getattr(self, f"_{side}s"), getattr(self, f"_{side}z")
            if old_w is not None:
                w[:, :, :old_w.shape[2]].copy_(old_w)
                s[:, :, :old_s.shape[2]].copy_(old_s)
                if z is not None:
                    z[:, :, :old_z.shape[2]].copy_(old_z)
            new[side] = (w, s, z)
        self._kw, self._ks, self._kz = new["k"]
        self._vw, self._vs, self._vz = new["v"]
        pos = torch.full((b, cap), -1, dtype=torch.int64, device=self.device)
        coded = torch.zeros((b, cap), dtype=torch.bool, device=self.device)
        if self._qpos is not None:
            pos[:, :self._qpos.shape[1]].copy_(self._qpos)
            coded[:, :self._qcoded.shape[1]].copy_(self._qcoded)
        self._qpos, self._qcoded = pos, coded
        self._qcap = cap

    def _residual_steady(self) -> int:
        """Residual capacity while decoding: the window plus room to slide.

        The window holds at most ``W = R + blk`` tokens between flushes; ``max(16,
        W // 2)`` more let it slide that many decode steps before one compaction
        copies it back to the front: amortised, at most two token copies per step.
        """
        window = self.config.residual_length + self.block
        return max(_MIN_CAPACITY, window + max(16, window // 2))

    def _relocate_residual(self, cap: int) -> None:
        """Move the residual window to the front of a buffer of capacity ``cap``."""
        b, h, d = self._shape
        lo, hi = self._roff, self._roff + self._rlen
        k = torch.zeros((b, h, cap, d), dtype=self.dtype, device=self.device)
        v = torch.zeros((b, h, cap, d), dtype=self.dtype, device=self.device)
        valid = torch.zeros((b, cap), dtype=torch.bool, device=self.device)
        pres = torch.zeros((b, cap), dtype=torch.bool, device=self.device)
        rope = torch.zeros((b, cap), dtype=torch.int32, device=self.device) if self.kvquant else None
        if self._rk is not None and hi > lo:
            k[:, :, :self._rlen].copy_(self._rk[:, :, lo:hi])
            v[:, :, :self._rlen].copy_(self._rv[:, :, lo:hi])
            valid[:, :self._rlen].copy_(self._rvalid[:, lo:hi])
            pres[:, :self._rlen].copy_(self._rpres[:, lo:hi])
            if rope is not None:
                rope[:, :self._rlen].copy_(self._rrope[:, lo:hi])
        self._rk, self._rv, self._rvalid, self._rpres = k, v, valid, pres
        self._rrope = rope
        self._rcap, self._roff = cap, 0

    def _ensure_residual_room(self, n: int) -> None:
        """Room for ``n`` more tokens after the window (see "Growth policy" above)."""
        if self._roff + self._rlen + n <= self._rcap:
            return
        steady, need = self._residual_steady(), self._rlen + n
        if need > steady:                           # a prefill fits exactly; appends without
            cap = max(need, self._rcap + self._rcap // 2)   # flushing grow x1.5 (amortised)
        elif self._rcap >= steady:
            cap = steady                            # compaction (or back to the steady size)
        else:                                       # the tokens held, x1.5 (amortised), up to steady
            cap = min(steady, max(need + need // 2, self._rcap + self._rcap // 2, _MIN_CAPACITY))
        self._relocate_residual(cap)

    def _shrink_residual(self) -> None:
        """After a flush: give back a residual buffer left larger than the steady size."""
        steady = self._residual_steady()
        if self._rcap > steady:
            self._relocate_residual(steady)

    def _ensure_preserved_capacity(self, need: int) -> None:
        if need <= self._pcap:
            return
        cap = max(need, self._pcap + self._pcap // 2, 4)
        keep = self._pcap
        b, h, _, d = self._pk.shape
        pk = torch.zeros((b, h, cap + 1, d), dtype=self.dtype, device=self.device)
        pv = torch.zeros((b, h, cap + 1, d), dtype=self.dtype, device=self.device)
        pos = torch.full((b, cap + 1), -1, dtype=torch.int64, device=self.device)
        pk[:, :, :keep].copy_(self._pk[:, :, :keep])
        pv[:, :, :keep].copy_(self._pv[:, :, :keep])
        pos[:, :keep].copy_(self._ppos[:, :keep])
        self._pk, self._pv, self._ppos, self._pcap = pk, pv, pos, cap

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
        if not self.kvquant and rope_positions is not None:
            raise ValueError("rope_positions is only used by quantizer='kvquant' (the config has "
                             f"quantizer={self.config.quantizer!r}); leave it None")
        keys, values = self._check_kv(keys, values, checks)
        b, h, n, d = keys.shape
        if valid is None:
            valid = torch.ones((b, n), dtype=torch.bool, device=self.device)
        else:
            valid = self._check_mask("valid", valid, (b, n))
        if self.kvquant:
            rope = self._check_rope_positions(rope_positions, valid, checks)
            self._check_kvquant_dims(h, d)
        if self._shape is None:
            self._allocate(b, h, d)
        if n == 0:
            return
        if checks is not None:
            self._watch(checks)
        self._ensure_residual_room(n)
        lo = self._roff + self._rlen
        if self.kvquant:
            self._rrope[:, lo:lo + n].copy_(rope)
        self._rk[:, :, lo:lo + n].copy_(keys)
        self._rv[:, :, lo:lo + n].copy_(values)
        self._rvalid[:, lo:lo + n].copy_(valid)
        self._rpres[:, lo:lo + n].zero_()
        self._rlen += n
        self._npending += n

    def _check_rope_positions(self, rope_positions, valid: torch.Tensor,
                              checks: Optional[DeferredChecks] = None) -> torch.Tensor:
        """int32 ``(B, n)`` rotary positions of new tokens (0 at padding), as the reference."""
        b, n = valid.shape
        first = self.seq_length
        if rope_positions is None:
            if n and first + n - 1 >= _rkvq.MAX_POSITION:
                raise ValueError(f"rope_positions: slot positions reach {first + n - 1} >= 2**24; "
                                 "pass rope_positions")
            pos = torch.arange(first, first + n, dtype=torch.int64, device=self.device).expand(b, n)
        else:
            if isinstance(rope_positions, np.ndarray):
                rope_positions = torch.from_numpy(rope_positions)
            if not isinstance(rope_positions, torch.Tensor) or rope_positions.dtype not in _INDEX_DTYPES:
                raise TypeError(f"rope_positions must be an integer tensor (B, n), got "
                                f"{getattr(rope_positions, 'dtype', type(rope_positions).__name__)}")
            if tuple(rope_positions.shape) != (b, n):
                raise ValueError(f"rope_positions must have shape (B, n) = {(b, n)}, got "
                                 f"{tuple(rope_positions.shape)}")
            pos = rope_positions.to(device=self.device, dtype=torch.int64)
            bad = valid & ((pos < 0) | (pos >= _rkvq.MAX_POSITION))
            if checks is not None:
                checks.none_true(bad, lambda: _rope_message(bad, pos))
            elif n and bool(bad.any()):
                raise ValueError(_rope_message(bad, pos))
        return torch.where(valid, pos, torch.zeros((), dtype=torch.int64, device=self.device)).to(torch.int32)

    # ------------------------------------------------------------------ 6.2 resolve

    def resolve(self, preserve, *, checks: Optional[DeferredChecks] = None) -> None:
        """Give the status of every pending token (definition 6.2).

        ``preserve``: bool ``(B, num_pending)`` in position order, ``True`` = keep at
        full precision.  A ``True`` on a padding token raises ``ValueError``; with
        ``checks`` (a :class:`DeferredChecks`) that test is recorded there instead
        (no device->host synchronisation) and raised by its ``check()``.
        """
        if self._shape is None:
            raise RuntimeError("resolve() before any update(): there is no pending token")
        flags = self._check_mask("preserve", preserve, (self._shape[0], self._npending))
        hi = self._roff + self._rlen
        lo = hi - self._npending
        first = self._rstart + self._rlen - self._npending
        if checks is not None:
            bad = flags > self._rvalid[:, lo:hi]             # preserve & ~valid, one kernel
            checks.none_true(bad, lambda: _padding_message(bad, first))
            self._watch(checks)
        elif self._npending:
            bad = flags & ~self._rvalid[:, lo:hi]
            if bool(bad.any()):
                raise ValueError(_padding_message(bad, first))
        self._rpres[:, lo:hi].copy_(flags)
        self._npending = 0

    def _watch(self, checks: DeferredChecks) -> None:
        """Remember ``checks``: :meth:`flush` runs it before quantizing anything."""
        if not any(c is checks for c in self._unchecked):
            self._unchecked.append(checks)

    def _run_checks(self) -> None:
        """Run the deferred checks recorded by this layer's calls (raises their ValueError)."""
        for c in self._unchecked:
            c.check()
        self._unchecked = []

    # ------------------------------------------------------------------ 6.3 flush

    def _due(self) -> int:
        """Tokens the next :meth:`flush` quantizes (``flushed_length`` of the residual)."""
        blk, r = self.block, self.config.residual_length
        if self._rlen < r + blk:
            return 0
        return blk * ((self._rlen - r) // blk)

    def _check_flushable(self) -> None:
        """Raise ``RuntimeError`` if :meth:`flush` would reach a pending token."""
        n = self._due()
        resolved = self._rlen - self._npending
        if n > resolved:
            raise RuntimeError(f"{_FLUSH_PENDING_MESSAGE}: flushing {n} residual tokens needs "
                               f"their status, but only {resolved} are resolved")

    def flush(self) -> int:
        """Move whole token blocks from the residual to the quantized/preserved stores (6.3).

        While ``num_residual - blk >= R`` the oldest ``blk`` tokens form a block;
        tokens with status "preserve" are admitted to the preserved store up to
        ``config.max_preserved`` per row (earliest first), the others are
        quantized, padding and admitted tokens excluded from the statistics.
        All due blocks are quantized by one call of ``quantize_packed`` (blocks
        are independent, so this equals quantizing them one by one).  Raises
        ``RuntimeError`` (and changes nothing) if a token that would be flushed
        is pending.  Returns the number of blocks flushed.
        """
        if self._shape is None:
            return 0
        self._check_flushable()
        m = self._due()
        if m == 0:
            return 0
        if self._unchecked:                 # never quantize tokens whose deferred checks failed
            self._run_checks()
        blk = self.block
        b, h, d = self._shape
        c = self.config
        lo, hi = self._roff, self._roff + m
        k = self._rk[:, :, lo:hi]
        v = self._rv[:, :, lo:hi]
        valid = self._rvalid[:, lo:hi]
        flags = self._rpres[:, lo:hi]
        if c.max_preserved is not None:              # admit_preserved (definition 6.7)
            rank = torch.cumsum(flags, dim=1) + self._pcount[:, None]
            flags = flags & (rank <= c.max_preserved)
        coded = valid & ~flags
        if self.kvquant:
            # one block at a time (definition 6.21); before the preserved store changes nothing
            new_blocks = [self._quantize_kvquant_block(lo + j, coded[:, j:j + blk], self._rstart + j)
                          for j in range(0, m, blk)]
        else:
            exclude = (~coded)[:, None, :].expand(b, h, m)
            pk = quantize_packed(k, c.key_bits, c.key_group_size, c.key_axis,
                                 symmetric=self.symmetric, exclude=exclude)
            pv = quantize_packed(v, c.value_bits, c.value_group_size, c.value_axis,
                                 symmetric=self.symmetric, exclude=exclude)
        positions = torch.arange(self._rstart, self._rstart + m, dtype=torch.int64, device=self.device)
        # preserved store; the one device->host sync of a flush: (largest count, tokens admitted)
        n_new = flags.sum(dim=1)
        new_count = self._pcount + n_new
        need, added = torch.stack([new_count.max(), n_new.sum()]).tolist()
        if added:
            self._ensure_preserved_capacity(need)
            slot = torch.cumsum(flags, dim=1) - 1 + self._pcount[:, None]
            slot = torch.where(flags, slot, torch.full_like(slot, self._pcap))   # scratch column
            idx = slot[:, None, :, None].expand(b, h, m, d)
            self._pk.scatter_(2, idx, k)
            self._pv.scatter_(2, idx, v)
            self._ppos.scatter_(1, slot, positions.expand(b, m).contiguous())
            self._ppos[:, self._pcap] = -1
            self._pcount = new_count
            self._pused = max(self._pused, need)
        # quantized store
        if self.kvquant:
            self._kvq_blocks.extend(new_blocks)
            self._block_starts.extend(range(self._rstart, self._rstart + m, blk))
            self._block_slots.extend([blk] * (m // blk))
            self._nq += m
            self._roff += m
            self._rlen -= m
            self._rstart += m
            self._shrink_residual()
            return m // blk
        q0 = self._nq
        self._ensure_quantized_capacity(q0 + m)
        self._kw[:, :, q0:q0 + m].copy_(pk.words)
        self._vw[:, :, q0:q0 + m].copy_(pv.words)
        for axis, s_buf, z_buf, p in ((c.key_axis, self._ks, self._kz, pk),
                                      (c.value_axis, self._vs, self._vz, pv)):
            r0, r1 = (q0 // blk, (q0 + m) // blk) if axis == "channel" else (q0, q0 + m)
            s_buf[:, :, r0:r1].copy_(p.scale)
            if z_buf is not None:
                z_buf[:, :, r0:r1].copy_(p.zero)
        self._qpos[:, q0:q0 + m] = torch.where(coded, positions, torch.full_like(positions, -1))
        self._qcoded[:, q0:q0 + m] = coded
        self._block_starts.extend(range(self._rstart, self._rstart + m, blk))
        self._block_slots.extend([blk] * (m // blk))
        self._nq = q0 + m
        # residual window: advance its start (no copy); shrink a buffer left large by a prefill
        self._roff += m
        self._rlen -= m
        self._rstart += m
        self._shrink_residual()
        return m // blk

    def _quantize_kvquant_block(self, lo: int, coded: torch.Tensor, start: int) -> "KVQuantCacheBlock":
        """The block of residual buffer slots ``[lo, lo + blk)`` (definition 6.21)."""
        blk = self.block
        k = self._rk[:, :, lo:lo + blk]
        v = self._rv[:, :, lo:lo + blk]
        rope = self._rrope[:, lo:lo + blk].clone()
        if self.rope_inv_freq is None:
            pre = k.to(_F32)
        else:
            pre = _kvq.unapply_rope(k, rope[:, None, :], self.rope_inv_freq)
        block = _kvq.quantize_block_kvquant(pre, v, self.kvquant_calibration, self.config,
                                            exclude=~coded)
        return KVQuantCacheBlock(start=start, num_slots=blk, coded=coded.clone(), rope_positions=rope,
                                 keys=PackedKVQuantTensor.pack(block.keys),
                                 values=PackedKVQuantTensor.pack(block.values),
                                 inv_freq=self.rope_inv_freq)

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
        if isinstance(max_length, (bool, np.bool_)) or not isinstance(max_length, numbers.Integral):
            raise TypeError(f"max_length must be an int, got {max_length!r}")
        length = self.seq_length
        max_length = int(max_length)
        if max_length < 0:
            if length + max_length < 0:
                raise ValueError(f"max_length={max_length} drops more than the {length} slots "
                                 "the cache holds")
            max_length = length + max_length
        if self._shape is None or max_length >= length:
            return
        # quantized store: drop blocks starting at or after max_length, shorten a straddling one
        kept = sum(1 for s in self._block_starts if s < max_length)
        del self._block_starts[kept:]
        del self._block_slots[kept:]
        if kept:
            self._block_slots[-1] = min(self._block_slots[-1], max_length - self._block_starts[-1])
        if self.kvquant:
            del self._kvq_blocks[kept:]
            if kept:
                self._kvq_blocks[-1] = self._kvq_blocks[-1].with_slots(self._block_slots[-1])
        self._nq = kept * self.block
        if self._qpos is not None:
            self._qpos[:, self._nq:] = -1
            self._qcoded[:, self._nq:] = False
            self._qpos.masked_fill_(self._qpos >= max_length, -1)
        # preserved store: positions are sorted per row, so the dropped entries are a suffix
        if self._pused:
            gone = self._ppos >= max_length
            self._ppos.masked_fill_(gone, -1)
            self._pk.masked_fill_(gone[:, None, :, None], 0)
            self._pv.masked_fill_(gone[:, None, :, None], 0)
            self._pcount = (self._ppos >= 0).sum(dim=1)
            self._pused = int(self._pcount.max())
        # residual
        keep_res = max(0, max_length - self._rstart)
        dropped = self._rlen - keep_res
        self._rlen = keep_res
        self._npending = max(0, self._npending - dropped)
        self._rstart = min(self._rstart, max_length)

    # ------------------------------------------------------------------ 6.15 batch rows

    def _take_rows(self, idx: torch.Tensor) -> None:
        """Gather every per-row tensor along the batch axis with ``idx`` (int64 on the device)."""
        for name in ("_kw", "_ks", "_kz", "_vw", "_vs", "_vz", "_qpos", "_qcoded", "_pk", "_pv", "_ppos",
                     "_pcount", "_rk", "_rv", "_rvalid", "_rpres", "_rrope"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx))
        self._kvq_blocks = [blk.take_rows(idx) for blk in self._kvq_blocks]
        self._shape = (int(idx.shape[0]),) + self._shape[1:]
        self._pused = int(self._pcount.max()) if self._pused else 0

    def _check_index(self, name: str, indices, length: Optional[int]) -> torch.Tensor:
        if isinstance(indices, np.ndarray):
            if indices.dtype == np.bool_ or not np.issubdtype(indices.dtype, np.integer):
                raise TypeError(f"{name} must be an integer array of row indices, got dtype {indices.dtype}")
            indices = torch.from_numpy(indices.astype(np.int64))
        elif isinstance(indices, (list, tuple)):
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_))
                       for i in indices):
                raise TypeError(f"{name} must be an integer array of row indices, got {indices!r}")
            indices = torch.tensor([int(i) for i in indices], dtype=torch.int64)
        if not isinstance(indices, torch.Tensor) or indices.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be an integer array of row indices, got dtype "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if indices.dim() != 1:
            raise ValueError(f"{name} must be 1-dimensional, got shape {tuple(indices.shape)}")
        if length is not None and indices.shape[0] != length:
            raise ValueError(f"{name} must have length B={length} (one source row per row), "
                             f"got {indices.shape[0]}")
        if indices.shape[0] == 0:
            raise ValueError(f"{name} must select at least one row")
        batch = self._shape[0]
        idx = indices.to(device=self.device, dtype=torch.int64)
        if bool(((idx < 0) | (idx >= batch)).any()):
            raise ValueError(f"{name} must hold row indices in [0, {batch}), got {idx.tolist()}")
        return idx

    def reorder(self, beam_idx) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` (definition 6.15).

        ``beam_idx``: int ``(B,)`` with values in ``[0, B)`` (repeats allowed).
        """
        if self._shape is None:
            return
        self._take_rows(self._check_index("beam_idx", beam_idx, self._shape[0]))

    def select_batch(self, indices) -> None:
        """Keep rows ``indices`` (in that order); ``B`` becomes ``len(indices)`` (definition 6.15)."""
        if self._shape is None:
            return
        self._take_rows(self._check_index("indices", indices, None))

    def reset(self) -> None:
        """Empty the cache; ``B``, ``H``, ``D`` are forgotten (definition 6.16)."""
        self._clear()

    # ------------------------------------------------------------------ views (tests, CPU use)

    def _side(self, side: str, t0: int, t1: int) -> PackedQuantizedTensor:
        """Keys ("k") or values ("v") of buffer slots ``[t0, t1)`` (multiples of the block) as views."""
        c = self.config
        b, h, d = self._shape
        if side == "k":
            bits, group, axis, w, s, z = c.key_bits, c.key_group_size, c.key_axis, self._kw, self._ks, self._kz
        else:
            bits, group, axis, w, s, z = c.value_bits, c.value_group_size, c.value_axis, self._vw, self._vs, self._vz
        if w is None:
            rows, cols = self._stat_cols(axis, group, 0)
            w = torch.zeros((b, h, 0, packed_length(d, bits)), dtype=WORD_DTYPE, device=self.device)
            s = torch.zeros((b, h, rows, cols), dtype=_F32, device=self.device)
            z = None if self.symmetric else s.clone()
            return PackedQuantizedTensor(words=w, scale=s, zero=z, bits=bits, group_size=group, axis=axis,
                                         symmetric=self.symmetric, shape=(b, h, 0, d))
        r0, r1 = (t0 // self.block, t1 // self.block) if axis == "channel" else (t0, t1)
        return PackedQuantizedTensor(words=w[:, :, t0:t1], scale=s[:, :, r0:r1],
                                     zero=None if z is None else z[:, :, r0:r1], bits=bits,
                                     group_size=group, axis=axis, symmetric=self.symmetric,
                                     shape=(b, h, t1 - t0, d))

    def _attend_side(self, side: str, t1: int) -> PackedQuantizedTensor:
        """``_side(side, 0, t1)`` for :meth:`attend`, reused while the buffers and ``t1`` stay
        the same (on CUDA ``t1`` is the capacity, so between reallocations: building and
        validating the views costs host time on every layer and step)."""
        buffers = (self._kw, self._ks, self._kz) if side == "k" else (self._vw, self._vs, self._vz)
        hit = self._views.get(side)
        if hit is not None and hit[0] == t1 and all(a is b for a, b in zip(hit[1], buffers)):
            return hit[2]
        view = self._side(side, 0, t1)
        self._views[side] = (t1, buffers, view)
        return view

    def _slot_positions(self) -> torch.Tensor:
        """int64 ``(B, nq)``: position of every buffer slot of the quantized store, -1 = empty."""
        if self.kvquant:
            if not self._kvq_blocks:
                return torch.zeros((self._shape[0], 0), dtype=torch.int64, device=self.device)
            return torch.cat([blk.positions() for blk in self._kvq_blocks], dim=1)
        if self._qpos is None:
            return torch.zeros((self._shape[0], 0), dtype=torch.int64, device=self.device)
        return self._qpos[:, :self._nq]

    @property
    def blocks(self) -> List["QuantizedBlock"]:
        """The quantized store as a list of :class:`QuantizedBlock` (views of the buffers).

        Same contents as the reference's ``blocks``: ``start``, ``num_slots``
        (``k``, fewer than ``blk`` after a crop cut the block), ``coded`` bool
        ``(B, blk)`` as flushed, and the packed keys/values of the block's
        ``blk`` code slots.
        """
        if self._shape is None:
            return []
        if self.kvquant:
            return list(self._kvq_blocks)
        out = []
        for j, (start, k) in enumerate(zip(self._block_starts, self._block_slots)):
            t0 = j * self.block
            out.append(QuantizedBlock(start=start, num_slots=k,
                                      coded=self._qcoded[:, t0:t0 + self.block],
                                      keys=self._side("k", t0, t0 + self.block),
                                      values=self._side("v", t0, t0 + self.block)))
        return out

    @property
    def quantized_keys(self) -> PackedQuantizedTensor:
        """The quantized store's keys as stored: packed ``(B, H, Tbuf, D)`` views of the buffers.

        ``Tbuf = len(blocks) * token_block`` buffer slots (a cropped block keeps
        its ``blk`` codes); :attr:`quantized_slot_positions` gives each slot's
        position (-1 = empty).  This is what :meth:`attend` reads.  Uniform
        quantizer only (kvquant: :attr:`blocks`).
        """
        self._require_data()
        self._require_uniform("quantized_keys")
        return self._side("k", 0, self._nq)

    @property
    def quantized_values(self) -> PackedQuantizedTensor:
        """As :attr:`quantized_keys`, for the values."""
        self._require_data()
        self._require_uniform("quantized_values")
        return self._side("v", 0, self._nq)

    def _require_uniform(self, what: str) -> None:
        if self.kvquant:
            raise AttributeError(f"{what}: the kvquant store is a list of blocks (.blocks), not "
                                 "packed uniform buffers")

    @property
    def quantized_slot_positions(self) -> torch.Tensor:
        """int64 ``(B, Tbuf)``: position of each buffer slot of :attr:`quantized_keys`, -1 = empty."""
        self._require_data()
        return self._slot_positions()

    @property
    def preserved(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The preserved store: ``(positions (B, P), keys (B, H, P, D), values (B, H, P, D))`` (views).

        ``P`` = the largest count over rows; ``-1`` positions (and zero keys and
        values) pad the rows holding fewer.
        """
        self._require_data()
        p = self._pused
        return self._ppos[:, :p], self._pk[:, :, :p], self._pv[:, :, :p]

    @property
    def residual(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual: ``(keys (B, H, r, D), values, valid (B, r), preserve (B, r))`` (views)."""
        self._require_data()
        lo, hi = self._roff, self._roff + self._rlen
        return self._rk[:, :, lo:hi], self._rv[:, :, lo:hi], self._rvalid[:, lo:hi], self._rpres[:, lo:hi]

    @property
    def residual_rope_positions(self) -> torch.Tensor:
        """kvquant: int32 ``(B, r)``, the residual tokens' rotary positions (0 at padding)."""
        self._require_data()
        if not self.kvquant:
            raise AttributeError("residual_rope_positions: only the kvquant quantizer stores "
                                 "rotary positions")
        return self._rrope[:, self._roff:self._roff + self._rlen]

    def _dequantized_kvquant(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """kvquant: float32 keys (RoPE re-applied) and values of every code slot, ``(B, H, Q, D)``."""
        b, h, d = self._shape
        if not self._kvq_blocks:
            z = torch.zeros((b, h, 0, d), dtype=_F32, device=self.device)
            return z, z.clone()
        parts = [blk.dequantize() for blk in self._kvq_blocks]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)

    def _residual_positions(self) -> torch.Tensor:
        lo, hi = self._roff, self._roff + self._rlen
        pos = torch.arange(self._rstart, self._rstart + self._rlen, dtype=torch.int64, device=self.device)
        return torch.where(self._rvalid[:, lo:hi], pos, _att.const_like(-1, pos))

    def preserved_positions(self) -> List[torch.Tensor]:
        """Per row, the sorted int64 positions of its preserved-store tokens (CPU tensors)."""
        if self._shape is None:
            return []
        pos = self._ppos[:, :self._pused].cpu()
        return [row[row >= 0].clone() for row in pos]

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
        if self._shape is None:
            return []
        if self.kvquant:
            keys, values = self._dequantized_kvquant()
        else:
            keys = dequantize(self._side("k", 0, self._nq))
            values = dequantize(self._side("v", 0, self._nq))
        pos = self._slot_positions()
        ppos, pk, pv = self.preserved
        rk, rv, _, _ = self.residual
        return [(keys, values, pos.clone()),
                (pk.clone(), pv.clone(), ppos.clone()),
                (rk.clone(), rv.clone(), self._residual_positions())]

    # ------------------------------------------------------------------ 6.13 attention

    def attend(self, query, query_positions, scale=None, *, block_size: int = 256,
               use_kernel: Optional[bool] = None, checks: Optional[DeferredChecks] = None,
               shared: Optional[dict] = None) -> torch.Tensor:
        """Attention of ``query`` over the cache (definition 6.13), float32 ``(B, Hq, Tq, D)``.

        The quantized store is read from its packed form, ``block_size`` slots at
        a time (:func:`accelerated.attention.quantized_segment_attention`: the
        Triton kernel on CUDA, ``use_kernel`` as there); the preserved store and
        the residual are attended at full precision; the three partial results
        are merged with the log-sum-exp rule (Definition 5.5).  Equals the
        reference's ``split_attention(query, segments(), ...)`` within
        docs/09-tolerances.md §9.3.  Key ``s`` is visible to query ``t`` iff its
        slot is not empty and its position is ``<= query_positions[b, t]``.
        A query holding NaN or Inf raises ``ValueError`` (one device->host
        synchronisation), or, with ``checks`` (a :class:`DeferredChecks`), is
        recorded there and raised by its ``check()``.

        ``shared``: None, or a dict the caller passes to the ``attend`` of several
        layers that hold the same slots (same residual positions and validity, same
        preserved positions: e.g. every layer of one model forward step, which all
        received the same updates, statuses and flushes) with the same
        ``query_positions``: the visibility masks of the preserved and residual
        segments are then computed by the first of them and reused (keyed by device,
        window and counts), instead of once per layer.  The caller guarantees that the
        layers hold the same slots; a fresh dict per step.
        """
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"query must be a torch tensor (B, Hq, Tq, D), got {type(query).__name__}")
        if query.dim() != 4:
            raise ValueError(f"query must have shape (B, Hq, Tq, D), got {tuple(query.shape)}")
        if self._shape is None:
            b, hq, tq, d = query.shape
            _att.int_tensor("query_positions", query_positions, (b, tq), query.device)
            _att.check_scale(scale, d)
            return torch.zeros(query.shape, dtype=_F32, device=query.device)
        b, h, d = self._shape
        if query.shape[0] != b or query.shape[3] != d:
            raise ValueError(f"query must have shape (B={b}, Hq, Tq, D={d}), got {tuple(query.shape)}")
        # the finiteness of the query is checked once: recorded in `checks`, or by
        # quantized_segment_attention when there is a quantized part, here otherwise (each
        # eager check is a device->host sync)
        if checks is not None:
            checks.finite(query, "query contains NaN or Inf; pass finite values")
        q = _att.float_tensor("query", query.to(self.device), 4,
                               check_finite=checks is None and (self._nq == 0 or self.kvquant))
        _att.check_heads(q.shape[1], h)
        qp = _att.int_tensor("query_positions", query_positions, (b, q.shape[2]), self.device)
        sc = _att.check_scale(scale, d)
        parts = []
        if self._nq and self.kvquant:
            kq, vq = self._dequantized_kvquant()
            parts.append(_att.segment_partial(q, kq, vq, qp, self._slot_positions(), None, sc, block_size))
        elif self._nq:
            # The Triton kernel reads contiguous (B, H, T, W) words: hand it the whole buffers
            # (contiguous; slots beyond the used ones have position -1 and are masked) rather
            # than the used prefix, a strided view it would copy on every call.
            kernel = use_kernel is not False and _att.attention_kernel_usable(q)
            t1 = self._qcap if kernel else self._nq
            parts.append(_att.quantized_segment_attention(
                q, self._attend_side("k", t1), self._attend_side("v", t1), query_positions=qp,
                key_positions=self._qpos[:, :t1], scale=sc, block_size=block_size,
                use_kernel=use_kernel, check_query=checks is None))
        # full-precision segments: already checked finite on update; no re-check here
        if self._pused:
            ppos, pk, pv = self.preserved
            vis = self._shared_visibility(shared, "preserved", qp, lambda: ppos)
            parts.append(_att.segment_partial(q, pk.to(_F32), pv.to(_F32), qp, ppos, None, sc, block_size,
                                       vis=vis))
        if self._rlen:
            rk, rv, _, _ = self.residual
            vis = self._shared_visibility(shared, "residual", qp, self._residual_positions)
            parts.append(_att.segment_partial(q, rk.to(_F32), rv.to(_F32), qp, None if vis is not None
                                       else self._residual_positions(), None, sc, block_size, vis=vis))
        if not parts:
            return torch.zeros(q.shape, dtype=_F32, device=self.device)
        if len(parts) == 1:
            return _att.normalise(*parts[0])
        return _att.normalise(*_att.merge_raw(parts))

    def _shared_visibility(self, shared: Optional[dict], segment: str, qp: torch.Tensor, positions):
        """The segment's visibility (bool ``(B, Tq, S)``) from ``shared`` or made and stored there;
        None without ``shared`` (``_partial`` then computes it block by block)."""
        if shared is None:
            return None
        key = (segment, self.device, self._rstart, self._rlen, self._pused, tuple(qp.shape))
        vis = shared.get(key)
        if vis is None:
            vis = _att.visibility(qp, positions())
            shared[key] = vis
        return vis

    # ------------------------------------------------------------------ 6.17 bytes

    def nbytes(self) -> int:
        """Exact bytes held by the spec's count (definition 6.17), equal to the reference's.

        ``sum over blocks (4*words + 4*scale + 4*zero, keys and values, + B*blk)``
        ``+ 2*B*H*P*D*itemsize + 8*B*P``  (preserved store)
        ``+ 2*B*H*r*D*itemsize + B*r + B*r``  (residual, valid, statuses).

        The buffers' spare capacity is not counted (see :meth:`allocated_bytes`).
        """
        if self._shape is None:
            return 0
        b, h, d = self._shape
        c = self.config
        esize = torch.empty((), dtype=self.dtype).element_size()
        p, r = self._pused, self._rlen
        if self.kvquant:                      # definition 6.22
            total = sum(blk.nbytes for blk in self._kvq_blocks)
            total += 2 * b * h * p * d * esize + 8 * b * p
            total += 2 * b * h * r * d * esize + b * r + b * r + 4 * b * r
            return int(total + self.kvquant_calibration.nbytes)
        nb = len(self._block_starts)
        slots = nb * self.block                                   # codes held (cropped blocks keep theirs)
        total = 0
        for bits, axis, group in ((c.key_bits, c.key_axis, c.key_group_size),
                                  (c.value_bits, c.value_axis, c.value_group_size)):
            total += 4 * b * h * slots * packed_length(d, bits)
            rows, cols = self._stat_cols(axis, group, slots)
            total += 4 * b * h * rows * cols * (1 if self.symmetric else 2)
        total += b * slots                                        # coded flags (B * blk per block)
        total += 2 * b * h * p * d * esize + 8 * b * p
        total += 2 * b * h * r * d * esize + b * r + b * r
        return int(total)

    def allocated_bytes(self) -> int:
        """Bytes the buffers occupy, spare capacity included.

        Differs from :meth:`nbytes` by the buffers' spare capacity (quantized
        slots, preserved columns and residual slots allocated ahead, the
        preserved store's scratch column), the per-slot int64 positions of the
        quantized store kept beside its ``coded`` flags (so that attention
        reads them directly) and the int64 preserved counts.
        """
        return int(sum(t.numel() * t.element_size() for t in self._tensors()))

    def _tensors(self) -> List[torch.Tensor]:
        """Every tensor the layer holds (memory accounting, tests)."""
        out = [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        for blk in self._kvq_blocks:
            out += blk.tensors()
        if self.kvquant_calibration is not None:
            cal = self.kvquant_calibration
            out += [cal.key_lower, cal.key_upper]
            if cal.datatype == "kmeans":
                out += [cal.key_levels, cal.value_levels]
        return out

    def __repr__(self) -> str:
        return (f"QuantizedKVCacheLayer(dims={self._shape}, quantized={self.num_quantized}, "
                f"blocks={len(self._block_starts)}, preserved={self._pused}, "
                f"residual={self._rlen}, pending={self._npending}, device={self.device}, dtype={self.dtype})")


def _check_kvquant_calibration(calibration, config: KVSinkConfig):
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


def _check_rope_inv_freq(inv_freq) -> Optional[torch.Tensor]:
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


def _take_rows_outliers(index: torch.Tensor, value: torch.Tensor, per_row: int, idx: torch.Tensor):
    """COO outliers of ``(B, ...)`` re-numbered for rows ``idx`` (row ``i`` = old row ``idx[i]``)."""
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
        oi, ov = _take_rows_outliers(self.outlier_index, self.outlier_value, per_row, idx)
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


class KVQuantCacheBlock:
    """One flushed block with ``quantizer="kvquant"`` (docs/06-cache.md 6.21; twin of the reference's).

    ``start``, ``num_slots``, ``coded`` bool ``(B, n)`` as :class:`QuantizedBlock`;
    ``rope_positions`` int32 ``(B, n)``; ``keys`` (pre-RoPE) and ``values``
    :class:`PackedKVQuantTensor` ``(B, H, n, D)``; ``inv_freq`` float32 ``(D/2,)`` or None.
    """

    __slots__ = ("start", "num_slots", "coded", "rope_positions", "keys", "values", "inv_freq")

    def __init__(self, start, num_slots, coded, rope_positions, keys, values, inv_freq):
        self.start, self.num_slots, self.coded, self.rope_positions = start, num_slots, coded, rope_positions
        self.keys, self.values, self.inv_freq = keys, values, inv_freq

    @property
    def num_codes(self) -> int:
        return int(self.coded.shape[1])

    def positions(self) -> torch.Tensor:
        """int64 ``(B, n)``: ``start + j`` at live slots, ``-1`` at the others."""
        return _block_positions(self.start, self.num_slots, self.coded)

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


class QuantizedBlock:
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

    @property
    def num_codes(self) -> int:
        """``n``: token slots whose codes the block holds (``>= num_slots``)."""
        return int(self.coded.shape[1])

    def positions(self) -> torch.Tensor:
        """int64 ``(B, n)``: ``start + j`` at live slots, ``-1`` at the others."""
        return _block_positions(self.start, self.num_slots, self.coded)

    def __repr__(self) -> str:
        return f"QuantizedBlock(start={self.start}, num_slots={self.num_slots}, num_codes={self.num_codes})"


class QuantizedKVCache(_rcache.QuantizedKVCache):
    """One :class:`QuantizedKVCacheLayer` per decoder layer, operated together (definition 6.18).

    ``update`` is per layer; ``resolve``, ``flush``, ``crop``, ``reorder``,
    ``select_batch`` and ``reset`` apply to every layer; ``nbytes`` is the sum.
    The per-layer loops are the reference's (``reference.cache.QuantizedKVCache``);
    this class builds torch layers and adds the torch-side arguments.
    """

    def __init__(self, config: KVSinkConfig, num_layers: int, *, dtype=torch.float32, device=None,
                 kvquant_calibration=None, rope_inv_freq=None):
        self.config = config
        self.layers = [QuantizedKVCacheLayer(config, dtype=dtype, device=device, kvquant_calibration=cal,
                                             rope_inv_freq=rope_inv_freq)
                       for cal in _rcache.layer_calibrations(kvquant_calibration, num_layers)]

    def update(self, layer_idx: int, keys, values, valid=None, rope_positions=None, *,
               checks: Optional[DeferredChecks] = None) -> None:
        """:meth:`QuantizedKVCacheLayer.update` of layer ``layer_idx``."""
        self.layers[self._check_layer(layer_idx)].update(keys, values, valid, rope_positions,
                                                         checks=checks)

    def resolve(self, preserve) -> None:
        """Resolve the pending tokens of every layer with the same ``preserve`` (B, n_pending).

        All layers must hold the same number of pending tokens; everything is
        checked before any layer changes.
        """
        counts = {layer.num_pending for layer in self.layers}
        if len(counts) != 1:
            raise RuntimeError(f"layers hold different numbers of pending tokens {sorted(counts)}; "
                               "update every layer before resolve()")
        for layer in self.layers:        # validate everywhere first: all or nothing
            if layer.batch_size is not None:
                flags = layer._check_mask("preserve", preserve, (layer.batch_size, layer.num_pending))
                _, _, valid, _ = layer.residual
                if layer.num_pending and bool((flags & ~valid[:, valid.shape[1] - layer.num_pending:]).any()):
                    raise ValueError("preserve marks a padding token; padding is never "
                                     "preserved: pass preserve & valid")
        for layer in self.layers:
            layer.resolve(preserve)

    def flush(self) -> int:
        """Flush every layer (checked for pending tokens first); returns the total blocks flushed."""
        for layer in self.layers:
            if layer.batch_size is not None:
                layer._check_flushable()
        return sum(layer.flush() for layer in self.layers)

    def attend(self, layer_idx: int, query, query_positions, scale=None, **kwargs) -> torch.Tensor:
        return self.layers[self._check_layer(layer_idx)].attend(query, query_positions, scale, **kwargs)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)
