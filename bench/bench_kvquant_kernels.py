"""Check and time the KVQuant Triton kernels (accelerated/kvquant_kernels.py) on CUDA.

    PYTHONUNBUFFERED=1 python bench/bench_kvquant_kernels.py [--quick] [--json FILE]

1. Correctness on fresh random inputs with poisoned outputs (the caching
   allocator is filled with 0xFF bytes before each kernel call, so an element
   the kernel fails to write shows up as a mismatch): kernel == torch path bit
   for bit (codes, packed words, s, c, dequantized values; the torch path is
   itself bit-identical to reference/, tests/test_accelerated_kvquant.py) and
   == the numpy reference on the flushed-block cases.
2. Timing with triton.testing.do_bench (median; L2 flushed before each call) of
   the torch path against the kernels, per flushed block (SmolLM2: H=3 KV heads,
   D=64, key groups of 32 tokens, value groups of 64 channels) and for a 32K
   prefill, with the kernel's bytes-moved floor (formula in the header of
   kvquant_kernels.py) at the measured copy bandwidth.  Rows:
     quantize_nonuniform torch / kernel  the API's dense-and-sparse step (outlier
                                         extraction and, on the kernel path, the
                                         overflow check: one sync each);
     kernel codes / words (+graph)       the quantize kernel alone (uint8 codes or
                                         packed words), and its CUDA-graph replay
                                         (GPU time without launch overhead);
     dequantize torch / kernel           dequantize_nonuniform (codes -> float32);
     deq words torch / kernel            from packed words as the cache stores them
                                         (torch: unpack_codes + dequantize);
     block torch / kernel                quantize_block_kvquant (keys + values,
                                         validation and outlier selection included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_kernels import copy_bandwidth, poison           # noqa: E402
from reference import kvquant as R                              # noqa: E402
from reference.config import KVSinkConfig                       # noqa: E402
from accelerated import kvquant as A                            # noqa: E402
from accelerated import kvquant_kernels as K                    # noqa: E402
from accelerated.packing import pack_codes, unpack_codes, words_to_reference  # noqa: E402

# name, B, H, T, D, bits, G, axis, levels ("nf" grid, "kmeans": per-channel keys / per-head values)
CASES = [
    ("flush K SmolLM2 2b nf", 1, 3, 32, 64, 2, 32, "channel", "nf"),
    ("flush K SmolLM2 4b kmeans", 1, 3, 32, 64, 4, 32, "channel", "kmeans"),
    ("flush V SmolLM2 2b kmeans", 1, 3, 32, 64, 2, 64, "token", "kmeans"),
    ("flush K H8 D128 2b nf", 1, 8, 32, 128, 2, 32, "channel", "nf"),
    ("prefill K 32K H8 D128 2b kmeans", 1, 8, 32768, 128, 2, 32, "channel", "kmeans"),
    ("prefill V 32K H8 D128 2b kmeans", 1, 8, 32768, 128, 2, 64, "token", "kmeans"),
    ("prefill K 32K H8 D128 4b nf", 1, 8, 32768, 128, 4, 32, "channel", "nf"),
]


def n_stats(b, h, t, d, g, axis):
    return b * h * (-(-t // g) * d if axis == "channel" else t * -(-d // g))


def quant_bytes(b, h, t, d, bits, g, axis, words):
    n = b * h * t * d
    w = -(-d // (32 // bits))
    out = 4 * b * h * t * w if words else n
    return 4 * n + n + b * t + out + 8 * n_stats(b, h, t, d, g, axis)


def deq_bytes(b, h, t, d, bits, g, axis, words):
    n = b * h * t * d
    w = -(-d // (32 // bits))
    src = 4 * b * h * t * w if words else n
    return src + 8 * n_stats(b, h, t, d, g, axis) + 4 * n


def make_case(b, h, t, d, bits, g, axis, lvkind, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((b, h, t, d), device="cuda", generator=gen)
    x = x * (torch.rand((b, h, 1, d), device="cuda", generator=gen) * 10 + 0.1)
    x[:, :, 0] *= 50                                                   # a sink-like token
    excl = torch.zeros((b, t), dtype=torch.bool, device="cuda")
    excl[:, 0] = True                                                  # preserved: excluded
    n = 1 << bits
    if lvkind == "nf":
        lv = A.nf_levels(bits, "cuda")
    else:
        lead = (h, 1, d) if axis == "channel" else (h, 1, 1)
        lv = torch.sort(torch.rand(lead + (n,), device="cuda", generator=gen) * 2 - 1, dim=-1).values
    if axis == "channel":
        lo, hi = A.key_outlier_thresholds(x, 0.01, excl)
        out = A.key_outliers(x, lo, hi, excl)
    else:
        out = A.value_outliers(x, 0.01, excl)
    return x, excl, lv, out


def beta_of(lv):
    return (lv[..., :-1] + lv[..., 1:]) / torch.full_like(lv[..., 1:], 2.0)


def u32(tensor):
    return tensor.contiguous().view(torch.int32)


def check(rows):
    for name, b, h, t, d, bits, g, axis, lvkind in CASES:
        x, excl, lv, out = make_case(b, h, t, d, bits, g, axis, lvkind, seed=1)
        poison()
        got = A.quantize_checked(x, lv, bits, g, axis, out, excl, torch.float32, use_kernel=True)
        want = A.quantize_checked(x, lv, bits, g, axis, out, excl, torch.float32, use_kernel=False)
        poison()
        _, words, _, _ = K.quantize_dense(x, excl, out, beta_of(lv), bits, g, axis, codes=False, words=True)
        poison()
        xh_k = A.dequantize_nonuniform(got, use_kernel=True)
        xh_t = A.dequantize_nonuniform(want, use_kernel=False)
        poison()
        xw_k = K.dequantize_dense(words, got.scale, got.centre, lv, bits, g, axis, x.shape, packed=True)
        dense = torch.ones(x.numel(), dtype=torch.bool, device="cuda")
        dense[want.outlier_index.long()] = False
        dense = dense.reshape(x.shape)
        same = {"codes": torch.equal(got.codes, want.codes),
                "s": torch.equal(u32(got.scale), u32(want.scale)),
                "c": torch.equal(u32(got.centre), u32(want.centre)),
                "words": torch.equal(words, pack_codes(want.codes, bits)),
                "outliers": torch.equal(got.outlier_index, want.outlier_index)
                and torch.equal(got.outlier_value, want.outlier_value),
                "dequant": torch.equal(u32(xh_k), u32(xh_t)),
                "dequant words": torch.equal(u32(xw_k)[dense], u32(xh_t)[dense])}
        ref_ok = "-"
        if x.numel() <= 300_000:
            r = R.quantize_nonuniform(x.cpu().numpy(), lv.cpu().numpy(), bits, g, axis,
                                      outliers=out.cpu().numpy(), exclude=excl.cpu().numpy())
            ref_ok = bool((got.codes.cpu().numpy() == r.codes).all()
                          and (words_to_reference(words.cpu()) == r.packed()).all()
                          and (got.scale.cpu().numpy().view(np.uint32) == r.scale.view(np.uint32)).all()
                          and (got.centre.cpu().numpy().view(np.uint32) == r.centre.view(np.uint32)).all()
                          and (xh_k.cpu().numpy().view(np.uint32)
                               == R.dequantize_nonuniform(r).view(np.uint32)).all())
        ok = all(same.values()) and ref_ok is not False
        print(f"check {name}: kernel==torch {same}, kernel==reference {ref_ok}", flush=True)
        rows.append({"check": name, "same": same, "ref": ref_ok})
        assert ok, name


def bench(rows, quick):
    import triton.testing as tt
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)", flush=True)

    def timeit(fn):
        fn()
        torch.cuda.synchronize()
        return tt.do_bench(fn, warmup=25, rep=50 if quick else 150, return_mode="median") * 1e3   # us

    def graph_of(fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(gr, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        return gr

    table = []
    rows_shape = {c[0]: c[1:8] for c in CASES}
    for name, b, h, t, d, bits, g, axis, lvkind in CASES:
        x, excl, lv, out = make_case(b, h, t, d, bits, g, axis, lvkind)
        beta = beta_of(lv)
        out_clean = out & ~excl[:, None, :, None]
        qt = A.quantize_checked(x, lv, bits, g, axis, out, excl, torch.float32, use_kernel=True)
        _, words, s, c = K.quantize_dense(x, excl, out_clean, beta, bits, g, axis, codes=False, words=True)
        tm = {}
        tm["quantize_nonuniform torch"] = timeit(
            lambda: A.quantize_checked(x, lv, bits, g, axis, out, excl, torch.float32, use_kernel=False))
        tm["quantize_nonuniform kernel"] = timeit(
            lambda: A.quantize_checked(x, lv, bits, g, axis, out, excl, torch.float32, use_kernel=True))
        tm["kernel codes"] = timeit(lambda: K.quantize_dense(x, excl, out_clean, beta, bits, g, axis))
        tm["kernel words"] = timeit(lambda: K.quantize_dense(x, excl, out_clean, beta, bits, g, axis,
                                                             codes=False, words=True))
        try:
            gr = graph_of(lambda: K.quantize_dense(x, excl, out_clean, beta, bits, g, axis))
            tm["kernel codes, CUDA graph"] = timeit(gr.replay)
        except Exception as e:                                          # noqa: BLE001
            print(f"{name} graph: {type(e).__name__}: {str(e)[:160]}")
        tm["dequantize torch"] = timeit(lambda: A.dequantize_nonuniform(qt, use_kernel=False))
        tm["dequantize kernel"] = timeit(lambda: A.dequantize_nonuniform(qt, use_kernel=True))

        def deq_words_torch():
            codes = unpack_codes(words, bits, d, validate=False)
            return A.dequantize_nonuniform(A.KVQuantTensor(
                codes=codes, scale=s, centre=c, levels=lv, outlier_index=qt.outlier_index,
                outlier_value=qt.outlier_value, bits=bits, group_size=g, axis=axis, shape=qt.shape),
                use_kernel=False)
        tm["deq words torch"] = timeit(deq_words_torch)
        tm["deq words kernel"] = timeit(lambda: K.dequantize_dense(words, s, c, lv, bits, g, axis, x.shape,
                                                                   packed=True))
        if t <= 64 and not quick:                                       # a flushed block: the whole API
            cfg = KVSinkConfig(quantizer="kvquant", key_bits=bits, value_bits=bits, key_group_size=t,
                               value_group_size=d, outlier_fraction=0.01, kvquant_datatype="nf")
            lo, hi = A.key_outlier_thresholds(x, 0.01, excl)
            cal = A.KVQuantCalibration(key_lower=lo, key_upper=hi, key_levels=A.nf_levels(bits, "cuda"),
                                       value_levels=A.nf_levels(bits, "cuda"), datatype="nf", key_bits=bits,
                                       value_bits=bits, outlier_fraction=0.01, key_group_size=t,
                                       value_group_size=d)
            v = torch.randn_like(x)
            tm["block torch"] = timeit(lambda: A.quantize_block_kvquant(x, v, cal, cfg, exclude=excl,
                                                                        use_kernel=False))
            tm["block kernel"] = timeit(lambda: A.quantize_block_kvquant(x, v, cal, cfg, exclude=excl,
                                                                         use_kernel=True))
        qb = quant_bytes(b, h, t, d, bits, g, axis, False)
        db = deq_bytes(b, h, t, d, bits, g, axis, False)
        dbw = deq_bytes(b, h, t, d, bits, g, axis, True)
        print(f"{name}: quantize floor {qb / bw * 1e6:.2f} us, dequantize floor {db / bw * 1e6:.2f} us "
              f"(from words {dbw / bw * 1e6:.2f} us); "
              + ", ".join(f"{k} {v:.1f}" for k, v in tm.items()), flush=True)
        table.append((name, qb, db, tm))

    print()
    print(f"{'case':34s} {'quant MB':>9s} {'q floor':>8s} {'deq MB':>7s} {'d floor':>8s}   median us")
    for name, qb, db, tm in table:
        print(f"{name:34s} {qb / 1e6:9.3f} {qb / bw * 1e6:7.2f}u {db / 1e6:7.3f} {db / bw * 1e6:7.2f}u   "
              + ", ".join(f"{k}: {v:.1f}" for k, v in tm.items()))
        rows.append({"bench": name, "quant_bytes": qb, "deq_bytes": db, "floor_quant_us": qb / bw * 1e6,
                     "floor_deq_us": db / bw * 1e6, "floor_quant_us_3TBs": qb / 3e12 * 1e6,
                     "floor_deq_words_us": deq_bytes(*rows_shape[name], True) / bw * 1e6,
                     "times_us": tm, "copy_bw": bw})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kvquant_kernels.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    import triton
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}", flush=True)
    rows = []
    check(rows)
    bench(rows, args.quick)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
