"""The quantized KV cache, stateful (CONTRACT: cache; docs/06-cache.md).

A Hypothesis ``RuleBasedStateMachine`` drives the port's cache and the
reference cache (``reference.cache.QuantizedKVCacheLayer``) through the same
random sequence of operations — prefill, decode steps, sink arrivals
(``resolve`` with random preserve flags), ``flush``, ``crop``, ``reorder``,
``select_batch`` and ``reset`` — and after every step checks:

* the same ``seq_length`` and preserved positions (exact);
* the same quantized blocks: ``start`` and ``coded`` exact, scales and zero
  points bit-identical, codes under docs/09-tolerances.md 9.2(a);
* the same segments: positions exact, full-precision parts exact, the
  dequantized part under 9.2(b) / 9.4;
* the same ``nbytes`` (docs/06-cache.md definition 6.17);

and, on the ``attend`` rule, that the port's attention over its cache is
within the bound of 9.3 of the float64 attention over the port's own segments
(the segments being checked against the reference separately, this bounds the
port against the reference).

A shadow copy of every token written (rounded to the storage dtype) gives the
reference's ratio ``t = (x - z) / s`` needed by the near-tie rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import note, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from reference import quantize as rq
from reference.attention import visible_keys
from reference.cache import flushed_length

from . import tolerances as tol
from .adapter import round_to_bfloat16
from .impls import ReferenceCache
from .profiles import examples
from .strategies import cache_configs, kv_tensors, seeds

pytestmark = pytest.mark.part("cache")

STORAGE = ("float32", "float16", "bfloat16")


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as stored by a cache of ``dtype`` (the port receives the same numbers)."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return round_to_bfloat16(x)
    return x.astype(np.float32)


class CacheMachine(RuleBasedStateMachine):
    port = None   # set by the test

    def __init__(self):
        super().__init__()
        self.ref = None
        self.got = None

    # ------------------------------------------------------------------ setup
    @initialize(data=st.data())
    def setup(self, data):
        draw = data.draw
        self.d = draw(st.sampled_from([1, 2, 3, 4, 8, 16]), label="D")
        self.config = draw(cache_configs(head_dim=self.d), label="config")
        self.h = draw(st.integers(1, 2), label="H")
        self.gqa = draw(st.sampled_from([1, 2]), label="gqa_ratio")
        self.b = draw(st.integers(1, 3), label="B")
        self.dtype = draw(st.sampled_from(STORAGE), label="storage dtype")
        note(f"config={self.config}; B={self.b} H={self.h} Hq={self.h * self.gqa} D={self.d} "
             f"dtype={self.dtype}")
        self.ref = ReferenceCache(self.config, self.dtype)
        self.got = self.port.make_cache(self.config, self.dtype)
        self.shadow_k = None      # float32 (B, H, T, D): every token written, by position
        self.shadow_v = None
        self.pending = 0

    # ------------------------------------------------------------------ helpers
    def _draw_tokens(self, data, n):
        shape = (self.b, self.h, n, self.d)
        # the "grid" pattern matched to each side's bits and scheme: exact ties in the cache, where
        # codes must round half to even in every port (docs/09-tolerances.md 9.2(a))
        sym = self.config.scheme == "symmetric"
        k = data.draw(kv_tensors(shape, grid_bits=self.config.key_bits, grid_symmetric=sym), label="keys")
        v = data.draw(kv_tensors(shape, grid_bits=self.config.value_bits, grid_symmetric=sym),
                      label="values")
        valid = None
        if data.draw(st.booleans(), label="has_padding"):
            rng = np.random.default_rng(data.draw(seeds, label="valid_seed"))
            valid = rng.random((self.b, n)) < 0.8
        return k, v, valid

    def _update(self, k, v, valid):
        note(f"update(n={k.shape[2]}, valid={None if valid is None else valid.astype(int).tolist()})")
        self.ref.update(k, v, valid)
        self.got.update(k, v, valid)
        sk, sv = _to_storage(k, self.dtype), _to_storage(v, self.dtype)
        self.shadow_k = sk if self.shadow_k is None else np.concatenate([self.shadow_k, sk], axis=2)
        self.shadow_v = sv if self.shadow_v is None else np.concatenate([self.shadow_v, sv], axis=2)
        self.pending += k.shape[2]

    def _resolve(self, data):
        r = self.ref.layer
        pending_valid = r.residual[2][:, r.num_residual - self.pending:]
        rng = np.random.default_rng(data.draw(seeds, label="preserve_seed"))
        p = data.draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]), label="preserve_p")
        flags = (rng.random(pending_valid.shape) < p) & pending_valid
        note(f"resolve({flags.astype(int).tolist()})")
        self.ref.resolve(flags)
        self.got.resolve(flags)
        self.pending = 0

    def _flush(self):
        note("flush()")
        self.ref.flush()
        self.got.flush()

    # ------------------------------------------------------------------ rules
    @rule(data=st.data())
    def prefill(self, data):
        """A chunk of tokens (a prefill or a speculative block), resolved and flushed."""
        blk, r = self.config.token_block, self.config.residual_length
        n = data.draw(st.integers(1, 2 * blk + r + 2), label="n")
        self._update(*self._draw_tokens(data, n))
        if data.draw(st.booleans(), label="resolve_now"):
            self._resolve(data)
            self._flush()

    @rule(data=st.data())
    def decode_step(self, data):
        """One token: update, resolve (the sink decision arrives with the token), flush."""
        if self.pending:
            self._resolve(data)
        self._update(*self._draw_tokens(data, 1))
        self._resolve(data)
        self._flush()

    @precondition(lambda self: self.pending > 0)
    @rule(data=st.data())
    def sink_arrival(self, data):
        """The statuses of the pending tokens arrive (random preserve flags, never on padding)."""
        self._resolve(data)

    @rule()
    def flush(self):
        r = self.ref.layer
        if r.batch_size is not None and flushed_length(r.num_residual, self.config) > r.num_residual - self.pending:
            note("flush() with a pending token in the way: both must raise")
            with pytest.raises(Exception):
                self.ref.flush()
            try:
                self.got.flush()
            except (RuntimeError, ValueError):
                return
            raise AssertionError("the port's flush() did not raise although a token to be flushed "
                                 "is still pending (docs/06-cache.md 6.3: resolve() first)")
        self._flush()

    @precondition(lambda self: self.ref is not None and self.ref.seq_length > 0)
    @rule(data=st.data())
    def crop(self, data):
        length = self.ref.seq_length
        # mostly a few tokens off the end (speculative decoding), sometimes anywhere
        m = data.draw(st.one_of(st.integers(-min(length, 3), -1), st.integers(0, length + 2)),
                      label="max_length")
        note(f"crop({m})")
        self.ref.crop(m)
        self.got.crop(m)
        t = self.ref.seq_length
        self.shadow_k, self.shadow_v = self.shadow_k[:, :, :t], self.shadow_v[:, :, :t]
        self.pending = self.ref.layer.num_pending

    @precondition(lambda self: self.ref is not None and self.config.token_block > 1
                  and any(b.num_slots > 1 for b in self.ref.layer.blocks))
    @rule(data=st.data())
    def crop_inside_block(self, data):
        """A crop that cuts a quantized block in two (its codes stay, docs/06-cache.md 6.14)."""
        starts = [(b.start, b.num_slots) for b in self.ref.layer.blocks if b.num_slots > 1]
        start, slots = data.draw(st.sampled_from(starts), label="block (start, slots)")
        m = start + data.draw(st.integers(1, slots - 1), label="cut")
        note(f"crop({m})  (inside the block at {start})")
        self.ref.crop(m)
        self.got.crop(m)
        self.shadow_k, self.shadow_v = self.shadow_k[:, :, :m], self.shadow_v[:, :, :m]
        self.pending = self.ref.layer.num_pending

    @precondition(lambda self: self.ref is not None and self.ref.layer.batch_size is not None)
    @rule(data=st.data())
    def reorder(self, data):
        idx = np.asarray(data.draw(st.lists(st.integers(0, self.b - 1), min_size=self.b,
                                            max_size=self.b), label="beam_idx"), dtype=np.int64)
        note(f"reorder({idx.tolist()})")
        self.ref.reorder(idx)
        self.got.reorder(idx)
        self.shadow_k, self.shadow_v = self.shadow_k[idx], self.shadow_v[idx]

    @precondition(lambda self: self.ref is not None and self.ref.layer.batch_size is not None)
    @rule(data=st.data())
    def select_batch(self, data):
        idx = np.asarray(data.draw(st.lists(st.integers(0, self.b - 1), min_size=1, max_size=3),
                                   label="indices"), dtype=np.int64)
        note(f"select_batch({idx.tolist()})")
        self.ref.select_batch(idx)
        self.got.select_batch(idx)
        self.shadow_k, self.shadow_v = self.shadow_k[idx], self.shadow_v[idx]
        self.b = len(idx)

    @rule(data=st.data())
    def reset(self, data):
        # a reset empties the cache: drawn rarely, so that runs reach long caches
        if data.draw(st.integers(0, 3), label="reset_roll") != 0:
            return
        note("reset()")
        self.ref.reset()
        self.got.reset()
        self.shadow_k = self.shadow_v = None
        self.pending = 0

    @precondition(lambda self: self.ref is not None and self.ref.layer.batch_size is not None)
    @rule(data=st.data())
    def attend(self, data):
        hq = self.h * self.gqa
        tq = data.draw(st.integers(1, 3), label="Tq")
        q = data.draw(kv_tensors((self.b, hq, tq, self.d), allow_special=False), label="query")
        q = np.clip(q, -100, 100).astype(np.float32)
        q = _to_storage(q, self.dtype)
        length = self.ref.seq_length
        start = data.draw(st.integers(0, length), label="query_start")
        qp = np.tile(np.arange(start, start + tq, dtype=np.int64), (self.b, 1))
        note(f"attend(query {q.shape}, positions {start}..{start + tq - 1})")
        got = np.asarray(self.got.attend(q, qp))
        segs = self.got.segments()
        keys = np.concatenate([np.asarray(s[0], np.float64) for s in segs], axis=2)
        values = np.concatenate([np.asarray(s[1], np.float64) for s in segs], axis=2)
        kpos = np.concatenate([np.asarray(s[2], np.int64) for s in segs], axis=1)
        from reference.attention import attention
        want = attention(q, keys, values, query_positions=qp, key_positions=kpos)
        n_vis = visible_keys(qp, kpos).sum(axis=-1)
        bound = tol.attention_bound(q, keys, values, n_vis, None, self.dtype)
        tol.check_attention(got, want, bound, n_vis, "cache.attend vs attention over its segments")

    # ------------------------------------------------------------------ invariants
    @invariant()
    def same_state(self):
        if self.ref is None:
            return
        assert self.got.seq_length == self.ref.seq_length, \
            f"seq_length {self.got.seq_length} != reference {self.ref.seq_length}"
        want_p = self.ref.preserved_positions()
        got_p = self.got.preserved_positions()
        assert len(got_p) == len(want_p), f"preserved_positions has {len(got_p)} rows, want {len(want_p)}"
        for row, (g, w) in enumerate(zip(got_p, want_p)):
            assert np.array_equal(np.asarray(g, np.int64), w), \
                f"row {row}: preserved positions {np.asarray(g).tolist()} != reference {w.tolist()}"
        self._check_blocks()
        self._check_segments()
        self._check_nbytes()

    def _check_blocks(self):
        want = self.ref.quantized_blocks()
        got = self.got.quantized_blocks()
        assert len(got) == len(want), f"{len(got)} quantized blocks, reference has {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.start == w.start, f"block {i}: start {g.start} != reference {w.start}"
            assert g.num_slots == w.num_slots, \
                f"block {i} (start {w.start}): num_slots {g.num_slots} != reference {w.num_slots}"
            tol.assert_identical(g.coded, w.coded, f"block {i} (start {w.start}) coded mask")
            k = w.num_slots
            for side, gq, wq, bits_axis in (("keys", g.keys, w.keys, "key"), ("values", g.values, w.values, "value")):
                what = f"block {i} (start {w.start}) {side}"
                tol.assert_identical(gq.scale, wq.scale, f"{what} scale")
                if wq.zero is None:
                    assert gq.zero is None, f"{what}: symmetric scheme, zero must be None"
                else:
                    tol.assert_identical(gq.zero, wq.zero, f"{what} zero")
                t_ref, counted, exact = self._ratio(w, wq, bits_axis, side)
                tol.check_codes(np.asarray(gq.codes)[:, :, :k], np.asarray(wq.codes)[:, :, :k],
                                t_ref, counted, f"{what} codes", exact=exact)

    def _ratio(self, block, wq, prefix, side):
        """Reference ratio t of the block's first k slots, from the shadow copy of the tokens."""
        cfg = self.config
        k = block.num_slots
        n = wq.codes.shape[2]
        shadow = self.shadow_k if side == "keys" else self.shadow_v
        x = np.zeros(wq.codes.shape, np.float32)
        x[:, :, :k] = shadow[:, :, block.start:block.start + k]
        axis = getattr(cfg, f"{prefix}_axis")
        g = getattr(cfg, f"{prefix}_group_size")
        gax = rq.GROUP_AXIS[axis]
        s = rq.expand_groups(wq.scale, g, wq.codes.shape[gax], gax)
        coded = np.zeros((x.shape[0], n), bool)
        coded[:, :k] = block.coded[:, :k]
        counted = np.broadcast_to(coded[:, None, :, None], x.shape)
        z = None if wq.zero is None else rq.expand_groups(wq.zero, g, wq.codes.shape[gax], gax)
        t, exact = tol.uniform_ratio(x, s, z, counted)
        return t[:, :, :k], counted[:, :, :k], exact[:, :, :k]

    def _check_segments(self):
        want = self.ref.segments()
        got = self.got.segments()
        assert len(got) == len(want), f"segments() returned {len(got)} segments, reference {len(want)}"
        names = ("quantized", "preserved", "residual")
        for i, (g, w) in enumerate(zip(got, want)):
            name = names[i] if i < 3 else str(i)
            tol.assert_identical(g[2], w[2], f"{name} segment key_positions")
            if i == 0:
                self._check_quantized_segment(g, w)
            else:
                for j, side in ((0, "keys"), (1, "values")):
                    gv = np.asarray(g[j], np.float32)
                    wv = np.asarray(w[j], np.float32)
                    live = np.broadcast_to((np.asarray(w[2]) >= 0)[:, None, :, None], wv.shape)
                    tol.assert_identical(np.where(live, gv, 0), np.where(live, wv, 0),
                                         f"{name} segment {side} (full precision)")

    def _check_quantized_segment(self, g, w):
        want_k, want_v, pos = w
        if want_k.shape[2] == 0:
            assert np.asarray(g[0]).shape == want_k.shape, \
                f"quantized segment keys shape {np.asarray(g[0]).shape} != {want_k.shape}"
            return
        got_blocks = self.got.quantized_blocks()
        ref_blocks = self.ref.quantized_blocks()
        for j, side, prefix in ((0, "keys", "key"), (1, "values", "value")):
            gc, wc, sf = [], [], []
            for gb, wb in zip(got_blocks, ref_blocks):
                k = wb.coded.shape[1]      # every code slot (dead ones are masked below)
                gq, wq = (gb.keys, wb.keys) if side == "keys" else (gb.values, wb.values)
                axis = getattr(self.config, f"{prefix}_axis")
                grp = getattr(self.config, f"{prefix}_group_size")
                gax = rq.GROUP_AXIS[axis]
                s = rq.expand_groups(wq.scale, grp, wq.codes.shape[gax], gax)
                gc.append(np.asarray(gq.codes)[:, :, :k])
                wc.append(np.asarray(wq.codes)[:, :, :k])
                sf.append(s[:, :, :k])
            gc, wc, sf = (np.concatenate(a, axis=2) for a in (gc, wc, sf))
            live = np.broadcast_to((pos >= 0)[:, None, :, None], w[j].shape)
            gv = np.asarray(g[j], np.float64)
            assert gv.shape == w[j].shape, f"quantized segment {side} shape {gv.shape} != {w[j].shape}"
            tol.check_dequantized_near(np.where(live, gv, 0), np.where(live, w[j], 0), gc, wc, sf,
                                       f"quantized segment {side} (dequantized)")

    def _check_nbytes(self):
        want = self.ref.nbytes()
        got = self.got.nbytes()
        assert got == want, (f"nbytes() = {got}, reference (docs/06-cache.md definition 6.17, "
                             f"storage {self.dtype}) = {want}")


def test_cache_state_machine(port):
    class Machine(CacheMachine):
        pass
    Machine.port = port
    run_state_machine_as_test(Machine, settings=examples(60, stateful=True))


@pytest.mark.parametrize("residual_length", [0, 4])
def test_resolve_rejects_preserve_on_padding(port, residual_length):
    """docs/06-cache.md: padding is never preserved; ``resolve`` with ``True`` on a padding slot is
    a ``ValueError`` (a port that drops the flag silently hides its caller's bug)."""
    from reference.config import KVSinkConfig
    cfg = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=2, value_group_size=2,
                       residual_length=residual_length, preserve="pfn")
    cache = port.make_cache(cfg, "float32")
    keys = np.arange(2 * 1 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 4)
    valid = np.array([[True, True, True], [False, True, True]])     # row 1 left-padded
    cache.update(keys, keys, valid)
    flags = np.array([[True, False, False], [True, False, False]])   # (1, 0) is padding
    with pytest.raises(ValueError, match="padding"):
        cache.resolve(flags)
    cache.resolve(flags & valid)                                      # the same without it is fine
