"""Launch settings of the attention kernels (accelerated/attention_kernels.py,
accelerated/attention_tc_kernels.py) as named data.

One frozen dataclass per kernel and ONE function choosing it from the shape and the device:
:func:`dot_launch` (:class:`DotLaunch`, the many-rows kernel ``quantized_attention_kernel``),
:func:`decode_launch` (:class:`DecodeLaunch`, ``decode_attention_kernel``; with a
:class:`PackedSide` per packed side), :func:`merge_launch` (:class:`MergeLaunch`,
``merge_splits_kernel`` and ``merge_normalise_kernel``), :func:`fused_launch` (:class:`FusedLaunch`,
``fused_decode_kernel`` of accelerated/decode_kernels.py: a :class:`DecodeLaunch` for its quantized
programs, or a :class:`TensorDecodeLaunch` of :func:`tensor_decode_launch` when its engine
(:func:`decode_engine`) is "tensor", plus the tiling of its full-precision ones; the tensor-core
programs' settings are :data:`TENSOR_TUNING` by device family, bench/bench_decode_tc.py).  The
split over the sequence aims at
:data:`PROGRAMS_PER_SM` programs per streaming multiprocessor, the SM count read from the device
(:func:`accelerated.triton_support.device_properties`, cached per device).  The other choices
(tokens per stream ``a``, ``num_warps``, rows per program ``rb``) are named per-device
configurations, :data:`DECODE_TUNING` by device family, bits and head dim (tuned on an H100:
bench/bench_kernels.py, bench/compile_report.py), the defaults of :func:`decode_launch`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

from .triton_support import device_properties, next_pow2

__all__ = ["PROGRAMS_PER_SM", "DOT_MAX_ROWS", "DotLaunch", "dot_launch", "PackedSide", "DecodeLaunch", "decode_launch",
           "MergeLaunch", "merge_launch", "DECODE_ROWS", "DecodeTuning", "DECODE_TUNING",
           "DEFAULT_DECODE_TUNING", "decode_tuning", "FP_TOKENS_PER_PROGRAM", "FusedLaunch", "fused_launch",
           "TENSOR_ROWS", "TensorDecodeLaunch", "tensor_decode_applies", "tensor_decode_launch",
           "ENGINES", "TensorTuning", "TENSOR_TUNING", "DEFAULT_TENSOR_TUNING", "TENSOR_DECODE_FAMILIES",
           "tensor_tuning", "decode_engine"]

#: query rows per KV head (g * Tq) up to which a query is "decode": CUDA-core products
#: (decode_attention_kernel, fused_decode_kernel) rather than tl.dot
DECODE_ROWS = 8

#: query rows per KV head that one launch of the many-rows kernel (quantized_attention_kernel) holds:
#: its query and accumulator tiles are (M_PAD, D_PAD) in registers, so a chunk of a chunked prefill
#: (g * Tq rows: 16384 for 4096 queries of Llama-3's g=4, beyond Triton's 2**20-element tensors)
#: is split over the queries into launches of at most this many rows (the flash-attention forward's
#: usual 128-row tile)
DOT_MAX_ROWS = 128

#: programs per SM the split over the sequence aims for (decode kernel at 4 warps and ~255
#: registers keeps 2 resident per SM: 4 per SM = 2 full waves; tuned on H100, 132 SMs -> 528)
PROGRAMS_PER_SM = 4


def _target_programs(device) -> int:
    return PROGRAMS_PER_SM * device_properties(device).sm_count


def _split_tiles(n_tiles: int, programs_per_split: int, n_split: Optional[int],
                 target: int) -> tuple:
    """``(n_split, tiles_per_split)`` of ``n_tiles`` token tiles: ``n_split`` given, or the floor of
    ``target`` over the ``programs_per_split`` programs each split takes (programs <= target, whole
    waves), at least 1 and at most one per tile; then as few splits as cover the tiles evenly.
    ``(0, 0)`` for an empty store (the fused kernel's: no quantized program)."""
    if n_tiles == 0:
        return 0, 0
    if n_split is None:
        n_split = max(1, min(n_tiles, target // programs_per_split))
    tiles_per_split = -(-n_tiles // n_split)
    return -(-n_tiles // tiles_per_split), tiles_per_split


@dataclass(frozen=True)
class DotLaunch:
    """Launch of :func:`quantized_attention_kernel` (many rows per KV head, or "tf32x3")."""

    rows: int              # R = g*Tq query rows per KV head
    m_pad: int             # rows padded (>= 16 for tl.dot)
    d_pad: int
    block_t: int           # tokens per tile
    n_split: int           # programs along the sequence per KV head
    tiles_per_split: int
    use_dot: bool          # tl.dot, else exact float32 products on CUDA cores
    num_warps: int = 4
    num_stages: int = 1
    max_queries: int = 0   # queries per launch (DOT_MAX_ROWS // g): more are split over launches


def dot_launch(q_shape, keys, device, precision: str = "ieee", *, block_t: Optional[int] = None,
               n_split: Optional[int] = None, num_warps: int = 4, num_stages: int = 1,
               use_dot: Optional[bool] = None) -> DotLaunch:
    """The :class:`DotLaunch` for query ``(B, Hq, Tq, D)`` over ``keys`` ``(B, H, T, D)`` on
    ``device``: ``n_split`` aims at :data:`PROGRAMS_PER_SM` programs per SM; keywords override."""
    b, hq, tq, d = q_shape
    h, t_len = keys.shape[1], keys.shape[2]
    r = (hq // h) * tq
    if use_dot is None:                 # few rows (decode): CUDA-core products; many rows: tl.dot
        use_dot = precision == "tf32x3" or r > DECODE_ROWS
    m_pad = max(16, next_pow2(r)) if use_dot else next_pow2(r)
    if block_t is None:
        block_t = 64 if use_dot else max(1, 64 // m_pad)
        block_t = max(block_t, 1)
    n_tiles = -(-t_len // block_t)
    if n_split is None:
        n_split = max(1, min(n_tiles, -(-_target_programs(device) // (b * h))))
    tiles_per_split = -(-n_tiles // n_split)
    n_split = -(-n_tiles // tiles_per_split)
    return DotLaunch(rows=r, m_pad=m_pad, d_pad=max(16, next_pow2(d)), block_t=block_t,
                     n_split=n_split, tiles_per_split=tiles_per_split, use_dot=use_dot,
                     num_warps=num_warps, num_stages=num_stages,
                     max_queries=max(1, DOT_MAX_ROWS // (hq // h)))


@dataclass(frozen=True)
class PackedSide:
    """Compile-time layout of one packed side (keys or values) as the decode kernel reads it."""

    words: int             # W = ceil(D / cpw) words per token
    words_pad: int
    bits: int
    cpw: int               # codes per word
    cpw_pad: int
    group: int
    channel: bool          # axis "channel" (statistics per G tokens), else "token"
    symmetric: bool
    tile_stats: bool       # channel axis, G a multiple of the tile: one statistics row per tile
    word_stats: bool       # token axis, G a multiple of cpw: one statistic per word

    def constexprs(self, p: str) -> dict:
        """The kernel's constexpr arguments of this side (``p`` = "K" or "V")."""
        return {p + "W": self.words, p + "W_PAD": self.words_pad, p + "BITS": self.bits,
                p + "CPW": self.cpw, p + "CPW_PAD": self.cpw_pad, p + "G": self.group,
                p + "CHAN": self.channel, p + "SYM": self.symmetric, p + "TILE": self.tile_stats,
                p + "WORD": self.word_stats}


def _packed_side(p, d: int, block_tokens: int) -> PackedSide:
    cpw = 32 // p.bits
    w = -(-d // cpw)
    chan = p.axis == "channel"
    return PackedSide(words=w, words_pad=next_pow2(w), bits=p.bits, cpw=cpw, cpw_pad=next_pow2(cpw),
                      group=p.group_size, channel=chan, symmetric=p.symmetric,
                      tile_stats=chan and p.group_size % block_tokens == 0,
                      word_stats=(not chan) and p.group_size % cpw == 0)


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch of :func:`decode_attention_kernel` (decode: <= 8 rows per KV head, "ieee")."""

    rows: int              # R = g*Tq
    rb: int                # rows per program
    nrg: int               # row groups per KV head
    a: int                 # tokens per stream per tile
    ts: int                # streams (token lanes x warps)
    n_split: int
    tiles_per_split: int
    prefetch: bool         # manual prefetch of the next tile's packed data
    keys: PackedSide
    values: PackedSide
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class DecodeTuning:
    """The tuned settings of the decode programs (bench/bench_kernels.py sweeps them)."""

    a: int = 2             # tokens per stream per tile
    num_warps: int = 4
    rb: int = 4            # query rows per program


#: Named per-device launch configurations of the decode programs, by (device family, bits of the
#: wider side, head dim); :func:`decode_tuning` reads them.  H100 2-bit D=128 and D=64: measured
#: (bench/README.md, "v3 default" of the decode kernel).  The 4-bit rows and the H200 rows hold the
#: same settings, NOT yet measured: bench/bench_kernels.py's fused sweep prints the best per shape
#: ("best settings"), to be copied here.  Other devices: :data:`DEFAULT_DECODE_TUNING`.
DECODE_TUNING = {
    ("H100", 2, 128): DecodeTuning(a=2, num_warps=4, rb=4),
    ("H100", 2, 64): DecodeTuning(a=2, num_warps=4, rb=4),
    ("H100", 4, 128): DecodeTuning(a=2, num_warps=4, rb=4),
    ("H100", 4, 64): DecodeTuning(a=2, num_warps=4, rb=4),
    ("H200", 2, 128): DecodeTuning(a=2, num_warps=4, rb=4),
    ("H200", 2, 64): DecodeTuning(a=2, num_warps=4, rb=4),
    ("H200", 4, 128): DecodeTuning(a=2, num_warps=4, rb=4),
    ("H200", 4, 64): DecodeTuning(a=2, num_warps=4, rb=4),
}
DEFAULT_DECODE_TUNING = DecodeTuning()


def decode_tuning(device, bits: int, head_dim: int) -> DecodeTuning:
    """The :data:`DECODE_TUNING` entry of ``device`` (its family read from the device's name), the
    packed sides' wider ``bits`` and ``head_dim``; :data:`DEFAULT_DECODE_TUNING` if none."""
    name = device_properties(device).name
    for (family, b, d), tuning in DECODE_TUNING.items():
        if family in name and b == bits and d == head_dim:
            return tuning
    return DEFAULT_DECODE_TUNING


def decode_launch(q_shape, keys, values, device, *, a: Optional[int] = None,
                  num_warps: Optional[int] = None, rb: Optional[int] = None,
                  n_split: Optional[int] = None, prefetch: Optional[bool] = None,
                  target_programs: Optional[int] = None) -> DecodeLaunch:
    """The :class:`DecodeLaunch` for query ``(B, Hq, Tq, D)`` over ``keys``/``values`` on ``device``.

    ``n_split``: the floor of ``target_programs`` (default :data:`PROGRAMS_PER_SM` x the device's
    SM count) over the ``B*H*NRG`` row programs -- programs <= target, whole waves; ``prefetch``
    (default) only when per-channel key statistics are one row per tile (else the prefetched gather
    spills: bench/).  ``a``, ``num_warps``, ``rb``: default :func:`decode_tuning` for the device,
    bits and head dim (bench/bench_kernels.py)."""
    tuning = decode_tuning(device, max(keys.bits, values.bits), q_shape[-1])
    a = tuning.a if a is None else a
    num_warps = tuning.num_warps if num_warps is None else num_warps
    rb = tuning.rb if rb is None else rb
    b, hq, tq, d = q_shape
    h, t_len = keys.shape[1], keys.shape[2]
    r = (hq // h) * tq
    rb = min(rb, next_pow2(r))
    nrg = -(-r // rb)
    lanes_t = max(1, 32 // max(next_pow2(-(-d // (32 // keys.bits))),
                               next_pow2(-(-d // (32 // values.bits)))))
    ts = lanes_t * num_warps
    bt = a * ts
    target = _target_programs(device) if target_programs is None else target_programs
    n_split, tiles_per_split = _split_tiles(-(-t_len // bt), b * h * nrg, n_split, target)
    ks, vs = _packed_side(keys, d, bt), _packed_side(values, d, bt)
    if prefetch is None:
        prefetch = (not ks.channel) or ks.tile_stats
    return DecodeLaunch(rows=r, rb=rb, nrg=nrg, a=a, ts=ts, n_split=n_split,
                        tiles_per_split=tiles_per_split, prefetch=prefetch, keys=ks, values=vs,
                        num_warps=num_warps)


@dataclass(frozen=True)
class MergeLaunch:
    """Launch of :func:`merge_splits_kernel` (one program per (KV head, row))."""

    d_pad: int
    ns_block: int          # splits merged per loop step
    num_warps: int = 4


def merge_launch(n_split: int, d: int) -> MergeLaunch:
    """The :class:`MergeLaunch` for ``n_split`` partials of head dim ``d`` (no device dependence)."""
    return MergeLaunch(d_pad=next_pow2(d), ns_block=min(32, next_pow2(n_split)))


#: full-precision tokens (preserved + residual) per program of the fused decode kernel: a decode
#: step's residual (R + blk tokens at most, 160 by default) takes 3 programs per row group, each
#: reading ~ as many bytes (64 * D * 2 * 2 at bf16) as a quantized split of a long context
FP_TOKENS_PER_PROGRAM = 64


@dataclass(frozen=True)
class FusedLaunch:
    """Launch of ``fused_decode_kernel`` (accelerated/decode_kernels.py): the programs over the
    packed store -- on tensor cores by ``tensor`` when set, else on CUDA cores by ``decode`` (whose
    row groups ``rb``/``nrg`` also tile the full-precision programs) -- then ``n_fp`` programs per
    row group over the full-precision tokens, ``fp_tiles`` tiles of ``fp_block``."""

    decode: DecodeLaunch
    fp_block: int          # FB: full-precision tokens per tile (registers: RB x FB x D_PAD products)
    fp_tiles: int
    n_fp: int
    d_pad: int
    tensor: Optional["TensorDecodeLaunch"] = None

    @property
    def n_split(self) -> int:
        """Programs (per row group) over the packed store (0 when it holds no slot)."""
        return (self.tensor or self.decode).n_split

    @property
    def tiles_per_split(self) -> int:
        return (self.tensor or self.decode).tiles_per_split


class _PackedSpec(NamedTuple):
    """What :func:`decode_launch` reads of a packed side (hashable, for the launch cache)."""

    shape: tuple
    bits: int
    group_size: int
    axis: str
    symmetric: bool


def fused_launch(q_shape, keys, values, fp_tokens: int, device, *, fp_block: Optional[int] = None,
                 engine: Optional[str] = None, **decode_choices) -> FusedLaunch:
    """The :class:`FusedLaunch` for query ``(B, Hq, Tq, D)`` over ``keys``/``values`` (the packed
    store, any length) and ``fp_tokens`` preserved + residual tokens: the quantized programs as
    :func:`decode_launch` (``decode_choices`` are its keywords) with the full-precision programs
    counted in its target (quantized + full-precision programs <= the target: whole waves),
    :data:`FP_TOKENS_PER_PROGRAM` full-precision tokens per program, ``fp_block`` (default
    ``2048 // D_PAD``, at least 8: the (RB, FB, D_PAD) product tile of 4 rows fits 64 registers
    per thread at 4 warps).  ``engine`` of the packed store's programs: "tensor"
    (:class:`TensorDecodeLaunch`), "cuda-core" (``decode``), None = :func:`decode_engine`.
    Cached per shape (every layer of a model step asks the same: host time)."""
    specs = [_PackedSpec(tuple(p.shape), p.bits, p.group_size, p.axis, p.symmetric) for p in (keys, values)]
    if engine is None:
        engine = decode_engine(q_shape, keys, values, device)
    elif engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or None, got {engine!r}")
    elif engine == "tensor" and not tensor_decode_applies(q_shape, keys, values):
        raise ValueError("engine='tensor' needs at most 16 query rows per KV head and a power-of-two "
                         "head dim >= 16 filled by whole words (bits 1, 2, 4, 8); use engine=None")
    return _fused_launch(tuple(q_shape), specs[0], specs[1], int(fp_tokens), str(device), fp_block,
                         engine, tuple(sorted(decode_choices.items())))


#: the engines of the fused kernel's packed-store programs (fused_launch's ``engine``)
ENGINES = ("tensor", "cuda-core")


@dataclass(frozen=True)
class TensorTuning:
    """The tuned settings of the tensor-core decode programs (bench/bench_decode_tc.py sweeps them)."""

    block_t: int = 32          # tokens per tile (16 when keys are per channel in groups of 16)
    num_warps: int = 2
    num_stages: int = 3
    programs_per_sm: int = 8   # the split's target: programs per streaming multiprocessor
    max_registers: Optional[int] = None   # ptxas register cap per thread (None: its choice)


#: Named per-device settings of the tensor-core decode programs, by device family, and the families
#: whose fused decode takes them by default (the CUDA-core programs elsewhere).  H100: measured
#: (bench/README.md "Issue 9, exact-bfloat16 tensor-core decode"): a 168-register cap and 6
#: programs per SM are the fastest of the sweep at four of six shapes and within 1 % of the fastest
#: at the other two; 1.7x-3.2x the CUDA-core kernel (1.5x-2.3x the TF32 programs).  H200: the
#: H100's settings (the same sm_90 SMs), not measured separately.
TENSOR_TUNING = {
    "H100": TensorTuning(block_t=32, num_warps=2, num_stages=3, programs_per_sm=6, max_registers=168),
    "H200": TensorTuning(block_t=32, num_warps=2, num_stages=3, programs_per_sm=6, max_registers=168),
}
DEFAULT_TENSOR_TUNING = TensorTuning()
TENSOR_DECODE_FAMILIES = tuple(TENSOR_TUNING)


def _tensor_target_programs(device) -> int:
    return tensor_tuning(device).programs_per_sm * device_properties(device).sm_count


def tensor_tuning(device) -> TensorTuning:
    """The :data:`TENSOR_TUNING` entry of ``device``'s family, :data:`DEFAULT_TENSOR_TUNING` if none."""
    name = device_properties(device).name
    for family, tuning in TENSOR_TUNING.items():
        if family in name:
            return tuning
    return DEFAULT_TENSOR_TUNING


def decode_engine(q_shape, keys, values, device) -> str:
    """The default engine of the packed store's decode programs: "tensor" where
    :func:`tensor_decode_applies`, the device has TF32 tensor cores (compute capability 8.0 or
    later) and its family is in :data:`TENSOR_DECODE_FAMILIES` (on CPU, the Triton interpreter:
    always), else "cuda-core"."""
    props = device_properties(device)
    if props.capability == (0, 0):           # off CUDA: the Triton interpreter
        tensor_ok = True
    else:
        tensor_ok = props.capability >= (8, 0) and any(f in props.name for f in TENSOR_DECODE_FAMILIES)
    return "tensor" if tensor_ok and tensor_decode_applies(q_shape, keys, values) else "cuda-core"


def _fp_tiling(d: int, fp_tokens: int, fp_block: Optional[int]) -> tuple:
    """``(d_pad, FB, fp_tiles, n_fp)`` of the fused kernel's full-precision programs
    (:func:`fused_launch`): FB tokens per tile, :data:`FP_TOKENS_PER_PROGRAM` per program."""
    d_pad = next_pow2(d)
    fb = max(8, 2048 // d_pad) if fp_block is None else fp_block
    fp_tiles = max(1, FP_TOKENS_PER_PROGRAM // fb)
    return d_pad, fb, fp_tiles, -(-fp_tokens // (fp_tiles * fb))


@functools.lru_cache(maxsize=1024)
def _fused_launch(q_shape, keys, values, fp_tokens, device, fp_block, engine,
                  decode_choices) -> FusedLaunch:
    d = q_shape[-1]
    choices = dict(decode_choices)
    if engine == "tensor":
        return _fused_tensor_launch(q_shape, keys, values, fp_tokens, device, fp_block, choices)
    dec = decode_launch(q_shape, keys, values, device, **choices)
    d_pad, fb, fp_tiles, n_fp = _fp_tiling(d, fp_tokens, fp_block)
    if n_fp and "n_split" not in choices:
        # the full-precision programs count against the target too: whole waves in all (a few
        # extra programs after two full waves would make a third, short one)
        rows = q_shape[0] * keys.shape[1] * dec.nrg
        target = choices.pop("target_programs", None) or _target_programs(device)
        dec = decode_launch(q_shape, keys, values, device, target_programs=max(rows, target - rows * n_fp),
                            **choices)
    return FusedLaunch(decode=dec, fp_block=fb, fp_tiles=fp_tiles, n_fp=n_fp, d_pad=d_pad)


#: the mma tile's rows: a tensor-core decode program computes 16 query rows (a KV head's R <= 16
#: rows, the rest masked)
TENSOR_ROWS = 16


@dataclass(frozen=True)
class TensorDecodeLaunch:
    """Launch of ``tensor_decode_kernel`` (accelerated/attention_tc_kernels.py): one program per
    (KV head, split) over all its rows."""

    rows: int              # R = g*Tq
    m: int                 # rows padded to the mma tile
    block_t: int           # BT tokens per tile
    n_split: int
    tiles_per_split: int
    keys: PackedSide
    values: PackedSide
    key_fold: bool         # keys per channel, BT dividing G: scale folded into the query
    num_warps: int = 4
    num_stages: int = 1
    value_fold: bool = False   # values per token, D/G <= VREP: statistics folded into the weights
    value_rows: int = 1        # VREP = m / max(4, next_pow2(R)): tile rows per query row
    native: bool = False       # bfloat16 operands, inline PTX (CUDA sm_80+; else the interpreter)
    max_registers: Optional[int] = None   # maxnreg of the launch (None: ptxas's choice)

    def compile_options(self) -> dict:
        """The launch's compile options: warps, stages and, if capped, registers per thread."""
        out = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.max_registers is not None:
            out["maxnreg"] = self.max_registers
        return out

    def constexprs(self) -> dict:
        """The kernel's constexpr arguments of both packed sides."""
        out = {"KFOLD": self.key_fold, "VFOLD": self.value_fold, "VREP": self.value_rows,
               "NATIVE": self.native}
        for p, side in (("K", self.keys), ("V", self.values)):
            out.update({p + "W": side.words, p + "BITS": side.bits, p + "CPW": side.cpw,
                        p + "G": side.group, p + "CHAN": side.channel, p + "SYM": side.symmetric,
                        p + "TILE": side.tile_stats, p + "WORD": side.word_stats})
        return out


def tensor_decode_applies(q_shape, keys, values) -> bool:
    """Whether the tensor-core decode kernel takes this shape: at most :data:`TENSOR_ROWS` rows per
    KV head, a power-of-two head dim of at least 16 that whole words fill (codes per word a power
    of two: bits 1, 2, 4, 8)."""
    b, hq, tq, d = q_shape
    h = keys.shape[1]
    if (hq // h) * tq > TENSOR_ROWS or d < 16 or d != next_pow2(d):
        return False
    return all(p.bits in (1, 2, 4, 8) and d % (32 // p.bits) == 0 for p in (keys, values))


def tensor_decode_launch(q_shape, keys, values, device, *, block_t: Optional[int] = None,
                         fold: Optional[bool] = None, value_fold: Optional[bool] = None,
                         num_warps: Optional[int] = None,
                         num_stages: Optional[int] = None, n_split: Optional[int] = None,
                         target_programs: Optional[int] = None,
                         max_registers: Optional[int] = None) -> TensorDecodeLaunch:
    """The :class:`TensorDecodeLaunch` for query ``(B, Hq, Tq, D)`` over ``keys``/``values``;
    defaults from :func:`tensor_tuning`: ``block_t`` (the key group instead when keys are per
    channel in groups of 16 to ``block_t`` that divide it, so that the scale folds),
    ``num_warps``, ``num_stages``, and ``n_split`` aiming at its programs per SM (whole waves);
    ``fold`` (default: wherever the tile lies in one key group) can switch the key folding off,
    ``value_fold`` (default: values per token in groups that divide ``D``, the ``R`` rows repeated
    once per group within the 16-row tile) the values'; ``max_registers`` caps the registers per
    thread (ptxas's ``maxnreg``; default the tuning's, None: uncapped)."""
    tuning = tensor_tuning(device)
    num_warps = tuning.num_warps if num_warps is None else num_warps
    num_stages = tuning.num_stages if num_stages is None else num_stages
    max_registers = tuning.max_registers if max_registers is None else max_registers
    b, hq, tq, d = q_shape
    h, t_len = keys.shape[1], keys.shape[2]
    r = (hq // h) * tq
    chan = keys.axis == "channel"
    if block_t is None:
        g, block_t = keys.group_size, tuning.block_t
        if chan and 16 <= g < block_t and block_t % g == 0:
            block_t = g
    ks, vs = _packed_side(keys, d, block_t), _packed_side(values, d, block_t)
    fold = ks.tile_stats if fold is None else (fold and ks.tile_stats)
    target = _tensor_target_programs(device) if target_programs is None else target_programs
    n_split, tiles_per_split = _split_tiles(-(-t_len // block_t), b * h, n_split, target)
    vrep = TENSOR_ROWS // max(4, next_pow2(r))       # tile rows per query row
    groups = d // values.group_size if values.axis == "token" and d % values.group_size == 0 else 0
    vfold = 0 < groups <= vrep and value_fold is not False
    return TensorDecodeLaunch(rows=r, m=TENSOR_ROWS, block_t=block_t,
                              n_split=n_split, tiles_per_split=tiles_per_split, keys=ks, values=vs,
                              key_fold=fold, num_warps=num_warps, num_stages=num_stages,
                              value_fold=vfold, value_rows=vrep,
                              native=device_properties(device).capability >= (8, 0),
                              max_registers=max_registers)


def _fused_tensor_launch(q_shape, keys, values, fp_tokens, device, fp_block, choices) -> FusedLaunch:
    """:func:`fused_launch` with the packed store on tensor cores: one program per (KV head, split)
    does all rows (the other row groups' programs of a split return at once); the full-precision
    programs as on CUDA cores.  ``choices``: :func:`tensor_decode_launch`'s keywords."""
    dec = decode_launch(q_shape, keys, values, device)
    d_pad, fb, fp_tiles, n_fp = _fp_tiling(q_shape[-1], fp_tokens, fp_block)
    if n_fp and "n_split" not in choices:
        heads = q_shape[0] * keys.shape[1]
        target = choices.pop("target_programs", None) or _tensor_target_programs(device)
        choices["target_programs"] = max(heads, target - heads * dec.nrg * n_fp)
    tensor = tensor_decode_launch(q_shape, keys, values, device, **choices)
    return FusedLaunch(decode=dec, fp_block=fb, fp_tiles=fp_tiles, n_fp=n_fp, d_pad=d_pad, tensor=tensor)
