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
#        by merge_splits_kernel (one launch; v2 used ~13 small torch ops) into (B, Hq, Tq[, D]).
#   Grid (B*H, n_split): a program owns one KV head (all g*Tq query rows of its group, so the
#   packed K/V are read ONCE) and a contiguous token range, BLOCK_T tokens per step; the codes are
#   unpacked and dequantized in registers (x = q*s + z), never written back.
#   This is the v2 kernel (quantized_attention_kernel), still used for many rows (tl.dot) and
#   "tf32x3"; decode (<= 8 rows, "ieee") uses the v3 kernel further down (decode_attention_kernel).
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

import torch
import triton
import triton.language as tl

_TARGET_PROGRAMS = 528     # ~4 waves of 132 SMs


def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


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
        vis = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None]) & row_ok[:, None]
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.where(vis, tl.exp(sc - m_safe[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
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
    # query rows (RB, KCPW_PAD, KW_PAD) in the words' channel order d = w * CPW + j
    kwi = tl.arange(0, KW_PAD)
    kj = tl.arange(0, KCPW_PAD)
    kd = kj[:, None] + kwi[None, :] * KCPW
    kd_ok = (kwi[None, :] < KW) & (kj[:, None] < KCPW) & (kd < D)
    q = tl.load(q_ptr + (bh * R + rows)[:, None, None] * D + kd[None, :, :],
                mask=row_ok[:, None, None] & kd_ok[None, :, :], other=0.0)
    q5 = q[:, :, None, None, :]                                            # (RB, CPW, 1, 1, W)
    qpos = tl.load(qpos_ptr + b * TQ + rows % TQ, mask=row_ok, other=-1)
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
    for it in range(0, tiles_per_split):
        t0 = t_first + it * BT
        if PREFETCH:
            kpos = n_kpos
            kw, ks, kz = n_kw, n_ks, n_kz
            vw, vs, vz = n_vw, n_vs, n_vz
            tn = t0 + BT + tok
            tn_ok = (tn < T) & (it + 1 < tiles_per_split)
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
    vwi = tl.arange(0, VW_PAD)
    vj = tl.arange(0, VCPW_PAD)
    vd = vj[:, None] + vwi[None, :] * VCPW
    vd_ok = (vwi[None, :] < VW) & (vj[:, None] < VCPW) & (vd < D)
    out = (bh * n_split + split) * R + rows
    tl.store(m_ptr + out, big_m, mask=row_ok)
    tl.store(l_ptr + out, l_out, mask=row_ok)
    tl.store(acc_ptr + out[:, None, None] * D + vd[None, :, :], acc,
             mask=row_ok[:, None, None] & vd_ok[None, :, :])


@triton.jit
def merge_splits_kernel(m_s_ptr, l_s_ptr, acc_s_ptr, m_ptr, l_ptr, acc_ptr, n_split,
                        R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        NS_BLOCK: tl.constexpr):
    """One program per (KV head, row): log-sum-exp merge of the n_split partials (Def. 5.5);
    writes m, l (B*H*R,) and acc (B*H*R, D), i.e. (B, Hq, Tq[, D]) in the caller's order."""
    pid = tl.program_id(0).to(tl.int64)            # = bh * R + r
    bh = pid // R
    r = pid % R
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
    tl.store(m_ptr + pid, mx)
    tl.store(l_ptr + pid, tl.sum(l_acc, axis=0))
    tl.store(acc_ptr + pid * D + dd, tl.sum(acc, axis=0), mask=d_ok)


def _stat_count(p) -> int:
    """Runtime NG of a packed tensor: groups along T (channel) or along D (token)."""
    return p.scale.shape[-2] if p.axis == "channel" else p.scale.shape[-1]


def _bh_strides(x: torch.Tensor, name: str):  # noqa: ARG001
    """(batch, head) strides of a (B, H, n, m) tensor whose last two dims are contiguous."""
    if x.dim() != 4 or (x.shape[-1] > 1 and x.stride(-1) != 1) or \
            (x.shape[-2] > 1 and x.stride(-2) != x.shape[-1]):
        x = x.contiguous()
    return x, x.stride(0), x.stride(1)


def _merge(m_s, l_s, acc_s, b, hq, tq, d):
    bh, n_split, r = m_s.shape
    dev = m_s.device
    m = torch.empty((b, hq, tq), dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty((b, hq, tq, d), dtype=torch.float32, device=dev)
    merge_splits_kernel[(bh * r,)](m_s, l_s, acc_s, m, l, acc, n_split, R=r, D=d, D_PAD=_p2(d),
                                   NS_BLOCK=min(32, _p2(n_split)), num_warps=4)
    return m, l, acc


def decode_partial_attention(q: torch.Tensor, keys, values, qp: torch.Tensor, kp: torch.Tensor,
                             scale: float, a: int = None, num_warps: int = 4, n_split: int = None,
                             prefetch: bool = None, target_programs: int = None, rb: int = 4):
    """v3 (decode: g*Tq <= 8 rows per KV head, float32 "ieee"): see the header above."""
    b, hq, tq, d = q.shape
    h, t_len = keys.shape[1], keys.shape[2]
    r = (hq // h) * tq
    rb = min(rb, _p2(r))
    nrg = -(-r // rb)
    qg = q.reshape(b, h, r, d).contiguous()

    def spec(p):
        cpw = 32 // p.bits
        w = -(-d // cpw)
        w_pad = _p2(w)
        return cpw, _p2(cpw), w, w_pad

    kcpw, kcpw_pad, kw_n, kw_pad = spec(keys)
    vcpw, vcpw_pad, vw_n, vw_pad = spec(values)
    lanes_t = max(1, 32 // max(kw_pad, vw_pad))
    ts = lanes_t * num_warps
    if a is None:
        a = 2
    bt = a * ts
    n_tiles = -(-t_len // bt)
    if n_split is None:
        if target_programs is None:
            target_programs = 4 * (torch.cuda.get_device_properties(q.device).multi_processor_count
                                   if q.is_cuda else 16)
        target = target_programs
        # floor, not ceil: programs <= target, a whole number of waves (v3 at 4 warps and ~255
        # registers keeps 2 programs per SM resident; 4 per SM = 2 full waves, no 3rd partial wave)
        n_split = max(1, min(n_tiles, target // (b * h * nrg)))
    tiles_per_split = -(-n_tiles // n_split)
    n_split = -(-n_tiles // tiles_per_split)
    dev = q.device
    m_s = torch.empty((b * h, n_split, r), dtype=torch.float32, device=dev)
    l_s = torch.empty_like(m_s)
    acc_s = torch.empty((b * h, n_split, r, d), dtype=torch.float32, device=dev)

    def parts(p):
        wds, wsb, wsh = _bh_strides(p.words, "words")
        s, ssb, ssh = _bh_strides(p.scale, "scale")
        z = s
        if p.zero is not None:
            z = p.zero
            if z.stride() != s.stride():
                s, z = s.contiguous(), z.contiguous()
                ssb, ssh = s.stride(0), s.stride(1)
        return wds, wsb, wsh, s, z, ssb, ssh

    kw, kw_sb, kw_sh, ks, kz, ks_sb, ks_sh = parts(keys)
    vw, vw_sb, vw_sh, vs, vz, vs_sb, vs_sh = parts(values)
    if kp.stride(-1) != 1:
        kp = kp.contiguous()
    ktile = keys.axis == "channel" and keys.group_size % bt == 0
    if prefetch is None:        # prefetch only when the per-channel statistics are one row per tile
        prefetch = keys.axis != "channel" or ktile      # (else the prefetched gather spills: bench)
    vtile = values.axis == "channel" and values.group_size % bt == 0
    kword = keys.axis == "token" and keys.group_size % kcpw == 0
    vword = values.axis == "token" and values.group_size % vcpw == 0
    grid = (b * h * nrg, n_split)
    decode_attention_kernel[grid](
        qg, qp.contiguous(), kp, kw, ks, kz, vw, vs, vz, m_s, l_s, acc_s,
        h, t_len, tq, _stat_count(keys), _stat_count(values), tiles_per_split, n_split, float(scale), 1,
        kp.stride(0), kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
        R=r, RB=rb, NRG=nrg, D=d, A=a, TS=ts,
        KW=kw_n, KW_PAD=kw_pad, KBITS=keys.bits, KCPW=kcpw, KCPW_PAD=kcpw_pad, KG=keys.group_size,
        KCHAN=keys.axis == "channel", KSYM=keys.symmetric, KTILE=ktile, KWORD=kword,
        VW=vw_n, VW_PAD=vw_pad, VBITS=values.bits, VCPW=vcpw, VCPW_PAD=vcpw_pad, VG=values.group_size,
        VCHAN=values.axis == "channel", VSYM=values.symmetric, VTILE=vtile, VWORD=vword,
        PREFETCH=prefetch, num_warps=num_warps, num_stages=1)
    return _merge(m_s, l_s, acc_s, b, hq, tq, d)


def quantized_partial_attention(q: torch.Tensor, keys, values, qp: torch.Tensor, kp: torch.Tensor,
                                scale: float, precision: str = "ieee", block_t: int = None,
                                n_split: int = None, num_stages: int = 1, num_warps: int = 4,
                                use_dot: bool = None, version: int = 3, **v3_options):
    """(m, l, acc) of the quantized segment; arguments validated by accelerated/attention.py.

    ``q`` float32 (B, Hq, Tq, D); ``keys``/``values`` PackedQuantizedTensor (B, H, T, D);
    ``qp`` int64 (B, Tq); ``kp`` int64 (B, T) with invalid keys at -1.
    Decode (g*Tq <= 8 rows per KV head, precision "ieee"): the v3 kernel; otherwise (or
    ``version=2``) the v2 kernel below (``tl.dot`` for many rows or "tf32x3").
    """
    b, hq, tq, d = q.shape
    h, t_len = keys.shape[1], keys.shape[2]
    g = hq // h
    r = g * tq
    if use_dot is None:                 # few rows (decode): CUDA-core products; many rows: tl.dot
        use_dot = precision == "tf32x3" or r > 8
    if version == 3 and not use_dot:
        return decode_partial_attention(q, keys, values, qp, kp, scale, n_split=n_split,
                                        num_warps=num_warps, **v3_options)
    m_pad = max(16, _p2(r)) if use_dot else _p2(r)
    if block_t is None:
        block_t = 64 if use_dot else max(1, 64 // m_pad)
        block_t = max(block_t, 1)
    qg = q.reshape(b, h, r, d).contiguous()
    n_tiles = -(-t_len // block_t)
    if n_split is None:
        n_split = max(1, min(n_tiles, -(-_TARGET_PROGRAMS // (b * h))))
    tiles_per_split = -(-n_tiles // n_split)
    n_split = -(-n_tiles // tiles_per_split)
    dev = q.device
    m_s = torch.empty((b * h, n_split, r), dtype=torch.float32, device=dev)
    l_s = torch.empty_like(m_s)
    acc_s = torch.empty((b * h, n_split, r, d), dtype=torch.float32, device=dev)

    def parts(p):
        s = p.scale.contiguous()
        z = s if p.zero is None else p.zero.contiguous()
        return p.words.contiguous(), s, z

    kw, ks, kz = parts(keys)
    vw, vs, vz = parts(values)
    grid = (b * h, n_split)
    quantized_attention_kernel[grid](
        qg, qp.contiguous(), kp.contiguous(), kw, ks, kz, vw, vs, vz, m_s, l_s, acc_s,
        h, t_len, tq, _stat_count(keys), _stat_count(values), tiles_per_split, n_split, float(scale),
        R=r, M_PAD=m_pad, D=d, D_PAD=max(16, _p2(d)), BLOCK_T=block_t,
        KW=kw.shape[-1], KBITS=keys.bits, KCPW=32 // keys.bits, KG=keys.group_size,
        KCHAN=keys.axis == "channel", KSYM=keys.symmetric,
        VW=vw.shape[-1], VBITS=values.bits, VCPW=32 // values.bits, VG=values.group_size,
        VCHAN=values.axis == "channel", VSYM=values.symmetric,
        PREC=precision, USE_DOT=use_dot, num_warps=num_warps,
        num_stages=num_stages)
    if version == 2:                    # v2's merge (torch ops), kept for the before/after bench
        big_m = m_s.amax(dim=1)
        safe = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
        w = torch.where(torch.isfinite(m_s), torch.exp(m_s - safe[:, None]), torch.zeros_like(m_s))
        l = (w * l_s).sum(dim=1)
        acc = (w[..., None] * acc_s).sum(dim=1)
        return (big_m.reshape(b, hq, tq), l.reshape(b, hq, tq), acc.reshape(b, hq, tq, d))
    return _merge(m_s, l_s, acc_s, b, hq, tq, d)
