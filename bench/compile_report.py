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


def report(label, fn, types, consts, num_warps=4, num_stages=1):
    jit = fn
    sig = _sig(jit, types, consts)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(jit.arg_names)
             if sig[n].startswith("*")}
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


if __name__ == "__main__":
    from bench.kernel_variants import main
    main(report)
