# Decode attention over the packed quantized segment (Triton, split-K / flash-decoding), called by
# accelerated/attention.py::quantized_segment_attention.  It produces the segment's partial
# statistics (m, l, acc), which the caller merges (log-sum-exp, docs/05-attention.md Def. 5.5) with
# those of the full-precision preserved and residual segments.
#
# MEMORY LAYOUT (all contiguous)
#   query    float32 (B, H, R, D), R = g*Tq rows: query head h*g + i, query j -> row i*Tq + j
#   qpos     int64 (B, Tq);  kpos int64 (B, T) (key_valid already folded in: invalid -> -1)
#   K words  int32 (B, H, T, Wk), Wk = ceil(D / cpw_k): code d of token t in word d // cpw at bits
#            (d % cpw)*b .. (LSB first, uint32 bit pattern);   V words likewise (Wv)
#   K scale / zero float32: axis "channel" (B, H, ceil(T/G), D); axis "token" (B, H, T, ceil(D/G));
#            zero absent (symmetric scheme).  V likewise.
#   out: m, l float32 (B*H, n_split, R); acc float32 (B*H, n_split, R, D); merged over the splits
#        by merge_splits_kernel (one launch) into (B, Hq, Tq[, D]).
#   Grid (B*H, n_split): a program owns one KV head (all g*Tq query rows of its group, so the
#   packed K/V are read ONCE) and a contiguous token range, BLOCK_T tokens per step; the codes are
#   unpacked and dequantized in registers (x = q*s + z), never written back.
#   Two kernels: quantized_attention_kernel (many rows: tl.dot, or "tf32x3") and, for decode
#   (<= 8 rows per KV head, "ieee"), decode_attention_kernel further down (grid (B*H*NRG, n_split)).
#   Their launch settings are DotLaunch / DecodeLaunch, chosen by dot_launch / decode_launch from the
#   device's SM count (accelerated/attention_launch.py); earlier versions (the v2 kernel with its torch
#   merge) live in bench/versions/ for the before/after timings.
#
# BYTES MOVED PER CALL (the floor: every packed word and statistic read once)
#   K, V words: 2 * 4*B*H*T*ceil(D/cpw);  stats: 4*B*H*(n_stat_k*(2 or 1) + n_stat_v*(2 or 1));
#   positions 8*B*T; query, partials: small.
#   Realistic shape: B=1, H=8 KV heads (Hq=32, Tq=1), T=32768 tokens, D=128, 2-bit, KIVI layout
#   (keys per channel G=32, values per token G=32, asymmetric):
#     words  2 * 8*32768*8*4                    = 16.8 MB
#     K stats 8*1024*128*4*2 = 8.4 MB; V stats 8*32768*4*4*2 = 8.4 MB
#     positions 0.26 MB                    total ~= 33.8 MB -> 11.3 us at 3 TB/s
#   (The float32 statistics are as large as the 2-bit codes at G=32: that is the format, not the
#   kernel.)  FLOPs: 2 * (g*Tq) * T * D * 2 = 33.6 MFLOP useful (Hq=32), but the dot is padded to 16
#   rows: 4x that on CUDA cores with input_precision="ieee" (~134 MFLOP, ~2-4 us at fp32 FMA
#   rate), so the kernel is memory-bound by design.
#
# NUMERICS: float32; dot products with input_precision "ieee" (no TF32) by default; exp is
#   Triton's (ex2-based, rel. error <= 2^-22, inside k_exp of docs/09-tolerances.md 9.3).
#   Dequantization q*s + z may be contracted to one FMA by the compiler: |x'-x| <= 2u(|q s| + |x|)
#   (docs/09-tolerances.md 9.2 b), added as input difference to the 9.3 bound by the tests.

from __future__ import annotations

from typing import Optional

import torch

from .attention_launch import DecodeLaunch, decode_launch, dot_launch, merge_launch
from .triton_support import tl, triton

__all__ = ["quantized_attention_kernel", "decode_attention_kernel", "merge_splits_kernel",
           "online_softmax_step", "merge_split_row", "decode_query_tile", "split_tile_count",
           "decode_split_state", "store_split_partial", "stat_count", "strided_parts",
           "split_partials", "merge_split_partials", "split_launch_arguments",
           "quantized_partial_attention", "decode_partial_attention"]


@triton.jit
def online_softmax_step(sc, kpos, qpos, row_ok, m_i, l_i):
    """One tile of the online softmax (docs/05): logits ``sc`` (rows, keys) masked by the
    visibility rule (key slot not empty, position ``<=`` the query's; padded rows out), the new
    running max, the rescaling ``alpha`` of the old sums, the tile's weights ``p`` (0 where not
    visible, also when a row has seen no key yet) and the new running sum."""
    vis = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None]) & row_ok[:, None]
    sc = tl.where(vis, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.where(vis, tl.exp(sc - m_safe[:, None]), 0.0)
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, bh, t, t_ok, d, d_ok, T, NG,
                  D: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr, CPW: tl.constexpr,
                  G: tl.constexpr, CHANNEL: tl.constexpr, SYM: tl.constexpr):
    ok = t_ok[:, None] & d_ok[None, :]
    row = bh * T + t                                               # int64 (BLOCK_T,)
    word = tl.load(w_ptr + row[:, None] * W + (d // CPW)[None, :], mask=ok, other=0)
    code = ((word >> ((d % CPW) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    if CHANNEL:
        sidx = (bh * NG + t // G)[:, None] * D + d[None, :]
    else:
        sidx = row[:, None] * NG + (d // G)[None, :]
    s = tl.load(s_ptr + sidx, mask=ok, other=0.0)
    if SYM:
        M: tl.constexpr = (1 << (BITS - 1)) - 1
        x = (code - M) * s
    else:
        z = tl.load(z_ptr + sidx, mask=ok, other=0.0)
        x = code * s + z
    return x


@triton.jit
def quantized_attention_kernel(q_ptr, qpos_ptr, kpos_ptr,
                               kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                               m_ptr, l_ptr, acc_ptr,
                               H, T, TQ, NGK, NGV, tiles_per_split, n_split, scale,
                               R: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
                               D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                               KW: tl.constexpr, KBITS: tl.constexpr, KCPW: tl.constexpr,
                               KG: tl.constexpr, KCHAN: tl.constexpr, KSYM: tl.constexpr,
                               VW: tl.constexpr, VBITS: tl.constexpr, VCPW: tl.constexpr,
                               VG: tl.constexpr, VCHAN: tl.constexpr, VSYM: tl.constexpr,
                               PREC: tl.constexpr, USE_DOT: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // H
    rows = tl.arange(0, M_PAD)
    row_ok = rows < R
    dd = tl.arange(0, D_PAD)
    d_ok = dd < D
    q = tl.load(q_ptr + (bh * R + rows)[:, None] * D + dd[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = tl.load(qpos_ptr + b * TQ + rows % TQ, mask=row_ok, other=-1)
    m_i = tl.full((M_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((M_PAD,), tl.float32)
    acc = tl.zeros((M_PAD, D_PAD), tl.float32)
    t_begin = split * tiles_per_split * BLOCK_T
    for it in range(0, tiles_per_split):        # tiles past T (last split only) are fully masked
        t = t_begin + it * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        kpos = tl.load(kpos_ptr + b * T + t, mask=t_ok, other=-1)
        k = _dequant_tile(kw_ptr, ks_ptr, kz_ptr, bh, t, t_ok, dd, d_ok, T, NGK,
                          D, KW, KBITS, KCPW, KG, KCHAN, KSYM)
        if USE_DOT:
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale        # (M_PAD, BLOCK_T)
        else:                                      # CUDA cores, exact float32 products, no padding
            sc = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        m_new, alpha, p, l_i = online_softmax_step(sc, kpos, qpos, row_ok, m_i, l_i)
        v = _dequant_tile(vw_ptr, vs_ptr, vz_ptr, bh, t, t_ok, dd, d_ok, T, NGV,
                          D, VW, VBITS, VCPW, VG, VCHAN, VSYM)
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = (bh * n_split + split) * R + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)
    tl.store(acc_ptr + out[:, None] * D + dd[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------- v3: decode kernel
#
# Why v2 was 40x its floor (compile report, bench/compile_report.py): 242 registers (2 programs per
# SM), 348 warp shuffles + 28 barriers per 16-token tile (the (rows, tokens, D) products were
# reduced across lanes every tile), one 4-byte load per element for words, scales and zeros, and no
# loads in flight while computing: latency-bound.  v3:
#   * the K/V words are loaded as (A, TS, W) tiles, ONE lane per word, and unpacked in registers
#     into (A, TS, W, CPW) codes (code j of word w is channel w*CPW + j), so a token's dot product
#     over D is 16 in-thread FMAs + a reduction over the W lanes only;
#   * codes become floats exactly by the 2^23 trick ((c | 0x4B000000) as float - 2^23: integer ops
#     at full rate instead of I2F);
#   * TS "streams" (one per lane/warp position along tokens) each keep their own online-softmax
#     state (m, l, acc): the sum over tokens of p * v is in-thread for the A tokens of a stream,
#     never across lanes; the TS streams are merged once at the end of the program (log-sum-exp,
#     docs/05-attention.md Def. 5.5), as are the splits, by a second small kernel that writes the
#     final (B, Hq, Tq[, D]) tensors (no torch ops after the kernels);
#   * per-channel (axis "channel") statistics are loaded once per tile when the tile lies inside one
#     token group; per-token statistics once per word when G is a multiple of codes-per-word;
#   * optional manual prefetch of the next tile's packed words/statistics (PREFETCH).
# Numerics as v2 (float32 products on CUDA cores, exact codes, q*s + z possibly one FMA, tl.exp);
# only the summation order and the number of online-softmax rescalings differ, both covered by
# docs/09-tolerances.md 9.3 ("any summation order", n_r <= S).
#
# SHIFTS (fixed after an H100 failure): the CPW axis is padded to CPW_PAD = next power of two, and
# for b = 3, 5, 6 (CPW = 10, 6, 5 -> 16, 8, 8) the padded lanes' shift j*b reaches 33..45.  A shift
# >= 32 is poison in LLVM: when the layout keeps a word's CPW_PAD codes in one thread (their shifts
# are then compile-time constants, e.g. D = 1, W_PAD = 1) LLVM folds the padded lanes to poison,
# and the poison propagates through the sum over the CPW axis into the whole score (values are
# not summed over that axis: their padded lanes are never stored, but get the same fix): the
# compiled sm_90 kernel for D = 1, 3-bit keys had no key arithmetic left, p = exp2(-inf) = 0,
# and the cache attended to nothing (output 0; conformance/test_cuda.py state machine).  With
# shifts computed at run time (larger D) ptxas' shr clamps and the results were right, which is
# why only small D showed it.  Padded lanes now get shift 0: their dequantized value is finite (a
# real code, finite statistics), meets a query lane loaded as 0 in the score and is never stored
# from the values' accumulator -- as in kvquant_kernels.py and quantize_kernels.py (_pack).
# Regression: tests/test_accelerated_cache.py::test_small_head_dim_zero_range_groups (CUDA).


@triton.jit
def _codes(words, shifts, MASK: tl.constexpr):
    # int32 words (..., 1) >> shifts (..., CPW) -> exact float32 codes: (c | 2^23 bits) - 2^23
    c = ((words >> shifts) & MASK) | 0x4B000000
    return c.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_side(w_ptr, s_ptr, z_ptr, w_base, s_base, t, t_ok, grp, wstride,
               W: tl.constexpr, W_PAD: tl.constexpr, CPW: tl.constexpr, CPW_PAD: tl.constexpr,
               D: tl.constexpr, G: tl.constexpr, NG, CHAN: tl.constexpr, SYM: tl.constexpr,
               STAT_TILE: tl.constexpr, STAT_WORD: tl.constexpr):
    """Raw packed data of one tile: words (1, A, TS, W_PAD) int32 and scale/zero broadcastable to
    (CPW_PAD, A, TS, W_PAD) (axis order chosen so that Triton's default layout puts the words on
    lanes and the CPW codes of a word in one thread).  t: (A, TS) token indices; grp: the tile's
    token group (STAT_TILE); wstride: 1 at run time, not specialised, so that the compiler does not
    vectorise the word loads (one word per lane)."""
    wi = tl.arange(0, W_PAD)
    j = tl.arange(0, CPW_PAD)
    d = j[:, None] + wi[None, :] * CPW                                     # (CPW_PAD, W_PAD)
    d_ok = (wi[None, :] < W) & (j[:, None] < CPW) & (d < D)
    t3 = t[:, :, None]
    words = tl.load(w_ptr + w_base + t3 * W + wi[None, None, :] * wstride,
                    mask=t_ok[:, :, None] & (wi < W)[None, None, :], other=0)
    words = words[None]                                                    # (1, A, TS, W_PAD)
    if CHAN:
        if STAT_TILE:      # the whole tile is inside token group grp: one row of D statistics
            sidx = s_base + grp * D + d
            g_ok = d_ok & (grp < NG)       # tiles past T (last split, prefetch) read nothing
            s = tl.load(s_ptr + sidx, mask=g_ok, other=0.0)[:, None, None, :]
            if SYM:
                z = s
            else:
                z = tl.load(z_ptr + sidx, mask=g_ok, other=0.0)[:, None, None, :]
        else:
            sidx = s_base + (t // G)[None, :, :, None] * D + d[:, None, None, :]
            ok = t_ok[None, :, :, None] & d_ok[:, None, None, :]
            s = tl.load(s_ptr + sidx, mask=ok, other=0.0)
            if SYM:
                z = s
            else:
                z = tl.load(z_ptr + sidx, mask=ok, other=0.0)
    else:
        if STAT_WORD:      # G % CPW == 0: every code of a word is in the same channel group
            sidx = s_base + t3 * NG + (wi * CPW // G)[None, None, :]
            ok = t_ok[:, :, None] & (wi < W)[None, None, :]
            s = tl.load(s_ptr + sidx, mask=ok, other=0.0)[None]
            if SYM:
                z = s
            else:
                z = tl.load(z_ptr + sidx, mask=ok, other=0.0)[None]
        else:
            sidx = s_base + t[None, :, :, None] * NG + (d // G)[:, None, None, :]
            ok = t_ok[None, :, :, None] & d_ok[:, None, None, :]
            s = tl.load(s_ptr + sidx, mask=ok, other=0.0)
            if SYM:
                z = s
            else:
                z = tl.load(z_ptr + sidx, mask=ok, other=0.0)
    return words, s, z


@triton.jit
def _dequant(words, s, z, BITS: tl.constexpr, CPW: tl.constexpr, CPW_PAD: tl.constexpr,
             SYM: tl.constexpr):
    # padded lanes (j >= CPW, b = 3, 5, 6) get shift 0, never j*b >= 32: see "SHIFTS" above
    j = tl.arange(0, CPW_PAD)
    shifts = tl.where(j < CPW, j * BITS, 0)[:, None, None, None]
    c = _codes(words, shifts, (1 << BITS) - 1)                            # (CPW_PAD, A, TS, W_PAD)
    if SYM:
        M: tl.constexpr = (1 << (BITS - 1)) - 1
        return (c - M) * s
    else:
        return c * s + z


@triton.jit
def decode_query_tile(q_ptr, row_off, row_ok, D: tl.constexpr, KW: tl.constexpr,
                      KW_PAD: tl.constexpr, KCPW: tl.constexpr, KCPW_PAD: tl.constexpr):
    """Query rows as float32 (RB, KCPW_PAD, KW_PAD) in the key words' channel order d = w*CPW + j;
    ``row_off`` (RB,) the element offset of each row's channel 0 (channels contiguous)."""
    kwi = tl.arange(0, KW_PAD)
    kj = tl.arange(0, KCPW_PAD)
    kd = kj[:, None] + kwi[None, :] * KCPW
    kd_ok = (kwi[None, :] < KW) & (kj[:, None] < KCPW) & (kd < D)
    q = tl.load(q_ptr + row_off[:, None, None] + kd[None, :, :],
                mask=row_ok[:, None, None] & kd_ok[None, :, :], other=0.0)
    return q.to(tl.float32)


@triton.jit
def split_tile_count(T, t_first, tiles_per_split, BT: tl.constexpr):
    """The tiles of the split whose first token is ``t_first`` that hold slots: at most
    ``tiles_per_split``, the last split's tiles past ``T`` (wholly masked: no-ops) left out."""
    return tl.minimum(tiles_per_split, tl.maximum(tl.cdiv(T - t_first, BT), 0))


@triton.jit
def decode_split_state(q, qpos, row_ok, b, hh, split, kpos_ptr,
                       kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                       T, NGK, NGV, tiles_per_split, scale, wstride,
                       kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                       RB: tl.constexpr, D: tl.constexpr, A: tl.constexpr, TS: tl.constexpr,
                       KW: tl.constexpr, KW_PAD: tl.constexpr, KBITS: tl.constexpr,
                       KCPW: tl.constexpr, KCPW_PAD: tl.constexpr, KG: tl.constexpr,
                       KCHAN: tl.constexpr, KSYM: tl.constexpr, KTILE: tl.constexpr,
                       KWORD: tl.constexpr,
                       VW: tl.constexpr, VW_PAD: tl.constexpr, VBITS: tl.constexpr,
                       VCPW: tl.constexpr, VCPW_PAD: tl.constexpr, VG: tl.constexpr,
                       VCHAN: tl.constexpr, VSYM: tl.constexpr, VTILE: tl.constexpr,
                       VWORD: tl.constexpr, PREFETCH: tl.constexpr):
    """The body of one decode program over the packed quantized segment: the (m, l, acc) of the
    query rows ``q`` (RB, KCPW_PAD, KW_PAD) (:func:`decode_query_tile`) at positions ``qpos``
    (RB,) over split ``split`` of KV head (b, hh); acc is (RB, VCPW_PAD, VW_PAD) in the value
    words' channel order.  Shared by :func:`decode_attention_kernel` and the fused decode kernel
    (accelerated/decode_kernels.py)."""
    q5 = q[:, :, None, None, :]                                            # (RB, CPW, 1, 1, W)
    qpos3 = qpos[:, None, None]
    row3 = row_ok[:, None, None]
    BT: tl.constexpr = A * TS
    tok = tl.arange(0, A)[:, None] * TS + tl.arange(0, TS)[None, :]       # (A, TS)
    kw_base = b * kw_sb + hh * kw_sh
    ks_base = b * ks_sb + hh * ks_sh
    vw_base = b * vw_sb + hh * vw_sh
    vs_base = b * vs_sb + hh * vs_sh
    kpos_base = b * kpos_sb
    m_u = tl.full((RB, TS), float("-inf"), tl.float32)
    l_u = tl.zeros((RB, TS), tl.float32)
    acc_u = tl.zeros((RB, VCPW_PAD, TS, VW_PAD), tl.float32)
    t_first = split * tiles_per_split * BT
    n_it = split_tile_count(T, t_first, tiles_per_split, BT)
    if PREFETCH:
        t = t_first + tok
        t_ok = t < T
        n_kpos = tl.load(kpos_ptr + kpos_base + t, mask=t_ok, other=-1)
        n_kw, n_ks, n_kz = _load_side(kw_ptr, ks_ptr, kz_ptr, kw_base, ks_base, t, t_ok,
                                      t_first // KG, wstride, KW, KW_PAD, KCPW, KCPW_PAD, D, KG, NGK,
                                      KCHAN, KSYM, KTILE, KWORD)
        n_vw, n_vs, n_vz = _load_side(vw_ptr, vs_ptr, vz_ptr, vw_base, vs_base, t, t_ok,
                                      t_first // VG, wstride, VW, VW_PAD, VCPW, VCPW_PAD, D, VG, NGV,
                                      VCHAN, VSYM, VTILE, VWORD)
    for it in range(0, n_it):
        t0 = t_first + it * BT
        if PREFETCH:
            kpos = n_kpos
            kw, ks, kz = n_kw, n_ks, n_kz
            vw, vs, vz = n_vw, n_vs, n_vz
            tn = t0 + BT + tok
            tn_ok = (tn < T) & (it + 1 < n_it)
            n_kpos = tl.load(kpos_ptr + kpos_base + tn, mask=tn_ok, other=-1)
            n_kw, n_ks, n_kz = _load_side(kw_ptr, ks_ptr, kz_ptr, kw_base, ks_base, tn, tn_ok,
                                          (t0 + BT) // KG, wstride, KW, KW_PAD, KCPW, KCPW_PAD, D,
                                          KG, NGK, KCHAN, KSYM, KTILE, KWORD)
            n_vw, n_vs, n_vz = _load_side(vw_ptr, vs_ptr, vz_ptr, vw_base, vs_base, tn, tn_ok,
                                          (t0 + BT) // VG, wstride, VW, VW_PAD, VCPW, VCPW_PAD, D,
                                          VG, NGV, VCHAN, VSYM, VTILE, VWORD)
        else:
            t = t0 + tok
            t_ok = t < T
            kpos = tl.load(kpos_ptr + kpos_base + t, mask=t_ok, other=-1)
            kw, ks, kz = _load_side(kw_ptr, ks_ptr, kz_ptr, kw_base, ks_base, t, t_ok, t0 // KG,
                                    wstride, KW, KW_PAD, KCPW, KCPW_PAD, D, KG, NGK, KCHAN, KSYM,
                                    KTILE, KWORD)
            vw, vs, vz = _load_side(vw_ptr, vs_ptr, vz_ptr, vw_base, vs_base, t, t_ok, t0 // VG,
                                    wstride, VW, VW_PAD, VCPW, VCPW_PAD, D, VG, NGV, VCHAN, VSYM,
                                    VTILE, VWORD)
        k = _dequant(kw, ks, kz, KBITS, KCPW, KCPW_PAD, KSYM)               # (KCPW, A, TS, KW)
        sc = tl.sum(tl.sum(q5 * k[None], axis=1), axis=3) * scale          # (RB, A, TS)
        vis = (kpos[None] >= 0) & (kpos[None] <= qpos3) & row3
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m_u, tl.max(sc, axis=1))                        # (RB, TS)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_u - m_safe)
        p = tl.where(vis, tl.exp(sc - m_safe[:, None, :]), 0.0)            # (RB, A, TS)
        l_u = l_u * alpha + tl.sum(p, axis=1)
        v = _dequant(vw, vs, vz, VBITS, VCPW, VCPW_PAD, VSYM)               # (VCPW, A, TS, VW)
        acc_u = acc_u * alpha[:, None, :, None] + tl.sum(p[:, None, :, :, None] * v[None], axis=2)
        m_u = m_new
    # merge the TS streams (log-sum-exp)
    big_m = tl.max(m_u, axis=1)                                            # (RB,)
    safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    w = tl.where(m_u == float("-inf"), 0.0, tl.exp(m_u - safe[:, None]))
    l_out = tl.sum(w * l_u, axis=1)
    acc = tl.sum(w[:, None, :, None] * acc_u, axis=2)                      # (RB, VCPW_PAD, VW_PAD)
    return big_m, l_out, acc


@triton.jit
def store_split_partial(m_ptr, l_ptr, acc_ptr, out, row_ok, m, l, acc, D: tl.constexpr,
                        VW: tl.constexpr, VW_PAD: tl.constexpr, VCPW: tl.constexpr,
                        VCPW_PAD: tl.constexpr):
    """Store one split's partial ``(m, l, acc)`` of rows ``out`` (``acc`` in the values' word layout
    ``(RB, VCPW_PAD, VW_PAD)``: channel ``j + w * VCPW``), as decode_split_state returns it."""
    vwi = tl.arange(0, VW_PAD)
    vj = tl.arange(0, VCPW_PAD)
    vd = vj[:, None] + vwi[None, :] * VCPW
    vd_ok = (vwi[None, :] < VW) & (vj[:, None] < VCPW) & (vd < D)
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    tl.store(acc_ptr + out[:, None, None] * D + vd[None, :, :], acc,
             mask=row_ok[:, None, None] & vd_ok[None, :, :])


@triton.jit(do_not_specialize=["wstride"])
def decode_attention_kernel(q_ptr, qpos_ptr, kpos_ptr,
                            kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                            m_ptr, l_ptr, acc_ptr,
                            H, T, TQ, NGK, NGV, tiles_per_split, n_split, scale, wstride,
                            kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                            R: tl.constexpr, RB: tl.constexpr, NRG: tl.constexpr, D: tl.constexpr,
                            A: tl.constexpr, TS: tl.constexpr,
                            KW: tl.constexpr, KW_PAD: tl.constexpr, KBITS: tl.constexpr,
                            KCPW: tl.constexpr, KCPW_PAD: tl.constexpr, KG: tl.constexpr,
                            KCHAN: tl.constexpr, KSYM: tl.constexpr, KTILE: tl.constexpr,
                            KWORD: tl.constexpr,
                            VW: tl.constexpr, VW_PAD: tl.constexpr, VBITS: tl.constexpr,
                            VCPW: tl.constexpr, VCPW_PAD: tl.constexpr, VG: tl.constexpr,
                            VCHAN: tl.constexpr, VSYM: tl.constexpr, VTILE: tl.constexpr,
                            VWORD: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rg = pid % NRG
    bh = (pid // NRG).to(tl.int64)
    b = bh // H
    hh = bh % H
    rows = rg * RB + tl.arange(0, RB)
    row_ok = rows < R
    q = decode_query_tile(q_ptr, (bh * R + rows) * D, row_ok, D, KW, KW_PAD, KCPW, KCPW_PAD)
    qpos = tl.load(qpos_ptr + b * TQ + rows % TQ, mask=row_ok, other=-1)
    big_m, l_out, acc = decode_split_state(
        q, qpos, row_ok, b, hh, split, kpos_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
        T, NGK, NGV, tiles_per_split, scale, wstride,
        kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
        RB, D, A, TS, KW, KW_PAD, KBITS, KCPW, KCPW_PAD, KG, KCHAN, KSYM, KTILE, KWORD,
        VW, VW_PAD, VBITS, VCPW, VCPW_PAD, VG, VCHAN, VSYM, VTILE, VWORD, PREFETCH)
    store_split_partial(m_ptr, l_ptr, acc_ptr, (bh * n_split + split) * R + rows, row_ok,
                        big_m, l_out, acc, D, VW, VW_PAD, VCPW, VCPW_PAD)


@triton.jit
def merge_split_row(m_s_ptr, l_s_ptr, acc_s_ptr, bh, r, n_split,
                    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, NS_BLOCK: tl.constexpr):
    """The log-sum-exp merge (Def. 5.5) of row ``r`` of KV head ``bh`` over its ``n_split``
    partials (laid out ``(B*H, n_split, R[, D])``): ``(m, l, acc)``, acc of shape ``(D_PAD,)``.
    Shared by :func:`merge_splits_kernel` and decode_kernels.merge_normalise_kernel."""
    si = tl.arange(0, NS_BLOCK)
    dd = tl.arange(0, D_PAD)
    d_ok = dd < D
    big = tl.full((NS_BLOCK,), float("-inf"), tl.float32)
    for s0 in range(0, n_split, NS_BLOCK):
        sm = tl.load(m_s_ptr + (bh * n_split + s0 + si) * R + r, mask=s0 + si < n_split,
                     other=float("-inf"))
        big = tl.maximum(big, sm)
    mx = tl.max(big, axis=0)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    l_acc = tl.zeros((NS_BLOCK,), tl.float32)
    acc = tl.zeros((NS_BLOCK, D_PAD), tl.float32)
    for s0 in range(0, n_split, NS_BLOCK):
        ok = s0 + si < n_split
        idx = (bh * n_split + s0 + si) * R + r
        sm = tl.load(m_s_ptr + idx, mask=ok, other=float("-inf"))
        w = tl.where(sm == float("-inf"), 0.0, tl.exp(sm - safe))
        l_acc += w * tl.load(l_s_ptr + idx, mask=ok, other=0.0)
        acc += w[:, None] * tl.load(acc_s_ptr + idx[:, None] * D + dd[None, :],
                                    mask=ok[:, None] & d_ok[None, :], other=0.0)
    return mx, tl.sum(l_acc, axis=0), tl.sum(acc, axis=0)


@triton.jit
def merge_splits_kernel(m_s_ptr, l_s_ptr, acc_s_ptr, m_ptr, l_ptr, acc_ptr, n_split,
                        R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        NS_BLOCK: tl.constexpr):
    """One program per (KV head, row): log-sum-exp merge of the n_split partials (Def. 5.5);
    writes m, l (B*H*R,) and acc (B*H*R, D), i.e. (B, Hq, Tq[, D]) in the caller's order."""
    pid = tl.program_id(0).to(tl.int64)            # = bh * R + r
    dd = tl.arange(0, D_PAD)
    mx, l_row, acc_row = merge_split_row(m_s_ptr, l_s_ptr, acc_s_ptr, pid // R, pid % R, n_split,
                                         R, D, D_PAD, NS_BLOCK)
    tl.store(m_ptr + pid, mx)
    tl.store(l_ptr + pid, l_row)
    tl.store(acc_ptr + pid * D + dd, acc_row, mask=dd < D)


# --------------------------------------------------------------------------- entry points

def stat_count(p) -> int:
    """Runtime NG of a packed tensor: groups along T (channel) or along D (token)."""
    return p.scale.shape[-2] if p.axis == "channel" else p.scale.shape[-1]


def _bh_strides(x: torch.Tensor, name: str):  # noqa: ARG001
    """(batch, head) strides of a (B, H, n, m) tensor whose last two dims are contiguous."""
    if x.dim() != 4 or (x.shape[-1] > 1 and x.stride(-1) != 1) or \
            (x.shape[-2] > 1 and x.stride(-2) != x.shape[-1]):
        x = x.contiguous()
    return x, x.stride(0), x.stride(1)


def strided_parts(p):
    """words, scale, zero of a packed side and their (batch, head) strides (zero = scale if absent)."""
    wds, wsb, wsh = _bh_strides(p.words, "words")
    s, ssb, ssh = _bh_strides(p.scale, "scale")
    z = s
    if p.zero is not None:
        z = p.zero
        if z.stride() != s.stride():
            s, z = s.contiguous(), z.contiguous()
            ssb, ssh = s.stride(0), s.stride(1)
    return wds, wsb, wsh, s, z, ssb, ssh


def split_partials(bh: int, n_split: int, r: int, d: int, device):
    """Uninitialised ``m, l`` float32 ``(bh, n_split, r)`` and ``acc`` ``(bh, n_split, r, d)``: the
    partials a split-K launch writes and :func:`merge_split_partials` reads."""
    m_s = torch.empty((bh, n_split, r), dtype=torch.float32, device=device)
    acc_s = torch.empty((bh, n_split, r, d), dtype=torch.float32, device=device)
    return m_s, torch.empty_like(m_s), acc_s


def merge_split_partials(m_s, l_s, acc_s, b, hq, tq, d):
    """One :func:`merge_splits_kernel` launch: the split partials ``(B*H, n_split, R[, D])`` merged
    into ``m, l`` ``(B, Hq, Tq)`` and ``acc`` ``(B, Hq, Tq, D)``."""
    bh, n_split, r = m_s.shape
    dev = m_s.device
    m = torch.empty((b, hq, tq), dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty((b, hq, tq, d), dtype=torch.float32, device=dev)
    ml = merge_launch(n_split, d)
    merge_splits_kernel[(bh * r,)](m_s_ptr=m_s, l_s_ptr=l_s, acc_s_ptr=acc_s, m_ptr=m, l_ptr=l,
                                   acc_ptr=acc, n_split=n_split, R=r, D=d, D_PAD=ml.d_pad,
                                   NS_BLOCK=ml.ns_block, num_warps=ml.num_warps)
    return m, l, acc


def split_launch_arguments(q: torch.Tensor, keys, values, qp: torch.Tensor, kp: torch.Tensor,
                           scale: float, rows: int, n_split: int, tiles_per_split: int):
    """What every split-K decode launch over the packed segment passes alike: the keyword arguments
    (query as ``(B, H, R, D)``, positions, packed sides and their strides, the partial outputs,
    ``H, T, TQ, NGK, NGV``, the split and ``scale``), and the partials ``(m, l, acc)`` it writes
    (:func:`split_partials`, read by :func:`merge_split_partials`)."""
    b, hq, tq, d = q.shape
    h = keys.shape[1]
    parts = split_partials(b * h, n_split, rows, d, q.device)
    kw, kw_sb, kw_sh, ks, kz, ks_sb, ks_sh = strided_parts(keys)
    vw, vw_sb, vw_sh, vs, vz, vs_sb, vs_sh = strided_parts(values)
    if kp.stride(-1) != 1:
        kp = kp.contiguous()
    args = dict(q_ptr=q.reshape(b, h, rows, d).contiguous(), qpos_ptr=qp.contiguous(), kpos_ptr=kp,
                kw_ptr=kw, ks_ptr=ks, kz_ptr=kz, vw_ptr=vw, vs_ptr=vs, vz_ptr=vz, m_ptr=parts[0],
                l_ptr=parts[1], acc_ptr=parts[2], H=h, T=keys.shape[2], TQ=tq,
                NGK=stat_count(keys), NGV=stat_count(values), tiles_per_split=tiles_per_split,
                n_split=n_split, scale=float(scale), kpos_sb=kp.stride(0), kw_sb=kw_sb, kw_sh=kw_sh,
                ks_sb=ks_sb, ks_sh=ks_sh, vw_sb=vw_sb, vw_sh=vw_sh, vs_sb=vs_sb, vs_sh=vs_sh)
    return args, parts


def decode_partial_attention(q: torch.Tensor, keys, values, qp: torch.Tensor, kp: torch.Tensor,
                             scale: float, launch: Optional[DecodeLaunch] = None, **choices):
    """Decode (g*Tq <= 8 rows per KV head, float32 "ieee"): see the header above.  ``launch``:
    None = :func:`decode_launch` for this shape and device (``choices`` are its keywords)."""
    b, hq, tq, d = q.shape
    h = keys.shape[1]
    if launch is None:
        launch = decode_launch(q.shape, keys, values, q.device, **choices)
    args, parts = split_launch_arguments(q, keys, values, qp, kp, scale, launch.rows, launch.n_split,
                                         launch.tiles_per_split)
    decode_attention_kernel[(b * h * launch.nrg, launch.n_split)](
        **args, wstride=1, R=launch.rows, RB=launch.rb, NRG=launch.nrg, D=d, A=launch.a, TS=launch.ts,
        **launch.keys.constexprs("K"), **launch.values.constexprs("V"),
        PREFETCH=launch.prefetch, num_warps=launch.num_warps, num_stages=launch.num_stages)
    return merge_split_partials(*parts, b, hq, tq, d)


def quantized_partial_attention(q: torch.Tensor, keys, values, qp: torch.Tensor, kp: torch.Tensor,
                                scale: float, precision: str = "ieee", block_t: int = None,
                                n_split: int = None, num_stages: int = 1, num_warps: int = 4,
                                use_dot: bool = None, **decode_choices):
    """(m, l, acc) of the quantized segment; arguments validated by accelerated/attention.py.

    ``q`` float32 (B, Hq, Tq, D); ``keys``/``values`` PackedQuantizedTensor (B, H, T, D);
    ``qp`` int64 (B, Tq); ``kp`` int64 (B, T) with invalid keys at -1.
    Decode (g*Tq <= 8 rows per KV head, precision "ieee"): :func:`decode_partial_attention`;
    otherwise :func:`quantized_attention_kernel` (``tl.dot`` for many rows or "tf32x3"), the
    queries split into launches of at most ``DOT_MAX_ROWS`` rows.
    """
    b, hq, tq, d = q.shape
    h, t_len = keys.shape[1], keys.shape[2]
    launch = dot_launch(q.shape, keys, q.device, precision, block_t=block_t, n_split=n_split,
                        num_warps=num_warps, num_stages=num_stages, use_dot=use_dot)
    per = launch.max_queries
    if launch.use_dot and tq > per:
        parts = [quantized_partial_attention(q[:, :, i:i + per], keys, values, qp[:, i:i + per], kp,
                                             scale, precision, block_t, n_split, num_stages, num_warps,
                                             use_dot, **decode_choices) for i in range(0, tq, per)]
        return tuple(torch.cat([p[j] for p in parts], dim=2) for j in range(3))
    if not launch.use_dot:
        return decode_partial_attention(q, keys, values, qp, kp, scale, n_split=n_split,
                                        num_warps=num_warps, **decode_choices)
    r = launch.rows
    qg = q.reshape(b, h, r, d).contiguous()
    m_s, l_s, acc_s = split_partials(b * h, launch.n_split, r, d, q.device)
    kw, ks = keys.words.contiguous(), keys.scale.contiguous()
    kz = ks if keys.zero is None else keys.zero.contiguous()
    vw, vs = values.words.contiguous(), values.scale.contiguous()
    vz = vs if values.zero is None else values.zero.contiguous()
    quantized_attention_kernel[(b * h, launch.n_split)](
        q_ptr=qg, qpos_ptr=qp.contiguous(), kpos_ptr=kp.contiguous(), kw_ptr=kw, ks_ptr=ks,
        kz_ptr=kz, vw_ptr=vw, vs_ptr=vs, vz_ptr=vz, m_ptr=m_s, l_ptr=l_s, acc_ptr=acc_s,
        H=h, T=t_len, TQ=tq, NGK=stat_count(keys), NGV=stat_count(values),
        tiles_per_split=launch.tiles_per_split, n_split=launch.n_split, scale=float(scale),
        R=r, M_PAD=launch.m_pad, D=d, D_PAD=launch.d_pad, BLOCK_T=launch.block_t,
        KW=kw.shape[-1], KBITS=keys.bits, KCPW=32 // keys.bits, KG=keys.group_size,
        KCHAN=keys.axis == "channel", KSYM=keys.symmetric,
        VW=vw.shape[-1], VBITS=values.bits, VCPW=32 // values.bits, VG=values.group_size,
        VCHAN=values.axis == "channel", VSYM=values.symmetric,
        PREC=precision, USE_DOT=launch.use_dot, num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    return merge_split_partials(m_s, l_s, acc_s, b, hq, tq, d)
