# Fused group quantization + bit packing (Triton), called by accelerated/quantize.py::quantize_packed.
#
# MEMORY LAYOUT
#   x      float32 (N, T, D) contiguous, N = prod(leading dims) (e.g. B*H)
#   excl   uint8   (N, T)            1 = token excluded from the statistics (preserved / padding)
#   words  int32   (N, T, W)         W = ceil(D / cpw), cpw = 32 // bits; code k of a row in word
#                                    k // cpw at bits [(k % cpw) * b, ...), LSB first (uint32 pattern)
#   scale, zero float32              axis "channel": (N, ceil(T/G), D)   (groups of G tokens)
#                                    axis "token":   (N, T, ceil(D/G))   (groups of G channels)
#   In registers a tile is (ROWS, W_BLOCK, CPW_PAD): element (r, w, j) is channel d = w*cpw + j, so
#   packing is a shift by j*b and a sum over the last axis (fields are disjoint: sum == or).
#
# BYTES MOVED PER CALL (each input read once, each output written once)
#   read  x: 4*N*T*D  + excl: N*T
#   write words: 4*N*T*W  + stats: 4*(1 or 2)*N*n_stats   (asymmetric writes scale and zero)
#   Realistic shape: one flushed key block, B=1, H=8 KV heads, G=T=32 tokens, D=128, 2-bit, channel:
#     x 131,072 B + words 8,192 B + stats 8,192 B + excl 256 B = 147,712 B  -> 0.05 us at 3 TB/s:
#     a single flush is launch-bound (~5 us).  The bandwidth floor matters for a prefill of a
#     long prompt: B=1, H=8, T=32768, D=128 2-bit keys: 134.2 MB + 8.4 MB + 8.4 MB = 151 MB
#     -> 50 us at 3 TB/s (bench/bench_kernels.py measures both).
#
# NUMERICS: identical to reference/quantize.py bit for bit: min/max are exact, the subtractions
#   are IEEE float32, every division is tl.math.div_rn (correctly rounded, like numpy's), and
#   round-half-to-even is (a + 2**23) - 2**23 on a = |y| <= 255 (< 2**23: the float32 adder rounds
#   to an integer with ties to even; LLVM does not reassociate without fast-math), sign restored.
#   The codes are clamped before rounding: clip(rint(y), lo, hi) == rint(clip(y, lo, hi)) for
#   integer lo, hi.
#
# SHIFTS: the CPW axis is padded to CPW_PAD (next power of two); for b = 3, 5, 6 (CPW = 10, 6, 5 ->
#   16, 8, 8) a padded lane's shift j*b would reach 33..45.  A shift >= 32 is poison in LLVM, and
#   poison in one lane poisons the sum that packs the word, even though the lane's code is 0.  When
#   the shifts are compile-time constants in one thread LLVM folds them (seen miscompiled on sm_90:
#   the kvquant kernel's words for b = 6; the attention kernel's scores for D = 1, b = 3, see
#   attention_kernels.py SHIFTS), so _pack gives padded lanes shift 0: tl.where(j < CPW, j*b, 0).
#
# LAUNCH: one program per tile (no split over the sequence: the grid follows the shape); the tile
# is ChannelLaunch / TokenLaunch, chosen by channel_launch / token_launch under the register budget
# MAX_TILE.  accelerated/quantize.py runs the kernels only for a CUDA tensor when triton is
# installed (quantize._kernel_usable); without triton this module still imports
# (accelerated/triton_support.py) and a launch raises.  The first version of these kernels is kept in
# bench/versions/quantize_kernels_v1.py for the before/after timings.

from __future__ import annotations

from dataclasses import dataclass

import torch

from .triton_support import floor_pow2, next_pow2, tl, triton

__all__ = ["MAX_TILE", "MAX_TOKEN_GROUPS", "ChannelLaunch", "TokenLaunch", "channel_launch",
           "token_launch", "quantize_channel_kernel", "quantize_token_kernel", "quantize_pack"]

MAX_TILE = 8192           # elements of one program's register tile (sm_90, no spills)
MAX_TOKEN_GROUPS = 16     # axis "token": groups per row are unrolled; more than this -> torch path

@triton.jit
def _rint_clamped(y, lo, hi):
    # round half to even of y clamped to [lo, hi] (|y| <= 255 < 2**23)
    y = tl.minimum(tl.maximum(y, lo), hi)
    a = tl.abs(y)
    r = (a + 8388608.0) - 8388608.0
    return tl.where(y < 0, -r, r)

@triton.jit
def _pack(q, j, keep, BITS: tl.constexpr, CPW: tl.constexpr):
    # q (R, W, C) float32 integer codes -> (R, W) uint32 words.  Padded lanes (j >= CPW) hold 0
    # and get shift 0: j*BITS >= 32 would be LLVM poison (see SHIFTS in the header)
    qi = tl.where(keep, q, 0.0).to(tl.uint32)
    shifted = qi << tl.where(j < CPW, j * BITS, 0).to(tl.uint32)
    return tl.sum(shifted, axis=2)

@triton.jit
def _flag(flag_ptr, x, x_ok, s, z, s_ok, L: tl.constexpr, M: tl.constexpr, SYMMETRIC: tl.constexpr):
    # Fused validation (one device->host sync per call, in quantize.py): bit 1 = x holds NaN/Inf
    # (all elements, excluded ones too, like the torch check); bit 2 = a group's statistics may
    # overflow float32 (range max - min, or L*s + z / M*s).  Bit 2 is a conservative screen
    # (|top| >= 3.0e38, whatever the rounding): quantize.py then runs the exact torch checks,
    # which raise the documented error or, for a false alarm, nothing.
    bad_x = tl.max(tl.where(x_ok & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0))
    if SYMMETRIC:
        top = tl.abs(s) * M
    else:
        top = tl.abs(s) * L + tl.abs(z)
    bad_s = tl.max(tl.where(s_ok & ((top != top) | (top >= 3.0e38)), 2, 0))
    code = bad_x | bad_s
    tl.atomic_or(flag_ptr, code, mask=code != 0)


@triton.jit
def quantize_channel_kernel(x_ptr, excl_ptr, words_ptr, scale_ptr, zero_ptr, flag_ptr,
                            T, NGT, n_wblocks, D: tl.constexpr, W: tl.constexpr,
                            BITS: tl.constexpr, CPW: tl.constexpr, G: tl.constexpr,
                            G_PAD: tl.constexpr, W_BLOCK: tl.constexpr, CPW_PAD: tl.constexpr,
                            SYMMETRIC: tl.constexpr, L: tl.constexpr, M: tl.constexpr,
                            CHECK: tl.constexpr):
    pid = tl.program_id(0)
    wb = pid % n_wblocks
    rest = pid // n_wblocks
    g = rest % NGT
    n = (rest // NGT).to(tl.int64)
    r = tl.arange(0, G_PAD)
    w = wb * W_BLOCK + tl.arange(0, W_BLOCK)
    j = tl.arange(0, CPW_PAD)
    t = g * G + r
    row_ok = (r < G) & (t < T)
    d = w[:, None] * CPW + j[None, :]                         # (W_BLOCK, CPW_PAD)
    col_ok = (j[None, :] < CPW) & (d < D)
    ok = row_ok[:, None, None] & col_ok[None, :, :]
    x = tl.load(x_ptr + (n * T + t)[:, None, None] * D + d[None, :, :], mask=ok, other=0.0)
    ex = tl.load(excl_ptr + n * T + t, mask=row_ok, other=1)
    counted = ok & (ex == 0)[:, None, None]
    n_counted = tl.sum(counted.to(tl.int32), axis=0)          # (W_BLOCK, CPW_PAD)
    empty = n_counted == 0
    if SYMMETRIC:
        amax = tl.max(tl.where(counted, tl.abs(x), 0.0), axis=0)
        s = tl.math.div_rn(amax, tl.zeros_like(amax) + M)
        nz = s != 0
        safe = tl.where(nz, s, 1.0)
        xe = tl.where(counted, x, 0.0)
        y = tl.where(nz[None], tl.math.div_rn(xe, safe[None]), 0.0)
        q = _rint_clamped(y, -M * 1.0, M * 1.0) + M
        if CHECK:
            _flag(flag_ptr, x, ok, s, s, col_ok, L, M, SYMMETRIC)
    else:
        mn = tl.min(tl.where(counted, x, float("inf")), axis=0)
        mx = tl.max(tl.where(counted, x, float("-inf")), axis=0)
        mn = tl.where(empty, 0.0, mn)
        mx = tl.where(empty, 0.0, mx)
        s = tl.math.div_rn(mx - mn, tl.zeros_like(mn) + L)
        nz = s != 0
        safe = tl.where(nz, s, 1.0)
        xe = tl.where(counted, x, mn[None])
        y = tl.where(nz[None], tl.math.div_rn(xe - mn[None], safe[None]), 0.0)
        q = _rint_clamped(y, 0.0, L * 1.0)
        tl.store(zero_ptr + (n * NGT + g) * D + d, mn, mask=col_ok)
        if CHECK:
            _flag(flag_ptr, x, ok, s, mn, col_ok, L, M, SYMMETRIC)
    tl.store(scale_ptr + (n * NGT + g) * D + d, s, mask=col_ok)
    packed = _pack(q, j[None, None, :], ok, BITS, CPW)       # (G_PAD, W_BLOCK)
    tl.store(words_ptr + (n * T + t)[:, None] * W + w[None, :], packed.to(tl.int32, bitcast=True),
             mask=row_ok[:, None] & (w[None, :] < W))

@triton.jit
def quantize_token_kernel(x_ptr, excl_ptr, words_ptr, scale_ptr, zero_ptr, flag_ptr,
                          T, NGD, n_tblocks, D: tl.constexpr, W: tl.constexpr,
                          BITS: tl.constexpr, CPW: tl.constexpr, G: tl.constexpr,
                          NG: tl.constexpr, T_BLOCK: tl.constexpr, W_PAD: tl.constexpr,
                          CPW_PAD: tl.constexpr, SYMMETRIC: tl.constexpr, L: tl.constexpr, M: tl.constexpr,
                          CHECK: tl.constexpr):
    pid = tl.program_id(0)
    tb = pid % n_tblocks
    n = (pid // n_tblocks).to(tl.int64)
    t = tb * T_BLOCK + tl.arange(0, T_BLOCK)
    w = tl.arange(0, W_PAD)
    j = tl.arange(0, CPW_PAD)
    row_ok = t < T
    d = w[:, None] * CPW + j[None, :]
    col_ok = (j[None, :] < CPW) & (d < D)
    ok = row_ok[:, None, None] & col_ok[None, :, :]
    x = tl.load(x_ptr + (n * T + t)[:, None, None] * D + d[None, :, :], mask=ok, other=0.0)
    ex = tl.load(excl_ptr + n * T + t, mask=row_ok, other=1)
    counted = ok & (ex == 0)[:, None, None]
    grp = (d // G)[None, :, :]                                # (1, W_PAD, CPW_PAD)
    s_full = tl.zeros_like(x)
    z_full = tl.zeros_like(x)
    for gi in tl.static_range(NG):
        in_g = counted & (grp == gi)
        cnt = tl.sum(tl.sum(in_g.to(tl.int32), axis=2), axis=1)           # (T_BLOCK,)
        empty = cnt == 0
        if SYMMETRIC:
            amax = tl.max(tl.max(tl.where(in_g, tl.abs(x), 0.0), axis=2), axis=1)
            s_g = tl.math.div_rn(amax, tl.zeros_like(amax) + M)
        else:
            mn = tl.min(tl.min(tl.where(in_g, x, float("inf")), axis=2), axis=1)
            mx = tl.max(tl.max(tl.where(in_g, x, float("-inf")), axis=2), axis=1)
            mn = tl.where(empty, 0.0, mn)
            mx = tl.where(empty, 0.0, mx)
            s_g = tl.math.div_rn(mx - mn, tl.zeros_like(mn) + L)
            z_full = tl.where(grp == gi, mn[:, None, None], z_full)
            tl.store(zero_ptr + (n * T + t) * NGD + gi, mn, mask=row_ok & (gi < NGD))
        s_full = tl.where(grp == gi, s_g[:, None, None], s_full)
        tl.store(scale_ptr + (n * T + t) * NGD + gi, s_g, mask=row_ok & (gi < NGD))
    if CHECK:
        _flag(flag_ptr, x, ok, s_full, z_full, ok, L, M, SYMMETRIC)
    nz = s_full != 0
    safe = tl.where(nz, s_full, 1.0)
    if SYMMETRIC:
        xe = tl.where(counted, x, 0.0)
        y = tl.where(nz, tl.math.div_rn(xe, safe), 0.0)
        q = _rint_clamped(y, -M * 1.0, M * 1.0) + M
    else:
        xe = tl.where(counted, x, z_full)
        y = tl.where(nz, tl.math.div_rn(xe - z_full, safe), 0.0)
        q = _rint_clamped(y, 0.0, L * 1.0)
    packed = _pack(q, j[None, None, :], ok, BITS, CPW)       # (T_BLOCK, W_PAD)
    tl.store(words_ptr + (n * T + t)[:, None] * W + w[None, :], packed.to(tl.int32, bitcast=True),
             mask=row_ok[:, None] & (w[None, :] < W))


class _ByName:
    """A launch's fields read by name too (``launch["W_BLOCK"]``), as the kernels' parameters are."""

    def __getitem__(self, name: str):
        return getattr(self, name)


def _rows(shape) -> tuple:
    """``(N, T, D)`` of a ``(..., T, D)`` shape, N = the product of the leading dims."""
    *lead, t, d = (int(v) for v in shape)
    n = 1
    for v in lead:
        n *= v
    return n, t, d


@dataclass(frozen=True)
class ChannelLaunch(_ByName):
    """Tiling of :func:`quantize_channel_kernel` (and of kvquant_kernels' channel kernel): a program
    is one row n, one token group, a block of words; field names are the kernel's parameters."""

    cpw: int               # codes per word
    W: int                 # words per token
    CPW_PAD: int
    NGT: int               # token groups
    G_PAD: int             # rows of a tile (the group, padded)
    W_BLOCK: int           # words of a tile
    n_blocks: int          # word blocks per group
    grid: int
    num_warps: int = 4


def channel_launch(shape, bits: int, group_size: int, max_tile: int = MAX_TILE) -> ChannelLaunch:
    """The :class:`ChannelLaunch` for ``(..., T, D)`` under ``max_tile`` elements per tile."""
    n, t, d = _rows(shape)
    cpw = 32 // bits
    w = -(-d // cpw)
    cpw_pad = next_pow2(cpw)
    ngt = -(-t // group_size)
    g_pad = next_pow2(min(group_size, t))
    w_block = floor_pow2(max(1, min(next_pow2(w), max_tile // (g_pad * cpw_pad))))
    n_wb = -(-w // w_block)
    return ChannelLaunch(cpw=cpw, W=w, CPW_PAD=cpw_pad, NGT=ngt, G_PAD=g_pad, W_BLOCK=w_block,
                         n_blocks=n_wb, grid=n * ngt * n_wb)


@dataclass(frozen=True)
class TokenLaunch(_ByName):
    """Tiling of :func:`quantize_token_kernel` (and of kvquant_kernels' token kernel): a program is
    one row n, a block of tokens with all their words; field names are the kernel's parameters."""

    cpw: int
    W: int
    CPW_PAD: int
    NGD: int               # channel groups per token (unrolled: <= MAX_TOKEN_GROUPS)
    W_PAD: int
    T_BLOCK: int           # tokens of a tile
    n_blocks: int          # token blocks per row
    grid: int
    num_warps: int = 4


def token_launch(shape, bits: int, group_size: int, max_tile: int = MAX_TILE) -> TokenLaunch:
    """The :class:`TokenLaunch` for ``(..., T, D)``: up to 64 tokens, under ``max_tile`` elements."""
    n, t, d = _rows(shape)
    cpw = 32 // bits
    w = -(-d // cpw)
    cpw_pad = next_pow2(cpw)
    w_pad = next_pow2(w)
    t_block = floor_pow2(max(1, min(64, max_tile // (w_pad * cpw_pad))))
    n_tb = -(-t // t_block)
    return TokenLaunch(cpw=cpw, W=w, CPW_PAD=cpw_pad, NGD=-(-d // group_size), W_PAD=w_pad,
                       T_BLOCK=t_block, n_blocks=n_tb, grid=n * n_tb)


def _launch_channel(x, ex, words, flag, bits, group_size, symmetric):
    lp = channel_launch(x.shape, bits, group_size)
    n, t, d = x.shape
    scale = torch.empty((n, lp.NGT, d), dtype=torch.float32, device=x.device)
    zero = None if symmetric else torch.empty_like(scale)
    quantize_channel_kernel[(lp.grid,)](
        x_ptr=x, excl_ptr=ex, words_ptr=words, scale_ptr=scale,
        zero_ptr=scale if zero is None else zero, flag_ptr=words if flag is None else flag,
        T=t, NGT=lp.NGT, n_wblocks=lp.n_blocks, D=d, W=lp.W, BITS=bits, CPW=lp.cpw, G=group_size,
        G_PAD=lp.G_PAD, W_BLOCK=lp.W_BLOCK, CPW_PAD=lp.CPW_PAD, SYMMETRIC=symmetric,
        L=(1 << bits) - 1, M=(1 << (bits - 1)) - 1, CHECK=flag is not None, num_warps=lp.num_warps)
    return scale, zero, (lp.NGT, d)


def _launch_token(x, ex, words, flag, bits, group_size, symmetric):
    lp = token_launch(x.shape, bits, group_size)
    n, t, d = x.shape
    scale = torch.empty((n, t, lp.NGD), dtype=torch.float32, device=x.device)
    zero = None if symmetric else torch.empty_like(scale)
    quantize_token_kernel[(lp.grid,)](
        x_ptr=x, excl_ptr=ex, words_ptr=words, scale_ptr=scale,
        zero_ptr=scale if zero is None else zero, flag_ptr=words if flag is None else flag,
        T=t, NGD=lp.NGD, n_tblocks=lp.n_blocks, D=d, W=lp.W, BITS=bits, CPW=lp.cpw, G=group_size,
        NG=lp.NGD, T_BLOCK=lp.T_BLOCK, W_PAD=lp.W_PAD, CPW_PAD=lp.CPW_PAD, SYMMETRIC=symmetric,
        L=(1 << bits) - 1, M=(1 << (bits - 1)) - 1, CHECK=flag is not None, num_warps=lp.num_warps)
    return scale, zero, (t, lp.NGD)


def quantize_pack(x32: torch.Tensor, excl: torch.Tensor, bits: int, group_size: int, axis: str,
                  symmetric: bool, flag: torch.Tensor = None):
    """Run the kernel: ``x32`` float32 ``(..., T, D)``, ``excl`` bool ``(..., T)``.

    Returns ``(words int32 (..., T, W), scale, zero or None)`` in the reference's shapes.
    Arguments are assumed validated by accelerated/quantize.py.  ``flag``: None, or an int32
    tensor of one element (zero on entry) into which the kernel ORs its validation bits
    (see ``_flag``); no host synchronisation happens here.
    """
    *lead, T, D = x32.shape
    N = 1
    for n in lead:
        N *= n
    W = -(-D // (32 // bits))
    x = x32.reshape(N, T, D).contiguous()
    ex = excl.reshape(N, T).contiguous().view(torch.uint8)
    words = torch.empty((N, T, W), dtype=torch.int32, device=x.device)
    launch = _launch_channel if axis == "channel" else _launch_token
    scale, zero, stat_tail = launch(x, ex, words, flag, bits, group_size, symmetric)
    stat_shape = tuple(lead) + stat_tail
    words = words.reshape(tuple(lead) + (T, W))
    scale = scale.reshape(stat_shape)
    zero = None if zero is None else zero.reshape(stat_shape)
    return words, scale, zero
