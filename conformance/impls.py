"""Adapters of this repository's two implementations to the conformance protocol (adapter.py).

* :class:`ReferencePort` — ``reference/`` (numpy, the specification).  Testing it
  is a self-check of the suite (every comparison must hold exactly).
* :class:`AcceleratedPort` — ``accelerated/`` (torch; Triton kernels on CUDA).
  numpy arrays are converted to torch tensors on the port's device: CUDA when
  available (so the Triton paths run), else CPU.  Packed words travel as the
  int32 bit patterns of ``accelerated/packing.py`` and are reinterpreted as
  uint32; a bfloat16-marked input (``adapter.as_bfloat16``) becomes a real
  ``torch.bfloat16`` tensor (exact: the values are bfloat16 numbers).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .adapter import (PARTS, CacheBlock, KVQuantCacheBlock, KVQuantized, Port, Quantized, is_bfloat16,
                      round_to_bfloat16)

__all__ = ["ReferencePort", "AcceleratedPort", "reference_port", "accelerated_port"]


def _np_dtype(name: str):
    """numpy storage dtype of a cache ``dtype`` name in the reference (no bfloat16 in numpy:
    bfloat16 inputs are bfloat16 numbers held in float32, which represents them exactly)."""
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}[name]


# --------------------------------------------------------------------------- reference

class ReferenceCache:
    """``reference.cache.QuantizedKVCacheLayer`` seen through the protocol."""

    def __init__(self, config, dtype: str, *, kvquant_calibration=None, rope_inv_freq=None):
        from reference.cache import QuantizedKVCacheLayer
        self.layer = QuantizedKVCacheLayer(config, dtype=_np_dtype(dtype),
                                           kvquant_calibration=kvquant_calibration,
                                           rope_inv_freq=rope_inv_freq)
        self.dtype = dtype

    @property
    def seq_length(self) -> int:
        return int(self.layer.seq_length)

    def update(self, keys, values, valid=None, rope_positions=None):
        keys, values = np.asarray(keys), np.asarray(values)
        if self.dtype == "bfloat16":     # what a bfloat16 store holds, in float32 (exact)
            keys, values = round_to_bfloat16(keys), round_to_bfloat16(values)
        if rope_positions is None:       # a uniform layer rejects the keyword itself
            self.layer.update(keys, values, valid)
        else:
            self.layer.update(keys, values, valid, rope_positions=np.asarray(rope_positions))

    def resolve(self, preserve):
        self.layer.resolve(np.asarray(preserve))

    def flush(self):
        self.layer.flush()

    def segments(self):
        return [(np.asarray(k), np.asarray(v), np.asarray(p)) for k, v, p in self.layer.segments()]

    def attend(self, query, query_positions, scale=None):
        return self.layer.attend(query, query_positions, scale)

    def crop(self, max_length):
        self.layer.crop(max_length)

    def reorder(self, beam_idx):
        self.layer.reorder(np.asarray(beam_idx))

    def select_batch(self, indices):
        self.layer.select_batch(np.asarray(indices))

    def reset(self):
        self.layer.reset()

    def nbytes(self) -> int:
        """Definition 6.17.  numpy has no bfloat16: for dtype "bfloat16" the reference holds the
        bfloat16 numbers in float32, and the bytes a bfloat16 store holds are reported (2 per
        full-precision element instead of 4)."""
        total = int(self.layer.nbytes())
        if self.dtype == "bfloat16" and self.layer.batch_size is not None:
            pk, pv = self.layer.preserved[1:]
            rk, rv = self.layer.residual[:2]
            total -= 2 * (pk.size + pv.size + rk.size + rv.size)
        return total

    def preserved_positions(self):
        return [np.asarray(p) for p in self.layer.preserved_positions()]

    def quantized_blocks(self):
        if self.layer.kvquant:
            # reference/cache.py KVQuantCacheBlock (KVQuantTensor codes are held unpacked)
            return [KVQuantCacheBlock(int(b.start), int(b.num_slots), np.asarray(b.coded),
                                      np.asarray(b.rope_positions), _ref_kvquantized(b.keys),
                                      _ref_kvquantized(b.values))
                    for b in self.layer.blocks]
        # the reference's block list (reference/cache.py QuantizedBlock, codes packed)
        return [CacheBlock(int(b.start), int(b.num_slots), np.asarray(b.coded),
                           _from_ref_qt(b.keys.unpack()), _from_ref_qt(b.values.unpack()))
                for b in self.layer.blocks]


def _from_ref_qt(qt) -> Quantized:
    return Quantized(codes=np.asarray(qt.codes), scale=np.asarray(qt.scale),
                     zero=None if qt.zero is None else np.asarray(qt.zero))


class ReferencePort(Port):
    """The numpy reference (the specification itself)."""

    name = "reference (numpy)"
    parts = frozenset(PARTS)
    device = "cpu"

    def pack_codes(self, codes, bits):
        from reference.packing import pack_codes
        return pack_codes(codes, bits)

    def unpack_codes(self, words, bits, n):
        from reference.packing import unpack_codes
        return unpack_codes(words, bits, n)

    def quantize(self, x, bits, group_size, axis, *, symmetric=False, exclude=None):
        from reference.quantize import quantize
        return _from_ref_qt(quantize(np.asarray(x), bits, group_size, axis, symmetric=symmetric,
                                     exclude=exclude))

    def dequantize(self, codes, scale, zero, *, bits, group_size, axis, symmetric):
        from reference.quantize import QuantizedTensor, dequantize
        qt = QuantizedTensor(codes=np.asarray(codes), scale=np.asarray(scale),
                             zero=None if zero is None else np.asarray(zero), bits=bits,
                             group_size=group_size, axis=axis, symmetric=symmetric,
                             shape=np.asarray(codes).shape)
        return dequantize(qt)

    def outlier_scores(self, hidden, channels):
        from reference.predictor import outlier_scores
        return outlier_scores(np.asarray(hidden), channels)

    def predict_sinks(self, hidden, channels, threshold):
        from reference.predictor import predict_sinks
        return predict_sinks(np.asarray(hidden), channels, threshold)

    def preserve_first_n(self, valid, n):
        from reference.preserve import preserve_first_n
        return preserve_first_n(valid, n)

    def attention_oracle(self, probs, ratio, valid=None):
        from reference.preserve import attention_oracle
        return attention_oracle(probs, ratio, valid)

    def cap_preserved(self, flags, max_count):
        from reference.preserve import cap_preserved
        return cap_preserved(flags, max_count)

    def preserved_set(self, config, valid, predicted=None, oracle=None):
        from reference.preserve import preserved_set
        return preserved_set(config, valid, predicted, oracle)

    def attention(self, query, keys, values, *, query_positions, key_positions, key_valid=None,
                  scale=None):
        from reference.attention import attention
        return attention(query, keys, values, query_positions=query_positions,
                         key_positions=key_positions, key_valid=key_valid, scale=scale)

    def split_attention(self, query, segments, *, query_positions, scale=None):
        from reference.attention import split_attention
        return split_attention(query, segments, query_positions=query_positions, scale=scale)

    def make_cache(self, config, dtype="float32", *, kvquant_calibration=None, rope_inv_freq=None):
        return ReferenceCache(config, dtype, kvquant_calibration=kvquant_calibration,
                              rope_inv_freq=rope_inv_freq)


# --------------------------------------------------------------------------- accelerated

class _Torch:
    """numpy <-> torch conversions on one device."""

    def __init__(self, device):
        import torch
        self.torch = torch
        self.device = torch.device(device)

    def float_in(self, x):
        """numpy float array (or bf16-marked float32) -> torch tensor of the matching dtype."""
        torch = self.torch
        if is_bfloat16(x):
            return torch.from_numpy(np.array(x, dtype=np.float32)).to(self.device, torch.bfloat16)
        arr = np.ascontiguousarray(np.asarray(x))
        return torch.from_numpy(arr.copy()).to(self.device)

    def any_in(self, x, dtype=None):
        if x is None:
            return None
        arr = np.ascontiguousarray(np.asarray(x, dtype=dtype))
        return self.torch.from_numpy(arr.copy()).to(self.device)

    def out(self, t):
        if t is None:
            return None
        if isinstance(t, (list, tuple)):
            return type(t)(self.out(a) for a in t)
        if not isinstance(t, self.torch.Tensor):
            return np.asarray(t)
        t = t.detach().cpu()
        if t.dtype == self.torch.bfloat16:
            t = t.float()
        return t.numpy()


class AcceleratedCache:
    """``accelerated.cache.QuantizedKVCacheLayer`` seen through the protocol."""

    def __init__(self, conv: _Torch, config, dtype: str, *, kvquant_calibration=None,
                 rope_inv_freq=None):
        from accelerated.cache import QuantizedKVCacheLayer
        self.c = conv
        torch = conv.torch
        tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        self.tdtype = tdtype
        # a reference KVQuantCalibration is accepted as is (moved to the device by the layer)
        self.layer = QuantizedKVCacheLayer(
            config, dtype=tdtype, device=conv.device, kvquant_calibration=kvquant_calibration,
            rope_inv_freq=None if rope_inv_freq is None else conv.any_in(rope_inv_freq, np.float32))

    @property
    def seq_length(self) -> int:
        return int(self.layer.seq_length)

    def _kv(self, x):
        return self.c.float_in(np.asarray(x, dtype=np.float32)).to(self.tdtype)

    def update(self, keys, values, valid=None, rope_positions=None):
        valid = None if valid is None else self.c.any_in(valid, bool)
        if rope_positions is None:
            self.layer.update(self._kv(keys), self._kv(values), valid)
        else:
            self.layer.update(self._kv(keys), self._kv(values), valid,
                              rope_positions=self.c.any_in(rope_positions, np.int64))

    def resolve(self, preserve):
        self.layer.resolve(self.c.any_in(preserve, bool))

    def flush(self):
        self.layer.flush()

    def segments(self):
        return [(self.c.out(k), self.c.out(v), self.c.out(p)) for k, v, p in self.layer.segments()]

    def attend(self, query, query_positions, scale=None):
        q = self.c.float_in(np.asarray(query, dtype=np.float32))
        qp = self.c.any_in(query_positions, np.int64)
        return self.c.out(self.layer.attend(q, qp, scale=scale))

    def crop(self, max_length):
        self.layer.crop(int(max_length))

    def reorder(self, beam_idx):
        self.layer.reorder(self.c.any_in(beam_idx, np.int64))

    def select_batch(self, indices):
        self.layer.select_batch(self.c.any_in(indices, np.int64))

    def reset(self):
        self.layer.reset()

    def nbytes(self) -> int:
        return int(self.layer.nbytes())

    def preserved_positions(self):
        return [np.asarray(self.c.out(p)) for p in self.layer.preserved_positions()]

    def quantized_blocks(self):
        if self.layer.kvquant:
            # accelerated.cache.KVQuantCacheBlock: PackedKVQuantTensor keys/values (codes packed)
            return [KVQuantCacheBlock(int(b.start), int(b.num_slots), np.asarray(self.c.out(b.coded)),
                                      np.asarray(self.c.out(b.rope_positions)),
                                      self._kvquantized(b.keys.unpack()),
                                      self._kvquantized(b.values.unpack()))
                    for b in self.layer.blocks]
        # accelerated.cache mirrors the reference's ``blocks`` (QuantizedBlock with packed keys/values)
        return [CacheBlock(int(b.start), int(b.num_slots), np.asarray(self.c.out(b.coded)),
                           self._qt(b.keys), self._qt(b.values))
                for b in self.layer.blocks]

    def _kvquantized(self, qt):
        return KVQuantized(codes=self.c.out(qt.codes), scale=self.c.out(qt.scale),
                           centre=self.c.out(qt.centre), outlier_index=self.c.out(qt.outlier_index),
                           outlier_value=self.c.out(qt.outlier_value))

    def _qt(self, qt) -> Quantized:
        if hasattr(qt, "unpack"):           # PackedQuantizedTensor
            qt = qt.unpack()
        return Quantized(codes=self.c.out(qt.codes), scale=self.c.out(qt.scale),
                         zero=self.c.out(qt.zero))


class AcceleratedPort(Port):
    """``accelerated/`` (torch; Triton on CUDA) on ``device`` (default: CUDA when available)."""

    parts = frozenset(PARTS)

    def __init__(self, device: Optional[str] = None):
        import torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.c = _Torch(device)
        self.device = str(self.c.device)
        self.name = f"accelerated (torch {torch.__version__})"

    def pack_codes(self, codes, bits):
        from accelerated.packing import pack_codes, words_to_reference
        codes = np.asarray(codes)
        if codes.dtype.kind not in "ui" or codes.dtype == np.bool_:
            raise TypeError(f"codes must have an integer dtype, got {codes.dtype}")
        return words_to_reference(pack_codes(self.c.any_in(codes), bits))

    def unpack_codes(self, words, bits, n):
        from accelerated.packing import unpack_codes, words_from_reference
        return self.c.out(unpack_codes(words_from_reference(words).to(self.c.device), bits, n))

    def quantize(self, x, bits, group_size, axis, *, symmetric=False, exclude=None):
        # the packed path: the fused Triton kernel on CUDA, torch + packing on CPU
        from accelerated.quantize import quantize_packed
        pqt = quantize_packed(self.c.float_in(x), bits, group_size, axis, symmetric=symmetric,
                              exclude=self.c.any_in(exclude))
        qt = pqt.unpack()
        return Quantized(self.c.out(qt.codes), self.c.out(qt.scale), self.c.out(qt.zero))

    def dequantize(self, codes, scale, zero, *, bits, group_size, axis, symmetric):
        from accelerated.quantize import QuantizedTensor, dequantize
        qt = QuantizedTensor(codes=self.c.any_in(codes), scale=self.c.any_in(scale),
                             zero=self.c.any_in(zero), bits=bits, group_size=group_size, axis=axis,
                             symmetric=symmetric, shape=tuple(np.asarray(codes).shape))
        return self.c.out(dequantize(qt.to_packed()))

    def outlier_scores(self, hidden, channels):
        from accelerated.predictor import outlier_scores
        return self.c.out(outlier_scores(self.c.float_in(hidden), channels))

    def predict_sinks(self, hidden, channels, threshold):
        from accelerated.predictor import predict_sinks
        return self.c.out(predict_sinks(self.c.float_in(hidden), channels, threshold))

    def preserve_first_n(self, valid, n):
        from accelerated.preserve import preserve_first_n
        return self.c.out(preserve_first_n(self.c.any_in(valid), n))

    def attention_oracle(self, probs, ratio, valid=None):
        from accelerated.preserve import attention_oracle
        return self.c.out(attention_oracle(self.c.float_in(probs), ratio, self.c.any_in(valid)))

    def cap_preserved(self, flags, max_count):
        from accelerated.preserve import cap_preserved
        return self.c.out(cap_preserved(self.c.any_in(flags), max_count))

    def preserved_set(self, config, valid, predicted=None, oracle=None):
        from accelerated.preserve import preserved_set
        return self.c.out(preserved_set(config, self.c.any_in(valid), self.c.any_in(predicted),
                                        self.c.any_in(oracle)))

    def attention(self, query, keys, values, *, query_positions, key_positions, key_valid=None,
                  scale=None):
        from accelerated.attention import attention
        return self.c.out(attention(self.c.float_in(query), self.c.float_in(keys), self.c.float_in(values),
                                    query_positions=self.c.any_in(query_positions, np.int64),
                                    key_positions=self.c.any_in(key_positions, np.int64),
                                    key_valid=self.c.any_in(key_valid), scale=scale))

    def split_attention(self, query, segments, *, query_positions, scale=None):
        from accelerated.attention import split_attention
        segs = [(self.c.float_in(k), self.c.float_in(v), self.c.any_in(p, np.int64))
                for k, v, p in segments]
        return self.c.out(split_attention(self.c.float_in(query), segs,
                                          query_positions=self.c.any_in(query_positions, np.int64),
                                          scale=scale))

    def make_cache(self, config, dtype="float32", *, kvquant_calibration=None, rope_inv_freq=None):
        return AcceleratedCache(self.c, config, dtype, kvquant_calibration=kvquant_calibration,
                                rope_inv_freq=rope_inv_freq)


def reference_port() -> ReferencePort:
    return ReferencePort()


def accelerated_port(device: Optional[str] = None) -> AcceleratedPort:
    return AcceleratedPort(device)


# =========================================================================== kvquant part
# --- BEGIN kvquant part (added by the kvquant helper, issue 5; conformance/test_kvquant.py).
# --- Appended at the end so that the rest of this file stays its owner's.


def _ref_kvquantized(qt) -> KVQuantized:
    return KVQuantized(codes=np.asarray(qt.codes), scale=np.asarray(qt.scale),
                       centre=np.asarray(qt.centre), outlier_index=np.asarray(qt.outlier_index),
                       outlier_value=np.asarray(qt.outlier_value))


class _ReferenceKVQuant:
    def kvquant_nf_levels(self, bits):
        from reference.kvquant import nf_levels
        return nf_levels(bits)

    def kvquant_nearest_level(self, t, levels):
        from reference.kvquant import nearest_level
        return nearest_level(np.asarray(t), np.asarray(levels))

    def kvquant_key_outlier_thresholds(self, keys, fraction, exclude=None):
        from reference.kvquant import key_outlier_thresholds
        return key_outlier_thresholds(np.asarray(keys), fraction, exclude)

    def kvquant_key_outliers(self, keys, lower, upper, exclude=None):
        from reference.kvquant import key_outliers
        return key_outliers(np.asarray(keys), lower, upper, exclude)

    def kvquant_value_outliers(self, values, fraction, exclude=None):
        from reference.kvquant import value_outliers
        return value_outliers(np.asarray(values), fraction, exclude)

    def kvquant_quantize_block(self, keys_pre_rope, values, calibration, config, *, exclude=None,
                               sparse_dtype="float32"):
        from reference.kvquant import quantize_block_kvquant
        blk = quantize_block_kvquant(np.asarray(keys_pre_rope), np.asarray(values), calibration,
                                     config, exclude=exclude, sparse_dtype=np.dtype(sparse_dtype))
        return _ref_kvquantized(blk.keys), _ref_kvquantized(blk.values)

    def kvquant_dequantize(self, codes, scale, centre, levels, outlier_index, outlier_value, *,
                           bits, group_size, axis):
        from reference.kvquant import KVQuantTensor, dequantize_nonuniform
        qt = KVQuantTensor(codes=np.asarray(codes), scale=np.asarray(scale), centre=np.asarray(centre),
                           levels=np.asarray(levels), outlier_index=np.asarray(outlier_index),
                           outlier_value=np.asarray(outlier_value), bits=bits, group_size=group_size,
                           axis=axis, shape=tuple(np.shape(codes)))
        return dequantize_nonuniform(qt)

    def kvquant_apply_rope(self, x, positions, inv_freq):
        from reference.kvquant import apply_rope
        return apply_rope(np.asarray(x), positions, inv_freq)

    def kvquant_unapply_rope(self, x, positions, inv_freq):
        from reference.kvquant import unapply_rope
        return unapply_rope(np.asarray(x), positions, inv_freq)


class _AcceleratedKVQuant:
    def kvquant_nf_levels(self, bits):
        from accelerated.kvquant import nf_levels
        return self.c.out(nf_levels(bits, self.c.device))

    def kvquant_nearest_level(self, t, levels):
        from accelerated.kvquant import nearest_level
        return self.c.out(nearest_level(self.c.float_in(t), self.c.float_in(levels)))

    def kvquant_key_outlier_thresholds(self, keys, fraction, exclude=None):
        from accelerated.kvquant import key_outlier_thresholds
        return self.c.out(key_outlier_thresholds(self.c.float_in(keys), fraction,
                                                 self.c.any_in(exclude, bool)))

    def kvquant_key_outliers(self, keys, lower, upper, exclude=None):
        from accelerated.kvquant import key_outliers
        return self.c.out(key_outliers(self.c.float_in(keys), self.c.any_in(lower, np.float32),
                                       self.c.any_in(upper, np.float32), self.c.any_in(exclude, bool)))

    def kvquant_value_outliers(self, values, fraction, exclude=None):
        from accelerated.kvquant import value_outliers
        return self.c.out(value_outliers(self.c.float_in(values), fraction, self.c.any_in(exclude, bool)))

    def _kvquantized(self, qt) -> KVQuantized:
        return KVQuantized(codes=self.c.out(qt.codes), scale=self.c.out(qt.scale),
                           centre=self.c.out(qt.centre), outlier_index=self.c.out(qt.outlier_index),
                           outlier_value=self.c.out(qt.outlier_value))

    def kvquant_quantize_block(self, keys_pre_rope, values, calibration, config, *, exclude=None,
                               sparse_dtype="float32"):
        from accelerated.kvquant import KVQuantCalibration, quantize_block_kvquant
        torch = self.c.torch
        cal = None if calibration is None else KVQuantCalibration.from_reference(calibration, self.c.device)
        blk = quantize_block_kvquant(self.c.float_in(keys_pre_rope), self.c.float_in(values), cal, config,
                                     exclude=self.c.any_in(exclude, bool),
                                     sparse_dtype={"float32": torch.float32,
                                                   "float16": torch.float16}[str(sparse_dtype)])
        return self._kvquantized(blk.keys), self._kvquantized(blk.values)

    def kvquant_dequantize(self, codes, scale, centre, levels, outlier_index, outlier_value, *,
                           bits, group_size, axis):
        from accelerated.kvquant import KVQuantTensor, dequantize_nonuniform
        qt = KVQuantTensor(codes=self.c.any_in(codes), scale=self.c.any_in(scale),
                           centre=self.c.any_in(centre), levels=self.c.any_in(levels),
                           outlier_index=self.c.any_in(outlier_index),
                           outlier_value=self.c.any_in(outlier_value), bits=bits,
                           group_size=group_size, axis=axis, shape=tuple(np.shape(codes)))
        return self.c.out(dequantize_nonuniform(qt))

    def kvquant_apply_rope(self, x, positions, inv_freq):
        from accelerated.kvquant import apply_rope
        return self.c.out(apply_rope(self.c.float_in(x), self.c.any_in(positions, np.int64),
                                     self.c.any_in(inv_freq, np.float32)))

    def kvquant_unapply_rope(self, x, positions, inv_freq):
        from accelerated.kvquant import unapply_rope
        return self.c.out(unapply_rope(self.c.float_in(x), self.c.any_in(positions, np.int64),
                                       self.c.any_in(inv_freq, np.float32)))


for _cls, _mixin in ((ReferencePort, _ReferenceKVQuant), (AcceleratedPort, _AcceleratedKVQuant)):
    for _name, _fn in vars(_mixin).items():
        if callable(_fn) and not _name.startswith("__"):
            setattr(_cls, _name, _fn)
del _cls, _mixin, _name, _fn
# --- END kvquant part
