# Decode attention over the packed quantized segment on TENSOR CORES (Triton, split-K): the v4
# decode kernel.  Same contract and partial layout as attention_kernels.py's decode kernel (v3, CUDA
# cores), whose header gives the packed layout; this file adds only what differs.
#
# MEMORY LAYOUT (as attention_kernels.py; tokens and channels contiguous, batch/head strides passed)
#   query    float32 (B, H, R, D) rows of a KV head's group, R <= 16 (decode), in a 16-row tile.
#   K, V words int32 (B, H, T, W), W = D / cpw (cpw = 32 / bits a power of two: bits 1, 2, 4, 8);
#            code d of token t in word d // cpw at bits (d % cpw)*b, LSB first.
#   statistics float32 (B, H, NG, D) per channel or (B, H, T, NG) per token; zero absent if symmetric.
#   out: m, l float32 (B*H, n_split, R); acc float32 (B*H, n_split, R, D) -> merge_splits_kernel.
#   Grid (B*H, n_split): a program owns all R query rows of one KV head (the whole GQA group: each
#   packed tile is read once) and a contiguous token range, BT tokens per tile.
#
# BYTES MOVED PER CALL: attention_kernels.py's (every word and statistic read once; the per-channel
#   statistics once per tile, i.e. once per group when BT divides G).  Realistic shape B=1, H=8,
#   Hq=32, T=32768, D=128, 2-bit KIVI: 33.8 MB -> 11.3 us at 3 TB/s.
#
# HOW: the products are tl.dot (mma) on a 16-row tile; the CUDA cores unpack the codes and prepare
#   the other operand.  Each query row is repeated VREP = 16 / max(4, next_pow2(R)) times in the
#   tile (tile row r: query row r // VREP); the online softmax runs on the R query rows.
#   * codes -> exact bfloat16 operands, in the *paired channel order* (paired_channels: a word's
#     codes j and j + cpw/2 side by side): on the GPU one 32-bit register holds both, made by
#     inline PTX in three instructions (shift, and/or the bfloat16 128.0 bits, one bf16x2 FMA that
#     subtracts 128 exactly: _asm_pairs); the query, the key statistics and the value outputs are
#     read or written in the same order, so the order costs nothing;
#   * keys per channel with the tile inside one group (KFOLD): the group's scale folds into the
#     query, sigma = c*(sum_d (q_d s_d) code_d + sum_d q_d z_d) (symmetric: z_d = -M s_d); q*s of
#     the R query rows is split into three exact bfloat16 parts (bf16_parts) stacked as row blocks
#     of ONE product (stacked_parts), whose three partial scores are then added (sum_row_blocks);
#   * values per token in at most VREP groups along D (VFOLD): tile row r serves value group
#     r % VREP, so the group's per-token scale folds into the weights: acc_r += (p*s) @ codes +
#     p . z, p*s in three exact parts (exact_dot); output channel d is read from the row of its group;
#   * otherwise (keys per token, groups shorter than a tile; values per channel or in more groups):
#     dequantized tile x = code*s + z in registers and tl.dot(input_precision="tf32x3");
#   * online softmax per tile (attention_kernels.online_softmax_step), one state per program.
#
# HISTORY (bench/README.md "Issue 9, tensor-core decode"): the first version (TF32: codes as float32
#   operands, q*s in two TF32 parts, values dequantized for "tf32x3") measured 110-111 us at the
#   realistic shape (v3 on CUDA cores 133.8 us), 10 % of the copy bandwidth; Nsight Compute showed
#   it bound by instruction issue at a low occupancy, not by DRAM (10.9 %): 36 M warp instructions
#   at 255 registers, 4 programs of 2 warps per SM; LOP3 18 %, LDS 15 % (TF32 operands read back
#   from shared memory by scalar loads), FADD 10 %.  Static count of the loop body per 32-token
#   tile and warp (ptxas for sm_90, nvdisasm): 2050 SASS instructions then, 1110 in this version
#   (the TF32 scalar loads, the dequantization of the values and two of three key products gone),
#   at 220 registers without spills.  Measured on the H100 (bench/README.md "Issue 9, exact-bfloat16
#   tensor-core decode"): 67.4 us at the realistic shape with the first launch settings, 55.8 us
#   (20 % of the copy bandwidth) with TENSOR_TUNING's 168-register cap and 6 programs per SM;
#   1.5-2.3x the TF32 version at six shapes in the same call.
#
# NUMERICS (docs/09-tolerances.md 9.5, "Tensor-core decode programs"): on a folded side the
#   products are exact (bfloat16 parts of a float32 operand times exact codes), the input
#   differences (3D + 5)u(|code s| + |z|) (keys) and (BT + 1)u(|code s| + |z|) (values); on a
#   dequantized side TF32 splits (u_in = u_p = u_v = 2^-21, "tf32x3"); sums on tensor cores taken
#   with 2u per addition over 3 chained products (u_acc = 6u: their accumulation truncates).
#   Off CUDA (the Triton interpreter, whose dot misreads bfloat16) the parts enter the products as
#   float32 (NATIVE = False): the same values.

from __future__ import annotations

from typing import Optional

import torch

from .attention_kernels import (merge_split_partials, online_softmax_step, split_launch_arguments,
                                split_tile_count)
from .attention_launch import TensorDecodeLaunch, tensor_decode_launch
from .triton_support import tl, triton

__all__ = ["bf16_parts", "exact_dot", "stacked_parts", "sum_row_blocks", "paired_channels", "unpack_bf16",
           "unpack_codes", "tensor_split_state", "tensor_program", "tensor_decode_kernel",
           "tensor_decode_partial_attention"]


@triton.jit
def bf16_parts(x):
    """``x = a + b + c`` exactly, each part a bfloat16: ``a`` is ``x`` with its 16 low bits cleared
    (8 significant bits), ``b`` likewise of the rest ``x - a`` (exact in float32: at most 16
    significant bits), ``c = x - a - b`` (at most 8 significant bits).  A bfloat16 product is exact
    in float32, so ``a*y + b*y + c*y`` summed exactly is ``x*y`` for a bfloat16 ``y`` (a part below
    the normal range, |x| < 2^-110, may lose its last bits)."""
    a = (x.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    r = x - a
    b = (r.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    return a.to(tl.bfloat16), b.to(tl.bfloat16), (r - b).to(tl.bfloat16)


@triton.jit
def exact_dot(x, codes, acc, NATIVE: tl.constexpr):
    """``acc + x @ codes`` with ``x`` float32 (rows, K) split in three bfloat16 parts and ``codes``
    (K, N) bfloat16 small integers (exact): every product exact, the sums on tensor cores.
    ``NATIVE`` False (the Triton interpreter, whose dot misreads bfloat16): the same values as
    float32 operands."""
    a, b, c = bf16_parts(x)
    if NATIVE:
        acc = tl.dot(a, codes, acc)
        acc = tl.dot(b, codes, acc)
        return tl.dot(c, codes, acc)
    cf = codes.to(tl.float32)
    acc = tl.dot(a.to(tl.float32), cf, acc, input_precision="ieee")
    acc = tl.dot(b.to(tl.float32), cf, acc, input_precision="ieee")
    return tl.dot(c.to(tl.float32), cf, acc, input_precision="ieee")


@triton.jit
def stacked_parts(x):
    """(4R, K) bfloat16: the three parts of ``x`` (R, K) float32 (:func:`bf16_parts`) as row
    blocks 0, 1, 2 and a zero block 3, so that one product with exact bfloat16 ``codes`` gives
    the three partial products side by side (summed by :func:`sum_row_blocks`)."""
    a, b, c = bf16_parts(x)
    ab = tl.join(a, b)                                      # (R, K, 2)
    cz = tl.join(c, tl.zeros_like(c))
    parts = tl.permute(tl.join(ab, cz), (3, 2, 0, 1))       # (2, 2, R, K): block 2*j + i
    return tl.reshape(parts, (4 * x.shape[0], x.shape[1]))


@triton.jit
def sum_row_blocks(y, R: tl.constexpr):
    """(R, N): the sum of the four (R, N) row blocks of ``y`` (4R, N) (float32, in block order)."""
    return tl.sum(tl.reshape(y, (4, R, y.shape[1])), axis=0)


@triton.jit
def load_words(w_ptr, base, t, t_ok, W: tl.constexpr):
    """The packed words (BT, W) int32 of tokens ``t`` (BT,); tokens past the segment read 0."""
    wi = tl.arange(0, W)
    return tl.load(w_ptr + base + t[:, None] * W + wi[None, :], mask=t_ok[:, None], other=0)


@triton.jit
def unpack_codes(words, BITS: tl.constexpr, CPW: tl.constexpr):
    """The codes of words (BT, W) as float32 (BT, W, CPW): code j of word w is channel
    d = w*CPW + j (exact small integers: (c | 2^23 bits) - 2^23)."""
    shifts = tl.arange(0, CPW) * BITS
    c = ((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)) | 0x4B000000
    return c.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def paired_channels(W: tl.constexpr, CPW: tl.constexpr):
    """(W*CPW,) the channel of each code position in the *paired order* of :func:`unpack_bf16`:
    position ``w*CPW + 2j + h`` holds channel ``w*CPW + j + h*CPW/2`` (a word's codes ``j`` and
    ``j + CPW/2`` side by side, as one 32-bit register holds them)."""
    pos = tl.arange(0, W * CPW)
    k = pos % CPW
    return pos - k + k // 2 + (k % 2) * (CPW // 2)


@triton.jit
def _asm_pairs(words, shifts, MASK: tl.constexpr):
    """bfloat16 ``(lo, hi)`` of ``(words >> shifts) & MASK`` (MASK: one code's bits in each 16-bit
    half): ``| 0x4300`` makes each half the bfloat16 ``128 + code``, one bf16x2 FMA subtracts 128
    exactly; three instructions per pair of codes (sm_80+ PTX)."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 t, m, one, off;\n"
            " shr.u32 t, $2, $3;\n"
            " mov.b32 m, $4;\n"
            " and.b32 t, t, m;\n"
            " or.b32 t, t, 0x43004300;\n"
            " mov.b32 one, 0x3F803F80;\n"
            " mov.b32 off, 0xC300C300;\n"
            " fma.rn.bf16x2 t, t, one, off;\n"
            " mov.b32 {$0, $1}, t; }",
        constraints="=h,=h,r,r,r", args=[words, shifts, tl.full(shifts.shape, MASK, tl.int32)],
        dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)


@triton.jit
def unpack_bf16(words, BITS: tl.constexpr, CPW: tl.constexpr, NATIVE: tl.constexpr):
    """The codes of words (BT, W) as bfloat16 (BT, W*CPW) in the paired order
    (:func:`paired_channels`), exact (codes < 256).  ``NATIVE`` (a GPU, bits 1, 2, 4): two codes per
    register by :func:`_asm_pairs`; else through float32 (the Triton interpreter runs this)."""
    H: tl.constexpr = CPW // 2
    if NATIVE and BITS <= 4:
        j = tl.arange(0, H) * BITS
        lo, hi = _asm_pairs(words[:, :, None], j[None, None, :], ((1 << BITS) - 1) * 65537)
        codes = tl.join(lo, hi)                                           # (BT, W, H, 2)
    else:
        k = tl.arange(0, CPW)
        shifts = (k // 2 + (k % 2) * H) * BITS
        codes = ((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        codes = codes.to(tl.bfloat16)
    return tl.reshape(codes, (words.shape[0], words.shape[1] * CPW))


@triton.jit
def _group_row(s_ptr, z_ptr, base, grp, NG, W: tl.constexpr, CPW: tl.constexpr, SYM: tl.constexpr):
    """Scale and zero (W, CPW) of per-channel group ``grp`` (0 past the last group)."""
    d = tl.arange(0, W)[:, None] * CPW + tl.arange(0, CPW)[None, :]
    ok = (d >= 0) & (grp < NG)
    s = tl.load(s_ptr + base + grp * (W * CPW) + d, mask=ok, other=0.0)
    if SYM:
        z = s
    else:
        z = tl.load(z_ptr + base + grp * (W * CPW) + d, mask=ok, other=0.0)
    return s, z


@triton.jit
def _statistics(s_ptr, z_ptr, base, t, t_ok, t0, NG, W: tl.constexpr, CPW: tl.constexpr,
                G: tl.constexpr, CHAN: tl.constexpr, SYM: tl.constexpr, TILE: tl.constexpr,
                WORD: tl.constexpr):
    """Scale and zero of the tile's codes, broadcastable to (BT, W, CPW): one row per tile (TILE:
    per channel, BT | G), one statistic per word (WORD: per token, CPW | G), else one per code."""
    wi = tl.arange(0, W)
    d = wi[:, None] * CPW + tl.arange(0, CPW)[None, :]                         # (W, CPW)
    if TILE:
        s, z = _group_row(s_ptr, z_ptr, base, t0 // G, NG, W, CPW, SYM)
        s = s[None, :, :]
        z = z[None, :, :]
    elif WORD:
        sidx = t[:, None] * NG + (wi * CPW // G)[None, :]
        ok = t_ok[:, None] & (wi >= 0)[None, :]
        s = tl.load(s_ptr + base + sidx, mask=ok, other=0.0)[:, :, None]
        z = s
        if not SYM:
            z = tl.load(z_ptr + base + sidx, mask=ok, other=0.0)[:, :, None]
    else:
        if CHAN:
            sidx = (t // G)[:, None, None] * (W * CPW) + d[None, :, :]
        else:
            sidx = t[:, None, None] * NG + (d // G)[None, :, :]
        ok = t_ok[:, None, None] & (d >= 0)[None, :, :]
        s = tl.load(s_ptr + base + sidx, mask=ok, other=0.0)
        z = s
        if not SYM:
            z = tl.load(z_ptr + base + sidx, mask=ok, other=0.0)
    return s, z


@triton.jit
def _dequantized(codes, s, z, BITS: tl.constexpr, SYM: tl.constexpr, BT: tl.constexpr,
                 D: tl.constexpr):
    """``x = code*s + z`` (BT, D) of codes (BT, W, CPW) with statistics broadcastable to them
    (symmetric ``(code - M)*s``)."""
    if SYM:
        MID: tl.constexpr = (1 << (BITS - 1)) - 1
        x = (codes - MID) * s
    else:
        x = codes * s + z
    return tl.reshape(x, (BT, D))


@triton.jit
def _folded_scores(q, words, s_ptr, z_ptr, base, grp, NG, scale, BITS: tl.constexpr,
                   CPW: tl.constexpr, SYM: tl.constexpr, NATIVE: tl.constexpr):
    """c * q . k of a tile inside key group ``grp``, the tile never dequantized: the group's
    per-channel statistics fold into the query, ``sum_d (q_d s_d) code_d + sum_d q_d z_d``
    (symmetric: ``z_d = -M s_d``); ``q*s`` (RK, D) in three exact bfloat16 parts stacked in the
    rows of one product with the exact bfloat16 codes (:func:`stacked_parts`); ``q``, ``s``, ``z``
    and the codes in the paired channel order (:func:`paired_channels`).  (RK, BT)."""
    RK: tl.constexpr = q.shape[0]
    W: tl.constexpr = words.shape[1]
    ch = paired_channels(W, CPW)
    ok = (ch >= 0) & (grp < NG)
    s = tl.load(s_ptr + base + grp * (W * CPW) + ch, mask=ok, other=0.0)
    qs = q * s[None, :]
    ct = tl.trans(unpack_bf16(words, BITS, CPW, NATIVE))                          # (D, BT)
    if NATIVE:
        sc = sum_row_blocks(tl.dot(stacked_parts(qs), ct), RK)                 # (RK, BT)
    else:                           # the interpreter's dot misreads bfloat16: float32 operands
        sc = sum_row_blocks(tl.dot(stacked_parts(qs).to(tl.float32), ct.to(tl.float32),
                                   input_precision="ieee"), RK)
    if SYM:
        MID: tl.constexpr = (1 << (BITS - 1)) - 1
        bias = -MID * tl.sum(qs, axis=1)
    else:
        z = tl.load(z_ptr + base + grp * (W * CPW) + ch, mask=ok, other=0.0)
        bias = tl.sum(q * z[None, :], axis=1)
    return (sc + bias[:, None]) * scale


@triton.jit
def _scores(q, codes, s, z, scale, BITS: tl.constexpr, SYM: tl.constexpr, BT: tl.constexpr,
            D: tl.constexpr):
    """c * q . k of the tile, (M, BT), over the dequantized tile in "tf32x3" (keys per token, or
    groups shorter than a tile)."""
    k = _dequantized(codes, s, z, BITS, SYM, BT, D)
    return tl.dot(q, tl.trans(k), input_precision="tf32x3") * scale


@triton.jit
def _side_loads(w_ptr, s_ptr, z_ptr, w_base, s_base, t0, T, NG, BT: tl.constexpr,
                W: tl.constexpr, CPW: tl.constexpr, G: tl.constexpr, CHAN: tl.constexpr,
                SYM: tl.constexpr, TILE: tl.constexpr, WORD: tl.constexpr):
    """What one side (keys or values) of the tile ``t0 .. t0 + BT`` reads: the packed words and
    the statistics."""
    t = t0 + tl.arange(0, BT)
    t_ok = t < T
    words = load_words(w_ptr, w_base, t, t_ok, W)
    s, z = _statistics(s_ptr, z_ptr, s_base, t, t_ok, t0, NG, W, CPW, G, CHAN, SYM, TILE, WORD)
    return words, s, z


@triton.jit
def _folded_values(p, acc, vw, vs_ptr, vz_ptr, vs_base, t, t_ok, NGV, BITS: tl.constexpr,
                   CPW: tl.constexpr, SYM: tl.constexpr, NATIVE: tl.constexpr, VREP: tl.constexpr):
    """``acc + p @ v`` for values per token, the tile never dequantized: tile row ``r`` of the
    (M, D) accumulator serves value group ``r % VREP`` only (the rows are the query rows repeated
    VREP times), so the group's per-token statistics fold into the weights:
    ``sum_t p_t (code_t s_t + z_t) = sum_t (p_t s_t) code_t + sum_t p_t z_t`` (symmetric:
    ``z_t = -M s_t``); the codes exact bfloat16 operands (:func:`exact_dot`), the accumulator's
    columns in the paired channel order (:func:`paired_channels`).  ``p`` (M, BT)."""
    M: tl.constexpr = p.shape[0]
    BT: tl.constexpr = p.shape[1]
    g = tl.arange(0, VREP)
    sidx = t[:, None] * NGV + g[None, :]                    # (BT, VREP): the tile's statistics
    ok = t_ok[:, None] & (g < NGV)[None, :]                 # (groups past D / G: rows unused)
    s = tl.load(vs_ptr + vs_base + sidx, mask=ok, other=0.0)
    ps = p * tl.reshape(tl.broadcast_to(tl.trans(s)[None, :, :], (M // VREP, VREP, BT)), (M, BT))
    if SYM:
        MID: tl.constexpr = (1 << (BITS - 1)) - 1
        bias = -MID * tl.sum(ps, axis=1)
    else:
        z = tl.load(vz_ptr + vs_base + sidx, mask=ok, other=0.0)
        z = tl.reshape(tl.broadcast_to(tl.trans(z)[None, :, :], (M // VREP, VREP, BT)), (M, BT))
        bias = tl.sum(p * z, axis=1)
    return exact_dot(ps, unpack_bf16(vw, BITS, CPW, NATIVE), acc, NATIVE) + bias[:, None]


@triton.jit
def tensor_split_state(q, qpos, q_ok, b, hh, split, kpos_ptr,
                       kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                       T, NGK, NGV, tiles_per_split, scale,
                       kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                       M: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                       KW: tl.constexpr, KBITS: tl.constexpr, KCPW: tl.constexpr, KG: tl.constexpr,
                       KCHAN: tl.constexpr, KSYM: tl.constexpr, KTILE: tl.constexpr,
                       KWORD: tl.constexpr, KFOLD: tl.constexpr,
                       VW: tl.constexpr, VBITS: tl.constexpr, VCPW: tl.constexpr, VG: tl.constexpr,
                       VCHAN: tl.constexpr, VSYM: tl.constexpr, VTILE: tl.constexpr,
                       VWORD: tl.constexpr, VFOLD: tl.constexpr, VREP: tl.constexpr,
                       NATIVE: tl.constexpr):
    """``(m, l, acc)`` over split ``split`` of KV head (b, hh): ``m``, ``l`` (RK,) of the
    RK = M / VREP query rows (positions ``qpos``, ``q_ok``: a real row), ``acc`` (M, D) of the
    M tile rows, tile row ``r`` holding query row ``r // VREP``.  ``q``: ``KFOLD``: the query
    rows (RK, D) in the keys' paired channel order (:func:`paired_channels`), else the tile rows
    (M, D) in channel order.  ``VFOLD``: the values' statistics fold into the weights, tile row
    ``r`` serving value group ``r % VREP``, acc in the values' paired order; else acc in channel
    order (its VREP rows of a query row equal)."""
    kw_base = b * kw_sb + hh * kw_sh
    ks_base = b * ks_sb + hh * ks_sh
    vw_base = b * vw_sb + hh * vw_sh
    vs_base = b * vs_sb + hh * vs_sh
    RK: tl.constexpr = M // VREP
    m_i = tl.full((RK,), float("-inf"), tl.float32)
    l_i = tl.zeros((RK,), tl.float32)
    acc = tl.zeros((M, D), tl.float32)
    t_first = split * tiles_per_split * BT
    tok = tl.arange(0, BT)
    for it in range(0, split_tile_count(T, t_first, tiles_per_split, BT)):
        t0 = t_first + it * BT
        t = t0 + tok
        kpos = tl.load(kpos_ptr + b * kpos_sb + t, mask=t < T, other=-1)
        if KFOLD:
            sc = _folded_scores(q, load_words(kw_ptr, kw_base, t, t < T, KW), ks_ptr, kz_ptr,
                                ks_base, t0 // KG, NGK, scale, KBITS, KCPW, KSYM, NATIVE)
        else:
            kw, ks, kz = _side_loads(kw_ptr, ks_ptr, kz_ptr, kw_base, ks_base, t0, T, NGK, BT,
                                     KW, KCPW, KG, KCHAN, KSYM, KTILE, KWORD)
            sc = _scores(q, unpack_codes(kw, KBITS, KCPW), ks, kz, scale, KBITS, KSYM, BT, D)
            sc = tl.max(tl.reshape(sc, (RK, VREP, BT)), axis=1)      # a query row's copies agree
        m_new, alpha, p, l_i = online_softmax_step(sc, kpos, qpos, q_ok, m_i, l_i)
        p = tl.reshape(tl.broadcast_to(p[:, None, :], (RK, VREP, BT)), (M, BT))     # tile rows
        alpha = tl.reshape(tl.broadcast_to(alpha[:, None], (RK, VREP)), (M,))
        # the values are loaded after the scores: fewer live registers (loading both sides first,
        # or the next tile's ahead, spilled more and ran up to 2x slower: bench/README.md)
        if VFOLD:
            vw = load_words(vw_ptr, vw_base, t, t < T, VW)
            acc = _folded_values(p, acc * alpha[:, None], vw, vs_ptr, vz_ptr, vs_base, t, t < T,
                                 NGV, VBITS, VCPW, VSYM, NATIVE, VREP)
        else:
            vw, vs, vz = _side_loads(vw_ptr, vs_ptr, vz_ptr, vw_base, vs_base, t0, T, NGV, BT,
                                     VW, VCPW, VG, VCHAN, VSYM, VTILE, VWORD)
            v = _dequantized(unpack_codes(vw, VBITS, VCPW), vs, vz, VBITS, VSYM, BT, D)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32x3")
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def tensor_program(q_ptr, qpos_ptr, kpos_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                   m_ptr, l_ptr, acc_ptr, b, hh, bh, split, G, T, TQ, NGK, NGV,
                   tiles_per_split, n_total, scale, q_sb, q_sh, q_st,
                   kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                   R: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                   KW: tl.constexpr, KBITS: tl.constexpr, KCPW: tl.constexpr, KG: tl.constexpr,
                   KCHAN: tl.constexpr, KSYM: tl.constexpr, KTILE: tl.constexpr,
                   KWORD: tl.constexpr, KFOLD: tl.constexpr,
                   VW: tl.constexpr, VBITS: tl.constexpr, VCPW: tl.constexpr, VG: tl.constexpr,
                   VCHAN: tl.constexpr, VSYM: tl.constexpr, VTILE: tl.constexpr,
                   VWORD: tl.constexpr, VFOLD: tl.constexpr, VREP: tl.constexpr,
                   NATIVE: tl.constexpr):
    """One program of the fused decode kernel (accelerated/decode_kernels.py) over split ``split``
    of KV head (b, hh): its R query rows read through the query's strides (row r: query head
    ``hh*G + r // TQ``, query ``r % TQ``), each repeated ``VREP`` times (tile row ``i`` holds
    query row ``i // VREP`` for value group ``i % VREP``: ``VREP = D / VG`` where the values fold,
    else 1), the state of :func:`tensor_split_state`, the partial ``(m, l, acc)`` stored at
    ``(bh * n_total + split) * R + r``."""
    MQ: tl.constexpr = M // VREP
    rows = tl.arange(0, MQ)                     # query rows
    q_ok = rows < R
    if KFOLD:                       # the query rows, in the keys' paired channel order
        qr = rows
        dq = paired_channels(KW, KCPW)
    else:                           # the M tile rows
        qr = tl.arange(0, M) // VREP
        dq = tl.arange(0, D)
    q_off = b * q_sb + (hh * G + qr // TQ) * q_sh + (qr % TQ) * q_st
    q = tl.load(q_ptr + q_off[:, None] + dq[None, :], mask=(qr < R)[:, None], other=0.0).to(tl.float32)
    qpos = tl.load(qpos_ptr + b * TQ + rows % TQ, mask=q_ok, other=-1)
    m_i, l_i, acc = tensor_split_state(
        q, qpos, q_ok, b, hh, split, kpos_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
        T, NGK, NGV, tiles_per_split, scale,
        kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
        M, D, BT, KW, KBITS, KCPW, KG, KCHAN, KSYM, KTILE, KWORD, KFOLD,
        VW, VBITS, VCPW, VG, VCHAN, VSYM, VTILE, VWORD, VFOLD, VREP, NATIVE)
    out = (bh * n_total + split) * R + rows
    tl.store(m_ptr + out, m_i, mask=q_ok)
    tl.store(l_ptr + out, l_i, mask=q_ok)
    if VFOLD:                       # acc's columns in the values' paired channel order
        dv = paired_channels(VW, VCPW)
    else:
        dv = tl.arange(0, D)
    if VREP > 1:    # output row r, channel d: tile row r * VREP + d // VG (folded values), else + 0
        if VFOLD:
            slot = dv // VG
        else:
            slot = dv * 0
        own = tl.arange(0, VREP)[None, :, None] == slot[None, None, :]
        acc = tl.sum(tl.where(own, tl.reshape(acc, (MQ, VREP, D)), 0.0), axis=1)
    tl.store(acc_ptr + out[:, None] * D + dv[None, :], acc, mask=q_ok[:, None])


@triton.jit
def tensor_decode_kernel(q_ptr, qpos_ptr, kpos_ptr,
                         kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                         m_ptr, l_ptr, acc_ptr,
                         H, T, TQ, NGK, NGV, tiles_per_split, n_split, scale,
                         kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                         R: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                         KW: tl.constexpr, KBITS: tl.constexpr, KCPW: tl.constexpr,
                         KG: tl.constexpr, KCHAN: tl.constexpr, KSYM: tl.constexpr,
                         KTILE: tl.constexpr, KWORD: tl.constexpr, KFOLD: tl.constexpr,
                         VW: tl.constexpr, VBITS: tl.constexpr, VCPW: tl.constexpr,
                         VG: tl.constexpr, VCHAN: tl.constexpr, VSYM: tl.constexpr,
                         VTILE: tl.constexpr, VWORD: tl.constexpr, VFOLD: tl.constexpr,
                         VREP: tl.constexpr, NATIVE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // H
    hh = bh % H
    # q (B, H, R, D) contiguous: strides of the (B, Hq = H*G, TQ) view, G = R // TQ
    tensor_program(q_ptr, qpos_ptr, kpos_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                   m_ptr, l_ptr, acc_ptr, b, hh, bh, split, R // TQ, T, TQ, NGK, NGV,
                   tiles_per_split, n_split, scale, H * R * D, TQ * D, D,
                   kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                   R, M, D, BT, KW, KBITS, KCPW, KG, KCHAN, KSYM, KTILE, KWORD, KFOLD,
                   VW, VBITS, VCPW, VG, VCHAN, VSYM, VTILE, VWORD, VFOLD, VREP, NATIVE)


def tensor_decode_partial_attention(q: torch.Tensor, keys, values, qp: torch.Tensor,
                                    kp: torch.Tensor, scale: float,
                                    launch: Optional[TensorDecodeLaunch] = None, **choices):
    """(m, l, acc) merged over the splits, as attention_kernels.decode_partial_attention, on tensor
    cores (header above).  ``launch``: None = :func:`tensor_decode_launch` (``choices`` are its
    keywords); the shape must be one it accepts (``tensor_decode_applies``)."""
    b, hq, tq, d = q.shape
    h = keys.shape[1]
    if launch is None:
        launch = tensor_decode_launch(q.shape, keys, values, q.device, **choices)
    args, parts = split_launch_arguments(q, keys, values, qp, kp, scale, launch.rows, launch.n_split,
                                         launch.tiles_per_split)
    tensor_decode_kernel[(b * h, launch.n_split)](
        **args, R=launch.rows, M=launch.m, D=d, BT=launch.block_t, **launch.constexprs(),
        **launch.compile_options())
    return merge_split_partials(*parts, b, hq, tq, d)
