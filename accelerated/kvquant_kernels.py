# Fused KVQuant dense quantization and dequantization (Triton), called by accelerated/kvquant_tensor.py
# (docs/08-kvquant.md "Triton path").  The outlier selection (key thresholds, per-token value top-k)
# and the sparse (index, value) lists stay in torch; the kernels do the dense part of definition 8.7.
#
# MEMORY LAYOUT (row n = b*H + h of the (B, H, T, D) tensor)
#   x       float32 (B, H, T, D), any strides (sx_b, sx_h, sx_t, sx_d): a cache slice needs no copy
#   excl    uint8 (B, T) contiguous            1 = token excluded (preserved / padding)
#   outl    uint8 (B, H, T, D) contiguous      1 = outlier (sparse part; torch selects them)
#   beta    float32 decision boundaries (definition 8.3) of the levels, broadcast to (B, H, T, D, n-1):
#           element (b, h, t, d, k) at b*sb + h*sh + t*st + d*sd + k, stride 0 on broadcast axes
#           (nf grid (n,): all four 0; per-channel key codebooks (H, 1, D, n): sh = D*(n-1), sd = n-1;
#           per-head value codebooks (H, 1, 1, n): sh = n-1).  The dequantize kernel reads the levels
#           the same way (n entries).
#   codes   uint8 (B, H, T, D)                 (what KVQuantTensor holds) and/or
#   words   int32 (B, H, T, W), W = ceil(D / cpw), cpw = 32 // b: code k of a row in word k // cpw at
#           bits [(k % cpw) * b, ...), LSB first (definition 2.4, uint32 bit pattern: what the cache
#           stores, accelerated/cache.py PackedKVQuantTensor)
#   scale, centre float32                      axis "channel": (B, H, ceil(T/G), D) (groups of G tokens)
#                                              axis "token":   (B, H, T, ceil(D/G)) (groups of G channels)
#   In registers a quantize tile is (ROWS, W_BLOCK, CPW_PAD): element (r, w, j) is channel
#   d = w*cpw + j, so packing is a shift by j*b and a sum over the last axis (as quantize_kernels.py).
#   A dequantize tile is (T_BLOCK, D_PAD), one element per channel.
#
# BYTES MOVED (each input read once, each output written once; the boundaries are at most
# H*D*(n-1)*4 bytes and stay in L1/L2)
#   quantize:   read 4*N*T*D (x) + N*T*D (outlier mask) + B*T (excl)
#               write N*T*D (codes) and/or 4*N*T*W (words) + 8*n_stats (s and c)
#   dequantize: read N*T*D (codes) or 4*N*T*W (words) + 8*n_stats;  write 4*N*T*D
#   One flushed SmolLM2 key block (B=1, H=3 KV heads, T=G=32 tokens, D=64, 2-bit, codes):
#     24,576 + 6,144 + 32 + 6,144 + 1,536 = 38,432 B -> 0.013 us at 3 TB/s: a flush is launch-bound
#     (one launch instead of the torch path's ~25 kernels and its host synchronisations).  The floor
#     matters for a prefill: B=1, H=8, T=32768, D=128 2-bit keys, codes -> x 134.2 MB + mask 33.6 MB
#     + codes 33.6 MB + s, c 8.4 MB = 209.7 MB -> 70 us at 3 TB/s (bench/bench_kvquant_kernels.py
#     measures both, against the measured copy bandwidth).
#
# NUMERICS: bit-identical to reference/kvquant.py.  min / max and the comparisons are exact; every
#   other operation is one IEEE float32 operation in the reference's order: w = hi - lo,
#   s = div_rn(w, 2), c = lo + s, t = div_rn(x - c, s) (tl.math.div_rn: correctly rounded; Triton's
#   plain "/" on float32 is div.full.f32, up to 2 ulp).  Dequantization x^ = l_q*s + c is compiled
#   with enable_fp_fusion=False: no FMA contraction (LLVM) and ptxas --fmad=false, so two roundings,
#   as the reference.  The boundaries are computed by torch exactly as the torch path does
#   (fl32(fl32(l_k + l_{k+1}) / 2)), the code is q = #{k : t > beta_k} found by a binary search of
#   b steps: the levels are sorted, hence (rounding is monotone) so are the boundaries, the set
#   {k : t > beta_k} is a prefix {0 .. q-1}, and the search returns its length -- the same count,
#   ties (t == beta_k) to the lower level included (nearest_level_search below is the same loop in
#   torch, tested on CPU against the reference).
#
# LAUNCH: one program per tile, the grid follows the shape; the quantize tiles are quantize_kernels'
# ChannelLaunch / TokenLaunch under this module's MAX_TILE (quantize_launch), the dequantize tile is
# DequantizeLaunch (dequantize_launch).  Without triton this module imports
# (accelerated/triton_support.py: CPU-only installs use the launch helpers and nearest_level_search);
# accelerated/kvquant_tensor.py calls the kernels only for CUDA tensors when triton is installed (or under
# TRITON_INTERPRET=1).

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .quantize_kernels import ChannelLaunch, TokenLaunch, channel_launch, token_launch
from .triton_support import floor_pow2, next_pow2, tl, triton

__all__ = ["MAX_TILE", "MAX_TOKEN_GROUPS", "DEQ_TILE", "kernel_supported", "quantize_launch",
           "DequantizeLaunch", "dequantize_launch", "broadcast_strides", "nearest_level_search",
           "quantize_channel_kernel", "quantize_token_kernel", "dequantize_kernel", "quantize_dense",
           "dequantize_dense"]

MAX_TILE = 2048           # elements of one quantize program's register tile (sm_90: <= ~200 registers,
                          # no spills; the boundary search keeps 64-bit addresses per element)
MAX_TOKEN_GROUPS = 16     # axis "token": groups per row are unrolled; more than this -> torch path
DEQ_TILE = 4096           # elements of one dequantize program's tile


# --------------------------------------------------------------------------- launch helpers (no triton)

def kernel_supported(shape, group_size: int, axis: str) -> bool:
    """Whether the kernels cover a ``(B, H, T, D)`` tensor with this grouping.

    Empty tensors and axis "token" with more than :data:`MAX_TOKEN_GROUPS`
    groups per token (their loop is unrolled) go to the torch path."""
    b, h, t, d = (int(n) for n in shape)
    if b * h * t * d == 0:
        return False
    return not (axis == "token" and -(-d // int(group_size)) > MAX_TOKEN_GROUPS)


def quantize_launch(shape, bits: int, group_size: int, axis: str):
    """The tiling of the quantize kernel for a ``(B, H, T, D)`` tensor: a
    :class:`~accelerated.quantize_kernels.ChannelLaunch` (axis "channel": ``NGT`` token groups,
    ``G_PAD`` rows and ``W_BLOCK`` words per tile, ``n_blocks`` word blocks per group) or
    :class:`~accelerated.quantize_kernels.TokenLaunch` (axis "token": ``NGD`` channel groups,
    ``T_BLOCK`` tokens per tile, ``W_PAD``, ``n_blocks`` token blocks per row), with ``grid``,
    ``cpw``, ``W``, ``CPW_PAD``; fields also read by name (``launch["W"]``).  Every tile has at most
    :data:`MAX_TILE` elements (one row of words may exceed it when ``W_PAD * CPW_PAD > MAX_TILE``:
    D > 8192 channels).
    """
    if axis == "channel":
        return channel_launch(shape, bits, group_size, max_tile=MAX_TILE)
    if axis == "token":
        return token_launch(shape, bits, group_size, max_tile=MAX_TILE)
    raise ValueError(f"axis={axis!r} is not allowed; choose 'token' or 'channel'")


@dataclass(frozen=True)
class DequantizeLaunch:
    """Tiling of :func:`dequantize_kernel`: a program is one row n, ``T_BLOCK`` tokens by ``D_PAD``
    channels (field names are the kernel's parameters; also read by name, ``launch["D_PAD"]``)."""

    D_PAD: int
    T_BLOCK: int
    n_blocks: int          # token blocks per row
    grid: int
    num_warps: int = 4

    def __getitem__(self, name: str):
        return getattr(self, name)


def dequantize_launch(shape) -> DequantizeLaunch:
    """The :class:`DequantizeLaunch` of a ``(B, H, T, D)`` tensor: under :data:`DEQ_TILE` elements."""
    b, h, t, d = (int(n) for n in shape)
    d_pad = next_pow2(d)
    t_block = floor_pow2(min(next_pow2(t), max(1, DEQ_TILE // d_pad)))
    n_tb = -(-t // t_block)
    return DequantizeLaunch(D_PAD=d_pad, T_BLOCK=t_block, n_blocks=n_tb, grid=b * h * n_tb)


def broadcast_strides(table: torch.Tensor, shape) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """``table`` ``(..., m)`` (levels or boundaries) broadcast against ``shape + (m,)``.

    Returns ``(contiguous table, (sb, sh, st, sd))``: element ``(b, h, t, d, k)``
    of the broadcast table is ``flat[b*sb + h*sh + t*st + d*sd + k]``; a
    broadcast axis has stride 0.  Raises ``ValueError`` if it does not broadcast.
    """
    m = table.shape[-1]
    base = table.contiguous()
    try:
        view = base.expand(tuple(int(n) for n in shape) + (m,))
    except RuntimeError:
        raise ValueError(f"levels of shape {tuple(table.shape)} do not broadcast against x.shape + (n,) = "
                         f"{tuple(shape) + (m,)}") from None
    s = view.stride()
    if m > 1 and s[-1] != 1:                # contiguous base: the last axis has stride 1
        raise AssertionError("broadcast table must be contiguous along its last axis")
    return base, (int(s[0]), int(s[1]), int(s[2]), int(s[3]))


def nearest_level_search(t: torch.Tensor, beta: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernel's binary search, in torch (for testing on any device): uint8 codes.

    ``beta`` ``(..., 2**bits - 1)`` sorted non-decreasing along the last axis,
    broadcasting against ``t.shape + (n - 1,)``.  ``q`` starts at 0; for
    ``step = 2**(b-1), ..., 2, 1``: ``q += step`` if ``t > beta[q + step - 1]``.
    The index never exceeds ``n - 2`` (``q <= n - 2*step`` before the step), and
    the result is ``#{k : t > beta_k}`` because that set is a prefix.
    """
    nb = beta.shape[-1]
    if nb != (1 << bits) - 1:
        raise ValueError(f"beta must have 2**bits - 1 = {(1 << bits) - 1} entries, got {nb}")
    bt = beta.expand(tuple(t.shape) + (nb,))
    q = torch.zeros(t.shape, dtype=torch.int64, device=t.device)
    for i in range(bits):
        step = 1 << (bits - 1 - i)
        bk = torch.gather(bt, -1, (q + (step - 1))[..., None])[..., 0]
        q = torch.where(t > bk, q + step, q)
    return q.to(torch.uint8)


# --------------------------------------------------------------------------- kernels (triton)

# Integer arguments compiled as plain runtime values (Triton would otherwise specialise each on
# "== 1" and "divisible by 16", multiplying the compiled variants across shapes); D, W and the
# innermost stride of x stay specialised (alignment -> vectorised row loads).
_NO_SPECIALIZE = ["H", "T", "NGT", "NGD", "n_wblocks", "n_tblocks", "sxb", "sxh", "sxt", "sb", "sh", "st",
                  "sd", "G", "NSTAT"]

@triton.jit
def _search(t, beta_ptr, base, ok, BITS: tl.constexpr):
    # binary search over the sorted boundaries: q = #{k : t > beta_k}
    q = tl.zeros(t.shape, dtype=tl.int32)
    for i in tl.static_range(BITS):
        step = 1 << (BITS - 1 - i)
        bk = tl.load(beta_ptr + base + (q + (step - 1)), mask=ok, other=0.0)
        q = tl.where(t > bk, q + step, q)
    return q

@triton.jit
def _codes_out(codes_ptr, words_ptr, code, ok, row_off, d, w, j, row_ok, w_ok, D, W,
               BITS: tl.constexpr, CPW: tl.constexpr, WRITE_CODES: tl.constexpr,
               WRITE_WORDS: tl.constexpr):
    # code (R, W_BLOCK, CPW_PAD) int32; row_off (R,) int64 = row index n*T + t; d (1, W_BLOCK,
    # CPW_PAD) channel, j (1, 1, CPW_PAD) position in the word
    if WRITE_CODES:
        tl.store(codes_ptr + row_off[:, None, None] * D + d, code.to(tl.uint8), mask=ok)
    if WRITE_WORDS:
        qi = tl.where(ok, code, 0).to(tl.uint32)
        # padded lanes (j >= CPW) hold 0 and get shift 0: a shift >= 32 would be LLVM poison
        # (seen miscompiled on sm_90 for b = 6), even though its lane is zero
        shifted = qi << tl.where(j < CPW, j * BITS, 0).to(tl.uint32)
        packed = tl.sum(shifted, axis=2)                          # disjoint fields: sum == or
        tl.store(words_ptr + row_off[:, None] * W + w[None, :], packed.to(tl.int32, bitcast=True),
                 mask=row_ok[:, None] & w_ok[None, :])

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def quantize_channel_kernel(x_ptr, excl_ptr, outl_ptr, beta_ptr, codes_ptr, words_ptr, scale_ptr,
                            centre_ptr, H, T, NGT, n_wblocks, sxb, sxh, sxt, sxd, sb, sh, st, sd,
                            D, W, G, BITS: tl.constexpr, CPW: tl.constexpr,
                            G_PAD: tl.constexpr, W_BLOCK: tl.constexpr,
                            CPW_PAD: tl.constexpr, WRITE_CODES: tl.constexpr,
                            WRITE_WORDS: tl.constexpr):
    # one program: rows n, token group g, words [wb*W_BLOCK, ...); s, c per channel (reduce axis 0)
    pid = tl.program_id(0)
    wb = pid % n_wblocks
    rest = pid // n_wblocks
    g = rest % NGT
    n = (rest // NGT).to(tl.int64)
    bi = n // H
    hi_ = n % H
    r = tl.arange(0, G_PAD)
    w = wb * W_BLOCK + tl.arange(0, W_BLOCK)
    j = tl.arange(0, CPW_PAD)
    t = g * G + r
    row_ok = (r < G) & (t < T)
    d = w[:, None] * CPW + j[None, :]                             # (W_BLOCK, CPW_PAD)
    col_ok = (j[None, :] < CPW) & (d < D)
    ok = row_ok[:, None, None] & col_ok[None, :, :]
    t64 = t.to(tl.int64)
    d64 = d.to(tl.int64)
    x = tl.load(x_ptr + bi * sxb + hi_ * sxh + t64[:, None, None] * sxt + d64[None, :, :] * sxd,
                mask=ok, other=0.0)
    row_off = n * T + t64
    ex = tl.load(excl_ptr + bi * T + t64, mask=row_ok, other=1)
    ol = tl.load(outl_ptr + row_off[:, None, None] * D + d64[None, :, :], mask=ok, other=1)
    counted = ok & (ex == 0)[:, None, None] & (ol == 0)
    n_counted = tl.sum(counted.to(tl.int32), axis=0)              # (W_BLOCK, CPW_PAD)
    empty = n_counted == 0
    lo = tl.min(tl.where(counted, x, float("inf")), axis=0)
    hi = tl.max(tl.where(counted, x, float("-inf")), axis=0)
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    s = tl.math.div_rn(hi - lo, tl.zeros_like(lo) + 2.0)
    c = lo + s
    stat = (n * NGT + g) * D + d64
    tl.store(scale_ptr + stat, s, mask=col_ok)
    tl.store(centre_ptr + stat, c, mask=col_ok)
    nz = s != 0
    safe = tl.where(nz, s, 1.0)
    xe = tl.where(counted, x, c[None])
    tn = tl.where(nz[None], tl.math.div_rn(xe - c[None], safe[None]), 0.0)
    base = bi * sb + hi_ * sh + t64[:, None, None] * st + d64[None, :, :] * sd
    q = _search(tn, beta_ptr, base, ok, BITS)
    code = tl.where(counted & nz[None], q, 0)
    _codes_out(codes_ptr, words_ptr, code, ok, row_off, d64[None, :, :], w, j[None, None, :], row_ok,
               w < W, D, W, BITS, CPW, WRITE_CODES, WRITE_WORDS)

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def quantize_token_kernel(x_ptr, excl_ptr, outl_ptr, beta_ptr, codes_ptr, words_ptr, scale_ptr,
                          centre_ptr, H, T, NGD, n_tblocks, sxb, sxh, sxt, sxd, sb, sh, st, sd,
                          D, W, G, BITS: tl.constexpr, CPW: tl.constexpr,
                          NG: tl.constexpr, T_BLOCK: tl.constexpr,
                          W_PAD: tl.constexpr, CPW_PAD: tl.constexpr, WRITE_CODES: tl.constexpr,
                          WRITE_WORDS: tl.constexpr):
    # one program: row n, tokens [tb*T_BLOCK, ...), all D channels; groups of G channels unrolled
    pid = tl.program_id(0)
    tb = pid % n_tblocks
    n = (pid // n_tblocks).to(tl.int64)
    bi = n // H
    hi_ = n % H
    t = tb * T_BLOCK + tl.arange(0, T_BLOCK)
    w = tl.arange(0, W_PAD)
    j = tl.arange(0, CPW_PAD)
    row_ok = t < T
    d = w[:, None] * CPW + j[None, :]
    col_ok = (j[None, :] < CPW) & (d < D)
    ok = row_ok[:, None, None] & col_ok[None, :, :]
    t64 = t.to(tl.int64)
    d64 = d.to(tl.int64)
    x = tl.load(x_ptr + bi * sxb + hi_ * sxh + t64[:, None, None] * sxt + d64[None, :, :] * sxd,
                mask=ok, other=0.0)
    row_off = n * T + t64
    ex = tl.load(excl_ptr + bi * T + t64, mask=row_ok, other=1)
    ol = tl.load(outl_ptr + row_off[:, None, None] * D + d64[None, :, :], mask=ok, other=1)
    counted = ok & (ex == 0)[:, None, None] & (ol == 0)
    grp = (d // G)[None, :, :]                                    # (1, W_PAD, CPW_PAD)
    s_full = tl.zeros_like(x)
    c_full = tl.zeros_like(x)
    for gi in tl.static_range(NG):
        in_g = counted & (grp == gi)
        cnt = tl.sum(tl.sum(in_g.to(tl.int32), axis=2), axis=1)  # (T_BLOCK,)
        empty = cnt == 0
        lo = tl.min(tl.min(tl.where(in_g, x, float("inf")), axis=2), axis=1)
        hi = tl.max(tl.max(tl.where(in_g, x, float("-inf")), axis=2), axis=1)
        lo = tl.where(empty, 0.0, lo)
        hi = tl.where(empty, 0.0, hi)
        s_g = tl.math.div_rn(hi - lo, tl.zeros_like(lo) + 2.0)
        c_g = lo + s_g
        s_full = tl.where(grp == gi, s_g[:, None, None], s_full)
        c_full = tl.where(grp == gi, c_g[:, None, None], c_full)
        tl.store(scale_ptr + row_off * NGD + gi, s_g, mask=row_ok & (gi < NGD))
        tl.store(centre_ptr + row_off * NGD + gi, c_g, mask=row_ok & (gi < NGD))
    nz = s_full != 0
    safe = tl.where(nz, s_full, 1.0)
    xe = tl.where(counted, x, c_full)
    tn = tl.where(nz, tl.math.div_rn(xe - c_full, safe), 0.0)
    base = bi * sb + hi_ * sh + t64[:, None, None] * st + d64[None, :, :] * sd
    q = _search(tn, beta_ptr, base, ok, BITS)
    code = tl.where(counted & nz, q, 0)
    _codes_out(codes_ptr, words_ptr, code, ok, row_off, d64[None, :, :], w, j[None, None, :], row_ok,
               w < W, D, W, BITS, CPW, WRITE_CODES, WRITE_WORDS)

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def dequantize_kernel(src_ptr, scale_ptr, centre_ptr, lv_ptr, out_ptr, H, T, n_tblocks,
                      sb, sh, st, sd, NSTAT, D, W, G, BITS: tl.constexpr,
                      CPW: tl.constexpr, NLEV: tl.constexpr,
                      CHANNEL: tl.constexpr, PACKED: tl.constexpr, T_BLOCK: tl.constexpr,
                      D_PAD: tl.constexpr):
    # one program: row n, tokens [tb*T_BLOCK, ...); x^ = l_q * s + c, two roundings (no FMA:
    # launched with enable_fp_fusion=False).  An invalid unpacked code (outside [0, 2**b)) gives NaN.
    pid = tl.program_id(0)
    tb = pid % n_tblocks
    n = (pid // n_tblocks).to(tl.int64)
    bi = n // H
    hi_ = n % H
    t = (tb * T_BLOCK + tl.arange(0, T_BLOCK)).to(tl.int64)
    d = tl.arange(0, D_PAD).to(tl.int64)
    ok = (t < T)[:, None] & (d < D)[None, :]
    row_off = n * T + t
    if PACKED:
        word = tl.load(src_ptr + row_off[:, None] * W + (d // CPW)[None, :], mask=ok, other=0)
        shift = ((d % CPW) * BITS).to(tl.uint32)
        q = ((word.to(tl.uint32, bitcast=True) >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.int32)
    else:
        q = tl.load(src_ptr + row_off[:, None] * D + d[None, :], mask=ok, other=0).to(tl.int32)
    valid = ok & (q >= 0) & (q < NLEV)
    base = bi * sb + hi_ * sh + t[:, None] * st + d[None, :] * sd
    lq = tl.load(lv_ptr + base + q, mask=valid, other=float("nan"))
    if CHANNEL:
        stat = (n * NSTAT + t[:, None] // G) * D + d[None, :]
    else:
        stat = row_off[:, None] * NSTAT + d[None, :] // G
    s = tl.load(scale_ptr + stat, mask=ok, other=0.0)
    c = tl.load(centre_ptr + stat, mask=ok, other=0.0)
    prod = lq * s
    tl.store(out_ptr + row_off[:, None] * D + d[None, :], prod + c, mask=ok)


def _quantize_outputs(shape, lp, axis: str, codes: bool, words: bool, dev):
    """Empty codes / words (None where not asked for) and scale, centre in the reference's shapes."""
    bsz, h, t, d = shape
    codes_t = torch.empty((bsz, h, t, d), dtype=torch.uint8, device=dev) if codes else None
    words_t = torch.empty((bsz, h, t, lp.W), dtype=torch.int32, device=dev) if words else None
    stat_shape = (bsz, h, lp.NGT, d) if axis == "channel" else (bsz, h, t, lp.NGD)
    scale = torch.empty(stat_shape, dtype=torch.float32, device=dev)
    return codes_t, words_t, scale, torch.empty_like(scale)


def quantize_dense(x32: torch.Tensor, excl: torch.Tensor, outliers: torch.Tensor, beta: torch.Tensor,
                   bits: int, group_size: int, axis: str, *, codes: bool = True, words: bool = False):
    """Run the quantize kernel on a ``(B, H, T, D)`` float32 tensor (arguments checked by the caller).

    ``excl`` bool ``(B, T)``; ``outliers`` bool ``(B, H, T, D)`` (the sparse entries,
    never on excluded tokens or ignored there); ``beta`` the decision boundaries
    ``(..., 2**b - 1)`` broadcasting against ``x.shape + (2**b - 1,)``.
    Returns ``(codes uint8 (B, H, T, D) or None, words int32 (B, H, T, W) or None,
    scale, centre)`` in the reference's shapes.  No host synchronisation; a group
    whose range overflows float32 gives a non-finite ``scale`` or ``centre + scale``,
    which the caller checks (accelerated/kvquant_tensor.py raises the torch path's error).
    """
    if not (codes or words):
        raise ValueError("quantize_dense: ask for codes, words or both")
    shape = tuple(int(n) for n in x32.shape)
    lp = quantize_launch(shape, bits, group_size, axis)
    dev = x32.device
    beta_c, (sb, sh, st, sd) = broadcast_strides(beta.to(device=dev, dtype=torch.float32), shape)
    codes_t, words_t, scale, centre = _quantize_outputs(shape, lp, axis, codes, words, dev)
    sx = x32.stride()
    args = dict(x_ptr=x32, excl_ptr=excl.contiguous().view(torch.uint8),
                outl_ptr=outliers.contiguous().view(torch.uint8), beta_ptr=beta_c,
                codes_ptr=codes_t if codes else scale,           # unused pointer when not written
                words_ptr=words_t if words else scale, scale_ptr=scale, centre_ptr=centre,
                H=shape[1], T=shape[2], sxb=sx[0], sxh=sx[1], sxt=sx[2], sxd=sx[3],
                sb=sb, sh=sh, st=st, sd=sd, D=shape[3], W=lp.W, G=int(group_size), BITS=int(bits),
                CPW=lp.cpw, CPW_PAD=lp.CPW_PAD, WRITE_CODES=bool(codes), WRITE_WORDS=bool(words),
                num_warps=lp.num_warps, enable_fp_fusion=False)
    if axis == "channel":
        quantize_channel_kernel[(lp.grid,)](NGT=lp.NGT, n_wblocks=lp.n_blocks, G_PAD=lp.G_PAD,
                                            W_BLOCK=lp.W_BLOCK, **args)
    else:
        quantize_token_kernel[(lp.grid,)](NGD=lp.NGD, n_tblocks=lp.n_blocks, NG=lp.NGD,
                                          T_BLOCK=lp.T_BLOCK, W_PAD=lp.W_PAD, **args)
    return codes_t, words_t, scale, centre


def dequantize_dense(src: torch.Tensor, scale: torch.Tensor, centre: torch.Tensor, levels: torch.Tensor,
                     bits: int, group_size: int, axis: str, shape, *, packed: bool = False) -> torch.Tensor:
    """Run the dequantize kernel: float32 ``shape`` = ``(B, H, T, D)``, ``l_q * s + c`` everywhere.

    ``src``: integer codes ``shape`` (uint8 as stored; ``packed=False``; a code outside
    ``[0, 2**b)`` dequantizes to NaN) or int32 words
    ``(B, H, T, W)`` (``packed=True``); ``scale``, ``centre`` float32 in the
    reference's shapes; ``levels`` ``(..., 2**b)`` broadcasting against
    ``shape + (2**b,)``.  Outliers are not written (the caller does, in torch).
    """
    bsz, h, t, d = (int(n) for n in shape)
    lp = dequantize_launch(shape)
    dev = src.device
    lv_c, (sb, sh, st, sd) = broadcast_strides(levels.to(device=dev, dtype=torch.float32), shape)
    out = torch.empty((bsz, h, t, d), dtype=torch.float32, device=dev)
    cpw = 32 // int(bits)
    nstat = scale.shape[-2] if axis == "channel" else scale.shape[-1]
    dequantize_kernel[(lp.grid,)](
        src_ptr=src.contiguous(), scale_ptr=scale.contiguous(), centre_ptr=centre.contiguous(),
        lv_ptr=lv_c, out_ptr=out, H=h, T=t, n_tblocks=lp.n_blocks, sb=sb, sh=sh, st=st, sd=sd,
        NSTAT=nstat, D=d, W=-(-d // cpw), G=int(group_size), BITS=int(bits), CPW=cpw,
        NLEV=1 << int(bits), CHANNEL=axis == "channel", PACKED=bool(packed), T_BLOCK=lp.T_BLOCK,
        D_PAD=lp.D_PAD, num_warps=lp.num_warps, enable_fp_fusion=False)
    return out
