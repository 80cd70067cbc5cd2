"""Compile the Triton kernels of accelerated/ for sm_90 WITHOUT a GPU and report resources.

    PYTHONPATH=<triton site> python bench/compile_report.py

Uses triton.compile with GPUTarget("cuda", 90, 32) and the ptxas bundled with triton, so the
register count, spills, shared memory and global-load widths (ld.global.v4 = 16-byte loads) of
each variant can be read here before spending device time.  Numbers are for the shapes of
bench/bench_kernels.py (B=1 H=8 Hq=32 D=128, 2-bit KIVI).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton                                                  # noqa: E402
from triton.backends.compiler import GPUTarget                 # noqa: E402
from triton.compiler import ASTSource                          # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _sig(fn, types, consts):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in consts else types.get(name, "i32")
    return sig


def report(label, fn, types, consts, num_warps=4, num_stages=1, divisible=()):
    """``divisible``: int arguments the launch specialises as multiples of 16 (strides)."""
    jit = fn
    sig = _sig(jit, types, consts)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(jit.arg_names)
             if sig[n].startswith("*") or n in divisible}
    src = ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", p, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    info = " ".join(l.strip() for l in out.stderr.splitlines() if "registers" in l or "spill" in l)
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    hist = {}
    for m in re.findall(r"\b(ld\.global[.a-z0-9]*|st\.global[.a-z0-9]*|ld\.shared[.a-z0-9]*|st\.shared[.a-z0-9]*|bar\.sync|shfl[.a-z0-9]*)", ptx):
        hist[m] = hist.get(m, 0) + 1
    print(f"{label:42s} regs {regs.group(1) if regs else '?':>4s} spill {spill.group(1) if spill else '?':>5s}"
          f"  smem {k.metadata.shared:6d}  ptx lines {ptx.count(chr(10))}")
    print("    " + ", ".join(f"{k_} {v}" for k_, v in sorted(hist.items())))
    return k


ATT_TYPES = {"q_ptr": "*fp32", "qpos_ptr": "*i64", "kpos_ptr": "*i64", "kw_ptr": "*i32", "ks_ptr": "*fp32",
             "kz_ptr": "*fp32", "vw_ptr": "*i32", "vs_ptr": "*fp32", "vz_ptr": "*fp32", "m_ptr": "*fp32",
             "l_ptr": "*fp32", "acc_ptr": "*fp32", "scale": "fp32", "m_s_ptr": "*fp32", "l_s_ptr": "*fp32",
             "acc_s_ptr": "*fp32", "x_ptr": "*fp32", "excl_ptr": "*u8", "words_ptr": "*i32",
             "scale_ptr": "*fp32", "zero_ptr": "*fp32", "flag_ptr": "*i32"}


def attention_v3(a=2, num_warps=4, prefetch=True, rb=4):
    from accelerated import attention_kernels as AK
    lanes_t = 4
    ts = lanes_t * num_warps
    bt = a * ts
    c = dict(R=4, RB=rb, NRG=1, D=128, A=a, TS=ts, KW=8, KW_PAD=8, KBITS=2, KCPW=16, KCPW_PAD=16, KG=32,
             KCHAN=True, KSYM=False, KTILE=32 % bt == 0, KWORD=False, VW=8, VW_PAD=8, VBITS=2, VCPW=16,
             VCPW_PAD=16, VG=32, VCHAN=False, VSYM=False, VTILE=False, VWORD=True, PREFETCH=prefetch)
    return report(f"attn v3 A={a} w={num_warps} pf={int(prefetch)} RB={rb}", AK.decode_attention_kernel, ATT_TYPES, c,
                  num_warps=num_warps)


FUSED_TYPES = dict(ATT_TYPES, q_ptr="*bf16", pk_ptr="*bf16", pv_ptr="*bf16", rk_ptr="*bf16",
                   rv_ptr="*bf16", ppos_ptr="*i64", rvalid_ptr="*i1", out_ptr="*bf16")


def fused_decode(bits=2, d=128, a=2, num_warps=4, rb=4, prefetch=None):
    """The fused decode kernel (accelerated/decode_kernels.py) at bench_kernels.py's layer shapes
    (bf16 cache and query, g = 4 rows per KV head), and its merge-normalise kernel."""
    from accelerated import decode_kernels as DK
    cpw = 32 // bits
    w = -(-d // cpw)
    lanes_t = max(1, 32 // w)
    ts = lanes_t * num_warps
    bt = a * ts
    if prefetch is None:                # decode_launch's default: per-channel key statistics per tile
        prefetch = 32 % bt == 0
    c = dict(R=4, RB=rb, NRG=-(-4 // rb), D=d, D_PAD=d, FB=max(8, 2048 // d), A=a, TS=ts, KW=w, KW_PAD=w,
             KBITS=bits, KCPW=cpw, KCPW_PAD=cpw, KG=32, KCHAN=True, KSYM=False, KTILE=32 % bt == 0,
             KWORD=False, VW=w, VW_PAD=w, VBITS=bits, VCPW=cpw, VCPW_PAD=cpw, VG=32, VCHAN=False,
             VSYM=False, VTILE=False, VWORD=True, PREFETCH=prefetch)
    strides = ("q_sb", "q_sh", "kw_sb", "kw_sh", "ks_sb", "ks_sh", "vw_sb", "vw_sh", "vs_sb", "vs_sh",
               "p_sb", "p_sh", "r_sb", "r_sh")                     # multiples of 16 at these shapes
    return report(f"fused {bits}b D={d} A={a} w={num_warps} RB={rb} pf={int(prefetch)}", DK.fused_decode_kernel, FUSED_TYPES, c,
                  num_warps=num_warps, divisible=strides)


def main():
    from accelerated import attention_kernels as AK
    from accelerated import decode_kernels as DK
    for bits in (2, 4):
        for d in (64, 128):
            fused_decode(bits, d)
    report("merge-normalise bf16 out", DK.merge_normalise_kernel, FUSED_TYPES,
           dict(R=4, D=128, D_PAD=128, NS_BLOCK=32))
    base = dict(R=4, M_PAD=4, D=128, D_PAD=128, BLOCK_T=16, KW=8, KBITS=2, KCPW=16, KG=32, KCHAN=True,
                KSYM=False, VW=8, VBITS=2, VCPW=16, VG=32, VCHAN=False, VSYM=False, PREC="ieee", USE_DOT=False)
    report("attn v2 fma bt16", AK.quantized_attention_kernel, ATT_TYPES, base)
    for a, w, pf, rb in [(2, 4, True, 4), (2, 4, False, 4), (1, 4, True, 4), (1, 4, False, 4), (4, 4, False, 4),
                         (2, 4, True, 2), (1, 4, True, 2), (2, 8, True, 4), (1, 8, True, 4), (2, 2, True, 4),
                         (4, 2, False, 4), (2, 1, True, 4)]:
        attention_v3(a, w, pf, rb)
    report("merge", AK.merge_splits_kernel, ATT_TYPES, dict(R=4, D=128, D_PAD=128, NS_BLOCK=32))
    quantize_kernels()


def quantize_kernels():
    from accelerated import quantize_kernels as QK
    extra = {"CHECK": True} if "CHECK" in QK.quantize_channel_kernel.arg_names else {}
    for bits in (2, 4):
        cpw = 32 // bits
        w = 128 // cpw
        wb = max(1, min(w, 8192 // (32 * cpw)))
        k = report(f"quant channel {bits}b G=32 D=128", QK.quantize_channel_kernel, ATT_TYPES,
                   dict(D=128, W=w, BITS=bits, CPW=cpw, G=32, G_PAD=32, W_BLOCK=wb, CPW_PAD=cpw, SYMMETRIC=False,
                        L=(1 << bits) - 1, M=(1 << (bits - 1)) - 1, **extra))
    k = report("quant token 2b G=32 D=128", QK.quantize_token_kernel, ATT_TYPES,
               dict(D=128, W=8, BITS=2, CPW=16, G=32, NG=4, T_BLOCK=64, W_PAD=8, CPW_PAD=16, SYMMETRIC=False, L=3, M=1,
                    **extra))


if __name__ == "__main__":
    main()


def by_source_line(k, ops=("st.shared", "shfl.sync", "bar.sync", "ld.global", "ld.local", "st.local")):
    """Count the given PTX instructions per source line (from the .loc directives)."""
    import collections
    ptx = k.asm["ptx"]
    files = dict(re.findall(r'\.file\s+(\d+)\s+"([^"]+)"', ptx))
    cur = "?"
    cnt = collections.Counter()
    for line in ptx.splitlines():
        m = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", line)
        if m:
            cur = f"{os.path.basename(files.get(m.group(1), '?'))}:{m.group(2)}"
            continue
        for op in ops:
            if line.strip().startswith(op):
                cnt[(cur, op)] += 1
    for (where, op), n in sorted(cnt.items()):
        print(f"    {where:28s} {op:12s} {n}")
