"""Check and time the Triton kernels of accelerated/ on CUDA (see bench/README.md).

    PYTHONUNBUFFERED=1 python bench/bench_kernels.py [--quick]

1. Correctness on fresh random inputs with poisoned outputs (the caching
   allocator is filled with NaN / 0xFF bytes before each kernel call, so an
   element the kernel fails to write shows up as a mismatch):
   quantize kernel == torch path (bit for bit; the torch path is itself
   bit-identical to reference/, tests/test_accelerated_ops.py) and == numpy
   reference on a small case; attention kernel vs float64 attention over the
   dequantized cache (relative error printed).
2. Timing with triton.testing.do_bench (median, L2 flushed before each call
   by do_bench) of kernel vs torch path, against the bytes-moved floor at the
   measured copy bandwidth and at 3 TB/s.  Prints a table last.
3. One cache layer's decode attention (``QuantizedKVCacheLayer.attend``): the
   fused kernel of accelerated/decode_kernels.py (2 launches) against the split
   path it replaced (quantized kernel + float32 torch blocks + merge), eager and
   as CUDA graphs, bf16, 2- and 4-bit, head dims 64 and 128.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reference import quantize as RQ                              # noqa: E402
from reference import attention as RA                           # noqa: E402
from accelerated import attention as AA                         # noqa: E402
from accelerated import quantize as AQ                          # noqa: E402
from accelerated import quantize_kernels as QK                  # noqa: E402
from accelerated import attention_kernels as AK                 # noqa: E402
from accelerated.cache_checks import DeferredChecks             # noqa: E402
from accelerated.cache_layer import QuantizedKVCacheLayer       # noqa: E402
from accelerated.attention_launch import fused_launch           # noqa: E402
from accelerated.decode_kernels import fused_decode_attention   # noqa: E402
from reference.config import KVSinkConfig                       # noqa: E402
from accelerated.packing import words_to_reference              # noqa: E402


def load_version(name):
    """A kept copy of an earlier kernel module (bench/versions/), for before/after timings."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "versions", name + ".py")
    spec = importlib.util.spec_from_file_location("bench_versions_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# decode attention v3 variants swept by the bench: (label, options of decode_partial_attention)
V3_VARIANTS = [("v3 default", dict()),
               ("v3 A2 w4 pf rb4", dict(a=2, num_warps=4, prefetch=True, rb=4)),
               ("v3 A2 w4 rb4", dict(a=2, num_warps=4, prefetch=False, rb=4)),
               ("v3 A2 w4 pf rb4 2x", dict(a=2, num_warps=4, prefetch=True, rb=4, target_programs=1056))]


def poison():
    """Fill freed allocator blocks with garbage so torch.empty() returns poisoned memory."""
    junk = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    del junk


def copy_bandwidth():
    import triton.testing as tt
    a = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def quant_bytes(n, t_len, d, bits, group, axis, sym):
    w = -(-d // (32 // bits))
    stats = n * (-(-t_len // group) * d if axis == "channel" else t_len * -(-d // group))
    return 4 * n * t_len * d + n * t_len + 4 * n * t_len * w + 4 * stats * (1 if sym else 2)


def attn_bytes(b, h, t_len, d, kspec, vspec, hq, tq):
    total = 0
    for bits, g, axis, sym in (kspec, vspec):
        w = -(-d // (32 // bits))
        stats = b * h * (-(-t_len // g) * d if axis == "channel" else t_len * -(-d // g))
        total += 4 * b * h * t_len * w + 4 * stats * (1 if sym else 2)
    return total + 8 * b * t_len + 4 * b * hq * tq * d * 2


def check_quantize(rows):
    torch.manual_seed(0)
    cases = [(2, 32, "channel", False, (1, 8, 32, 128)), (2, 32, "token", False, (1, 8, 4096, 128)),
             (4, 32, "channel", True, (2, 8, 4096, 128)), (3, 16, "token", False, (1, 3, 777, 64)),
             (1, 7, "channel", False, (2, 3, 100, 70)), (8, 64, "token", True, (1, 2, 300, 128))]
    for bits, g, axis, sym, shape in cases:
        x = torch.randn(shape, device="cuda") * torch.rand(shape[:-1] + (1,), device="cuda") * 10
        excl = torch.rand(shape[:-1], device="cuda") < 0.1
        poison()
        got = AQ.quantize_packed(x, bits, g, axis, symmetric=sym, exclude=excl, use_kernel=True)
        want = AQ.quantize_packed(x, bits, g, axis, symmetric=sym, exclude=excl, use_kernel=False)
        same = (torch.equal(got.words, want.words) and torch.equal(got.scale.view(torch.int32),
                                                                   want.scale.view(torch.int32))
                and (sym or torch.equal(got.zero.view(torch.int32), want.zero.view(torch.int32))))
        ref_ok = "-"
        if x.numel() <= 300_000:
            r = RQ.quantize(x.cpu().numpy(), bits, g, axis, symmetric=sym, exclude=excl.cpu().numpy())
            ref_ok = bool((words_to_reference(got.words) == r.packed()).all()
                          and (got.scale.cpu().numpy().view(np.uint32) == r.scale.view(np.uint32)).all())
        print(f"check quantize {bits}b G={g} {axis:7s} sym={sym!s:5s} {shape}: kernel==torch {same}, "
              f"kernel==reference {ref_ok}")
        rows.append({"check": "quantize", "case": [bits, g, axis, sym, list(shape)], "same": same,
                     "ref": ref_ok})
        assert same and ref_ok is not False


def make_cache(b, h, t_len, d, kspec, vspec, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn((b, h, t_len, d), device="cuda", generator=g)
    v = torch.randn((b, h, t_len, d), device="cuda", generator=g)
    k[:, :, 0] *= 20                                            # a sink-like key
    pk = AQ.quantize_packed(k, kspec[0], kspec[1], kspec[2], symmetric=kspec[3])
    pv = AQ.quantize_packed(v, vspec[0], vspec[1], vspec[2], symmetric=vspec[3])
    return pk, pv


def check_attention(rows):
    kspec, vspec = (2, 32, "channel", False), (2, 32, "token", False)
    for (b, h, hq, tq, t_len, d, seed) in [(1, 8, 32, 1, 4096, 128, 1), (2, 3, 9, 4, 1000, 64, 2),
                                          (1, 2, 2, 1, 37, 128, 3)]:
        pk, pv = make_cache(b, h, t_len, d, kspec, vspec, seed)
        q = torch.randn((b, hq, tq, d), device="cuda")
        kp = torch.arange(t_len, device="cuda").repeat(b, 1)
        kp[:, 1:3] = -1
        qp = torch.full((b, tq), t_len + 10, device="cuda")
        qp[0, 0] = t_len // 2
        kd = AQ.dequantize(pk).double().cpu().numpy()
        vd = AQ.dequantize(pv).double().cpu().numpy()
        want = RA.attention(q.cpu().numpy(), kd, vd, query_positions=qp.cpu().numpy(),
                            key_positions=kp.cpu().numpy())
        qn = q.clone()
        qn[0, 0, 0, 0] = float("nan")
        try:
            AA.quantized_segment_attention(qn, pk, pv, query_positions=qp, key_positions=kp)
            raise AssertionError("NaN query not rejected on the kernel path")
        except ValueError as e:
            print(f"check attention NaN query rejected: {e}")
        runs = [("api " + prec, lambda prec=prec: AA.quantized_segment_attention(
                    q, pk, pv, query_positions=qp, key_positions=kp, use_kernel=True, precision=prec))
                for prec in ("ieee", "tf32x3")]
        runs += [(lab, lambda kw=kw: AK.decode_partial_attention(q, pk, pv, qp, kp, 1 / math.sqrt(d), **kw))
                 for lab, kw in V3_VARIANTS]
        for lab, fn in runs:
            poison()
            m, l, acc = fn()
            again = [fn() for _ in range(2)]                    # same inputs: must be bit-identical
            stable = all(torch.equal(acc, a[2]) and torch.equal(m, a[0]) for a in again)
            got = AA.merge_partials([(m, l, acc)]).double().cpu().numpy()
            rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            mx = float(np.abs(got - want).max())
            print(f"check attention B={b} H={h} Hq={hq} Tq={tq} T={t_len} D={d} {lab}: "
                  f"rel err {rel:.2e}, max abs {mx:.2e}, finite {bool(np.isfinite(got).all())}, "
                  f"repeatable {stable}")
            rows.append({"check": "attention", "case": [b, h, hq, tq, t_len, d, lab], "rel": rel, "max": mx,
                         "stable": stable})
            assert np.isfinite(got).all() and rel < 1e-5 and stable


def _print_row(name, nbytes, times, bw):
    f_meas = nbytes / bw * 1e6
    print(f"{name}: floor {f_meas:.1f} us; " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items()),
          flush=True)


def bench(rows, quick):
    import triton.testing as tt
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
    table = []

    def timeit(fn):
        fn()
        torch.cuda.synchronize()
        return tt.do_bench(fn, warmup=25, rep=200 if not quick else 50, return_mode="median")

    # ---------------- quantize
    for (name, b, h, t_len, d, bits, g, axis, sym) in [
            ("quant flush block K", 1, 8, 32, 128, 2, 32, "channel", False),
            ("quant prefill K 32K", 1, 8, 32768, 128, 2, 32, "channel", False),
            ("quant prefill V 32K", 1, 8, 32768, 128, 2, 32, "token", False),
            ("quant prefill K 32K 4b", 1, 8, 32768, 128, 4, 32, "channel", False)]:
        x = torch.randn((b, h, t_len, d), device="cuda")
        excl = torch.zeros((b, h, t_len), dtype=torch.bool, device="cuda")
        nbytes = quant_bytes(b * h, t_len, d, bits, g, axis, sym)
        QK1 = load_version("quantize_kernels_v1")

        def api_v1():                                       # the v1 API: 3 syncs around the v1 kernel
            x32 = AQ.check_x(x)
            w_, s_, z_ = QK1.quantize_pack(x32, excl, bits, g, axis, sym)
            if sym:
                AQ.check_overflow_symmetric(s_, AQ.symmetric_offset(bits))
            else:
                AQ.check_overflow_asymmetric(s_, z_, AQ.quantization_levels(bits))
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")
        tm = {"kernel v1": timeit(lambda: QK1.quantize_pack(x, excl, bits, g, axis, sym)),
              "kernel v2": timeit(lambda: QK.quantize_pack(x, excl, bits, g, axis, sym)),
              "kernel v2+flag": timeit(lambda: QK.quantize_pack(x, excl, bits, g, axis, sym, flag)),
              "API v1 (3 syncs)": timeit(api_v1),
              "quantize_packed": timeit(lambda: AQ.quantize_packed(x, bits, g, axis, symmetric=sym,
                                                                   exclude=excl)),
              "validate=False": timeit(lambda: AQ.quantize_packed(x, bits, g, axis, symmetric=sym,
                                                                  exclude=excl, validate=False))}
        if not quick:
            tm["torch"] = timeit(lambda: AQ.quantize_packed(x, bits, g, axis, symmetric=sym, exclude=excl,
                                                            use_kernel=False))
        table.append((name, nbytes, tm))
        _print_row(name, nbytes, tm, bw)

    # ---------------- attention
    kspec, vspec = (2, 32, "channel", False), (2, 32, "token", False)
    shapes = [("attn B1 H8 Hq32 T32K D128 2b", 1, 8, 32, 1, 32768, 128),
              ("attn B4 H8 Hq32 T32K D128 2b", 4, 8, 32, 1, 32768, 128),
              ("attn B1 H8 Hq32 T4K D128 2b", 1, 8, 32, 1, 4096, 128),
              ("attn B1 H3 Hq9 T32K D64 2b (SmolLM2)", 1, 3, 9, 1, 32768, 64)]
    for (name, b, h, hq, tq, t_len, d) in shapes:
        sets = [make_cache(b, h, t_len, d, kspec, vspec, s) for s in range(2)]
        q = torch.randn((b, hq, tq, d), device="cuda")
        kp = torch.arange(t_len, device="cuda").repeat(b, 1)
        qp = torch.full((b, tq), t_len, device="cuda")
        nbytes = attn_bytes(b, h, t_len, d, kspec, vspec, hq, tq)
        it = {"i": 0}

        def run(**kw):
            pk, pv = sets[it["i"] % 2]
            it["i"] += 1
            return AA.quantized_segment_attention(q, pk, pv, query_positions=qp, key_positions=kp, **kw)

        times = {}

        def kern(prec, **kw):
            pk, pv = sets[it["i"] % 2]
            it["i"] += 1
            return AK.quantized_partial_attention(q, pk, pv, qp, kp, 1 / math.sqrt(d), prec, **kw)

        AK2 = load_version("attention_kernels_v2")     # the v2 kernel and its torch merge (history)

        def kern_v2(**kw):
            pk, pv = sets[it["i"] % 2]
            it["i"] += 1
            return AK2.quantized_partial_attention(q, pk, pv, qp, kp, 1 / math.sqrt(d), "ieee", **kw)

        times["v2 fma bt16 (+torch merge)"] = timeit(lambda: kern_v2(block_t=16, use_dot=False))
        times["v2 dot tf32x3 (+merge kernel)"] = timeit(lambda: kern("tf32x3", block_t=64, use_dot=True))
        for label, kw in V3_VARIANTS:
            try:
                times[label] = timeit(lambda kw=kw: kern("ieee", **kw))
            except Exception as e:                               # e.g. out of registers / shared memory
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:160]}")
        # GPU time alone (no Python/launch overhead): CUDA graph of the default call
        try:
            pk0, pv0 = sets[0]
            gr = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                AK.quantized_partial_attention(q, pk0, pv0, qp, kp, 1 / math.sqrt(d))
                with torch.cuda.graph(gr, stream=stream):
                    AK.quantized_partial_attention(q, pk0, pv0, qp, kp, 1 / math.sqrt(d))
            torch.cuda.current_stream().wait_stream(stream)
            times["v3 default, CUDA graph"] = timeit(gr.replay)
            gr2 = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                with torch.cuda.graph(gr2, stream=stream):
                    AK2.quantized_partial_attention(q, pk0, pv0, qp, kp, 1 / math.sqrt(d), "ieee",
                                                    block_t=16, use_dot=False)
            torch.cuda.current_stream().wait_stream(stream)
            times["v2 fma bt16, CUDA graph"] = timeit(gr2.replay)
        except Exception as e:
            print(f"{name} graph: {type(e).__name__}: {str(e)[:160]}")
        times["quantized_segment_attention"] = timeit(lambda: run())
        if not quick:
            times["torch blocked"] = timeit(lambda: run(use_kernel=False, block_size=4096))

            def deq_sdpa():
                pk, pv = sets[it["i"] % 2]
                it["i"] += 1
                kd, vd = AQ.dequantize(pk), AQ.dequantize(pv)
                g = hq // h
                return torch.nn.functional.scaled_dot_product_attention(
                    q, kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1))
            times["dequant all + SDPA"] = timeit(deq_sdpa)
        table.append((name, nbytes, times))
        _print_row(name, nbytes, times, bw)

    bench_fused_step(table, bw, timeit, quick)

    print()
    print(f"{'case':34s} {'MB moved':>9s} {'floor@meas':>11s} {'floor@3TB/s':>12s}  version: median us (x floor@meas)")
    for name, nbytes, times in table:
        f_meas = nbytes / bw * 1e6
        f_3 = nbytes / 3e12 * 1e6
        vers = ", ".join(f"{k}: {v * 1e3:.1f} ({v * 1e3 / f_meas:.1f}x)" for k, v in times.items())
        print(f"{name:34s} {nbytes / 1e6:9.2f} {f_meas:10.1f}us {f_3:11.1f}us  {vers}")
        rows.append({"bench": name, "bytes": nbytes, "floor_us_measured_bw": f_meas, "floor_us_3TBs": f_3,
                     "times_us": {k: v * 1e3 for k, v in times.items()}, "copy_bw": bw})


def make_layer(b, h, t_len, d, bits, n_preserved, residual=128, seed=0, device="cuda"):
    """A bf16 QuantizedKVCacheLayer on CUDA holding ``t_len`` tokens: KIVI layout at ``bits``
    (keys per channel G=32, values per token G=32), ``n_preserved`` tokens per row in the
    preserved store, a residual window of ``residual`` + 31 tokens (a decode step's steady state)."""
    cfg = KVSinkConfig(key_bits=bits, value_bits=bits, residual_length=residual, preserve=())
    layer = QuantizedKVCacheLayer(cfg, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    n = t_len + residual + 31
    k = torch.randn((b, h, n, d), device=device, generator=g).to(torch.bfloat16)
    v = torch.randn((b, h, n, d), device=device, generator=g).to(torch.bfloat16)
    layer.update(k, v)
    flags = torch.zeros((b, n), dtype=torch.bool, device=device)
    flags[:, :n_preserved] = True                                  # the first tokens: sinks
    layer.resolve(flags)
    layer.flush()
    return layer


def fused_step_bytes(layer, hq, tq):
    """Bytes the fused decode step must read (decode_kernels.py header): the packed store's words
    and statistics and slot positions (the slots held), the preserved and residual tokens, the
    query, the output."""
    b, d = layer.batch_size, layer.head_dim
    keys, values, pos = layer.quantized.kernel_views()
    total = 8 * pos.numel()
    for p in (keys, values):
        total += sum(t.numel() * t.element_size() for t in (p.words, p.scale, p.zero) if t is not None)
    ppos, pk, _ = layer.preserved
    rk = layer.residual[0]
    total += 2 * (pk.numel() + rk.numel()) * 2 + 8 * ppos.numel() + b * rk.shape[2]
    return total + 2 * 2 * b * hq * tq * d


#: settings of the fused kernel's quantized programs swept per shape (attention_launch.DecodeTuning)
FUSED_SWEEP = [dict(a=a, num_warps=w, rb=rb) for a in (1, 2, 4) for w in (4, 8) for rb in (2, 4, 8)]


def sweep_fused(layer, q, qp, bits, d, timeit, name):
    """The fused kernel alone (fused_decode_attention with an explicit launch) for each
    FUSED_SWEEP setting of its CUDA-core programs; prints the best, the entry for
    attention_launch.DECODE_TUNING (the tensor-core programs: bench_decode_tc.py)."""
    ppos, pk, pv = layer.preserved
    rk, rv, valid, _ = layer.residual
    views = layer.quantized.kernel_views()
    segs = ((pk, pv, ppos), (rk, rv, valid, layer.num_quantized))
    qf = q
    times = {}
    for kw in FUSED_SWEEP:
        label = "fused a{a} w{num_warps} rb{rb}".format(**kw)
        try:
            fl = fused_launch(qf.shape, views[0], views[1], pk.shape[2] + rk.shape[2], qf.device,
                              engine="cuda-core", **kw)
            times[label] = timeit(lambda fl=fl: fused_decode_attention(qf, qp, 1 / math.sqrt(d), views,
                                                                       *segs, launch=fl))
        except Exception as e:                                   # out of registers / shared memory
            print(f"{name} {label}: {type(e).__name__}: {str(e)[:160]}")
    if times:
        best = min(times, key=times.get)
        print(f"{name}: best settings {best} ({times[best] * 1e3:.1f} us): DECODE_TUNING "
              f"({torch.cuda.get_device_name()!r}, {bits}, {d})")
    return times


def bench_fused_step(table, bw, timeit, quick):
    """One layer's decode attention: the fused kernel (decode_kernels.py, 2 launches) against the
    split path it replaces (quantized kernel + float32 torch blocks for the preserved store and the
    residual + log-sum-exp merge), each called through QuantizedKVCacheLayer.attend, and each
    replayed as a CUDA graph (GPU time alone)."""
    shapes = [("layer B1 H8 Hq32 T32K D128 2b", 1, 8, 32, 32768, 128, 2),
              ("layer B1 H8 Hq32 T32K D128 4b", 1, 8, 32, 32768, 128, 4),
              ("layer B8 H8 Hq32 T4K D128 2b", 8, 8, 32, 4096, 128, 2),
              ("layer B1 H3 Hq9 T32K D64 2b (SmolLM2)", 1, 3, 9, 32768, 64, 2),
              ("layer B1 H3 Hq9 T4K D64 4b (SmolLM2)", 1, 3, 9, 4096, 64, 4)]
    if quick:
        shapes = shapes[:1] + shapes[3:4]
    for (name, b, h, hq, t_len, d, bits) in shapes:
        layer = make_layer(b, h, t_len, d, bits, n_preserved=4)
        q = torch.randn((b, hq, 1, d), device="cuda").to(torch.bfloat16)
        qp = torch.full((b, 1), layer.seq_length - 1, device="cuda")

        def fused_attend():                     # deferred checks, as a model step: no host read
            return layer.attend(q, qp, checks=DeferredChecks())

        def split_attend():
            layer._fused_applies = lambda *a: False          # bench only: force the split path
            try:
                return layer.attend(q, qp, checks=DeferredChecks())
            finally:
                del layer._fused_applies
        fused, split = fused_attend(), split_attend()
        diff = float((fused - split).abs().max())
        print(f"{name}: fused vs split max |diff| {diff:.2e}")
        assert diff < 1e-3
        times = {"fused attend": timeit(fused_attend), "split attend": timeit(split_attend)}
        for label, fn in (("fused, CUDA graph", fused_attend),
                          ("split, CUDA graph", split_attend)):
            try:
                gr = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                    with torch.cuda.graph(gr, stream=stream):
                        fn()
                torch.cuda.current_stream().wait_stream(stream)
                times[label] = timeit(gr.replay)
            except Exception as e:                               # e.g. a host read while capturing
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:160]}")
        times.update(sweep_fused(layer, q, qp, bits, d, timeit, name))
        nbytes = fused_step_bytes(layer, hq, 1)
        table.append((name, nbytes, times))
        _print_row(name, nbytes, times, bw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    import triton
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    check_quantize(rows)
    check_attention(rows)
    bench(rows, args.quick)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
