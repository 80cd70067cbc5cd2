"""Argument checks of the streaming cache (torch twin of ``reference/cache_checks.py``).

Each check raises the error the cache's methods document, naming the argument
and the fix.  :class:`DeferredChecks` (accelerated only) gathers the value
checks as device flags and reads them with one device->host synchronisation
(docs/11-transformers.md §11.3 "Validation").
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["DeferredChecks", "FLOAT_DTYPES", "INDEX_DTYPES", "NONFINITE_MESSAGE", "check_storage_dtype",
           "check_kv_shapes", "convert_kv", "check_mask", "check_index", "is_int", "padding_message",
           "overflow_message", "read_values", "check_all"]

#: Floating dtypes the cache accepts for keys, values and its storage.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Integer dtypes accepted for row indices and rotary positions.
INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: The error of a key or value holding NaN or Inf.
NONFINITE_MESSAGE = {name: f"{name} contains NaN or Inf; the cache stores finite values only"
                     for name in ("keys", "values")}


class DeferredChecks:
    """Input validation gathered as device flags and read with ONE device->host synchronisation.

    Each eager check of :meth:`QuantizedKVCacheLayer.update`, ``resolve`` and ``attend``
    (K/V and query finite, no preserve flag on padding, kvquant rotary positions in range) reads a
    device flag on the host: one synchronisation per call, i.e. several per layer and decode step
    inside a model.  Given ``checks=DeferredChecks()``, those methods record the flag here instead
    (a reduction kernel, no synchronisation; the keys and values of an update that converts
    nothing not even that: :meth:`finite_slots` tests them from the residual window when read),
    and :meth:`check` reads all recorded flags at once
    (one synchronisation per device) and raises the ``ValueError`` the eager check would have
    raised first, with the same message.

    Semantics: until :meth:`check` has run, the recorded calls have *already* changed the cache
    (tokens appended, statuses set), so a failed check means: discard the cache (``reset()``); a
    ``crop`` or row selection does not hide it (the slot checks are evaluated before the tokens
    go).  A layer never stores unchecked tokens: its :meth:`~QuantizedKVCacheLayer.flush` calls
    :meth:`check` of the checks its updates recorded to before it changes anything (and raises,
    changing nothing, if they failed), reading its own values in the same transfer
    (``check(extra=...)``, ``accelerated/cache_flush.py``).  :meth:`check` is idempotent: after
    the first call it raises the same error again, or returns at once.  One object may gather the
    checks of many calls (``KVSinkCache`` keeps one from flush to flush): :meth:`pack` folds those
    recorded so far into one tensor per device.
    """

    __slots__ = ("_flags", "_later", "_packed", "_bad", "_messages", "_error", "_checked")

    def __init__(self):
        self._flags: list = []       # (0-d tensor, index) recorded since the last pack()
        self._later: list = []       # (source, side, first, n, index): slot checks not evaluated yet
        self._packed: list = []      # (1-D tensor, [index per element]): flags folded or evaluated
        self._bad: List[bool] = []   # per check: False: bad if not finite; True: bad if non-zero
        self._messages: list = []    # per check: str, or a callable building it (may sync)
        self._error: Optional[str] = None
        self._checked = False

    def __len__(self) -> int:
        return len(self._bad)

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

    def finite_slots(self, source, side: str, first: int, n: int, message) -> None:
        """Record "the tokens at positions ``first .. first + n - 1`` of ``source``'s ``side`` are
        finite" with no operation now: the test is made from ``source.slot_max_abs(side, lo, hi)``
        (float ``(hi - lo,)``, max ``|x|`` per position, NaN and Inf propagating) when the checks
        are read or :meth:`materialize`-d, one reduction for a run of one-token records (decode
        steps).  ``source`` must hold those tokens until then (or call :meth:`materialize`
        before it drops or reorders them)."""
        if n:
            self._later.append((source, side, int(first), int(n), self._index(False, message)))

    def none_true(self, flags: torch.Tensor, message) -> None:
        """Record "no element of the bool tensor ``flags`` is True" (``message``: str or a
        callable returning it, called only on failure)."""
        if flags.numel():
            self._add(flags.any(), True, message)

    def _index(self, nonzero_is_bad: bool, message) -> int:
        if self._checked:
            raise RuntimeError("DeferredChecks.check() has run already: use a new DeferredChecks "
                               "for new calls")
        self._bad.append(nonzero_is_bad)
        self._messages.append(message)
        return len(self._bad) - 1

    def _add(self, flag: torch.Tensor, nonzero_is_bad: bool, message) -> None:
        self._flags.append((flag, self._index(nonzero_is_bad, message)))

    @property
    def checked(self) -> bool:
        return self._checked

    def pack(self) -> None:
        """Stack the flags recorded since the last pack into one tensor per device (one operation
        each, no synchronisation), so that checks gathered over many steps stay a few tensors."""
        by_device = {}
        for flag, i in self._flags:
            by_device.setdefault(flag.device, []).append((flag, i))
        for parts in by_device.values():
            self._packed.append((torch.stack([f for f, _ in parts]), [i for _, i in parts]))
        self._flags = []

    def materialize(self, source=None) -> None:
        """Evaluate now (device operations, no synchronisation) the slot checks of ``source`` (of
        every source if None): a source calls it before it drops or reorders tokens."""
        todo, keep = {}, []
        for entry in self._later:
            if source is None or entry[0] is source:
                todo.setdefault((id(entry[0]), entry[1]), []).append(entry)
            else:
                keep.append(entry)
        self._later = keep
        for entries in todo.values():
            self._evaluate(entries)

    def _evaluate(self, entries: list) -> None:
        """One reduction per run of contiguous one-token records, one per longer record."""
        run: list = []
        for entry in entries + [None]:
            if entry is not None and entry[3] == 1 and (not run or run[-1][2] + 1 == entry[2]):
                run.append(entry)
                continue
            if run:
                src, side, lo = run[0][:3]
                self._packed.append((src.slot_max_abs(side, lo, run[-1][2] + 1), [e[4] for e in run]))
                run = []
            if entry is not None and entry[3] == 1:
                run = [entry]
            elif entry is not None:
                src, side, lo, n, i = entry
                per_slot = src.slot_max_abs(side, lo, lo + n)
                self._packed.append((torch.linalg.vector_norm(per_slot, math.inf).reshape(1), [i]))

    def _pending(self) -> List[torch.Tensor]:
        """The recorded flags, evaluated and packed on the device (no synchronisation), in the
        order :meth:`_judge` takes their values."""
        self.materialize()
        self.pack()
        return [flags for flags, _ in self._packed]

    def _judge(self, values: Sequence[float]) -> None:
        """Record the first failed check (recording order) of the :meth:`_pending` flags'
        ``values`` (flattened, in order); the object is checked from now on."""
        flags = [0.0] * len(self._bad)
        at = 0
        for t, idx in self._packed:
            for i, v in zip(idx, values[at:at + t.numel()]):
                flags[i] = v
            at += t.numel()
        for v, nonzero_is_bad, message in zip(flags, self._bad, self._messages):
            if (v != 0) if nonzero_is_bad else not math.isfinite(v):
                self._error = message() if callable(message) else message
                break
        self._checked = True
        self._packed = []                 # nothing to hold on to any more

    def check(self, extra: Sequence[torch.Tensor] = ()) -> List[float]:
        """Read every recorded flag (one synchronisation per device holding some) and raise the
        ``ValueError`` of the first failed check in recording order; idempotent.

        ``extra``: tensors read in the same transfer (a flush's counts and its quantize kernels'
        flags); their values, flattened in order, are returned (integers exactly, up to 2**53)."""
        return check_all([self], extra)


def check_all(checks: Sequence[DeferredChecks], extra: Sequence[torch.Tensor] = ()) -> List[float]:
    """:meth:`DeferredChecks.check` of every object in ``checks`` (repeats ignored) with the
    ``extra`` tensors, all read in ONE transfer (one synchronisation per device); raises the error
    of the first object in order that failed, after every one is read.  Returns the ``extra``
    values, flattened in order."""
    checks = list({id(c): c for c in checks}.values())
    todo = [(c, c._pending()) for c in checks if not c._checked]
    parts = [t for _, pending in todo for t in pending]
    values = read_values(parts + list(extra))
    at = 0
    for c, pending in todo:
        n = sum(t.numel() for t in pending)
        c._judge(values[at:at + n])
        at += n
    for c in checks:
        if c._error is not None:
            raise ValueError(c._error)
    return values[at:]


def read_values(tensors: Sequence[torch.Tensor]) -> List[float]:
    """The elements of ``tensors`` (any shapes and dtypes), flattened in order, as Python floats
    read with one device->host synchronisation per device (float64: integers exact up to 2**53,
    NaN and Inf kept)."""
    by_device: dict = {}
    for j, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(j)
    out: List[List[float]] = [[] for _ in tensors]
    for idx in by_device.values():
        flat = torch.cat([tensors[j].reshape(-1).to(torch.float64) for j in idx]).tolist()
        at = 0
        for j in idx:
            n = tensors[j].numel()
            out[j], at = flat[at:at + n], at + n
    return [v for part in out for v in part]


def check_storage_dtype(dtype) -> torch.dtype:
    """The storage dtype of the full-precision parts: a torch float dtype (numpy float dtypes
    are mapped to theirs)."""
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}.get(np.dtype(dtype), dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of torch.float16/bfloat16/float32/float64 (the "
                        f"full-precision storage dtype), got {dtype!r}")
    return dtype


def overflow_message(name: str, dtype: torch.dtype) -> str:
    """The error of ``name`` overflowing the storage dtype ``dtype``."""
    return (f"{name} has values outside the range of the storage dtype {dtype} "
            f"(|x| > {torch.finfo(dtype).max}); use dtype=torch.float32")


def padding_message(bad: torch.Tensor, first: int) -> str:
    """The error of a preserve flag on padding (``bad``: bool ``(B, n)``, ``first``: position of
    column 0)."""
    row, col = (int(i) for i in bad.nonzero()[0])
    return (f"preserve marks a padding token (row {row}, position {first + col}); padding is never "
            "preserved: pass preserve & valid")


def check_kv_shapes(keys, values, dims: Optional[Tuple[int, int, int]]) -> None:
    """Keys and values of an update: float torch tensors of one shape ``(B, H, n, D)``, ``B, H, D
    >= 1`` and ``(B, H, D) = dims`` unless ``dims`` is None (the cache is empty)."""
    _check_kv_types(keys, values)
    _check_dims(keys, dims)


def _check_kv_types(keys, values) -> None:
    for name, x in (("keys", keys), ("values", values)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor (B, H, n, D), got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), "
                            f"got dtype {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, n, D), got {tuple(x.shape)}")
    if keys.shape != values.shape:
        raise ValueError(f"keys and values must have the same shape (B, H, n, D), got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")


def _check_dims(keys: torch.Tensor, dims: Optional[Tuple[int, int, int]]) -> None:
    b, h, n, d = keys.shape
    if b == 0 or h == 0 or d == 0:
        raise ValueError(f"keys must have B, H, D >= 1, got shape {tuple(keys.shape)}")
    if dims is not None and (b, h, d) != dims:
        raise ValueError(f"keys of shape {tuple(keys.shape)} do not match the cache's "
                         f"(B, H, D) = {dims}; reset() the cache to change them")


def convert_kv(keys: torch.Tensor, values: torch.Tensor, device, dtype: torch.dtype,
               checks: Optional[DeferredChecks] = None, *,
               check: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Checked (:func:`check_kv_shapes`) keys and values converted to ``dtype`` on ``device``;
    their finiteness (of the inputs and after the conversion) checked here (one device->host
    sync) or recorded in ``checks``; ``check=False``: not tested here (the caller records it:
    ``QuantizedKVCacheLayer.update`` with ``checks`` and no conversion, by ``finite_slots``)."""
    k = keys.to(device=device, dtype=dtype)
    v = values.to(device=device, dtype=dtype)
    if not check:
        return k, v
    if checks is not None:                      # recorded, read later: no sync here
        for name, x, stored in (("keys", keys, k), ("values", values, v)):
            converted = stored.dtype != x.dtype
            checks.finite(x, NONFINITE_MESSAGE[name], stored=stored if converted else None,
                          overflow_message=overflow_message(name, dtype) if converted else None)
        return k, v
    if keys.shape[2] and not bool(torch.isfinite(k).all() & torch.isfinite(v).all()):   # one sync
        for name, x, stored in (("keys", keys, k), ("values", values, v)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(NONFINITE_MESSAGE[name])
            if not bool(torch.isfinite(stored).all()):
                raise ValueError(overflow_message(name, dtype))
    return k, v


def check_mask(name: str, x, shape, device) -> torch.Tensor:
    """A bool tensor (or numpy array) of ``shape``, on ``device``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor of shape {tuple(shape)}, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x.to(device)


def is_int(x) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _index_tensor(name: str, indices) -> torch.Tensor:
    if isinstance(indices, np.ndarray):
        if indices.dtype == np.bool_ or not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array of row indices, got dtype {indices.dtype}")
        indices = torch.from_numpy(indices.astype(np.int64))
    elif isinstance(indices, (list, tuple)):
        if not all(is_int(i) for i in indices):
            raise TypeError(f"{name} must be an integer array of row indices, got {indices!r}")
        indices = torch.tensor([int(i) for i in indices], dtype=torch.int64)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer array of row indices, got dtype "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    return indices


def check_index(name: str, indices, batch: int, length: Optional[int], device) -> torch.Tensor:
    """int64 row indices ``(B',)`` in ``[0, batch)`` on ``device`` (``B' = length`` unless None)."""
    indices = _index_tensor(name, indices)
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {tuple(indices.shape)}")
    if length is not None and indices.shape[0] != length:
        raise ValueError(f"{name} must have length B={length} (one source row per row), "
                         f"got {indices.shape[0]}")
    if indices.shape[0] == 0:
        raise ValueError(f"{name} must select at least one row")
    idx = indices.to(device=device, dtype=torch.int64)
    if bool(((idx < 0) | (idx >= batch)).any()):
        raise ValueError(f"{name} must hold row indices in [0, {batch}), got {idx.tolist()}")
    return idx
