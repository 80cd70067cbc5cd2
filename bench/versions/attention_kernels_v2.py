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
#        by a few torch ops (small: n_split * R * D floats per head).
#   Grid (B*H, n_split): a program owns one KV head (all g*Tq query rows of its group, so the
#   packed K/V are read ONCE) and a contiguous token range, BLOCK_T tokens per step; the codes are
#   unpacked and dequantized in registers (x = q*s + z), never written back.
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


def _stat_count(p) -> int:
    """Runtime NG of a packed tensor: groups along T (channel) or along D (token)."""
    return p.scale.shape[-2] if p.axis == "channel" else p.scale.shape[-1]


def quantized_partial_attention(q: torch.Tensor, keys, values, qp: torch.Tensor, kp: torch.Tensor,
                                scale: float, precision: str = "ieee", block_t: int = None,
                                n_split: int = None, num_stages: int = 1, num_warps: int = 4,
                                use_dot: bool = None):
    """(m, l, acc) of the quantized segment; arguments validated by accelerated/attention.py.

    ``q`` float32 (B, Hq, Tq, D); ``keys``/``values`` PackedQuantizedTensor (B, H, T, D);
    ``qp`` int64 (B, Tq); ``kp`` int64 (B, T) with invalid keys at -1.
    """
    b, hq, tq, d = q.shape
    h, t_len = keys.shape[1], keys.shape[2]
    g = hq // h
    r = g * tq
    if use_dot is None:                 # few rows (decode): CUDA-core products; many rows: tl.dot
        use_dot = precision == "tf32x3" or r > 8
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
    # merge the splits (log-sum-exp)
    big_m = m_s.amax(dim=1)                                            # (BH, R)
    safe = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    w = torch.where(torch.isfinite(m_s), torch.exp(m_s - safe[:, None]), torch.zeros_like(m_s))
    l = (w * l_s).sum(dim=1)
    acc = (w[..., None] * acc_s).sum(dim=1)
    return (big_m.reshape(b, hq, tq), l.reshape(b, hq, tq), acc.reshape(b, hq, tq, d))
