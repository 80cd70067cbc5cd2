"""The adapter protocol: what a port implements so that ``pytest conformance/`` can test it.

A *port* of kvsink (another framework, another language behind bindings) is
tested by wrapping it in an object that follows :class:`Port`.  Everything
crossing the boundary is a **numpy array** (or a Python scalar), so a port in
any framework adapts with a few conversions:

* float tensors in: numpy ``float16``, ``float32`` or ``float64``.  A
  bfloat16 input is passed as a ``float32`` array whose values are exactly
  representable in bfloat16, marked with :func:`as_bfloat16` (an ``ndarray``
  subclass, so numpy ports need not notice it; :func:`is_bfloat16` lets a port
  with a native bfloat16 type convert exactly, e.g. ``torch.bfloat16``).
  The contract casts every quantizer input to float32 first, so both views of
  the input must give identical results.
* float tensors out: any floating numpy dtype; the suite compares in float64.
* codes out: ``uint8`` (unpacked, as ``reference.quantize.QuantizedTensor.codes``).
* packed words: ``uint32`` (a port that stores ``int32`` bit patterns, like
  ``accelerated/``, reinterprets them with ``.view(np.uint32)``).
* masks: ``bool``; positions and indices: any integer dtype.

Errors: a port raises ``ValueError`` or ``TypeError`` for bad input (the
suite checks a few of the contract's error cases).

Parts
-----
A port declares which parts of the contract it implements in
:attr:`Port.parts` (a subset of :data:`PARTS`).  The tests of an undeclared
part are reported as **skipped**, with the reason, never as passed.  A
declared part whose method is missing or raises ``NotImplementedError`` fails.

There are deliberately no tolerance overrides and no capability flags that
loosen a check: the tolerances are those of docs/09-tolerances.md and are the
same for every port.  ``device`` is informational (printed in the report
header).

Loading
-------
``pytest conformance/ --impl module.path:factory`` imports ``module.path`` and
calls ``factory()`` with no argument; it must return a :class:`Port`.
``--impl reference`` and ``--impl accelerated`` are the ports of this
repository (conformance/impls.py).  See docs/13-conformance.md.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

__all__ = [
    "PARTS", "Quantized", "CacheBlock", "CachePort", "Port", "as_bfloat16", "is_bfloat16",
    "round_to_bfloat16", "load_port", "check_port", "replay_cache_ops",
]

#: The parts of the contract a port may implement (docs/13-conformance.md lists the
#: methods of each part).
PARTS = (
    "packing",          # pack_codes, unpack_codes
    "quantize",         # quantize, dequantize
    "predictor",        # outlier_scores, predict_sinks
    "preserve",         # preserve_first_n, attention_oracle, cap_preserved, preserved_set
    "attention",        # attention
    "split_attention",  # split_attention
    "cache",            # make_cache -> CachePort
)

#: Methods that make up each part.
PART_METHODS = {
    "packing": ("pack_codes", "unpack_codes"),
    "quantize": ("quantize", "dequantize"),
    "predictor": ("outlier_scores", "predict_sinks"),
    "preserve": ("preserve_first_n", "attention_oracle", "cap_preserved", "preserved_set"),
    "attention": ("attention",),
    "split_attention": ("split_attention",),
    "cache": ("make_cache",),
}

#: Methods every cache object returned by ``make_cache`` has.
CACHE_METHODS = ("update", "resolve", "flush", "segments", "attend", "crop", "reorder",
                 "select_batch", "reset", "nbytes", "preserved_positions", "quantized_blocks")


# --------------------------------------------------------------------------- bfloat16 marker

class _BFloat16Values(np.ndarray):
    """A float32 array whose values are exactly representable in bfloat16 (see :func:`as_bfloat16`)."""


def round_to_bfloat16(x) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even); returns float32.

    bfloat16 is the upper 16 bits of a float32: adding ``0x7FFF + lsb`` to the
    bit pattern and clearing the low 16 bits rounds to nearest even.  Finite
    inputs only (values that round beyond the bfloat16 maximum become Inf).
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    bits = x.view(np.uint32).astype(np.uint64)
    lsb = (bits >> np.uint64(16)) & np.uint64(1)
    rounded = ((bits + np.uint64(0x7FFF) + lsb) & np.uint64(0xFFFF0000)).astype(np.uint32)
    return rounded.view(np.float32).reshape(x.shape)


def as_bfloat16(x) -> np.ndarray:
    """Mark a float32 array as a bfloat16 input (values rounded to bfloat16 first).

    The result is an ``ndarray`` subclass: ``np.asarray`` turns it back into a
    plain float32 array, so a numpy port reads it like any float32 input.
    """
    return round_to_bfloat16(x).view(_BFloat16Values)


def is_bfloat16(x) -> bool:
    """True when ``x`` was marked with :func:`as_bfloat16` (the port may convert it to its bfloat16)."""
    return isinstance(x, _BFloat16Values)


# --------------------------------------------------------------------------- return types

@dataclass(frozen=True)
class Quantized:
    """What ``Port.quantize`` returns (docs/CONTRACT.md, reference/quantize.py).

    codes : uint8, shape of the input ``(..., T, D)``, unpacked.
    scale : float32, ``(..., T, ceil(D/G))`` for axis "token", ``(..., ceil(T/G), D)`` for "channel".
    zero : float32 of the shape of ``scale``, or None for the symmetric scheme.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: Optional[np.ndarray]


@dataclass(frozen=True)
class CacheBlock:
    """One flushed block of a cache's quantized store (``CachePort.quantized_blocks``), with
    unpacked codes: reference/cache.py ``QuantizedBlock`` (docs/06-cache.md definition 6.5).

    start : int, position of the block's first slot.
    num_slots : int, slots still in the cache (``n``; fewer after a crop cut the block).
    coded : bool ``(B, n)``: True where the slot holds a quantized token (False at
        preserved and padding slots: the ``exclude`` mask the block was quantized with).
    keys, values : :class:`Quantized` with codes ``(B, H, n, D)`` (``n = token_block``)
        and the statistics of the configured axis.
    """

    start: int
    num_slots: int
    coded: np.ndarray
    keys: Quantized
    values: Quantized


# --------------------------------------------------------------------------- protocols

@runtime_checkable
class CachePort(Protocol):
    """One layer of a quantized KV cache, with the semantics of reference/cache.py.

    ``dtype`` given to ``make_cache`` is a name: "float32", "float16" or
    "bfloat16" (the residual's storage type).
    """

    seq_length: int

    def update(self, keys: np.ndarray, values: np.ndarray, valid: Optional[np.ndarray] = None,
               rope_positions: Optional[np.ndarray] = None) -> None:
        """Append ``(B, H, n, D)`` tokens (status pending); ``valid`` bool ``(B, n)`` (False = padding).

        ``rope_positions`` (part "kvquant_cache" only; never passed to a uniform cache): None
        (the slot positions) or int64 ``(B, n)``, each token's rotary position
        (docs/06-cache.md definition 6.21); padding slots may hold anything (-1, 1).
        """

    def resolve(self, preserve: np.ndarray) -> None:
        """Fix the status of all pending tokens: bool ``(B, n_pending)``, True = preserved."""

    def flush(self) -> None:
        """Quantize the oldest whole token blocks beyond the residual window (docs/06-cache.md)."""

    def segments(self) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``[(keys (B,H,S,D), values (B,H,S,D), key_positions int (B,S)), ...]``, dequantized."""

    def attend(self, query: np.ndarray, query_positions: np.ndarray,
               scale: Optional[float] = None) -> np.ndarray:
        """Attention of ``query (B, Hq, Tq, D)`` over the cache: ``(B, Hq, Tq, D)``."""

    def crop(self, max_length: int) -> None: ...

    def reorder(self, beam_idx: np.ndarray) -> None: ...

    def select_batch(self, indices: np.ndarray) -> None: ...

    def reset(self) -> None: ...

    def nbytes(self) -> int: ...

    def preserved_positions(self) -> List[np.ndarray]:
        """One sorted int array per batch row: the positions of the preserved tokens."""

    def quantized_blocks(self) -> List[CacheBlock]:
        """The quantized store, one :class:`CacheBlock` per flushed block, in position order
        (a cache made with ``quantizer="kvquant"``: one :class:`KVQuantCacheBlock` per block)."""


class Port(abc.ABC):
    """Base class of an implementation under test.  Subclass it and override the methods of
    the parts you declare in :attr:`parts`.  All arguments and results are numpy arrays
    (module docstring); keyword names are those of docs/CONTRACT.md."""

    #: Short name printed in the test report header.
    name: str = "unnamed port"
    #: The parts of :data:`PARTS` this port implements; the rest are skipped.
    parts: frozenset = frozenset()
    #: Informational: where the port computes ("cpu", "cuda", ...).
    device: str = "cpu"

    # packing -----------------------------------------------------------------
    def pack_codes(self, codes: np.ndarray, bits: int) -> np.ndarray:
        """uint8 ``(..., n)`` -> uint32 ``(..., ceil(n / (32 // bits)))`` (CONTRACT: packing)."""
        raise NotImplementedError

    def unpack_codes(self, words: np.ndarray, bits: int, n: int) -> np.ndarray:
        """uint32 ``(..., W)`` -> uint8 ``(..., n)``."""
        raise NotImplementedError

    # quantize ----------------------------------------------------------------
    def quantize(self, x: np.ndarray, bits: int, group_size: int, axis: str, *,
                 symmetric: bool = False, exclude: Optional[np.ndarray] = None) -> Quantized:
        """Group quantization of ``x (..., T, D)`` (CONTRACT: quantize)."""
        raise NotImplementedError

    def dequantize(self, codes: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray], *,
                   bits: int, group_size: int, axis: str, symmetric: bool) -> np.ndarray:
        """float32 array of ``codes.shape``: ``q * s + z`` or ``(q - M) * s``."""
        raise NotImplementedError

    # predictor ---------------------------------------------------------------
    def outlier_scores(self, hidden: np.ndarray, channels: Sequence[int]) -> np.ndarray:
        """float32 ``(..., T)``: ``max_c |hidden[..., t, c]|``."""
        raise NotImplementedError

    def predict_sinks(self, hidden: np.ndarray, channels: Sequence[int], threshold: float) -> np.ndarray:
        """bool ``(..., T)``: ``outlier_scores > threshold``."""
        raise NotImplementedError

    # preserve ----------------------------------------------------------------
    def preserve_first_n(self, valid: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError

    def attention_oracle(self, probs: np.ndarray, ratio: float, valid: Optional[np.ndarray] = None) -> np.ndarray:
        raise NotImplementedError

    def cap_preserved(self, flags: np.ndarray, max_count: int) -> np.ndarray:
        raise NotImplementedError

    def preserved_set(self, config, valid: np.ndarray, predicted: Optional[np.ndarray] = None,
                      oracle: Optional[np.ndarray] = None) -> np.ndarray:
        raise NotImplementedError

    # attention ---------------------------------------------------------------
    def attention(self, query, keys, values, *, query_positions, key_positions,
                  key_valid=None, scale=None) -> np.ndarray:
        """``(B, Hq, Tq, D)`` (CONTRACT: attention)."""
        raise NotImplementedError

    def split_attention(self, query, segments, *, query_positions, scale=None) -> np.ndarray:
        """``segments``: list of ``(keys, values, key_positions)``."""
        raise NotImplementedError

    # cache -------------------------------------------------------------------
    def make_cache(self, config, dtype: str = "float32", *, kvquant_calibration=None,
                   rope_inv_freq=None) -> CachePort:
        """A fresh one-layer cache for ``config`` (a ``reference.config.KVSinkConfig``).

        Part "cache": ``config.quantizer == "uniform"``, the two keywords are None.
        Part "kvquant_cache": ``config.quantizer == "kvquant"`` with
        ``kvquant_calibration`` a ``reference.kvquant.KVQuantCalibration`` (numpy
        arrays) or None (only for nf with ``outlier_fraction == 0``), and
        ``rope_inv_freq`` None (keys quantized as given) or float32 ``(D/2,)`` (keys
        arrive post-RoPE: un-rotated before quantization, rotated back after);
        docs/06-cache.md definition 6.21, docs/08-kvquant.md §8.14.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------- loading

def check_port(port) -> None:
    """Raise ``TypeError`` if ``port`` declares unknown parts or lacks a declared method."""
    parts = getattr(port, "parts", None)
    if parts is None:
        raise TypeError(f"{type(port).__name__} has no 'parts' attribute; declare the implemented "
                        f"parts, a subset of {PARTS}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise TypeError(f"{type(port).__name__}.parts has unknown names {sorted(unknown)}; "
                        f"allowed: {PARTS}")
    for part in parts:
        for meth in PART_METHODS[part]:
            if not callable(getattr(port, meth, None)):
                raise TypeError(f"{type(port).__name__} declares part {part!r} but has no "
                                f"method {meth}()")


def load_port(spec: str) -> Port:
    """``"reference"``, ``"accelerated"`` or ``"package.module:factory"`` -> a checked port."""
    if spec in ("reference", "accelerated"):
        from . import impls
        port = impls.reference_port() if spec == "reference" else impls.accelerated_port()
    else:
        if ":" not in spec:
            raise ValueError(f"--impl {spec!r}: expected 'reference', 'accelerated' or "
                             "'package.module:factory'")
        module_name, factory_name = spec.split(":", 1)
        module = importlib.import_module(module_name)
        factory = getattr(module, factory_name, None)
        if factory is None:
            raise ValueError(f"--impl {spec!r}: module {module_name} has no attribute {factory_name}")
        port = factory()
    check_port(port)
    return port


# =========================================================================== kvquant part
# --- BEGIN kvquant part (added by the kvquant helper, issue 5; conformance/test_kvquant.py,
# --- docs/08-kvquant.md).  Appended at the end so that the rest of this file stays its owner's.

@dataclass(frozen=True)
class KVQuantized:
    """One side (keys or values) of ``Port.kvquant_quantize_block`` (docs/08-kvquant.md 8.7).

    codes : uint8 ``(B, H, T, D)``, unpacked level indices.
    scale, centre : float32 group half-range ``s`` and centre ``c``: ``(B, H, ceil(T/G), D)`` for
        the keys (axis "channel"), ``(B, H, T, ceil(D/G))`` for the values (axis "token").
    outlier_index : int ``(K,)``, ascending flat C-order indices into ``(B, H, T, D)``.
    outlier_value : float32 or float16 ``(K,)`` (``sparse_dtype``).
    """

    codes: np.ndarray
    scale: np.ndarray
    centre: np.ndarray
    outlier_index: np.ndarray
    outlier_value: np.ndarray


class _KVQuantMethods:
    """The methods of part "kvquant" (docs/CONTRACT.md reference/kvquant.py); copied onto
    :class:`Port`.  Arguments and results are numpy arrays; ``calibration`` is a
    ``reference.kvquant.KVQuantCalibration`` (numpy arrays) and ``config`` a
    ``reference.config.KVSinkConfig`` with ``quantizer="kvquant"``."""

    def kvquant_nf_levels(self, bits: int) -> np.ndarray:
        """float32 ``(2**bits,)``: the normal-float grid (definition 8.2)."""
        raise NotImplementedError

    def kvquant_nearest_level(self, t: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """uint8 ``t.shape``: ``#{k : t > beta_k}`` (definition 8.3); ``levels (..., n)`` broadcasts."""
        raise NotImplementedError

    def kvquant_key_outlier_thresholds(self, keys, fraction: float, exclude=None):
        """``(lower, upper)`` float32 ``(H, D)`` (definition 8.5); ``exclude`` bool ``(B, T)``."""
        raise NotImplementedError

    def kvquant_key_outliers(self, keys, lower, upper, exclude=None) -> np.ndarray:
        """bool ``(B, H, T, D)`` (definition 8.5)."""
        raise NotImplementedError

    def kvquant_value_outliers(self, values, fraction: float, exclude=None) -> np.ndarray:
        """bool ``(B, H, T, D)`` (definition 8.6)."""
        raise NotImplementedError

    def kvquant_quantize_block(self, keys_pre_rope, values, calibration, config, *, exclude=None,
                               sparse_dtype: str = "float32"):
        """``(keys, values)`` as :class:`KVQuantized` (definition 8.10, ``quantize_block_kvquant``)."""
        raise NotImplementedError

    def kvquant_dequantize(self, codes, scale, centre, levels, outlier_index, outlier_value, *,
                           bits: int, group_size: int, axis: str) -> np.ndarray:
        """float32 ``codes.shape``: ``fl32(fl32(l_q * s) + c)``, outliers written back (8.7)."""
        raise NotImplementedError

    def kvquant_apply_rope(self, x, positions, inv_freq) -> np.ndarray:
        """float32 ``x.shape``: rotation by ``+theta`` (definition 8.1)."""
        raise NotImplementedError

    def kvquant_unapply_rope(self, x, positions, inv_freq) -> np.ndarray:
        """float32 ``x.shape``: rotation by ``-theta`` (definition 8.1)."""
        raise NotImplementedError


PARTS = PARTS + ("kvquant", "kvquant_cache")
PART_METHODS["kvquant"] = tuple(name for name in vars(_KVQuantMethods) if name.startswith("kvquant_"))
#: part "kvquant_cache": ``make_cache`` accepts ``quantizer="kvquant"`` configs (with
#: ``kvquant_calibration`` and ``rope_inv_freq``), its caches take ``rope_positions`` on
#: ``update`` and report :class:`KVQuantCacheBlock` blocks (conformance/test_kvquant_cache.py).
PART_METHODS["kvquant_cache"] = ("make_cache",)


@dataclass(frozen=True)
class KVQuantCacheBlock:
    """One flushed block of a kvquant cache (``CachePort.quantized_blocks``): reference/cache.py
    ``KVQuantCacheBlock`` (docs/06-cache.md definition 6.21), codes unpacked.

    start, num_slots, coded : as :class:`CacheBlock`.
    rope_positions : int ``(B, n)``, each slot's rotary position (0 at padding slots).
    keys : :class:`KVQuantized` of the **pre-RoPE** keys ``(B, H, n, D)`` (axis "channel",
        ``key_group_size = n`` tokens: one group per channel).
    values : :class:`KVQuantized` of the values (axis "token", ``value_group_size`` channels).
    """

    start: int
    num_slots: int
    coded: np.ndarray
    rope_positions: np.ndarray
    keys: KVQuantized
    values: KVQuantized

for _name in PART_METHODS["kvquant"]:
    setattr(Port, _name, vars(_KVQuantMethods)[_name])
del _name
__all__ += ["KVQuantized", "KVQuantCacheBlock"]
# --- END kvquant part


def replay_cache_ops(cache, ops, arrays) -> None:
    """Replay a golden cache case's ``params["ops"]`` (docs/13-conformance.md §13.5) on ``cache``:
    each op names its kind (``update``, ``resolve``, ``flush``, ``crop``, ``reorder``,
    ``select_batch``) and the arrays of ``arrays`` it reads."""
    for op in ops:
        kind = op["op"]
        if kind == "update":
            valid = None if op["valid"] is None else arrays[op["valid"]]
            if op.get("rope_positions"):
                cache.update(arrays[op["keys"]], arrays[op["values"]], valid,
                             rope_positions=arrays[op["rope_positions"]])
            else:
                cache.update(arrays[op["keys"]], arrays[op["values"]], valid)
        elif kind == "resolve":
            cache.resolve(arrays[op["preserve"]])
        elif kind == "flush":
            cache.flush()
        elif kind == "crop":
            cache.crop(op["max_length"])
        elif kind == "reorder":
            cache.reorder(arrays[op["beam_idx"]])
        elif kind == "select_batch":
            cache.select_batch(arrays[op["indices"]])
        else:
            raise ValueError(f"unknown cache op {kind!r} in the vectors")
