"""The KVQuant-style cache (``quantizer="kvquant"``), stateful: docs/06-cache.md definitions
6.21-6.22, docs/08-kvquant.md §8.14.

A Hypothesis ``RuleBasedStateMachine`` — the uniform cache's machine of
``test_cache.py``, whose rules it inherits (prefill chunks, decode steps, sink
arrivals, ``flush`` also with a pending token in the way, ``crop`` also inside a
block, ``reorder``, ``select_batch``, ``reset``, ``attend``) — drives the port's
cache made with a kvquant config and the reference cache
(``reference.cache.QuantizedKVCacheLayer`` with the same calibration and
``rope_inv_freq``) through the same random sequence.  Each run draws:

* a kvquant config: key and value bits 1-8, key groups (= token blocks) of
  1-8 tokens, value groups of 1-16 channels, residual 0-8, a preserved-token
  cap, outlier fraction 0 / 0.01 / 0.05 / 0.2, datatype nf or k-means;
* a calibration (``reference.kvquant.calibrate_kvquant`` on calibration text
  drawn from the run's "model", its first token excluded as a preserved sink;
  random Fisher weights for k-means), or None for nf with no outliers;
* rotary embedding on (``rope_inv_freq`` of base 10^4, 100 or 5·10^5, numpy or
  transformers-style float32) or off (keys quantized as given; odd head
  dimensions allowed);
* how rotary positions are given: None (the slot positions), the same
  explicitly, shifted per row (left padding), or random in ``[0, 2^24)``,
  padding slots holding -1 or 1;
* tokens from the run's "model" (pre-RoPE keys with per-channel offsets and
  sink tokens, rotated with their positions, so the cache's un-rotation
  recovers structured keys), from the calibration text replayed (keys exactly
  on the calibrated outlier thresholds) or from ``strategies.kv_tensors``
  (grids, ties, constants, outliers), with padding;
* storage float32, float16 or bfloat16.

After every step it checks (``tolerances.py``; docs/09-tolerances.md §9.6):

* the same ``seq_length`` and preserved positions (exact);
* the same blocks: ``start``, ``num_slots``, ``coded`` and rotary positions
  exact; the values' (and, without RoPE, the keys') outlier indices and
  values, half-ranges ``s`` and centres ``c`` identical, codes identical up
  to one level within 3 ulps of a boundary (docs/08 §8.11); the pre-RoPE
  keys, which the port un-rotates with its own RoPE (docs/08 §8.11: within
  ``7u(|a| + |b|) + 8η``), under the propagated rules (9.5)-(9.7);
* the same segments: positions and the full-precision parts exact, the
  dequantized part within (9.8) (and (9.9) for keys rotated back);
* the same ``nbytes`` (definition 6.22, the calibration counted once);

and, on ``attend``, the port's attention over its cache within the bound of
9.3 of the float64 attention over the port's own segments.  To know what the
reference quantized, the reference cache keeps each block's stored keys and
values (``kvquant_checks.ReferenceKVQuantCache``; a crop keeps a cut block's codes for
slots that have left the cache).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import note, strategies as st
from hypothesis.stateful import initialize, run_state_machine_as_test

from reference import kvquant as rkv
from reference.config import KVSinkConfig

from . import kvquant_checks as kq
from .kvquant_checks import ReferenceKVQuantCache
from .profiles import examples
from .strategies import MAX_ABS, kv_tensors, kvquant_cache_configs, seeds
from .test_cache import STORAGE, CacheMachine, _to_storage

pytestmark = pytest.mark.part("kvquant_cache")

ROPE_MODES = ("default", "explicit", "shifted", "random")


# --------------------------------------------------------------------------- draws

def _inv_freq(d: int, base: float, style: str) -> np.ndarray:
    if style == "reference":
        return rkv.rope_inv_freq(d, base)
    # transformers' float32 evaluation (may differ from the reference's in the last bit)
    return (np.float32(1.0) / (np.float32(base) ** (np.arange(0, d, 2, dtype=np.float32)
                                                     / np.float32(d)))).astype(np.float32)


class KVQuantCacheMachine(CacheMachine):
    """``test_cache.CacheMachine`` with a kvquant cache: its rules, new setup, token draws and
    block / segment checks."""

    # ------------------------------------------------------------------ setup
    @initialize(data=st.data())
    def setup(self, data):
        draw = data.draw
        rope = draw(st.booleans(), label="rope")
        self.d = draw(st.sampled_from([2, 4, 8, 16] if rope else [1, 2, 3, 4, 8, 16]), label="D")
        self.config = draw(kvquant_cache_configs(), label="config")
        self.h = draw(st.integers(1, 2), label="H")
        self.gqa = draw(st.sampled_from([1, 2]), label="gqa_ratio")
        self.b = draw(st.integers(1, 3), label="B")
        self.dtype = draw(st.sampled_from(STORAGE), label="storage dtype")
        self.inv_freq = None
        if rope:
            base = draw(st.sampled_from([10000.0, 100.0, 500000.0]), label="rope_theta")
            style = draw(st.sampled_from(["reference", "transformers"]), label="inv_freq_style")
            self.inv_freq = _inv_freq(self.d, base, style)
        self.rope_mode = draw(st.sampled_from(ROPE_MODES), label="rope_positions")
        # the run's "model": per-channel offsets, magnitude, sink channels
        self.model = np.random.default_rng(draw(seeds, label="model_seed"))
        self.offsets = self.model.standard_normal((self.h, self.d)) * 2.0
        self.log_scale = draw(st.integers(-3, 1), label="log10_magnitude")
        self.sink_channels = self.model.choice(self.d, size=min(2, self.d), replace=False)
        self.calibration = self._calibration(draw)
        cal = self.calibration
        note(f"config={self.config}; B={self.b} H={self.h} Hq={self.h * self.gqa} D={self.d} "
             f"dtype={self.dtype}; rope_inv_freq={None if self.inv_freq is None else self.inv_freq.tolist()}; "
             f"rope positions {self.rope_mode}; calibration="
             f"{None if cal is None else (cal.datatype, cal.key_lower.tolist(), cal.key_upper.tolist())}")
        kw = dict(kvquant_calibration=cal, rope_inv_freq=self.inv_freq)
        self.ref = ReferenceKVQuantCache(self.config, self.dtype, **kw)
        self.got = self.port.make_cache(self.config, self.dtype, **kw)
        self.shadow_k = self.shadow_v = None
        self.pending = 0
        self._next_rope = None
        self._got_blocks = []

    def _model_tokens(self, rng, shape):
        """Pre-RoPE keys or values of the run's model: channel offsets, now and then a sink token."""
        x = (rng.standard_normal(shape) + self.offsets[None, :, None, :]) * 10.0 ** self.log_scale
        if shape[2] and rng.random() < 0.5:
            t = rng.integers(0, shape[2])
            x[:, :, t, self.sink_channels] *= 100.0
        return np.clip(x, -MAX_ABS, MAX_ABS).astype(np.float32)     # within fp16 range, as kv_tensors

    def _calibration(self, draw):
        cfg = self.config
        self.calibration_text = None
        if cfg.kvquant_datatype == "nf" and cfg.outlier_fraction == 0:
            if draw(st.booleans(), label="calibration_none"):
                return None
            return rkv.nf_calibration(cfg, self.h, self.d)
        rng = np.random.default_rng(draw(seeds, label="calibration_seed"))
        t = draw(st.sampled_from([4, 8, 16]), label="calibration_tokens")
        shape = (2, self.h, t, self.d)
        # as the storage holds them, so that replaying the text gives the very same keys
        keys = _to_storage(self._model_tokens(rng, shape), self.dtype)
        values = _to_storage(self._model_tokens(rng, shape), self.dtype)
        self.calibration_text = (keys, values)
        exclude = np.zeros((2, t), bool)
        exclude[:, 0] = True                       # the sink of the calibration text (PFN-1)
        fisher = {}
        if cfg.kvquant_datatype == "kmeans":
            fisher = dict(key_fisher=rng.random(shape) ** 2, value_fisher=rng.random(shape) ** 2)
        return rkv.calibrate_kvquant(keys, values, cfg, exclude=exclude, **fisher)

    # ------------------------------------------------------------------ tokens
    def _rope_positions(self, data, n, valid):
        """``(argument for update, effective positions)`` int64 ``(B, n)`` by the run's mode."""
        first = self.ref.seq_length
        slots = np.broadcast_to(first + np.arange(n, dtype=np.int64), (self.b, n))
        valid = np.ones((self.b, n), bool) if valid is None else valid
        if self.rope_mode == "default":
            return None, slots
        rng = np.random.default_rng(data.draw(seeds, label="rope_seed"))
        if self.rope_mode == "explicit":
            pos = slots.copy()
        elif self.rope_mode == "shifted":         # left padding: positions count from the first token
            pos = np.maximum(slots - rng.integers(0, 4, size=(self.b, 1)), 0)
        else:
            pos = rng.integers(0, rkv.MAX_POSITION, size=(self.b, n))
            pos[:, :1] = data.draw(st.sampled_from([0, rkv.MAX_POSITION - 1]), label="edge_position")
        pad = data.draw(st.sampled_from([-1, 1]), label="padding_position")
        arg = np.where(valid, pos, pad).astype(np.int64)
        return arg, np.where(valid, pos, 0)

    def _draw_tokens(self, data, n):
        shape = (self.b, self.h, n, self.d)
        valid = None
        if data.draw(st.booleans(), label="has_padding"):
            rng = np.random.default_rng(data.draw(seeds, label="valid_seed"))
            valid = rng.random((self.b, n)) < 0.8
        arg, pos = self._rope_positions(data, n, valid)
        source = data.draw(st.sampled_from(["model", "calibration text", "any"]), label="tokens")
        if source != "any":
            rng = np.random.default_rng(data.draw(seeds, label="tokens_seed"))
            k, v = self._model_tokens(rng, shape), self._model_tokens(rng, shape)
            if source == "calibration text" and self.calibration_text is not None:
                # the calibration text again (a prompt the layer was calibrated on): its keys
                # lie exactly on the calibrated outlier thresholds (definition 8.5)
                ck, cv = self.calibration_text
                rows = rng.integers(0, ck.shape[0], size=self.b)
                toks = (rng.integers(0, ck.shape[2]) + np.arange(n)) % ck.shape[2]
                k, v = ck[rows][:, :, toks], cv[rows][:, :, toks]
            if self.inv_freq is not None:         # a model hands the cache post-RoPE keys
                k = rkv.apply_rope(k, pos[:, None, :], self.inv_freq)
        else:
            k = data.draw(kv_tensors(shape), label="keys")
            v = data.draw(kv_tensors(shape), label="values")
        self._next_rope = arg
        return k, v, valid

    def _update(self, k, v, valid):
        rope, self._next_rope = self._next_rope, None
        note(f"update(n={k.shape[2]}, valid={None if valid is None else valid.astype(int).tolist()}, "
             f"rope_positions={None if rope is None else rope.tolist()})")
        self.ref.update(k, v, valid, rope)
        self.got.update(k, v, valid, rope_positions=rope)
        sk, sv = _to_storage(k, self.dtype), _to_storage(v, self.dtype)
        self.shadow_k = sk if self.shadow_k is None else np.concatenate([self.shadow_k, sk], axis=2)
        self.shadow_v = sv if self.shadow_v is None else np.concatenate([self.shadow_v, sv], axis=2)
        self.pending += k.shape[2]

    # ------------------------------------------------------------------ checks
    def _check_blocks(self):
        want = self.ref.layer.blocks
        got = self._got_blocks = self.got.quantized_blocks()    # reused by the later checks
        assert len(got) == len(want), f"{len(got)} quantized blocks, reference has {len(want)}"
        cal = self.ref.layer.kvquant_calibration
        for i, (g, w, (k, v, pre)) in enumerate(zip(got, want, self.ref.inputs)):
            kq.check_kvquant_block(g, w.keys, w.values, start=w.start, num_slots=w.num_slots,
                                   coded=w.coded, rope_positions=w.rope_positions, keys=k, values=v,
                                   keys_pre_rope=pre, calibration=cal, inv_freq=self.inv_freq,
                                   what=f"block {i} (start {w.start})")

    def _check_quantized_segment(self, g, w):
        kq.check_kvquant_quantized_segment(g, w, self._got_blocks,
                                           [(b.keys, b.values) for b in self.ref.layer.blocks],
                                           self.ref.layer.kvquant_calibration, self.config,
                                           self.inv_freq)

    def _check_nbytes(self):
        """Definition 6.22; each key outlier decision that (9.5) lets flip (RoPE) moves the count
        by one sparse entry (kvquant_checks.expected_nbytes)."""
        want = kq.expected_nbytes(self.ref.nbytes(), self._got_blocks,
                                  [b.keys.num_outliers for b in self.ref.layer.blocks])
        got = self.got.nbytes()
        assert got == want, (f"nbytes() = {got}, reference (docs/06-cache.md definition 6.22, storage "
                             f"{self.dtype}, with the port's key outlier counts) = {want}")


def test_kvquant_cache_state_machine(port):
    class Machine(KVQuantCacheMachine):
        pass
    Machine.port = port
    run_state_machine_as_test(Machine, settings=examples(30, stateful=True))


def test_kvquant_cache_errors(port):
    """Bad kvquant cache input raises ValueError / TypeError (at construction or first update)."""
    cfg = KVSinkConfig(quantizer="kvquant", key_group_size=2, value_group_size=4, residual_length=1,
                       outlier_fraction=0.0)
    x = np.ones((1, 1, 3, 4), np.float32)
    inv = rkv.rope_inv_freq(4)
    # k-means needs a calibration
    with pytest.raises((ValueError, TypeError)):
        port.make_cache(cfg.replace(kvquant_datatype="kmeans"), "float32").update(x, x)
    # a calibration made for other settings
    other = rkv.nf_calibration(cfg.replace(key_bits=3), 1, 4)
    with pytest.raises((ValueError, TypeError)):
        port.make_cache(cfg, "float32", kvquant_calibration=other).update(x, x)
    # rotary positions outside [0, 2**24) at a valid token; wrong shape
    for bad in (np.array([[0, -1, 2]]), np.array([[0, 1, rkv.MAX_POSITION]]), np.array([[0, 1]])):
        cache = port.make_cache(cfg, "float32", rope_inv_freq=inv)
        with pytest.raises((ValueError, TypeError)):
            cache.update(x, x, None, rope_positions=bad)
    # ... but anything is allowed at padding (stored as 0)
    cache = port.make_cache(cfg, "float32", rope_inv_freq=inv)
    cache.update(x, x, np.array([[False, True, True]]), rope_positions=np.array([[-1, 0, 1]]))
    cache.resolve(np.zeros((1, 3), bool))
    cache.flush()
    blocks = cache.quantized_blocks()
    assert len(blocks) == 1 and np.asarray(blocks[0].rope_positions).tolist() == [[0, 0]], \
        "padding slots' rotary positions must be stored as 0 (docs/06-cache.md 6.21)"
