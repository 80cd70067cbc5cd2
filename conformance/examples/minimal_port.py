"""A minimal, independent numpy port of kvsink, written from docs/ only (it imports nothing
from ``reference/``): the example of docs/13-conformance.md.

Run the conformance suite against it::

    pytest conformance/ --impl conformance.examples.minimal_port:factory

It implements the parts "packing", "quantize", "predictor", "attention",
"split_attention" and "cache".  It deliberately leaves out "preserve"
(docs/03-preservation.md) to show how a partial port is reported: the tests of
that part are *skipped*, with the reason, never passed.

Everything follows the equations of docs/02 (quantization, packing), docs/04
(predictor), docs/05 (attention) and docs/06 (cache); the section is named at
each function.  Short and direct, not fast.
"""

from __future__ import annotations

import math

import numpy as np

from conformance.adapter import CacheBlock, Port, Quantized

F32 = np.float32


# ---------------------------------------------------------------- docs/02 §2.4 packing
def _bits(bits, lo=1):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lo <= bits <= 8:
        raise ValueError(f"bits must be an int in {lo}..8, got {bits!r}")
    return int(bits)


def pack_codes(codes, bits):
    bits = _bits(bits)
    codes = np.asarray(codes)
    if codes.dtype.kind not in "ui" or codes.dtype == np.bool_:
        raise TypeError(f"codes must be integers, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}]")
    cpw, n = 32 // bits, codes.shape[-1]
    w = -(-n // cpw)
    padded = np.zeros(codes.shape[:-1] + (w * cpw,), np.uint64)
    padded[..., :n] = codes
    slots = padded.reshape(codes.shape[:-1] + (w, cpw))
    return (slots << (np.arange(cpw, dtype=np.uint64) * bits)).sum(axis=-1).astype(np.uint32)


def unpack_codes(words, bits, n):
    bits = _bits(bits)
    words = np.asarray(words)
    if words.dtype != np.uint32:
        raise TypeError("words must be uint32")
    cpw = 32 // bits
    if words.shape[-1] != -(-n // cpw):
        raise ValueError("words.shape[-1] does not match n")
    slots = (words[..., None].astype(np.uint64) >> (np.arange(cpw, dtype=np.uint64) * bits)) & (2**bits - 1)
    flat = slots.reshape(words.shape[:-1] + (-1,))
    if np.any(flat[..., n:]) or (cpw * bits < 32 and np.any(words.astype(np.uint64) >> (cpw * bits))):
        raise ValueError("unused bits of the words must be zero")
    return flat[..., :n].astype(np.uint8)


# ---------------------------------------------------------------- docs/02 §2.2, 2.3, 2.5, 2.6
def _groups_shape(shape, g, axis):
    *lead, t, d = shape
    return tuple(lead) + ((t, -(-d // g)) if axis == "token" else (-(-t // g), d))


def _expand(stat, g, shape, axis):
    if axis == "token":
        return np.repeat(stat, g, axis=-1)[..., :shape[-1]]
    return np.repeat(stat, g, axis=-2)[..., :shape[-2], :]


def quantize(x, bits, group_size, axis, symmetric=False, exclude=None):
    if axis not in ("token", "channel"):
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    bits = _bits(bits, 2 if symmetric else 1)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError("group_size must be an int >= 1")
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError("x must have shape (..., T, D)")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or Inf")
    x = x.astype(np.float64).astype(F32)               # float64 is rounded to float32 first
    ex = np.zeros(x.shape[:-1], bool) if exclude is None else np.asarray(exclude)
    if ex.shape != x.shape[:-1]:
        raise ValueError("exclude must have shape x.shape[:-1]")
    counted = np.broadcast_to(~ex[..., None], x.shape)
    g, sshape = int(group_size), _groups_shape(x.shape, group_size, axis)
    # group statistics, group by group (a loop: clear, not fast)
    gax = -1 if axis == "token" else -2
    n = x.shape[gax]
    lo = np.zeros(sshape, F32)
    hi = np.zeros(sshape, F32)
    for i in range(sshape[gax]):
        sl = (Ellipsis, slice(i * g, (i + 1) * g)) if axis == "token" else (Ellipsis, slice(i * g, (i + 1) * g), slice(None))
        xs, cs = x[sl], counted[sl]
        red = -1 if axis == "token" else -2
        any_ = cs.any(axis=red)
        if symmetric:
            hi[(Ellipsis, i) if axis == "token" else (Ellipsis, i, slice(None))] = np.where(cs, np.abs(xs), 0).max(axis=red, initial=0)
        else:
            mn = np.where(cs, xs, np.inf).min(axis=red, initial=np.inf)
            mx = np.where(cs, xs, -np.inf).max(axis=red, initial=-np.inf)
            idx = (Ellipsis, i) if axis == "token" else (Ellipsis, i, slice(None))
            lo[idx] = np.where(any_, mn, 0)
            hi[idx] = np.where(any_, mx, 0)
    if symmetric:
        m = 2 ** (bits - 1) - 1
        s = (hi / F32(m)).astype(F32)
        sf = _expand(s, g, x.shape, axis)
        xe = np.where(counted, x, F32(0))
        t = np.divide(xe, sf, out=np.zeros_like(xe), where=sf != 0)
        q = (np.clip(np.rint(t), -m, m) + m).astype(np.uint8)
        return q, s, None
    levels = 2**bits - 1
    s = ((hi - lo).astype(F32) / F32(levels)).astype(F32)
    sf, zf = _expand(s, g, x.shape, axis), _expand(lo, g, x.shape, axis)
    xe = np.where(counted, x, zf)
    t = np.divide((xe - zf).astype(F32), sf, out=np.zeros_like(xe), where=sf != 0)
    return np.clip(np.rint(t), 0, levels).astype(np.uint8), s, lo


def dequantize(codes, scale, zero, bits, group_size, axis, symmetric):
    sf = _expand(np.asarray(scale, F32), group_size, codes.shape, axis)
    if symmetric:
        return ((codes.astype(F32) - F32(2 ** (bits - 1) - 1)) * sf).astype(F32)
    zf = _expand(np.asarray(zero, F32), group_size, codes.shape, axis)
    return ((codes.astype(F32) * sf).astype(F32) + zf).astype(F32)     # two roundings, no FMA


# ---------------------------------------------------------------- docs/04 predictor
def outlier_scores(hidden, channels):
    h = np.asarray(hidden)
    ch = list(channels) if not isinstance(channels, (int, np.integer)) else [channels]
    if not ch or len(set(ch)) != len(ch) or any(isinstance(c, bool) or not 0 <= c < h.shape[-1] for c in ch):
        raise ValueError(f"bad channels {channels!r}")
    if not np.all(np.isfinite(h)):
        raise ValueError("hidden contains NaN or Inf")
    return np.abs(h.astype(np.float64).astype(F32)[..., ch]).max(axis=-1)


def predict_sinks(hidden, channels, threshold):
    if isinstance(threshold, bool) or not math.isfinite(float(threshold)) or threshold <= 0:
        raise ValueError("threshold must be a finite float > 0")
    return outlier_scores(hidden, channels).astype(np.float64) > float(threshold)


# ---------------------------------------------------------------- docs/05 attention
def _check(*arrays):
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise ValueError("attention inputs contain NaN or Inf")


def partial(q, k, v, qp, kp, scale):
    """(m, l, acc) of one segment (definition 5.4), float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    _check(q, k, v)
    hq, h = q.shape[1], k.shape[1]
    if h == 0 or hq % h:
        raise ValueError("query heads must be a multiple of key heads")
    heads = np.arange(hq) // (hq // h)
    c = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    e = np.einsum("bhtd,bhsd->bhts", q, k[:, heads]) * c
    kp, qp = np.asarray(kp), np.asarray(qp)
    vis = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])
    e = np.where(vis[:, None], e, -np.inf)
    m = e.max(axis=-1, initial=-np.inf)
    p = np.where(vis[:, None], np.exp(e - np.where(np.isfinite(m), m, 0)[..., None]), 0)
    return m, p.sum(-1), np.einsum("bhts,bhsd->bhtd", p, v[:, heads])


def merge(parts, shape):
    if not parts:
        return np.zeros(shape)
    ms = np.stack([p[0] for p in parts])
    big = ms.max(axis=0)
    w = np.where(np.isfinite(ms), np.exp(ms - np.where(np.isfinite(big), big, 0)), 0)
    num = sum(wi[..., None] * p[2] for wi, p in zip(w, parts))
    den = sum(wi * p[1] for wi, p in zip(w, parts))
    return np.where((den > 0)[..., None], num / np.where(den > 0, den, 1)[..., None], 0)


# ---------------------------------------------------------------- docs/06 cache
class Cache:
    """One layer (docs/06-cache.md 6.0-6.17), stores kept as plain arrays and lists."""

    def __init__(self, config, dtype):
        self.cfg, self.dtype = config, dtype
        self.store = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}[dtype]
        self.reset()

    def reset(self):
        self.dims, self.blocks, self.start, self.pending = None, [], 0, 0
        self.pres = []          # per row: list of (position, k (H, D), v (H, D))

    @property
    def seq_length(self):
        return self.start + (0 if self.dims is None else self.rk.shape[2])

    def _cast(self, x):
        x = np.asarray(x, np.float32)
        if self.dtype == "bfloat16":     # round to bfloat16, kept in float32
            u = x.view(np.uint32).astype(np.uint64)
            x = (((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)).view(np.float32)
        return x.astype(self.store)

    def update(self, keys, values, valid=None):
        k, v = self._cast(keys), self._cast(values)
        b, h, n, d = k.shape
        valid = np.ones((b, n), bool) if valid is None else np.asarray(valid, bool)
        if self.dims is None:
            self.dims = (b, h, d)
            self.rk = np.zeros((b, h, 0, d), self.store)
            self.rv = self.rk.copy()
            self.rvalid = np.zeros((b, 0), bool)
            self.rflag = np.zeros((b, 0), bool)
            self.pres = [[] for _ in range(b)]
        self.rk, self.rv = np.concatenate([self.rk, k], 2), np.concatenate([self.rv, v], 2)
        self.rvalid = np.concatenate([self.rvalid, valid], 1)
        self.rflag = np.concatenate([self.rflag, np.zeros((b, n), bool)], 1)
        self.pending += n

    def resolve(self, preserve):
        preserve = np.asarray(preserve, bool)
        r = self.rk.shape[2]
        if np.any(preserve & ~self.rvalid[:, r - self.pending:]):
            raise ValueError("preserve marks a padding token")
        self.rflag[:, r - self.pending:] = preserve
        self.pending = 0

    def flush(self):
        if self.dims is None:
            return
        blk, big_r = self.cfg.token_block, self.cfg.residual_length
        r = self.rk.shape[2]
        due = blk * ((r - big_r) // blk) if r >= big_r + blk else 0
        if due > r - self.pending:
            raise RuntimeError("resolve() the status of tokens before flushing")
        cap = self.cfg.max_preserved
        for _ in range(due // blk):
            k, v = self.rk[:, :, :blk], self.rv[:, :, :blk]
            admitted = np.zeros((self.dims[0], blk), bool)
            for row in range(self.dims[0]):
                for j in range(blk):
                    if self.rflag[row, j] and (cap is None or len(self.pres[row]) < cap):
                        admitted[row, j] = True
                        self.pres[row].append((self.start + j, k[row, :, j].copy(), v[row, :, j].copy()))
            coded = self.rvalid[:, :blk] & ~admitted
            ex = np.broadcast_to(~coded[:, None, :], k.shape[:3])
            sym = self.cfg.scheme == "symmetric"
            kq = quantize(k, self.cfg.key_bits, self.cfg.key_group_size, self.cfg.key_axis, sym, ex)
            vq = quantize(v, self.cfg.value_bits, self.cfg.value_group_size, self.cfg.value_axis, sym, ex)
            self.blocks.append([self.start, blk, coded, kq, vq])
            self.rk, self.rv = self.rk[:, :, blk:], self.rv[:, :, blk:]
            self.rvalid, self.rflag = self.rvalid[:, blk:], self.rflag[:, blk:]
            self.start += blk

    def _deq(self, q, side):
        c = self.cfg
        return dequantize(q[0], q[1], q[2], getattr(c, f"{side}_bits"), getattr(c, f"{side}_group_size"),
                          getattr(c, f"{side}_axis"), c.scheme == "symmetric")

    def segments(self):
        if self.dims is None:
            return []
        b, h, d = self.dims
        qk = [self._deq(blk[3], "key") for blk in self.blocks]
        qv = [self._deq(blk[4], "value") for blk in self.blocks]
        qp = [np.where(blk[2] & (np.arange(blk[2].shape[1]) < blk[1]), blk[0] + np.arange(blk[2].shape[1]), -1)
              for blk in self.blocks]
        seg_q = (np.concatenate(qk, 2) if qk else np.zeros((b, h, 0, d), F32),
                 np.concatenate(qv, 2) if qv else np.zeros((b, h, 0, d), F32),
                 np.concatenate(qp, 1) if qp else np.zeros((b, 0), np.int64))
        p = max((len(r) for r in self.pres), default=0)
        pk, pv = np.zeros((b, h, p, d), self.store), np.zeros((b, h, p, d), self.store)
        pp = np.full((b, p), -1, np.int64)
        for row, entries in enumerate(self.pres):
            for j, (pos, k, v) in enumerate(entries):
                pp[row, j], pk[row, :, j], pv[row, :, j] = pos, k, v
        rp = np.where(self.rvalid, self.start + np.arange(self.rk.shape[2]), -1)
        return [seg_q, (pk, pv, pp), (self.rk.copy(), self.rv.copy(), rp)]

    def attend(self, query, query_positions, scale=None):
        parts = [partial(query, k, v, query_positions, p, scale) for k, v, p in self.segments()]
        return merge(parts, np.shape(query))

    def crop(self, max_length):
        length = self.seq_length
        m = length + max_length if max_length < 0 else max_length
        if m < 0:
            raise ValueError("crop below 0")
        if m >= length:
            return
        self.blocks = [blk for blk in self.blocks if blk[0] < m]
        for blk in self.blocks:
            blk[1] = min(blk[1], m - blk[0])
        keep = max(0, m - self.start)
        dropped = self.rk.shape[2] - keep
        self.rk, self.rv = self.rk[:, :, :keep], self.rv[:, :, :keep]
        self.rvalid, self.rflag = self.rvalid[:, :keep], self.rflag[:, :keep]
        self.pending = max(0, self.pending - dropped)
        self.start = min(self.start, m)
        self.pres = [[e for e in row if e[0] < m] for row in self.pres]

    def _take(self, idx):
        idx = np.asarray(idx, np.int64)
        if idx.ndim != 1 or idx.size == 0 or np.any(idx < 0) or np.any(idx >= self.dims[0]):
            raise ValueError("bad row indices")
        for blk in self.blocks:
            blk[2] = blk[2][idx]
            blk[3] = tuple(None if a is None else a[idx] for a in blk[3])
            blk[4] = tuple(None if a is None else a[idx] for a in blk[4])
        self.pres = [list(self.pres[i]) for i in idx]
        self.rk, self.rv, self.rvalid, self.rflag = self.rk[idx], self.rv[idx], self.rvalid[idx], self.rflag[idx]
        self.dims = (len(idx),) + self.dims[1:]

    def reorder(self, beam_idx):
        if self.dims is not None:
            if len(beam_idx) != self.dims[0]:
                raise ValueError("beam_idx must have length B")
            self._take(beam_idx)

    def select_batch(self, indices):
        if self.dims is not None:
            self._take(indices)

    def nbytes(self):
        """Definition 6.17 (bfloat16 counted as 2 bytes although held in float32)."""
        if self.dims is None:
            return 0
        b, h, d = self.dims
        item = 2 if self.dtype in ("float16", "bfloat16") else 4
        total = 0
        for blk in self.blocks:
            for q, side in ((blk[3], "key"), (blk[4], "value")):
                bits = getattr(self.cfg, f"{side}_bits")
                total += 4 * b * h * q[0].shape[2] * -(-d // (32 // bits))
                total += 4 * q[1].size * (1 if q[2] is None else 2)
            total += blk[2].size
        p = max((len(r) for r in self.pres), default=0)
        r = self.rk.shape[2]
        return total + 2 * b * h * p * d * item + 8 * b * p + 2 * b * h * r * d * item + 2 * b * r

    def preserved_positions(self):
        return [np.array([e[0] for e in row], np.int64) for row in self.pres] if self.dims else []

    def quantized_blocks(self):
        return [CacheBlock(blk[0], blk[1], blk[2], Quantized(*blk[3]), Quantized(*blk[4]))
                for blk in self.blocks]


# ---------------------------------------------------------------- the adapter
class MinimalPort(Port):
    name = "minimal numpy port (conformance/examples)"
    parts = frozenset({"packing", "quantize", "predictor", "attention", "split_attention", "cache"})

    def pack_codes(self, codes, bits):
        return pack_codes(codes, bits)

    def unpack_codes(self, words, bits, n):
        return unpack_codes(words, bits, n)

    def quantize(self, x, bits, group_size, axis, *, symmetric=False, exclude=None):
        return Quantized(*quantize(x, bits, group_size, axis, symmetric, exclude))

    def dequantize(self, codes, scale, zero, *, bits, group_size, axis, symmetric):
        return dequantize(np.asarray(codes), scale, zero, bits, group_size, axis, symmetric)

    def outlier_scores(self, hidden, channels):
        return outlier_scores(hidden, channels)

    def predict_sinks(self, hidden, channels, threshold):
        return predict_sinks(hidden, channels, threshold)

    def attention(self, query, keys, values, *, query_positions, key_positions, key_valid=None, scale=None):
        kp = np.asarray(key_positions)
        if key_valid is not None:
            kp = np.where(key_valid, kp, -1)
        return merge([partial(query, keys, values, query_positions, kp, scale)], np.shape(query))

    def split_attention(self, query, segments, *, query_positions, scale=None):
        _check(np.asarray(query, np.float64))
        return merge([partial(query, k, v, query_positions, p, scale) for k, v, p in segments],
                     np.shape(query))

    def make_cache(self, config, dtype="float32"):
        return Cache(config, dtype)


def factory() -> MinimalPort:
    return MinimalPort()
