# Decode attention over the packed quantized segment on TENSOR CORES (Triton, split-K): the v4
# decode kernel.  Same contract and partial layout as attention_kernels.py's decode kernel (v3, CUDA
# cores), whose header gives the packed layout; this file adds only what differs.
#
# MEMORY LAYOUT (as attention_kernels.py; tokens and channels contiguous, batch/head strides passed)
#   query    float32 (B, H, R, D) rows of a KV head's group, R <= 16 (decode), padded to M = 16.
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
# HOW (why tensor cores): on CUDA cores the v3 kernel spends ~3.9k instructions per (token, KV head)
#   (4 query rows x 128 channels x 2 products, the dequantization, the lane reductions), which
#   suggested it was issue-bound at 8-11 % of the copy bandwidth.  Here the products are tl.dot (mma)
#   on a 16-row tile; what stays on the CUDA cores is the unpacking (shift, mask, the 2^23 trick: ~3
#   operations per code).  Measured (below), that gained only 0.98x-1.5x: the profile shows why.
#   * codes (BT, W, cpw) -> (BT, D) float32, exact small integers, hence exact TF32 operands;
#   * keys per channel with the tile inside one group (KFOLD): the group's scale folds into the
#     query, sigma = c*(sum_d (q_d s_d) code_d + sum_d q_d z_d) (symmetric: z_d = -M s_d), so the
#     key tile is never dequantized; q*s is split into two TF32 parts (tf32_split) for two dots;
#   * otherwise (keys per token, groups shorter than a tile) and for the values: dequantized tile
#     x = code*s + z in registers and tl.dot(input_precision="tf32x3");
#   * online softmax per tile (attention_kernels.online_softmax_step), one state per program.
#
# MEASURED (H100, bench/README.md "Issue 9, tensor-core decode"; attention_launch.TENSOR_TUNING:
#   32-token tiles, 2 warps, 3 stages, 8 programs per SM): 111.4 us at the realistic shape (v3 on CUDA
#   cores 133.8 us), 10 % of the copy bandwidth; 0.98x-1.49x v3 over the six shapes measured.
# PROFILE (Nsight Compute, bench/ncu_decode.py; bench/README.md has the table): bound by instruction
#   issue at a low occupancy, not by DRAM (10.9 %) nor the mma (HMMA 7 % of instructions): 36 M
#   warp instructions (38 us at every issue slot busy) at 255 registers -> 4 programs of 2 warps per
#   SM, an eligible warp in 40 % of the cycles.  The instructions: unpacking (LOP3 18 %, SHF 6 %,
#   FADD 10 %), TF32 operands read back from shared memory by scalar loads (LDS 15 %; no ldmatrix
#   for 32-bit types); 32 spilled bytes double the L1 requests.  The words and statistics are
#   already streamed into shared memory by cp.async two tiles ahead (the pipeliner, 3 stages).
#
# NUMERICS (docs/09-tolerances.md 9.5, "Tensor-core decode programs"): products through TF32 splits
#   (relative error <= 2^-20 per product: u_in = u_p = u_v = 2^-21 as "tf32x3"), sums on tensor cores
#   taken with 2u per addition over the 3 chained products of a split (u_acc = 6u: their
#   accumulation truncates), the folded keys' input difference (2^-20 + (5D + 4)u)(|code s| + |z|)
#   stated there and added by the tests.

from __future__ import annotations

from typing import Optional

import torch

from .attention_kernels import (merge_split_partials, online_softmax_step, split_launch_arguments,
                                split_tile_count)
from .attention_launch import TensorDecodeLaunch, tensor_decode_launch
from .triton_support import tl, triton

__all__ = ["tf32_split", "unpack_codes", "tensor_split_state", "tensor_program", "tensor_decode_kernel",
           "tensor_decode_partial_attention"]


@triton.jit
def tf32_split(x):
    """``x = hi + lo``: ``hi`` is ``x`` with its 13 low mantissa bits cleared (exactly TF32), ``lo``
    the rest (at most 13 significant bits: exact in float32).  A TF32 product of ``lo`` keeps at
    least its 10 leading bits, so ``hi*y + lo*y`` is within ``2^-20 |x y|`` of ``x*y``."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


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
def _scores(q, codes, s, z, scale, BITS: tl.constexpr, SYM: tl.constexpr, FOLD: tl.constexpr,
            BT: tl.constexpr, D: tl.constexpr):
    """c * q . k of the tile, (M, BT): folded (the group's statistics, one row ``s``/``z`` of shape
    (1, W, CPW), applied to the query; the codes exact TF32 operands) or over the dequantized tile
    in "tf32x3"."""
    if FOLD:
        qs = q * tl.reshape(s, (D,))[None, :]
        hi, lo = tf32_split(qs)
        ct = tl.trans(tl.reshape(codes, (BT, D)))
        sc = tl.dot(hi, ct, input_precision="tf32") + tl.dot(lo, ct, input_precision="tf32")
        if SYM:
            MID: tl.constexpr = (1 << (BITS - 1)) - 1
            bias = -MID * tl.sum(qs, axis=1)
        else:
            bias = tl.sum(q * tl.reshape(z, (D,))[None, :], axis=1)
        return (sc + bias[:, None]) * scale
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
def tensor_split_state(q, qpos, row_ok, b, hh, split, kpos_ptr,
                       kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                       T, NGK, NGV, tiles_per_split, scale,
                       kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                       M: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                       KW: tl.constexpr, KBITS: tl.constexpr, KCPW: tl.constexpr, KG: tl.constexpr,
                       KCHAN: tl.constexpr, KSYM: tl.constexpr, KTILE: tl.constexpr,
                       KWORD: tl.constexpr, KFOLD: tl.constexpr,
                       VW: tl.constexpr, VBITS: tl.constexpr, VCPW: tl.constexpr, VG: tl.constexpr,
                       VCHAN: tl.constexpr, VSYM: tl.constexpr, VTILE: tl.constexpr,
                       VWORD: tl.constexpr):
    """``(m, l, acc)`` of the query rows ``q`` (M, D) float32 at positions ``qpos`` (M,) over
    split ``split`` of KV head (b, hh); acc (M, D) in channel order."""
    kw_base = b * kw_sb + hh * kw_sh
    ks_base = b * ks_sb + hh * ks_sh
    vw_base = b * vw_sb + hh * vw_sh
    vs_base = b * vs_sb + hh * vs_sh
    m_i = tl.full((M,), float("-inf"), tl.float32)
    l_i = tl.zeros((M,), tl.float32)
    acc = tl.zeros((M, D), tl.float32)
    t_first = split * tiles_per_split * BT
    tok = tl.arange(0, BT)
    for it in range(0, split_tile_count(T, t_first, tiles_per_split, BT)):
        t0 = t_first + it * BT
        kpos = tl.load(kpos_ptr + b * kpos_sb + t0 + tok, mask=t0 + tok < T, other=-1)
        kw, ks, kz = _side_loads(kw_ptr, ks_ptr, kz_ptr, kw_base, ks_base, t0, T, NGK, BT,
                                 KW, KCPW, KG, KCHAN, KSYM, KTILE, KWORD)
        sc = _scores(q, unpack_codes(kw, KBITS, KCPW), ks, kz, scale, KBITS, KSYM, KFOLD, BT, D)
        m_new, alpha, p, l_i = online_softmax_step(sc, kpos, qpos, row_ok, m_i, l_i)
        # the values are loaded after the scores: fewer live registers (loading both sides first,
        # or the next tile's ahead, spilled more and ran up to 2x slower: bench/README.md)
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
                   VWORD: tl.constexpr):
    """One program of the fused decode kernel (accelerated/decode_kernels.py) over split ``split``
    of KV head (b, hh): its R query rows read through the query's strides (row r: query head
    ``hh*G + r // TQ``, query ``r % TQ``), the state of :func:`tensor_split_state`, the partial
    ``(m, l, acc)`` stored at ``(bh * n_total + split) * R + r``."""
    rows = tl.arange(0, M)
    row_ok = rows < R
    dd = tl.arange(0, D)
    row_off = b * q_sb + (hh * G + rows // TQ) * q_sh + (rows % TQ) * q_st
    q = tl.load(q_ptr + row_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    qpos = tl.load(qpos_ptr + b * TQ + rows % TQ, mask=row_ok, other=-1)
    m_i, l_i, acc = tensor_split_state(
        q, qpos, row_ok, b, hh, split, kpos_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
        T, NGK, NGV, tiles_per_split, scale,
        kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
        M, D, BT, KW, KBITS, KCPW, KG, KCHAN, KSYM, KTILE, KWORD, KFOLD,
        VW, VBITS, VCPW, VG, VCHAN, VSYM, VTILE, VWORD)
    out = (bh * n_total + split) * R + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)
    tl.store(acc_ptr + out[:, None] * D + dd[None, :], acc, mask=row_ok[:, None])


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
                         VTILE: tl.constexpr, VWORD: tl.constexpr):
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
                   VW, VBITS, VCPW, VG, VCHAN, VSYM, VTILE, VWORD)


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
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return merge_split_partials(*parts, b, hq, tq, d)
