# The fused decode-attention step of one cache layer (Triton): ONE launch reads the packed quantized
# store, the full-precision preserved store and the residual window (docs/05-attention.md Def. 5.6,
# docs/06-cache.md 6.13), a second small launch merges the partial softmaxes by log-sum-exp
# (Def. 5.5), normalises and writes the attention output.  Called by
# QuantizedKVCacheLayer._attend_fused (accelerated/cache_layer.py) for decode-sized queries (g*Tq <= 8
# rows per KV head) over the uniform store.
#
# MEMORY LAYOUT
#   query    (B, Hq, Tq, D), any float dtype, channels contiguous (other strides passed); read
#            directly and converted to float32 in registers.  Row r of KV head h = query head
#            h*g + r // Tq, query r % Tq (R = g*Tq rows per KV head, as attention_kernels.py).
#   qpos     int64 (B, Tq) contiguous.
#   quantized: the uniform store's whole buffers (accelerated/cache_store.py, PackedBuffers):
#            words int32 (B, H, Qcap, W), scale/zero float32, slot positions int64 (B, Qcap)
#            (-1 = empty); read by attention_kernels.decode_split_state exactly as the
#            quantized-segment kernel reads them (its header gives the words' layout), or, engine
#            "tensor" (FusedLaunch.tensor, the default on the devices of TENSOR_TUNING), by
#            attention_tc_kernels.tensor_program: one program per (KV head, split) for all R rows
#            (the other row groups' programs of that split return at once).
#   preserved: keys, values (B, H, P, D) in the cache dtype (views of the (B, H, cap+1, D) buffers:
#            batch/head strides passed, tokens and channels contiguous), positions int64 (B, P)
#            (-1 = a row holding fewer).
#   residual: keys, values (B, H, r, D) in the cache dtype (views of the window's buffers, same
#            strides rule), valid bool (B, r); token j of the window is at position start + j,
#            start int64 (1,) read from the device (a CUDA-graph replay reads the current one).
#   partials m, l float32 (B*H, NS, R), acc float32 (B*H, NS, R, D), NS = n_split + n_fp:
#            splits 0 .. n_split-1 hold the quantized store's, the others the full-precision
#            segments' (the P preserved tokens followed by the r residual ones, fp_tiles * FB
#            tokens per program).
#   out      (B, Tq, Hq, D) in the output dtype (the layout the attention interface returns),
#            returned as its (B, Hq, Tq, D) transposed view; 0 for a query that sees no key.
#   Grid (B*H*NRG, n_split + n_fp): a program owns one KV head's RB query rows (every query head
#   of its group: a loaded KV tile serves them all) and a token range of one segment kind.
#
# BYTES MOVED PER CALL (the floor: everything read once)
#   quantized: as attention_kernels.py (words, statistics, slot positions);
#   full precision: 2*B*H*(P + r)*D*itemsize + 8*B*P + B*r;  query B*Hq*Tq*D*itemsize;
#   partials: written once and read once by the merge, 2 * 4*B*H*NS*R*(D + 2);  out B*Hq*Tq*D*itemsize.
#   Realistic shape (attention_kernels.py's: B=1, H=8, Hq=32, Tq=1, D=128, T=32768, 2-bit KIVI,
#   bf16 cache) with P=8 preserved and r=160 residual tokens, NS = 66 + 3:
#     quantized 33.8 MB; full precision 2*8*168*128*2 = 0.69 MB; partials 2*4*8*69*4*130 = 2.3 MB
#     total ~= 36.8 MB -> 12.3 us at 3 TB/s (the torch blocks it replaces: ~45 launches).
#
# RESOURCES (bench/compile_report.py, sm_90a, triton 3.6, 4 warps, a=2, rb=4; not yet timed on a
#   GPU): 2-bit D=128 255 registers, 88 bytes spilled (the quantized-segment kernel alone: 64);
#   2-bit D=64 12 (alone: 8); 4-bit D=64 and D=128 no spill.  The full-precision branch adds
#   little: nothing computed before the branch stays live through it.  The merge: 71 registers.
#
# NUMERICS: float32 throughout (docs/09-tolerances.md 9.3 row "float32 throughout"): the quantized
#   part as attention_kernels.py (exact products on CUDA cores, q*s + z possibly one FMA: 9.2 b),
#   or on tensor cores (engine "tensor": 9.5 "Tensor-core decode programs": exact bfloat16 products
#   where a side folds its statistics, TF32 splits where it is dequantized);
#   the full-precision keys and values are converted to float32 exactly (bf16/fp16 -> fp32) and
#   multiplied in float32 on CUDA cores (no TF32); only the summation order and the number of
#   online-softmax rescalings differ from the torch path, both inside 9.3's bound ("any summation
#   order", n_r <= S).  The normalisation acc / l is one correctly rounded division (div_rn), as the
#   torch path's (Triton's plain "/" is div.full.f32, 2 ulp); a narrower output dtype is rounded
#   to nearest even, as torch's .to().

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .attention_kernels import (decode_query_tile, decode_split_state, merge_split_row,
                                online_softmax_step, split_partials, stat_count, store_split_partial,
                                strided_parts)
from .attention_launch import FusedLaunch, fused_launch, merge_launch
from .attention_tc_kernels import tensor_program
from .triton_support import tl, triton

__all__ = ["fused_decode_kernel", "merge_normalise_kernel", "full_precision_state",
           "fused_decode_attention"]


@triton.jit
def full_precision_state(q, qpos, row_ok, b, hh, f, pk_ptr, pv_ptr, ppos_ptr, rk_ptr, rv_ptr,
                         rvalid_ptr, P, RL, r_start, fp_tiles, scale, p_sb, p_sh, ppos_sb,
                         r_sb, r_sh, rvalid_sb,
                         RB: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, FB: tl.constexpr):
    """(m, l, acc) of the query rows ``q`` (RB, D_PAD) float32 over the full-precision tokens
    ``[f*fp_tiles*FB, (f+1)*fp_tiles*FB)`` of the concatenation preserved (P) + residual (RL),
    FB tokens per tile; acc is (RB, D_PAD)."""
    dd = tl.arange(0, D_PAD)
    d_ok = dd < D
    m_i = tl.full((RB,), float("-inf"), tl.float32)
    l_i = tl.zeros((RB,), tl.float32)
    acc = tl.zeros((RB, D_PAD), tl.float32)
    j_first = f * fp_tiles * FB
    for it in range(0, fp_tiles):
        j = j_first + it * FB + tl.arange(0, FB)
        in_p = j < P
        in_r = (j >= P) & (j < P + RL)
        jp = tl.where(in_p, j, 0).to(tl.int64)
        jr = tl.where(in_r, j - P, 0).to(tl.int64)
        ppos = tl.load(ppos_ptr + b * ppos_sb + jp, mask=in_p, other=-1)
        rval = tl.load(rvalid_ptr + b * rvalid_sb + jr, mask=in_r, other=0)
        kpos = tl.where(in_r, tl.where(rval != 0, r_start + jr, -1), tl.where(in_p, ppos, -1))
        mp = in_p[:, None] & d_ok[None, :]
        mr = in_r[:, None] & d_ok[None, :]
        p_off = b * p_sb + hh * p_sh + jp[:, None] * D + dd[None, :]
        r_off = b * r_sb + hh * r_sh + jr[:, None] * D + dd[None, :]
        k = tl.where(mp, tl.load(pk_ptr + p_off, mask=mp, other=0.0).to(tl.float32),
                     tl.load(rk_ptr + r_off, mask=mr, other=0.0).to(tl.float32))   # (FB, D_PAD)
        sc = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale                # (RB, FB)
        m_new, alpha, p, l_i = online_softmax_step(sc, kpos, qpos, row_ok, m_i, l_i)
        v = tl.where(mp, tl.load(pv_ptr + p_off, mask=mp, other=0.0).to(tl.float32),
                     tl.load(rv_ptr + r_off, mask=mr, other=0.0).to(tl.float32))
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["wstride", "n_total", "P", "RL", "fp_tiles", "ppos_sb", "rvalid_sb"])
def fused_decode_kernel(q_ptr, qpos_ptr, kpos_ptr,
                        kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                        pk_ptr, pv_ptr, ppos_ptr, rk_ptr, rv_ptr, rvalid_ptr, rstart_ptr,
                        m_ptr, l_ptr, acc_ptr,
                        H, G, T, TQ, NGK, NGV, tiles_per_split, n_split, n_total, scale, wstride,
                        q_sb, q_sh, q_st,
                        kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                        P, RL, fp_tiles, p_sb, p_sh, ppos_sb, r_sb, r_sh, rvalid_sb,
                        R: tl.constexpr, RB: tl.constexpr, NRG: tl.constexpr, D: tl.constexpr,
                        D_PAD: tl.constexpr, FB: tl.constexpr, A: tl.constexpr, TS: tl.constexpr,
                        KW: tl.constexpr, KW_PAD: tl.constexpr, KBITS: tl.constexpr,
                        KCPW: tl.constexpr, KCPW_PAD: tl.constexpr, KG: tl.constexpr,
                        KCHAN: tl.constexpr, KSYM: tl.constexpr, KTILE: tl.constexpr,
                        KWORD: tl.constexpr,
                        VW: tl.constexpr, VW_PAD: tl.constexpr, VBITS: tl.constexpr,
                        VCPW: tl.constexpr, VCPW_PAD: tl.constexpr, VG: tl.constexpr,
                        VCHAN: tl.constexpr, VSYM: tl.constexpr, VTILE: tl.constexpr,
                        VWORD: tl.constexpr, PREFETCH: tl.constexpr,
                        TC: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, KFOLD: tl.constexpr,
                        VFOLD: tl.constexpr, VREP: tl.constexpr, NATIVE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rg = pid % NRG
    bh = (pid // NRG).to(tl.int64)
    b = bh // H
    hh = bh % H
    rows = rg * RB + tl.arange(0, RB)
    row_ok = rows < R
    # (nothing computed here stays live through the branches: registers are at their limit)
    if TC:                                   # a split of the packed store on tensor cores
        if (split < n_split) & (rg == 0):
            tensor_program(q_ptr, qpos_ptr, kpos_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
                           m_ptr, l_ptr, acc_ptr, b, hh, bh, split, G, T, TQ, NGK, NGV,
                           tiles_per_split, n_total, scale, q_sb, q_sh, q_st,
                           kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
                           R, M, D, BT, KW, KBITS, KCPW, KG, KCHAN, KSYM, KTILE, KWORD, KFOLD,
                           VW, VBITS, VCPW, VG, VCHAN, VSYM, VTILE, VWORD, VFOLD, VREP, NATIVE)
    elif split < n_split:                    # a split of the packed quantized store
        row_off = b * q_sb + (hh * G + rows // TQ) * q_sh + (rows % TQ) * q_st   # (RB,) int64
        qpos = tl.load(qpos_ptr + b * TQ + rows % TQ, mask=row_ok, other=-1)
        q_w = decode_query_tile(q_ptr, row_off, row_ok, D, KW, KW_PAD, KCPW, KCPW_PAD)
        m_q, l_q, acc_q = decode_split_state(
            q_w, qpos, row_ok, b, hh, split, kpos_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr,
            T, NGK, NGV, tiles_per_split, scale, wstride,
            kpos_sb, kw_sb, kw_sh, ks_sb, ks_sh, vw_sb, vw_sh, vs_sb, vs_sh,
            RB, D, A, TS, KW, KW_PAD, KBITS, KCPW, KCPW_PAD, KG, KCHAN, KSYM, KTILE, KWORD,
            VW, VW_PAD, VBITS, VCPW, VCPW_PAD, VG, VCHAN, VSYM, VTILE, VWORD, PREFETCH)
        store_split_partial(m_ptr, l_ptr, acc_ptr, (bh * n_total + split) * R + rows, row_ok,
                            m_q, l_q, acc_q, D, VW, VW_PAD, VCPW, VCPW_PAD)
    if split >= n_split:                     # full-precision tokens: preserved, then residual
        row_off = b * q_sb + (hh * G + rows // TQ) * q_sh + (rows % TQ) * q_st
        qpos = tl.load(qpos_ptr + b * TQ + rows % TQ, mask=row_ok, other=-1)
        dd = tl.arange(0, D_PAD)
        q_d = tl.load(q_ptr + row_off[:, None] + dd[None, :],
                      mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        r_start = tl.load(rstart_ptr)        # on the device: a replayed launch reads the current one
        m_f, l_f, acc_f = full_precision_state(
            q_d, qpos, row_ok, b, hh, split - n_split, pk_ptr, pv_ptr, ppos_ptr, rk_ptr, rv_ptr,
            rvalid_ptr, P, RL, r_start, fp_tiles, scale, p_sb, p_sh, ppos_sb, r_sb, r_sh,
            rvalid_sb, RB, D, D_PAD, FB)
        out = (bh * n_total + split) * R + rows
        tl.store(acc_ptr + out[:, None] * D + dd[None, :], acc_f,
                 mask=row_ok[:, None] & (dd < D)[None, :])
        tl.store(m_ptr + out, m_f, mask=row_ok)
        tl.store(l_ptr + out, l_f, mask=row_ok)


@triton.jit(do_not_specialize=["n_total"])
def merge_normalise_kernel(m_s_ptr, l_s_ptr, acc_s_ptr, out_ptr, n_total, H, G, TQ,
                           out_sb, out_sh, out_st,
                           R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                           NS_BLOCK: tl.constexpr):
    """One program per (KV head, row): the log-sum-exp merge of the ``n_total`` partials
    (Def. 5.5) normalised, ``acc / l`` (0 for a row that sees no key), stored in the output's dtype
    at (b, query head, query) through the output's strides."""
    pid = tl.program_id(0).to(tl.int64)            # = bh * R + r
    bh = pid // R
    r = pid % R
    b = bh // H
    head = (bh % H) * G + r // TQ
    dd = tl.arange(0, D_PAD)
    d_ok = dd < D
    mx, l_row, acc_row = merge_split_row(m_s_ptr, l_s_ptr, acc_s_ptr, bh, r, n_total, R, D, D_PAD,
                                         NS_BLOCK)
    seen = mx != float("-inf")
    den = tl.where(seen, l_row, 1.0)
    res = tl.where(seen, tl.math.div_rn(acc_row, den), 0.0)     # IEEE, as torch
    res = res.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")   # as torch's .to()
    tl.store(out_ptr + b * out_sb + head * out_sh + (r % TQ) * out_st + dd, res, mask=d_ok)


# --------------------------------------------------------------------------- entry point

def _pair_rows_contiguous(k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, H, n, D) with tokens and channels contiguous and the same strides (the
    views the cache holds are; copies otherwise)."""
    d = k.shape[-1]

    def ok(x):
        return (d <= 1 or x.stride(-1) == 1) and (x.shape[-2] <= 1 or x.stride(-2) == d)

    if not (ok(k) and ok(v) and k.stride() == v.stride()):
        k, v = k.contiguous(), v.contiguous()
    return k, v


def fused_decode_attention(q: torch.Tensor, qp: torch.Tensor, scale: float, quantized, preserved,
                           residual, *, out_dtype: torch.dtype = torch.float32,
                           launch: Optional[FusedLaunch] = None) -> torch.Tensor:
    """Attention of ``q`` over the three segments of a cache layer in two launches (header above).

    ``q`` float ``(B, Hq, Tq, D)`` (channels contiguous), ``qp`` int64 ``(B, Tq)``;
    ``quantized = (keys, values, slot_positions)``: PackedQuantizedTensor ``(B, H, T, D)`` each
    (``T`` may be 0) and int64 ``(B, T)`` (-1 = empty slot);
    ``preserved = (keys, values, positions)``: ``(B, H, P, D)`` twice and int64 ``(B, P)``;
    ``residual = (keys, values, valid, start)``: ``(B, H, r, D)`` twice, bool ``(B, r)`` and the
    position of its first token: an int64 ``(1,)`` tensor on the device (read by the kernel, so
    that a CUDA-graph replay of the launch reads the current one), or an int.  Arguments are the
    cache's own (checked there, not here).
    Returns ``(B, Hq, Tq, D)`` in ``out_dtype``: the transposed view of a contiguous
    ``(B, Tq, Hq, D)`` tensor.
    """
    b, hq, tq, d = q.shape
    keys, values, kpos = quantized
    pk, pv, ppos = preserved
    rk, rv, rvalid, r_start = residual
    if q.stride(-1) != 1:
        q = q.contiguous()
    h = keys.shape[1]
    n_p, n_r = pk.shape[2], rk.shape[2]
    if launch is None:
        launch = fused_launch(q.shape, keys, values, n_p + n_r, q.device)
    r = launch.decode.rows
    n_total = launch.n_split + launch.n_fp
    m_s, l_s, acc_s = split_partials(b * h, n_total, r, d, q.device)
    out = torch.empty((b, tq, hq, d), dtype=out_dtype, device=q.device)
    if n_total:
        pk, pv = _pair_rows_contiguous(pk, pv)
        rk, rv = _pair_rows_contiguous(rk, rv)
        if not isinstance(r_start, torch.Tensor):
            r_start = torch.full((1,), int(r_start), dtype=torch.int64, device=q.device)
        _launch_fused(q, qp, scale, keys, values, kpos, pk, pv, ppos, rk, rv, rvalid, r_start,
                      launch, (m_s, l_s, acc_s))
    ml = merge_launch(32, d)        # 32 partials per loop step whatever n_total: one compilation
    merge_normalise_kernel[(b * h * r,)](
        m_s_ptr=m_s, l_s_ptr=l_s, acc_s_ptr=acc_s, out_ptr=out, n_total=n_total, H=h, G=hq // h,
        TQ=tq, out_sb=out.stride(0), out_sh=out.stride(2), out_st=out.stride(1), R=r, D=d,
        D_PAD=ml.d_pad, NS_BLOCK=ml.ns_block, num_warps=ml.num_warps)
    return out.transpose(1, 2)


def _launch_fused(q, qp, scale, keys, values, kpos, pk, pv, ppos, rk, rv, rvalid, r_start, launch,
                  partials):
    """The :func:`fused_decode_kernel` launch of :func:`fused_decode_attention`."""
    b, hq, tq, d = q.shape
    h = keys.shape[1]
    dl = launch.decode
    m_s, l_s, acc_s = partials
    kw, kw_sb, kw_sh, ks, kz, ks_sb, ks_sh = strided_parts(keys)
    vw, vw_sb, vw_sh, vs, vz, vs_sb, vs_sh = strided_parts(values)
    kpos, ppos, rvalid = (x if x.stride(-1) == 1 else x.contiguous() for x in (kpos, ppos, rvalid))
    grid = (b * h * dl.nrg, launch.n_split + launch.n_fp)
    tc = launch.tensor
    fused_decode_kernel[grid](
        q_ptr=q, qpos_ptr=qp.contiguous(), kpos_ptr=kpos, kw_ptr=kw, ks_ptr=ks, kz_ptr=kz,
        vw_ptr=vw, vs_ptr=vs, vz_ptr=vz, pk_ptr=pk, pv_ptr=pv, ppos_ptr=ppos, rk_ptr=rk, rv_ptr=rv,
        rvalid_ptr=rvalid, rstart_ptr=r_start, m_ptr=m_s, l_ptr=l_s, acc_ptr=acc_s,
        H=h, G=hq // h, T=keys.shape[2], TQ=tq, NGK=stat_count(keys), NGV=stat_count(values),
        tiles_per_split=launch.tiles_per_split, n_split=launch.n_split,
        n_total=launch.n_split + launch.n_fp,
        scale=float(scale), wstride=1, q_sb=q.stride(0), q_sh=q.stride(1), q_st=q.stride(2),
        kpos_sb=kpos.stride(0), kw_sb=kw_sb, kw_sh=kw_sh, ks_sb=ks_sb, ks_sh=ks_sh,
        vw_sb=vw_sb, vw_sh=vw_sh, vs_sb=vs_sb, vs_sh=vs_sh,
        P=pk.shape[2], RL=rk.shape[2], fp_tiles=launch.fp_tiles,
        p_sb=pk.stride(0), p_sh=pk.stride(1), ppos_sb=ppos.stride(0), r_sb=rk.stride(0),
        r_sh=rk.stride(1), rvalid_sb=rvalid.stride(0),
        R=dl.rows, RB=dl.rb, NRG=dl.nrg, D=d, D_PAD=launch.d_pad, FB=launch.fp_block, A=dl.a,
        TS=dl.ts, **(tc or dl).keys.constexprs("K"), **(tc or dl).values.constexprs("V"),
        PREFETCH=dl.prefetch, TC=tc is not None, M=tc.m if tc else 16,
        BT=tc.block_t if tc else 16, KFOLD=bool(tc and tc.key_fold),
        VFOLD=bool(tc and tc.value_fold), VREP=tc.value_rows if tc else 1,
        NATIVE=bool(tc and tc.native),
        **(tc.compile_options() if tc else {"num_warps": dl.num_warps, "num_stages": dl.num_stages}))
